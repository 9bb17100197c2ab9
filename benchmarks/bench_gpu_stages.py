"""A few optimizer steps of every CAST stage at the paper's sizes, on one GPU in under 8 minutes:
does each stage fit, how fast does it step, does its loss stay finite. Writes
benchmarks/results/gpu_stages.json.

Runs (each: the model built on the device with random weights, then `--steps` optimizer steps of
the project's Trainer, the step the pipeline runs: L_sup, L_semi on pseudo-labels, L_pxl with the
instance-aware sampler, AdamW, clipping, bf16 autocast on CUDA), on synthetic Cityscapes-sized
data (2:1 images with 6 instances of the 8 thing classes, 512 x 1024 crops of the weak / strong
views, 8 labeled + 8 pseudo-labeled images a step, the batch sizes of configs/cityscapes_10pct.yaml):
  teacher_adaptation (1a) and teacher_self_training (1b): Grounding-DINO-L + SAM2-L (559 M) and
      SAM 3 (840 M), the teachers' adaptation steps;
  knowledge_transfer (2) and student_refinement (3, also the supervised baseline's step): cast-s and
      cast-s-dinov3.
Recorded per run: step time (median over the steps after the first, which also allocates the
optimizer state), images/s (the step's labeled + unlabeled images / step time), peak memory
(torch.cuda.max_memory_allocated over the steps, model and optimizer state included; on the CPU the
resident-set growth), whether every loss term stayed finite, the last step's loss terms, the
parameters (all / trainable) and the build and total wall times.

`--quick`: the tiny presets and teachers on 64 x 64 images, batch 2, float32: a smoke run on CPU
(tests/test_bench_gpu_stages.py runs it).

    python benchmarks/bench_gpu_stages.py                    # on a GPU machine
    python benchmarks/bench_gpu_stages.py --quick --devices cpu --output /tmp/gpu_stages.json
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (PeakMemory, add_common_arguments, machine_info, precision, setup, summary_row,  # noqa: E402
                    sync, write_results)
from cast.config import LossConfig, TrainConfig  # noqa: E402
from cast.data.batches import InstanceTorchDataset, collate_instances  # noqa: E402
from cast.data.batches import WeakStrongViews  # noqa: E402
from cast.structures import InstanceSample  # noqa: E402
from cast.utils.distributed import DistContext  # noqa: E402
from cast.training.optim import build_optimizer  # noqa: E402
from cast.training.objective import Objective  # noqa: E402
from cast.training.trainer import NonFiniteLossError, TrainData, Trainer, build_contrastive  # noqa: E402

NAME = "gpu_stages"
CLASSES = ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]  # Cityscapes' things
# (stage, model): the teachers' adaptation steps and the student's.
RUNS = [("teacher_adaptation", "gdino-sam2"), ("teacher_self_training", "gdino-sam2"),
        ("teacher_adaptation", "sam3"), ("teacher_self_training", "sam3"),
        ("knowledge_transfer", "cast-s"), ("student_refinement", "cast-s"),
        ("knowledge_transfer", "cast-s-dinov3"), ("student_refinement", "cast-s-dinov3")]
OBJECTIVES = {"teacher_adaptation": Objective(0.0, 0.1), "teacher_self_training": Objective(1.0, 0.1),
              "knowledge_transfer": Objective(1.0, 0.1), "student_refinement": Objective(0.0, 0.0)}
# The paper's sizes (configs/cityscapes_10pct.yaml) and the smoke run's.
SIZES = {"paper": {"crop": (512, 1024), "image": (512, 1024), "batch": 8, "stride": 32, "negatives": 200,
                   "students": {"cast-s": "cast-s", "cast-s-dinov3": "cast-s-dinov3"}, "teachers": "paper"},
         "quick": {"crop": (64, 64), "image": (64, 96), "batch": 2, "stride": 8, "negatives": 8,
                   "students": {"cast-s": "cast-tiny", "cast-s-dinov3": "cast-tiny-dinov3"}, "teachers": "tiny"}}


def synthetic_samples(count: int, size: tuple[int, int], seed: int, pseudo: bool) -> list[InstanceSample]:
    """Images of smooth colour noise with 6 rectangles and ellipses of the classes painted on
    (pseudo-labels carry scores)."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    samples = []
    for i in range(count):
        coarse = rng.integers(0, 255, (8, 16, 3)).astype(np.float32)
        image = np.kron(coarse, np.ones((math.ceil(h / 8), math.ceil(w / 16), 1)))[:h, :w]
        masks = []
        for k in range(6):
            cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.1, 0.9) * w
            ry, rx = rng.uniform(0.05, 0.2) * h, rng.uniform(0.03, 0.12) * w
            mask = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1) if k % 2 else (
                (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx))
            for earlier in masks:
                mask &= ~earlier
            image[mask] = rng.uniform(0, 255, 3)
            masks.append(mask)
        labels = rng.integers(0, len(CLASSES), len(masks))
        samples.append(InstanceSample(image=image.clip(0, 255).astype(np.uint8), masks=np.stack(masks), labels=labels,
                                      image_id=i, scores=rng.uniform(0.5, 1.0, len(masks)).astype(np.float32)
                                      if pseudo else None))
    return samples


