"""The pseudo-label store: COCO RLE results, filtering, manifest reuse / invalidation, atomic
writes and the merge of rank shards."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from cast.config import PseudoLabelConfig
from cast.evaluation.coco import encode_mask, instances_to_results
from cast.evaluation.predict import merge_shards, predict_results
from cast.models.protocol import weights_hash
from cast.pipeline import pseudo_labels as pl
from cast.structures import InstanceSample, Instances
from cast.utils.distributed import DistContext
from test_training import TinySegModel

CATEGORY_IDS = [1, 2]


def _samples(n: int = 5, size: int = 32) -> list[InstanceSample]:
    rng = np.random.default_rng(0)
    return [InstanceSample(image=rng.integers(0, 255, (size, size, 3), dtype=np.uint8),
                           masks=np.zeros((0, size, size), bool), labels=np.zeros(0, np.int64), image_id=10 + i)
            for i in range(n)]


def _result(image_id: int, score: float, area: int, row: int = 0, category_id: int = 1) -> dict:
    """A result whose mask is the first `area` pixels of one row of a 16x128 image."""
    mask = np.zeros((16, 128), bool)
    mask[row, :area] = True
    return {"image_id": image_id, "category_id": category_id, "score": score, "area": area,
            "segmentation": encode_mask(mask)}


def _mask(result: dict) -> np.ndarray:
    return mask_utils.decode({**result["segmentation"], "counts": result["segmentation"]["counts"].encode()}) > 0


def _label(tmp_path, model, samples, cfg=PseudoLabelConfig(score_threshold=0.0, min_area=0)):
    return pl.pseudo_label(model, samples, CATEGORY_IDS, cfg, tmp_path / "s.json", tmp_path / "s.manifest.json",
                           test_size=None, batch_size=2, teacher="tiny")


def test_filter_by_score_area_and_count():
    results = [_result(1, 0.9, 100, row=0), _result(1, 0.4, 100, row=1), _result(1, 0.8, 3, row=2),
               _result(1, 0.7, 50, row=3), _result(1, 0.95, 60, row=4), _result(2, 0.6, 20)]
    kept = pl.filter_results(results, PseudoLabelConfig(score_threshold=0.5, min_area=10, max_instances=2))
    assert [(r["image_id"], r["score"]) for r in kept] == [(1, 0.95), (1, 0.9), (2, 0.6)]


def test_overlaps_are_resolved_and_duplicates_dropped():
    # 0.9: pixels 0-99; 0.8: the same object under another class; 0.7: pixels 60-127 (keeps 28 of 68,
    # 41 %); 0.6: pixels 0-29 of another row, overlapping nothing; 0.5: pixels 20-39 of that row
    # (keeps 10 of 20 = 50 %).
    results = [_result(1, 0.9, 100), _result(1, 0.8, 100, category_id=2), _result(1, 0.7, 128),
               _result(1, 0.6, 30, row=1), _result(1, 0.5, 40, row=1)]
    results[2] = {**results[2], "segmentation": encode_mask(np.pad(_mask(results[2])[:, 60:], ((0, 0), (60, 0)))),
                  "area": 68}
    results[4] = {**results[4], "segmentation": encode_mask(np.pad(_mask(results[4])[:, 20:], ((0, 0), (20, 0)))),
                  "area": 20}
    cfg = PseudoLabelConfig(score_threshold=0.0, min_area=0, min_kept_fraction=0.4)
    kept = pl.filter_results(results, cfg)
    assert [r["score"] for r in kept] == [0.9, 0.7, 0.6, 0.5]  # the other-class duplicate is gone
    masks = np.stack([_mask(r) for r in kept])
    assert masks.sum(axis=0).max() == 1  # every pixel in at most one instance
    assert [r["area"] for r in kept] == [int(m.sum()) for m in masks] == [100, 28, 30, 10]
    assert kept[1]["bbox"] == [100.0, 0.0, 28.0, 1.0] and kept[3]["bbox"] == [30.0, 1.0, 10.0, 1.0]
    assert kept[0] == results[0]  # an untouched instance keeps its stored mask
    # a stricter fraction drops the 41 % remainder; 0 keeps every non-empty one; min_area sees kept areas
    assert [r["score"] for r in pl.filter_results(results, PseudoLabelConfig(0.0, 0, 100, 0.45))] == [0.9, 0.6, 0.5]
    assert [r["score"] for r in pl.filter_results(results, PseudoLabelConfig(0.0, 0, 100, 0.0))] == [0.9, 0.7, 0.6, 0.5]
    assert [r["score"] for r in pl.filter_results(results, PseudoLabelConfig(0.0, 25, 100, 0.0))] == [0.9, 0.7, 0.6]
    assert pl.filter_results(results, PseudoLabelConfig(0.0, 0, 100, None)) == results  # None: as predicted


def test_results_round_trip_to_samples():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, :3, :4] = True
    masks[1, 5:, 2:] = True
    inst = Instances(masks, torch.tensor([1, 0]), torch.tensor([0.9, 0.3]))
    results = instances_to_results(inst, 7, CATEGORY_IDS)
    assert [r["category_id"] for r in results] == [2, 1] and [r["area"] for r in results] == [12, 18]
    assert results[0]["bbox"] == [0.0, 0.0, 4.0, 3.0] and isinstance(results[0]["segmentation"]["counts"], str)
    image = InstanceSample(image=np.zeros((8, 8, 3), np.uint8), masks=np.zeros((0, 8, 8), bool),
                           labels=np.zeros(0, np.int64), image_id=7)
    (back,) = pl.PseudoLabeledImages([image], results, CATEGORY_IDS)
    assert np.array_equal(back.masks, masks.numpy()) and back.labels.tolist() == [1, 0]
    assert back.scores.tolist() == pytest.approx([0.9, 0.3])



def test_the_settings_of_a_stage_follow_its_pseudo_labels():
    from cast.config import load_config
    from cast.pipeline.stages import stage_settings, stage_spec

    cfg = load_config("configs/smoke.yaml")
    images, model = _samples(2, 8), TinySegModel()
    masks = torch.zeros(1, 8, 8, dtype=torch.bool)
    masks[0, :3, :4] = True

    def settings(score: float) -> dict:
        results = instances_to_results(Instances(masks, torch.tensor([0]), torch.tensor([score])), 10, CATEGORY_IDS)
        unlabeled = pl.PseudoLabeledImages(images, results, CATEGORY_IDS)
        return stage_settings(stage_spec("knowledge_transfer", cfg, unlabeled), model, cfg, images, unlabeled)

    assert settings(0.9) == settings(0.9)
    assert settings(0.9)["unlabeled_images"] != settings(0.8)["unlabeled_images"]
    assert {k for k in settings(0.9) if settings(0.9)[k] != settings(0.8)[k]} == {"unlabeled_images"}

def test_labels_are_reused_until_teacher_data_or_thresholds_change(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pl, "predict_results", lambda *a, **k: calls.append(1) or predict_results(*a, **k))
    model, samples = TinySegModel(), _samples()
    first = _label(tmp_path, model, samples)
    assert len(first) > 0 and len(calls) == 1
    manifest = pl.read_json(tmp_path / "s.manifest.json")
    settings = manifest["settings"]
    assert settings["image_ids"] == [10, 11, 12, 13, 14] and settings["teacher_hash"] == weights_hash(model)
    assert manifest["num_instances"] == len(first) and settings["code_version"]

    assert _label(tmp_path, model, samples) == first and len(calls) == 1  # reused
    _label(tmp_path, model, samples, PseudoLabelConfig(score_threshold=0.2, min_area=0))
    assert len(calls) == 2  # thresholds changed
    _label(tmp_path, model, samples[:4], PseudoLabelConfig(score_threshold=0.2, min_area=0))
    assert len(calls) == 3  # images changed
    with torch.no_grad():
        model.query.add_(0.01)
    _label(tmp_path, model, samples[:4], PseudoLabelConfig(score_threshold=0.2, min_area=0))
    assert len(calls) == 4  # teacher changed
    (tmp_path / "s.json").write_text("[{broken")
    _label(tmp_path, model, samples[:4], PseudoLabelConfig(score_threshold=0.2, min_area=0))
    assert len(calls) == 5  # damaged file
    assert pl.read_json(tmp_path / "s.json")  # and it was rewritten


def test_a_crash_while_writing_leaves_no_manifest_and_forces_a_redo(tmp_path, monkeypatch):
    model, samples = TinySegModel(), _samples()
    _label(tmp_path, model, samples)
    old = (tmp_path / "s.json").read_bytes()
    with torch.no_grad():
        model.query.mul_(-1)

    def crash(path, obj, indent=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pl, "atomic_write_json", crash)
    with pytest.raises(OSError):
        _label(tmp_path, model, samples)
    assert (tmp_path / "s.json").read_bytes() == old  # the old file is intact, never half-written
    assert not (tmp_path / "s.manifest.json").exists()  # but nothing vouches for it any more
    assert pl.load_if_current(tmp_path / "s.json", tmp_path / "s.manifest.json", {}) is None


def test_sharded_prediction_merges_to_the_single_process_result():
    model, samples = TinySegModel(), _samples(5)
    single = predict_results(model, samples, CATEGORY_IDS, None, 2)
    # Without a process group each rank returns its own shard; the gather concatenates them.
    shards = [predict_results(model, samples, CATEGORY_IDS, None, 2, DistContext(rank=r, world_size=2))
              for r in range(2)]
    assert {r["image_id"] for r in shards[0]} == {10, 12, 14} and {r["image_id"] for r in shards[1]} == {11, 13}
    assert merge_shards(shards) == single


def test_weights_hash_sees_every_parameter():
    model = TinySegModel()
    h = weights_hash(model)
    assert h == weights_hash(model)
    with torch.no_grad():
        model.class_head.bias[0] += 1e-6
    assert weights_hash(model) != h
