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


class Sleeper(nn.Module):
    """A forward pass of known duration and known working memory."""

    def __init__(self, seconds: float = 0.0, megabytes: int = 0) -> None:
        super().__init__()
        self.seconds, self.megabytes = seconds, megabytes
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        import time

        time.sleep(self.seconds)
        if self.megabytes:
            buffer = torch.ones(self.megabytes * 2**18)  # float32: 4 bytes each, every page touched
            return pixel_values * self.scale + buffer[:1]
        return pixel_values * self.scale


def test_latency_and_memory_measure_what_the_forward_does():
    slow = profile_model(Sleeper(seconds=0.05), input_size=(8, 8), warmup=1, repeats=3)
    assert slow["latency_ms"] >= 49.0 and slow["fps"] == pytest.approx(1e3 / slow["latency_ms"])
    fast = profile_model(Sleeper(), input_size=(8, 8), warmup=1, repeats=3)
    assert fast["latency_ms"] < slow["latency_ms"] - 40
    hungry = profile_model(Sleeper(megabytes=96), input_size=(8, 8), warmup=1, repeats=2)
    if hungry["peak_mem_source"] == "cpu_peak_rss":  # the peak over the passes themselves
        assert hungry["peak_mem_mb"] >= 80


def test_parameters_are_counted_once_and_flops_scale_with_the_work():
    shared = nn.Linear(16, 16)
    tied = nn.Sequential(shared, nn.ReLU(), shared)  # one weight used twice: counted once, run twice
    profile = profile_model(tied, input_size=(16, 16), batch_size=1, warmup=0, repeats=1)
    assert profile["params_m"] * 1e6 == 16 * 16 + 16
    # (1, 3, 16, 16) -> the last dim (16) through a 16x16 linear, twice: 2 * 2 FLOPs per multiply-add.
    assert profile["gflops"] * 1e9 == 2 * 2 * (3 * 16) * 16 * 16
    model = build_student("cast-tiny", num_classes=2)
    small = forward_flops(model, torch.rand(1, 3, 64, 64))
    assert forward_flops(model, torch.rand(2, 3, 64, 64)) == 2 * small  # batch doubles the work exactly
    assert forward_flops(model, torch.rand(1, 3, 128, 128)) > 3 * small  # four times the pixels
