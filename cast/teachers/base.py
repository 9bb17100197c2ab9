"""The interface the trainer and the pseudo-labeler need from any model, teacher or student."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from cast.models.outputs import SegmentationOutput
from cast.structures import Instances


@runtime_checkable
class SegmentationModel(Protocol):
    classes: list[str]

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None,
                targets: list[dict[str, torch.Tensor]] | None = None) -> SegmentationOutput:
        """Images in [0, 1]; with targets, `output.loss` is the set-prediction loss."""

    def pixel_embeddings(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`forward(...).embeddings` alone (B, D, h, w), computing only what they need."""

    @torch.no_grad()
    def predict(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None,
                image_sizes: list[tuple[int, int]] | None = None,
                orig_sizes: list[tuple[int, int]] | None = None) -> list[Instances]:
        """Instances per image, cropped to image_sizes and resized to orig_sizes."""

    def parameter_groups(self, lr: float, weight_decay: float,
                         backbone_lr_multiplier: float) -> list[dict]:
        """Only trainable parameters; the backbone's at lr * backbone_lr_multiplier."""

    def save_pretrained(self, directory: str | Path) -> None: ...
