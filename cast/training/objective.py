"""The unified objective of CAST, J = L_sup + lambda_semi * L_semi + lambda_pxl * L_pxl: one
stage's weights, and the weight of every loss term the trainer computes, decided here only."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Objective:
    """The weights of the unified objective for one stage (L_sup always has weight 1)."""

    lambda_semi: float = 0.0
    lambda_pxl: float = 0.0

    @property
    def reads_unlabeled(self) -> bool:
        """D_u feeds L_semi (its pseudo-labels) or L_pxl (its pixels); otherwise it is not read."""
        return self.lambda_semi > 0 or self.lambda_pxl > 0

    def term_weights(self, labeled_batch: int, unlabeled_batch: int | None) -> dict[str, float]:
        """Weight of each term by the name the trainer logs it under. L_pxl is one mean over the
        pixels of D_l u D_u, computed per part: each part's term is weighted by its batch share.
        `unlabeled_batch` is None when the stage reads no unlabeled images."""
        weights = {"loss_sup": 1.0}
        parts = {"labeled": labeled_batch}
        if unlabeled_batch is not None:
            weights["loss_semi"] = self.lambda_semi
            parts["unlabeled"] = unlabeled_batch
        total = sum(parts.values())
        for part, size in parts.items():
            weights[f"loss_pxl_{part}"] = self.lambda_pxl * (size / total)
        return weights


def weighted_sum(terms: dict, weights: dict[str, float]):
    """sum of weight x term over the loss terms (tensors or floats), in the terms' order."""
    return sum(weights[name] * value for name, value in terms.items() if name.startswith("loss_"))
