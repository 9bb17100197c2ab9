"""Nested dataclasses from plain dicts (parsed YAML or json), every value checked against its
annotation; an error names the source file and the dotted key, e.g.
`demo.yaml: key 'training.knowledge_transfer.lr': expected float, got 'fast'`."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A configuration problem; the message names the file and the key."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp` and convert it (dicts -> dataclasses)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, source)
            except ConfigError:
                continue
        raise ConfigError(f"{source}: key '{key}': expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}': expected a mapping, got {value!r}")
        return build_dataclass(tp, value, key, source)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: key '{key}': expected a list, got {value!r}")
        return [_convert(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is float:
        # YAML reads "1e-4" (no dot) as a string; accept ints and such strings for floats.
        if isinstance(value, bool):
            raise ConfigError(f"{source}: key '{key}': expected float, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: key '{key}': expected float, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: key '{key}': expected int, got {value!r}")
    if tp is bool or tp is str:
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{source}: key '{key}': expected {tp.__name__}, got {value!r}")
    raise ConfigError(f"{source}: key '{key}': unsupported type {_type_name(tp)}")


def build_dataclass(cls: type, values: dict, prefix: str, source: str) -> Any:
    """`cls` from `values` (unknown keys refused, missing ones take their defaults)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"{source}: unknown key '{key}' (known: {', '.join(sorted(names))})")
        kwargs[k] = _convert(v, hints[k], key, source)
    return cls(**kwargs)
