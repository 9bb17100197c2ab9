"""`python -m cast run`: data -> zero-shot teacher -> 1a -> 1b -> 2 -> 3 (+ the supervised-only
student baseline) -> evaluation -> report, into runs/<name>/ (layout: cast.runs.RunFolder).

Every step is skipped when its outputs are valid for its settings (cast.utils.cache): a finished
stage, a model's val predictions, pseudo-labels. Re-running a killed run resumes it, a stage that
was interrupted from its last checkpoint. Every process of a torchrun launch runs this same code;
rank 0 writes the files.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch

from cast.config import CastConfig, save_config
from cast.data.prepare import RunData, prepare_data
from cast.evaluation.evaluator import Evaluator
from cast.models.student import CastStudent, build_student
from cast.pipeline.pseudo_labels import PseudoLabeledImages, pseudo_label
from cast.pipeline.report import make_report, make_row, write_report
from cast.pipeline.seeds import aggregate_rows, over_seeds, seed_config, seeds_summary
from cast.pipeline.stages import TEACHER_STAGES, read_summary, reuse_or_train, stage_seed, stage_spec
from cast.pipeline.teachers import TeacherSource
from cast.runs import STAGES, RunFolder
from cast.training.checkpoint import seed_all
from cast.training.metrics import diagnostics_summary
from cast.training.plots import plot_report
from cast.utils.distributed import DistContext, barrier, init_distributed
from cast.utils.folder_lock import exclusive_folder, shared_folder
from cast.utils.io import atomic_write_text
from cast.utils.machine import describe_machine, machine_info


def new_student(cfg: CastConfig, data: RunData) -> CastStudent:
    """A fresh student; every student of a run starts from the same seeded initialisation."""
    torch.manual_seed(stage_seed(cfg, "student_init"))
    return build_student(cfg.student.preset, len(data.classes), data.classes,
                         pretrained_encoder=cfg.student.pretrained_encoder_dir,
                         projection_stride=cfg.losses.embedding_stride, **cfg.student.preset_overrides)


def prepare_run_folder(cfg: CastConfig, folder: RunFolder, ctx: DistContext = DistContext()) -> None:
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


@dataclass
class Pipeline:
    cfg: CastConfig
    ctx: DistContext | None = None  # None: this process on the config's device
    timings: dict[str, float] = field(default_factory=dict)
    stage_machines: dict[str, str] = field(default_factory=dict)  # where each stage wall was measured

    def __post_init__(self) -> None:
        self.ctx = self.ctx or init_distributed(self.cfg.device)
        self.folder = RunFolder(self.cfg.run_dir)
        # The teacher stages, their pseudo-labels and evaluations: shared by the seeds of a study.
        self.shared = RunFolder(self.cfg.shared_dir) if self.cfg.shared_dir else self.folder

    def _timed(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = fn()
        self.timings[name] = round(time.perf_counter() - start, 2)
        return out

    def prepare(self) -> None:
        """Check that the run folder is writable, save the config, read the data, get theta_T^0."""
        prepare_run_folder(self.cfg, self.folder, self.ctx)
        self.data = self._timed("data", lambda: prepare_data(self.cfg, self.folder.split, self.ctx))
        self.evaluator = Evaluator(self.cfg, self.data.val, self.folder.root / "predictions", self.ctx)
        self.teacher_evaluator = Evaluator(self.cfg, self.data.val, self.shared.root / "predictions", self.ctx)
        self.teachers = self._timed("teacher_pretrain", lambda: TeacherSource(self.cfg, self.data.classes, self.ctx))

    def stage(self, stage: str, make_model: Callable[[], torch.nn.Module], unlabeled: Any = None) -> torch.nn.Module:
        """The stage's trained model: loaded when the stage is complete, else trained (or resumed)."""
        evaluate = self.evaluator.during_training if self.cfg.stage(stage).eval_every else None
        start = time.perf_counter()
        model, trained = reuse_or_train(stage_spec(stage, self.cfg, unlabeled), self.stage_dir(stage), make_model,
                                        self.cfg, self.data.labeled, unlabeled, self.ctx, evaluate)
        if trained:
            self.timings[stage] = round(time.perf_counter() - start, 2)
        return model

    def stage_dir(self, stage: str) -> Path:
        return (self.shared if stage in TEACHER_STAGES else self.folder).stage(stage)

    def pseudo_labels(self, teacher_name: str, teacher: torch.nn.Module) -> PseudoLabeledImages:
        """D_u pseudo-labeled by `teacher` (reused when teacher, images and thresholds are unchanged)."""
        d = self.cfg.data
        results = self._timed(f"pseudo_labels_{teacher_name}", lambda: pseudo_label(
            teacher, self.data.unlabeled, self.data.category_ids, self.cfg.pseudo_labels,
            self.shared.pseudo_labels(teacher_name), self.shared.pseudo_label_manifest(teacher_name),
            d.test_size, d.eval_batch_size, self.ctx, teacher=teacher_name, num_workers=d.num_workers))
        return PseudoLabeledImages(self.data.unlabeled, results, self.data.category_ids)

    def evaluate(self, key: str, model: torch.nn.Module, stage_dir: Path | None) -> dict:
        """The report row of `model`; its training wall and machine come from the stage's summary."""
        evaluator = self.teacher_evaluator if key.startswith("teacher_") else self.evaluator
        meta = self._timed(f"evaluate_{key}", lambda: evaluator(key, model))
        summary = (read_summary(stage_dir) if stage_dir is not None else None) or {}
        if summary.get("machine"):
            self.stage_machines["teacher_pretrain" if key == "teacher_zero_shot" else key] = \
                describe_machine(summary["machine"])
        diagnostics = diagnostics_summary(stage_dir / "metrics.jsonl") if stage_dir is not None else {}
        return make_row(key, meta["metrics"], meta["efficiency"], summary.get("wall_s"), diagnostics)

    def run(self, stop_after: str | None = None) -> dict[str, Any]:
        """The whole pipeline; returns the report (also written to report.json / report.md).

        `stop_after` (a stage name) ends the run there and returns the rows so far without writing
        the report: each stage notebook runs the pipeline up to its own stage.
        """
        if stop_after is not None and stop_after not in STAGES:
            raise ValueError(f"stop_after={stop_after!r}: expected one of {', '.join(STAGES)}")
        with exclusive_folder(self.folder.root, enabled=self.ctx.is_main, label="run folder"):
            return self._run(stop_after)

    def holding_shared(self) -> ContextManager[None]:
        """Hold the shared folder (the teacher stages, their pseudo-labels and evaluations) while this
        run makes or reads them: seeds run as processes of their own wait for the one that trains the
        teacher, then reuse it, instead of training it beside it."""
        return shared_folder(self.shared.root, self.ctx, "shared teacher folder")

    def _run(self, stop_after: str | None) -> dict[str, Any]:
        start, machine = time.perf_counter(), machine_info(self.ctx.device)
        self.prepare()
        cfg, folder = self.cfg, self.folder
        with self.holding_shared():
            rows, pseudo_1b = self._teacher_stages(stop_after)
        if pseudo_1b is None:
            return {"rows": rows}
        # 2: distil into the student on D_l + D_u pseudo-labeled by the frozen adapted teacher.
        s2 = self.stage("knowledge_transfer", lambda: new_student(cfg, self.data), pseudo_1b)
        rows.append(self.evaluate("knowledge_transfer", s2, folder.stage("knowledge_transfer")))
        if stop_after == "knowledge_transfer":
            return {"rows": rows}
        # 3: refine the student on D_l only.
        s3 = self.stage("student_refinement", lambda model=s2: model)
        rows.append(self.evaluate("student_refinement", s3, folder.stage("student_refinement")))
        if stop_after == "student_refinement":
            return {"rows": rows}
        del s2, s3
        # Baseline: the same student on D_l only.
        sup = self.stage("student_supervised", lambda: new_student(cfg, self.data))
        rows.append(self.evaluate("student_supervised", sup, folder.stage("student_supervised")))

        self.timings["total"] = round(time.perf_counter() - start, 2)
        report = make_report(rows, cfg, {"timings_s": self.timings, "total_wall_s": self.timings["total"],
                                         "machine": machine, "stage_machines": self.stage_machines,
                                         "split": {"labeled": len(self.data.labeled),
                                                   "unlabeled": len(self.data.unlabeled),
                                                   "val": len(self.data.val)}})
        if self.ctx.is_main:
            write_report(report, folder.report_json, folder.report_md)
            plot_report(report["rows"], folder.plots / "ap.png")
        barrier()
        return report

    def _teacher_stages(self, stop_after: str | None) -> tuple[list[dict], PseudoLabeledImages | None]:
        """The teacher's rows, and D_u pseudo-labeled by the adapted teacher (None: stopped before)."""
        rows = []
        teacher0 = self.teachers.zero_shot()
        rows.append(self.evaluate("teacher_zero_shot", teacher0, self.teachers.pretrain_dir))
        del teacher0

        # 1a: adapt theta_T^0 on D_l.
        t1a = self.stage("teacher_adaptation", self.teachers.zero_shot)
        rows.append(self.evaluate("teacher_adaptation", t1a, self.stage_dir("teacher_adaptation")))
        if stop_after == "teacher_adaptation":
            return rows, None
        # 1b: pseudo-label D_u with theta_T', restart from theta_T^0, train on D_l + pseudo D_u.
        pseudo_1a = self.pseudo_labels("teacher_adaptation", t1a)
        del t1a
        t1b = self.stage("teacher_self_training", self.teachers.zero_shot, pseudo_1a)
        rows.append(self.evaluate("teacher_self_training", t1b, self.stage_dir("teacher_self_training")))
        if stop_after == "teacher_self_training":
            return rows, None
        # 2 reads D_u as the frozen adapted teacher labels it.
        return rows, self.pseudo_labels("teacher_self_training", t1b)


