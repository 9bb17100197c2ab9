"""What every segmentation model of the project (student, stand-in teacher, VFM teacher)
returns from `forward`, so that one trainer and one contrastive loss serve them all."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SegmentationOutput:
    class_logits: torch.Tensor  # (B, Q, C + 1), last index is "no object"
    mask_logits: torch.Tensor  # (B, Q, H/4, W/4)
    # Earlier decoder layers, for deep supervision: [{"class_logits": ..., "mask_logits": ...}]
    aux_outputs: list[dict[str, torch.Tensor]] = field(default_factory=list)
    # Per-pixel projection-head output (B, D, h, w), not normalised; None if the model has no head.
    embeddings: torch.Tensor | None = None
    loss: torch.Tensor | None = None  # set-prediction loss when targets were passed
    loss_dict: dict[str, torch.Tensor] = field(default_factory=dict)
