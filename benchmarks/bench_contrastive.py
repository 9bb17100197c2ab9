"""Benchmark: our negative sampler + loss against a dense reference, time and peak memory.

ours:  `sample_negatives` (rejection sampling, no (BN x BN) matrix) + `pixel_contrastive_loss`.
dense: full (BN x BN) similarity and s_deb weight matrices (built in place), Gumbel top-k
       sampling of R negatives (note: top-k draws WITHOUT replacement, ours with replacement),
       then the same `pixel_contrastive_loss`.

Both get the same fusion-strategy y (from synthetic ground-truth-like mask logits, computed
outside the timed region) and time forward + backward of sampling and loss (median over
--repeats after one warm-up call). Each (device, size, method) runs in its own subprocess, so
that one case's memory cannot hide in another's high-water mark. Peak memory is the extra
memory over the process' state just before the timed calls:
  CPU:  Linux VmHWM after resetting it (write "5" to /proc/self/clear_refs) minus VmRSS before,
        i.e. the resident-set high-water of the whole process (tracemalloc does not see torch's
        CPU allocations); falls back to getrusage's ru_maxrss when the reset is not allowed.
  CUDA: torch.cuda.max_memory_allocated minus memory_allocated before.

    python benchmarks/bench_contrastive.py                    # CPU, and CUDA when available
    python benchmarks/bench_contrastive.py --sizes 256 1024 --repeats 1

Writes benchmarks/results/contrastive.json (rows of devices not run this time are kept).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cast.losses.contrastive import pixel_contrastive_loss, pixel_probabilities, sample_negatives  # noqa: E402
from cast.utils.io import atomic_write_json, read_json  # noqa: E402

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "contrastive.json"


def make_inputs(batch: int, pixels: int, dim: int, queries: int, classes: int, device: str,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y (B, N, K + C + 1) from ground-truth-like predictions, z_weak (leaf), z_strong.

    Each image is split into `queries // 5` Voronoi cells ("instances"); query k gets a high
    mask logit on its cell, everyone gets noise, so y looks like a half-trained model's.
    """
    side = int(round(pixels ** 0.5))
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


def _step(method: str, y: torch.Tensor, z_weak: torch.Tensor, z_strong: torch.Tensor, num_negatives: int,
          generator: torch.Generator) -> None:
    z_weak.grad = None
    if method == "ours":
        index = sample_negatives(y, num_negatives, generator)
    else:
        index = dense_sample(y, num_negatives, generator)
    pixel_contrastive_loss(z_weak, z_strong, index, temperature=0.1).backward()


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_case(method: str, batch: int, pixels: int, num_negatives: int, dim: int, queries: int, classes: int,
             device: str, repeats: int) -> dict:
    """Median time (ms) and extra peak memory (MB) of one method at one size, in this process."""
    torch.manual_seed(0)
    y, z_weak, z_strong = make_inputs(batch, pixels, dim, queries, classes, device)
    generator = torch.Generator(device=device).manual_seed(0)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _status_kib("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            memory_source = "VmHWM"
        except OSError:
            memory_source = "ru_maxrss"
    times = []
    for i in range(repeats + 1):  # the first call warms up and is not timed
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        _step(method, y, z_weak, z_strong, num_negatives, generator)
        if cuda:
            torch.cuda.synchronize()
        if i > 0:
            times.append((time.perf_counter() - start) * 1000.0)
    if cuda:
        peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        if memory_source == "VmHWM":
            peak_kib = _status_kib("VmHWM")
        else:
            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        peak_mb = (peak_kib - before) / 1024
    return {"ms": statistics.median(times), "peak_mb": peak_mb}


def _run_in_subprocess(args: argparse.Namespace, method: str, pixels: int, device: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--sizes", str(pixels), "--device-worker", device,
           "--batch", str(args.batch), "--negatives", str(args.negatives), "--dim", str(args.dim),
           "--queries", str(args.queries), "--classes", str(args.classes), "--repeats", str(args.repeats),
           "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{method} at N={pixels} on {device} failed (exit {done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096], help="pixels N per image")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--negatives", type=int, default=200)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when available")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--worker", choices=["ours", "dense"], help=argparse.SUPPRESS)
    parser.add_argument("--device-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.worker:
        result = run_case(args.worker, args.batch, args.sizes[0], args.negatives, args.dim, args.queries,
                          args.classes, args.device_worker, args.repeats)
        print(json.dumps(result))
        return

    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    cases = [(d, n, m) for d in devices for n in args.sizes for m in ("ours", "dense")]
    results = {}
    for device, pixels, method in tqdm(cases, desc="cases", unit="case"):
        results[device, pixels, method] = _run_in_subprocess(args, method, pixels, device)

    rows = []
    print(f"\nB={args.batch} R={args.negatives} D={args.dim} E={args.queries + args.classes + 1}, "
          f"median of {args.repeats} (forward + backward of sampling + loss)")
    print(f"{'device':>6} {'N':>6} {'ours ms':>10} {'dense ms':>10} {'speed-up':>9} "
          f"{'ours MB':>9} {'dense MB':>9} {'mem ratio':>9}")
    for device in devices:
        for pixels in args.sizes:
            ours, dense = results[device, pixels, "ours"], results[device, pixels, "dense"]
            rows.append({"B": args.batch, "N": pixels, "R": args.negatives, "D": args.dim,
                         "ours_ms": round(ours["ms"], 2), "dense_ms": round(dense["ms"], 2),
                         "ours_peak_mb": round(ours["peak_mb"], 1), "dense_peak_mb": round(dense["peak_mb"], 1),
                         "device": device})
            print(f"{device:>6} {pixels:>6} {ours['ms']:>10.1f} {dense['ms']:>10.1f} "
                  f"{dense['ms'] / ours['ms']:>8.1f}x {ours['peak_mb']:>9.1f} {dense['peak_mb']:>9.1f} "
                  f"{dense['peak_mb'] / max(ours['peak_mb'], 1e-3):>8.1f}x")

    kept = []
    if args.output.exists():  # keep rows measured on devices not run this time (e.g. a GPU)
        kept = [r for r in read_json(args.output) if r.get("device") not in devices]
    atomic_write_json(args.output, kept + rows, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
