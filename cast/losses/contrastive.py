"""Instance-aware pixel-wise contrastive loss of CAST (L_pxl) with debiased negative sampling.

Every pixel (b, p) of the weak view is an anchor. Its positive is the same pixel of the
strong view (a stop-gradient target); its R negatives are pixels (b', q) of the weak view,
drawn with probability proportional to

    s_deb((b, p), (b', q)) = max(0, 1 - <y~[b, p], y~[b', q]>)

where y is built from the model's own detached predictions (`pixel_probabilities`), so that
pixels which probably lie in the anchor's own instance are rarely drawn. The sampler never
builds the (B*N x B*N) weight matrix: it runs rejection sampling on uniform proposals and
resolves what is left exactly, chunk by chunk (see `sample_negatives`).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

STRATEGIES = ("fusion", "mask", "class", "uniform")
SCHEDULES = ("cosine", "linear")
SAMPLING_METHODS = ("auto", "rejection", "exact")
# Largest number of elements of any intermediate tensor a chunk may create (16 MiB of float32).
DEFAULT_CHUNK_ELEMENTS = 1 << 22
# s_deb below this is float32 rounding noise of <y~, y~'> ~ 1 (identical predictions): count it as 0,
# so that such pairs are never drawn and such anchors fall back to uniform, in every code path.
WEIGHT_EPS = 1e-6


def _debiased(dots: torch.Tensor) -> torch.Tensor:
    """s_deb = max(0, 1 - dots), with values below WEIGHT_EPS set to 0."""
    weights = 1.0 - dots
    return weights.masked_fill_(weights < WEIGHT_EPS, 0.0)


def pixel_probabilities(mask_logits: torch.Tensor, class_logits: torch.Tensor,
                        strategy: str = "fusion") -> torch.Tensor:
    """Per-pixel description y~ used to weight negatives, (B, h*w, E) with unit-norm rows.

    P_m = softmax of `mask_logits` (B, K, h, w) over the K queries at each pixel, P_c =
    softmax of `class_logits` (B, K, C+1) over the classes, and F_c[b, p, c] =
    sum_k P_m[b, k, p] P_c[b, k, c] is the pixel's expected class distribution.
    "fusion" gives [P_m | F_c] (E = K + C + 1), "mask" P_m (E = K), "class" F_c (E = C + 1).
    The inputs are detached: the sampler uses the predictions as fixed weights.
    """
    if strategy not in ("fusion", "mask", "class"):
        raise ValueError(f"strategy must be one of fusion, mask, class; got {strategy!r}")
    if mask_logits.ndim != 4 or class_logits.ndim != 3 or mask_logits.shape[:2] != class_logits.shape[:2]:
        raise ValueError(f"expected mask_logits (B, K, h, w) and class_logits (B, K, C+1) with the same "
                         f"B and K, got {tuple(mask_logits.shape)} and {tuple(class_logits.shape)}")
    p_mask = mask_logits.detach().flatten(2).softmax(dim=1)  # (B, K, N)
    if strategy == "mask":
        y = p_mask.transpose(1, 2)
    else:
        p_class = class_logits.detach().to(p_mask.dtype).softmax(dim=-1)  # (B, K, C+1)
        f_class = torch.einsum("bkn,bkc->bnc", p_mask, p_class)
        y = f_class if strategy == "class" else torch.cat([p_mask.transpose(1, 2), f_class], dim=-1)
    return F.normalize(y, dim=-1)


def _uniform_draws(anchors: torch.Tensor, count: int, pool: torch.Tensor, pool_position: torch.Tensor,
                   valid_flat: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(len(anchors), count) pixels drawn uniformly from `pool`, never the anchor itself."""
    m = pool.numel()
    out = torch.empty(anchors.numel(), count, dtype=torch.long, device=pool.device)
    inside = valid_flat[anchors]
    if inside.any():
        # Draw among the M - 1 other pool entries, then step over the anchor's own slot.
        own = pool_position[anchors[inside]].unsqueeze(1)
        u = torch.randint(0, m - 1, (int(inside.sum()), count), generator=generator, device=pool.device)
        out[inside] = pool[u + (u >= own).long()]
    if not inside.all():  # padding anchors are not in the pool: nothing to step over
        u = torch.randint(0, m, (int((~inside).sum()), count), generator=generator, device=pool.device)
        out[~inside] = pool[u]
    return out


