"""Efficiency profile: parameter count, FLOP convention, latency/memory fields."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cast.efficiency import forward_flops, profile_model
from cast.models.student import build_student


def test_flops_follow_the_multiply_add_is_two_convention():
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    profile = profile_model(conv, input_size=(16, 16), batch_size=2, warmup=0, repeats=2)
    assert profile["gflops"] * 1e9 == pytest.approx(2 * (3 * 9) * 8 * 16 * 16 * 2)
    assert profile["params_m"] * 1e6 == pytest.approx(3 * 9 * 8 + 8)


def test_student_profile_fields_are_sane():
    model = build_student("cast-tiny", num_classes=2)
    profile = profile_model(model, input_size=(64, 64), batch_size=2, warmup=1, repeats=3)
    assert profile["params_m"] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)
    assert profile["gflops"] == pytest.approx(forward_flops(model, torch.rand(2, 3, 64, 64)) / 1e9)
    assert profile["gflops"] > 0.01
    assert profile["latency_ms"] > 0
    assert profile["fps"] == pytest.approx(2 / (profile["latency_ms"] / 1e3))
    assert profile["peak_mem_mb"] >= 0
    assert profile["peak_mem_source"] in {"cpu_peak_rss", "cpu_max_rss_growth"}
    assert profile["input_size"] == [64, 64] and profile["device"] == "cpu" and profile["autocast"] is None
    assert not model.training


def test_invalid_arguments():
    with pytest.raises(ValueError, match="repeats"):
        profile_model(nn.Identity(), repeats=0)
