"""The set-prediction loss of the SAM 3 teacher (transformers ships none for `Sam3Model`), made of
the pieces the project already uses:

- matching: transformers' `GroundingDinoHungarianMatcher` (scipy's linear_sum_assignment on a
  sigmoid-focal class cost + box L1 + GIoU, Grounding-DINO's cost weights 1 / 5 / 2), one text
  "token" per prompt: each (image, class prompt) pair is one set of queries against that class's
  instances in the image;
- classification: `GroundingDinoImageLoss.loss_labels` (sigmoid focal loss, alpha 0.25, on every
  query: matched = 1, the others 0), boxes: its `loss_boxes` (L1 + GIoU on matched queries);
- masks: the project's Mask2Former loss (`cast.losses.set_prediction`, transformers'
  `Mask2FormerLoss.loss_masks`: sigmoid BCE + dice on importance-sampled points), on the matched
  queries' mask logits against the instance masks in SAM 3's mask frame;
- presence: binary cross-entropy of the prompt's presence logit against "the class is in the image".
SAM 3 scores an instance as P(query is an instance | concept present) x P(concept present), so the
query terms cover only the prompts whose class is in the image and the presence term covers
every prompt. Every term is normalised by the number of instances (averaged over processes, as
the student's loss does); the presence term is a mean over prompts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Mask2FormerConfig
from transformers.loss.loss_grounding_dino import GroundingDinoHungarianMatcher, GroundingDinoImageLoss

from cast.losses.set_prediction import _Mask2FormerLoss

# Grounding-DINO's matching costs (transformers' GroundingDinoConfig defaults) and focal alpha.
CLASS_COST, BOX_COST, GIOU_COST, FOCAL_ALPHA = 1.0, 5.0, 2.0, 0.25


@dataclass
class PromptOutputs:
    """SAM 3's outputs for one class prompt over a batch of B images."""

    logits: torch.Tensor  # (B, Q) query logits
    presence: torch.Tensor  # (B,) presence logit of the prompt
    boxes: torch.Tensor  # (B, Q, 4) normalised (cx, cy, w, h)
    masks: torch.Tensor  # (B, Q, L, L) mask logits in SAM 3's square frame


class Sam3SetLoss(nn.Module):
    """Weighted loss terms (see the module docstring) of SAM 3's prompted queries.

    `weights`: loss_ce, loss_bbox, loss_giou, loss_mask, loss_dice, loss_presence; `mask_points`:
    points sampled per mask (12 544 in Mask2Former).
    """

    def __init__(self, weights: dict[str, float], mask_points: int) -> None:
        super().__init__()
        self.weights = dict(weights)
        self.matcher = GroundingDinoHungarianMatcher(class_cost=CLASS_COST, bbox_cost=BOX_COST, giou_cost=GIOU_COST)
        self.detection = GroundingDinoImageLoss(self.matcher, focal_alpha=FOCAL_ALPHA, losses=["labels", "boxes"])
        self.masks = _Mask2FormerLoss(Mask2FormerConfig(num_labels=1, train_num_points=mask_points), weight_dict={})

    def forward(self, prompts: list[PromptOutputs],
                targets: list[list[dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
        """prompts[c]: the outputs of class c's prompt; targets[c][b]: class c's instances in image
        b, {"boxes": (K, 4) normalised (cx, cy, w, h), "masks": (K, L, L) 0/1}. Returns the
        weighted terms (their sum is the loss)."""
        if len(prompts) != len(targets):
            raise ValueError(f"{len(prompts)} prompts for targets of {len(targets)} classes")
        device = prompts[0].logits.device
        counts = [torch.zeros(sum(len(t["boxes"]) for t in per_class), device=device) for per_class in targets]
        num_boxes = float(self.masks.get_num_masks(counts, device))
        zero = prompts[0].logits.new_zeros((), dtype=torch.float32)
        terms = {name: zero for name in self.weights}
        presence_logits, present = [], []
        for out, per_class in zip(prompts, targets):
            found = torch.tensor([len(t["boxes"]) > 0 for t in per_class], device=device)
            presence_logits.append(out.presence.float())
            present.append(found.float())
            if found.any():
                for name, value in self._query_terms(out, per_class, found, num_boxes).items():
                    terms[name] = terms[name] + value
        terms["loss_presence"] = F.binary_cross_entropy_with_logits(torch.cat(presence_logits), torch.cat(present))
        return {name: self.weights[name] * value for name, value in terms.items()}

    def _query_terms(self, out: PromptOutputs, per_class: list[dict[str, torch.Tensor]], found: torch.Tensor,
                     num_boxes: float) -> dict[str, torch.Tensor]:
        """Focal, box and mask terms of one prompt over the images that contain its class."""
        index = found.nonzero().squeeze(1)
        targets = [per_class[i] for i in index.tolist()]
        logits = out.logits[index].float()[..., None]  # one "token": the prompt
        one = logits.new_ones((1, 1))
        outputs = {"logits": logits, "pred_boxes": out.boxes[index].float(), "label_maps": [one] * len(targets),
                   "text_mask": torch.ones_like(logits, dtype=torch.bool)}
        labeled = [{"class_labels": t["boxes"].new_zeros(len(t["boxes"]), dtype=torch.int64), "boxes": t["boxes"]}
                   for t in targets]
        indices = self.matcher(outputs, labeled)
        terms = {**self.detection.loss_labels(outputs, labeled, indices, num_boxes),
                 **self.detection.loss_boxes(outputs, labeled, indices, num_boxes)}
        terms.update(self.masks.loss_masks(out.masks[index].float(), [t["masks"].float() for t in targets], indices,
                                           num_boxes))
        return terms
