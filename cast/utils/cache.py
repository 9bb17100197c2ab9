"""The one rule for every cached result (a stage's trained model, pseudo-labels, val predictions,
the labeled / unlabeled split, the stand-in teacher): a result is valid for the settings its
`Record` was written under, and for no others.

A `Record` is a small json file beside the result, written after it (and removed before it is
rewritten), holding `{"settings": ..., **information}`. Whether a mismatch is recomputed or
refused is the caller's choice: cheap derived files (pseudo-labels, predictions) are redone,
training work is refused with `SettingsChangedError` naming each changed key, so that nobody
loses hours of training to a typo nor reads a result made under other settings.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cast.utils.io import atomic_write_json, read_json


class SettingsChangedError(ValueError):
    """Saved work (a finished stage, a checkpoint, a split) was made under other settings than the
    run now asks for: it is neither resumed nor reused, and nothing is overwritten."""


def json_digest(value: Any) -> str:
    """sha256 of a json-able value, independent of dict order."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def as_json(value: Any) -> Any:
    """`value` as it reads back from a json file (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value))


def settings_changes(recorded: dict[str, Any] | None, wanted: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every setting that differs (one level of nesting spelled out)."""
    if recorded is None:
        return ["no record of its settings (made by an older version)"]
    changes = []
    for key in sorted(set(recorded) | set(wanted)):
        old, new = recorded.get(key), wanted.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += [f"{key}.{k}: {old.get(k)!r} -> {new.get(k)!r}"
                        for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        elif old != new:
            changes.append(f"{key}: {old!r} -> {new!r}")
    return changes


def require_same_settings(recorded: dict[str, Any] | None, wanted: dict[str, Any], where: str | Path,
                          made: str) -> None:
    """Raise SettingsChangedError naming every change when `recorded` (what `where` was `made`
    under) differs from `wanted`."""
    changes = settings_changes(recorded, wanted)
    if changes:
        raise SettingsChangedError(f"{where}: {made} under other settings ({'; '.join(changes)}); run under "
                                   "another name, or delete that folder to start it again")


class Record:
    """The json record that vouches for a cached result made under some settings."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def read(self) -> dict[str, Any] | None:
        """The record, or None when it is missing or damaged (a damaged record vouches for nothing)."""
        if not self.path.is_file():
            return None
        try:
            record = read_json(self.path)
        except ValueError:
            return None
        return record if isinstance(record, dict) and "settings" in record else None

    def matches(self, settings: dict[str, Any]) -> bool:
        """A record exists and was written under exactly `settings`."""
        record = self.read()
        return record is not None and record["settings"] == as_json(settings)

    def require(self, settings: dict[str, Any], where: str | Path, made: str = "made") -> bool:
        """True when a record exists for `settings`, False when there is none; SettingsChangedError
        (naming each change) when it was written under other settings."""
        record = self.read()
        if record is None:
            return False
        require_same_settings(record["settings"], as_json(settings), where, made)
        return True

    def clear(self) -> None:
        """Withdraw the record before its result is rewritten."""
        self.path.unlink(missing_ok=True)

    def write(self, settings: dict[str, Any], **information: Any) -> None:
        """Vouch for the result (call once it is completely written)."""
        atomic_write_json(self.path, {"settings": as_json(settings), **information}, indent=1)
