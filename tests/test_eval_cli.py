"""`python -m cast eval`: COCO mask AP of a predictions json (a results list or a COCO instances
json) against a COCO ground truth, as one json object on stdout equal to pycocotools' own
numbers; `--model` predicts and scores in one go; bad files are data errors naming the file."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cast.cli import main
from test_evaluation import _results, gt_and_truth  # noqa: F401 - the fixture
from test_predict import tiny_student, write_images

pytestmark = pytest.mark.usefixtures("one_thread")


def _shift(masks, labels, scores):
    return np.roll(masks, 2, axis=2)[:-1], labels[:-1], scores[:-1]


def _pycocotools(gt: dict, results: list) -> dict:
    coco = COCO()
    coco.dataset = json.loads(json.dumps(gt))
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(json.loads(json.dumps(results))), iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), (100 * v for v in ev.stats[:6])))


def _eval(capsys, *args) -> dict:
    assert main(["eval", *map(str, args)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1  # one json object, nothing else on stdout
    return json.loads(out[0])


def test_eval_equals_pycocotools_for_results_and_instances_json(gt_and_truth, tmp_path, capsys):  # noqa: F811
    gt, truth = gt_and_truth
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    results = _results(truth, _shift)
    (tmp_path / "results.json").write_text(json.dumps(results))
    expected = _pycocotools(gt, results)
    metrics = _eval(capsys, "--predictions", tmp_path / "results.json", "--data", tmp_path / "gt.json")
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value) if value >= 0 else metrics[key] is None
    assert 0 < metrics["AP"] < 100 and set(metrics["per_class"]) == {"class3", "class7", "class11"}
    # the same predictions as a COCO instances json (what predict writes)
    instances = {"images": gt["images"], "categories": gt["categories"],
                 "annotations": [{"id": i + 1, **r} for i, r in enumerate(results)]}
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    again = _eval(capsys, "--predictions", tmp_path / "instances.json", "--data", tmp_path / "gt.json")
    assert {k: again[k] for k in expected} == {k: metrics[k] for k in expected}


def test_eval_with_a_model_predicts_and_scores_in_one_go(tmp_path, capsys):
    tiny_student().save_pretrained(tmp_path / "student")
    paths = write_images(tmp_path / "images", 3)
    full = np.ones((48, 64), bool)
    from cast.evaluation.coco import encode_mask

    gt = {"images": [{"id": 7 + i, "file_name": p.relative_to(tmp_path).as_posix(),
                      "height": 48 + 8 * (i % 2), "width": 64} for i, p in enumerate(paths)],
          "categories": [{"id": 5, "name": "square"}, {"id": 3, "name": "disc"}],
          "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "iscrowd": 0, "area": 3072,
                           "bbox": [0, 0, 64, 48], "segmentation": encode_mask(full)}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    metrics = _eval(capsys, "--model", tmp_path / "student", "--data", tmp_path / "gt.json", "--out", tmp_path / "kept")
    assert set(metrics) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class"}
    assert set(metrics["per_class"]) == {"disc", "square"}
    two_steps = _eval(capsys, "--predictions", tmp_path / "kept" / "predictions.json", "--data", tmp_path / "gt.json")
    assert {k: two_steps[k] for k in ("AP", "AP50", "per_class")} == {k: metrics[k] for k in ("AP", "AP50", "per_class")}


def test_predictions_that_do_not_fit_the_ground_truth_are_data_errors(gt_and_truth, tmp_path, capsys):  # noqa: F811
    gt, truth = gt_and_truth
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    results = _results(truth)
    results[0]["image_id"] = 999
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert main(["eval", "--predictions", str(tmp_path / "results.json"), "--data", str(tmp_path / "gt.json")]) == 1
    err = capsys.readouterr().err
    assert "results.json" in err and "999" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "junk.json").write_text('{"not": "predictions"}')
    assert main(["eval", "--predictions", str(tmp_path / "junk.json"), "--data", str(tmp_path / "gt.json")]) == 1
    assert "junk.json" in capsys.readouterr().err
    assert main(["eval", "--predictions", str(tmp_path / "results.json"), "--data", str(tmp_path / "none.json")]) == 1
    assert "none.json: ground-truth json not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["eval", "--data", str(tmp_path / "gt.json")])
    assert usage.value.code == 2
