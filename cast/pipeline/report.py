"""The Table-1-style summary of a run: report.json (rows + resolved config) and report.md (the
same table with the published numbers of the CAST paper beside it: Taghavi et al., arXiv
2505.21904, Table 1), the contrastive diagnostics of each stage and where its walls were timed."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from cast.config import CastConfig, config_to_dict
from cast.pipeline.seeds import seeds_markdown
from cast.utils.io import atomic_write_json, atomic_write_text
from cast.utils.machine import describe_machine

# (row key, display name) in table order; the keys are the model names of predictions/.
ROWS = (
    ("teacher_zero_shot", "teacher zero-shot"),
    ("teacher_adaptation", "teacher supervised fine-tuning (1a)"),
    ("teacher_self_training", "teacher CAST-adapted (1b)"),
    ("student_supervised", "student supervised only"),
    ("knowledge_transfer", "CAST student after transfer (2)"),
    ("student_refinement", "CAST student after refinement (3)"),
)

# Published mask AP / AP50 on val with 10 % labels: (Cityscapes, ADE20K).
PAPER_TABLE1 = {
    "teacher_zero_shot": ((22.0, 42.3), (8.1, 18.2)),
    "teacher_adaptation": ((28.7, 53.4), (14.2, 23.5)),
    "teacher_self_training": ((30.5, 56.6), (15.2, 24.5)),
    "student_supervised": ((21.1, 38.7), (13.9, 24.2)),
    "knowledge_transfer": ((32.2, 56.5), (16.1, 27.4)),
    "student_refinement": ((33.9, 58.7), (16.7, 28.0)),
}
PAPER_EFFICIENCY = ("teacher 568 M parameters, 880 GFLOPs, 350.9 ms; student 52 M, 200 GFLOPs, 76.9 ms "
                    "(hardware and resolution not stated)")


def make_row(key: str, metrics: dict[str, Any], efficiency: dict[str, float], wall_s: float | None,
             diagnostics: dict[str, float] | None = None) -> dict:
    """One table row; `metrics` AP and AP50 in percent (0-100) like the paper (on Cityscapes also
    the official metric); `diagnostics` the stage's contrastive diagnostics (metrics.diagnostics_summary)."""
    name = dict(ROWS).get(key, key)
    row = {"name": name, "model": key, "AP": _round(metrics.get("AP")), "AP50": _round(metrics.get("AP50")),
           "params_m": efficiency.get("params_m"), "gflops": efficiency.get("gflops"),
           "latency_ms": efficiency.get("latency_ms"), "wall_s": wall_s}
    if "cityscapes" in metrics:
        row["cityscapes_AP"] = _round(metrics["cityscapes"]["AP"])
        row["cityscapes_AP50"] = _round(metrics["cityscapes"]["AP50"])
    row.update({k: round(v, 4) for k, v in (diagnostics or {}).items()})
    return row


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 2)


