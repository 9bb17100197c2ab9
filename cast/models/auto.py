"""`load_model(path)`: any model folder a run writes, loaded by the class its config.json names.

Every model's `save_pretrained` writes a "model_type" into config.json (as transformers' Auto
classes dispatch on it); this is the one place that maps it to a class, so no caller decides.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
import yaml

from cast.utils.io import read_json

# model_type -> (module, class); modules are imported only when their kind is loaded.
MODEL_TYPES = {
    "cast_student": ("cast.models.student", "CastStudent"),
    "cast_vfm_teacher": ("cast.teachers.vfm", "GroundingDinoSamTeacher"),
    "cast_sam3_teacher": ("cast.teachers.sam3", "Sam3Teacher"),
}


def model_class(model_type: str) -> type:
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}")
    module, name = MODEL_TYPES[model_type]
    return getattr(importlib.import_module(module), name)


def model_type_of(directory: str | Path) -> str:
    """The model_type a model folder's config.json names; errors name the file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: model folder not found")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: file not found (not a model folder written by save_pretrained)")
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a json object")
    # Students saved before model_type existed are recognised by their own keys.
    model_type = config.get("model_type", "cast_student" if "encoder_type" in config else None)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{config_path}: model_type {model_type!r} is not a CAST model "
                         f"(known: {', '.join(MODEL_TYPES)})")
    return model_type


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """The model saved in folder `path` (student, stand-in teacher or foundation-model teacher), in
    eval mode, following `cast.models.protocol.SegmentationModel`; or, for an `.onnx` file written by
    `python -m cast export` (with its sidecar json), a `cast.models.export.OnnxStudent`.

    Every one has `predict_images(images, score_threshold=0.5)`. A model folder inside a run folder
    (runs/<name>/stages/<stage>/model) resizes images to the run's `data.test_size` there (its
    `default_test_size`), as the run evaluated it; the ONNX model to the size its sidecar records.
    """
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        from cast.models.export import OnnxStudent

        device = torch.device(map_location)
        providers = ["CUDAExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
        if device.type == "cuda" and providers[0] not in _ort_providers():
            raise ValueError(f"{path}: this onnxruntime has no CUDAExecutionProvider; run it with --device cpu")
        return OnnxStudent(path, providers=providers)
    model = model_class(model_type_of(path)).from_pretrained(path, map_location=map_location).eval()
    model.default_test_size = run_test_size(path)
    return model


def _ort_providers() -> list[str]:
    import onnxruntime

    return onnxruntime.get_available_providers()


def run_test_size(model_dir: str | Path) -> int | None:
    """`data.test_size` of the run whose folder holds `model_dir` (runs/<name>/stages/<stage>/model, or
    an ablation's variant below runs/<name>/ablations/), or None when it lies in no run folder."""
    from cast.runs import run_config_of

    config = run_config_of(model_dir)
    if config is None:
        return None
    try:
        value = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("data", {}).get("test_size")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None
