"""The four CAST settings of the unified objective, and one function that trains any of them.

| stage                  | model            | data                 | (lambda_semi, lambda_pxl) |
| teacher_adaptation     | teacher, theta_T^0 | D_l                | (0, lambda_pxl)           |
| teacher_self_training  | teacher, theta_T^0 | D_l + pseudo D_u   | (1, lambda_pxl)           |
| knowledge_transfer     | student          | D_l + pseudo D_u     | (lambda_semi, lambda_pxl) |
| student_refinement     | student from 2   | D_l                  | (0, 0)                    |
| student_supervised     | student          | D_l (baseline)       | (0, 0)                    |
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from cast.config import CastConfig, TrainConfig
from cast.data.loader import InstanceTorchDataset, collate_instances
from cast.data.views import WeakStrongViews
from cast.pipeline.pseudo_labels import image_ids_of, json_digest, weights_hash
from cast.structures import InstanceSample
from cast.training.checkpoint import require_same_settings
from cast.training.distributed import DistContext
from cast.training.trainer import Objective, TrainData, Trainer, build_contrastive
from cast.utils.io import atomic_write_json, read_json
from cast.utils.machine import machine_info

# Offsets that give every stage its own data order and initialisation from the one run seed.
STAGE_SEEDS = {"teacher_pretrain": 11, "teacher_adaptation": 101, "teacher_self_training": 202,
               "knowledge_transfer": 303, "student_refinement": 404, "student_supervised": 505}
SUMMARY = "summary.json"
# Train settings that change how a stage is saved or logged, not what it learns.
BOOKKEEPING = ("checkpoint_every", "log_every", "eval_every")


def objective(stage: str, cfg: CastConfig) -> Objective:
    """(lambda_semi, lambda_pxl) of a stage, as the method defines it."""
    lo = cfg.losses
    return {"teacher_adaptation": Objective(0.0, lo.lambda_pxl),
            "teacher_self_training": Objective(1.0, lo.lambda_pxl),
            "knowledge_transfer": Objective(lo.lambda_semi, lo.lambda_pxl),
            "student_refinement": Objective(0.0, 0.0),
            "student_supervised": Objective(0.0, 0.0),
            "teacher_pretrain": Objective(0.0, 0.0)}[stage]


def stage_seed(cfg: CastConfig, stage: str) -> int:
    return cfg.seed * 1000 + STAGE_SEEDS.get(stage, 999)


def stage_settings(stage: str, model: torch.nn.Module, cfg: CastConfig, objective: Objective,
                   labeled: Sequence[InstanceSample], unlabeled: Sequence[InstanceSample] | None,
                   train_cfg: TrainConfig | None = None, seed: int | None = None) -> dict[str, Any]:
    """What a stage's result is a function of: its starting weights, its data (pseudo-labels
    included), its hyper-parameters and seed. A finished stage is reused, and a checkpoint
    resumed, only under the same settings."""
    train_cfg = train_cfg or cfg.stage(stage)
    with_pxl = objective.lambda_pxl > 0
    use_unlabeled = bool(unlabeled) and (objective.lambda_semi > 0 or with_pxl)
    d = cfg.data
    settings = {
        "stage": stage, "seed": stage_seed(cfg, stage) if seed is None else seed,
        "objective": dataclasses.asdict(objective),
        "train": {k: v for k, v in dataclasses.asdict(train_cfg).items() if k not in BOOKKEEPING},
        "batches": {"crop_size": list(d.crop_size), "batch_size": d.batch_size,
                    "unlabeled_batch_size": d.unlabeled_batch_size if use_unlabeled else None},
        "losses": dataclasses.asdict(cfg.losses) if with_pxl else None,
        "initial_weights": weights_hash(model),
        "labeled_images": json_digest(image_ids_of(labeled)),
        "unlabeled_images": json_digest([image_ids_of(unlabeled), getattr(unlabeled, "digest", None)])
        if use_unlabeled else None,
    }
    return json.loads(json.dumps(settings))  # as it reads back from summary.json


def train_stage(stage: str, model: torch.nn.Module, cfg: CastConfig, objective: Objective,
                labeled: Sequence[InstanceSample], unlabeled: Sequence[InstanceSample] | None,
                stage_dir: str | Path, ctx: DistContext = DistContext(), train_cfg: TrainConfig | None = None,
                evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
                seed: int | None = None, settings: dict[str, Any] | None = None) -> torch.nn.Module:
    """Train `model` on one setting of the objective into `stage_dir` (resuming when possible);
    writes summary.json (steps, wall time and the machine it was measured on, `stage_settings`) when done."""
    if not labeled:
        raise ValueError(f"stage {stage}: no labeled images")
    if settings is None:
        settings = stage_settings(stage, model, cfg, objective, labeled, unlabeled, train_cfg, seed)
    seed = stage_seed(cfg, stage) if seed is None else seed
    train_cfg = train_cfg or cfg.stage(stage)
    with_pxl = objective.lambda_pxl > 0
    views = WeakStrongViews(crop_size=tuple(cfg.data.crop_size), strong=with_pxl)
    use_unlabeled = bool(unlabeled) and (objective.lambda_semi > 0 or with_pxl)
    data = TrainData(labeled=InstanceTorchDataset(labeled, views, seed),
                     labeled_batch_size=cfg.data.batch_size,
                     collate_fn=functools.partial(collate_instances),
                     unlabeled=InstanceTorchDataset(unlabeled, views, seed + 1) if use_unlabeled else None,
                     unlabeled_batch_size=cfg.data.unlabeled_batch_size, num_workers=cfg.data.num_workers)
    trainer = Trainer(model, stage, train_cfg, objective, data, stage_dir, ctx, seed,
                      contrastive=build_contrastive(cfg.losses) if with_pxl else None, evaluate=evaluate,
                      settings=settings)
    machine, start = machine_info(ctx.device), time.perf_counter()
    model = trainer.fit()
    if ctx.is_main:
        # wall_s: this call only (a resumed stage does not count the interrupted run's time), on `machine`.
        atomic_write_json(Path(stage_dir) / SUMMARY, {
            "stage": stage, "steps": train_cfg.steps, "complete": True, "wall_s": time.perf_counter() - start,
            "machine": machine,
            "lambda_semi": objective.lambda_semi, "lambda_pxl": objective.lambda_pxl,
            "num_labeled": len(labeled), "num_unlabeled": len(unlabeled) if use_unlabeled else 0,
            "settings": settings}, indent=2)
    return model


def read_summary(stage_dir: str | Path) -> dict | None:
    path = Path(stage_dir) / SUMMARY
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except ValueError:
        return None


def stage_complete(stage_dir: str | Path, settings: dict[str, Any] | None = None) -> bool:
    """A stage is done when its final model folder and its summary exist; given `settings`, a
    stage finished under other settings raises SettingsChangedError rather than being reused."""
    summary = read_summary(stage_dir)
    done = bool(summary and summary.get("complete")) and (Path(stage_dir) / "model" / "config.json").is_file()
    if done and settings is not None:
        require_same_settings(summary.get("settings"), settings, stage_dir, "finished")
    return done
