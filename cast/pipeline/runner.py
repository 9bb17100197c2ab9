"""`python -m cast run`: data -> zero-shot teacher -> 1a -> 1b -> 2 -> 3 (+ the supervised-only
student baseline) -> evaluation -> report, into runs/<name>/ (layout: cast.runs.RunFolder).

Every step is skipped when its outputs are complete (a stage's model/ and summary.json, a
model's predictions whose recorded weights hash matches, pseudo-labels whose manifest matches),
so re-running a killed run resumes it: a stage that was interrupted resumes from its last
checkpoint. Every process of a torchrun launch runs this same code; rank 0 writes the files.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from cast.config import CastConfig, save_config
from cast.data.dataset import InstanceDataset, UnlabeledImages
from cast.data.splits import apply_split, load_split, make_split, save_split
from cast.efficiency import profile_model
from cast.evaluation import evaluate_instances
from cast.models.student import CastStudent, build_student
from cast.pipeline.pseudo_labels import PseudoLabeledImages, predict_results, pseudo_label, weights_hash
from cast.pipeline.report import make_report, make_row, write_report
from cast.pipeline.stages import (objective, read_summary, stage_complete, stage_seed, stage_settings,
                                  train_stage)
from cast.runs import STAGES, RunFolder
from cast.models.protocol import unwrap
from cast.training.checkpoint import seed_all
from cast.training.distributed import DistContext, barrier, broadcast_object
from cast.training.plots import plot_report
from cast.utils.folder_lock import exclusive_folder
from cast.utils.io import atomic_write_json, atomic_write_text, read_json
from cast.utils.machine import describe_machine, machine_info

# Train / val folders (or split names) of each data kind, below data.root.
DATA_SPLITS = {"demo": ("target_train", "target_val"), "coco": ("train", "val"),
               "cityscapes": ("train", "val"), "ade20k": ("training", "validation")}


# --------------------------------------------------------------------------- data


@dataclass
class RunData:
    classes: list[str]
    category_ids: list[int]
    labeled: InstanceDataset
    unlabeled: UnlabeledImages
    val: InstanceDataset
    split: dict[str, Any]


def read_dataset(kind: str, root: str | Path, split: str) -> InstanceDataset:
    """One split of a data set of `kind` (demo and coco: <root>/<split>/annotations.json)."""
    root = Path(root)
    if kind in ("demo", "coco"):
        from cast.data.coco import read_coco

        return read_coco(root / split / "annotations.json", progress=False)
    if kind == "cityscapes":
        from cast.data.cityscapes import read_cityscapes

        return read_cityscapes(root, split)
    from cast.data.ade20k import read_ade20k_instances

    return read_ade20k_instances(root, split)


def ensure_demo_data(cfg: CastConfig, ctx: DistContext) -> None:
    """Generate the demo data set when it is missing (rank 0; the others wait)."""
    if cfg.data.kind != "demo":
        return
    if ctx.is_main:
        from cast.data.demo import generate

        d = cfg.data.demo
        generate(cfg.data.root, seed=cfg.seed, image_size=d.image_size, num_source_train=d.num_source_train,
                 num_target_train=d.num_target_train, num_target_val=d.num_target_val, max_objects=d.max_objects)
    barrier()


def prepare_data(cfg: CastConfig, folder: RunFolder, ctx: DistContext) -> RunData:
    """Read train/val, then draw (or reuse) the labeled / unlabeled split and save it with the run."""
    ensure_demo_data(cfg, ctx)
    train_split, val_split = DATA_SPLITS[cfg.data.kind]
    train = read_dataset(cfg.data.kind, cfg.data.root, train_split)
    val = read_dataset(cfg.data.kind, cfg.data.root, val_split)
    if train.classes != val.classes:
        raise ValueError(f"{cfg.data.root}: {train_split} and {val_split} have different classes "
                         f"({train.classes} vs {val.classes})")
    if cfg.data.max_val_images is not None:
        val = val.subset(val.image_ids[: cfg.data.max_val_images])
    if folder.split.is_file():
        split = load_split(folder.split)
        if not math.isclose(split["labeled_fraction"], cfg.data.labeled_fraction):
            raise ValueError(f"{folder.split}: drawn for labeled_fraction={split['labeled_fraction']}, but the "
                             f"config says {cfg.data.labeled_fraction}; use another run name")
    elif cfg.data.split_file is not None:
        split = load_split(cfg.data.split_file)
    else:
        split = make_split(train.image_ids, cfg.data.labeled_fraction, cfg.seed)
    labeled, unlabeled = apply_split(train, split)
    if ctx.is_main and not folder.split.is_file():
        save_split(split, folder.split)
    return RunData(train.classes, train.category_ids, labeled, unlabeled, val, split)


# --------------------------------------------------------------------------- models


def new_student(cfg: CastConfig, data: RunData) -> CastStudent:
    """A fresh student; every student of a run starts from the same seeded initialisation."""
    torch.manual_seed(stage_seed(cfg, "student_init"))
    return build_student(cfg.student.preset, len(data.classes), data.classes,
                         pretrained_encoder=cfg.student.pretrained_encoder_dir,
                         projection_stride=cfg.losses.embedding_stride, **cfg.student.preset_overrides)


class TeacherSource:
    """theta_T^0, loaded afresh whenever a stage starts from it, and adapted teachers from disk."""

    def __init__(self, cfg: CastConfig, data: RunData, ctx: DistContext) -> None:
        self.cfg, self.data, self.ctx = cfg, data, ctx
        self.pretrain_dir: Path | None = None  # the stand-in's pretraining stage folder
        if cfg.teacher.kind == "standin":
            from cast.pipeline.standin_teacher import pretrain_standin_teacher

            source = read_dataset("coco", cfg.data.root, cfg.teacher.pretrain.source)
            if source.classes != data.classes:
                raise ValueError(f"{cfg.data.root}/{cfg.teacher.pretrain.source}: classes {source.classes} differ "
                                 f"from the target data's {data.classes}")
            self.standin_dir = pretrain_standin_teacher(cfg, source, data.classes, ctx)
            self.pretrain_dir = self.standin_dir.parent

    def zero_shot(self) -> torch.nn.Module:
        if self.cfg.teacher.kind == "standin":
            return CastStudent.from_pretrained(self.standin_dir)
        from cast.teachers.hub import zero_shot_teacher

        return zero_shot_teacher(self.cfg.teacher, self.data.classes, self.cfg.losses.embedding_stride)

    def load(self, model_dir: Path) -> torch.nn.Module:
        """An adapted teacher saved by a stage."""
        if self.cfg.teacher.kind == "standin":
            return CastStudent.from_pretrained(model_dir)
        from cast.models.auto import model_class, model_type_of  # the teacher class its config.json names

        return model_class(model_type_of(model_dir)).from_pretrained(model_dir)


# --------------------------------------------------------------------------- evaluation


def _none_if_nan(value: Any) -> Any:
    # json has no NaN; pycocotools' "no data" becomes null.
    return None if isinstance(value, float) and math.isnan(value) else value


class Evaluator:
    """Val-set predictions, AP and efficiency of a model, cached in predictions/ by weights hash."""

    def __init__(self, cfg: CastConfig, data: RunData, folder: RunFolder, ctx: DistContext) -> None:
        self.cfg, self.data, self.folder, self.ctx = cfg, data, folder, ctx
        self._gt: dict[str, Any] | None = None
        first = data.val[0]
        scale = cfg.data.test_size / min(first.height, first.width)
        self.profile_size = (round(first.height * scale), round(first.width * scale))

    @property
    def gt(self) -> dict[str, Any]:
        """The val ground truth as a COCO json dict (built once)."""
        if self._gt is None:
            self._gt = self.data.val.coco_gt(progress=False)
        return self._gt

    def ap(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        """Mask AP metrics in percent (pycocotools); metrics without data are None."""
        metrics = evaluate_instances(self.gt, results)
        metrics.pop("summary", None)
        metrics["per_class"] = {k: _none_if_nan(v) for k, v in metrics.get("per_class", {}).items()}
        return {k: v if k == "per_class" else _none_if_nan(v) for k, v in metrics.items()}

    def _predict(self, model: torch.nn.Module, desc: str) -> list[dict[str, Any]]:
        return predict_results(model, self.data.val, self.data.category_ids, self.cfg.data.test_size,
                               self.cfg.data.eval_batch_size, self.ctx, desc=desc,
                               num_workers=self.cfg.data.num_workers)

    def during_training(self, model: torch.nn.Module) -> dict[str, float]:
        """AP / AP50 for the metrics log (no files written)."""
        results = self._predict(model, "val")
        if not self.ctx.is_main:
            return broadcast_object(None)
        metrics = self.ap(results)
        return broadcast_object({"AP": metrics["AP"], "AP50": metrics["AP50"]})

    def __call__(self, key: str, model: torch.nn.Module) -> dict[str, Any]:
        """AP, AP50 and the efficiency profile of `model`, written as predictions/<key>_val.json."""
        meta_path = self.folder.predictions(key).with_suffix(".meta.json")
        digest = weights_hash(model)
        if meta_path.is_file() and self.folder.predictions(key).is_file():
            try:
                meta = read_json(meta_path)
            except ValueError:  # damaged: evaluate again rather than trust it
                meta = None
            if isinstance(meta, dict) and meta.get("weights_hash") == digest \
                    and meta.get("image_ids") == self.data.val.image_ids:
                return meta
        results = self._predict(model, f"evaluate {key}")
        meta = None
        if self.ctx.is_main:
            atomic_write_json(self.folder.predictions(key), results)
            meta = {"model": key, "weights_hash": digest, "image_ids": self.data.val.image_ids,
                    "metrics": self.ap(results),
                    "efficiency": profile_model(unwrap(model), self.profile_size, device=self.ctx.device)}
            atomic_write_json(meta_path, meta, indent=1)
        return broadcast_object(meta)


# --------------------------------------------------------------------------- the run


@dataclass
class Pipeline:
    cfg: CastConfig
    ctx: DistContext = field(default_factory=DistContext)
    timings: dict[str, float] = field(default_factory=dict)
    stage_machines: dict[str, str] = field(default_factory=dict)  # where each stage wall was measured

    def __post_init__(self) -> None:
        self.folder = RunFolder(self.cfg.run_dir)

    # helpers ----------------------------------------------------------------

    def _timed(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = fn()
        self.timings[name] = round(time.perf_counter() - start, 2)
        return out

    def prepare(self) -> None:
        """Check that the run folder is writable, save the config, read the data, get theta_T^0."""
        prepare_run_folder(self.cfg, self.folder, self.ctx)
        self.data = self._timed("data", lambda: prepare_data(self.cfg, self.folder, self.ctx))
        self.evaluator = Evaluator(self.cfg, self.data, self.folder, self.ctx)
        self.teachers = self._timed("teacher_pretrain", lambda: TeacherSource(self.cfg, self.data, self.ctx))

    def stage(self, stage: str, make_model: Callable[[], torch.nn.Module], load: Callable[[Path], torch.nn.Module],
              unlabeled: Any = None) -> torch.nn.Module:
        """The stage's trained model: loaded when the stage is complete, else trained (or resumed)."""
        stage_dir = self.folder.stage(stage)
        model, goal = make_model(), objective(stage, self.cfg)
        settings = stage_settings(stage, model, self.cfg, goal, self.data.labeled, unlabeled)
        if stage_complete(stage_dir, settings):
            del model  # the starting point only served the settings; free it before loading the result
            return load(stage_dir / "model")
        evaluate = self.evaluator.during_training if self.cfg.stage(stage).eval_every else None
        return self._timed(stage, lambda: train_stage(stage, model, self.cfg, goal, self.data.labeled, unlabeled,
                                                      stage_dir, self.ctx, evaluate=evaluate, settings=settings))

    def pseudo_labels(self, teacher_name: str, teacher: torch.nn.Module) -> PseudoLabeledImages:
        """D_u pseudo-labeled by `teacher` (reused when teacher, images and thresholds are unchanged)."""
        results = self._timed(f"pseudo_labels_{teacher_name}", lambda: pseudo_label(
            teacher, self.data.unlabeled, self.data.category_ids, self.cfg.pseudo_labels,
            self.folder.pseudo_labels(teacher_name), self.folder.pseudo_label_manifest(teacher_name),
            self.cfg.data.test_size, self.cfg.data.eval_batch_size, self.ctx, teacher=teacher_name,
            num_workers=self.cfg.data.num_workers))
        return PseudoLabeledImages(self.data.unlabeled, results, self.data.category_ids)

    def evaluate(self, key: str, model: torch.nn.Module, wall_s: float | None) -> dict:
        meta = self._timed(f"evaluate_{key}", lambda: self.evaluator(key, model))
        return make_row(key, meta["metrics"], meta["efficiency"], wall_s)

    def _wall(self, stage: str, stage_dir: Path | None = None) -> float | None:
        """A stage's training wall time from its summary; notes the machine it was measured on."""
        summary = read_summary(stage_dir or self.folder.stage(stage)) or {}
        if summary.get("machine"):
            self.stage_machines[stage] = describe_machine(summary["machine"])
        return summary.get("wall_s")

    def load_student(self, model_dir: Path) -> CastStudent:
        return CastStudent.from_pretrained(model_dir)

    # the run ----------------------------------------------------------------

    def run(self, stop_after: str | None = None) -> dict[str, Any]:
        """The whole pipeline; returns the report (also written to report.json / report.md).

        `stop_after` (a stage name) ends the run there and returns the rows so far without writing
        the report: each stage notebook runs the pipeline up to its own stage.
        """
        if stop_after is not None and stop_after not in STAGES:
            raise ValueError(f"stop_after={stop_after!r}: expected one of {', '.join(STAGES)}")
        with exclusive_folder(self.folder.root, enabled=self.ctx.is_main, label="run folder"):
            return self._run(stop_after)

    def _run(self, stop_after: str | None) -> dict[str, Any]:
        start, machine = time.perf_counter(), machine_info(self.ctx.device)
        self.prepare()
        cfg, rows = self.cfg, []
        teacher0 = self.teachers.zero_shot()
        pretrain_dir = self.teachers.pretrain_dir
        pretrain_wall = self._wall("teacher_pretrain", pretrain_dir) if pretrain_dir else None
        rows.append(self.evaluate("teacher_zero_shot", teacher0, pretrain_wall))
        del teacher0

        # 1a: adapt theta_T^0 on D_l.
        t1a = self.stage("teacher_adaptation", self.teachers.zero_shot, self.teachers.load)
        rows.append(self.evaluate("teacher_adaptation", t1a, self._wall("teacher_adaptation")))
        if stop_after == "teacher_adaptation":
            return {"rows": rows}
        # 1b: pseudo-label D_u with theta_T', restart from theta_T^0, train on D_l + pseudo D_u.
        pseudo_1a = self.pseudo_labels("teacher_adaptation", t1a)
        del t1a
        t1b = self.stage("teacher_self_training", self.teachers.zero_shot, self.teachers.load, pseudo_1a)
        rows.append(self.evaluate("teacher_self_training", t1b, self._wall("teacher_self_training")))
        if stop_after == "teacher_self_training":
            return {"rows": rows}
        # 2: the frozen adapted teacher pseudo-labels D_u for the student.
        pseudo_1b = self.pseudo_labels("teacher_self_training", t1b)
        del t1b
        s2 = self.stage("knowledge_transfer", lambda: new_student(cfg, self.data), self.load_student, pseudo_1b)
        rows.append(self.evaluate("knowledge_transfer", s2, self._wall("knowledge_transfer")))
        if stop_after == "knowledge_transfer":
            return {"rows": rows}
        # 3: refine the student on D_l only.
        s3 = self.stage("student_refinement", lambda model=s2: model, self.load_student)
        rows.append(self.evaluate("student_refinement", s3, self._wall("student_refinement")))
        if stop_after == "student_refinement":
            return {"rows": rows}
        del s2, s3
        # Baseline: the same student on D_l only.
        sup = self.stage("student_supervised", lambda: new_student(cfg, self.data), self.load_student)
        rows.append(self.evaluate("student_supervised", sup, self._wall("student_supervised")))

        self.timings["total"] = round(time.perf_counter() - start, 2)
        report = make_report(rows, cfg, {"timings_s": self.timings, "total_wall_s": self.timings["total"],
                                         "machine": machine,
                                         "stage_machines": self.stage_machines,
                                         "split": {"labeled": len(self.data.labeled),
                                                   "unlabeled": len(self.data.unlabeled),
                                                   "val": len(self.data.val)}})
        if self.ctx.is_main:
            write_report(report, self.folder.report_json, self.folder.report_md)
            plot_report(report["rows"], self.folder.plots / "ap.png")
        barrier()
        return report


