"""The interface every segmentation model of the project follows (the student, the demo's
stand-in teacher, the foundation-model teachers), so that one trainer, one pseudo-labeler, one
evaluator and one inspection app serve them all; and the two helpers every caller of a model
needs: the bare model behind a DDP wrapper and the hash of its weights."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

import torch

from cast.models.outputs import SegmentationOutput
from cast.structures import Instances


@runtime_checkable
class SegmentationModel(Protocol):
    # The "model_type" its save_pretrained writes into config.json; cast.models.auto.load_model
    # dispatches on it.
    model_type: ClassVar[str]
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

    def save_pretrained(self, directory: str | Path) -> None:
        """config.json (with "model_type") and the weights, so that `from_pretrained` rebuilds it offline."""

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "SegmentationModel":
        """The model a `save_pretrained` wrote into `directory`."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer (names, dtypes, shapes, bytes) of the model."""
    h = hashlib.sha256()
    for name, t in sorted(unwrap(model).state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
