"""FiftyOne integration: export of a run, FiftyOne's COCO mAP against cast's pycocotools
evaluation, uniqueness-driven splits, pseudo-label mistakenness, and the App launch.

The datasets are non-persistent and deleted at the end (FiftyOne starts its own MongoDB once per
test session; the first start takes a few seconds).
"""
from __future__ import annotations

import urllib.request
import uuid

import numpy as np
import pytest
import skimage.data
from PIL import Image
from test_app import MODEL_STAGE, free_port, make_synthetic_run

from cast.data.splits import make_split, validate_split
from cast.evaluation.coco import evaluate_instances
from cast.inspection import GROUND_TRUTH, RunContents

fo = pytest.importorskip("fiftyone")
from cast.integrations.fiftyone_export import (export_run, image_features, launch,  # noqa: E402
                                               rank_pseudo_label_mistakes, uniqueness_split)

PREDICTIONS = f"predictions_{MODEL_STAGE}"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_synthetic_run(tmp_path_factory.mktemp("fiftyone"), num_train=8, num_val=6)


@pytest.fixture(scope="module")
def dataset(run_dir):
    exported = export_run(run_dir, dataset_name=f"cast-test-{uuid.uuid4().hex[:8]}")
    yield exported
    exported.delete()


def _full_mask(detection, height: int, width: int) -> np.ndarray:
    x, y, w, h = detection.bounding_box
    x0, y0 = round(x * width), round(y * height)
    full = np.zeros((height, width), bool)
    full[y0:y0 + round(h * height), x0:x0 + round(w * width)] = detection.mask
    return full


def test_export_holds_every_image_split_and_label_source(dataset, run_dir):
    data = RunContents(run_dir)
    assert len(dataset) == len(data.keys) == 14
    assert dataset.count_sample_tags() == {"val": 6, "labeled": 3, "unlabeled": 5}
    assert not dataset.persistent and dataset.default_classes == data.classes
    # Predictions exist on val images only, pseudo-labels on unlabeled images only.
    assert len(dataset.exists(PREDICTIONS)) == 6 == len(dataset.match_tags("val").exists(PREDICTIONS))
    for stage in ("teacher_adaptation", "teacher_self_training"):
        assert len(dataset.exists(f"pseudo_labels_{stage}")) == 5
        assert len(dataset.match_tags("unlabeled").exists(f"pseudo_labels_{stage}")) == 5
    # Masks cropped to relative boxes paste back into exactly the ground-truth masks.
    for sample in dataset.match_tags(["val", "unlabeled"]).limit(4):
        truth = data.instances(sample.key, GROUND_TRUTH)
        height, width = sample.metadata.height, sample.metadata.width
        pasted = [_full_mask(d, height, width) for d in sample.ground_truth.detections]
        assert len(pasted) == len(truth) > 0
        for mask, expected, detection, label in zip(pasted, truth.masks, sample.ground_truth.detections,
                                                    truth.labels):
            np.testing.assert_array_equal(mask, expected)
            assert detection.label == data.classes[label] and detection.confidence is None
    assert all(d.confidence is not None for d in dataset.match_tags("val").first()[PREDICTIONS].detections)
    with pytest.raises(ValueError, match="already exists"):
        export_run(run_dir, dataset_name=dataset.name, overwrite=False)


def test_fiftyone_coco_map_agrees_with_pycocotools(dataset, run_dir):
    """FiftyOne's COCO-style evaluation and pycocotools (cast.evaluation) define mask mAP alike
    here: IoU thresholds 0.50:0.05:0.95, 101-point interpolated precision, greedy matching by
    score. Where they may differ, this run rules it out: pycocotools keeps 100 detections per
    image (FiftyOne all; here < 100), averages over classes with ground truth (FiftyOne over
    classes seen in either field; every class has val ground truth here), handles crowd regions
    (none here) and breaks score ties by its own order (scores are continuous draws). FiftyOne
    rebuilds full masks from relative boxes, exact here since boxes are whole pixels. So the
    two must agree up to float rounding: tolerance 1e-4 (AP in [0, 1])."""
    data = RunContents(run_dir)
    val = dataset.match_tags("val")
    assert set(val.distinct("ground_truth.detections.label")) == set(data.classes)
    results = val.evaluate_detections(PREDICTIONS, gt_field="ground_truth", eval_key="eval_coco", use_masks=True,
                                      compute_mAP=True, progress=False)
    ours = evaluate_instances(data.val.coco_gt(progress=False), data.run.predictions(MODEL_STAGE))
    assert 0.05 < results.mAP() < 0.95  # imperfect predictions: a meaningful comparison
    assert results.mAP() == pytest.approx(ours["AP"] / 100.0, abs=1e-4)
    for name, ap in ours["per_class"].items():
        assert results.mAP(classes=[name]) == pytest.approx(ap / 100.0, abs=1e-4), name
    dataset.delete_evaluation("eval_coco")


