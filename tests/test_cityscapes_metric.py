"""The official Cityscapes instance metric on a fixture in the Cityscapes file layout."""
import numpy as np
import pytest
import torch
from PIL import Image

from cast.evaluation.cityscapes import evaluate_cityscapes, instances_from_label_map
from cast.structures import Instances


def _write_gt(root, stem, rng):
    ids = np.zeros((64, 128), np.int32)
    ids[:] = 7  # road (stuff)
    for k, label_id in enumerate((24, 26, 26)):  # a person and two cars, each > 100 px
        y, x = 5 + 18 * k, int(rng.integers(0, 80))
        ids[y:y + 15, x:x + 30] = label_id * 1000 + k
    path = root / "gtFine" / "val" / "aachen" / f"{stem}_gtFine_instanceIds.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids).save(path)
    return path, ids


@pytest.fixture()
def fixture(tmp_path):
    rng = np.random.default_rng(0)
    gts = [_write_gt(tmp_path / "cityscapes", f"aachen_000000_00000{i}", rng) for i in range(2)]
    return tmp_path, gts


def test_perfect_predictions_give_ap_100(fixture, monkeypatch):
    tmp_path, gts = fixture
    monkeypatch.chdir(tmp_path)
    preds = {p.name.split("_gtFine")[0]: instances_from_label_map(ids) for p, ids in gts}
    out = evaluate_cityscapes([p for p, _ in gts], preds, tmp_path / "work")
    assert out["AP"] == pytest.approx(100.0) and out["AP50"] == pytest.approx(100.0)
    assert out["per_class"]["person"] == pytest.approx(100.0)
    assert not (tmp_path / "matches.json").exists(), "nothing may be written outside work_dir"


def test_wrong_class_and_missing_instances_lower_ap(fixture):
    tmp_path, gts = fixture
    preds = {}
    for p, ids in gts:
        inst = instances_from_label_map(ids)
        # Drop one car and call the person a rider.
        keep = torch.tensor([True, True, False])
        labels = inst.labels.clone()
        labels[0] = 1
        preds[p.name.split("_gtFine")[0]] = Instances(inst.masks[keep], labels[keep], inst.scores[keep])
    out = evaluate_cityscapes([p for p, _ in gts], preds, tmp_path / "work")
    assert out["per_class"]["car"] == pytest.approx(50.0, abs=1.0)
    assert out["per_class"]["person"] == pytest.approx(0.0)
    assert 0 < out["AP"] < 100


def test_missing_prediction_is_named(fixture):
    tmp_path, gts = fixture
    with pytest.raises(ValueError, match="aachen_000000_000001"):
        evaluate_cityscapes([p for p, _ in gts], {"aachen_000000_000000": instances_from_label_map(gts[0][1])},
                            tmp_path / "work")
