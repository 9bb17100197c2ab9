"""Set-prediction loss: matching-based terms, empty targets, resolutions, deep supervision, errors."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from cast.losses.set_prediction import SetPredictionLoss
from cast.models.config import CastStudentConfig
from cast.models.decoder import mask2former_config

NUM_CLASSES, QUERIES = 3, 6


@pytest.fixture
def loss_fn() -> SetPredictionLoss:
    # Uniform points only: importance sampling would concentrate them on (soft) mask edges.
    return SetPredictionLoss(mask2former_config(CastStudentConfig(
        num_classes=NUM_CLASSES, num_queries=QUERIES, train_num_points=2048, importance_sample_ratio=0.0)))


def make_targets(size: int = 32) -> list[dict[str, torch.Tensor]]:
    first = torch.zeros(2, size, size)
    first[0, : size // 2, : size // 2] = 1
    first[1, size // 2:, size // 4:] = 1
    second = torch.zeros(1, size, size)
    second[0, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    return [{"masks": first, "labels": torch.tensor([0, 2])}, {"masks": second, "labels": torch.tensor([1])}]


def perfect_logits(targets: list[dict[str, torch.Tensor]], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries 0..K-1 predict the targets confidently, the rest predict no object."""
    class_logits = torch.full((len(targets), QUERIES, NUM_CLASSES + 1), -10.0)
    class_logits[..., NUM_CLASSES] = 10.0
    mask_logits = torch.full((len(targets), QUERIES, size, size), -20.0)
    for b, target in enumerate(targets):
        masks = F.interpolate(target["masks"][None], size=(size, size), mode="nearest")[0]
        for k, label in enumerate(target["labels"]):
            class_logits[b, k] = -10.0
            class_logits[b, k, label] = 10.0
            mask_logits[b, k] = masks[k] * 40.0 - 20.0
    return class_logits, mask_logits


