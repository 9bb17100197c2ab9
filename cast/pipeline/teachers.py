"""Where a run's teacher comes from: theta_T^0 (the zero-shot teacher every teacher stage starts
from) for each `teacher.kind`.

Foundation-model teachers are read from local hub folders (cast.teachers.hub). No such weights
can be downloaded on the project's CPU machines, so the demo's theta_T^0 is a stand-in: a large
preset of the project's own model ("demo-teacher") trained by our own trainer on the demo's
SOURCE domain (fully labeled), then used on the target domain without adaptation, which is what
a foundation model does on a new domain. It is cached under
<cache_dir>/standin-<preset>-<key>/, the key hashing everything that determines it (its
configuration, the source annotations' content and the seed), and trained like any stage (reuse_or_train), so a
second run, or another run name, reuses it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

import cast
from cast.config import CastConfig
from cast.data.prepare import ensure_demo_data
from cast.data.registry import read_dataset
from cast.models.auto import load_model
from cast.models.student import build_student
from cast.pipeline.stages import reuse_or_train, stage_seed, stage_spec
from cast.structures import InstanceSample
from cast.utils.cache import file_digest, json_digest
from cast.utils.distributed import DistContext, barrier, init_distributed
from cast.utils.folder_lock import shared_folder


def standin_dir(cfg: CastConfig, classes: Sequence[str]) -> Path:
    """The stand-in's cache folder: one per combination of what determines it."""
    identity = {"preset": cfg.teacher.preset, "overrides": cfg.teacher.preset_overrides,
                "embedding_stride": cfg.losses.embedding_stride,
                "train": dataclasses.asdict(cfg.teacher.pretrain.train),
                # What is in the source folder, not where it is: a moved or copied data folder keeps its
                # stand-in, and the demo's target counts (which leave the source images as they are) too.
                "source": file_digest(Path(cfg.data.root) / cfg.teacher.pretrain.source / "annotations.json"),
                "crop_size": cfg.data.crop_size, "batch_size": cfg.data.batch_size, "seed": cfg.shared_seed,
                "classes": list(classes), "code_version": cast.__version__}
    return Path(cfg.teacher.pretrain.cache_dir) / f"standin-{cfg.teacher.preset}-{json_digest(identity)[:16]}"


def pretrain_standin(cfg: CastConfig, source: Sequence[InstanceSample], classes: Sequence[str],
                     ctx: DistContext = DistContext()) -> Path:
    """Train the stand-in teacher on the source domain unless the cache holds it; its model folder."""
    folder = standin_dir(cfg, classes)

    def untrained() -> torch.nn.Module:
        torch.manual_seed(stage_seed(cfg, "teacher_pretrain"))
        return build_student(cfg.teacher.preset, len(classes), list(classes),
                             projection_stride=cfg.losses.embedding_stride, **cfg.teacher.preset_overrides)

    # Runs sharing the cache wait for the one that trains it, then reuse its result.
    with shared_folder(folder, ctx, "stand-in teacher cache"):
        spec = stage_spec("teacher_pretrain", cfg, train=cfg.teacher.pretrain.train)
        reuse_or_train(spec, folder, untrained, cfg, source, None, ctx)
    barrier()
    return folder / "model"


def pretrain_teacher(cfg: CastConfig, ctx: DistContext | None = None) -> Path:
    """`python -m cast pretrain-teacher`: the stand-in teacher's model folder (trained when missing;
    `ctx` None: this process on cfg.device)."""
    ctx = ctx or init_distributed(cfg.device)
    if cfg.teacher.kind != "standin":
        raise ValueError(f"teacher.kind={cfg.teacher.kind!r}: only the stand-in teacher is pretrained here "
                         "(a foundation-model teacher comes pretrained)")
    ensure_demo_data(cfg, ctx)
    source = read_dataset("coco", cfg.data.root, cfg.teacher.pretrain.source)
    return pretrain_standin(cfg, source, source.classes, ctx)


class TeacherSource:
    """theta_T^0 of the run, loaded afresh whenever a stage starts from it."""

    def __init__(self, cfg: CastConfig, classes: Sequence[str], ctx: DistContext = DistContext()) -> None:
        self.cfg, self.classes = cfg, list(classes)
        self.standin: Path | None = None  # the stand-in's model folder
        if cfg.teacher.kind == "standin":
            source = read_dataset("coco", cfg.data.root, cfg.teacher.pretrain.source)
            if source.classes != self.classes:
                raise ValueError(f"{cfg.data.root}/{cfg.teacher.pretrain.source}: classes {source.classes} differ "
                                 f"from the target data's {self.classes}")
            self.standin = pretrain_standin(cfg, source, self.classes, ctx)

    @property
    def pretrain_dir(self) -> Path | None:
        """The stand-in's pretraining stage folder (its summary holds the wall time), if any."""
        return self.standin.parent if self.standin is not None else None

    def zero_shot(self) -> torch.nn.Module:
        if self.standin is not None:
            model = load_model(self.standin)
            if self.cfg.teacher.freeze_encoder:
                model.freeze_encoder()
            return model
        from cast.teachers.hub import zero_shot_teacher

        return zero_shot_teacher(self.cfg.teacher, self.classes, self.cfg.losses.embedding_stride)
