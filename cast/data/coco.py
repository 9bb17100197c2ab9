"""COCO instance json: reading into an `InstanceDataset`, and writing one back.

Reading checks every image and annotation once, up front, so that a bad file fails in the
first second with the json file and the offending image / annotation id in the message; with
``lenient=True`` the bad items are skipped instead (`LoadReport` counts, `DataWarning`s).
Segmentations are converted to compressed RLE at read time (cheap, and it is the form both
decoding and evaluation want); masks are decoded only when a sample is accessed.

Conventions:
- categories are sorted by id; contiguous index i <-> `category_ids[i]` (ids need not be 1..C).
- ``iscrowd=1`` regions go to `InstanceSample.ignore`, never to the instances.
- images without annotations are kept (they are valid negatives).
- a json without an "annotations" key (a COCO image-info file) reads as images without annotations.
- `file_name` is relative to `image_root`, by default the json's folder.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from cast.data.dataset import (ImageRecord, InstanceDataset, Target, coco_annotation, coco_document, encode_masks,
                               make_target)
from cast.data.errors import DataError, LoadReport, MissingFileError
from cast.data.dataset import IMAGE_EXTENSIONS
from cast.structures import InstanceSample
from cast.utils.io import atomic_write_json

# Annotation tools round outward at image borders; coordinates up to one pixel outside are accepted.
BOUNDS_TOLERANCE = 1.0
# pycocotools stores RLE run lengths and areas as uint32: beyond this they overflow (wrong areas,
# OverflowError deep inside frPyObjects), so larger image records are refused up front.
MAX_MASK_PIXELS = 2**32 - 1


class _Invalid(Exception):
    """One annotation or image is unusable: `reason` is the LoadReport key, `detail` the message."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MissingFileError(path, "annotation file not found")
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise DataError(path, f"invalid json at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except ValueError as e:  # e.g. an integer literal longer than Python converts (4300 digits)
        raise DataError(path, f"invalid json: {e}") from None
    except RecursionError:
        raise DataError(path, "invalid json: nested too deeply to parse") from None
    if not isinstance(data, dict):
        raise DataError(path, f"expected a json object at the top level, got {type(data).__name__}")
    for key in ("images", "categories"):
        if key not in data:
            raise DataError(path, f"missing top-level key {key!r}")
        if not isinstance(data[key], list):
            raise DataError(path, f"{key!r} must be a list, got {type(data[key]).__name__}")
    if not isinstance(data.get("annotations", []), list):
        raise DataError(path, f"'annotations' must be a list, got {type(data['annotations']).__name__}")
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _categories(data: dict[str, Any], path: Path) -> tuple[list[str], list[int]]:
    seen: dict[int, str] = {}
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise DataError(path, f"category #{i} needs an integer 'id' and a string 'name', got {cat!r}")
        if cat["id"] in seen:
            raise DataError(path, f"category id {cat['id']} appears twice")
        seen[int(cat["id"])] = cat["name"]
    if not seen:
        raise DataError(path, "no categories")
    ids = sorted(seen)
    return [seen[i] for i in ids], ids


def _image_record(image: Any, image_root: Path) -> ImageRecord:
    if not isinstance(image, dict):
        raise _Invalid("missing_key", f"expected an object, got {image!r}")
    for key in ("id", "file_name", "height", "width"):
        if key not in image:
            raise _Invalid("missing_key", f"missing key {key!r}")
    if not _is_int(image["id"]):
        raise _Invalid("bad_value", f"'id' must be an integer, got {image['id']!r}")
    height, width = image["height"], image["width"]
    if not (_is_int(height) and _is_int(width) and height > 0 and width > 0):
        raise _Invalid("bad_value", f"height and width must be positive integers, got {height!r} x {width!r}")
    if height * width > MAX_MASK_PIXELS:
        raise _Invalid("bad_value", f"height x width = {height} x {width} is more pixels than COCO masks can "
                                    f"hold ({MAX_MASK_PIXELS}: pycocotools counts them in 32 bits)")
    if not isinstance(image["file_name"], str) or not image["file_name"]:
        raise _Invalid("bad_value", f"'file_name' must be a non-empty string, got {image['file_name']!r}")
    path = image_root / image["file_name"]
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise _Invalid("bad_extension", f"file {path} has no image extension ({', '.join(IMAGE_EXTENSIONS)})")
    if not path.is_file():
        raise _Invalid("missing_image", f"image file {path} not found")
    return ImageRecord(int(image["id"]), path, image["file_name"], int(height), int(width))


def _compressed_total(counts: str) -> int:
    """Sum of the run lengths of a COCO compressed RLE string (to validate it before decoding).

    The format stores each run as base-32 digits (6-bit chars offset by 48, bit 5 = more digits,
    sign-extended), runs after the second one as differences to the run two places earlier.
    """
    runs: list[int] = []
    pos = 0
    while pos < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(counts):
                raise _Invalid("bad_segmentation", "compressed RLE string ends inside a run")
            char = ord(counts[pos]) - 48
            if not 0 <= char < 64:
                raise _Invalid("bad_segmentation", f"compressed RLE has an invalid character {counts[pos]!r}")
            value |= (char & 0x1F) << (5 * shift)
            more = bool(char & 0x20)
            pos += 1
            shift += 1
            if not more and char & 0x10:
                value |= -1 << (5 * shift)
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise _Invalid("bad_segmentation", "compressed RLE has a negative run length")
        runs.append(value)
    return sum(runs)


def _check_inside(x0: float, x1: float, y0: float, y1: float, height: int, width: int, what: str) -> None:
    tol = BOUNDS_TOLERANCE
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        raise _Invalid("out_of_bounds", f"{what} reaches x in [{x0:g}, {x1:g}], y in [{y0:g}, {y1:g}], "
                                        f"outside the {width}x{height} image")


def _polygons_rle(polygons: list[Any], height: int, width: int) -> dict[str, Any]:
    if not polygons:
        raise _Invalid("degenerate_polygon", "empty polygon list")
    for k, poly in enumerate(polygons):
        try:
            coords = np.asarray(poly) if isinstance(poly, list) else None
        except ValueError:  # ragged nesting
            coords = None
        # json numbers become an int or float array; strings, booleans and nesting do not.
        if coords is None or coords.ndim != 1 or coords.dtype.kind not in "iuf" or not np.isfinite(coords).all():
            raise _Invalid("bad_segmentation", f"polygon {k} must be a flat list of finite numbers")
        if len(coords) < 6 or len(coords) % 2:
            raise _Invalid("degenerate_polygon", f"polygon {k} has {len(coords)} coordinates; "
                                                 "a polygon needs at least 3 (x, y) points")
        x, y = coords[0::2].astype(np.float64), coords[1::2].astype(np.float64)
        _check_inside(x.min(), x.max(), y.min(), y.max(), height, width, f"polygon {k}")
        twice_area = x[:-1] @ y[1:] - x[1:] @ y[:-1] + x[-1] * y[0] - x[0] * y[-1]  # shoelace formula
        if twice_area == 0:
            raise _Invalid("degenerate_polygon", f"polygon {k} has zero area")
    return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))


