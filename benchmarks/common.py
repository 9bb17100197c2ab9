"""What every benchmark script shares: devices and precision, the machine's description, timing
with warm-up, peak memory, and the results file (one entry per device kind, plus summary rows).

Results file `benchmarks/results/<name>.json`:
    {"benchmark": name,
     "runs": {"cpu": {"machine": {...}, "settings": {...}, "results": [...], "summary": [...]},
              "cuda": {...}}}
A run replaces the entries of the devices it measured and keeps the others, so figures from a
CPU machine and from a GPU machine can live in one file. Summary rows are what run_all.py
tabulates: {"benchmark", "case", "metric", "ours", "comparison", "ratio", "goal", "met"}.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the scripts run as files, not as an installed package
    sys.path.insert(0, str(ROOT))

from cast.efficiency import CpuPeakMemory  # noqa: E402
from cast.utils.io import atomic_write_json, read_json  # noqa: E402
from cast.utils.machine import machine_info as _machine_info, package_version, usable_cpus  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def add_common_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--devices", nargs="+", default=None,
                        help="cpu and/or cuda (default: cuda when available, else cpu)")
    parser.add_argument("--amp", choices=list(AMP_DTYPES), default="bf16",
                        help="autocast precision on CUDA (the CPU always runs float32)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: every core this process may use)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the script, in seconds")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / f"{name}.json")


def setup(args: argparse.Namespace) -> list[torch.device]:
    """Fix the thread count and the seeds; the devices to measure on."""
    torch.set_num_threads(args.threads or usable_cpus())
    torch.manual_seed(0)
    names = args.devices or (["cuda"] if torch.cuda.is_available() else ["cpu"])
    devices = []
    for name in names:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"--devices {name}: CUDA is not available on this machine")
        devices.append(device)
    return devices


def precision(device: torch.device, amp: str) -> str:
    """The precision a device runs at: autocast on CUDA as asked, float32 on the CPU (CPU
    autocast is slower than float32 on CPUs without bfloat16 units)."""
    return amp if device.type == "cuda" and amp != "none" else "fp32"


def autocast_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    return AMP_DTYPES[amp] if precision(device, amp) != "fp32" else None


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    dtype = autocast_dtype(device, amp)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device: torch.device) -> dict[str, Any]:
    """`cast.utils.machine.machine_info` plus the onnxruntime version the inference benchmark uses."""
    return {**_machine_info(device), "onnxruntime": package_version("onnxruntime")}


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls of `fn` after `warmup` untimed ones (which also absorb
    one-off costs: lazy initialisation, allocator growth, kernel selection)."""
    for _ in range(warmup):
        fn()
    sync(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def time_stats(seconds: list[float]) -> dict[str, float]:
    """Median and spread (min, max, (max - min) / median) of timed calls, in milliseconds."""
    median = statistics.median(seconds)
    return {"median_ms": median * 1e3, "min_ms": min(seconds) * 1e3, "max_ms": max(seconds) * 1e3,
            "spread_pct": 100.0 * (max(seconds) - min(seconds)) / median, "repeats": len(seconds)}


class PeakMemory:
    """Extra memory at the high-water mark of a code region, in MiB, over the state at its start:
    on CUDA torch's allocated-memory peak; on the CPU the resident-set peak (see
    `cast.efficiency.CpuPeakMemory`; tracemalloc does not see torch's CPU allocations)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.source = "cuda_max_allocated" if device.type == "cuda" else None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._cpu = CpuPeakMemory()
            self._cpu.start()
            self.source = self._cpu.source
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        else:
            self.mb = self._cpu.peak_mb()


def summary_row(benchmark: str, case: str, metric: str, ours: float | None, comparison: float | None,
                ratio: float | None, goal: str | None = None, met: bool | None = None) -> dict[str, Any]:
    """One line of the summary table; `ratio` is oriented so that > 1 favours ours."""
    return {"benchmark": benchmark, "case": case, "metric": metric, "ours": ours, "comparison": comparison,
            "ratio": ratio, "goal": goal, "met": met}


def write_results(path: Path, benchmark: str, runs: dict[str, dict[str, Any]]) -> None:
    """Store this run's per-device entries (each gets its end-of-run load average), keeping the
    entries of devices not measured this time."""
    load_end = [round(v, 2) for v in os.getloadavg()]
    for entry in runs.values():
        entry["machine"]["load_average_end"] = load_end
    kept = {}
    if path.is_file():
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            previous = read_json(path)
            if previous.get("benchmark") == benchmark:
                kept = previous.get("runs", {})
    atomic_write_json(path, {"benchmark": benchmark, "runs": {**kept, **runs}}, indent=2)
    print(f"wrote {path}", flush=True)


def measure_devices(path: Path, benchmark: str, devices: list[torch.device],
                    measure: Callable[[torch.device], dict[str, Any]]) -> None:
    """Run `measure` (a per-device entry with "machine" and "summary") on every device, print each
    summary and store them all (see write_results)."""
    runs = {}
    for device in devices:
        runs[device.type] = measure(device)
        print_summary(runs[device.type]["summary"])
    write_results(path, benchmark, runs)


def print_summary(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-"
        goal = f"  goal {row['goal']}: {'met' if row['met'] else 'NOT met'}" if row["goal"] else ""
        print(f"  {row['case']}: {row['metric']}: ours {fmt(row['ours'])}, comparison {fmt(row['comparison'])}, "
              f"ratio {ratio}{goal}", flush=True)


def fmt(value: Any) -> str:
    """Numbers to 3 significant digits (whole numbers from 100 on); anything else as text."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
