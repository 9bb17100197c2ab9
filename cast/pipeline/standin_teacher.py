"""The demo's stand-in for the foundation-model teacher.

No VFM weights can be downloaded here, so the demo's zero-shot teacher theta_T^0 is a large
preset of the project's own model ("demo-teacher") trained by our own trainer on the demo's
SOURCE domain (fully labeled), then used on the target domain without adaptation, which is
what a foundation model does on a new domain. It is cached under
<cache_dir>/standin-<preset>-<key>/ where the key hashes everything that determines it (its
configuration, the source data and the seed): training is reproducible from the seed, and a
second run, or another run name, reuses it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch

import cast
from cast.config import CastConfig
from cast.models.student import CastStudent, build_student
from cast.pipeline.stages import objective, stage_complete, stage_seed, train_stage
from cast.structures import InstanceSample
from cast.training.distributed import DistContext, barrier
from cast.utils.folder_lock import exclusive_folder


def cache_key(cfg: CastConfig, classes: Sequence[str]) -> str:
    """Hash of what determines the pretrained teacher."""
    identity = {"preset": cfg.teacher.preset, "overrides": cfg.teacher.preset_overrides,
                "embedding_stride": cfg.losses.embedding_stride,
                "train": dataclasses.asdict(cfg.teacher.pretrain.train), "source": cfg.teacher.pretrain.source,
                "data_root": str(Path(cfg.data.root).resolve()), "demo": dataclasses.asdict(cfg.data.demo),
                "crop_size": cfg.data.crop_size, "batch_size": cfg.data.batch_size, "seed": cfg.seed,
                "classes": list(classes), "code_version": cast.__version__}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir(cfg: CastConfig, classes: Sequence[str]) -> Path:
    return Path(cfg.teacher.pretrain.cache_dir) / f"standin-{cfg.teacher.preset}-{cache_key(cfg, classes)}"


def new_teacher(cfg: CastConfig, classes: Sequence[str]) -> CastStudent:
    """The untrained stand-in teacher, initialised from the run seed."""
    torch.manual_seed(stage_seed(cfg, "teacher_pretrain"))
    return build_student(cfg.teacher.preset, len(classes), list(classes),
                         projection_stride=cfg.losses.embedding_stride, **cfg.teacher.preset_overrides)


def pretrain_standin_teacher(cfg: CastConfig, source: Sequence[InstanceSample], classes: Sequence[str],
                             ctx: DistContext = DistContext()) -> Path:
    """Train the stand-in teacher on the source domain unless the cache holds it; its model folder."""
    folder = cache_dir(cfg, classes)
    # Runs sharing the cache wait for the one that trains it, then reuse its result.
    with exclusive_folder(folder, enabled=ctx.is_main, label="stand-in teacher cache", wait=True):
        barrier()  # the other ranks decide only once rank 0 holds the cache
        if not stage_complete(folder):
            train_stage("teacher_pretrain", new_teacher(cfg, classes), cfg, objective("teacher_pretrain", cfg),
                        source, None, folder, ctx, train_cfg=cfg.teacher.pretrain.train)
    barrier()
    return folder / "model"


def load_standin_teacher(model_dir: str | Path) -> CastStudent:
    """theta_T^0: the pretrained stand-in teacher, freshly loaded (so every stage starts from it)."""
    return CastStudent.from_pretrained(model_dir)
