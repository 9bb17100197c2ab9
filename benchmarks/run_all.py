"""Run every benchmark, each in its own process writing <output-dir>/<name>.json, then print one
summary table (ours, comparison, ratio, goal, met?) and write <output-dir>/summary.json and
<output-dir>/SUMMARY.md, with the machine each figure came from.

    python benchmarks/run_all.py                      # full sizes -> benchmarks/results/
    python benchmarks/run_all.py --quick              # smoke sizes -> runs/benchmarks-quick/
    python benchmarks/run_all.py --only training      # one (or a few); the summary covers every
                                                      # results file in the folder
    python benchmarks/run_all.py --devices cuda       # passed on: --devices, --amp, --threads

A benchmark that fails is reported and the others still run; the exit status is then 1.
"""
from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, ROOT, fmt  # noqa: E402
from cast.utils.io import atomic_write_json, atomic_write_text, read_json  # noqa: E402

BENCHMARKS = {
    "contrastive": "bench_contrastive.py",
    "models": "bench_models.py",
    "training": "bench_training.py",
    "inference": "bench_inference.py",
    "pseudo_label": "bench_pseudo_label.py",
}
QUICK_DIR = ROOT / "runs" / "benchmarks-quick"  # git-ignored: a smoke run never touches real results
COLUMNS = ("benchmark", "case", "metric", "ours", "comparison", "ratio", "goal", "met")


def run_benchmark(name: str, args: argparse.Namespace, passthrough: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve().parent / BENCHMARKS[name]),
           "--output", str(args.output_dir / f"{name}.json"), *passthrough]
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    code = subprocess.run(cmd).returncode  # output streams straight to the console
    return {"exit_code": code, "seconds": round(time.perf_counter() - start, 1)}


def collect(output_dir: Path) -> tuple[list[dict], dict[str, dict], list[str]]:
    """Summary rows and machines of every results file in `output_dir`, and the files that are not
    in the current format (e.g. written by an older script: rerun that benchmark)."""
    rows, machines, stale = [], {}, []
    for name in BENCHMARKS:
        path = output_dir / f"{name}.json"
        if not path.is_file():
            continue
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("runs"), dict):
            stale.append(path.name)
            continue
        for device, run in data["runs"].items():
            machines[f"{name} ({device})"] = run["machine"]
            rows += [{**row, "device": device} for row in run["summary"]]
    return rows, machines, stale


def _cell(row: dict, column: str) -> str:
    value = row[column]
    if column == "ratio":
        return f"{value:.2f}x" if value is not None else "-"
    if column == "met":
        return "-" if value is None else ("yes" if value else "**no**")
    return fmt(value)


def markdown(rows: list[dict], machines: dict[str, dict], stale: list[str], runs: dict[str, dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "| " + " | ".join("---" for _ in COLUMNS) + " |"]
    lines += ["| " + " | ".join(_cell(row, c).replace("|", "/") for c in COLUMNS) + " |" for row in rows]
    lines += ["", "Ratios are oriented so that > 1 favours ours. Machines:", ""]
    for key, m in machines.items():
        gpu = m.get("gpu")
        gpu = f", GPU {gpu['name']} ({gpu['memory_gib']} GiB, CUDA {gpu['cuda']})" if gpu else ""
        lines.append(f"- {key}: {m['date_utc']}, {m['cpu_model']} ({m.get('cpu_capability', 'ISA not recorded')}), "
                     f"{m['usable_cpus']} usable CPUs "
                     f"({m['torch_threads']} torch threads), {m['memory_gib']} GiB{gpu}; torch {m['torch']}; "
                     f"load average at start/end {m['load_average_start'][0]}/{m.get('load_average_end', ['?'])[0]}")
    for path in stale:
        lines.append(f"- {path}: not in the current results format; rerun that benchmark")
    for name, run in runs.items():
        status = "ok" if run["exit_code"] == 0 else f"FAILED (exit {run['exit_code']})"
        lines.append(f"- this run: {name} {status} in {run['seconds']} s")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke sizes, written to runs/benchmarks-quick/")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these benchmarks")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="default: benchmarks/results (runs/benchmarks-quick with --quick)")
    parser.add_argument("--devices", nargs="+", default=None)
    parser.add_argument("--amp", default=None)
    parser.add_argument("--threads", default=None)
    args = parser.parse_args(argv)
    args.output_dir = args.output_dir or (QUICK_DIR if args.quick else RESULTS_DIR)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    passthrough = ["--quick"] if args.quick else []
    if args.devices:
        passthrough += ["--devices", *args.devices]
    for flag in ("amp", "threads"):
        if getattr(args, flag) is not None:
            passthrough += [f"--{flag}", str(getattr(args, flag))]

    runs = {name: run_benchmark(name, args, passthrough) for name in (args.only or BENCHMARKS)}
    rows, machines, stale = collect(args.output_dir)
    table = markdown(rows, machines, stale, runs)
    print("\n" + table, flush=True)
    atomic_write_json(args.output_dir / "summary.json",
                      {"generated_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "quick": args.quick, "this_run": runs, "rows": rows, "machines": machines,
                       "stale_files": stale}, indent=2)
    atomic_write_text(args.output_dir / "SUMMARY.md", "# Benchmark summary\n\n" + table)
    print(f"wrote {args.output_dir / 'summary.json'} and {args.output_dir / 'SUMMARY.md'}")
    return 0 if all(run["exit_code"] == 0 for run in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
