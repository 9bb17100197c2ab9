"""Efficiency profile of a model: parameters, FLOPs, latency, peak memory, throughput.

Conventions (so numbers compare with the paper's "GFLOPs"):
- gflops: forward pass only, counted by torch.utils.flop_counter.FlopCounterMode for one batch;
  a multiply-add counts as 2 FLOPs; GFLOPs = FLOPs / 1e9 (per batch of `batch_size`).
  Only matmul/convolution/attention-like operators are counted (element-wise ops are not).
- latency_ms: median wall time of one forward pass (no grad) after `warmup` passes.
- peak_mem_mb: on CUDA, torch.cuda.max_memory_allocated during the timed passes minus the
  memory allocated before them ("cuda_max_allocated"). On CPU, the peak resident set size
  during the passes minus the resident size before them ("cpu_peak_rss"): on Linux, freed
  heap memory is first returned to the OS (glibc malloc_trim) and the peak (VmHWM) is reset
  through /proc/self/clear_refs, so this approximates the passes' working memory. Elsewhere
  it is the growth of resource.getrusage's ru_maxrss, 0 if the process had peaked higher
  before ("cpu_max_rss_growth"). `peak_mem_source` says which one was measured.
- fps: images per second = batch_size / median latency.
"""
from __future__ import annotations

import contextlib
import ctypes
import re
import resource
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module, pixel_values: torch.Tensor) -> int:
    """FLOPs of one forward pass (multiply-add = 2)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(pixel_values)
    return int(counter.get_total_flops())


def _max_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def _proc_status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1)) / 2**10


class CpuPeakMemory:
    """Peak RSS growth over a code region (see the module docstring for the two methods)."""

    def start(self) -> None:
        # Hand memory freed by earlier passes back to the OS (glibc keeps it otherwise), so the
        # timed passes have to fault their working memory in again and the peak shows it.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.source, self.base = "cpu_peak_rss", _proc_status_mb("VmRSS")
        except (OSError, AttributeError):
            self.source, self.base = "cpu_max_rss_growth", _max_rss_mb()

    def peak_mb(self) -> float:
        now = _proc_status_mb("VmHWM") if self.source == "cpu_peak_rss" else _max_rss_mb()
        return max(now - self.base, 0.0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_model(model: nn.Module, input_size: tuple[int, int] = (512, 1024), batch_size: int = 1,
                  device: str | torch.device = "cpu", warmup: int = 2, repeats: int = 5,
                  autocast_dtype: torch.dtype | None = None, progress: bool = False) -> dict[str, Any]:
    """Profile `model(pixel_values)` on random images of `input_size` (see the module docstring).

    `autocast_dtype` (e.g. torch.bfloat16) times the passes under torch.autocast; FLOPs are
    always counted in float32. The model is put in eval mode on `device`.
    """
    if repeats < 1 or warmup < 0 or batch_size < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0, batch_size >= 1; got {repeats}, {warmup}, {batch_size}")
    device = torch.device(device)
    model = model.to(device).eval()
    pixel_values = torch.rand(batch_size, 3, int(input_size[0]), int(input_size[1]), device=device)
    flops = forward_flops(model, pixel_values)
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext())

    with torch.no_grad(), autocast:
        for _ in range(warmup):
            model(pixel_values)
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base_mem = torch.cuda.memory_allocated(device)
        cpu_memory = CpuPeakMemory()
        cpu_memory.start()
        times = []
        for _ in tqdm(range(repeats), desc="profile", disable=not progress, leave=False):
            start = time.perf_counter()
            model(pixel_values)
            _sync(device)
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak_mem_mb = (torch.cuda.max_memory_allocated(device) - base_mem) / 2**20
        source = "cuda_max_allocated"
    else:
        peak_mem_mb, source = cpu_memory.peak_mb(), cpu_memory.source
    latency = statistics.median(times)
    return {"params_m": count_parameters(model) / 1e6, "gflops": flops / 1e9, "latency_ms": latency * 1e3,
            "peak_mem_mb": peak_mem_mb, "peak_mem_source": source, "fps": batch_size / latency,
            "input_size": [int(input_size[0]), int(input_size[1])], "batch_size": batch_size,
            "device": str(device), "autocast": str(autocast_dtype).removeprefix("torch.") if autocast_dtype else None}
