"""A folder of images without annotations (e.g. extra unlabeled data for the semi-supervised
stages, or the images `python -m cast predict` / `label` run on)."""
from __future__ import annotations

import os
from pathlib import Path

from tqdm import tqdm

from cast.data.dataset import IMAGE_EXTENSIONS, ImageRecord, UnlabeledImages, probe_image, require_dir
from cast.data.errors import DataError, LoadReport


def list_image_files(root: str | os.PathLike, recursive: bool = True,
                     exclude: str | os.PathLike | None = None) -> list[Path]:
    """The image files under `root` (extensions `IMAGE_EXTENSIONS`, any case), sorted by their path
    relative to `root`; hidden files and folders (names starting with ".") and anything under
    `exclude` (e.g. an output folder inside `root`) are left out. `DataError` when none is found."""
    root = require_dir(root, "image files")
    excluded = Path(exclude).resolve() if exclude is not None else None
    candidates = root.rglob("*") if recursive else root.iterdir()
    files = sorted((p for p in candidates
                    if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(root).parts)
                    and (excluded is None or not p.resolve().is_relative_to(excluded))),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise DataError(root, f"no images ({', '.join(IMAGE_EXTENSIONS)}) found"
                              f"{' in it or its subfolders' if recursive else ''}")
    return files


def read_image_folder(root: str | os.PathLike, recursive: bool = True, lenient: bool = False,
                      classes: list[str] | None = None, category_ids: list[int] | None = None,
                      progress: bool = True) -> UnlabeledImages:
    """Every image file under `root` (see `list_image_files`), as unlabeled samples.

    Files are numbered 1..N in the order of `list_image_files` (their path relative to `root` is
    their `file_name`), so the same folder always gives the same ids. Each file's header is read
    now: one that is no image raises `DataError` (with `lenient=True` it is skipped and counted in
    `report`). `classes` and `category_ids` name the label space that predictions on these images
    will use (default: none).
    """
    root = Path(root)
    files = list_image_files(root, recursive)
    report = LoadReport(source=str(root), lenient=lenient)
    records = []
    # Ids count every file found, so skipping one (lenient) does not renumber the others.
    for image_id, path in enumerate(tqdm(files, desc=f"scan {root.name}", unit="img", disable=not progress), start=1):
        try:
            probe_image(path)
        except DataError as e:
            report.problem("unreadable_image", e.problem, path=path)
            continue
        records.append(ImageRecord(image_id, path, path.relative_to(root).as_posix()))
    classes = list(classes or [])
    category_ids = list(range(1, len(classes) + 1)) if category_ids is None else category_ids
    return UnlabeledImages(records, classes, category_ids, report)
