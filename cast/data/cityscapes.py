"""Cityscapes fine annotations (gtFine) as an instance-segmentation data set.

Layout, as distributed:
    root/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    root/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_instanceIds.png

In an instanceIds PNG (16- or 32-bit), a value >= 1000 is one object: label id = value // 1000,
instance = value % 1000. A value < 1000 is a label id whose pixels carry no instance: stuff, or a
*group* of things (e.g. a crowd of people). Group regions of the evaluated thing classes become
crowd regions (`InstanceSample.ignore`); `caravan` and `trailer` instances, which the official
evaluation leaves out, are background here.

Classes are the 8 evaluated thing classes; `category_ids` are their Cityscapes label ids. Image
ids are 1..N in sorted path order; `file_name` is the image path relative to `root`, which the
official evaluation needs to find the matching ground truth.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cast.data.dataset import ImageRecord, InstanceDataset, Target, make_target, require_dir
from cast.data.errors import DataError, LoadReport

# The labels with instances that the official evaluation scores (cityscapesscripts' label table:
# hasInstances and not ignoreInEval), and their label ids.
CITYSCAPES_THING_CLASSES = ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
CITYSCAPES_THING_IDS = (24, 25, 26, 27, 28, 31, 32, 33)
SPLITS = ("train", "val", "test", "train_extra")
IMAGE_SUFFIX = "_leftImg8bit.png"
GT_SUFFIX = "_gtFine_instanceIds.png"


def gt_path(root: Path, image_path: Path) -> Path:
    """The gtFine instanceIds file that belongs to a leftImg8bit image."""
    relative = image_path.relative_to(root / "leftImg8bit")
    return root / "gtFine" / relative.parent / (image_path.name[: -len(IMAGE_SUFFIX)] + GT_SUFFIX)


class CityscapesInstances:
    """`TargetSource` reading gtFine instanceIds PNGs, keyed by image id."""

    def __init__(self, gt_paths: dict[int, Path]) -> None:
        self._gt_paths = gt_paths
        self._label_of = {label_id: i for i, label_id in enumerate(CITYSCAPES_THING_IDS)}

    def decode(self, record: ImageRecord) -> Target:
        path = self._gt_paths[record.image_id]
        try:
            with Image.open(path) as image:
                ids = np.asarray(image)
        except FileNotFoundError:
            raise DataError(path, "instanceIds file not found") from None
        except Image.DecompressionBombError as e:  # a header claiming billions of pixels; no OSError
            raise DataError(path, f"instanceIds PNG too large to decode safely: {e}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DataError(path, f"unreadable instanceIds PNG ({type(e).__name__}: {e})") from None
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise DataError(path, f"expected a single-channel integer PNG, got shape {ids.shape} {ids.dtype}")
        masks, labels, crowd_masks, crowd_labels = [], [], [], []
        for value in np.unique(ids):  # sorted: instance order is deterministic
            label_id = int(value) // 1000 if value >= 1000 else int(value)
            if label_id not in self._label_of:
                continue
            is_instance = value >= 1000
            (masks if is_instance else crowd_masks).append(ids == value)
            (labels if is_instance else crowd_labels).append(self._label_of[label_id])
        return make_target(masks, labels, crowd_masks, crowd_labels, ids.shape[0], ids.shape[1])


def read_cityscapes(root: str | os.PathLike, split: str = "train", lenient: bool = False) -> InstanceDataset:
    """The Cityscapes `split` under `root` with gtFine instance annotations.

    An image without its instanceIds file raises `DataError` naming both (with `lenient=True`
    it is skipped and counted in the data set's `report`).
    """
    root = Path(root)
    if split not in SPLITS:
        raise ValueError(f"{root}: unknown Cityscapes split {split!r}; expected one of {', '.join(SPLITS)}")
    image_dir = require_dir(root / "leftImg8bit" / split, f"Cityscapes images <city>/*{IMAGE_SUFFIX}")
    require_dir(root / "gtFine" / split, f"Cityscapes annotations <city>/*{GT_SUFFIX}")
    images = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
    if not images:
        raise DataError(image_dir, f"no <city>/*{IMAGE_SUFFIX} images")
    report = LoadReport(source=str(root), lenient=lenient)
    records, gt_paths = [], {}
    # Ids count every image found, so skipping one (lenient) does not renumber the others.
    for image_id, image_path in enumerate(images, start=1):
        gt = gt_path(root, image_path)
        if not gt.is_file():
            report.problem("missing_annotation", f"instanceIds file {gt} not found for image {image_path.name}",
                           path=image_path)
            continue
        records.append(ImageRecord(image_id, image_path, image_path.relative_to(root).as_posix()))
        gt_paths[image_id] = gt
    return InstanceDataset(records, CITYSCAPES_THING_CLASSES, CITYSCAPES_THING_IDS, CityscapesInstances(gt_paths),
                           report)
