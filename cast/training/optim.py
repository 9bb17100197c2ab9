"""AdamW with a backbone learning-rate multiplier and a poly schedule with linear warm-up."""
from __future__ import annotations

import torch

from cast.config import TrainConfig


def poly_factor(step: int, total_steps: int, warmup_steps: int = 0, power: float = 0.9) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based).

    Linear warm-up from 1/warmup to 1 over `warmup_steps`, then (1 - t)^power with t the
    fraction of the post-warm-up steps done, reaching 0 after `total_steps`.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    t = min(step - warmup_steps, decay_steps) / decay_steps
    return (1.0 - t) ** power


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the model's own parameter groups (backbone at lr * backbone_lr_multiplier)."""
    groups = model.parameter_groups(cfg.lr, cfg.weight_decay, cfg.backbone_lr_multiplier)
    groups = [{**g, "params": list(g["params"])} for g in groups]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError(f"{type(model).__name__}: no trainable parameters")
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Poly decay (with optional warm-up) applied to every group's own base lr."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: poly_factor(step, cfg.steps, cfg.warmup_steps, cfg.poly_power))
