"""The data of one run: train and val read by kind, the labeled / unlabeled split drawn (or
reused) and saved with the run, the demo set generated when it is missing."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cast.config import CastConfig
from cast.data.dataset import InstanceDataset, UnlabeledImages
from cast.data.registry import read_train_val
from cast.data.splits import apply_split, load_split, make_split, save_split
from cast.utils.cache import require_same_settings
from cast.utils.distributed import DistContext, barrier


@dataclass
class RunData:
    classes: list[str]
    category_ids: list[int]
    labeled: InstanceDataset
    unlabeled: UnlabeledImages
    val: InstanceDataset
    split: dict[str, Any]


def ensure_demo_data(cfg: CastConfig, ctx: DistContext = DistContext()) -> None:
    """Generate the demo data set when it is missing (rank 0; the others wait)."""
    if cfg.data.kind != "demo":
        return
    if ctx.is_main:
        from cast.data.demo import generate

        d = cfg.data.demo
        # Runs started together (seeds in parallel) draw the set once; the others wait, then keep it.
        generate(cfg.data.root, seed=d.seed, image_size=d.image_size, num_source_train=d.num_source_train,
                 num_target_train=d.num_target_train, num_target_val=d.num_target_val, max_objects=d.max_objects)
    barrier()


def prepare_data(cfg: CastConfig, split_path: str | Path, ctx: DistContext = DistContext()) -> RunData:
    """Read train / val, then draw the labeled / unlabeled split (or reuse the run's split.json,
    or `data.split_file`) and save it at `split_path`."""
    ensure_demo_data(cfg, ctx)
    train, val = read_train_val(cfg.data.kind, cfg.data.root, cfg.data.max_val_images)
    split_path = Path(split_path)
    if split_path.is_file():
        split = load_split(split_path)
        require_same_settings({"labeled_fraction": split["labeled_fraction"]},
                              {"labeled_fraction": cfg.data.labeled_fraction}, split_path, "drawn")
    elif cfg.data.split_file is not None:
        split = load_split(cfg.data.split_file)
    else:
        split = make_split(train.image_ids, cfg.data.labeled_fraction, cfg.shared_seed)
    labeled, unlabeled = apply_split(train, split)
    if ctx.is_main and not split_path.is_file():
        save_split(split, split_path)
    return RunData(train.classes, train.category_ids, labeled, unlabeled, val, split)
