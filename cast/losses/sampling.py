"""The debiased negative sampler of CAST's pixel contrastive loss.

Anchor pixel (b, p) draws its R negatives (b', q) with probability proportional to

    s_deb((b, p), (b', q)) = max(0, 1 - <y~[b, p], y~[b', q]>)

where y is built from the model's own detached predictions (`pixel_probabilities`), so that
pixels which probably lie in the anchor's own instance are rarely drawn. `negative_weights` is
that law for given anchors (the inspection app draws it); `sample_negatives` draws from it
without building the (B*N x B*N) weight matrix: rejection sampling on uniform proposals, what is
left resolved exactly from `negative_weights`, chunk by chunk.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

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


def pair_dots(x: torch.Tensor, crow: torch.Tensor, cols: torch.Tensor, chunk_elements: int,
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


def pair_dots_grad(x: torch.Tensor, crow: torch.Tensor, cols: torch.Tensor, grad: torch.Tensor,
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
                    chunk_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Propose `per_draw` uniform candidates for each pending draw (flat ids into out_flat, sorted),
    accept each with probability s_deb / w_max, store the first accepted one; returns which
    draws were filled and how many proposals would have been accepted."""
    anchors = pending // num_negatives
    candidates = pool[torch.randint(0, pool.numel(), (pending.numel(), per_draw), generator=generator,
                                    device=pool.device)]
    crow = torch.zeros(y.shape[0] + 1, dtype=torch.long, device=pool.device)
    crow[1:] = torch.cumsum(torch.bincount(anchors, minlength=y.shape[0]) * per_draw, 0)
    weights = _debiased(pair_dots(y, crow, candidates.view(-1), chunk_elements))
    weights = weights.view(candidates.shape).masked_fill_(candidates == anchors.unsqueeze(1), 0.0)
    coin = torch.rand(weights.shape, generator=generator, device=pool.device, dtype=weights.dtype)
    accepted = coin * w_max < weights
    done = accepted.any(1)
    first = accepted.byte().argmax(1)  # argmax returns the first maximal index
    out_flat[pending[done]] = candidates[done, first[done]]
    return done, accepted.sum()


def pool_of(valid_flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool, pool_position): the flat ids of the valid pixels, the only ones ever drawn, and the
    index of every pixel's entry in the pool (meaningful for valid pixels only)."""
    return valid_flat.nonzero().squeeze(1), torch.cumsum(valid_flat.long(), 0) - 1


def unit_rows(y: torch.Tensor) -> torch.Tensor:
    """(B, N, E) pixel descriptions as (B*N, E) unit rows (at least float32), as the sampler uses them."""
    return F.normalize(y.detach().reshape(-1, y.shape[-1]).to(torch.promote_types(y.dtype, torch.float32)), dim=-1)


def negative_weights(y: torch.Tensor | None, anchors: torch.Tensor, pool: torch.Tensor,
                     pool_position: torch.Tensor) -> torch.Tensor:
    """The law the `anchors` (flat pixel ids) draw their negatives from: (len(anchors), M) weights
    over the M pool pixels (`pool_of`), s_deb of the unit rows `y` (B*N, E) (None: uniform) with
    values below WEIGHT_EPS as 0 and the anchor itself 0; an anchor whose weights are all 0, or
    that is padding (not in the pool), draws uniformly over the other pool pixels."""
    if y is None:
        weights = torch.ones(anchors.numel(), pool.numel(), device=pool.device)
    else:
        weights = _debiased(y[anchors] @ y[pool].T)
    own = torch.arange(anchors.numel(), device=anchors.device)
    in_pool = pool[pool_position[anchors].clamp(min=0)] == anchors
    weights[~in_pool] = 1.0
    weights[own[in_pool], pool_position[anchors[in_pool]]] = 0.0
    # Anchors whose weights are all zero fall back to uniform over the other pixels.
    empty = weights.sum(1) <= 0
    if empty.any():
        weights[empty] = 1.0
        weights[own[empty], pool_position[anchors[empty]]] = 0.0
    return weights


