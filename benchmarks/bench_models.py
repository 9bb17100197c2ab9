"""Efficiency profile of the student presets; writes benchmarks/results/models.json.

"cast-s" (and "cast-r50") at 512x1024 as in the paper's Cityscapes crops, the small presets at
the CPU demo's 128x128 (batch 8, as the demo trains). Runs on the CPU, and on CUDA too when a
GPU is present (float32 and bfloat16 autocast). GFLOPs count a multiply-add as 2 FLOPs; the
paper's table (200 GFLOPs for its 52 M student) does not say which convention it uses, so the
json also gives GMACs = GFLOPs / 2.

    python benchmarks/bench_models.py [--presets cast-s demo-student] [--repeats 5] [--no-cuda]
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cast.efficiency import profile_model  # noqa: E402
from cast.models.student import build_student  # noqa: E402
from cast.utils.io import atomic_write_json, read_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "models.json"
# preset -> (input size, batch size)
SETTINGS = {
    "cast-s": ((512, 1024), 1),
    "cast-r50": ((512, 1024), 1),
    "demo-teacher": ((128, 128), 8),
    "demo-student": ((128, 128), 8),
    "cast-tiny": ((128, 128), 8),
}
NUM_CLASSES = 8  # Cityscapes' instance classes; the head size hardly matters here


def run(presets: list[str], repeats: int, warmup: int, use_cuda: bool) -> list[dict]:
    devices: list[tuple[str, torch.dtype | None]] = [("cpu", None)]
    if use_cuda and torch.cuda.is_available():
        devices += [("cuda", None), ("cuda", torch.bfloat16)]
    rows = []
    for preset in presets:
        size, batch = SETTINGS[preset]
        model = build_student(preset, NUM_CLASSES)
        for device, dtype in devices:
            # The big models are slow on a 2-core CPU: fewer passes there.
            cpu_big = device == "cpu" and size[0] * size[1] > 128 * 128
            profile = profile_model(model, size, batch, device, warmup=1 if cpu_big else warmup,
                                    repeats=min(repeats, 3) if cpu_big else repeats, autocast_dtype=dtype,
                                    progress=True)
            profile.update(preset=preset, gmacs=profile["gflops"] / 2, torch=torch.__version__,
                           device_name=torch.cuda.get_device_name() if device == "cuda" else platform.processor()
                           or platform.machine(), cpu_threads=torch.get_num_threads())
            rows.append(profile)
            print(f"{preset:13s} {device:4s} {str(profile['autocast'] or 'fp32'):8s} {size[0]}x{size[1]} x{batch}  "
                  f"{profile['params_m']:6.2f} M  {profile['gflops']:8.2f} GFLOPs  "
                  f"{profile['latency_ms']:9.1f} ms  {profile['fps']:7.2f} img/s  "
                  f"{profile['peak_mem_mb']:8.1f} MB ({profile['peak_mem_source']})", flush=True)
        model.cpu()
    return rows


def _key(row: dict) -> tuple:
    return row["preset"], row["device"], row["autocast"], row["device_name"], tuple(row["input_size"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-cuda", action="store_true", help="profile on the CPU only")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = run(args.presets, args.repeats, args.warmup, use_cuda=not args.no_cuda)
    # Keep rows measured elsewhere (e.g. a GPU machine); replace those measured again here.
    previous = read_json(args.output)["results"] if args.output.is_file() else []
    measured = {_key(row) for row in rows}
    rows = [row for row in previous if _key(row) not in measured] + rows
    atomic_write_json(args.output, {"flop_convention": "multiply-add = 2 FLOPs", "results": rows}, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