def _rle(seg: dict[str, Any], height: int, width: int) -> dict[str, Any]:
    if "size" not in seg or "counts" not in seg:
        raise _Invalid("missing_key", "RLE segmentation needs 'size' and 'counts'")
    size = seg["size"]
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(s) for s in size)):
        raise _Invalid("bad_segmentation", f"RLE 'size' must be [height, width], got {size!r}")
    if list(size) != [height, width]:
        raise _Invalid("out_of_bounds", f"RLE size {list(size)} differs from the image size [{height}, {width}]")
    counts = seg["counts"]
    if isinstance(counts, list):  # uncompressed
        if not all(_is_int(c) and c >= 0 for c in counts):
            raise _Invalid("bad_segmentation", "uncompressed RLE counts must be non-negative integers")
        total = sum(counts)
    elif isinstance(counts, str):
        total = _compressed_total(counts)
    else:
        raise _Invalid("bad_segmentation", f"RLE 'counts' must be a list or a string, got {type(counts).__name__}")
    if total != height * width:  # decoding a wrong total would read or write past the mask
        raise _Invalid("out_of_bounds", f"RLE runs cover {total} pixels, the {width}x{height} image has "
                                        f"{height * width}")
    if isinstance(counts, list):
        return mask_utils.frPyObjects({"size": [height, width], "counts": list(counts)}, height, width)
    return {"size": [height, width], "counts": counts.encode("ascii")}