def build(model: str, sizes: dict, device: torch.device) -> torch.nn.Module:
    """The model with random weights, initialised on `device` (an 840 M model initialises in seconds
    there, in minutes on two CPU cores)."""
    torch.manual_seed(0)
    with device:
        if model == "gdino-sam2":
            from cast.teachers.vfm import random_teacher

            return random_teacher(CLASSES, size=sizes["teachers"], projection_stride=sizes["stride"])
        if model == "sam3":
            from cast.teachers.sam3 import random_sam3_teacher

            return random_sam3_teacher(CLASSES, size=sizes["teachers"], projection_stride=sizes["stride"])
        from cast.models.student import build_student

        return build_student(sizes["students"][model], len(CLASSES), CLASSES, projection_stride=sizes["stride"])


def run_stage(stage: str, model_name: str, sizes: dict, device: torch.device, args: argparse.Namespace,
              labeled: list[InstanceSample], unlabeled: list[InstanceSample]) -> dict:
    start = time.perf_counter()
    model = build(model_name, sizes, device)
    built = time.perf_counter() - start
    objective = OBJECTIVES[stage]
    train_cfg = TrainConfig(steps=args.steps, lr=5e-5, weight_decay=0.01, backbone_lr_multiplier=0.1,
                            clip_grad_norm=1.0, amp=args.amp, checkpoint_every=args.steps)
    losses = LossConfig(num_negatives=sizes["negatives"], embedding_stride=sizes["stride"])
    views = WeakStrongViews(crop_size=sizes["crop"], strong=objective.lambda_pxl > 0)
    use_unlabeled = objective.reads_unlabeled
    data = TrainData(labeled=InstanceTorchDataset(labeled, views, 0), labeled_batch_size=sizes["batch"],
                     collate_fn=collate_instances,
                     unlabeled=InstanceTorchDataset(unlabeled, views, 1) if use_unlabeled else None,
                     unlabeled_batch_size=sizes["batch"] if use_unlabeled else 0, num_workers=args.workers)
    ctx = DistContext(device=device)
    record = {"stage": stage, "model": model_name, "lambda_semi": objective.lambda_semi,
              "lambda_pxl": objective.lambda_pxl, "crop": list(sizes["crop"]),
              "images_per_step": sizes["batch"] * (2 if use_unlabeled else 1),
              "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
              "trainable_params_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
              "build_s": built, "loss_finite": True, "error": None}
    with tempfile.TemporaryDirectory() as stage_dir:
        trainer = Trainer(model, stage, train_cfg, objective, data, stage_dir, ctx, seed=0,
                          contrastive=build_contrastive(losses) if objective.lambda_pxl > 0 else None)
        model.to(device).train()
        optimizer = build_optimizer(model, train_cfg)
        streams = trainer._streams(0)  # the stage's batch streams, without checkpoints or a saved model
        times, values = [], {}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            with PeakMemory(device) as peak:
                for step in range(args.steps):
                    t0 = time.perf_counter()
                    values = trainer._train_step(model, optimizer, streams, step)
                    sync(device)
                    times.append(time.perf_counter() - t0)
        except NonFiniteLossError as e:
            record.update(loss_finite=False, error=str(e))
        except torch.OutOfMemoryError as e:
            record.update(error=f"out of memory: {str(e).splitlines()[0]}")
    timed = times[1:] or times
    record.update({"steps": len(times), "step_times_s": times,
                   "step_time_s": statistics.median(timed) if timed else None,
                   "images_per_s": record["images_per_step"] / statistics.median(timed) if timed else None,
                   "peak_mem_mib": (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                                    else getattr(peak, "mb", None)) if times else None,
                   "peak_mem_source": "cuda_max_allocated (absolute)" if device.type == "cuda" else "cpu_peak_rss",
                   "last_step": {k: v for k, v in values.items() if k.startswith("loss") or k == "grad_norm"},
                   "wall_s": time.perf_counter() - start})
    record["loss_finite"] = record["loss_finite"] and bool(values) and all(
        math.isfinite(v) for k, v in values.items() if k.startswith("loss"))
    del model, optimizer, trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def measure(device: torch.device, args: argparse.Namespace) -> dict:
    sizes = {**SIZES["quick" if args.quick else "paper"]}
    sizes["batch"] = args.batch or sizes["batch"]
    machine = machine_info(device)
    count = 2 * sizes["batch"]
    labeled = synthetic_samples(count, sizes["image"], seed=0, pseudo=False)
    unlabeled = synthetic_samples(count, sizes["image"], seed=1, pseudo=True)
    results, summary = [], []
    case_size = f"{sizes['crop'][0]}x{sizes['crop'][1]}"
    for stage, model in RUNS:
        if args.only and model not in args.only:
            continue
        r = run_stage(stage, model, sizes, device, args, labeled, unlabeled)
        results.append(r)
        status = "finite" if r["loss_finite"] else f"NOT finite ({r['error']})"
        print(f"{device} {stage:22s} {model:14s} {r['params_m']:7.1f} M ({r['trainable_params_m']:.1f} trained)  "
              f"step {r['step_time_s'] or float('nan'):7.3f} s  {r['images_per_s'] or float('nan'):7.2f} img/s  "
              f"peak {r['peak_mem_mib'] or 0:9.0f} MiB  loss {status}",
              flush=True)
        case = f"{device.type} {precision(device, args.amp)}, {stage}, {model}, {case_size} x {r['images_per_step']} images"
        summary.append(summary_row(NAME, case, "train images/s", r["images_per_s"], None, None,
                                   "finite loss", r["loss_finite"]))
    return {"machine": machine,
            "settings": {"precision": precision(device, args.amp), "steps": args.steps, "sizes": {
                k: (list(v) if isinstance(v, tuple) else v) for k, v in sizes.items()}},
            "results": results, "summary": summary}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is not timed)")
    parser.add_argument("--workers", type=int, default=4, help="data-loading processes")
    parser.add_argument("--only", nargs="+", choices=sorted({m for _, m in RUNS}), help="these models only")
    parser.add_argument("--batch", type=int, help="labeled (and unlabeled) images per step instead of the size's "
                                                   "(e.g. 1 to try the paper-size models on a CPU)")
    add_common_arguments(parser, NAME)
    args = parser.parse_args(argv)
    if args.quick:
        args.workers = 0
    start = time.perf_counter()
    runs = {device.type: measure(device, args) for device in setup(args)}
    for entry in runs.values():
        entry["settings"]["wall_s"] = time.perf_counter() - start
    write_results(args.output, NAME, runs)
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
