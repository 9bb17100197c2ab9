"""theta_T^0 of a foundation-model teacher, built from local folders in the hub layout as the
config's `teacher` section names them (the demo's stand-in teacher is pretrained by the pipeline
instead). This module stays light: a teacher's classes are imported only when it is built.

Thresholds (`ZeroShotSettings`): Grounding-DINO + SAM use box_threshold / text_threshold /
mask_threshold as named; SAM 3 takes box_threshold as its instance-score threshold (query score x
presence score) and has no text threshold.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

# teacher.kind values served here, and the config keys of the folders each one reads.
FOUNDATION_TEACHERS = {"gdino-sam2": ("grounding_dino_dir", "sam_dir"), "gdino-sam": ("grounding_dino_dir", "sam_dir"),
                       "sam3": ("sam3_dir",)}


@dataclass
class ZeroShotSettings:
    """How a foundation-model teacher turns its outputs into instances; declared and checked here
    once for the run config (cast.config.TeacherConfig) and the teachers' own settings."""

    box_threshold: float = 0.3  # a detection is kept when its best class score exceeds this
    text_threshold: float = 0.25  # ... and reaches this (Grounding-DINO's phrase rule)
    mask_threshold: float = 0.5  # mask probabilities are binarised here
    max_instances: int = 100  # per image, best first

    def problems(self) -> list[tuple[str, str]]:
        """(field, problem) for every value out of range."""
        found = [(key, f"must be in [0, 1], got {getattr(self, key)}")
                 for key in ("box_threshold", "text_threshold", "mask_threshold") if not 0 <= getattr(self, key) <= 1]
        if self.max_instances < 1:
            found.append(("max_instances", f"must be >= 1, got {self.max_instances}"))
        return found


def zero_shot_teacher(teacher: Any, classes: Sequence[str], projection_stride: int) -> torch.nn.Module:
    """The pretrained teacher of `teacher.kind` (a cast.config.TeacherConfig), prompted with
    `classes`; its contrastive projection head reads features at `projection_stride`."""
    if teacher.kind not in FOUNDATION_TEACHERS:
        raise ValueError(f"teacher.kind={teacher.kind!r} is not a foundation-model teacher "
                         f"({', '.join(FOUNDATION_TEACHERS)})")
    if teacher.kind == "sam3":
        from cast.teachers.sam3 import Sam3Teacher

        return Sam3Teacher.from_hub_folder(
            teacher.sam3_dir, classes=list(classes), box_threshold=teacher.box_threshold,
            mask_threshold=teacher.mask_threshold, max_instances=teacher.max_instances,
            projection_stride=projection_stride)
    from cast.teachers.vfm import GroundingDinoSamTeacher

    return GroundingDinoSamTeacher.from_hub_folders(
        teacher.grounding_dino_dir, teacher.sam_dir, classes=list(classes), box_threshold=teacher.box_threshold,
        text_threshold=teacher.text_threshold, mask_threshold=teacher.mask_threshold,
        max_instances=teacher.max_instances, sam_kind="sam2" if teacher.kind == "gdino-sam2" else "sam",
        projection_stride=projection_stride)
