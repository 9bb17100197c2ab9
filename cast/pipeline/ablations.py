"""`python -m cast ablate --study ...`: the paper's ablations on the run's data.

    losses          Table 2: student after transfer with L_sup / +L_semi / +L_pxl / all
    stages          Table 3: full / no refinement / no teacher adaptation / distillation only
    samplers        Table 4: negative sampler uniform / mask / class / fusion (student after transfer)
    label_fraction  Table 6: refined student at each labeled fraction of ablations.label_fractions
    pxl_weight      the paper's sweep of lambda_pxl over ablations.pxl_weights (student after transfer)

The main run is completed first (every finished piece of it is reused); variants that the main
run already is (e.g. "all" losses, the run's own sampler) are read from it, the others train
into runs/<name>/ablations/<study>/<variant>/ with the same budget as the stage they replace.
Tables go to runs/<name>/ablations/<study>.{json,md}, with the contrastive diagnostics (margin,
false-negative rate) of each variant trained with L_pxl; figures beside them: samplers.png and
pxl_weight.png (margin and false-negative rate per variant: the paper's Proposition 3.1 has the
margin grow with lambda_pxl) and label_fraction.png (every model's AP per fraction, also over
seeds, where the supervised-only student catching up with CAST shows).
"""
from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any, Callable

import torch

from cast.config import CastConfig
from cast.evaluation.evaluator import Evaluator
from cast.models.auto import load_model
from cast.pipeline.report import fmt, spread
from cast.pipeline.runner import Pipeline, new_student
from cast.pipeline.seeds import aggregate_rows, over_seeds, seed_config, seeds_markdown, seeds_summary
from cast.pipeline.stages import reuse_or_train, stage_spec
from cast.runs import RunFolder
from cast.training.metrics import diagnostics_summary
from cast.training.objective import Objective
from cast.training.plots import plot_diagnostics, plot_label_fractions
from cast.utils.distributed import DistContext, barrier, init_distributed
from cast.utils.folder_lock import exclusive_folder
from cast.utils.io import atomic_write_json, atomic_write_text

# Published Cityscapes 10 % numbers: mask AP, or (AP, AP50) for the samplers.
PAPER = {
    "losses": {"L_sup": 21.1, "L_sup + L_semi": 30.7, "L_sup + L_pxl": 27.5, "all (CAST)": 32.2},
    "stages": {"full (1a, 1b, 2, 3)": 33.9, "no refinement (3)": 32.2, "no teacher adaptation (1a, 1b)": 25.7,
               "distillation only": 23.8},
    "samplers": {"uniform": (29.4, 50.2), "mask": (30.6, 55.0), "class": (31.1, 55.3), "fusion": (32.2, 56.5)},
    "label_fraction": {0.05: 30.7, 0.1: 33.9, 0.3: 40.4},
}


def study_folder(cfg: CastConfig, study: str) -> RunFolder:
    """Where the variants of `study` on the run of `cfg` live: runs/<name>/ablations/<study>/."""
    return RunFolder(RunFolder(cfg.run_dir).ablations / study)


class Ablation:
    """Trains and evaluates the variants of one study next to a completed main run."""

    def __init__(self, cfg: CastConfig, study: str, ctx: DistContext) -> None:
        self.cfg, self.study, self.ctx = cfg, study, ctx
        self.main = Pipeline(cfg, ctx)
        self.main_report = self.main.run()
        self.folder = study_folder(cfg, study)
        self.evaluator = Evaluator(cfg, self.main.data.val, self.folder.root / "predictions", ctx)

    def main_row(self, model_key: str) -> dict[str, Any]:
        return next(r for r in self.main_report["rows"] if r["model"] == model_key)

    def variant(self, name: str, stage: str, make_model: Callable[[], torch.nn.Module], objective: Objective,
                labeled: Any, unlabeled: Any = None, cfg: CastConfig | None = None) -> torch.nn.Module:
        """Train one variant with the budget of `stage` (or load it when it is done)."""
        cfg = cfg or self.cfg
        spec = stage_spec(stage, cfg, unlabeled, objective=objective)
        return reuse_or_train(spec, self.folder.stage(name), make_model, cfg, labeled, unlabeled, self.ctx)[0]

    def evaluate(self, name: str, model: torch.nn.Module) -> dict[str, Any]:
        """AP, AP50 and the contrastive diagnostics of the variant's training (none without L_pxl)."""
        meta = self.evaluator(name, model)
        return {"AP": meta["metrics"]["AP"], "AP50": meta["metrics"]["AP50"],
                **diagnostics_summary(self.folder.metrics(name))}

    def student(self) -> torch.nn.Module:
        return new_student(self.cfg, self.main.data)

    def pseudo(self, teacher_name: str) -> Any:
        """Pseudo-labels of the main run (computed in its shared folder when needed)."""
        with self.main.holding_shared():
            if teacher_name == "teacher_zero_shot":
                return self.main.pseudo_labels(teacher_name, self.main.teachers.zero_shot())
            return self.main.pseudo_labels(teacher_name, load_model(self.main.stage_dir(teacher_name) / "model"))


