"""Labeled / unlabeled splits: deterministic, disjoint, nested across fractions, saved and applied."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from cast.data.coco import read_coco
from cast.data.dataset import InstanceDataset, UnlabeledImages
from cast.data.splits import apply_split, load_split, make_split, save_split

IDS = list(range(100, 160, 2))  # 30 non-contiguous ids


def test_make_split_is_deterministic_disjoint_and_sized():
    split = make_split(IDS, 0.1, seed=3)
    assert split == make_split(list(reversed(IDS)), 0.1, seed=3) == make_split(sorted(IDS, key=str), 0.1, 3)
    labeled, unlabeled = split["labeled_image_ids"], split["unlabeled_image_ids"]
    assert len(labeled) == 3 and len(unlabeled) == 27
    assert not set(labeled) & set(unlabeled) and sorted(labeled + unlabeled) == IDS
    assert labeled == sorted(labeled) and unlabeled == sorted(unlabeled)
    assert split["labeled_fraction"] == 0.1 and split["seed"] == 3
    seeds = {tuple(make_split(IDS, 0.1, seed=s)["labeled_image_ids"]) for s in range(5)}
    assert len(seeds) > 1  # the seed matters


def test_smaller_fractions_label_subsets():
    small, large = make_split(IDS, 0.1, 0), make_split(IDS, 0.3, 0)
    assert set(small["labeled_image_ids"]) < set(large["labeled_image_ids"])


def test_at_least_one_labeled_and_full_fraction():
    assert len(make_split(IDS, 0.001, 0)["labeled_image_ids"]) == 1
    full = make_split(IDS, 1.0, 0)
    assert full["labeled_image_ids"] == IDS and full["unlabeled_image_ids"] == []


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, math.nan, True, "0.1"])
def test_bad_fraction(fraction):
    with pytest.raises(ValueError, match=f"labeled_fraction must be a number in \\(0, 1\\], got {fraction!r}"):
        make_split(IDS, fraction, 0)


def test_bad_ids_and_seed():
    with pytest.raises(ValueError, match="duplicates"):
        make_split([1, 2, 2], 0.5, 0)
    with pytest.raises(ValueError, match="empty"):
        make_split([], 0.5, 0)
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        make_split(IDS, 0.5, -1)


def test_save_and_load(tmp_path):
    split = make_split(IDS, 0.2, 7)
    save_split(split, tmp_path / "run" / "split.json")
    stored = json.loads((tmp_path / "run" / "split.json").read_text())
    assert set(stored) == {"labeled_fraction", "seed", "labeled_image_ids", "unlabeled_image_ids"}
    assert load_split(tmp_path / "run" / "split.json") == split
    assert not list((tmp_path / "run").glob("*.tmp"))
    with pytest.raises(ValueError, match=r"split\.json: not writing an invalid split"):
        save_split({**split, "unlabeled_image_ids": split["labeled_image_ids"]}, tmp_path / "split.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_split(tmp_path / "nope.json")


def _tiny_coco(tmp_path, n: int = 6) -> InstanceDataset:
    images, annotations = [], []
    for i in range(1, n + 1):
        Image.fromarray(np.full((8, 8, 3), i * 30, np.uint8)).save(tmp_path / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "height": 8, "width": 8})
        annotations.append({"id": i, "image_id": i, "category_id": 1, "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]]})
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "thing"}]}))
    return read_coco(path, progress=False)


def test_apply_split(tmp_path):
    dataset = _tiny_coco(tmp_path)
    split = make_split(dataset.image_ids, 0.5, 1)
    labeled, unlabeled = apply_split(dataset, split)
    assert isinstance(labeled, InstanceDataset) and isinstance(unlabeled, UnlabeledImages)
    assert labeled.image_ids == split["labeled_image_ids"] and unlabeled.image_ids == split["unlabeled_image_ids"]
    assert all(len(s.labels) == 1 for s in labeled)
    assert all(s.masks.shape[0] == 0 and len(s.labels) == 0 for s in unlabeled)
    with pytest.raises(ValueError, match=r"does not match the data set: 1 split ids are not in it \(e.g. \[99\]\)"):
        apply_split(dataset, make_split(dataset.image_ids + [99], 0.5, 1))
    with pytest.raises(ValueError, match=r"1 of its images are not in the split"):
        apply_split(dataset, make_split(dataset.image_ids[:-1], 0.5, 1))
