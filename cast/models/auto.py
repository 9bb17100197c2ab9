"""`load_model(path)`: any model folder a run writes, loaded by the class its config.json names.

Every model's `save_pretrained` writes a "model_type" into config.json (as transformers' Auto
classes dispatch on it); this is the one place that maps it to a class, so no caller decides.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch

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


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """The model saved in folder `path` (student, stand-in teacher or foundation-model teacher), in
    eval mode, following `cast.models.protocol.SegmentationModel`."""
    return model_class(model_type_of(path)).from_pretrained(path, map_location=map_location).eval()
