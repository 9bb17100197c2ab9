"""The data kinds a run can read, in one table: each kind's train and val split names below
`data.root`, and how one split is read."""
from __future__ import annotations

from pathlib import Path

from cast.data.dataset import InstanceDataset

# Train / val folders (or split names) of each data kind, below data.root.
DATA_SPLITS = {"demo": ("target_train", "target_val"), "coco": ("train", "val"),
               "cityscapes": ("train", "val"), "ade20k": ("training", "validation")}
DATA_KINDS = tuple(DATA_SPLITS)


def read_dataset(kind: str, root: str | Path, split: str) -> InstanceDataset:
    """One split of a data set of `kind` (demo and coco: <root>/<split>/annotations.json)."""
    if kind not in DATA_SPLITS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {', '.join(DATA_KINDS)}")
    root = Path(root)
    if kind in ("demo", "coco"):
        from cast.data.coco import read_coco

        return read_coco(root / split / "annotations.json", progress=False)
    if kind == "cityscapes":
        from cast.data.cityscapes import read_cityscapes

        return read_cityscapes(root, split)
    from cast.data.ade20k import read_ade20k_instances

    return read_ade20k_instances(root, split)


def read_train_val(kind: str, root: str | Path,
                   max_val_images: int | None = None) -> tuple[InstanceDataset, InstanceDataset]:
    """(train, val) of a data set, val capped at its first `max_val_images`; both must name the
    same classes."""
    train_split, val_split = DATA_SPLITS[kind]
    train, val = read_dataset(kind, root, train_split), read_dataset(kind, root, val_split)
    if train.classes != val.classes:
        raise ValueError(f"{root}: {train_split} and {val_split} have different classes "
                         f"({train.classes} vs {val.classes})")
    if max_val_images is not None:
        val = val.subset(val.image_ids[:max_val_images])
    return train, val
