"""Mask2Former set-prediction loss with deep supervision, on the project's target format.

The matching and the loss terms are transformers' `Mask2FormerLoss` (Hungarian matching with
scipy on uniformly sampled points; class cross-entropy with a down-weighted no-object class;
sigmoid BCE and dice on importance-sampled points). This wrapper converts our targets, runs it on
every decoder prediction and weights the terms.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import Mask2FormerConfig
from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss


class _Mask2FormerLoss(Mask2FormerLoss):
    """transformers' loss, averaging the mask count over torch.distributed processes (as the
    original Mask2Former does) rather than only under `accelerate`."""

    def get_num_masks(self, class_labels: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        num_masks = torch.as_tensor(float(sum(len(labels) for labels in class_labels)), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_masks)
            num_masks = num_masks / dist.get_world_size()
        return torch.clamp(num_masks, min=1)


class SetPredictionLoss(nn.Module):
    """L_sup / L_semi of CAST: weighted class CE + mask BCE + dice, summed over all decoder layers.

    `config`: the transformers Mask2FormerConfig that sets the classes, the term weights and the
    point sampling (a student's is `cast.models.decoder.mask2former_config(student_config)`).

    Targets: a list of B dicts {"masks": (K, H, W) float 0/1, "labels": (K,) int64}; K may be 0 and
    (H, W) need not match the logits (points are sampled in normalised coordinates, so targets
    only have to cover the same image extent as the logits).
    """

    def __init__(self, config: Mask2FormerConfig) -> None:
        super().__init__()
        self.num_classes = config.num_labels
        self.criterion = _Mask2FormerLoss(config, weight_dict={})
        self.weights = {"loss_ce": config.class_weight, "loss_mask": config.mask_weight,
                        "loss_dice": config.dice_weight}

    def forward(self, class_logits: torch.Tensor, mask_logits: torch.Tensor,
                targets: list[dict[str, torch.Tensor]],
                aux_outputs: list[dict[str, torch.Tensor]] | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns (loss, loss_dict); loss_dict holds loss_ce, loss_mask and loss_dice, each weighted
        and summed over the final and all `aux_outputs` predictions, so loss = their sum."""
        masks, labels = self._prepare_targets(targets, class_logits.shape[0], mask_logits.device)
        predictions = [(class_logits, mask_logits)]
        predictions += [(aux["class_logits"], aux["mask_logits"]) for aux in aux_outputs or []]
        loss_dict = {name: mask_logits.new_zeros((), dtype=torch.float32) for name in self.weights}
        for layer_class_logits, layer_mask_logits in predictions:
            # The loss runs in float32 even under autocast (sigmoid/log terms on sampled points).
            terms = self.criterion(layer_mask_logits.float(), layer_class_logits.float(), masks, labels)
            terms["loss_ce"] = terms.pop("loss_cross_entropy")
            for name, weight in self.weights.items():
                loss_dict[name] = loss_dict[name] + weight * terms[name]
        return sum(loss_dict.values()), loss_dict

    def _prepare_targets(self, targets: list[dict[str, torch.Tensor]], batch_size: int,
                         device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if len(targets) != batch_size:
            raise ValueError(f"set-prediction loss: {len(targets)} targets for a batch of {batch_size}")
        masks, labels = [], []
        for i, target in enumerate(targets):
            if "masks" not in target or "labels" not in target:
                raise ValueError(f"set-prediction loss: target {i} needs 'masks' and 'labels', got {sorted(target)}")
            m, l = target["masks"], target["labels"]
            if m.ndim != 3 or l.ndim != 1 or m.shape[0] != l.shape[0]:
                raise ValueError(f"set-prediction loss: target {i} has masks {tuple(m.shape)} and labels "
                                 f"{tuple(l.shape)}; expected (K, H, W) and (K,)")
            if l.numel() and (int(l.min()) < 0 or int(l.max()) >= self.num_classes):
                raise ValueError(f"set-prediction loss: target {i} has labels outside [0, {self.num_classes}): "
                                 f"{l.unique().tolist()}")
            masks.append(m.to(device=device, dtype=torch.float32))
            labels.append(l.to(device=device, dtype=torch.int64))
        # transformers pads differently sized targets at the bottom/right, which would shift their
        # normalised coordinates; resize them to one size instead (each covers its whole image).
        size = (max(m.shape[1] for m in masks), max(m.shape[2] for m in masks))
        masks = [m if m.shape[1:] == size or m.shape[0] == 0 else
                 F.interpolate(m[None], size=size, mode="bilinear", align_corners=False)[0] for m in masks]
        masks = [m.new_zeros((0, *size)) if m.shape[0] == 0 else m for m in masks]
        return masks, labels
