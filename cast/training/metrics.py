"""Per-step metrics as json lines (one object per line, `step` first)."""
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


class MetricsLogger:
    """Appends records to metrics.jsonl; only the main process writes."""

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (a resumed run logs them again)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

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
