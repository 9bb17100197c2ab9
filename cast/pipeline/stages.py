"""The four CAST settings of the unified objective, and the one function that reuses a finished
stage or trains it.

| stage                  | model              | data               | (lambda_semi, lambda_pxl) |
| teacher_adaptation     | teacher, theta_T^0 | D_l                | (0, lambda_pxl)           |
| teacher_self_training  | teacher, theta_T^0 | D_l + pseudo D_u   | (1, lambda_pxl)           |
| knowledge_transfer     | student            | D_l + pseudo D_u   | (lambda_semi, lambda_pxl) |
| student_refinement     | student from 2     | D_l                | (0, 0)                    |
| student_supervised     | student            | D_l (baseline)     | (0, 0)                    |

A stage's `StageSpec` (objective, budget, seed, whether it reads D_u) is computed once by
`stage_spec`; its settings (what the result is a function of) are recorded in summary.json
(`cast.utils.cache.Record`) and in every checkpoint, and a stage is reused or resumed only under
the same settings.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cast.config import CastConfig, TrainConfig
from cast.data.batches import InstanceTorchDataset, WeakStrongViews, collate_instances
from cast.data.dataset import image_ids_of
from cast.models.auto import load_model
from cast.models.protocol import weights_hash
from cast.structures import InstanceSample
from cast.training.objective import Objective
from cast.training.trainer import TrainData, Trainer, build_contrastive
from cast.utils.cache import Record, as_json, json_digest
from cast.utils.distributed import DistContext
from cast.utils.machine import machine_info

# Offsets that give every stage its own data order and initialisation from the one run seed.
STAGE_SEEDS = {"teacher_pretrain": 11, "teacher_adaptation": 101, "teacher_self_training": 202,
               "knowledge_transfer": 303, "student_refinement": 404, "student_supervised": 505}
SUMMARY = "summary.json"
# Train settings that change how a stage is saved or logged, not what it learns.
BOOKKEEPING = ("checkpoint_every", "log_every", "eval_every")


def stage_objective(stage: str, cfg: CastConfig) -> Objective:
    """(lambda_semi, lambda_pxl) of a stage, as the method defines it."""
    lo = cfg.losses
    return {"teacher_adaptation": Objective(0.0, lo.lambda_pxl),
            "teacher_self_training": Objective(1.0, lo.lambda_pxl),
            "knowledge_transfer": Objective(lo.lambda_semi, lo.lambda_pxl),
            "student_refinement": Objective(0.0, 0.0),
            "student_supervised": Objective(0.0, 0.0),
            "teacher_pretrain": Objective(0.0, 0.0)}[stage]


# Stages the seeds of one study share (their seed is cfg.shared_seed).
TEACHER_STAGES = ("teacher_pretrain", "teacher_adaptation", "teacher_self_training")


def stage_seed(cfg: CastConfig, stage: str) -> int:
    return (cfg.shared_seed if stage in TEACHER_STAGES else cfg.seed) * 1000 + STAGE_SEEDS.get(stage, 999)


@dataclass(frozen=True)
class StageSpec:
    """How one stage trains: its objective, budget and seed, and whether it reads D_u."""

    stage: str
    objective: Objective
    train: TrainConfig
    seed: int
    uses_unlabeled: bool


def stage_spec(stage: str, cfg: CastConfig, unlabeled: Sequence[InstanceSample] | None = None, *,
               objective: Objective | None = None, train: TrainConfig | None = None) -> StageSpec:
    """The spec of `stage` (an ablation variant passes its own objective; the stand-in teacher's
    pretraining its own budget)."""
    goal = objective or stage_objective(stage, cfg)
    return StageSpec(stage=stage, objective=goal, train=train or cfg.stage(stage), seed=stage_seed(cfg, stage),
                     uses_unlabeled=bool(unlabeled) and goal.reads_unlabeled)


def stage_settings(spec: StageSpec, model: torch.nn.Module, cfg: CastConfig, labeled: Sequence[InstanceSample],
                   unlabeled: Sequence[InstanceSample] | None) -> dict[str, Any]:
    """What a stage's result is a function of: its starting weights, its data (pseudo-labels
    included), its hyper-parameters and seed."""
    d = cfg.data
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    settings = {
        "stage": spec.stage, "seed": spec.seed, "objective": dataclasses.asdict(spec.objective),
        "train": {k: v for k, v in dataclasses.asdict(spec.train).items() if k not in BOOKKEEPING},
        "batches": {"crop_size": list(d.crop_size), "batch_size": d.batch_size,
                    "unlabeled_batch_size": d.unlabeled_batch_size if spec.uses_unlabeled else None},
        "losses": dataclasses.asdict(cfg.losses) if spec.objective.lambda_pxl > 0 else None,
        "initial_weights": weights_hash(model),
        "frozen_parameters": json_digest(frozen) if frozen else None,
        "labeled_images": json_digest(image_ids_of(labeled)),
        "unlabeled_images": json_digest([image_ids_of(unlabeled), getattr(unlabeled, "digest", None)])
        if spec.uses_unlabeled else None,
    }
    return as_json(settings)


def train_stage(spec: StageSpec, model: torch.nn.Module, cfg: CastConfig, labeled: Sequence[InstanceSample],
                unlabeled: Sequence[InstanceSample] | None, stage_dir: str | Path, ctx: DistContext = DistContext(),
                evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
                settings: dict[str, Any] | None = None) -> torch.nn.Module:
    """Train `model` on one setting of the objective into `stage_dir` (resuming when possible);
    records summary.json (settings, steps, wall time and the machine it was measured on) when done."""
    if not labeled:
        raise ValueError(f"stage {spec.stage}: no labeled images")
    if settings is None:
        settings = stage_settings(spec, model, cfg, labeled, unlabeled)
    with_pxl = spec.objective.lambda_pxl > 0
    views = WeakStrongViews(crop_size=tuple(cfg.data.crop_size), strong=with_pxl)
    data = TrainData(labeled=InstanceTorchDataset(labeled, views, spec.seed), labeled_batch_size=cfg.data.batch_size,
                     collate_fn=collate_instances,
                     unlabeled=InstanceTorchDataset(unlabeled, views, spec.seed + 1) if spec.uses_unlabeled else None,
                     unlabeled_batch_size=cfg.data.unlabeled_batch_size, num_workers=cfg.data.num_workers)
    trainer = Trainer(model, spec.stage, spec.train, spec.objective, data, stage_dir, ctx, spec.seed,
                      contrastive=build_contrastive(cfg.losses) if with_pxl else None, evaluate=evaluate,
                      settings=settings)
    machine, start = machine_info(ctx.device), time.perf_counter()
    model = trainer.fit()
    if ctx.is_main:
        # wall_s: this call only (a resumed stage does not count the interrupted run's time), on `machine`.
        Record(Path(stage_dir) / SUMMARY).write(
            settings, stage=spec.stage, steps=spec.train.steps, wall_s=time.perf_counter() - start, machine=machine,
            lambda_semi=spec.objective.lambda_semi, lambda_pxl=spec.objective.lambda_pxl, num_labeled=len(labeled),
            num_unlabeled=len(unlabeled) if spec.uses_unlabeled else 0)
    return model


def read_summary(stage_dir: str | Path) -> dict | None:
    """A finished stage's summary.json, or None."""
    return Record(Path(stage_dir) / SUMMARY).read()


def stage_complete(stage_dir: str | Path, settings: dict[str, Any]) -> bool:
    """A stage is done when its summary and its final model folder exist; one finished under other
    settings raises SettingsChangedError rather than being reused."""
    stage_dir = Path(stage_dir)
    return ((stage_dir / "model" / "config.json").is_file()
            and Record(stage_dir / SUMMARY).require(settings, stage_dir, "finished"))


def reuse_or_train(spec: StageSpec, stage_dir: str | Path, make_model: Callable[[], torch.nn.Module],
                   cfg: CastConfig, labeled: Sequence[InstanceSample], unlabeled: Sequence[InstanceSample] | None,
                   ctx: DistContext = DistContext(),
                   evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None
                   ) -> tuple[torch.nn.Module, bool]:
    """(the stage's trained model, whether it was trained now): loaded when the stage is complete
    under these settings, else trained (or resumed from its last checkpoint)."""
    model = make_model()
    settings = stage_settings(spec, model, cfg, labeled, unlabeled)
    if stage_complete(stage_dir, settings):
        del model  # the starting point only served the settings; free it before loading the result
        return load_model(Path(stage_dir) / "model"), False
    return train_stage(spec, model, cfg, labeled, unlabeled, stage_dir, ctx, evaluate, settings), True
