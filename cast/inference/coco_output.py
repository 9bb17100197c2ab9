"""Predicted instances as one COCO **instances** json: images (id, file_name, height, width),
categories (the model's class names), annotations (id, image_id, category_id, compressed-RLE
segmentation at the image's stored resolution, area, bbox, iscrowd 0, score).

The file reads back as a `data.kind: coco` split (`cast.data.coco.read_coco`), in pycocotools
(`COCO(path)`, and `loadRes` of its annotations) and in FiftyOne's COCO importer: `file_name` is
the image's path relative to the json's folder when it lies below it, else its absolute path
(`relative_name`).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cast.evaluation.coco import instances_to_results
from cast.structures import Instances
from cast.utils.io import atomic_path

DESCRIPTION = "instance predictions written by the CAST workbench"


def relative_name(path: str | os.PathLike, json_dir: str | os.PathLike) -> str:
    """The `file_name` of the image at `path` in a json in `json_dir`: its path relative to that
    folder when it lies below it (e.g. `label --out` the image folder itself: the pair moves
    together), else its absolute path; posix separators. Both resolve the same way in the
    project's coco reader, pycocotools' users and FiftyOne (`data_path` = the json's folder)."""
    path, json_dir = os.path.abspath(path), os.path.abspath(json_dir)
    relative = os.path.relpath(path, json_dir)
    return Path(path if relative.startswith("..") else relative).as_posix()


def image_entry(image_id: int, file_name: str, height: int, width: int) -> dict[str, Any]:
    return {"id": int(image_id), "file_name": file_name, "height": int(height), "width": int(width)}


def instance_annotations(instances: Instances, image_id: int, category_ids: Sequence[int]) -> list[dict[str, Any]]:
    """One image's instances as annotations without ids (numbered when the file is written)."""
    annotations = []
    for result in instances_to_results(instances, image_id, category_ids):
        annotations.append({"image_id": result["image_id"], "category_id": result["category_id"],
                            "segmentation": result["segmentation"], "area": result["area"], "bbox": result["bbox"],
                            "iscrowd": 0, "score": result["score"]})
    return annotations


def categories(classes: Sequence[str], category_ids: Sequence[int]) -> list[dict[str, Any]]:
    return [{"id": int(c), "name": str(name), "supercategory": ""} for c, name in zip(category_ids, classes)]


def write_instances_json(path: str | os.PathLike, info: dict[str, Any] | Callable[[], dict[str, Any]],
                         cats: list[dict[str, Any]],
                         parts: Callable[[], Iterable[tuple[list[dict], list[dict]]]]) -> tuple[int, int]:
    """Write the json atomically from `parts()`, an iterable of (images, annotations) pieces that is
    called twice (images first, then annotations, numbered 1..N in order), so that only one piece
    is ever in memory; `info` (or what `info()` returns once both passes are done) is written last.
    Returns the numbers of images and of annotations."""
    count = num_images = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write('{"licenses": [], "categories": ' + json.dumps(cats) + ', "images": [')
        for images, _ in parts():
            for image in images:
                f.write(("" if num_images == 0 else ", ") + json.dumps(image))
                num_images += 1
        f.write('], "annotations": [')
        for _, part_annotations in parts():
            for annotation in part_annotations:
                count += 1
                f.write(("" if count == 1 else ", ") + json.dumps({"id": count, **annotation}))
        f.write('], "info": ' + json.dumps(info() if callable(info) else info) + "}\n")
    return num_images, count


def save_coco(instances: Sequence[Instances], images: Sequence[Any], path: str | os.PathLike,
              classes: Sequence[str] | None = None, category_ids: Sequence[int] | None = None) -> Path:
    """Write `instances` (from `model.predict_images(images)`) of `images` as a COCO instances json
    at `path`. Image i gets id i + 1; a path image is named as `relative_name` says, an in-memory
    image "image_<id>.png" (no such file: write it there to make the json readable as a data set).
    `classes`: the model's class names (default class_0..); category ids default to 1..C."""
    path = Path(path)
    if len(instances) != len(images):
        raise ValueError(f"{len(instances)} instance sets for {len(images)} images")
    num_classes = 1 + max((int(i.labels.max()) for i in instances if len(i)), default=-1)
    classes = list(classes) if classes is not None else [f"class_{c}" for c in range(max(num_classes, 1))]
    category_ids = list(range(1, len(classes) + 1)) if category_ids is None else [int(c) for c in category_ids]
    entries, annotations = [], []
    for image_id, (inst, image) in enumerate(zip(instances, images), start=1):
        height, width = (int(s) for s in inst.masks.shape[-2:])
        if isinstance(image, (str, os.PathLike)):
            name = relative_name(image, path.parent)
        else:
            name = f"image_{image_id}.png"
            if isinstance(image, np.ndarray) and image.shape[:2] != (height, width):
                raise ValueError(f"image {image_id} is {image.shape[:2]} but its masks are {(height, width)}")
        entries.append(image_entry(image_id, name, height, width))
        annotations += instance_annotations(inst, image_id, category_ids)
    write_instances_json(path, {"description": DESCRIPTION}, categories(classes, category_ids),
                         lambda: [(entries, annotations)])
    return path
