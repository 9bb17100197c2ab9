"""Benchmark: memory of `python -m cast predict`'s streaming over a large folder stays flat.

Writes --images small PNGs (default 100 000, 32x32) and streams them through
`cast.inference.stream.stream_predictions` with a stand-in model that answers instantly with three
instances per image (so that the image decoding, resizing, batching, RLE encoding, chunk writing
and the final merge into one json are what is measured, not a network). A sampler thread reads the
process's resident memory (VmRSS) twice a second; the results give it at 10 %, 25 %, 50 %, 75 % and
100 % of the images done, its peak while predicting and its peak while merging, and the growth from
10 % to 100 % (flat: a few MB, whatever the image count).

    python benchmarks/bench_predict_memory.py                 # 100 000 images (minutes)
    python benchmarks/bench_predict_memory.py --quick         # 2 000 images
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, machine_info, write_results  # noqa: E402
from cast.inference.sources import open_source  # noqa: E402
from cast.inference.stream import SHARDS, StreamOptions, stream_predictions  # noqa: E402
from cast.structures import Instances  # noqa: E402

NAME = "predict_memory"


class InstantModel:
    """Three fixed-shape instances per image at its original size, no computation."""

    classes = ["a", "b"]

    def predict(self, pixel_values, pixel_mask=None, image_sizes=None, orig_sizes=None):
        out = []
        for h, w in orig_sizes:
            masks = torch.zeros(3, h, w, dtype=torch.bool)
            masks[0, : h // 2], masks[1, :, : w // 3], masks[2, h // 4: h // 2, w // 4: w // 2] = True, True, True
            out.append(Instances(masks, torch.tensor([0, 1, 0]), torch.tensor([0.9, 0.8, 0.7])))
        return out


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def write_folder(folder: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (16, size, size, 3), dtype=np.uint8)
    for i in range(count):
        sub = folder / f"{i // 1000:03d}"  # 1000 files per folder
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[i % 16]).save(sub / f"{i:06d}.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="2 000 images")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / f"{NAME}.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.images = 2000
    torch.set_num_threads(1)
    machine = machine_info(torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        folder, out = Path(tmp) / "images", Path(tmp) / "out"
        start = time.perf_counter()
        write_folder(folder, args.images, args.size)
        print(f"wrote {args.images} images in {time.perf_counter() - start:.0f} s", flush=True)
        source = open_source(folder, InstantModel.classes)
        samples: list[tuple[float, int, float]] = []  # (seconds, chunks done, rss MB)
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                shards = out / SHARDS
                done = len(list(shards.glob("0*.json"))) if shards.is_dir() else -1
                samples.append((time.perf_counter() - start, done, _rss_mb()))
                stop.wait(0.5)

        base = _rss_mb()
        sampler = threading.Thread(target=sample, daemon=True)
        start = time.perf_counter()
        sampler.start()
        options = StreamOptions(score_threshold=0.0, shard_size=args.shard_size, batch_size=8)
        summary = stream_predictions(InstantModel(), source, out, options, {"path": "instant"})
        stop.set()
        sampler.join()
        wall = time.perf_counter() - start
        json_mb = summary.path.stat().st_size / 2**20
    chunks = -(-args.images // args.shard_size)
    predicting = [s for s in samples if 0 <= s[1] < chunks]
    merging = [s for s in samples if s[1] == chunks or (s[1] == -1 and s[0] > wall / 2)]
    at = {}
    for fraction in (0.1, 0.25, 0.5, 0.75, 1.0):
        reached = [s for s in samples if s[1] >= fraction * chunks]
        at[f"{int(fraction * 100)}%"] = round(reached[0][2], 1) if reached else None
    results = {"images": args.images, "instances": summary.instances, "wall_s": round(wall, 1),
               "images_per_s": round(args.images / wall, 1), "json_mb": round(json_mb, 1),
               "rss_before_mb": round(base, 1), "rss_at_fraction_done_mb": at,
               "peak_rss_predicting_mb": round(max((s[2] for s in predicting), default=float("nan")), 1),
               "peak_rss_merging_mb": round(max((s[2] for s in merging), default=float("nan")), 1),
               "growth_10_to_100_pct_mb": round(at["100%"] - at["10%"], 1) if at["10%"] and at["100%"] else None}
    print(results, flush=True)
    summary_rows = [{"benchmark": NAME, "case": f"{args.images} images {args.size}x{args.size}, instant model",
                     "metric": "resident memory growth MB, 10 % -> 100 % of the images",
                     "ours": results["growth_10_to_100_pct_mb"], "comparison": None, "ratio": None,
                     "goal": None, "met": None}]
    write_results(args.output, NAME, {"cpu": {"machine": machine, "settings": vars(args) | {"output": None},
                                              "results": results, "summary": summary_rows}})


if __name__ == "__main__":
    main()
