"""ADE20K instance track (the 100 thing classes of the ADE20K challenge's instance segmentation).

Two ways to read it:
- `read_ade20k_instances`: the released layout
      root/images/<split>/*.jpg
      root/annotations_instance/<split>/*.png    R = category (1..100, 0 = no object), G = instance
  Each distinct (category, instance) pair with category > 0 is one object. Image ids are 1..N in
  sorted file-name order; `file_name` is relative to ``root/images/<split>``.
- `read_ade20k_coco`: a COCO-json conversion, ``root/ade20k_instance_{train,val}.json`` with
  images under ``root/images/<split>`` (the layout Mask2Former's conversion writes), via
  `read_coco`; `export_ade20k_coco` writes such a json from the PNG annotations.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cast.data.coco import read_coco, write_coco
from cast.data.dataset import ImageRecord, InstanceDataset, Target, make_target, require_dir
from cast.data.errors import DataError, LoadReport

# Category 1..100 of the instance track, in order (the thing classes of ADE20K's 150-class benchmark).
ADE20K_INSTANCE_CLASSES = (
    "bed", "windowpane", "cabinet", "person", "door", "table", "curtain", "chair", "car", "painting",
    "sofa", "shelf", "mirror", "armchair", "seat", "fence", "desk", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "box", "column", "signboard", "chest of drawers", "counter", "sink", "fireplace",
    "refrigerator", "stairs", "case", "pool table", "pillow", "screen door", "bookcase", "coffee table",
    "toilet", "flower", "book", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "arcade machine", "bus", "towel", "light", "truck", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "apparel", "pole", "bannister", "ottoman",
    "bottle", "van", "ship", "fountain", "washer", "plaything", "stool", "barrel", "basket", "bag",
    "minibike", "oven", "ball", "food", "step", "trade name", "microwave", "pot", "animal", "bicycle",
    "dishwasher", "screen", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "plate", "monitor", "bulletin board", "radiator", "glass", "clock", "flag",
)
ADE20K_INSTANCE_IDS = tuple(range(1, len(ADE20K_INSTANCE_CLASSES) + 1))
SPLITS = ("training", "validation")
_COCO_JSON = {"training": "ade20k_instance_train.json", "validation": "ade20k_instance_val.json"}


def _check_split(root: Path, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"{root}: unknown ADE20K split {split!r}; expected one of {', '.join(SPLITS)}")


class Ade20kInstances:
    """`TargetSource` reading instance-track PNGs (R = category, G = instance), keyed by image id."""

    def __init__(self, annotation_paths: dict[int, Path]) -> None:
        self._paths = annotation_paths

    def decode(self, record: ImageRecord) -> Target:
        path = self._paths[record.image_id]
        try:
            with Image.open(path) as image:
                if image.mode not in ("RGB", "RGBA"):
                    raise DataError(path, f"expected an RGB instance PNG, got mode {image.mode}")
                pixels = np.asarray(image)
        except FileNotFoundError:
            raise DataError(path, "instance annotation file not found") from None
        except Image.DecompressionBombError as e:  # a header claiming billions of pixels; no OSError
            raise DataError(path, f"instance PNG too large to decode safely: {e}") from None
        except DataError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DataError(path, f"unreadable instance PNG ({type(e).__name__}: {e})") from None
        category = pixels[..., 0].astype(np.int32)
        if category.max() > len(ADE20K_INSTANCE_CLASSES):
            raise DataError(path, f"category value {category.max()} in the R channel; the instance track "
                                  f"has categories 1..{len(ADE20K_INSTANCE_CLASSES)}")
        # One id per (category, instance) pair; 0 = no object.
        key = np.where(category > 0, category * 256 + pixels[..., 1], 0)
        masks, labels = [], []
        for value in np.unique(key):
            if value > 0:
                masks.append(key == value)
                labels.append(int(value) // 256 - 1)
        return make_target(masks, labels, [], [], key.shape[0], key.shape[1])


def read_ade20k_instances(root: str | os.PathLike, split: str = "training", lenient: bool = False) -> InstanceDataset:
    """The instance-track `split` ("training" / "validation") from its image and PNG annotation folders.

    An image without its annotation PNG raises `DataError` naming both (with `lenient=True` it is
    skipped and counted in the data set's `report`).
    """
    root = Path(root)
    _check_split(root, split)
    image_dir = require_dir(root / "images" / split, "ADE20K images *.jpg")
    annotation_dir = require_dir(root / "annotations_instance" / split, "ADE20K instance annotations *.png")
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if not images:
        raise DataError(image_dir, "no *.jpg images")
    report = LoadReport(source=str(root), lenient=lenient)
    records, annotation_paths = [], {}
    # Ids count every image found, so skipping one (lenient) does not renumber the others.
    for image_id, image_path in enumerate(images, start=1):
        annotation = annotation_dir / f"{image_path.stem}.png"
        if not annotation.is_file():
            report.problem("missing_annotation", f"annotation {annotation} not found for image {image_path.name}",
                           path=image_path)
            continue
        records.append(ImageRecord(image_id, image_path, image_path.name))
        annotation_paths[image_id] = annotation
    return InstanceDataset(records, ADE20K_INSTANCE_CLASSES, ADE20K_INSTANCE_IDS, Ade20kInstances(annotation_paths),
                           report)


def ade20k_coco_path(root: str | os.PathLike, split: str = "training") -> Path:
    """Where the COCO-json conversion of `split` lies: ``root/ade20k_instance_{train,val}.json``."""
    root = Path(root)
    _check_split(root, split)
    return root / _COCO_JSON[split]


def read_ade20k_coco(root: str | os.PathLike, split: str = "training", lenient: bool = False) -> InstanceDataset:
    """The instance-track `split` from its COCO-json conversion (categories as the json names them)."""
    return read_coco(ade20k_coco_path(root, split), image_root=Path(root) / "images" / split, lenient=lenient)


def export_ade20k_coco(root: str | os.PathLike, split: str = "training") -> Path:
    """Convert the PNG annotations of `split` to ``root/ade20k_instance_{train,val}.json``; returns its path."""
    path = ade20k_coco_path(root, split)
    write_coco(read_ade20k_instances(root, split), path)
    return path