def run(cfg: CastConfig, ctx: DistContext | None = None, seeds: list[int] | None = None) -> dict[str, Any]:
    """`python -m cast run [--seeds ...]`: the report (with seeds, aggregated over them and
    written to runs/<name>/report.json and report.md). `ctx` None: this process on cfg.device."""
    ctx = ctx or init_distributed(cfg.device)
    if not seeds:
        seed_all(cfg.seed)
        return Pipeline(cfg, ctx).run()

    def one(seed_cfg: CastConfig) -> dict[str, Any]:
        seed_all(seed_cfg.seed)
        return Pipeline(seed_cfg, ctx).run()

    reports, failures = over_seeds(cfg, seeds, one, ctx)
    if not reports:
        raise RuntimeError(f"{cfg.run_dir}: every seed failed: {failures}")
    first = reports[min(reports)]
    machines = {stage: m for r in reports.values() for stage, m in r.get("stage_machines", {}).items()}
    report = make_report(aggregate_rows({s: r["rows"] for s, r in reports.items()}, "model"), cfg,
                         {**seeds_summary(seeds, failures, seed_config(cfg, seeds[0], seeds[0]).shared_dir),
                          "split": first["split"], "machine": first["machine"], "stage_machines": machines,
                          "total_wall_s": sum(r["total_wall_s"] for r in reports.values())})
    folder = RunFolder(cfg.run_dir)
    if ctx.is_main:
        # runs/<name>/ is also the seeds' shared folder by default: wait for whoever writes it.
        with exclusive_folder(folder.root, label="run folder", wait=True):
            write_report(report, folder.report_json, folder.report_md)
            plot_report(report["rows"], folder.plots / "ap.png")
    barrier()
    return report
