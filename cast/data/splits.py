"""Labeled / unlabeled splits of a training set, drawn once and saved with the run.

A split is a plain dict:
    {"labeled_fraction": 0.1, "seed": 0, "labeled_image_ids": [...], "unlabeled_image_ids": [...]}
with both id lists sorted. The draw depends on the *set* of ids, the fraction and the seed only:
ids are sorted before a seeded permutation, and the first round(fraction * N) (at least 1) of
that permutation are labeled. So a smaller fraction with the same seed labels a subset of what
a larger one labels, which keeps label-fraction ablations comparable.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np

from cast.data.dataset import InstanceDataset, UnlabeledImages
from cast.data.errors import DataError, MissingFileError
from cast.utils.io import atomic_write_json, read_json

SPLIT_KEYS = ("labeled_fraction", "seed", "labeled_image_ids", "unlabeled_image_ids")


def _check_fraction(value: Any) -> float:
    if not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(value) or not 0 < value <= 1:
        raise ValueError(f"labeled_fraction must be a number in (0, 1], got {value!r}")
    return float(value)


def _check_seed(value: Any) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"seed must be a non-negative integer, got {value!r}")
    return int(value)


def _check_ids(ids: Iterable[Any], what: str) -> list[int]:
    ids = list(ids)
    if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{what} must be integers")
    ids = [int(i) for i in ids]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{what} contain duplicates")
    return ids


def make_split(image_ids: Iterable[int], labeled_fraction: float, seed: int) -> dict[str, Any]:
    """Draw which images keep their labels: deterministic in (set of ids, fraction, seed)."""
    fraction = _check_fraction(labeled_fraction)
    seed = _check_seed(seed)
    ids = sorted(_check_ids(image_ids, "image ids"))
    if not ids:
        raise ValueError("cannot split an empty list of image ids")
    order = np.random.default_rng(seed).permutation(len(ids))
    num_labeled = max(1, min(len(ids), round(fraction * len(ids))))
    labeled = sorted(ids[i] for i in order[:num_labeled])
    unlabeled = sorted(ids[i] for i in order[num_labeled:])
    return {"labeled_fraction": fraction, "seed": seed, "labeled_image_ids": labeled,
            "unlabeled_image_ids": unlabeled}


def validate_split(split: Any) -> dict[str, Any]:
    """The split with checked types; ValueError when a key is missing, ids repeat or overlap, or none is labeled."""
    if not isinstance(split, dict):
        raise ValueError(f"a split must be a json object, got {type(split).__name__}")
    missing = [k for k in SPLIT_KEYS if k not in split]
    if missing:
        raise ValueError(f"split is missing keys {missing}")
    for key in ("labeled_image_ids", "unlabeled_image_ids"):
        if not isinstance(split[key], list):  # a json file can hold anything there
            raise ValueError(f"{key} must be a list of integers, got {type(split[key]).__name__}")
    labeled = _check_ids(split["labeled_image_ids"], "labeled_image_ids")
    unlabeled = _check_ids(split["unlabeled_image_ids"], "unlabeled_image_ids")
    if not labeled:
        raise ValueError("split has no labeled image")
    overlap = sorted(set(labeled) & set(unlabeled))
    if overlap:
        raise ValueError(f"{len(overlap)} image ids are both labeled and unlabeled, e.g. {overlap[:5]}")
    return {"labeled_fraction": _check_fraction(split["labeled_fraction"]), "seed": _check_seed(split["seed"]),
            "labeled_image_ids": sorted(labeled), "unlabeled_image_ids": sorted(unlabeled)}


def save_split(split: dict[str, Any], path: str | os.PathLike) -> None:
    """Write the split as json, atomically (after validating it)."""
    try:
        split = validate_split(split)
    except ValueError as e:
        raise ValueError(f"{path}: not writing an invalid split: {e}") from None
    atomic_write_json(path, split, indent=1)


def load_split(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a split written by `save_split`; `DataError` naming the file when it is bad."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(path, "split file not found")
    try:
        data = read_json(path)
    except ValueError as e:  # read_json's message already starts with the path
        raise DataError(path, str(e).removeprefix(f"{path}: ")) from None
    try:
        return validate_split(data)
    except ValueError as e:
        raise DataError(path, str(e)) from None


def apply_split(dataset: InstanceDataset, split: dict[str, Any]) -> tuple[InstanceDataset, UnlabeledImages]:
    """(labeled images with annotations, unlabeled images without any way to their annotations).

    The split must cover exactly the data set's images; otherwise it was drawn for other data.
    """
    split = validate_split(split)
    in_split = set(split["labeled_image_ids"]) | set(split["unlabeled_image_ids"])
    in_dataset = set(dataset.image_ids)
    if in_split != in_dataset:
        extra, absent = sorted(in_split - in_dataset), sorted(in_dataset - in_split)
        raise ValueError(f"the split does not match the data set: {len(extra)} split ids are not in it "
                         f"(e.g. {extra[:5]}), {len(absent)} of its images are not in the split (e.g. {absent[:5]})")
    return dataset.subset(split["labeled_image_ids"]), dataset.subset(split["unlabeled_image_ids"]).unlabeled()
