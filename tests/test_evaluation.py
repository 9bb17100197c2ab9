"""COCO mask AP through pycocotools: perfect predictions, agreement with pycocotools called
directly, empty and bad inputs, RLE conversion."""
import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cast.evaluation.coco import evaluate_instances, instances_to_results, load_results, save_results
from cast.structures import Instances

CATEGORY_IDS = [3, 7, 11]  # non-contiguous on purpose


def _scene(rng, h=48, w=64, k=4):
    masks = np.zeros((k, h, w), bool)
    for i in range(k):
        y, x = rng.integers(0, h - 12), rng.integers(0, w - 12)
        masks[i, y:y + rng.integers(6, 12), x:x + rng.integers(6, 12)] = True
    return masks, rng.integers(0, len(CATEGORY_IDS), size=k)


@pytest.fixture()
def gt_and_truth():
    rng = np.random.default_rng(0)
    images, annotations, truth = [], [], {}
    for image_id in (1, 2, 5):
        masks, labels = _scene(rng)
        truth[image_id] = (masks, labels)
        images.append({"id": image_id, "height": 48, "width": 64, "file_name": f"{image_id}.png"})
        for m, label in zip(masks, labels):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0,
                                "category_id": CATEGORY_IDS[label], "area": float(m.sum()),
                                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    gt = {"images": images, "annotations": annotations,
          "categories": [{"id": c, "name": f"class{c}"} for c in CATEGORY_IDS]}
    return gt, truth


def _results(truth, perturb=None):
    out = []
    for image_id, (masks, labels) in truth.items():
        scores = np.linspace(0.9, 0.5, len(labels))
        if perturb is not None:
            masks, labels, scores = perturb(masks, labels, scores)
        out += instances_to_results(Instances(torch.from_numpy(masks), torch.from_numpy(labels),
                                           torch.from_numpy(scores)), image_id, CATEGORY_IDS)
    return out


def test_perfect_predictions_give_ap_100(gt_and_truth):
    gt, truth = gt_and_truth
    metrics = evaluate_instances(gt, _results(truth))
    assert metrics["AP"] == pytest.approx(100.0) and metrics["AP50"] == pytest.approx(100.0)
    assert set(metrics["per_class"]) <= {f"class{c}" for c in CATEGORY_IDS}
    assert all(v == pytest.approx(100.0) for v in metrics["per_class"].values() if v == v)


def test_shuffled_predictions_match_pycocotools(gt_and_truth):
    gt, truth = gt_and_truth
    rng = np.random.default_rng(1)

    def perturb(masks, labels, scores):
        masks = np.roll(masks, shift=int(rng.integers(1, 4)), axis=2)  # partial overlap
        labels = rng.permutation(labels)
        return masks, labels, rng.random(len(labels))

    results = _results(truth, perturb)
    ours = evaluate_instances(gt, results)
    coco = COCO()
    coco.dataset = gt
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes([dict(r) for r in results]), iouType="segm")
        ev.evaluate(); ev.accumulate(); ev.summarize()
    for name, value in zip(["AP", "AP50", "AP75"], ev.stats[:3]):
        assert ours[name] == pytest.approx(100 * value)
    assert 0 < ours["AP50"] < 100


def test_empty_results_give_zero(gt_and_truth):
    gt, _ = gt_and_truth
    metrics = evaluate_instances(gt, [])
    assert metrics["AP"] == 0.0 and metrics["per_class"]["class3"] == 0.0


def test_results_for_unknown_image_are_refused(gt_and_truth):
    gt, truth = gt_and_truth
    results = _results(truth)
    results[0] = dict(results[0], image_id=999)
    with pytest.raises(ValueError, match="999"):
        evaluate_instances(gt, results)


def test_rle_round_trip_and_json_files(gt_and_truth, tmp_path):
    gt, truth = gt_and_truth
    results = _results(truth)
    decoded = mask_utils.decode(results[0]["segmentation"]).astype(bool)
    assert np.array_equal(decoded, truth[1][0][0])
    save_results(results, tmp_path / "r.json")
    assert load_results(tmp_path / "r.json") == results
    import json
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    assert evaluate_instances(tmp_path / "gt.json", tmp_path / "r.json")["AP"] == pytest.approx(100.0)


def test_label_outside_classes_is_refused():
    bad = Instances(torch.ones(1, 4, 4, dtype=torch.bool), torch.tensor([5]), torch.tensor([0.9]))
    with pytest.raises(ValueError, match="label 5"):
        instances_to_results(bad, 1, CATEGORY_IDS)
