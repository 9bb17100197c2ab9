"""Pseudo-labels: a teacher's predictions on the unlabeled images, stored as COCO results.

`pseudo_labels/<stage>.json` is a COCO result list (one dict per instance: image_id,
category_id, segmentation as compressed RLE, score, area, bbox) filtered by score, optionally
without overlaps (each pixel in at most one instance, as in ground truth), and by mask area.
`<stage>.manifest.json`, written after it, records what produced it (teacher weights hash,
image ids, thresholds, code version): a later run reuses the labels only when all of these match.
Inference is sharded over ranks and gathered, so every rank ends with the whole set.
"""
from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import cast
from cast.config import PseudoLabelConfig
from cast.data.loader import InstanceTorchDataset, collate_instances
from cast.data.views import EvalTransform
from cast.evaluation import instances_to_coco
from cast.evaluation.coco_eval import encode_mask
from cast.structures import InstanceSample, Instances
from cast.models.protocol import unwrap, weights_hash
from cast.training.distributed import DistContext, all_gather_objects, barrier, shard
from cast.utils.io import atomic_write_json, read_json

FORMAT_VERSION = 1


def json_digest(value: Any) -> str:
    """sha256 of a json-able value, independent of dict order."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def instances_to_results(instances: Instances, image_id: int, category_ids: Sequence[int]) -> list[dict[str, Any]]:
    """COCO result dicts (compressed RLE) of one image's instances, with mask area and box."""
    results = instances_to_coco(instances, image_id, category_ids)
    for r in results:
        rle = _rle(r)
        r["area"] = int(mask_utils.area(rle))
        r["bbox"] = [float(v) for v in mask_utils.toBbox(rle)]
    return results


def _rle(result: dict[str, Any]) -> dict[str, Any]:
    """A result's mask in the form pycocotools takes (counts as bytes)."""
    return {"size": result["segmentation"]["size"], "counts": result["segmentation"]["counts"].encode("ascii")}


def filter_results(results: list[dict[str, Any]], cfg: PseudoLabelConfig) -> list[dict[str, Any]]:
    """Per image: instances with score >= threshold, overlaps resolved when cfg.min_kept_fraction is
    set (`resolve_overlaps`), those (still) >= min_area pixels, the best max_instances."""
    per_image: dict[int, list[dict]] = defaultdict(list)
    for r in results:
        if r["score"] >= cfg.score_threshold:
            per_image[r["image_id"]].append(r)
    kept = []
    for image_id in sorted(per_image):
        ranked = sorted(per_image[image_id], key=lambda r: -r["score"])
        if cfg.min_kept_fraction is not None:
            ranked = resolve_overlaps(ranked, cfg.min_kept_fraction)
        kept += [r for r in ranked if r["area"] >= cfg.min_area][: cfg.max_instances]
    return kept


def resolve_overlaps(ranked: list[dict[str, Any]], min_kept_fraction: float) -> list[dict[str, Any]]:
    """One image's results, best score first, as a valid instance segmentation like ground truth:
    each keeps the pixels no better one took (mask, area and box updated); one left with less than
    `min_kept_fraction` of its mask, or nothing, is dropped as a duplicate and takes no pixels.
    (`cast.teachers.vfm_ops.resolve_overlaps` is the tensor form without that drop, inside predict.)"""
    kept, taken = [], None
    for r in ranked:
        mask = mask_utils.decode(_rle(r)).astype(bool)
        taken = np.zeros_like(mask) if taken is None else taken
        own = mask & ~taken
        area, full = int(own.sum()), int(mask.sum())
        if area == 0 or area < min_kept_fraction * full:
            continue
        taken |= own
        if area < full:
            r = {**r, "segmentation": encode_mask(own), "area": area}
            r["bbox"] = [float(v) for v in mask_utils.toBbox(_rle(r))]
        kept.append(r)
    return kept


@torch.no_grad()
def predict_results(model: torch.nn.Module, samples: Sequence[InstanceSample], category_ids: Sequence[int],
                    test_size: int | None, batch_size: int, ctx: DistContext = DistContext(),
                    desc: str = "predict", num_workers: int = 0) -> list[dict[str, Any]]:
    """COCO results of `model` on `samples` (a possibly lazy sequence), inference sharded over
    ranks; every rank gets all results."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    mine = shard(list(range(len(samples))), ctx.rank, ctx.world_size)
    results: list[dict[str, Any]] = []
    if mine:
        # A list of indices is a valid sampler: only this rank's images are ever loaded.
        loader = DataLoader(InstanceTorchDataset(samples, EvalTransform(test_size)), batch_size=batch_size,
                            sampler=mine, collate_fn=collate_instances, num_workers=num_workers)
        for batch in tqdm(loader, desc=desc, disable=not ctx.is_main, leave=False):
            preds = model.predict(batch["pixel_values"].to(ctx.device), batch["pixel_mask"].to(ctx.device),
                                  image_sizes=batch["image_sizes"], orig_sizes=batch["orig_sizes"])
            for image_id, inst in zip(batch["image_ids"], preds):
                results += instances_to_results(inst.to("cpu"), image_id, category_ids)
    model.train(was_training)
    return merge_shards(all_gather_objects(results))


def merge_shards(shards: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One result list from the ranks' lists, ordered by image id, then by decreasing score."""
    return sorted((r for part in shards for r in part), key=lambda r: (r["image_id"], -r["score"]))


