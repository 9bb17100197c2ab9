"""A tiny `python -m cast run` on data in the Cityscapes layout: its report carries the official
Cityscapes metric (cityscapesscripts) beside COCO mask AP, equal to the metric computed directly on
the run's predictions."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cast.cli import main
from cast.data.cityscapes import CITYSCAPES_THING_CLASSES, CITYSCAPES_THING_IDS, IMAGE_SUFFIX, read_cityscapes
from cast.data.coco import write_coco
from cast.data.dataset import load_image
from cast.evaluation.cityscapes import evaluate_cityscapes, official_metric
from cast.evaluation.coco import decode_results
from cast.runs import RunFolder
from cast.structures import InstanceSample, Instances

pytestmark = pytest.mark.usefixtures("one_thread")
H, W = 64, 128


def write_cityscapes(root: Path, split: str, count: int, rng: np.random.Generator) -> None:
    """`count` images of two cities with 2-4 persons / cars each (no crowd regions)."""
    for i in range(count):
        city = ("aachen", "bochum")[i % 2]
        stem = f"{city}_{i:06d}_000019"
        image = rng.integers(0, 80, (H, W, 3), dtype=np.uint8)
        ids = np.full((H, W), 7, np.uint16)  # road
        for k in range(int(rng.integers(2, 5))):
            label = (24, 26)[k % 2]
            y, x = int(rng.integers(0, H - 24)), int(rng.integers(0, W - 32))
            ids[y:y + 20, x:x + 28] = label * 1000 + k
            image[y:y + 20, x:x + 28] = (200, 40, 40) if label == 24 else (40, 40, 200)
        for folder, name, array in (("leftImg8bit", f"{stem}{IMAGE_SUFFIX}", image),
                                    ("gtFine", f"{stem}_gtFine_instanceIds.png", ids)):
            path = root / folder / split / city / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)


def write_standin_source(root: Path) -> None:
    """The stand-in teacher's pretraining set (COCO json under root/source), from the train images."""
    train = read_cityscapes(root, "train")
    samples = []
    for i in range(len(train)):
        s = train[i]
        name = f"{s.image_id:04d}.png"
        (root / "source").mkdir(exist_ok=True)
        Image.fromarray(s.image).save(root / "source" / name)
        samples.append(InstanceSample(image=s.image, masks=s.masks, labels=s.labels, image_id=s.image_id,
                                      file_name=name))
    write_coco(samples, root / "source" / "annotations.json", classes=list(CITYSCAPES_THING_CLASSES),
               category_ids=list(CITYSCAPES_THING_IDS), progress=False)


@pytest.mark.slow
def test_a_cityscapes_run_reports_the_official_metric(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "cityscapes"
    write_cityscapes(root, "train", 8, rng)
    write_cityscapes(root, "val", 3, rng)
    write_standin_source(root)
    fast = {"steps": 2, "checkpoint_every": 1}
    config = {"name": "city", "output_dir": str(tmp_path / "runs"), "device": "cpu",
              "data": {"kind": "cityscapes", "root": str(root), "labeled_fraction": 0.25, "crop_size": [64, 64],
                       "test_size": 64, "batch_size": 2, "unlabeled_batch_size": 2, "eval_batch_size": 2},
              "teacher": {"kind": "standin", "preset": "cast-tiny",
                          "pretrain": {"source": "source", "cache_dir": str(tmp_path / "cache"), "train": fast}},
              "student": {"preset": "cast-tiny"},
              "training": {stage: fast for stage in ("teacher_adaptation", "teacher_self_training",
                                                     "knowledge_transfer", "student_refinement", "student_supervised")},
              "losses": {"num_negatives": 8, "embedding_stride": 8},
              "pseudo_labels": {"score_threshold": 0.0, "min_area": 0, "max_instances": 5}}
    path = tmp_path / "city.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(path)]) == 0

    folder = RunFolder(tmp_path / "runs" / "city")
    report = json.loads(folder.report_json.read_text())
    val = read_cityscapes(root, "val")
    gt_files = [root / "gtFine" / "val" / r.path.parent.name / r.path.name.replace(IMAGE_SUFFIX, "_gtFine_instanceIds.png")
                for r in val.records]
    for row in report["rows"]:
        results = json.loads(folder.predictions(row["model"]).read_text())
        by_image = defaultdict(list)
        for r in results:
            by_image[r["image_id"]].append(r)
        predictions = {}
        for record in val.records:
            masks, category_ids, scores = decode_results(by_image[record.image_id], H, W)
            labels = torch.tensor([CITYSCAPES_THING_IDS.index(int(c)) for c in category_ids], dtype=torch.int64)
            predictions[record.path.name[: -len(IMAGE_SUFFIX)]] = Instances(torch.from_numpy(masks), labels,
                                                                            torch.from_numpy(scores))
        official = evaluate_cityscapes(gt_files, predictions, tmp_path / "work" / row["model"])
        assert row["cityscapes_AP"] == pytest.approx(official["AP"], abs=0.01), row["model"]
        assert row["cityscapes_AP50"] == pytest.approx(official["AP50"], abs=0.01), row["model"]
        assert load_image(val.records[0].path).shape == (H, W, 3)
    # Two training steps learn nothing, so the rows compare zeros; the same path on the ground truth
    # itself (as predictions with score 1) must give the perfect score.
    perfect = [{**a, "score": 1.0} for a in val.coco_gt(progress=False)["annotations"] if not a["iscrowd"]]
    assert official_metric(val, perfect, root)["AP"] == pytest.approx(100.0)
    assert "Official Cityscapes metric (cityscapesscripts)" in folder.report_md.read_text()
