"""Benchmark: training throughput (images/s of forward + loss + backward + AdamW step) of the CAST
student against transformers' Mask2FormerForUniversalSegmentation, same input size, batch and
targets, measured one after the other in this process.

ours:       `build_student("cast-s")`: DINOv2-S/14 encoder + DPT neck + 9-layer masked-attention
            decoder (22.1 M + 28.8 M parameters when written; the results record the counts).
comparison: Mask2Former with a Swin-T backbone (embed 96, depths 2-2-6-2, heads 3-6-12-24,
            window 7, drop path 0.3: Mask2Former's Swin-T recipe; 27.5 M of its 47.4 M
            parameters), the transformers model as it is (multi-scale deformable-attention pixel
            decoder, 6 layers). Swin is the backbone transformers' Mask2Former supports; a
            DINOv2-S backbone would give it single-stride features its pixel decoder is not
            built for. Its decoder and loss settings are the student's
            (`cast.models.decoder.mask2former_config`: queries, decoder layers, heads, widths,
            12 544 sampled points, loss weights), so the difference is encoder + pixel decoder.

Both compute their full loss (Hungarian matching, class CE + mask BCE + dice on sampled points,
on every decoder layer) against the same K target instances per image (random rectangles and
classes, fixed seed). Step: zero_grad, forward with loss, backward, gradient clipping at norm
1.0, AdamW over all parameters (lr 1e-4, weight decay 0.05; one optimiser for both, so the
step costs the same per parameter). On CUDA under autocast (bf16 by default; fp16 with a
GradScaler). Warm-up steps are not timed; throughput = batch / median step time, with the
spread of the timed steps. Correctness beside the timing: every loss is finite, and the
parameters moved.

    python benchmarks/bench_training.py                   # 512x1024, batch 2 on CPU / 8 on CUDA
    python benchmarks/bench_training.py --quick           # tiny models, seconds
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import Mask2FormerForUniversalSegmentation, SwinConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (PeakMemory, add_common_arguments, autocast, machine_info, measure_devices,  # noqa: E402
                    precision, setup, summary_row, time_calls, time_stats)
from cast.models.config import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from cast.models.decoder import mask2former_config  # noqa: E402
from cast.models.student import CastStudent, build_student  # noqa: E402

NAME = "training"
NUM_CLASSES = 8  # Cityscapes' instance classes
SWIN_OUT = ["stage1", "stage2", "stage3", "stage4"]
SWIN_T = {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7,
          "drop_path_rate": 0.3}
SWIN_QUICK = {"embed_dim": 24, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8], "window_size": 7,
              "drop_path_rate": 0.3}


def build_mask2former(student: CastStudent, swin: dict) -> Mask2FormerForUniversalSegmentation:
    """transformers' Mask2Former with the student's decoder/loss settings and a Swin backbone."""
    config = mask2former_config(student.config)
    config.backbone_config = SwinConfig(**swin, out_features=SWIN_OUT)
    return Mask2FormerForUniversalSegmentation(config)


def make_batch(batch: int, size: tuple[int, int], instances: int, device: torch.device) -> dict:
    """Images in [0, 1] and K rectangle instances per image with random classes (fixed seed)."""
    g = torch.Generator().manual_seed(0)
    height, width = size
    images = torch.rand(batch, 3, height, width, generator=g)
    masks, labels = [], []
    for _ in range(batch):
        m = torch.zeros(instances, height, width)
        for k in range(instances):
            y0, x0 = (int(torch.randint(0, s // 2, (1,), generator=g)) for s in size)
            h, w = (int(torch.randint(s // 8 + 1, s // 2 + 1, (1,), generator=g)) for s in size)
            m[k, y0:y0 + h, x0:x0 + w] = 1.0
        masks.append(m.to(device))
        labels.append(torch.randint(0, NUM_CLASSES, (instances,), generator=g).to(device))
    return {"images": images.to(device), "masks": masks, "labels": labels}


def loss_fn(model: nn.Module, data: dict) -> torch.Tensor:
    if isinstance(model, CastStudent):
        targets = [{"masks": m, "labels": c} for m, c in zip(data["masks"], data["labels"])]
        return model(data["images"], targets=targets).loss
    # transformers' Mask2Former takes normalised pixels (its image processor's job).
    mean = torch.tensor(IMAGENET_MEAN, device=data["images"].device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=data["images"].device).view(1, 3, 1, 1)
    return model(pixel_values=(data["images"] - mean) / std, mask_labels=data["masks"],
                 class_labels=data["labels"]).loss


def measure(model: nn.Module, data: dict, device: torch.device, args: argparse.Namespace) -> dict:
    """Throughput, step-time spread and peak memory of training `model` on `data`."""
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    scaler = torch.amp.GradScaler(device.type, enabled=precision(device, args.amp) == "fp16")
    before = [p.detach().clone() for p in model.parameters()]
    losses = []

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, args.amp):
            loss = loss_fn(model, data)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(loss.detach()))

    for _ in range(args.warmup):
        step()
    with PeakMemory(device) as memory:
        seconds = time_calls(step, device, warmup=0, repeats=args.repeats)
    moved = sum(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))
    stats = time_stats(seconds)
    result = {**stats, "images_per_s": args.batch / (stats["median_ms"] / 1e3), "peak_mb": memory.mb,
              "peak_mem_source": memory.source, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
              "losses": losses, "losses_finite": all(math.isfinite(v) for v in losses),
              "params_moved_fraction": moved / len(before)}
    model.cpu()
    return result


def measure_device(args: argparse.Namespace, device: torch.device) -> dict:
    machine = machine_info(device)  # before the work: its load average is the machine's own
    size = tuple(args.size)
    data = make_batch(args.batch, size, args.instances, device)
    torch.manual_seed(0)
    student = build_student(args.preset, NUM_CLASSES)
    mask2former = build_mask2former(student, SWIN_QUICK if args.quick else SWIN_T)
    backbones = {"ours": sum(p.numel() for p in student.encoder.parameters()) / 1e6,
                 "comparison": sum(p.numel() for p in mask2former.model.pixel_level_module.encoder.parameters()) / 1e6}
    results = {}
    for name, model in (("ours", student), ("comparison", mask2former)):
        results[name] = {**measure(model, data, device, args), "backbone_params_m": backbones[name]}
        r = results[name]
        print(f"{device} {name:10s}: {r['images_per_s']:7.2f} img/s (step {r['median_ms']:.0f} ms, spread "
              f"{r['spread_pct']:.0f}%), {r['params_m']:.1f} M params ({r['backbone_params_m']:.1f} M backbone), "
              f"peak {r['peak_mb']:.0f} MiB, losses {[round(v, 2) for v in r['losses']]}", flush=True)
        if not (r["losses_finite"] and r["params_moved_fraction"] > 0.5):
            raise SystemExit(f"{name}: training step is broken (finite losses: {r['losses_finite']}, "
                             f"parameters moved: {r['params_moved_fraction']:.0%})")
    ours, comparison = results["ours"], results["comparison"]
    ratio = ours["images_per_s"] / comparison["images_per_s"]
    case = (f"{device.type} {precision(device, args.amp)}, {size[0]}x{size[1]}, batch {args.batch}: {args.preset} "
            f"vs Mask2Former {'tiny Swin' if args.quick else 'Swin-T'} ({comparison['params_m']:.1f} M)")
    summary = [summary_row(NAME, case, "train images/s", ours["images_per_s"], comparison["images_per_s"], ratio,
                           ">= 1.0x", ratio >= 1.0),
               summary_row(NAME, case, "train peak memory MiB", ours["peak_mb"], comparison["peak_mb"],
                           comparison["peak_mb"] / max(ours["peak_mb"], 1e-3))]
    settings = {"preset": args.preset, "comparison": "Mask2FormerForUniversalSegmentation",
                "swin": SWIN_QUICK if args.quick else SWIN_T, "input_size": list(size), "batch": args.batch,
                "instances_per_image": args.instances, "warmup_steps": args.warmup, "timed_steps": args.repeats,
                "optimizer": "AdamW(lr=1e-4, weight_decay=0.05), clip_grad_norm 1.0",
                "precision": precision(device, args.amp)}
    return {"machine": machine, "settings": settings, "results": results, "summary": summary}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cast-s")
    parser.add_argument("--size", type=int, nargs=2, default=[512, 1024], metavar=("H", "W"),
                        help="the paper's Cityscapes training crop")
    parser.add_argument("--batch", type=int, default=None, help="default 2 on CPU, 8 on CUDA")
    parser.add_argument("--instances", type=int, default=10, help="target instances per image")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 1 on CPU, 5 on CUDA)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (default 3 on CPU, 20 on CUDA)")
    add_common_arguments(parser, NAME)
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.size, args.instances = "cast-tiny", [64, 64], 3
    devices = setup(args)

    def measure(device: torch.device) -> dict:
        # A GPU runs the paper's batch sizes and many steps in seconds; a CPU needs minutes for a few.
        big = device.type == "cuda" and not args.quick
        device_args = argparse.Namespace(**{
            **vars(args), "batch": args.batch or (8 if big else 2),
            "warmup": args.warmup if args.warmup is not None else (5 if big else 1),
            "repeats": args.repeats or (20 if big else 2 if args.quick else 3)})
        return measure_device(device_args, device)

    measure_devices(args.output, NAME, devices, measure)


if __name__ == "__main__":
    main()
