"""The instance-aware pixel-wise contrastive loss: probabilities, sampler law, loss, diagnostics."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch.utils._python_dispatch import TorchDispatchMode

from cast.losses.contrastive import (ContrastiveOutput, PixelContrastiveLoss, loss_grid, mean_distances,
                                     pixel_contrastive_loss)
from cast.losses.sampling import (false_negative_rate, pair_dots, pair_dots_grad, pixel_probabilities,
                                  sample_negatives)

P_THRESHOLD = 1e-3  # a correct sampler fails a test at this level once in a thousand seeds


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("strategy", ["fusion", "mask", "class"])
def test_pixel_probabilities_matches_loop(strategy):
    b, k, c1, h, w = 2, 3, 4, 2, 3
    mask_logits, class_logits = torch.randn(b, k, h, w), torch.randn(b, k, c1)
    y = pixel_probabilities(mask_logits, class_logits, strategy)
    assert y.shape == (b, h * w, {"fusion": k + c1, "mask": k, "class": c1}[strategy])
    for bi in range(b):
        for p in range(h * w):
            logits = [float(mask_logits[bi, q].reshape(-1)[p]) for q in range(k)]
            p_mask = [math.exp(v) / sum(math.exp(u) for u in logits) for v in logits]
            f_class = [0.0] * c1
            for q in range(k):
                p_class = torch.softmax(class_logits[bi, q], 0)
                for c in range(c1):
                    f_class[c] += p_mask[q] * float(p_class[c])
            row = {"fusion": p_mask + f_class, "mask": p_mask, "class": f_class}[strategy]
            norm = math.sqrt(sum(v * v for v in row))
            assert torch.allclose(y[bi, p], torch.tensor([v / norm for v in row]), atol=1e-6)
    assert torch.allclose(y.norm(dim=-1), torch.ones(b, h * w), atol=1e-6)


def test_pixel_probabilities_detaches_and_checks():
    mask_logits = torch.randn(1, 2, 2, 2, requires_grad=True)
    assert not pixel_probabilities(mask_logits, torch.randn(1, 2, 3)).requires_grad
    with pytest.raises(ValueError, match="strategy"):
        pixel_probabilities(mask_logits, torch.randn(1, 2, 3), "uniform")
    with pytest.raises(ValueError, match="same"):
        pixel_probabilities(mask_logits, torch.randn(1, 3, 3))


def _dense_reference_loss(z_weak, z_strong, neg_index, temperature, valid=None):
    """The loss with full (BN x BN) similarity matrices and explicit loops over anchors."""
    b, n, d = z_weak.shape
    zw = F.normalize(z_weak, dim=-1).reshape(b * n, d)
    zs = F.normalize(z_strong.detach(), dim=-1).reshape(b * n, d)
    sim = zw @ zw.T
    keep = valid.reshape(-1) if valid is not None else torch.ones(b * n, dtype=torch.bool)
    terms = []
    for i in range(b * n):
        if not keep[i]:
            continue
        pos = (zw[i] * zs[i]).sum() / temperature
        neg = sim[i, neg_index.reshape(b * n, -1)[i]] / temperature
        terms.append(-(pos - torch.log(torch.exp(pos) + torch.exp(neg).sum())))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("with_valid", [False, True])
def test_loss_matches_dense_reference_and_gradient_reaches_weak_only(with_valid):
    b, n, d, r, t = 2, 6, 4, 5, 0.2
    z_weak = torch.randn(b, n, d, requires_grad=True)
    z_strong = torch.randn(b, n, d, requires_grad=True)
    neg_index = torch.randint(0, b * n, (b, n, r))
    valid = torch.rand(b, n) > 0.3 if with_valid else None
    loss = pixel_contrastive_loss(z_weak, z_strong, neg_index, t, valid=valid)
    loss.backward()
    grad_ours = z_weak.grad.clone()
    assert z_strong.grad is None  # stop-gradient target
    assert grad_ours.abs().sum() > 0

    z_weak.grad = None
    reference = _dense_reference_loss(z_weak, z_strong, neg_index, t, valid)
    reference.backward()
    assert torch.allclose(loss, reference, atol=1e-5)
    assert torch.allclose(grad_ours, z_weak.grad, atol=1e-5)


def test_loss_is_stable_at_low_temperature():
    z = torch.randn(1, 8, 4)
    loss = pixel_contrastive_loss(z, -z, torch.randint(0, 8, (1, 8, 3)), temperature=1e-3)
    assert torch.isfinite(loss)


def test_pair_dots_cpu_sparse_and_chunked_paths_agree():
    x = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    rows = torch.sort(torch.randint(0, 9, (40,))).values  # repeated pairs included
    cols = torch.randint(0, 9, (40,))
    crow = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(torch.bincount(rows, minlength=9), 0)])
    grad = torch.randn(40, dtype=torch.float64)
    expected = (x[rows] * x[cols]).sum(-1)
    (expected_grad,) = torch.autograd.grad((expected * grad).sum(), x)
    for sparse in (True, False):
        assert torch.allclose(pair_dots(x.detach(), crow, cols, chunk_elements=7, sparse=sparse), expected)
        got = pair_dots_grad(x.detach(), crow, cols, grad, chunk_elements=7, sparse=sparse)
        assert torch.allclose(got, expected_grad)
    many = torch.randint(0, 9, (120,))  # more entries than the 9 x 9 matrix: the gather path
    crow_many = torch.arange(0, 121, 120 // 9 + 1).clamp(max=120)
    crow_many = torch.cat([crow_many, torch.full((10 - crow_many.numel(),), 120)])
    rows_many = torch.searchsorted(crow_many, torch.arange(120), right=True) - 1
    assert torch.allclose(pair_dots(x.detach(), crow_many, many, chunk_elements=7),
                          (x[rows_many] * x[many]).sum(-1).detach())


def _debiased_weights(y: torch.Tensor) -> torch.Tensor:
    """Dense (BN x BN) s_deb with a zero diagonal (small inputs only)."""
    y = F.normalize(y.reshape(-1, y.shape[-1]).double(), dim=-1)
    w = (1.0 - y @ y.T).clamp(min=0)
    w.fill_diagonal_(0)
    return w


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor, draws: int) -> float:
    """One chi-square test pooled over all anchors (rows), on the categories of positive probability."""
    statistic, dof = 0.0, 0
    for row_counts, row_probs in zip(counts, probs):
        support = row_probs > 0
        expected = row_probs[support] * draws
        statistic += float(((row_counts[support] - expected) ** 2 / expected).sum())
        dof += int(support.sum()) - 1
    return float(stats.chi2.sf(statistic, dof))


def _counts(index: torch.Tensor, size: int) -> torch.Tensor:
    flat = index.reshape(-1, index.shape[-1])
    return torch.stack([torch.bincount(row, minlength=size) for row in flat]).double()


@pytest.mark.parametrize("method,signed", [("rejection", False), ("exact", False), ("auto", False),
                                           ("rejection", True)])
def test_sampler_follows_debiased_weights(method, signed):
    n, draws = 20, 10_000  # 200k draws in all
    y = torch.randn(1, n, 5) if signed else torch.rand(1, n, 5)
    y[0, 1] = y[0, 0] * 3.0  # same direction as pixel 0: weight 0 between them
    index = sample_negatives(y, draws, _generator(1), method=method, max_rounds=2)
    weights = _debiased_weights(y)
    probs = weights / weights.sum(1, keepdim=True)
    counts = _counts(index, n)
    assert counts.diagonal().sum() == 0  # self never drawn
    assert counts[0, 1] == 0 and counts[1, 0] == 0
    assert counts[probs == 0].sum() == 0
    assert _chi_square_p(counts, probs, draws) > P_THRESHOLD


def test_auto_sampler_turns_exact_when_rejection_would_cost_more(monkeypatch):
    """Nearly identical predictions (early training) accept a few proposals in 1 000: "auto" stops
    rejection after the round that measured this, rejection alone runs every round, and a pool
    no larger than R is drawn exactly at once; every path draws from the same law."""
    import cast.losses.sampling as sampling

    rounds = {"n": 0}
    step = sampling._rejection_step

    def counted(*args, **kwargs):
        rounds["n"] += 1
        return step(*args, **kwargs)

    monkeypatch.setattr(sampling, "_rejection_step", counted)
    n, r, calls = 100, 50, 60  # pool larger than R: exact at once would cost more than a round
    y = torch.zeros(1, n, 6)
    y[..., 0] = 1.0
    y[0, torch.arange(n), 1 + torch.arange(n) % 5] = 0.05  # five groups, s_deb ~ 0.0025 across them
    y[..., 1:] += 0.01 * torch.rand(1, n, 5, generator=_generator(7))
    weights = _debiased_weights(y)
    probs = weights / weights.sum(1, keepdim=True)
    for method, expected_rounds in (("auto", calls), ("rejection", 32 * calls)):
        rounds["n"] = 0
        gen = _generator(8)
        counts = sum(_counts(sample_negatives(y, r, gen, method=method, max_rounds=32), n) for _ in range(calls))
        assert rounds["n"] == expected_rounds
        assert counts.diagonal().sum() == 0
        assert _chi_square_p(counts, probs, r * calls) > P_THRESHOLD
    rounds["n"] = 0
    sample_negatives(y[:, :40], 64, _generator(9))  # 40 pixels, R = 64
    assert rounds["n"] == 0


def test_sampler_is_reproducible_with_a_generator():
    y = torch.rand(2, 30, 4)
    first = sample_negatives(y, 7, _generator(3))
    assert torch.equal(first, sample_negatives(y, 7, _generator(3)))
    assert not torch.equal(first, sample_negatives(y, 7, _generator(4)))


def test_uniform_sampler_draws_the_other_pixels_uniformly():
    b, n, draws = 2, 10, 20_000
    index = sample_negatives(None, draws, _generator(2), size=(b, n))
    assert index.shape == (b, n, draws) and index.dtype == torch.int64
    counts = _counts(index, b * n)
    probs = 1.0 - torch.eye(b * n, dtype=torch.float64)
    probs /= probs.sum(1, keepdim=True)
    assert counts.diagonal().sum() == 0
    assert _chi_square_p(counts, probs, draws) > P_THRESHOLD


@pytest.mark.parametrize("method", ["auto", "rejection", "exact"])
def test_anchors_with_all_zero_weights_fall_back_to_uniform(method):
    n, draws = 8, 8_000
    # All pixels point the same way (different norms): every weight is 0 up to float32 rounding,
    # which must not decide the draws.
    y = (0.1 + torch.rand(1, n, 1)) * torch.tensor([0.3, 0.5, 0.7])
    counts = _counts(sample_negatives(y, draws, _generator(5), method=method, max_rounds=3), n)
    probs = (1.0 - torch.eye(n, dtype=torch.float64)) / (n - 1)
    assert counts.diagonal().sum() == 0
    assert _chi_square_p(counts, probs, draws) > P_THRESHOLD


@pytest.mark.parametrize("with_y", [False, True])
def test_padding_pixels_are_never_drawn(with_y):
    b, n, r = 2, 12, 300
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[0, 8:] = False
    valid[1, 10:] = False
    y = torch.rand(b, n, 4) if with_y else None
    index = sample_negatives(y, r, _generator(6), valid=valid, size=(b, n))
    assert index.shape == (b, n, r) and index.dtype == torch.int64
    assert valid.reshape(-1)[index].all()  # padding anchors' rows hold valid pixels too
    with pytest.raises(ValueError, match="at least 2 valid"):
        sample_negatives(y, r, valid=torch.eye(1, n, dtype=torch.bool).expand(b, n) & (torch.arange(b) == 0)[:, None])


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="y must be"):
        sample_negatives(torch.rand(4, 3), 2)
    with pytest.raises(ValueError, match="method"):
        sample_negatives(torch.rand(1, 4, 3), 2, method="gumbel")
    with pytest.raises(ValueError, match="needs y, valid or size"):
        sample_negatives(None, 2)
    with pytest.raises(ValueError, match="valid must be"):
        sample_negatives(torch.rand(1, 4, 3), 2, valid=torch.ones(1, 5, dtype=torch.bool))


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                # A sparse tensor holds its specified entries only (numel would count the dense size).
                size = t.numel() if t.layout == torch.strided else t._nnz()
                self.largest = max(self.largest, size)
        return out


@pytest.mark.parametrize("method", ["auto", "rejection", "exact"])
def test_sampler_and_loss_never_allocate_a_pixel_by_pixel_matrix(method):
    b, n, r, e, d, chunk = 2, 1024, 32, 8, 8, 1 << 16
    pixels = b * n
    y = torch.rand(b, n, e)
    z_weak, z_strong = torch.randn(b, n, d, requires_grad=True), torch.randn(b, n, d)
    with _LargestTensor() as probe:
        index = sample_negatives(y, r, _generator(), method=method, chunk_elements=chunk)
        pixel_contrastive_loss(z_weak, z_strong, index, 0.1).backward()
    assert index.shape == (b, n, r)
    # The dense sampler would need pixels * pixels (4.2M); ours stays at O(pixels * R): the largest
    # tensors are the loss' (pixels, 1 + R) logits and the exact path's chunks.
    assert probe.largest <= max(pixels * (r + 1), chunk) < pixels * pixels // 32


def test_false_negative_rate_by_hand_and_ids_unique_per_image():
    ids = torch.tensor([[0, 0, 1, -1], [0, 0, 1, -1]])  # id 0 in image 0 is not id 0 in image 1
    neg_index = torch.tensor([[[1, 4], [2, 3], [6, 0], [0, 1]],
                              [[5, 0], [4, 4], [2, 3], [4, 5]]])
    # Counted anchors: pixels 0, 1, 2 of each image (6 anchors, 12 draws). Same instance: (0->1),
    # (5->4 for anchor 4: draws 5 and 0 -> 1), (anchor 5: draws 4, 4 -> 2).
    assert false_negative_rate(neg_index, ids) == pytest.approx(4 / 12)
    valid = torch.tensor([[True, False, True, True], [True, True, True, True]])
    assert false_negative_rate(neg_index, ids, valid) == pytest.approx(4 / 10)
    assert false_negative_rate(neg_index, torch.full_like(ids, -1)) == 0.0


def _instance_scene(b: int = 2, size: int = 8, queries: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Instance ids (B, size, size), three rectangles and background (-1), and mask logits that
    are the ground truth (one query per instance, the last query for the background)."""
    ids = torch.full((b, size, size), -1, dtype=torch.long)
    ids[:, :4, :4] = 0
    ids[:, 4:, :3] = 1
    ids[1, 5:, 5:] = 2
    ids[0, :3, 5:] = 2
    query = torch.where(ids >= 0, ids, torch.full_like(ids, queries - 1))
    mask_logits = 10.0 * F.one_hot(query, queries).permute(0, 3, 1, 2).float()
    return ids, mask_logits