def _row(name: str, result: dict[str, Any], paper: Any, source: str) -> dict[str, Any]:
    ap50 = paper[1] if isinstance(paper, tuple) else None
    return {"variant": name, "AP": round(result["AP"], 2), "AP50": round(result["AP50"], 2),
            "paper_AP": paper[0] if isinstance(paper, tuple) else paper, "paper_AP50": ap50, "source": source,
            **{k: round(v, 4) for k, v in result.items() if k.startswith("pxl_")}}


def _from_main(a: Ablation, key: str) -> dict[str, Any]:
    return {k: v for k, v in a.main_row(key).items() if k in ("AP", "AP50") or k.startswith("pxl_")}


def losses_study(a: Ablation) -> list[dict[str, Any]]:
    data, lo = a.main.data, a.cfg.losses
    pseudo = a.pseudo("teacher_self_training")
    paper = PAPER["losses"]
    variants = [("L_sup", Objective(0.0, 0.0), None),
                ("L_sup + L_semi", Objective(lo.lambda_semi, 0.0), pseudo),
                # L_pxl alone uses D_u's images without their pseudo-labels.
                ("L_sup + L_pxl", Objective(0.0, lo.lambda_pxl), data.unlabeled)]
    rows = []
    for name, obj, unlabeled in variants:
        model = a.variant(_slug(name), "knowledge_transfer", a.student, obj, data.labeled, unlabeled)
        rows.append(_row(name, a.evaluate(_slug(name), model), paper[name], "trained"))
    rows.append(_row("all (CAST)", _from_main(a, "knowledge_transfer"), paper["all (CAST)"], "main run"))
    return rows


def stages_study(a: Ablation) -> list[dict[str, Any]]:
    cfg, data, paper = a.cfg, a.main.data, PAPER["stages"]
    rows = [_row("full (1a, 1b, 2, 3)", _from_main(a, "student_refinement"), paper["full (1a, 1b, 2, 3)"], "main run"),
            _row("no refinement (3)", _from_main(a, "knowledge_transfer"), paper["no refinement (3)"], "main run")]
    zero_shot = a.pseudo("teacher_zero_shot")
    transfer = a.variant("no_adaptation_transfer", "knowledge_transfer", a.student,
                         Objective(cfg.losses.lambda_semi, cfg.losses.lambda_pxl), data.labeled, zero_shot)
    refined = a.variant("no_adaptation_refinement", "student_refinement", lambda: transfer, Objective(0.0, 0.0),
                        data.labeled)
    rows.append(_row("no teacher adaptation (1a, 1b)", a.evaluate("no_adaptation_refinement", refined),
                     paper["no teacher adaptation (1a, 1b)"], "trained"))
    # The student learns from the zero-shot teacher's pseudo-labels alone: no labels, no L_pxl.
    distilled = a.variant("distillation_only", "knowledge_transfer", a.student, Objective(0.0, 0.0), zero_shot)
    rows.append(_row("distillation only", a.evaluate("distillation_only", distilled), paper["distillation only"],
                     "trained"))
    return rows


def _transfer_row(a: Ablation, name: str, own: bool, pseudo: Any, paper: Any = None, objective: Objective | None = None,
                  cfg: CastConfig | None = None) -> dict[str, Any]:
    """One variant of the transfer stage on 1b's pseudo-labels: the main run's row when it is the
    run's `own` setting, else trained (into the folder `_slug(name)`) and evaluated."""
    if own:
        return _row(name, _from_main(a, "knowledge_transfer"), paper, "main run")
    objective = objective or Objective(a.cfg.losses.lambda_semi, a.cfg.losses.lambda_pxl)
    model = a.variant(_slug(name), "knowledge_transfer", a.student, objective, a.main.data.labeled, pseudo, cfg=cfg)
    return _row(name, a.evaluate(_slug(name), model), paper, "trained")