def _check_bbox(bbox: Any, height: int, width: int) -> None:
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise _Invalid("bad_value", f"'bbox' must be [x, y, w, h] of finite numbers, got {bbox!r}")
    x, y, w, h = bbox
    if w < 0 or h < 0:
        raise _Invalid("bad_value", f"bbox {bbox} has a negative size")
    _check_inside(x, x + w, y, y + h, height, width, f"bbox {bbox}")


def _annotation_region(ann: Any, records: dict[int, ImageRecord], label_of: dict[int, int]
                       ) -> tuple[int, tuple[dict[str, Any], int, bool]]:
    """(image id, (compressed RLE, class index, is crowd)) of one annotation, or `_Invalid`."""
    for key in ("id", "image_id", "category_id", "segmentation"):
        if key not in ann:
            raise _Invalid("missing_key", f"missing key {key!r}")
    for key in ("id", "image_id", "category_id"):
        if not _is_int(ann[key]):
            raise _Invalid("bad_value", f"{key!r} must be an integer, got {ann[key]!r}")
    image_id, category_id = ann["image_id"], ann["category_id"]
    if image_id not in records:
        raise _Invalid("unknown_image", f"refers to image id {image_id!r}, which is not in 'images'")
    if category_id not in label_of:
        raise _Invalid("unknown_category", f"refers to category id {category_id!r}, which is not in 'categories'")
    iscrowd = ann.get("iscrowd", 0)
    if iscrowd not in (0, 1):
        raise _Invalid("bad_value", f"'iscrowd' must be 0 or 1, got {iscrowd!r}")
    record = records[image_id]
    height, width = record.height, record.width
    if "bbox" in ann:
        _check_bbox(ann["bbox"], height, width)
    seg = ann["segmentation"]
    if isinstance(seg, list):
        rle = _polygons_rle(seg, height, width)
    elif isinstance(seg, dict):
        rle = _rle(seg, height, width)
    else:
        raise _Invalid("bad_segmentation", "segmentation must be a list of polygons or an RLE object")
    if mask_utils.area(rle) == 0:
        raise _Invalid("empty_mask", "the mask has no pixels")
    return int(image_id), (rle, label_of[category_id], bool(iscrowd))


class CocoAnnotations:
    """`TargetSource` over RLEs parsed from one COCO json, keyed by image id."""

    def __init__(self, regions: dict[int, list[tuple[dict[str, Any], int, bool]]]) -> None:
        self._regions = regions

    def decode(self, record: ImageRecord) -> Target:
        regions = self._regions.get(record.image_id, [])
        height, width = record.height, record.width
        masks = {False: [], True: []}
        labels = {False: [], True: []}
        if regions:
            decoded = mask_utils.decode([rle for rle, _, _ in regions])  # (H, W, K) uint8
            for k, (_, label, crowd) in enumerate(regions):
                masks[crowd].append(decoded[:, :, k])
                labels[crowd].append(label)
        return make_target(masks[False], labels[False], masks[True], labels[True], height, width)