@pytest.mark.parametrize("strategy", ["fusion", "mask"])
def test_false_negative_rate_is_zero_with_ground_truth_predictions(strategy):
    ids, mask_logits = _instance_scene()
    y = pixel_probabilities(mask_logits, torch.randn(2, 4, 3), strategy)
    index = sample_negatives(y, 200, _generator(7))
    assert false_negative_rate(index, ids.flatten(1)) < 1e-3


def test_false_negative_rate_of_uniform_is_the_instance_share():
    ids, _ = _instance_scene()
    index = sample_negatives(None, 400, _generator(8), size=ids.flatten(1).shape)
    flat = (ids + 10 * torch.arange(2)[:, None, None]).reshape(-1)[ids.reshape(-1) >= 0]
    sizes = torch.bincount(flat)[flat].double()
    expected = float(((sizes - 1) / (ids.numel() - 1)).mean())
    assert false_negative_rate(index, ids.flatten(1)) == pytest.approx(expected, abs=0.01)


def empirical_margin(z_weak, z_strong, index) -> float:
    positive, negative = mean_distances(z_weak, z_strong, index)
    return negative - positive


def test_empirical_margin_sign():
    z = torch.randn(2, 50, 16)
    index = sample_negatives(None, 20, _generator(9), size=(2, 50))
    near = z + 0.01 * torch.randn_like(z)
    assert empirical_margin(z, near, index) > 0.5  # positives ~0 apart, random negatives ~1
    assert empirical_margin(z, -z, index) < -0.5  # positives at distance 2
    zn = F.normalize(z, dim=-1).reshape(100, 16)
    by_hand = float((1 - (zn[:, None] * zn[index.reshape(100, -1)]).sum(-1)).mean() - (1 - (zn * zn).sum(-1)).mean())
    assert empirical_margin(z, z, index) == pytest.approx(by_hand, abs=1e-5)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_temperature_schedule(schedule):
    loss = PixelContrastiveLoss(temperature_start=0.3, temperature_end=0.07, schedule=schedule)
    assert loss.temperature(0.0) == pytest.approx(0.3)
    assert loss.temperature(1.0) == pytest.approx(0.07)
    assert loss.temperature(0.5) == pytest.approx(0.185)
    values = [loss.temperature(p / 10) for p in range(11)]
    assert all(a > b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="progress"):
        loss.temperature(1.5)