def sampling_law(y: torch.Tensor | None, valid: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(len(anchors), B*N): the weight every pixel has to be drawn as a negative of each anchor,
    exactly as `sample_negatives(y, ..., valid=valid)` draws (0 on padding); `y` (B, N, E) or None."""
    valid_flat = valid.reshape(-1).bool()
    pool, pool_position = pool_of(valid_flat)
    weights = torch.zeros(anchors.numel(), valid_flat.numel(), device=valid_flat.device)
    weights[:, pool] = negative_weights(None if y is None else unit_rows(y), anchors, pool, pool_position)
    return weights


def _resolve_exactly(y: torch.Tensor, pending: torch.Tensor, num_negatives: int, pool: torch.Tensor,
                     pool_position: torch.Tensor, out_flat: torch.Tensor, generator: torch.Generator | None,
                     chunk_elements: int) -> None:
    """Fill the draws `pending` (flat ids into out_flat, sorted) from the exact categorical law."""
    anchors = pending // num_negatives
    unique, counts = torch.unique_consecutive(anchors, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    # k-th pending draw of its anchor takes the k-th sample of that anchor's row.
    rank = torch.arange(pending.numel(), device=pending.device) - torch.repeat_interleave(starts, counts)
    rows_per_chunk = max(1, chunk_elements // pool.numel())
    for lo in range(0, unique.numel(), rows_per_chunk):
        rows = unique[lo:lo + rows_per_chunk]
        weights = negative_weights(y, rows, pool, pool_position)  # one chunk, never all B*N rows
        draws = torch.multinomial(weights, int(counts[lo:lo + rows_per_chunk].max()), replacement=True,
                                  generator=generator)
        sel_lo, sel_hi = int(starts[lo]), int(starts[lo + rows.numel() - 1] + counts[lo + rows.numel() - 1])
        local_row = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device),
                                            counts[lo:lo + rows_per_chunk])
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
            switching to exact once that costs fewer weight evaluations than the proposals
            rejection still needs at the last round's acceptance rate).
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
    pool, pool_position = pool_of(valid_flat)
    m, r = pool.numel(), num_negatives
    if m < 2:
        raise ValueError(f"need at least 2 valid pixels to draw negatives, got {m} of {b * n}")

    out = torch.empty(b * n, r, dtype=torch.long, device=device)
    padding = (~valid_flat).nonzero().squeeze(1)
    if padding.numel():
        out[padding] = _uniform_draws(padding, r, pool, pool_position, valid_flat, generator)
    if y is None:
        out[pool] = _uniform_draws(pool, r, pool, pool_position, valid_flat, generator)
        return out.view(b, n, r)

    y_flat = unit_rows(y)
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
    acceptance = None  # share of the last round's proposals that were acceptable
    for _ in range(max_rounds if method != "exact" else 0):
        p = pending.numel()
        if p == 0:
            break
        per_draw = max(1, total // p)  # a round never proposes more than the first one did
        if method == "auto":
            # Exact evaluates one weight per (pending anchor, pool pixel); rejection proposes at
            # least one more round and, once a round has measured the acceptance rate, p /
            # acceptance proposals in expectation.
            rejection_cost = p * per_draw
            if acceptance is not None:
                rejection_cost = math.inf if acceptance == 0 else max(rejection_cost, p / acceptance)
            if torch.unique_consecutive(pending // r).numel() * m <= rejection_cost:
                break
        step = max(1, chunk_elements // per_draw)  # bounds this round's temporaries
        steps = [_rejection_step(y_flat, pending[lo:lo + step], r, per_draw, pool, w_max, out_flat,
                                 generator, chunk_elements) for lo in range(0, p, step)]
        done = torch.cat([d for d, _ in steps])
        acceptance = float(sum(a for _, a in steps)) / (p * per_draw)
        pending = pending[~done]
    if pending.numel():
        _resolve_exactly(y_flat, pending, r, pool, pool_position, out_flat, generator, chunk_elements)
    return out.view(b, n, r)


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
