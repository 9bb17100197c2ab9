"""The two data structures every part of the project exchanges.

`InstanceSample` is one image with its instances, as the data readers produce it (numpy,
HWC uint8). `Instances` is what a model predicts for one image (torch tensors). Class ids are
contiguous indices 0..C-1 into the data set's `classes`; the "no object" class of a
set-prediction head is index C.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class InstanceSample:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    masks: np.ndarray  # (K, H, W) bool; K may be 0
    labels: np.ndarray  # (K,) int64, contiguous class index
    image_id: int
    file_name: str = ""
    scores: np.ndarray | None = None  # (K,) float32, for pseudo-labels
    # Pixels annotated as crowd / ignore regions (H, W) bool, never a positive nor a negative.
    ignore: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        h, w = self.image.shape[:2]
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise ValueError(f"image {self.file_name or self.image_id}: expected (H, W, 3) uint8, "
                             f"got {self.image.shape} {self.image.dtype}")
        if self.masks.shape != (len(self.labels), h, w):
            raise ValueError(f"image {self.file_name or self.image_id}: masks {self.masks.shape} do not "
                             f"match {len(self.labels)} labels and image size {(h, w)}")
        if self.scores is not None and len(self.scores) != len(self.labels):
            raise ValueError(f"image {self.file_name or self.image_id}: {len(self.scores)} scores "
                             f"for {len(self.labels)} instances")

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    def without_labels(self) -> "InstanceSample":
        """The same image with every annotation removed (what unlabeled data exposes)."""
        h, w = self.image.shape[:2]
        return InstanceSample(image=self.image, masks=np.zeros((0, h, w), bool),
                              labels=np.zeros((0,), np.int64), image_id=self.image_id,
                              file_name=self.file_name)


@dataclass
class Instances:
    """Predicted instances of one image at its original resolution."""

    masks: torch.Tensor  # (K, H, W) bool
    labels: torch.Tensor  # (K,) int64
    scores: torch.Tensor  # (K,) float32

    def __len__(self) -> int:
        return int(self.labels.numel())

    def to(self, device: torch.device | str) -> "Instances":
        return Instances(self.masks.to(device), self.labels.to(device), self.scores.to(device))

    def filter(self, keep: torch.Tensor) -> "Instances":
        return Instances(self.masks[keep], self.labels[keep], self.scores[keep])


# A training/eval batch, as `cast.data.batches.collate_instances` builds it, is a dict:
#   "pixel_values":        (B, 3, H, W) float32 in [0, 1], the weak view (models normalise inside)
#   "pixel_values_strong": (B, 3, H, W) the strong view: same geometry, photometric changes only
#                          (present when the loader was built with strong views)
#   "pixel_mask":          (B, H, W) bool, True on real (non-padding) pixels
#   "targets":             list of B dicts {"masks": (K, H, W) float32 0/1, "labels": (K,) int64}
#   "instance_ids":        (B, H, W) int64, index of the instance covering the pixel, -1 for none
#   "image_ids":           list of B ints
#   "image_sizes":         list of B (h, w): each image's size inside the padded canvas
#   "orig_sizes":          list of B (h, w): each image's size as stored on disk
BATCH_KEYS = ("pixel_values", "pixel_values_strong", "pixel_mask", "targets", "instance_ids",
              "image_ids", "image_sizes", "orig_sizes")
