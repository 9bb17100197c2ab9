"""COCO mask AP, computed by pycocotools (never by hand), and model outputs as COCO results."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cast.structures import Instances
from cast.utils.io import atomic_write_json, read_json

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """A binary (H, W) mask as compressed RLE whose counts are a str (json-serialisable)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def instances_to_results(instances: Instances, image_id: int, category_ids: Sequence[int]) -> list[dict[str, Any]]:
    """One image's predicted instances as COCO result dicts: compressed-RLE mask (counts as str),
    original category id, score, and the mask's area and box. Labels are contiguous indices into
    `category_ids`."""
    masks, labels, scores = (x.detach().cpu().numpy() for x in (instances.masks, instances.labels, instances.scores))
    results = []
    for mask, label, score in zip(masks.astype(bool), labels, scores):
        if not 0 <= int(label) < len(category_ids):
            raise ValueError(f"image {image_id}: label {int(label)} is outside the {len(category_ids)} classes")
        result = {"image_id": int(image_id), "category_id": int(category_ids[int(label)]),
                  "segmentation": encode_mask(mask), "score": float(score)}
        rle = rle_of(result)
        result["area"] = int(mask_utils.area(rle))
        result["bbox"] = [float(v) for v in mask_utils.toBbox(rle)]
        results.append(result)
    return results


def rle_of(result: dict[str, Any]) -> dict[str, Any]:
    """A result's (or annotation's) compressed RLE in the form pycocotools takes (counts as bytes)."""
    counts = result["segmentation"]["counts"]
    return {"size": result["segmentation"]["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def decode_results(results: Sequence[dict[str, Any]], height: int, width: int,
                   source: str = "results") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(masks (K, H, W) bool, category ids (K,), scores (K,)) of one image's COCO results, in
    their order; a mask of another size than (height, width) is refused, naming `source`."""
    if not results:
        return np.zeros((0, height, width), bool), np.zeros(0, np.int64), np.zeros(0, np.float32)
    for r in results:
        seg = r["segmentation"]
        if not isinstance(seg, dict) or [int(v) for v in seg.get("size", ())] != [height, width]:
            raise ValueError(f"{source}: image {r['image_id']}: segmentation is not an RLE of size {(height, width)}")
    masks = mask_utils.decode([rle_of(r) for r in results]).transpose(2, 0, 1).astype(bool)
    return (masks, np.array([int(r["category_id"]) for r in results], np.int64),
            np.array([float(r.get("score", 1.0)) for r in results], np.float32))


def save_results(results: list[dict[str, Any]], path: str | Path) -> None:
    atomic_write_json(path, results)


def load_results(path: str | Path) -> list[dict[str, Any]]:
    """COCO results from a json of them (a list) or from a COCO instances json (its annotations;
    a missing score counts as 1, as for ground truth used as predictions)."""
    data = read_json(path)
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        data = [{"score": 1.0, **a} for a in data["annotations"]]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: expected a COCO results list or a COCO instances json")
    for r in data:
        if not {"image_id", "category_id", "segmentation"} <= r.keys():
            raise ValueError(f"{path}: a prediction needs image_id, category_id and segmentation, got keys {sorted(r)}")
    return data


def _as_coco(coco_gt: str | Path | dict | COCO) -> COCO:
    if isinstance(coco_gt, COCO):
        return coco_gt
    gt = COCO()
    gt.dataset = read_json(coco_gt) if isinstance(coco_gt, (str, Path)) else coco_gt
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def _percent(value: float) -> float:
    # pycocotools reports -1 where a metric has no data (e.g. no small objects).
    return float("nan") if value < 0 else 100.0 * float(value)


def evaluate_instances(coco_gt: str | Path | dict | COCO, results: list[dict[str, Any]] | str | Path,
                       per_class: bool = True) -> dict[str, Any]:
    """Mask AP, AP50, AP75, APs, APm, APl in percent (+ per-class AP and pycocotools' summary text).

    `coco_gt`: a COCO instance json path, dict or COCO object; `results`: COCO result dicts or a
    path to a json of them. Every result must refer to an image of the ground truth.
    """
    gt = _as_coco(coco_gt)
    if isinstance(results, (str, Path)):
        results = load_results(results)
    known = set(gt.getImgIds())
    unknown = sorted({int(r["image_id"]) for r in results} - known)
    if unknown:
        raise ValueError(f"results refer to image ids not in the ground truth: {unknown[:10]}")
    names = {c["id"]: c["name"] for c in gt.loadCats(gt.getCatIds())}
    if not results:  # loadRes refuses an empty list; nothing predicted means AP 0.
        out: dict[str, Any] = {name: 0.0 for name in METRIC_NAMES}
        if per_class:
            out["per_class"] = {name: 0.0 for name in names.values()}
        out["summary"] = "no predictions"
        return out
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        dt = gt.loadRes([dict(r) for r in results])  # loadRes adds keys to the dicts it gets
        ev = COCOeval(gt, dt, iouType="segm")
        ev.params.imgIds = sorted(known)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out = {name: _percent(v) for name, v in zip(METRIC_NAMES, ev.stats[[0, 1, 2, 3, 4, 5]])}
    if per_class:
        # precision: [iou thresholds, recall points, categories, area ranges, max dets]; area "all",
        # 100 detections; -1 marks recall points without data.
        precision = ev.eval["precision"][:, :, :, 0, -1]
        out["per_class"] = {}
        for k, cat_id in enumerate(ev.params.catIds):
            p = precision[:, :, k]
            p = p[p > -1]
            out["per_class"][names[cat_id]] = 100.0 * float(p.mean()) if p.size else float("nan")
    out["summary"] = summary.getvalue()
    return out
