"""AdamW parameter groups shared by every trainable model (student, stand-in and VFM teachers)."""
from __future__ import annotations

from typing import Sequence

from torch import nn


def adamw_parameter_groups(model: nn.Module, lr: float, weight_decay: float, backbone_lr_multiplier: float,
                           backbone_prefix: str, no_decay_names: Sequence[str]) -> list[dict]:
    """Trainable parameters in up to four groups: backbone (names starting with `backbone_prefix`)
    at lr * backbone_lr_multiplier, the rest at lr; no weight decay on norms, biases (ndim <= 1)
    and names containing any of `no_decay_names`; empty groups left out."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        backbone = name.startswith(backbone_prefix)
        decay = param.ndim > 1 and not any(key in name for key in no_decay_names)
        groups.setdefault((backbone, decay), []).append(param)
    return [{"params": params, "lr": lr * (backbone_lr_multiplier if backbone else 1.0),
             "weight_decay": weight_decay if decay else 0.0,
             "name": f"{'backbone' if backbone else 'head'}_{'decay' if decay else 'no_decay'}"}
            for (backbone, decay), params in sorted(groups.items())]