def samplers_study(a: Ablation) -> list[dict[str, Any]]:
    pseudo = a.pseudo("teacher_self_training")
    rows = []
    for sampler in a.cfg.ablations.samplers:
        variant_cfg = copy.deepcopy(a.cfg)
        variant_cfg.losses.sampler = sampler
        rows.append(_transfer_row(a, sampler, sampler == a.cfg.losses.sampler, pseudo, PAPER["samplers"][sampler],
                                  cfg=variant_cfg))
    return rows


def _transfer_metrics(cfg: CastConfig, study: str, variant: str, own: bool) -> Path:
    """The metrics of a transfer-stage variant of `study`: the main run's when it is the run's `own`."""
    return RunFolder(cfg.run_dir).metrics("knowledge_transfer") if own else study_folder(cfg, study).metrics(variant)


def _seeds_title(what: str, cfgs: list[CastConfig]) -> str:
    return f"knowledge transfer: contrastive diagnostics per {what}" + (
        f", mean over {len(cfgs)} seeds" if len(cfgs) > 1 else "")


def samplers_figure(cfgs: list[CastConfig], path: Path) -> Path | None:
    """The paper's diagnostics (margin, false-negative rate), a curve per sampler, mean over `cfgs`."""
    metrics = {s: [_transfer_metrics(c, "samplers", s, s == c.losses.sampler) for c in cfgs]
               for s in cfgs[0].ablations.samplers}
    return plot_diagnostics(metrics, path, _seeds_title("negative sampler", cfgs))


def pxl_weight_study(a: Ablation) -> list[dict[str, Any]]:
    pseudo = a.pseudo("teacher_self_training")
    return [_transfer_row(a, _weight_name(w), math.isclose(w, a.cfg.losses.lambda_pxl), pseudo,
                          objective=Objective(a.cfg.losses.lambda_semi, w)) for w in a.cfg.ablations.pxl_weights]


def _weight_name(weight: float) -> str:
    return f"lambda_pxl = {weight:g}"


def pxl_weight_figure(cfgs: list[CastConfig], path: Path) -> Path | None:
    """Margin and false-negative rate, a curve per weight of L_pxl, mean over `cfgs`."""
    metrics = {_weight_name(w): [_transfer_metrics(c, "pxl_weight", _slug(_weight_name(w)),
                                                   math.isclose(w, c.losses.lambda_pxl)) for c in cfgs]
               for w in cfgs[0].ablations.pxl_weights}
    return plot_diagnostics(metrics, path, _seeds_title("weight of L_pxl", cfgs))


def _fraction_folder(cfg: CastConfig, fraction: float) -> RunFolder:
    """Where the run at `fraction` lives: the main run at its own fraction, else a sub-run."""
    if math.isclose(fraction, cfg.data.labeled_fraction):
        return RunFolder(cfg.run_dir)
    return RunFolder(study_folder(cfg, "label_fraction").root / f"fraction_{fraction:g}")


def fraction_reports(cfg: CastConfig) -> dict[float, list[dict[str, Any]]]:
    """{fraction: report rows} of the finished runs of ablations.label_fractions."""
    folders = {f: _fraction_folder(cfg, f) for f in cfg.ablations.label_fractions}
    return {f: json.loads(folder.report_json.read_text())["rows"] for f, folder in folders.items()
            if folder.report_json.is_file()}


def label_fraction_figure(cfgs: list[CastConfig], path: Path) -> Path:
    """Every model's AP against the labeled fraction, over the runs of `cfgs` (one per seed)."""
    over = f", mean ± std over {len(cfgs)} seeds" if len(cfgs) > 1 else ""
    return plot_label_fractions([fraction_reports(c) for c in cfgs], path, f"every model by labeled fraction{over}")


def label_fraction_study(a: Ablation) -> list[dict[str, Any]]:
    cfg, rows = a.cfg, []
    for fraction in cfg.ablations.label_fractions:
        paper = PAPER["label_fraction"].get(fraction)
        folder = _fraction_folder(cfg, fraction)
        if folder.root == a.main.folder.root:
            result, source = _from_main(a, "student_refinement"), "main run"
        else:
            # A whole sub-run; the stand-in teacher's cache does not depend on the fraction.
            sub = copy.deepcopy(cfg)
            sub.name, sub.output_dir = folder.name, str(folder.root.parent)
            sub.data.labeled_fraction = fraction
            sub.data.split_file = None
            if cfg.shared_dir:  # the seeds of this fraction share its teacher stages
                sub.shared_dir = str(Path(cfg.shared_dir) / "ablations" / "label_fraction" / sub.name)
            report = Pipeline(sub, a.ctx).run()
            refined = next(r for r in report["rows"] if r["model"] == "student_refinement")
            result, source = {"AP": refined["AP"], "AP50": refined["AP50"]}, f"sub-run {sub.name}"
        rows.append(_row(f"{100 * fraction:g} % labeled", result, paper, source))
    return rows


