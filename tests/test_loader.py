"""Batching: the batch dict of cast.structures, padding, unlabeled samples, deterministic loaders."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cast.data.batches import EvalTransform, InstanceTorchDataset, WeakStrongViews, collate_instances
from cast.structures import BATCH_KEYS, InstanceSample


def _sample(image_id: int, h: int, w: int, k: int) -> InstanceSample:
    rng = np.random.default_rng(image_id)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    masks = np.zeros((k, h, w), bool)
    for i in range(k):  # disjoint horizontal bands
        masks[i, i * h // (k + 1):(i + 1) * h // (k + 1)] = True
    return InstanceSample(image=image, masks=masks, labels=np.arange(k) % 3, image_id=image_id)


@pytest.fixture(scope="module")
def samples() -> list[InstanceSample]:
    # Mixed sizes, and two samples without instances (unlabeled data).
    shapes = [(40, 50, 2), (33, 70, 1), (48, 48, 0), (20, 30, 3), (36, 36, 2), (50, 40, 0), (30, 60, 1)]
    return [_sample(100 + i, h, w, k) for i, (h, w, k) in enumerate(shapes)]


def _same(a: dict, b: dict) -> bool:
    tensors = ("pixel_values", "pixel_values_strong", "pixel_mask", "instance_ids")
    return (all(torch.equal(a[k], b[k]) for k in tensors if k in a or k in b)
            and a["image_ids"] == b["image_ids"] and a["image_sizes"] == b["image_sizes"]
            and all(torch.equal(x["masks"], y["masks"]) and torch.equal(x["labels"], y["labels"])
                    for x, y in zip(a["targets"], b["targets"])))


def test_collate_pads_to_a_multiple_and_marks_real_pixels(samples):
    transform = EvalTransform()
    items = [transform(s) for s in samples[:3]]
    batch = collate_instances(items, size_divisibility=32)
    assert set(batch) == set(BATCH_KEYS) - {"pixel_values_strong"}
    assert batch["pixel_values"].shape == (3, 3, 64, 96)
    assert batch["pixel_mask"].shape == batch["instance_ids"].shape == (3, 64, 96)
    assert batch["image_sizes"] == [(40, 50), (33, 70), (48, 48)] == batch["orig_sizes"]
    assert batch["image_ids"] == [100, 101, 102]
    for b, (h, w) in enumerate(batch["image_sizes"]):
        assert batch["pixel_mask"][b].sum() == h * w and batch["pixel_mask"][b, :h, :w].all()
        assert torch.equal(batch["pixel_values"][b, :, :h, :w], items[b]["weak"])
        padding = ~batch["pixel_mask"][b]
        assert batch["pixel_values"][b][:, padding].abs().sum() == 0
        assert (batch["instance_ids"][b, h:] == -1).all() and (batch["instance_ids"][b, :, w:] == -1).all()
        target = batch["targets"][b]
        assert target["masks"].shape == (len(samples[b].labels), 64, 96) and target["masks"].dtype == torch.float32
        assert torch.equal(target["masks"][:, :h, :w].bool(), torch.from_numpy(samples[b].masks))
        assert target["masks"][:, h:].sum() == 0
        assert torch.equal(target["labels"], torch.from_numpy(samples[b].labels))
    assert batch["targets"][2]["masks"].shape == (0, 64, 96)  # the unlabeled sample batches fine
    assert collate_instances(items, size_divisibility=1)["pixel_values"].shape == (3, 3, 48, 70)


def test_collate_strong_views_and_errors(samples):
    views = WeakStrongViews(crop_size=(40, 40))
    items = [views(s, seed=0, epoch=0, index=i) for i, s in enumerate(samples[:2])]
    batch = collate_instances(items)
    assert set(batch) == set(BATCH_KEYS)
    assert batch["pixel_values_strong"].shape == batch["pixel_values"].shape == (2, 3, 64, 64)
    assert torch.equal(batch["pixel_mask"][:, :40, :40], torch.stack([i["valid"] for i in items]))
    with pytest.raises(ValueError, match="strong view"):
        collate_instances([items[0], EvalTransform()(samples[2])])
    with pytest.raises(ValueError, match="empty batch"):
        collate_instances([])


def test_dataset_epoch_and_pairs(samples):
    dataset = InstanceTorchDataset(samples, WeakStrongViews(crop_size=(32, 32)), seed=3)
    assert len(dataset) == len(samples)
    assert torch.equal(dataset[4]["strong"], dataset[(0, 4)]["strong"])  # an index alone is epoch 0
    assert torch.equal(dataset[(2, 4)]["strong"], dataset[(2, 4)]["strong"])
    assert not torch.equal(dataset[(2, 4)]["strong"], dataset[(1, 4)]["strong"])


def test_workers_give_the_same_batches(samples):
    """The training stream (cast.training.data) with loader workers yields what one process does."""
    from cast.training.data import batch_stream

    dataset = InstanceTorchDataset(samples, WeakStrongViews(crop_size=(32, 40)), seed=7)
    serial = batch_stream(dataset, 4, seed=7, collate_fn=collate_instances)
    parallel = batch_stream(dataset, 4, seed=7, collate_fn=collate_instances, num_workers=2)
    for _ in range(4):  # past the end of the first epoch (7 samples)
        assert _same(next(serial), next(parallel))
