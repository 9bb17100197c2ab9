"""Loss / AP figures written next to the metrics (matplotlib, headless Agg backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cast.training.metrics import read_metrics  # noqa: E402
from cast.utils.io import atomic_save  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> None:
    atomic_save(path, lambda p: fig.savefig(p, dpi=100, bbox_inches="tight", format="png"))
    plt.close(fig)


def plot_training_curves(metrics_path: str | Path, out_dir: str | Path, title: str = "") -> list[Path]:
    """loss.png (every `loss*` series against the step) and, when the run evaluated during
    training, ap.png. Returns the written paths."""
    records = read_metrics(metrics_path)
    out_dir = Path(out_dir)
    written = []
    loss_keys = sorted({k for r in records for k in r if k.startswith("loss") and r[k] is not None})
    if loss_keys:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in loss_keys:
            pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            ax.plot(*zip(*pts), label=key, linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.set_title(f"{title} losses".strip())
        ax.legend(fontsize=7)
        _save(fig, out_dir / "loss.png")
        written.append(out_dir / "loss.png")
    ap = [(r["step"], r["val_AP"]) for r in records if r.get("val_AP") is not None]
    if ap:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(*zip(*ap), marker="o")
        ax.set_xlabel("step")
        ax.set_ylabel("val mask AP")
        ax.set_title(f"{title} AP".strip())
        _save(fig, out_dir / "ap.png")
        written.append(out_dir / "ap.png")
    return written


def plot_report(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Bar chart of AP and AP50 per model of the report table."""
    path = Path(path)
    names = [r["name"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 1.3), 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["AP"] or 0 for r in rows], width=0.4, label="AP")
    ax.bar([x + 0.2 for x in xs], [r["AP50"] or 0 for r in rows], width=0.4, label="AP50")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("mask AP (val)")
    ax.legend()
    _save(fig, path)
    return path
