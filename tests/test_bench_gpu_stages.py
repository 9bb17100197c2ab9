"""benchmarks/bench_gpu_stages.py (every stage's optimizer steps at the paper's sizes on a GPU) runs on
the CPU at its tiny sizes and records, for every stage and model, step time, images/s, peak memory
and whether the loss stayed finite."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_gpu_stages  # noqa: E402


@pytest.mark.usefixtures("one_thread")
def test_every_stage_steps_with_a_finite_loss_at_tiny_sizes(tmp_path):
    output = tmp_path / "gpu_stages.json"
    bench_gpu_stages.main(["--quick", "--devices", "cpu", "--threads", "1", "--steps", "2", "--output", str(output)])
    run = json.loads(output.read_text())["runs"]["cpu"]
    assert run["settings"]["precision"] == "fp32" and run["settings"]["steps"] == 2
    results = run["results"]
    assert [(r["stage"], r["model"]) for r in results] == bench_gpu_stages.RUNS
    for r in results:
        assert r["loss_finite"] and r["error"] is None and r["steps"] == 2, r
        assert r["step_time_s"] > 0 and r["images_per_s"] > 0 and r["peak_mem_mib"] >= 0
        assert r["images_per_step"] == (2 if r["stage"] == "student_refinement" else 4)  # + pseudo-labeled batch
        assert r["trainable_params_m"] <= r["params_m"]
        assert ("loss_sup" in r["last_step"]) and (("loss_semi" in r["last_step"]) == (r["lambda_semi"] > 0))
        assert any(k.startswith("loss_pxl") for k in r["last_step"]) == (r["lambda_pxl"] > 0)
    assert all(row["met"] for row in run["summary"])
