"""CAST models. Import the heavy pieces from their modules (cast.models.student, cast.models.export);
this package only re-exports names, lazily, so `import cast.models.outputs` stays light."""
from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "StudentConfig": "cast.models.config",
    "PRESETS": "cast.models.config",
    "CastStudent": "cast.models.student",
    "build_student": "cast.models.student",
    "instance_inference": "cast.models.postprocess",
    "export_onnx": "cast.models.export",
    "OnnxStudent": "cast.models.export",
    "SegmentationOutput": "cast.models.outputs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cast.models' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