def test_cosine_schedule_stays_warmer_early():
    cosine, linear = PixelContrastiveLoss(schedule="cosine"), PixelContrastiveLoss(schedule="linear")
    assert cosine.temperature(0.25) > linear.temperature(0.25)
    assert cosine.temperature(0.75) < linear.temperature(0.75)


def test_module_rejects_bad_configuration():
    with pytest.raises(ValueError, match="strategy"):
        PixelContrastiveLoss(strategy="random")
    with pytest.raises(ValueError, match="schedule"):
        PixelContrastiveLoss(schedule="step")
    with pytest.raises(ValueError, match="temperature_end"):
        PixelContrastiveLoss(temperature_start=0.05, temperature_end=0.07)
    with pytest.raises(ValueError, match="not both"):
        PixelContrastiveLoss(feature_size=(4, 4), max_pixels=16)


def _module_inputs(b: int = 2, d: int = 8, grid: int = 8):
    ids, mask_logits = _instance_scene(b, size=32)  # at input resolution (4x the grid)
    emb_weak = torch.randn(b, d, grid, grid, requires_grad=True)
    emb_strong = (emb_weak.detach() + 0.1 * torch.randn(b, d, grid, grid)).requires_grad_()
    return emb_weak, emb_strong, mask_logits, torch.randn(b, 4, 3), ids