def _near_duplicates_and_distinct(folder) -> tuple[dict[int, str], set[int]]:
    rng = np.random.default_rng(0)
    base = skimage.data.astronaut()[::4, ::4]
    paths = {}
    for i in range(4):  # the same photo with faint noise
        noisy = np.clip(base.astype(int) + rng.integers(-3, 4, base.shape), 0, 255).astype(np.uint8)
        paths[i] = folder / f"dup_{i}.png"
        Image.fromarray(noisy).save(paths[i])
    distinct = {}
    for i, image in enumerate((skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket(),
                               skimage.data.immunohistochemistry()), start=10):
        distinct[i] = folder / f"photo_{i}.png"
        Image.fromarray(image[::4, ::4]).save(distinct[i])
    return {i: str(p) for i, p in {**paths, **distinct}.items()}, set(distinct)


def test_uniqueness_split_labels_the_distinct_images(tmp_path, dataset):
    paths, distinct = _near_duplicates_and_distinct(tmp_path)
    split = uniqueness_split(paths, labeled_fraction=0.5, seed=0)
    assert split == validate_split(split) and split.keys() == make_split(list(paths), 0.5, 0).keys()
    assert set(split["labeled_image_ids"]) == distinct  # no duplicate wastes a label
    assert sorted(split["labeled_image_ids"] + split["unlabeled_image_ids"]) == sorted(paths)
    # From an exported run: the training images, by their image ids.
    train = dataset.match_tags(["labeled", "unlabeled"])
    from_run = uniqueness_split(train, labeled_fraction=0.25, seed=1)
    assert len(from_run["labeled_image_ids"]) == 2
    assert sorted(from_run["labeled_image_ids"] + from_run["unlabeled_image_ids"]) == sorted(train.values("image_id"))
    assert image_features(np.zeros((16, 16, 3), np.uint8)).shape == (8 * 8 * 3 + 8,)
    with pytest.raises(ValueError, match="embeddings must be"):
        uniqueness_split(paths, 0.5, 0, embeddings=np.zeros((3, 4)))
    with pytest.raises(ValueError, match="labeled_fraction"):
        uniqueness_split(paths, 1.5, 0)


def test_pseudo_label_mistakes_rank_first(dataset):
    """teacher_self_training gives the first instance of each unlabeled image the wrong class;
    the adapted teacher (teacher_adaptation) has them right, with confidence >= 0.9."""
    ranked = rank_pseudo_label_mistakes(dataset, "pseudo_labels_teacher_adaptation",
                                        "pseudo_labels_teacher_self_training")
    truth = {(s.id, tuple(np.round(d.bounding_box, 6))): d.label
             for s in dataset.match_tags("unlabeled") for d in s.ground_truth.detections}
    patches = list(ranked)
    wrong = [truth[(p.sample_id, tuple(np.round(p["pseudo_labels_teacher_self_training"].bounding_box, 6)))]
             != p["pseudo_labels_teacher_self_training"].label for p in patches]
    assert len(patches) == len(truth) and sum(wrong) == 5
    assert wrong[:5] == [True] * 5 and not any(wrong[5:])
    scores = [p["pseudo_labels_teacher_self_training"]["mistakenness"] for p in patches]
    assert scores == sorted(scores, reverse=True) and scores[4] > scores[5]


def test_launch_serves_the_app_on_localhost(run_dir):
    port = free_port()
    session = launch(run_dir, port=port, wait=False)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as page:
            assert page.status == 200
        assert session.dataset.name == f"cast-{run_dir.name}" and len(session.dataset) == 14
    finally:
        session.close()
        session.dataset.delete()
