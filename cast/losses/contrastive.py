"""Instance-aware pixel-wise contrastive loss of CAST (L_pxl).

Every pixel (b, p) of the weak view is an anchor. Its positive is the same pixel of the strong
view (a stop-gradient target); its R negatives are pixels of the weak view drawn by the debiased
sampler of `cast.losses.sampling`. `PixelContrastiveLoss` puts embeddings, predictions and the
padding mask on one pixel grid (`loss_grid`, `valid_cells`, `sampler_descriptions`: public, so
that the inspection app explains a pixel with the very code the loss runs), samples, and returns
the loss with the paper's diagnostics (empirical margin, sampler false-negative rate).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cast.losses import SAMPLERS
from cast.losses.sampling import DEFAULT_CHUNK_ELEMENTS, false_negative_rate, pair_dots, pair_dots_grad, \
    pixel_probabilities, sample_negatives

SCHEDULES = ("cosine", "linear")


class _NegativeSimilarity(torch.autograd.Function):
    """s[i, r] = <z[i], z[index[i, r]]> for z (M, D) and index (M, R), gradient to z through both
    the anchor and the negative, never forming the (M, R, D) tensor of gathered negatives."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, index: torch.Tensor, chunk_elements: int) -> torch.Tensor:
        ctx.save_for_backward(z, index)
        ctx.chunk_elements = chunk_elements
        return pair_dots(z, _row_pointers(index), index.reshape(-1), chunk_elements).view(index.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        z, index = ctx.saved_tensors
        grad = pair_dots_grad(z, _row_pointers(index), index.reshape(-1), grad_out.reshape(-1).contiguous(),
                               ctx.chunk_elements)
        return grad, None, None


def _row_pointers(index: torch.Tensor) -> torch.Tensor:
    """CSR row pointers of an (M, R) index: row i holds entries i*R .. (i+1)*R - 1."""
    return torch.arange(0, index.numel() + 1, index.shape[1], device=index.device)


def _negative_similarity(z_flat: torch.Tensor, index_flat: torch.Tensor,
                         chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    return _NegativeSimilarity.apply(z_flat, index_flat, chunk_elements)


def _check_pair(z_weak: torch.Tensor, z_strong: torch.Tensor, neg_index: torch.Tensor,
                valid: torch.Tensor | None) -> None:
    if z_weak.ndim != 3 or z_weak.shape != z_strong.shape:
        raise ValueError(f"z_weak and z_strong must both be (B, N, D), got {tuple(z_weak.shape)} "
                         f"and {tuple(z_strong.shape)}")
    if neg_index.ndim != 3 or neg_index.shape[:2] != z_weak.shape[:2]:
        raise ValueError(f"neg_index must be (B, N, R) with (B, N) = {tuple(z_weak.shape[:2])}, "
                         f"got {tuple(neg_index.shape)}")
    if valid is not None and valid.shape != z_weak.shape[:2]:
        raise ValueError(f"valid must be (B, N) = {tuple(z_weak.shape[:2])}, got {tuple(valid.shape)}")


def pixel_contrastive_loss(z_weak: torch.Tensor, z_strong: torch.Tensor, neg_index: torch.Tensor,
                           temperature: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """L_pxl = -mean_{b,p} log(exp(s+) / (exp(s+) + sum_r exp(s-_r))).

    z_weak, z_strong: (B, N, D) embeddings, L2-normalised here; z_strong is a stop-gradient
    target. s+ = <z^w_{b,p}, z^s_{b,p}> / T, s-_r = <z^w_{b,p}, z^w[neg_index[b,p,r]]> / T with
    the negatives taken from the weak embeddings (they receive gradient). neg_index (B, N, R)
    holds flat indices into the B*N pixels. valid (B, N) bool selects the anchors averaged over.
    """
    _check_pair(z_weak, z_strong, neg_index, valid)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b, n, d = z_weak.shape
    z_w = F.normalize(z_weak, dim=-1).reshape(b * n, d)
    z_s = F.normalize(z_strong.detach(), dim=-1).reshape(b * n, d)
    positive = (z_w * z_s).sum(-1, keepdim=True) / temperature
    negative = _negative_similarity(z_w, neg_index.reshape(b * n, -1)) / temperature
    per_anchor = torch.logsumexp(torch.cat([positive, negative], dim=1), dim=1) - positive.squeeze(1)
    if valid is None:
        return per_anchor.mean()
    keep = valid.reshape(-1)
    if not keep.any():
        raise ValueError("valid marks no anchor pixel: the contrastive loss is undefined")
    return per_anchor[keep].mean()


def mean_distances(z_weak: torch.Tensor, z_strong: torch.Tensor, neg_index: torch.Tensor,
                    valid: torch.Tensor | None = None) -> tuple[float, float]:
    """(mean positive, mean negative) distance, distance = 1 - cosine similarity; their difference
    is the paper's empirical margin Delta_emp (positives: weak vs strong view of a pixel;
    negatives: weak vs weak sampled)."""
    _check_pair(z_weak, z_strong, neg_index, valid)
    b, n, d = z_weak.shape
    with torch.no_grad():
        z_w = F.normalize(z_weak.detach(), dim=-1).reshape(b * n, d)
        z_s = F.normalize(z_strong.detach(), dim=-1).reshape(b * n, d)
        positive = 1.0 - (z_w * z_s).sum(-1)
        negative = 1.0 - _negative_similarity(z_w, neg_index.reshape(b * n, -1)).mean(1)
        if valid is not None:
            keep = valid.reshape(-1)
            positive, negative = positive[keep], negative[keep]
        return float(positive.mean()), float(negative.mean())


@dataclass
class ContrastiveOutput:
    loss: torch.Tensor  # scalar, carries gradient to the weak embeddings
    temperature: float
    margin: float  # empirical margin, mean negative - mean positive distance
    false_negative_rate: float | None  # None when no instance ids were given
    pos_distance: float
    neg_distance: float


def loss_grid(height: int, width: int, feature_size: tuple[int, int] | None = None,
              max_pixels: int | None = None) -> tuple[int, int]:
    """The pixel grid of the loss for embeddings of (height, width): `feature_size` when given,
    else theirs, shrunk (same aspect ratio) to at most `max_pixels` cells."""
    if feature_size is not None:
        return feature_size
    if max_pixels is not None and height * width > max_pixels:
        # Shrink both sides by the same factor, keeping the aspect ratio.
        scale = math.sqrt(max_pixels / (height * width))
        return max(1, int(height * scale)), max(1, int(width * scale))
    return height, width


def on_grid(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) maps resampled to the loss grid (bilinear, antialiased)."""
    if tuple(maps.shape[2:]) == tuple(grid):
        return maps
    return F.interpolate(maps, size=grid, mode="bilinear", align_corners=False, antialias=True)


def valid_cells(pixel_mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N) bool: a grid cell is real when at least half of the input pixels it covers are
    (pixel_mask (B, H, W) True on real pixels, False on padding)."""
    share = F.adaptive_avg_pool2d(pixel_mask[:, None].float(), grid)
    return (share[:, 0] >= 0.5).flatten(1)


def sampler_descriptions(mask_logits: torch.Tensor, class_logits: torch.Tensor, grid: tuple[int, int],
                         strategy: str) -> torch.Tensor | None:
    """y~ (B, N, E) of `strategy` on the loss grid from the (detached) predictions, None for uniform."""
    if strategy == "uniform":
        return None
    return pixel_probabilities(on_grid(mask_logits.detach(), grid), class_logits, strategy)


class PixelContrastiveLoss(torch.nn.Module):
    """L_pxl for training: resamples inputs to one pixel grid, samples negatives, returns the loss
    and the paper's diagnostics (margin, false-negative rate).

    Args:
        strategy: negative sampler, "fusion" | "mask" | "class" (debiased with the matching
            `pixel_probabilities`) or "uniform".
        num_negatives: R per anchor (drawn with replacement).
        temperature_start, temperature_end: T at progress 0 and 1.
        schedule: "cosine": T = T_end + (T_start - T_end) (1 + cos(pi progress)) / 2, which stays
            near T_start early and settles smoothly at T_end; "linear": straight interpolation.
        feature_size: (h, w) grid of the loss; embeddings are resized to it (bilinear,
            antialiased), mask logits are resized to it, pixel_mask and instance_ids follow.
        max_pixels: instead of feature_size, keep the embeddings' grid but shrink it (same aspect
            ratio) when it has more than this many pixels. Neither: the embeddings' own grid.
        chunk_elements: memory bound of the sampler's chunks (see `sample_negatives`).
    """

    def __init__(self, strategy: str = "fusion", num_negatives: int = 200, temperature_start: float = 0.3,
                 temperature_end: float = 0.07, schedule: str = "cosine",
                 feature_size: tuple[int, int] | None = None, max_pixels: int | None = None,
                 chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> None:
        super().__init__()
        if strategy not in SAMPLERS:
            raise ValueError(f"strategy must be one of {SAMPLERS}, got {strategy!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
        if not 0 < temperature_end <= temperature_start:
            raise ValueError(f"need 0 < temperature_end <= temperature_start, got {temperature_end} "
                             f"and {temperature_start}")
        if feature_size is not None and max_pixels is not None:
            raise ValueError("give feature_size or max_pixels, not both")
        if feature_size is not None and (len(feature_size) != 2 or min(feature_size) < 1):
            raise ValueError(f"feature_size must be (h, w) with positive sides, got {feature_size}")
        if max_pixels is not None and max_pixels < 2:
            raise ValueError(f"max_pixels must be >= 2, got {max_pixels}")
        self.strategy, self.num_negatives, self.schedule = strategy, num_negatives, schedule
        self.temperature_start, self.temperature_end = temperature_start, temperature_end
        self.feature_size = tuple(feature_size) if feature_size is not None else None
        self.max_pixels, self.chunk_elements = max_pixels, chunk_elements

    def temperature(self, progress: float) -> float:
        """Annealed temperature at training progress in [0, 1] (0 = start, 1 = end)."""
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must be in [0, 1], got {progress}")
        t0, t1 = self.temperature_start, self.temperature_end
        if self.schedule == "linear":
            return t0 + (t1 - t0) * progress
        return t1 + (t0 - t1) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def forward(self, emb_weak: torch.Tensor, emb_strong: torch.Tensor, mask_logits: torch.Tensor,
                class_logits: torch.Tensor, pixel_mask: torch.Tensor | None = None, progress: float = 0.0,
                instance_ids: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> ContrastiveOutput:
        """emb_weak/emb_strong (B, D, h, w) projection-head outputs of the two views; mask_logits
        (B, K, H', W') and class_logits (B, K, C+1) the weak view's predictions (used detached);
        pixel_mask (B, H, W) bool real pixels at input resolution; instance_ids (B, H, W) int64
        (-1 = none), only for the false-negative-rate diagnostic."""
        if emb_weak.ndim != 4 or emb_weak.shape != emb_strong.shape:
            raise ValueError(f"emb_weak and emb_strong must both be (B, D, h, w), got "
                             f"{tuple(emb_weak.shape)} and {tuple(emb_strong.shape)}")
        b, d = emb_weak.shape[:2]
        grid = loss_grid(emb_weak.shape[2], emb_weak.shape[3], self.feature_size, self.max_pixels)
        z_weak = on_grid(emb_weak, grid).flatten(2).transpose(1, 2)  # (B, N, D)
        z_strong = on_grid(emb_strong, grid).detach().flatten(2).transpose(1, 2)
        valid = None
        if pixel_mask is not None:
            if pixel_mask.ndim != 3 or pixel_mask.shape[0] != b:
                raise ValueError(f"pixel_mask must be (B, H, W) with B = {b}, got {tuple(pixel_mask.shape)}")
            valid = valid_cells(pixel_mask, grid)
        if self.strategy != "uniform" and mask_logits.shape[0] != b:
            raise ValueError(f"mask_logits batch {mask_logits.shape[0]} differs from embeddings batch {b}")
        y = sampler_descriptions(mask_logits, class_logits, grid, self.strategy)
        neg_index = sample_negatives(y, self.num_negatives, generator, valid=valid, size=(b, grid[0] * grid[1]),
                                     chunk_elements=self.chunk_elements)

        temperature = self.temperature(progress)
        loss = pixel_contrastive_loss(z_weak, z_strong, neg_index, temperature, valid=valid)
        pos_distance, neg_distance = mean_distances(z_weak, z_strong, neg_index, valid)
        fnr = None
        if instance_ids is not None:
            if instance_ids.ndim != 3 or instance_ids.shape[0] != b:
                raise ValueError(f"instance_ids must be (B, H, W) with B = {b}, got {tuple(instance_ids.shape)}")
            # Nearest sampling keeps ids whole (no averaging of labels).
            ids = F.interpolate(instance_ids[:, None].double(), size=grid, mode="nearest-exact")
            fnr = false_negative_rate(neg_index, ids[:, 0].long().flatten(1), valid)
        return ContrastiveOutput(loss=loss, temperature=temperature, margin=neg_distance - pos_distance,
                                 false_negative_rate=fnr, pos_distance=pos_distance, neg_distance=neg_distance)