STUDIES = {"losses": losses_study, "stages": stages_study, "samplers": samplers_study,
           "label_fraction": label_fraction_study, "pxl_weight": pxl_weight_study}
TITLES = {"losses": "Table 2: loss terms (student after transfer)", "stages": "Table 3: pipeline stages",
          "samplers": "Table 4: negative samplers (student after transfer)",
          "label_fraction": "Table 6: labeled fraction (refined student)",
          "pxl_weight": "the weight of L_pxl (student after transfer)"}
# The figures of a study, from its finished runs: one seed's, or the mean over the seeds of --seeds.
FIGURES = {"samplers": samplers_figure, "label_fraction": label_fraction_figure, "pxl_weight": pxl_weight_figure}


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def render_markdown(study: str, rows: list[dict[str, Any]], cfg: CastConfig, summary: dict[str, Any]) -> str:
    """The table; `summary`: seeds_summary's keys for a study over seeds, else {}."""
    seeds, failures = seeds_markdown(summary)
    over = f", mean ± std over {seeds}" if seeds else ""
    lines = [f"# Ablation, {TITLES[study]}", "",
             f"Run {cfg.name}: {cfg.data.kind} data, mask AP on val{over}. Paper: Cityscapes 10 % (for reference).",
             ""]
    # The paper's diagnostics where a variant trained with L_pxl (last quarter of its steps).
    diagnostics = any("pxl_margin" in r for r in rows)
    extra = " empirical margin | false-negative rate |" if diagnostics else ""
    lines += [f"| variant | AP | AP50 | paper AP | paper AP50 |{extra} source |",
              "| --- | ---: | ---: | ---: | ---: |" + " ---: | ---: |" * diagnostics + " --- |"]
    for r in rows:
        cells = (f" {fmt(r.get('pxl_margin'), 3)} | {fmt(r.get('pxl_false_negative_rate'), 4)} |"
                 if diagnostics else "")
        lines.append(f"| {r['variant']} | {spread(r, 'AP')} | {spread(r, 'AP50')} | {fmt(r['paper_AP'])} | "
                     f"{fmt(r['paper_AP50'])} |{cells} {r['source']} |")
    if failures:
        lines += [""] + failures
    return "\n".join(lines) + "\n"


def run_ablation(cfg: CastConfig, study: str, ctx: DistContext | None = None,
                 seeds: list[int] | None = None) -> dict[str, Any]:
    """Run one study (over `seeds`: each seed's in its folder, the table aggregated over them);
    writes ablations/<study>.json and .md (and the study's figure, whose path is "figure", None when
    it has none) and returns them with "markdown". `ctx` None: this process on cfg.device."""
    ctx = ctx or init_distributed(cfg.device)
    if study not in STUDIES:
        raise ValueError(f"unknown ablation study {study!r}; expected one of {', '.join(STUDIES)}")
    extra: dict[str, Any] = {}
    if seeds:
        tables, failures = over_seeds(cfg, seeds, lambda one: run_ablation(one, study, ctx), ctx)
        if not tables:
            raise RuntimeError(f"{cfg.run_dir}: every seed failed: {failures}")
        rows = aggregate_rows({s: t["rows"] for s, t in tables.items()}, "variant")
        extra = seeds_summary(seeds, failures, seed_config(cfg, seeds[0], seeds[0]).shared_dir)
        runs = [seed_config(cfg, s, seeds[0]) for s in tables]
    else:
        with exclusive_folder(cfg.run_dir, enabled=ctx.is_main, label="run folder"):
            rows = STUDIES[study](Ablation(cfg, study, ctx))
        runs = [cfg]
    root = RunFolder(cfg.run_dir).ablations
    markdown = render_markdown(study, rows, cfg, extra)
    table = {"study": study, "title": TITLES[study], "rows": rows, **extra, "figure": None, "markdown": markdown}
    if ctx.is_main:
        # Over seeds, runs/<name>/ is also their shared folder by default: wait for whoever writes it.
        with exclusive_folder(cfg.run_dir, label="run folder", wait=True):
            figure = FIGURES[study](runs, root / f"{study}.png") if study in FIGURES else None
            table["figure"] = None if figure is None else str(figure)
            atomic_write_json(root / f"{study}.json", {k: v for k, v in table.items() if k != "markdown"}, indent=2)
            atomic_write_text(root / f"{study}.md", markdown)
    barrier()
    return table