def prepare_run_folder(cfg: CastConfig, folder: RunFolder, ctx: DistContext) -> None:
    """Fail early, with the path, when the run folder cannot be written; save the resolved config."""
    if ctx.is_main:
        probe = folder.root / ".write-test"
        try:
            folder.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(probe, "ok")
            probe.unlink()
        except OSError as e:
            raise OSError(f"run folder {folder.root} is not writable: {e.strerror or e}") from None
        save_config(cfg, folder.config)
    barrier()


def pretrain_teacher(cfg: CastConfig, ctx: DistContext = DistContext()) -> Path:
    """`python -m cast pretrain-teacher`: the stand-in teacher's model folder (trained when missing)."""
    if cfg.teacher.kind != "standin":
        raise ValueError(f"teacher.kind={cfg.teacher.kind!r}: only the stand-in teacher is pretrained here "
                         "(a foundation-model teacher comes pretrained)")
    from cast.pipeline.standin_teacher import pretrain_standin_teacher

    ensure_demo_data(cfg, ctx)
    source = read_dataset("coco", cfg.data.root, cfg.teacher.pretrain.source)
    return pretrain_standin_teacher(cfg, source, source.classes, ctx)


def run(cfg: CastConfig, ctx: DistContext = DistContext()) -> dict[str, Any]:
    """`python -m cast run`."""
    seed_all(cfg.seed)
    return Pipeline(cfg, ctx).run()
