"""What `--source` names, as image records with ids: one image file, a folder of images (searched
recursively, `cast.data.dataset.IMAGE_EXTENSIONS`) or a COCO json (its images, ids kept).

A folder is listed, not opened: image i (1..N, by path relative to the folder, as
`cast.data.folder.read_image_folder` numbers them) is decoded only when it is predicted, so
listing 100 000 images costs a directory scan. Files that turn out to be no image or truncated
are skipped and counted where they are decoded (or stop the command with `--strict`).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cast.data.dataset import IMAGE_EXTENSIONS, ImageRecord, check_image_path
from cast.data.errors import DataError, MissingFileError


@dataclass(frozen=True)
class ImageSource:
    """The images a command runs on, sorted by id, and the category ids of the model's classes."""

    path: Path
    kind: str  # "image", "folder" or "coco"
    records: tuple[ImageRecord, ...]
    category_ids: list[int]
    # Problems found while listing (a COCO json's missing images, without --strict): "path: problem".
    skipped: list[str] = field(default_factory=list)
    category_names: list[str] = field(default_factory=list)  # a COCO json's own categories, by id

    def __len__(self) -> int:
        return len(self.records)


def open_source(path: str | os.PathLike, classes: Sequence[str], strict: bool = False,
                exclude: str | os.PathLike | None = None) -> ImageSource:
    """The images at `path` for a model with `classes`.

    A COCO json keeps its image ids and, when its categories name every one of `classes`, their
    ids (so that the predictions score against it); otherwise categories are 1..C in `classes`'
    order. `exclude`: a folder whose files are never taken (the command's own overlays).
    Raises `DataError` (naming the path) when there is nothing to predict on.
    """
    path = Path(path)
    default_ids = list(range(1, len(classes) + 1))
    if path.is_dir():
        from cast.data.folder import list_image_files

        files = list_image_files(path, recursive=True, exclude=exclude)
        records = tuple(ImageRecord(i, p, p.relative_to(path).as_posix()) for i, p in enumerate(files, start=1))
        return ImageSource(path, "folder", records, default_ids)
    if not path.exists():
        raise MissingFileError(path, "no such image, folder or COCO json")
    if path.suffix.lower() == ".json":
        return _coco_source(path, classes, strict)
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise DataError(path, f"not an image ({', '.join(IMAGE_EXTENSIONS)}), a folder of images or a COCO json")
    check_image_path(path)
    return ImageSource(path, "image", (ImageRecord(1, path, path.name),), default_ids)


def _coco_source(path: Path, classes: Sequence[str], strict: bool) -> ImageSource:
    import warnings

    from cast.data.coco import read_coco
    from cast.data.errors import DataWarning

    with warnings.catch_warnings():
        # Without --strict, images the json names but that cannot be found are counted below, not
        # warned about one by one; problems of its annotations do not matter for prediction.
        warnings.simplefilter("ignore", DataWarning)
        dataset = read_coco(path, lenient=not strict, progress=False)
    skipped = [w for w in dataset.report.warnings if w.startswith(f"{path}: image")]
    if not len(dataset):
        raise DataError(path, "no readable image in the json's 'images'")
    by_name = dict(zip(dataset.classes, dataset.category_ids))
    if all(name in by_name for name in classes):
        category_ids = [by_name[name] for name in classes]
    else:
        category_ids = list(range(1, len(classes) + 1))
        missing = [name for name in classes if name not in by_name]
        print(f"note: {path}: its categories do not name the model's classes {missing}; "
              f"predictions use category ids 1..{len(classes)} in the model's order", file=sys.stderr)
    records = tuple(sorted(dataset.records, key=lambda r: r.image_id))
    return ImageSource(path, "coco", records, category_ids, skipped, list(dataset.classes))
