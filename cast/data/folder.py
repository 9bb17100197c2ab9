"""A folder of images without annotations (e.g. extra unlabeled data for the semi-supervised stages)."""
from __future__ import annotations

import os

from tqdm import tqdm

from cast.data.dataset import ImageRecord, UnlabeledImages, require_dir
from cast.data.errors import DataError, LoadReport
from cast.data.dataset import probe_image

FOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def read_image_folder(root: str | os.PathLike, recursive: bool = True, lenient: bool = False,
                      classes: list[str] | None = None, category_ids: list[int] | None = None,
                      progress: bool = True) -> UnlabeledImages:
    """Every jpg / jpeg / png / webp under `root` (any case), as unlabeled samples.

    Files are sorted by their path relative to `root` (which is their `file_name`) and numbered
    1..N in that order, so the same folder always gives the same ids. Hidden files and folders
    (names starting with ".") are left out. Each file's header is read now: one that is no image
    raises `DataError` (with `lenient=True` it is skipped and counted in `report`). `classes` and
    `category_ids` name the label space that predictions on these images will use (default: none).
    """
    root = require_dir(root, "image files")
    candidates = root.rglob("*") if recursive else root.iterdir()
    files = sorted((p for p in candidates
                    if p.suffix.lower() in FOLDER_EXTENSIONS and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(root).parts)),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise DataError(root, f"no images ({', '.join(FOLDER_EXTENSIONS)}) found"
                              f"{' in it or its subfolders' if recursive else ''}")
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
