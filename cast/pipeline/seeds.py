"""`--seeds 0,1,2`: one run (or ablation study) repeated over seeds of everything after the teacher,
reported as mean, spread and per-seed values, as researchers report results.

Seed k runs into runs/<name>/seed_<k>/ with `seed=k`. What the seeds share (the data, the split,
the stand-in teacher and the teacher stages with their pseudo-labels and evaluations) is made
once, under the first seed, in runs/<name>/ itself (`teacher_seed`, `shared_dir`): where a run
without seeds puts them, so `--seeds 0,1,2` after a plain run (or `make demo`) of seed 0 reuses
its teacher. Seeds may also run as processes of their own (`--seeds 1` beside `--seeds 2`, one per
core or GPU): they wait for whichever is making the shared teacher, then reuse it; `--seeds 1,2`
afterwards aggregates them. A seed that fails is recorded and the others still run; the aggregated
report says which failed.
"""
from __future__ import annotations

import copy
import statistics
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cast.config import CastConfig
from cast.utils.distributed import DistContext

AGGREGATED = ("AP", "AP50")  # each gets <key>_std and <key>_seeds beside its mean
# Means and deviations keep a decimal more than the per-seed rows, so that the one-decimal tables
# do not round twice (a deviation of 1.953 stored as 1.95 would read 1.9).
STAT_DIGITS = 3


def parse_seeds(text: str) -> list[int]:
    """"0,1,2" -> [0, 1, 2]; ValueError for anything else (negative, repeated, empty)."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: expected distinct non-negative integers, e.g. 0,1,2")
    return seeds


def seed_config(cfg: CastConfig, seed: int, first: int) -> CastConfig:
    """The config of one seed: runs/<name>/seed_<seed>/, sharing what comes before the student."""
    one = copy.deepcopy(cfg)
    one.output_dir, one.name, one.seed = str(cfg.run_dir), f"seed_{seed}", seed
    one.teacher_seed = cfg.shared_seed if cfg.teacher_seed is not None else first
    one.shared_dir = cfg.shared_dir or str(cfg.run_dir)
    return one


def over_seeds(cfg: CastConfig, seeds: Sequence[int], run_one: Callable[[CastConfig], Any],
               ctx: DistContext = DistContext()) -> tuple[dict[int, Any], dict[int, str]]:
    """`run_one(seed config)` for every seed: ({seed: result}, {seed: error}) in seed order; a seed's
    exception is recorded (and printed) and the next seed runs."""
    results, failures = {}, {}
    for seed in seeds:
        try:
            results[seed] = run_one(seed_config(cfg, seed, seeds[0]))
        except Exception as e:  # noqa: BLE001 - whatever failed, the other seeds' work is kept
            failures[seed] = f"{type(e).__name__}: {e}"
            if ctx.is_main:
                traceback.print_exc()
    return results, failures


def _mean_digits(field: str) -> int | None:
    """The decimals kept by the mean over seeds of a row's `field`; None: the first seed's value is kept."""
    if field.startswith("pxl_"):
        return 4  # the diagnostics: a false-negative rate near 0.005 would read 0.0 at two decimals
    if field in AGGREGATED:
        return STAT_DIGITS
    return 2 if field in ("wall_s", "latency_ms") else None


def aggregate_rows(rows_by_seed: dict[int, list[dict[str, Any]]], key: str) -> list[dict[str, Any]]:
    """One row per `key` value (the order of the first seed's rows): AP and AP50 as the mean over
    seeds with `AP_std` (sample standard deviation; 0 for one seed) and `AP_seeds` ({seed: AP}),
    other numbers averaged, the rest as the first seed has them."""
    seeds = sorted(rows_by_seed)
    out = []
    for first in rows_by_seed[seeds[0]]:
        rows = {s: next((r for r in rows_by_seed[s] if r[key] == first[key]), None) for s in seeds}
        rows = {s: r for s, r in rows.items() if r is not None}
        merged = dict(first)
        for field, value in first.items():
            values = [r.get(field) for r in rows.values()]
            digits = _mean_digits(field)
            if digits is not None:
                numbers = [v for v in values if isinstance(v, (int, float))]
                merged[field] = round(statistics.fmean(numbers), digits) if numbers else None
            if field in AGGREGATED:
                numbers = [v for v in values if isinstance(v, (int, float))]
                merged[f"{field}_std"] = round(statistics.stdev(numbers), STAT_DIGITS) if len(numbers) > 1 else 0.0
                merged[f"{field}_seeds"] = {str(s): r.get(field) for s, r in rows.items()}
        out.append(merged)
    return out


def seeds_summary(seeds: Sequence[int], failures: dict[int, str], shared_dir: str | Path) -> dict[str, Any]:
    return {"seeds": list(seeds), "failed_seeds": {str(s): e for s, e in failures.items()},
            "shared_dir": str(shared_dir)}


def seeds_markdown(summary: dict[str, Any]) -> tuple[str, list[str]]:
    """("seeds 0, 2", ["- Seed 1 failed: ..."]) for a report or table with `seeds_summary`'s keys: the
    seeds its means are over (never one that failed) and a line per failure; ("", []) without seeds."""
    failed = summary.get("failed_seeds") or {}
    averaged = [s for s in summary.get("seeds") or [] if str(s) not in failed]
    over = f"seeds {', '.join(map(str, averaged))}" if averaged else ""
    return over, [f"- Seed {seed} failed: {error}" for seed, error in failed.items()]
