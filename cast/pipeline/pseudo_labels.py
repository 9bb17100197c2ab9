"""Pseudo-labels: a teacher's predictions on the unlabeled images, stored as COCO results.

`pseudo_labels/<stage>.json` is a COCO result list (one dict per instance: image_id,
category_id, segmentation as compressed RLE, score, area, bbox) filtered by score, optionally
without overlaps (each pixel in at most one instance, as in ground truth), and by mask area.
`<stage>.manifest.json` is its `cast.utils.cache.Record`: the labels are reused only while the
teacher's weights, the image ids, the thresholds and the code are those it records.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

import cast
from cast.config import PseudoLabelConfig
from cast.data.dataset import image_ids_of
from cast.evaluation.coco import decode_results, encode_mask, rle_of
from cast.evaluation.predict import predict_results
from cast.models.protocol import weights_hash
from cast.structures import InstanceSample
from cast.utils.cache import Record, json_digest
from cast.utils.distributed import DistContext, barrier
from cast.utils.io import atomic_write_json, read_json

FORMAT_VERSION = 1
RESULT_KEYS = ("image_id", "category_id", "segmentation", "score")


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
        mask = mask_utils.decode(rle_of(r)).astype(bool)
        taken = np.zeros_like(mask) if taken is None else taken
        own = mask & ~taken
        area, full = int(own.sum()), int(mask.sum())
        if area == 0 or area < min_kept_fraction * full:
            continue
        taken |= own
        if area < full:
            r = {**r, "segmentation": encode_mask(own), "area": area}
            r["bbox"] = [float(v) for v in mask_utils.toBbox(rle_of(r))]
        kept.append(r)
    return kept


def make_manifest(teacher_hash: str, image_ids: Sequence[int], cfg: PseudoLabelConfig, test_size: int | None,
                  teacher: str) -> dict[str, Any]:
    """The settings pseudo-labels are made under (their Record's settings)."""
    return {"format_version": FORMAT_VERSION, "code_version": cast.__version__, "teacher": teacher,
            "teacher_hash": teacher_hash, "image_ids": sorted(int(i) for i in image_ids), "test_size": test_size,
            "thresholds": {"score_threshold": cfg.score_threshold, "min_area": cfg.min_area,
                           "max_instances": cfg.max_instances, "min_kept_fraction": cfg.min_kept_fraction}}


def load_if_current(path: str | Path, manifest_path: str | Path, expected: dict[str, Any]) -> list[dict] | None:
    """The stored labels when their record holds the `expected` settings and they are the list it
    vouches for (as many results as it counted, each a result of one of its images), else None:
    damaged, truncated or stale labels are redone, never trusted."""
    path, record = Path(path), Record(manifest_path)
    if not (path.is_file() and record.matches(expected)):
        return None
    try:
        results = read_json(path)
    except ValueError:  # a damaged file is redone, not trusted
        return None
    image_ids = set(expected.get("image_ids", []))
    if not (isinstance(results, list) and record.read().get("num_instances") == len(results)
            and all(isinstance(r, dict) and all(k in r for k in RESULT_KEYS) and isinstance(r["image_id"], int)
                    and r["image_id"] in image_ids for r in results)):
        return None
    return results


def write_pseudo_labels(path: str | Path, manifest_path: str | Path, results: list[dict[str, Any]],
                        manifest: dict[str, Any]) -> None:
    """Labels first, record last: a crash in between leaves labels nothing vouches for."""
    record = Record(manifest_path)
    record.clear()
    atomic_write_json(path, results)
    record.write(manifest, num_instances=len(results))


def pseudo_label(model: torch.nn.Module, samples: Sequence[InstanceSample], category_ids: Sequence[int],
                 cfg: PseudoLabelConfig, path: str | Path, manifest_path: str | Path, test_size: int | None,
                 batch_size: int, ctx: DistContext = DistContext(), teacher: str = "",
                 num_workers: int = 0) -> list[dict[str, Any]]:
    """Filtered pseudo-labels of `samples` by `model`: reused from `path` while its record matches,
    else computed (sharded over ranks), written atomically by rank 0, and returned on every rank."""
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
        masks, category_ids, scores = decode_results(self.by_image.get(s.image_id, []), s.height, s.width,
                                                     source=f"pseudo-labels of image {s.image_id}")
        return InstanceSample(image=s.image, masks=masks, labels=np.array([self.label_of[c] for c in category_ids],
                                                                          np.int64),
                              image_id=s.image_id, file_name=s.file_name, scores=scores, meta=dict(s.meta))
