"""Per-step metrics as json lines (one object per line, `step` first), mirrored as TensorBoard
scalars beside them (`tensorboard --logdir runs/` shows every stage of every run and seed)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from cast.utils.io import atomic_write_text


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file ([] when it does not exist); a torn last line (a
    process killed mid-write) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def tensorboard_tag(key: str) -> str:
    """TensorBoard groups scalars by the part before "/": losses, the contrastive diagnostics,
    validation metrics and the rest (lr, grad_norm, time)."""
    group = ("loss" if key.startswith("loss") else "contrastive" if key.startswith("pxl_")
             else "val" if key.startswith("val_") else "train")
    return f"{group}/{key}"


class MetricsLogger:
    """Appends records to metrics.jsonl and TensorBoard event files in the same folder; only the
    main process writes."""

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._writer = None
        self._purge_step: int | None = None

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (a resumed run logs them again; TensorBoard is told to
        drop them from its earlier event files too)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._purge_step = step + 1

    def _tensorboard(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.path.parent), purge_step=self._purge_step, flush_secs=30)
        return self._writer

    def close(self) -> None:
        """Flush and close the TensorBoard file (the jsonl is written line by line)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step}
        for k, v in values.items():
            # json has no NaN/inf; keep the record valid and the problem visible.
            record[k] = None if isinstance(v, float) and not math.isfinite(v) else v
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a failed write (disk full) names no file; say which one
            if e.errno is None or e.filename is not None:
                raise
            raise OSError(e.errno, e.strerror, str(self.path)) from e
        writer = self._tensorboard()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(tensorboard_tag(key), value, step)


def diagnostics_summary(path: str | Path, tail: float = 0.25) -> dict[str, float]:
    """The contrastive diagnostics of a stage (empirical margin, sampler false-negative rate), each
    averaged over its parts (labeled / unlabeled) and the last `tail` of the logged steps; {} when
    the stage had no L_pxl."""
    records = read_metrics(path)
    summary = {}
    for name, prefix in (("pxl_margin", "pxl_margin_"), ("pxl_false_negative_rate", "pxl_false_negative_rate_")):
        logged = [r for r in records if any(k.startswith(prefix) and r[k] is not None for k in r)]
        last = logged[int(len(logged) * (1 - tail)):]
        values = [r[k] for r in last for k in r if k.startswith(prefix) and r[k] is not None]
        if values:
            summary[name] = sum(values) / len(values)
    return summary
