"""The benchmark scripts run end to end at their smallest sizes and write the results files that
run_all.py tabulates, so they cannot rot unnoticed; the contrastive sweep's size rule and growth
fit are checked on numbers with a known answer."""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_contrastive  # noqa: E402
import run_all  # noqa: E402

MACHINE_FIELDS = {"date_utc", "cpu_model", "usable_cpus", "torch_threads", "torch", "device", "gpu",
                  "load_average_start", "load_average_end"}


def test_sweep_stops_at_the_largest_size_the_dense_reference_fits():
    args = argparse.Namespace(sizes=None, batch=8, min_side=16)
    budget = 2 * 4 * (8 * 75 * 75) ** 2  # float32 keys + noise for N = 75²
    sizes = bench_contrastive.sweep_sizes(args, element_bytes=4, budget=budget)
    assert sizes == [16 * 16, 23 * 23, 32 * 32, 45 * 45, 64 * 64, 75 * 75]
    assert all(bench_contrastive.dense_bytes(8, n, 4) <= budget for n in sizes)
    fit, last = bench_contrastive.growth([1, 2, 4, 8], [3.0 * x ** 2 for x in (1, 2, 4, 8)])
    assert fit == pytest.approx(2.0) and last == pytest.approx(2.0)


@pytest.mark.slow
@pytest.mark.distributed
def test_quick_run_writes_every_results_file_and_the_summary(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # One thread per process, the inference run beside the others (2 cores): a smoke run must not
    # depend on an idle machine. torch.compile would compile for minutes: left out here.
    log = tmp_path / "inference.log"
    with log.open("w") as out:  # a file, not a pipe: nobody reads a pipe while run_all runs
        inference = subprocess.Popen([sys.executable, str(BENCH / "bench_inference.py"), "--quick", "--no-compile",
                                      "--threads", "1", "--output", str(tmp_path / "inference.json")],
                                     stdout=out, stderr=subprocess.STDOUT, env=env)
        done = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--quick", "--threads", "1",
                               "--output-dir", str(tmp_path), "--only", "contrastive", "models", "training",
                               "pseudo_label"], capture_output=True, text=True, env=env)
        inference.wait()
    assert inference.returncode == 0, log.read_text()[-3000:]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # The summary was written before the inference results were there: tabulate again.
    rows, _, stale = run_all.collect(tmp_path)
    assert {r["benchmark"] for r in rows} == set(run_all.BENCHMARKS) and not stale

    for name in run_all.BENCHMARKS:
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert data["benchmark"] == name and set(data["runs"]) == {"cpu"}
        run = data["runs"]["cpu"]
        assert MACHINE_FIELDS <= set(run["machine"]) and run["machine"]["device"] == "cpu"
        assert run["settings"] and run["results"] and run["summary"]
        for row in run["summary"]:
            assert set(run_all.COLUMNS) <= set(row) and row["benchmark"] == name
            assert row["ratio"] is None or (math.isfinite(row["ratio"]) and row["ratio"] > 0)
            assert (row["met"] is None) == (row["goal"] is None)

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["quick"] and not summary["stale_files"] and summary["rows"]
    assert all(run["exit_code"] == 0 for run in summary["this_run"].values())
    rows = {(r["benchmark"], r["metric"].split(" (")[0]): r for r in rows}
    assert rows["training", "train images/s"]["goal"] == ">= 1.0x"
    assert rows["models", "FPS, image -> instances"]["goal"].startswith(">= 4.56x")
    onnx = rows["inference", "latency ms, onnxruntime vs eager"]
    assert onnx["ours"] > 0 and "outputs agree" in onnx["goal"]
    inference = json.loads((tmp_path / "inference.json").read_text())["runs"]["cpu"]["results"]
    assert inference["onnx"]["agrees"] and inference["compile"]["failed"].startswith("skipped")
    assert {"time growth exponent", "memory growth exponent"} <= {m for b, m in rows if b == "contrastive"}
    assert "same labels" in rows["pseudo_label", "pseudo-label images/s, 2 processes vs 1"]["metric"]
    markdown = (tmp_path / "SUMMARY.md").read_text()
    assert "| benchmark | case | metric | ours | comparison | ratio | goal | met |" in markdown
    assert "contrastive (cpu):" in markdown