def _csr(crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Square CSR matrix with row pointers `crow`; repeated (row, col) pairs stay separate
    entries, which every op used here handles."""
    size = crow.numel() - 1
    with warnings.catch_warnings():  # torch flags its CSR support as beta on first use
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols, values, size=(size, size), check_invariants=False)


def _chunk_rows(crow: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Row of each entry lo..hi-1 of a CSR pattern."""
    entries = torch.arange(lo, hi, device=crow.device)
    return torch.searchsorted(crow, entries, right=True) - 1


def _pair_dots(x: torch.Tensor, crow: torch.Tensor, cols: torch.Tensor, chunk_elements: int,
               sparse: bool | None = None) -> torch.Tensor:
    """<x[i], x[j]> for every entry (i, j) of the CSR pattern (crow, cols), without an (n x n) matrix.

    On CPU a sampled dense-dense product on the pattern (a parallel kernel; row gathers are
    single-threaded and memory-bound there); elsewhere chunked gathers.
    """
    if sparse is None:
        sparse = x.device.type == "cpu"
    # sampled_addmm refuses patterns with more entries than the dense (n x n) matrix.
    if sparse and cols.numel() <= x.shape[0] ** 2:
        pattern = _csr(crow, cols, torch.zeros(cols.numel(), dtype=x.dtype, device=x.device))
        return torch.sparse.sampled_addmm(pattern, x, x.T, beta=0.0).values()
    out = torch.empty(cols.numel(), dtype=x.dtype, device=x.device)
    step = max(1, chunk_elements // x.shape[1])
    for lo in range(0, cols.numel(), step):
        hi = min(lo + step, cols.numel())
        out[lo:hi] = (x[_chunk_rows(crow, lo, hi)] * x[cols[lo:hi]]).sum(-1)
    return out


def _pair_dots_grad(x: torch.Tensor, crow: torch.Tensor, cols: torch.Tensor, grad: torch.Tensor,
                    chunk_elements: int, sparse: bool | None = None) -> torch.Tensor:
    """Gradient wrt x of sum over entries (i, j) of grad_ij <x[i], x[j]>, i.e. (G + G^T) x."""
    if sparse is None:
        sparse = x.device.type == "cpu"
    if sparse:
        g = _csr(crow, cols, grad)
        return g @ x + g.t() @ x
    out = torch.zeros_like(x)
    step = max(1, chunk_elements // x.shape[1])
    for lo in range(0, cols.numel(), step):
        hi = min(lo + step, cols.numel())
        r, c, g = _chunk_rows(crow, lo, hi), cols[lo:hi], grad[lo:hi].unsqueeze(1)
        out.index_add_(0, r, g * x[c])
        out.index_add_(0, c, g * x[r])
    return out


def _rejection_step(y: torch.Tensor, pending: torch.Tensor, num_negatives: int, per_draw: int,
                    pool: torch.Tensor, w_max: float, out_flat: torch.Tensor, generator: torch.Generator | None,
                    chunk_elements: int) -> torch.Tensor:
    """Propose `per_draw` uniform candidates for each pending draw (flat ids into out_flat, sorted),
    accept each with probability s_deb / w_max, store the first accepted one; returns which
    draws were filled."""
    anchors = pending // num_negatives
    candidates = pool[torch.randint(0, pool.numel(), (pending.numel(), per_draw), generator=generator,
                                    device=pool.device)]
    crow = torch.zeros(y.shape[0] + 1, dtype=torch.long, device=pool.device)
    crow[1:] = torch.cumsum(torch.bincount(anchors, minlength=y.shape[0]) * per_draw, 0)
    weights = _debiased(_pair_dots(y, crow, candidates.view(-1), chunk_elements))
    weights = weights.view(candidates.shape).masked_fill_(candidates == anchors.unsqueeze(1), 0.0)
    coin = torch.rand(weights.shape, generator=generator, device=pool.device, dtype=weights.dtype)
    accepted = coin * w_max < weights
    done = accepted.any(1)
    first = accepted.byte().argmax(1)  # argmax returns the first maximal index
    out_flat[pending[done]] = candidates[done, first[done]]
    return done


def _resolve_exactly(y: torch.Tensor, pending: torch.Tensor, num_negatives: int, pool: torch.Tensor,
                     pool_position: torch.Tensor, out_flat: torch.Tensor, generator: torch.Generator | None,
                     chunk_elements: int) -> None:
    """Fill the draws `pending` (flat ids into out_flat, sorted) from the exact categorical law."""
    anchors = pending // num_negatives
    unique, counts = torch.unique_consecutive(anchors, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    # k-th pending draw of its anchor takes the k-th sample of that anchor's row.
    rank = torch.arange(pending.numel(), device=pending.device) - torch.repeat_interleave(starts, counts)
    y_pool = y[pool]
    m = pool.numel()
    rows_per_chunk = max(1, chunk_elements // m)
    for lo in range(0, unique.numel(), rows_per_chunk):
        rows = unique[lo:lo + rows_per_chunk]
        weights = _debiased(y[rows] @ y_pool.T)  # (c, M): one chunk, never all B*N rows
        own = torch.arange(rows.numel(), device=rows.device)
        weights[own, pool_position[rows]] = 0.0
        # Anchors whose weights are all zero fall back to uniform over the other pixels.
        empty = weights.sum(1) <= 0
        if empty.any():
            weights[empty] = 1.0
            weights[own[empty], pool_position[rows[empty]]] = 0.0
        draws = torch.multinomial(weights, int(counts[lo:lo + rows_per_chunk].max()), replacement=True,
                                  generator=generator)
        sel_lo, sel_hi = int(starts[lo]), int(starts[lo + rows.numel() - 1] + counts[lo + rows.numel() - 1])
        local_row = torch.repeat_interleave(own, counts[lo:lo + rows_per_chunk])
        out_flat[pending[sel_lo:sel_hi]] = pool[draws[local_row, rank[sel_lo:sel_hi]]]


def sample_negatives(y: torch.Tensor | None, num_negatives: int, generator: torch.Generator | None = None, *,
                     valid: torch.Tensor | None = None, size: tuple[int, int] | None = None,
                     method: str = "auto", max_rounds: int = 32,
                     chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """Draw R negatives per anchor pixel, WITH replacement, as flat indices into the B*N pixels.

    Args:
        y: (B, N, E) pixel descriptions (e.g. `pixel_probabilities`), normalised here; anchor
            (b, p) draws (b', q) with probability proportional to max(0, 1 - <y~[b,p], y~[b',q]>)
            (values below WEIGHT_EPS count as 0). Its own pixel has weight 0 and is never drawn;
            an anchor whose weights are all 0 draws uniformly over the other pixels.
            None: uniform over the other pixels.
        num_negatives: R, draws per anchor (independent, with replacement).
        generator: torch.Generator on the data's device, for reproducible draws.
        valid: (B, N) bool, False on padding pixels: they get weight 0 (never drawn). Rows of
            padding anchors are filled with uniform draws over valid pixels (losses ignore them).
        size: (B, N), needed only when both y and valid are None.
        method: "rejection" (uniform proposals accepted with probability s_deb / max s_deb for
            up to `max_rounds` rounds, leftovers resolved exactly), "exact" (chunked exact
            categorical draws for every anchor, cost B*N * B*N * E), or "auto" (rejection,
            switching to exact once that costs fewer weight evaluations than another round).
        max_rounds: bound on rejection rounds.
        chunk_elements: bound on the size of any intermediate tensor (memory knob).

    Returns:
        (B, N, R) int64 flat indices b' * N + q. Time and memory grow with B*N*R (exact
        leftovers add chunks of at most `chunk_elements`); no (B*N x B*N) matrix is formed.
    """
    if method not in SAMPLING_METHODS:
        raise ValueError(f"method must be one of {SAMPLING_METHODS}, got {method!r}")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    if y is not None:
        if y.ndim != 3:
            raise ValueError(f"y must be (B, N, E), got shape {tuple(y.shape)}")
        b, n = y.shape[:2]
        device = y.device
    elif valid is not None:
        b, n = valid.shape
        device = valid.device
    elif size is not None:
        b, n = size
        device = generator.device if generator is not None else torch.device("cpu")
    else:
        raise ValueError("sample_negatives needs y, valid or size to know the number of pixels")
    if valid is not None and tuple(valid.shape) != (b, n):
        raise ValueError(f"valid must be (B, N) = {(b, n)}, got {tuple(valid.shape)}")
    valid_flat = (valid.reshape(-1).to(device=device, dtype=torch.bool) if valid is not None
                  else torch.ones(b * n, dtype=torch.bool, device=device))
    pool = valid_flat.nonzero().squeeze(1)
    m, r = pool.numel(), num_negatives
    if m < 2:
        raise ValueError(f"need at least 2 valid pixels to draw negatives, got {m} of {b * n}")
    pool_position = torch.cumsum(valid_flat.long(), 0) - 1  # index of each valid pixel in pool

    out = torch.empty(b * n, r, dtype=torch.long, device=device)
    padding = (~valid_flat).nonzero().squeeze(1)
    if padding.numel():
        out[padding] = _uniform_draws(padding, r, pool, pool_position, valid_flat, generator)
    if y is None:
        out[pool] = _uniform_draws(pool, r, pool, pool_position, valid_flat, generator)
        return out.view(b, n, r)

    y_flat = F.normalize(y.detach().reshape(b * n, -1).to(torch.promote_types(y.dtype, torch.float32)), dim=-1)
    # s_deb <= 1 when y >= 0 (probabilities); in general it is <= 2.
    w_max = 1.0 if bool((y_flat >= 0).all()) else 2.0
    out_flat = out.view(-1)
    pending = (pool.unsqueeze(1) * r + torch.arange(r, device=device)).reshape(-1)  # sorted draw ids
    total = pending.numel()
    # Why this is exact: one draw proposes i.i.d. uniform candidates q and accepts q with
    # probability w(q) / w_max, so P(value = q, accepted) = w(q) / (M w_max): conditioned on being
    # accepted, the value follows w / sum(w). Taking the first acceptance among m proposals, or
    # across rounds, is the same sequential process. Which draws are still pending (and so the
    # number of rounds and the switch to exact) depends only on accept/reject events, never on
    # accepted values, so every draw, accepted or resolved exactly from w / sum(w), has the
    # target law, independently of the others.
    for _ in range(max_rounds if method != "exact" else 0):
        p = pending.numel()
        if p == 0:
            break
        per_draw = max(1, total // p)  # a round never proposes more than the first one did
        if method == "auto" and torch.unique_consecutive(pending // r).numel() * m <= p * per_draw:
            break
        step = max(1, chunk_elements // per_draw)  # bounds this round's temporaries
        done = torch.cat([_rejection_step(y_flat, pending[lo:lo + step], r, per_draw, pool, w_max, out_flat,
                                          generator, chunk_elements) for lo in range(0, p, step)])
        pending = pending[~done]
    if pending.numel():
        _resolve_exactly(y_flat, pending, r, pool, pool_position, out_flat, generator, chunk_elements)
    return out.view(b, n, r)


class _NegativeSimilarity(torch.autograd.Function):
    """s[i, r] = <z[i], z[index[i, r]]> for z (M, D) and index (M, R), gradient to z through both
    the anchor and the negative, never forming the (M, R, D) tensor of gathered negatives."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, index: torch.Tensor, chunk_elements: int) -> torch.Tensor:
        ctx.save_for_backward(z, index)
        ctx.chunk_elements = chunk_elements
        return _pair_dots(z, _row_pointers(index), index.reshape(-1), chunk_elements).view(index.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        z, index = ctx.saved_tensors
        grad = _pair_dots_grad(z, _row_pointers(index), index.reshape(-1), grad_out.reshape(-1).contiguous(),
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


def _mean_distances(z_weak: torch.Tensor, z_strong: torch.Tensor, neg_index: torch.Tensor,
                    valid: torch.Tensor | None = None) -> tuple[float, float]:
    """Mean positive and negative distances, distance = 1 - cosine similarity."""
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


def empirical_margin(z_weak: torch.Tensor, z_strong: torch.Tensor, neg_index: torch.Tensor,
                     valid: torch.Tensor | None = None) -> float:
    """Delta_emp = mean negative distance - mean positive distance, distance = 1 - cosine
    similarity (positives: weak vs strong view of a pixel; negatives: weak vs weak sampled)."""
    positive, negative = _mean_distances(z_weak, z_strong, neg_index, valid)
    return negative - positive


def false_negative_rate(neg_index: torch.Tensor, instance_ids_flat: torch.Tensor,
                        valid: torch.Tensor | None = None) -> float:
    """Share of sampled negatives that lie in the anchor's own instance.

    neg_index (B, N, R) flat indices; instance_ids_flat (B, N) int64 with -1 for pixels in no
    instance. Ids are made unique across the batch (combined with the batch index). Only anchors
    inside an instance (and valid, when given) count; 0.0 when there is none.
    """
    b, n = instance_ids_flat.shape
    if neg_index.ndim != 3 or neg_index.shape[:2] != (b, n):
        raise ValueError(f"neg_index must be (B, N, R) with (B, N) = {(b, n)}, got {tuple(neg_index.shape)}")
    ids = instance_ids_flat.to(neg_index.device).long()
    span = int(ids.max().clamp(min=0)) + 1
    batch = torch.arange(b, device=ids.device).unsqueeze(1)
    unique = torch.where(ids >= 0, batch * span + ids, torch.full_like(ids, -1)).reshape(-1)
    counted = unique >= 0
    if valid is not None:
        counted &= valid.reshape(-1).to(counted.device)
    if not counted.any():
        return 0.0
    anchors = unique[counted]
    drawn = unique[neg_index.reshape(b * n, -1)[counted]]
    return float((drawn == anchors.unsqueeze(1)).float().mean())


@dataclass
class ContrastiveOutput:
    loss: torch.Tensor  # scalar, carries gradient to the weak embeddings
    temperature: float
    margin: float  # empirical margin, mean negative - mean positive distance
    false_negative_rate: float | None  # None when no instance ids were given
    pos_distance: float
    neg_distance: float


def _grid_size(height: int, width: int, feature_size: tuple[int, int] | None,
               max_pixels: int | None) -> tuple[int, int]:
    if feature_size is not None:
        return feature_size
    if max_pixels is not None and height * width > max_pixels:
        # Shrink both sides by the same factor, keeping the aspect ratio.
        scale = math.sqrt(max_pixels / (height * width))
        return max(1, int(height * scale)), max(1, int(width * scale))
    return height, width


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
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
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
        grid = _grid_size(emb_weak.shape[2], emb_weak.shape[3], self.feature_size, self.max_pixels)
        if tuple(emb_weak.shape[2:]) != grid:
            emb_weak = F.interpolate(emb_weak, size=grid, mode="bilinear", align_corners=False, antialias=True)
            emb_strong = F.interpolate(emb_strong, size=grid, mode="bilinear", align_corners=False, antialias=True)
        z_weak = emb_weak.flatten(2).transpose(1, 2)  # (B, N, D)
        z_strong = emb_strong.detach().flatten(2).transpose(1, 2)

        valid = None
        if pixel_mask is not None:
            if pixel_mask.ndim != 3 or pixel_mask.shape[0] != b:
                raise ValueError(f"pixel_mask must be (B, H, W) with B = {b}, got {tuple(pixel_mask.shape)}")
            # A grid cell is real when at least half of the input pixels it covers are.
            share = F.adaptive_avg_pool2d(pixel_mask[:, None].float(), grid)
            valid = (share[:, 0] >= 0.5).flatten(1)

        y = None
        if self.strategy != "uniform":
            if mask_logits.shape[0] != b:
                raise ValueError(f"mask_logits batch {mask_logits.shape[0]} differs from embeddings batch {b}")
            logits = mask_logits.detach()
            if tuple(logits.shape[2:]) != grid:
                logits = F.interpolate(logits, size=grid, mode="bilinear", align_corners=False, antialias=True)
            y = pixel_probabilities(logits, class_logits, self.strategy)
        neg_index = sample_negatives(y, self.num_negatives, generator, valid=valid, size=(b, grid[0] * grid[1]),
                                     chunk_elements=self.chunk_elements)

        temperature = self.temperature(progress)
        loss = pixel_contrastive_loss(z_weak, z_strong, neg_index, temperature, valid=valid)
        pos_distance, neg_distance = _mean_distances(z_weak, z_strong, neg_index, valid)
        fnr = None
        if instance_ids is not None:
            if instance_ids.ndim != 3 or instance_ids.shape[0] != b:
                raise ValueError(f"instance_ids must be (B, H, W) with B = {b}, got {tuple(instance_ids.shape)}")
            # Nearest sampling keeps ids whole (no averaging of labels).
            ids = F.interpolate(instance_ids[:, None].double(), size=grid, mode="nearest-exact")
            fnr = false_negative_rate(neg_index, ids[:, 0].long().flatten(1), valid)
        return ContrastiveOutput(loss=loss, temperature=temperature, margin=neg_distance - pos_distance,
                                 false_negative_rate=fnr, pos_distance=pos_distance, neg_distance=neg_distance)
