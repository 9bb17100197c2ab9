"""What a wall time (or a benchmark figure) was measured on.

Times mean little without the machine: the same 2-core VM has landed on hosts 2.5x apart in
speed, and the CPU's instruction set (torch's kernel choice: AVX2, AVX512, ...) also changes the
floating-point order, hence the trained weights, so it is recorded with every stage's wall time.
The choice is torch's and oneDNN's, not the CPU's: with both forced to AVX2 an AVX512 host trains
an AVX2 host's weights bit for bit (docs/results.md), so a forced choice is recorded too.
"""
from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

import torch


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return None


def package_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# Environment variables that force torch's (ATen) and oneDNN's kernel instruction set below the CPU's best.
KERNEL_ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The machine as of now; the load average shows whether it was busy with other work (a quiet
    machine stays well below its core count)."""
    device = torch.device(device)
    info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "cpu_model": _cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "logical_cpus": os.cpu_count(), "usable_cpus": usable_cpus(), "torch_threads": torch.get_num_threads(),
            "memory_gib": _memory_gib(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": package_version("transformers"), "device": device.type, "gpu": None,
            "load_average_start": [round(v, 2) for v in os.getloadavg()]}
    forced = {name: os.environ[name] for name in KERNEL_ISA_VARIABLES if os.environ.get(name)}
    if forced:
        info["kernel_isa_forced"] = forced
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                       "cuda": torch.version.cuda}
    return info


def describe_machine(info: dict[str, Any]) -> str:
    """One line, e.g. 'AMD EPYC, 2 CPUs (AVX2), 2 torch threads, torch 2.13.0+cpu'; a forced kernel
    choice reads e.g. '2 CPUs (AVX2; forced: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2)'."""
    isa = info.get("cpu_capability", "?")
    if info.get("kernel_isa_forced"):
        isa += "; forced: " + " ".join(f"{k}={v}" for k, v in info["kernel_isa_forced"].items())
    threads = info.get("torch_threads", "?")
    cpu = (f"{info.get('cpu_model', '?')}, {info.get('usable_cpus', '?')} CPUs ({isa}), "
           f"{threads} torch thread{'' if threads == 1 else 's'}")
    gpu = info.get("gpu")
    return f"{gpu['name']} + {cpu}, torch {info.get('torch')}" if gpu else f"{cpu}, torch {info.get('torch')}"
