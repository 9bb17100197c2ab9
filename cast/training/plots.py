"""Figures written next to the metrics: loss and AP curves, the contrastive diagnostics, the
report's AP bars. Each is drawn on its own matplotlib Figure and saved with savefig, which needs
no pyplot and no global backend: importing this module changes nothing for a notebook's figures."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from cast.training.metrics import read_metrics
from cast.utils.io import atomic_save

# Contrastive diagnostics the trainer logs per part (labeled / unlabeled), with their axis labels.
DIAGNOSTICS = {"pxl_margin": "empirical margin (neg - pos distance)",
               "pxl_false_negative_rate": "sampler false-negative rate"}


def _save(fig: Figure, path: Path) -> Path:
    atomic_save(path, lambda p: fig.savefig(p, dpi=100, bbox_inches="tight", format="png"))
    return path


def _series(records: list[dict[str, Any]], key: str) -> tuple[list, list]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return tuple(zip(*points)) if points else ((), ())


def plot_training_curves(metrics_path: str | Path, out_dir: str | Path, title: str = "") -> list[Path]:
    """loss.png (every `loss*` series against the step), diagnostics.png (the contrastive loss's
    empirical margin and false-negative rate, when the stage had L_pxl) and, when the stage
    evaluated during training, ap.png. Returns the written paths."""
    records = read_metrics(metrics_path)
    out_dir = Path(out_dir)
    written = []
    loss_keys = sorted({k for r in records for k in r if k.startswith("loss") and r[k] is not None})
    if loss_keys:
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        for key in loss_keys:
            ax.plot(*_series(records, key), label=key, linewidth=1)
        ax.set(xlabel="step", ylabel="loss", yscale="log", title=f"{title} losses".strip())
        ax.legend(fontsize=7)
        written.append(_save(fig, out_dir / "loss.png"))
    fig = _diagnostics_figure({"": records}, f"{title} contrastive diagnostics".strip())
    if fig is not None:
        written.append(_save(fig, out_dir / "diagnostics.png"))
    ap = _series(records, "val_AP")
    if ap[0]:
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        ax.plot(*ap, marker="o")
        ax.set(xlabel="step", ylabel="val mask AP", title=f"{title} AP".strip())
        written.append(_save(fig, out_dir / "ap.png"))
    return written


def _diagnostics_figure(runs: dict[str, list[dict[str, Any]]], title: str, window: int = 1) -> Figure | None:
    """One panel per contrastive diagnostic; a colour per run, solid for the labeled part and
    dashed for the unlabeled one; each curve a running mean over `window` steps."""
    present = [d for d in DIAGNOSTICS if any(k.startswith(d) for records in runs.values() for r in records for k in r)]
    if not present:
        return None
    fig = Figure(figsize=(6, 3.2 * len(present)))
    for ax, diagnostic in zip(fig.subplots(len(present), 1, squeeze=False)[:, 0], present):
        for colour, (name, records) in enumerate(runs.items()):
            for key in sorted({k for r in records for k in r if k.startswith(diagnostic)}):
                part = key.removeprefix(f"{diagnostic}_")
                steps, values = _series(records, key)
                if window > 1 and len(values) >= window:
                    values = np.convolve(values, np.ones(window) / window, mode="valid")
                    steps = steps[window - 1:]
                ax.plot(steps, values, label=f"{name} {part}".strip(), linewidth=1, color=f"C{colour}",
                        linestyle="--" if part == "unlabeled" else "-")
        ax.set(xlabel="step", ylabel=DIAGNOSTICS[diagnostic])
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return fig


def mean_records(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The metrics records of several runs of one stage (e.g. its seeds) averaged step by step, each
    key over the runs that logged it at that step."""
    by_step: dict[int, list[dict[str, Any]]] = {}
    for records in runs:
        for r in records:
            if r.get("step") is not None:
                by_step.setdefault(r["step"], []).append(r)
    merged = []
    for step, records in sorted(by_step.items()):
        keys = dict.fromkeys(k for r in records for k in r if k != "step")
        values = {k: [r[k] for r in records if isinstance(r.get(k), (int, float)) and not isinstance(r[k], bool)]
                  for k in keys}
        merged.append({"step": step, **{k: float(np.mean(v)) if v else None for k, v in values.items()}})
    return merged


def plot_diagnostics(metrics: dict[str, list[str | Path]], path: str | Path, title: str,
                     window: int = 20) -> Path | None:
    """The contrastive diagnostics of several stages (name -> the metrics.jsonl of its seeds, averaged)
    on shared axes, e.g. the transfer stage under each negative sampler, as running means over
    `window` steps so that the runs can be told apart; None when none of them logged any."""
    runs = {name: mean_records([read_metrics(m) for m in paths]) for name, paths in metrics.items()}
    fig = _diagnostics_figure(runs, title, window)
    return None if fig is None else _save(fig, Path(path))


def plot_report(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Bar chart of AP and AP50 per model of the report table."""
    names = [r["name"] for r in rows]
    fig = Figure(figsize=(max(6, len(rows) * 1.3), 4))
    ax = fig.subplots()
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["AP"] or 0 for r in rows], width=0.4, label="AP")
    ax.bar([x + 0.2 for x in xs], [r["AP50"] or 0 for r in rows], width=0.4, label="AP50")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("mask AP (val)")
    ax.legend()
    return _save(fig, Path(path))


def plot_label_fractions(reports: list[dict[float, list[dict[str, Any]]]], path: str | Path, title: str) -> Path:
    """Mask AP of every model of the report against the labeled fraction, a line per model: the mean
    over `reports` (one {fraction: report rows} per seed) with the sample standard deviation as error
    bars, so one sees where the student passes its teacher and where labels alone catch up."""
    fractions = sorted({f for report in reports for f in report})
    names = list(dict.fromkeys(row["name"] for report in reports for f in fractions for row in report.get(f, [])))
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name in names:
        points = [(100 * f, [row["AP"] for report in reports for row in report.get(f, [])
                             if row["name"] == name and row["AP"] is not None]) for f in fractions]
        points = [(x, aps) for x, aps in points if aps]
        ax.errorbar([x for x, _ in points], [np.mean(aps) for _, aps in points],
                    yerr=[np.std(aps, ddof=1) if len(aps) > 1 else 0.0 for _, aps in points],
                    marker="o", capsize=3, linewidth=1, label=name)
    ax.set(xscale="log", xlabel="labeled images (%)", ylabel="val mask AP", title=title)
    ax.set_xticks([100 * f for f in fractions], [f"{100 * f:g}" for f in fractions])
    ax.minorticks_off()
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return _save(fig, Path(path))