@pytest.mark.parametrize("strategy", ["fusion", "mask", "class", "uniform"])
def test_module_forward(strategy):
    emb_weak, emb_strong, mask_logits, class_logits, ids = _module_inputs()
    module = PixelContrastiveLoss(strategy=strategy, num_negatives=32)
    out = module(emb_weak, emb_strong, mask_logits, class_logits, progress=1.0, instance_ids=ids,
                 generator=_generator(10))
    assert isinstance(out, ContrastiveOutput)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.temperature == pytest.approx(0.07)
    assert out.margin == pytest.approx(out.neg_distance - out.pos_distance)
    assert out.margin > 0  # strong view is the weak one plus a little noise
    if strategy in ("fusion", "mask"):
        assert out.false_negative_rate < 0.05
    out.loss.backward()
    assert emb_weak.grad.abs().sum() > 0 and emb_strong.grad is None
    again = module(emb_weak, emb_strong, mask_logits, class_logits, progress=1.0, generator=_generator(10))
    assert torch.equal(again.loss, out.loss) and again.false_negative_rate is None


def test_module_excludes_padding_and_resizes():
    emb_weak, emb_strong, mask_logits, class_logits, ids = _module_inputs()
    pixel_mask = torch.ones(2, 32, 32, dtype=torch.bool)
    pixel_mask[:, :, 16:] = False  # right half of every image is padding
    module = PixelContrastiveLoss(num_negatives=16, feature_size=(4, 4))
    out = module(emb_weak, emb_strong, mask_logits, class_logits, pixel_mask=pixel_mask,
                 generator=_generator(11))
    out.loss.backward()
    # Padding cells (grid columns 2, 3) are neither anchors nor negatives: the embedding columns
    # that only feed them (6, 7 under the 2x antialiased resize) get no gradient.
    assert emb_weak.grad[:, :, :, :2].abs().sum() > 0
    assert emb_weak.grad[:, :, :, 6:].abs().sum() == 0


def test_max_pixels_keeps_the_aspect_ratio():
    assert loss_grid(8, 8, None, 20) == (4, 4)
    assert loss_grid(6, 12, None, 18) == (3, 6)
    assert loss_grid(6, 12, None, 100) == (6, 12)
    assert loss_grid(6, 12, (2, 5), None) == (2, 5)
    emb_weak, emb_strong, mask_logits, class_logits, _ = _module_inputs()
    capped = PixelContrastiveLoss(num_negatives=4, max_pixels=20)(
        emb_weak, emb_strong, mask_logits, class_logits, generator=_generator(12))
    assert torch.isfinite(capped.loss)
