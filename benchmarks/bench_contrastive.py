"""Benchmark: our negative sampler + loss against a dense reference, over a sweep of B·N up to the
largest B·N the dense reference fits in memory: time, peak memory and how each grows with B·N.

ours:  `sample_negatives` (rejection sampling, no (BN x BN) matrix) + `pixel_contrastive_loss`.
dense: full (BN x BN) similarity and s_deb weight matrices (built in place), Gumbel top-k
       sampling of R negatives (note: top-k draws WITHOUT replacement, ours with replacement),
       then the same `pixel_contrastive_loss`.

Both get the same fusion-strategy y (from synthetic ground-truth-like mask logits, computed
outside the timed region) and time forward + backward of sampling and loss (median of
--repeats after one warm-up call; on CUDA under autocast). Each (device, size, method) runs in
its own subprocess, so that one case's memory cannot hide in another's high-water mark; peak
memory is the extra memory of the timed calls (benchmarks/common.py, PeakMemory).

Sweep: B fixed, N = side² with the side growing by √2 (B·N doubling) from --min-side, while the
dense reference's two (BN x BN) matrices fit in --memory-fraction of the device's total memory;
the largest side that still fits closes the sweep. Before each dense case on the CPU the
currently free memory is checked too (a case that does not fit now is recorded as skipped, not
run into the OOM killer). Growth: the slope of log(time) and log(peak memory) against log(B·N),
fitted over the whole sweep and between its last two sizes (where fixed costs weigh least).
Correctness beside the timing: the mean s_deb weight of the drawn negatives (first 256 anchors),
which both samplers should push well above the mean weight of a uniform draw.

    python benchmarks/bench_contrastive.py                  # CUDA when available, else CPU
    python benchmarks/bench_contrastive.py --sizes 256 1024 --repeats 1
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (PeakMemory, add_common_arguments, autocast, machine_info, measure_devices,  # noqa: E402
                    precision, setup, summary_row, time_calls, time_stats)
from cast.losses.contrastive import pixel_contrastive_loss  # noqa: E402
from cast.losses.sampling import pixel_probabilities, sample_negatives  # noqa: E402

NAME = "contrastive"
CHECK_ANCHORS = 256
# The dense reference holds two (BN x BN) matrices at once: the weights/keys and the Gumbel noise.
DENSE_MATRICES = 2


def make_inputs(batch: int, pixels: int, dim: int, queries: int, classes: int, device: torch.device,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y (B, N, K + C + 1) from ground-truth-like predictions, z_weak (leaf), z_strong.

    Each image is split into `queries // 5` Voronoi cells ("instances"); query k gets a high
    mask logit on its cell, everyone gets noise, so y looks like a half-trained model's.
    """
    side = math.isqrt(pixels)
    if side * side != pixels:
        raise ValueError(f"N={pixels} must be a square number (an h x h grid)")
    g = torch.Generator().manual_seed(seed)
    coords = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    cells = max(2, queries // 5)
    seeds = torch.rand(batch, cells, 2, generator=g) * side
    owner = torch.cdist(coords.float().expand(batch, -1, -1), seeds).argmin(-1)  # (B, N)
    mask_logits = 4.0 * F.one_hot(owner, queries).permute(0, 2, 1).float()
    mask_logits += torch.randn(batch, queries, pixels, generator=g)
    class_logits = 2.0 * torch.randn(batch, queries, classes + 1, generator=g)
    y = pixel_probabilities(mask_logits.view(batch, queries, side, side), class_logits, "fusion")
    z_weak = torch.randn(batch, pixels, dim, generator=g)
    z_strong = z_weak + 0.3 * torch.randn(batch, pixels, dim, generator=g)
    return y.to(device), z_weak.to(device).requires_grad_(), z_strong.to(device)


def dense_sample(y: torch.Tensor, num_negatives: int, generator: torch.Generator) -> torch.Tensor:
    """Reference sampler: (BN x BN) weights, Gumbel top-k (R distinct draws per anchor)."""
    b, n, e = y.shape
    y_flat = F.normalize(y.reshape(b * n, e), dim=-1)
    keys = y_flat @ y_flat.T  # (BN, BN) similarities, turned in place into weights, then keys
    keys.neg_().add_(1.0).clamp_(min=0.0).fill_diagonal_(0.0).log_()
    # log w + Gumbel = log w - log E with E ~ Exp(1): top-k of it samples proportionally to w.
    noise = torch.empty_like(keys).exponential_(generator=generator).log_()
    keys.sub_(noise)
    del noise
    return keys.topk(num_negatives, dim=1).indices.view(b, n, num_negatives)


def drawn_weight(y: torch.Tensor, index: torch.Tensor) -> tuple[float, float]:
    """Mean s_deb weight of the negatives drawn for the first anchors, and of all pairs of those
    anchors (what a uniform draw would average)."""
    y_flat = F.normalize(y.reshape(-1, y.shape[-1]).float(), dim=-1)
    anchors = y_flat[:CHECK_ANCHORS]
    drawn = y_flat[index.reshape(-1, index.shape[-1])[:CHECK_ANCHORS]]  # (A, R, E)
    weight = (1.0 - torch.einsum("ae,are->ar", anchors, drawn)).clamp(min=0.0)
    uniform = (1.0 - anchors @ y_flat.T).clamp(min=0.0)
    return float(weight.mean()), float(uniform.mean())


def run_case(method: str, args: argparse.Namespace, pixels: int, device: torch.device) -> dict:
    """Time (ms), extra peak memory (MiB) and the sampling check of one method at one size."""
    torch.manual_seed(0)
    y, z_weak, z_strong = make_inputs(args.batch, pixels, args.dim, args.queries, args.classes, device)
    generator = torch.Generator(device=device).manual_seed(0)
    sampler = sample_negatives if method == "ours" else dense_sample
    last = {}

    def step() -> None:
        z_weak.grad = None
        with autocast(device, args.amp):
            last["index"] = sampler(y, args.negatives, generator)
            loss = pixel_contrastive_loss(z_weak, z_strong, last["index"], temperature=0.1)
        loss.backward()

    try:
        step()  # warm-up, outside the memory window: the timed calls' peak is what we want
        with PeakMemory(device) as memory:
            seconds = time_calls(step, device, warmup=0, repeats=args.repeats)
    except torch.OutOfMemoryError as e:
        return {"oom": str(e).splitlines()[0]}
    weight, uniform = drawn_weight(y, last["index"])
    return {**time_stats(seconds), "peak_mb": memory.mb, "peak_mem_source": memory.source,
            "drawn_weight": weight, "uniform_weight": uniform}


def dense_bytes(batch: int, pixels: int, element_bytes: int) -> int:
    return DENSE_MATRICES * element_bytes * (batch * pixels) ** 2


def total_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return _meminfo_kib("MemTotal") * 1024


def _meminfo_kib(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/meminfo has no {field}")


def sweep_sizes(args: argparse.Namespace, element_bytes: int, budget: float) -> list[int]:
    """N values (squares) with B·N doubling, up to the largest whose dense matrices fit `budget`."""
    if args.sizes:
        return args.sizes
    max_side = math.isqrt(int(math.sqrt(budget / (DENSE_MATRICES * element_bytes)) // args.batch))
    sides, side = [], float(args.min_side)
    while round(side) <= max_side:
        sides.append(round(side))
        side *= math.sqrt(2.0)
    if not sides:
        raise SystemExit(f"even --min-side {args.min_side} does not fit the dense reference in "
                         f"{budget / 2**30:.1f} GiB")
    if max_side > sides[-1] * 1.1:  # close the sweep at the largest size that fits
        sides.append(max_side)
    return [s * s for s in sides]


def growth(bn: list[int], values: list[float]) -> tuple[float | None, float | None]:
    """Slope of log(value) against log(B·N): least squares over all points, and the last pair."""
    points = [(math.log(x), math.log(v)) for x, v in zip(bn, values) if v > 0]
    if len(points) < 2:
        return None, None
    xs, ys = zip(*points)
    fit = float(np.polyfit(xs, ys, 1)[0])
    last = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return round(fit, 2), round(last, 2)


def _run_in_subprocess(args: argparse.Namespace, method: str, pixels: int, device: torch.device) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--sizes", str(pixels), "--devices", str(device),
           "--batch", str(args.batch), "--negatives", str(args.negatives), "--dim", str(args.dim),
           "--queries", str(args.queries), "--classes", str(args.classes), "--repeats", str(args.repeats),
           "--amp", args.amp, "--threads", str(torch.get_num_threads())]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{method} at N={pixels} on {device} failed (exit {done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_device(args: argparse.Namespace, device: torch.device) -> dict:
    machine = machine_info(device)  # before the work: its load average is the machine's own
    element_bytes = 2 if precision(device, args.amp) in ("bf16", "fp16") else 4
    budget = args.memory_fraction * total_memory_bytes(device)
    sizes = sweep_sizes(args, element_bytes, budget)
    print(f"{device}: B={args.batch}, N in {sizes} (B·N up to {args.batch * sizes[-1]}), "
          f"dense budget {budget / 2**30:.1f} GiB", flush=True)
    rows = []
    for pixels in sizes:
        need = dense_bytes(args.batch, pixels, element_bytes)
        if device.type == "cpu" and need > 0.9 * _meminfo_kib("MemAvailable") * 1024:
            rows.append({"N": pixels, "BN": args.batch * pixels, "skipped": f"the dense reference needs about "
                         f"{need / 2**30:.1f} GiB, more than is free now"})
            print(f"  N={pixels}: {rows[-1]['skipped']}; sweep ends", flush=True)
            break
        ours = _run_in_subprocess(args, "ours", pixels, device)
        dense = _run_in_subprocess(args, "dense", pixels, device)
        row = {"N": pixels, "BN": args.batch * pixels, "dense_estimate_mb": need / 2**20, "ours": ours, "dense": dense}
        rows.append(row)
        if "oom" in ours or "oom" in dense:
            print(f"  N={pixels}: out of memory; sweep ends", flush=True)
            break
        print(f"  B·N={row['BN']:>7}: ours {ours['median_ms']:9.1f} ms {ours['peak_mb']:8.1f} MiB | dense "
              f"{dense['median_ms']:9.1f} ms {dense['peak_mb']:8.1f} MiB | "
              f"{dense['median_ms'] / ours['median_ms']:5.1f}x faster, "
              f"{dense['peak_mb'] / max(ours['peak_mb'], 1e-3):5.1f}x less memory | drawn s_deb ours "
              f"{ours['drawn_weight']:.3f} dense {dense['drawn_weight']:.3f} uniform {ours['uniform_weight']:.3f}",
              flush=True)

    done = [r for r in rows if "ours" in r and "oom" not in r["ours"] and "oom" not in r["dense"]]
    bn = [r["BN"] for r in done]
    exponents = {f"{method}_{what}": growth(bn, [r[method][key] for r in done])
                 for method in ("ours", "dense") for what, key in (("time", "median_ms"), ("memory", "peak_mb"))}
    case = f"{device.type} {precision(device, args.amp)}"
    summary = []
    if done:
        top = done[-1]
        ours, dense = top["ours"], top["dense"]
        where = f"{case}, B·N={top['BN']} (largest measured)"
        summary += [
            summary_row(NAME, where, "time ms (fwd+bwd)", ours["median_ms"], dense["median_ms"],
                        dense["median_ms"] / ours["median_ms"]),
            summary_row(NAME, where, "peak memory MiB", ours["peak_mb"], dense["peak_mb"],
                        dense["peak_mb"] / max(ours["peak_mb"], 1e-3)),
            summary_row(NAME, where, "mean s_deb of drawn negatives (uniform draw: "
                        f"{ours['uniform_weight']:.3f})", ours["drawn_weight"], dense["drawn_weight"], None),
        ]
        span = f"{case}, B·N {bn[0]}..{bn[-1]}"
        for what in ("time", "memory"):
            summary.append(summary_row(NAME, span, f"{what} growth exponent (fit; last pair ours "
                                       f"{exponents['ours_' + what][1]}, dense {exponents['dense_' + what][1]})",
                                       exponents[f"ours_{what}"][0], exponents[f"dense_{what}"][0], None))
    settings = {"B": args.batch, "sizes_N": sizes, "R": args.negatives, "D": args.dim, "queries": args.queries,
                "classes": args.classes, "repeats": args.repeats, "warmup": 1,
                "precision": precision(device, args.amp), "memory_fraction": args.memory_fraction,
                "dense_budget_gib": budget / 2**30}
    return {"machine": machine, "settings": settings, "results": rows,
            "growth_exponents": {k: {"fit": v[0], "last_pair": v[1]} for k, v in exponents.items()},
            "summary": summary}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="pixels N per image (squares); "
                        "default: the sweep described above")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--min-side", type=int, default=16, help="first N of the sweep is min-side²")
    parser.add_argument("--memory-fraction", type=float, default=0.6,
                        help="share of the device's total memory the dense reference may take")
    parser.add_argument("--negatives", type=int, default=200)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=["ours", "dense"], help=argparse.SUPPRESS)
    add_common_arguments(parser, NAME)
    args = parser.parse_args(argv)
    if args.quick:
        # Small enough for seconds: the dense top-k needs N·B > R.
        args.batch, args.min_side, args.negatives, args.dim, args.queries, args.classes = 2, 8, 16, 32, 10, 3
        args.sizes, args.repeats = args.sizes or [64, 256], 1
    devices = setup(args)

    if args.worker:
        print(json.dumps(run_case(args.worker, args, args.sizes[0], devices[0])))
        return
    measure_devices(args.output, NAME, devices, lambda device: measure_device(args, device))


if __name__ == "__main__":
    main()