def assert_near_perfect(terms: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    # Bilinear point sampling softens mask edges, so mask terms are small, not zero.
    assert float(terms["loss_ce"]) < 1e-3
    assert float(terms["loss_mask"]) < 0.2 * float(reference["loss_mask"])
    assert float(terms["loss_dice"]) < 0.2 * float(reference["loss_dice"])


def test_perfect_predictions_cost_little(loss_fn):
    targets = make_targets()
    class_logits, mask_logits = perfect_logits(targets, 32)
    loss, terms = loss_fn(class_logits, mask_logits, targets)
    assert set(terms) == {"loss_ce", "loss_mask", "loss_dice"}
    _, random_terms = loss_fn(torch.randn_like(class_logits), torch.randn_like(mask_logits), targets)
    assert_near_perfect(terms, random_terms)
    # Matching: the same predictions in another query order cost the same.
    order = torch.tensor([5, 3, 0, 1, 4, 2])
    _, permuted = loss_fn(class_logits[:, order], mask_logits[:, order], targets)
    assert_near_perfect(permuted, random_terms)


def test_targets_at_another_resolution(loss_fn):
    targets = make_targets(size=64)  # the logits are 16x16
    class_logits, mask_logits = perfect_logits(targets, 16)
    # Bilinear point sampling blurs the 16x16 logits' edges a little; far below a wrong mask.
    _, terms = loss_fn(class_logits, mask_logits, targets)
    shifted = torch.roll(mask_logits, shifts=4, dims=-1)
    _, shifted_terms = loss_fn(class_logits, shifted, targets)
    assert float(terms["loss_dice"]) < 0.25 * float(shifted_terms["loss_dice"])
    # Differently sized targets within one batch are resized, not padded (padding would misplace them).
    mixed = [targets[0], {"masks": F.interpolate(targets[1]["masks"][None], size=(32, 32))[0],
                          "labels": targets[1]["labels"]}]
    _, mixed_terms = loss_fn(class_logits, mask_logits, mixed)
    assert float(mixed_terms["loss_dice"]) < 0.25 * float(shifted_terms["loss_dice"])


def test_empty_targets(loss_fn):
    empty = [{"masks": torch.zeros(0, 32, 32), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    class_logits = torch.randn(2, QUERIES, NUM_CLASSES + 1, requires_grad=True)
    mask_logits = torch.randn(2, QUERIES, 8, 8, requires_grad=True)
    loss, terms = loss_fn(class_logits, mask_logits, empty)
    assert float(terms["loss_mask"].detach()) == 0.0 and float(terms["loss_dice"].detach()) == 0.0
    # Every query must say "no object": class weight x mean CE towards the last class.
    expected = 2.0 * -class_logits.log_softmax(-1)[..., NUM_CLASSES].mean()
    torch.testing.assert_close(terms["loss_ce"], expected)
    loss.backward()
    assert float(class_logits.grad[..., NUM_CLASSES].sum()) < 0  # pushes no-object up
    # One empty image next to a labelled one.
    mixed = [make_targets()[0], empty[0]]
    loss, terms = loss_fn(class_logits, mask_logits, mixed)
    assert torch.isfinite(loss) and float(terms["loss_mask"].detach()) > 0


def test_deep_supervision_sums_every_layer(loss_fn):
    targets = make_targets()
    class_logits, mask_logits = perfect_logits(targets, 32)
    class_logits = class_logits + 0.5 * torch.randn_like(class_logits)
    _, single = loss_fn(class_logits, mask_logits, targets)
    aux = [{"class_logits": class_logits, "mask_logits": mask_logits}] * 2
    loss, triple = loss_fn(class_logits, mask_logits, targets, aux_outputs=aux)
    torch.testing.assert_close(triple["loss_ce"], 3 * single["loss_ce"])
    torch.testing.assert_close(loss, sum(triple.values()))


def test_weights_come_from_the_config():
    config = mask2former_config(CastStudentConfig(num_classes=NUM_CLASSES, num_queries=QUERIES, class_weight=0.0,
                                                  dice_weight=1.0, train_num_points=512))
    targets = make_targets()
    _, terms = SetPredictionLoss(config)(torch.randn(2, QUERIES, 4), torch.randn(2, QUERIES, 8, 8), targets)
    assert float(terms["loss_ce"]) == 0.0 and float(terms["loss_dice"]) > 0


def test_bad_targets_are_rejected(loss_fn):
    class_logits, mask_logits = torch.randn(2, QUERIES, 4), torch.randn(2, QUERIES, 8, 8)
    targets = make_targets()
    with pytest.raises(ValueError, match="1 targets for a batch of 2"):
        loss_fn(class_logits, mask_logits, targets[:1])
    with pytest.raises(ValueError, match="outside"):
        loss_fn(class_logits, mask_logits, [targets[0], {**targets[1], "labels": torch.tensor([3])}])
    with pytest.raises(ValueError, match=r"expected \(K, H, W\)"):
        loss_fn(class_logits, mask_logits, [targets[0], {**targets[1], "labels": torch.tensor([0, 1])}])
    with pytest.raises(ValueError, match="needs 'masks' and 'labels'"):
        loss_fn(class_logits, mask_logits, [targets[0], {"labels": torch.tensor([0])}])


def test_loss_inside_a_process_group(loss_fn, tmp_path):
    # With torch.distributed up, the mask count goes through all_reduce (identity for one process).
    targets = make_targets()
    class_logits, mask_logits = torch.randn(2, QUERIES, 4), torch.randn(2, QUERIES, 8, 8)
    torch.manual_seed(1)
    _, alone = loss_fn(class_logits, mask_logits, targets)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(1)
        _, grouped = loss_fn(class_logits, mask_logits, targets)
    finally:
        dist.destroy_process_group()
    for name in alone:
        torch.testing.assert_close(grouped[name], alone[name])