def read_coco(json_path: str | os.PathLike, image_root: str | os.PathLike | None = None, lenient: bool = False,
              progress: bool = True) -> InstanceDataset:
    """Read a COCO instance-segmentation json (polygons, compressed or uncompressed RLE, crowd).

    `image_root` is the folder `file_name`s are relative to (default: the json's folder). Problems
    raise `DataError` naming the json and the image / annotation id; with `lenient=True` the bad
    image or annotation is skipped, warned about and counted in the returned data set's `report`.
    """
    json_path = Path(json_path)
    image_root = json_path.parent if image_root is None else Path(image_root)
    data = _load_json(json_path)
    classes, category_ids = _categories(data, json_path)
    label_of = {cid: i for i, cid in enumerate(category_ids)}
    report = LoadReport(source=str(json_path), lenient=lenient)

    records: dict[int, ImageRecord] = {}
    skipped_images: set[Any] = set()
    for i, image in enumerate(data["images"]):
        name = f"image {image['id']}" if isinstance(image, dict) and "id" in image else f"image #{i}"
        try:
            record = _image_record(image, image_root)
            if record.image_id in records:
                raise _Invalid("duplicate_id", "image id appears twice")
        except _Invalid as e:
            report.problem(e.reason, f"{name}: {e.detail}")
            if isinstance(image, dict) and _is_int(image.get("id")) and image["id"] not in records:
                skipped_images.add(image["id"])
            continue
        records[record.image_id] = record

    regions: dict[int, list[tuple[dict[str, Any], int, bool]]] = {}
    seen_ann_ids: set[Any] = set()
    annotations = data.get("annotations", [])
    for i, ann in enumerate(tqdm(annotations, desc=f"read {json_path.name}", unit="ann", disable=not progress)):
        if not isinstance(ann, dict):
            report.problem("missing_key", f"annotation #{i}: expected an object, got {ann!r}")
            continue
        if _is_int(ann.get("image_id")) and ann["image_id"] in skipped_images:
            report.skipped["annotation_of_skipped_image"] += 1  # the image's skip was already warned about
            continue
        name = f"annotation {ann.get('id', f'#{i}')} (image {ann.get('image_id')})"
        try:
            image_id, region = _annotation_region(ann, records, label_of)
            if ann["id"] in seen_ann_ids:
                raise _Invalid("duplicate_id", "annotation id appears twice")
        except _Invalid as e:
            report.problem(e.reason, f"{name}: {e.detail}")
            continue
        seen_ann_ids.add(ann["id"])
        regions.setdefault(image_id, []).append(region)

    return InstanceDataset(records.values(), classes, category_ids, CocoAnnotations(regions), report)


def write_coco(source: InstanceDataset | Sequence[InstanceSample], json_path: str | os.PathLike,
               classes: Sequence[str] | None = None, category_ids: Sequence[int] | None = None,
               progress: bool = True) -> None:
    """Write ground truth as a COCO instance json (compressed RLE), atomically.

    An `InstanceDataset` writes its `coco_gt()` (crowd regions included). Samples need `classes`
    (and optionally `category_ids`, default 1..C) and a `file_name` each, relative to the folder
    the json will be read with; a sample's `ignore` mask has no category, so samples carrying one
    are refused rather than written without it.
    """
    json_path = Path(json_path)
    if isinstance(source, InstanceDataset):
        atomic_write_json(json_path, source.coco_gt(progress=progress))
        return
    if classes is None:
        raise ValueError(f"{json_path}: writing samples needs the class names")
    category_ids = list(range(1, len(classes) + 1)) if category_ids is None else [int(c) for c in category_ids]
    if len(category_ids) != len(classes):
        raise ValueError(f"{json_path}: {len(classes)} classes but {len(category_ids)} category ids")
    images, annotations = [], []
    for sample in tqdm(source, desc=f"write {json_path.name}", unit="img", disable=not progress):
        if not sample.file_name:
            raise ValueError(f"{json_path}: sample with image id {sample.image_id} has no file_name")
        if sample.ignore is not None and sample.ignore.any():
            raise ValueError(f"{json_path}: sample {sample.file_name} has ignore regions without a category; "
                             "write its InstanceDataset instead")
        if len(sample.labels) and not 0 <= int(sample.labels.min()) <= int(sample.labels.max()) < len(classes):
            raise ValueError(f"{json_path}: sample {sample.file_name} has labels outside 0..{len(classes) - 1}")
        images.append({"id": int(sample.image_id), "file_name": sample.file_name, "height": sample.height,
                       "width": sample.width})
        for rle, label in zip(encode_masks(sample.masks), sample.labels):
            annotations.append(coco_annotation(rle, len(annotations) + 1, sample.image_id,
                                               category_ids[int(label)], False))
    atomic_write_json(json_path, coco_document(images, annotations, classes, category_ids))