def make_report(rows: list[dict], cfg: CastConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    order = {key: i for i, (key, _) in enumerate(ROWS)}
    rows = sorted(rows, key=lambda r: order.get(r["model"], len(order)))
    return {"rows": rows, "config": config_to_dict(cfg), "goals": goals(rows), **(extra or {})}


# The demo's claims, the paper's orderings: (goal, model, compared with, by at least this AP, wording).
CLAIMS = (
    ("student_over_supervised", "student_refinement", "student_supervised", 5.0,
     "Refined student vs supervised-only student"),
    ("student_over_adapted_teacher", "student_refinement", "teacher_self_training", 0.0,
     "Refined student vs adapted teacher (1b)"),
    ("self_training_over_adaptation", "teacher_self_training", "teacher_adaptation", 1.0,
     "Adapted teacher (1b) vs teacher after 1a"),
    ("adapted_over_zero_shot", "teacher_self_training", "teacher_zero_shot", 0.0,
     "Adapted teacher (1b) vs zero-shot teacher"),
)


def goals(rows: list[dict]) -> dict[str, Any]:
    """Each claim of CLAIMS the rows can decide: {goal: {"gain_ap", "at_least", "met"}} (on the mean
    over seeds when the rows are aggregated)."""
    ap = {r["model"]: r["AP"] for r in rows}
    out = {}
    for goal, model, other, margin, _ in CLAIMS:
        if ap.get(model) is not None and ap.get(other) is not None:
            gain = round(ap[model] - ap[other], 2)
            out[goal] = {"gain_ap": gain, "at_least": margin, "met": gain >= margin}
    return out


def fmt(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def spread(row: dict[str, Any], key: str) -> str:
    """The value, with its standard deviation over seeds when the row is aggregated."""
    std = row.get(f"{key}_std")
    return fmt(row[key]) if std is None else f"{fmt(row[key])} ± {std:.1f}"


def render_markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [f"# CAST report: {cfg['name']}", "",
             f"Data: {cfg['data']['kind']} ({cfg['data']['root']}), {100 * cfg['data']['labeled_fraction']:g} % "
             f"labeled; teacher {cfg['teacher']['kind']} ({cfg['teacher']['preset']}), "
             f"student {cfg['student']['preset']}. Mask AP on the val set.", "",
             "| model | AP | AP50 | params (M) | GFLOPs | latency (ms) | stage wall (s) "
             "| paper Cityscapes AP / AP50 | paper ADE20K AP / AP50 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["rows"]:
        paper = PAPER_TABLE1.get(r["model"])
        city = f"{paper[0][0]:.1f} / {paper[0][1]:.1f}" if paper else "-"
        ade = f"{paper[1][0]:.1f} / {paper[1][1]:.1f}" if paper else "-"
        lines.append(f"| {r['name']} | {spread(r, 'AP')} | {spread(r, 'AP50')} | {fmt(r['params_m'])} | "
                     f"{fmt(r['gflops'], 2)} | {fmt(r['latency_ms'])} | {fmt(r.get('wall_s'), 0)} | {city} | {ade} |")
    if any("AP_seeds" in r for r in report["rows"]):
        lines += ["", "AP per seed: " + "; ".join(
            f"{r['name']} " + " / ".join(f"{fmt(v)}" for v in r["AP_seeds"].values()) for r in report["rows"]) + "."]
    if any("cityscapes_AP" in r for r in report["rows"]):
        lines += ["", "Official Cityscapes metric (cityscapesscripts), AP / AP50: " + "; ".join(
            f"{r['name']} {fmt(r.get('cityscapes_AP'))} / {fmt(r.get('cityscapes_AP50'))}" for r in report["rows"])
            + "."]
    lines += ["", f"Paper efficiency, for reference: {PAPER_EFFICIENCY}.", ""]
    lines += _diagnostic_lines(report["rows"])
    seeds, failures = seeds_markdown(report)
    over = f" (mean over {seeds})" if seeds else ""
    for goal, _, _, margin, wording in CLAIMS:
        if goal in report.get("goals", {}):
            g = report["goals"][goal]
            lines.append(f"- {wording}: {g['gain_ap']:+.1f} AP{over} ({'meets' if g['met'] else 'misses'} "
                         f"the >= {margin:g} AP goal).")
    lines += failures
    lines += _wall_lines(report)
    return "\n".join(lines) + "\n"


def _diagnostic_lines(rows: list[dict]) -> list[str]:
    """The paper's diagnostics of the stages trained with L_pxl (last quarter of their steps)."""
    with_pxl = [r for r in rows if "pxl_margin" in r]
    if not with_pxl:
        return []
    lines = ["Contrastive diagnostics, mean over the last quarter of each stage's steps (the paper's "
             "Proposition 3.1 asks p = 1 - FNR > 0.5):", "",
             "| stage | empirical margin | sampler false-negative rate (FNR) | p = 1 - FNR |", "| --- | ---: | ---: | ---: |"]
    for r in with_pxl:
        fnr = r.get("pxl_false_negative_rate")
        lines.append(f"| {r['name']} | {r['pxl_margin']:.3f} | {fmt(fnr, 3)} | {fmt(None if fnr is None else 1 - fnr, 3)} |")
    return lines + [""]


def _wall_lines(report: dict[str, Any]) -> list[str]:
    # Stage walls come from each stage's summary, so they hold whichever process trained it (the
    # CLI or a stage notebook); this process's wall only counts what it did not find complete.
    walls = {r["model"]: r.get("wall_s") for r in report["rows"]}
    stages = [w for key, w in walls.items() if key != "teacher_zero_shot" and w is not None]
    lines = []
    if stages:
        pretrain = walls.get("teacher_zero_shot")
        once = f"; teacher pretraining {pretrain:.0f} s (once, then cached)" if pretrain else ""
        lines.append(f"- Training wall time: stages 1a-3 and the baseline {sum(stages):.0f} s{once}.")
    # The same steps took 2.5x longer on one host of the VM than on another: say where each was timed.
    machines: dict[str, list[str]] = {}
    for stage, machine in report.get("stage_machines", {}).items():
        machines.setdefault(machine, []).append(stage)
    if len(machines) == 1:
        lines.append(f"- Stage walls measured on {next(iter(machines))}.")
    elif machines:
        lines.append("- Stage walls measured on: " + "; ".join(f"{m} ({', '.join(stages)})"
                                                             for m, stages in machines.items()) + ".")
    if "total_wall_s" in report:
        on = f" on {describe_machine(report['machine'])}" if report.get("machine") else ""
        lines.append(f"- This invocation: {report['total_wall_s']:.0f} s{on} (complete stages are loaded, "
                     "not retrained).")
    return lines


def write_report(report: dict[str, Any], json_path: str | Path, md_path: str | Path) -> None:
    atomic_write_json(json_path, report, indent=2)
    atomic_write_text(md_path, render_markdown(report))