def make_manifest(teacher_hash: str, image_ids: Sequence[int], cfg: PseudoLabelConfig, test_size: int | None,
                  teacher: str) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "code_version": cast.__version__, "teacher": teacher,
            "teacher_hash": teacher_hash, "image_ids": sorted(int(i) for i in image_ids), "test_size": test_size,
            "thresholds": {"score_threshold": cfg.score_threshold, "min_area": cfg.min_area,
                           "max_instances": cfg.max_instances, "min_kept_fraction": cfg.min_kept_fraction}}


RESULT_KEYS = ("image_id", "category_id", "segmentation", "score")


def load_if_current(path: str | Path, manifest_path: str | Path, expected: dict[str, Any]) -> list[dict] | None:
    """The stored labels when their manifest equals `expected` and they are the list it vouches
    for (as many results as it counted, each a result of one of its images), else None: damaged,
    truncated or stale labels are redone, never trusted."""
    path, manifest_path = Path(path), Path(manifest_path)
    if not (path.is_file() and manifest_path.is_file()):
        return None
    try:
        manifest = read_json(manifest_path)
        if not isinstance(manifest, dict) or {k: v for k, v in manifest.items() if k != "num_instances"} != expected:
            return None
        results = read_json(path)
    except ValueError:  # a damaged file is redone, not trusted
        return None
    image_ids = set(expected.get("image_ids", []))
    if not (isinstance(results, list) and manifest.get("num_instances") == len(results)
            and all(isinstance(r, dict) and all(k in r for k in RESULT_KEYS) and isinstance(r["image_id"], int)
                    and r["image_id"] in image_ids for r in results)):
        return None
    return results


def write_pseudo_labels(path: str | Path, manifest_path: str | Path, results: list[dict[str, Any]],
                        manifest: dict[str, Any]) -> None:
    """Labels first, manifest last: a crash in between leaves labels no manifest vouches for."""
    Path(manifest_path).unlink(missing_ok=True)
    atomic_write_json(path, results)
    atomic_write_json(manifest_path, {**manifest, "num_instances": len(results)})


def pseudo_label(model: torch.nn.Module, samples: Sequence[InstanceSample], category_ids: Sequence[int],
                 cfg: PseudoLabelConfig, path: str | Path, manifest_path: str | Path, test_size: int | None,
                 batch_size: int, ctx: DistContext = DistContext(), teacher: str = "",
                 num_workers: int = 0) -> list[dict[str, Any]]:
    """Filtered pseudo-labels of `samples` by `model`: reused from `path` when its manifest
    matches the teacher's weights, the image ids, the thresholds and the code, else computed
    (sharded over ranks), written atomically by rank 0, and returned on every rank."""
    expected = make_manifest(weights_hash(model), image_ids_of(samples), cfg, test_size, teacher)
    stored = load_if_current(path, manifest_path, expected)
    if stored is not None:
        return stored
    raw = predict_results(model, samples, category_ids, test_size, batch_size, ctx, desc=f"pseudo-label {teacher}",
                          num_workers=num_workers)
    results = filter_results(raw, cfg)
    if ctx.is_main:
        write_pseudo_labels(path, manifest_path, results, expected)
    barrier()
    return results


def image_ids_of(samples: Sequence[InstanceSample]) -> list[int]:
    """Image ids of a data set without loading its images when it can tell them directly."""
    ids = getattr(samples, "image_ids", None)
    return list(ids) if ids is not None else [s.image_id for s in samples]


class PseudoLabeledImages(Sequence):
    """The unlabeled images with pseudo-labels as their instances (scores kept), decoded lazily:
    an image and its masks are only read when the sample is."""

    def __init__(self, images: Sequence[InstanceSample], results: list[dict[str, Any]],
                 category_ids: Sequence[int]) -> None:
        self.images = images
        # Identifies the labels for the settings of the stage trained on them.
        self.digest = json_digest(results)
        self.label_of = {int(cid): i for i, cid in enumerate(category_ids)}
        self.by_image: dict[int, list[dict]] = defaultdict(list)
        for r in results:
            if r["category_id"] not in self.label_of:
                raise ValueError(f"pseudo-label of image {r['image_id']}: unknown category id {r['category_id']}")
            self.by_image[r["image_id"]].append(r)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_ids(self) -> list[int]:
        return image_ids_of(self.images)

    def __getitem__(self, index: int) -> InstanceSample:
        s = self.images[index]
        rs = self.by_image.get(s.image_id, [])
        if rs:
            masks = mask_utils.decode([_rle(r) for r in rs])
            masks = masks.transpose(2, 0, 1).astype(bool)
        else:
            masks = np.zeros((0, s.height, s.width), bool)
        if masks.shape[1:] != (s.height, s.width):
            raise ValueError(f"pseudo-labels of image {s.image_id}: mask size {masks.shape[1:]} does not match "
                             f"the image {(s.height, s.width)}")
        return InstanceSample(image=s.image, masks=masks,
                              labels=np.array([self.label_of[r["category_id"]] for r in rs], np.int64),
                              image_id=s.image_id, file_name=s.file_name,
                              scores=np.array([r["score"] for r in rs], np.float32), meta=dict(s.meta))
