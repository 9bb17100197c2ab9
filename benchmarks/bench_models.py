"""Efficiency of the student against the foundation-model teachers (the paper's efficiency figure),
and of every student preset; writes benchmarks/results/models.json.

Student vs teacher: "cast-s" against Grounding-DINO-L + SAM2-L built at full size from
transformers configurations with random weights (`cast.teachers.vfm.random_teacher(size=
"paper")`; weights do not change the cost, except through how many boxes the teacher keeps,
recorded as `instances`), on the same images (512x1024 by default, the paper's Cityscapes crop;
the paper does not state its resolution). Both are timed from image to instances (`predict`:
for the teacher, detection, SAM2's image encoder at 1024x1024 and one mask decoding per kept
box; for the student, its forward and post-processing). Parameters, GFLOPs of that call,
latency, FPS, peak memory, and the ratios next to the paper's: 568 M -> 52 M parameters
(10.9x), 880 -> 200 GFLOPs (4.4x), 2.85 -> 13.0 FPS (4.56x; goal: at least that).

SAM 3 beside them: `cast.teachers.sam3.random_sam3_teacher(size="paper")` (facebook/sam3's
architecture, 840 M, random weights) on the same images, from image to instances: every image
stretched to SAM 3's 1008 x 1008 input, its vision encoder once, then one text prompt per class
(8 Cityscapes things) through the DETR encoder / decoder and the mask decoder, masks of the kept
instances at the image's size. Rows: its parameters, GFLOPs and FPS against cast-s and against
Grounding-DINO-L + SAM2-L.

Presets: every student preset's forward at its own setting ("cast-s", "cast-s-dinov3", "cast-r50" at
512x1024 batch 1; the small presets at the CPU demo's 128x128, batch 8).

GFLOPs count a multiply-add as 2 FLOPs, matmuls / convolutions / attention only (FlopCounterMode;
deformable attention's grid sampling is not counted); the paper does not say which convention it
uses, so the json also gives GMACs = GFLOPs / 2. See cast/efficiency.py for latency and memory.

    python benchmarks/bench_models.py [--presets cast-s demo-student] [--teachers gdino-sam2 sam3] [--repeats 5]
    python benchmarks/bench_models.py --quick             # cast-tiny vs the tiny teachers, 64x64
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_common_arguments, autocast_dtype, machine_info, precision, print_summary, setup,  # noqa: E402
                    summary_row, write_results)
from cast.efficiency import profile_model  # noqa: E402
from cast.models.student import build_student  # noqa: E402

NAME = "models"
# preset -> (input size, batch size)
SETTINGS = {
    "cast-s": ((512, 1024), 1),
    "cast-s-dinov3": ((512, 1024), 1),
    "cast-r50": ((512, 1024), 1),
    "demo-teacher": ((128, 128), 8),
    "demo-student": ((128, 128), 8),
    "cast-tiny": ((128, 128), 8),
}
CLASSES = ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]  # Cityscapes' things
PAPER = {"teacher_params_m": 568.0, "student_params_m": 52.0, "teacher_gflops": 880.0, "student_gflops": 200.0,
         "teacher_fps": 2.85, "student_fps": 13.0}
PAPER_FPS_RATIO = 4.56  # the paper's 350.9 ms / 76.9 ms
TEACHERS = ("gdino-sam2", "sam3")


class Predict(nn.Module):
    """`model.predict` as a forward, so that the profiler times image -> instances; records how
    many instances the last call returned."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.instances: list[int] = []

    def forward(self, pixel_values: torch.Tensor) -> list:
        predictions = self.model.predict(pixel_values)
        self.instances = [len(p) for p in predictions]
        return predictions


def profile(model: nn.Module, size: tuple[int, int], batch: int, device: torch.device, args: argparse.Namespace,
            warmup: int, repeats: int) -> dict:
    result = profile_model(model, size, batch, device, warmup=warmup, repeats=repeats,
                           autocast_dtype=autocast_dtype(device, args.amp), progress=True)
    result["gmacs"] = result["gflops"] / 2
    return result


def build_teacher(kind: str, size: str) -> nn.Module:
    """A foundation-model teacher with random weights; the VFM stack is only imported here."""
    if kind == "sam3":
        from cast.teachers.sam3 import random_sam3_teacher

        return random_sam3_teacher(CLASSES, size=size)
    from cast.teachers.vfm import random_teacher

    return random_teacher(CLASSES, size=size)


def student_vs_teacher(args: argparse.Namespace, device: torch.device) -> tuple[dict, list[dict]]:
    size = tuple(args.size)
    # The full-size teachers take a minute or more per image on a 2-core CPU: fewer passes there.
    slow = device.type == "cpu" and not args.quick
    warmup, repeats = (1, min(args.repeats, 3)) if slow else (args.warmup, args.repeats)
    roles = {"student": lambda: build_student(args.student, len(CLASSES), CLASSES),
             "teacher": lambda: build_teacher("gdino-sam2", args.teacher_size),
             "sam3": lambda: build_teacher("sam3", args.teacher_size)}
    wanted = ["student"] + [{"gdino-sam2": "teacher", "sam3": "sam3"}[kind] for kind in args.teachers]
    results = {}
    for role in wanted:
        torch.manual_seed(0)
        model = Predict(roles[role]())
        results[role] = {**profile(model, size, 1, device, args, warmup, repeats), "instances": model.instances}
        model.cpu()
        r = results[role]
        print(f"{device} {role:8s}: {r['params_m']:7.1f} M params, {r['gflops']:8.1f} GFLOPs, "
              f"{r['latency_ms']:9.1f} ms, {r['fps']:6.2f} FPS, peak {r['peak_mem_mb']:.0f} MiB, "
              f"{r['instances']} instances", flush=True)
        del model
    student = results["student"]
    tiny = "(tiny test config) " if args.teacher_size == "tiny" else ""
    where = f"{device.type} {precision(device, args.amp)}"
    summary = []
    if "teacher" in results:
        teacher = results["teacher"]
        case = f"{where}, {args.student} vs GDINO-L+SAM2-L {tiny}{size[0]}x{size[1]} batch 1"
        ratio = teacher["latency_ms"] / student["latency_ms"]
        summary += [
            summary_row(NAME, case, "parameters M (teacher/ours; paper 568/52 = 10.9x)", student["params_m"],
                        teacher["params_m"], teacher["params_m"] / student["params_m"]),
            summary_row(NAME, case, "GFLOPs (teacher/ours; paper 880/200 = 4.4x)", student["gflops"],
                        teacher["gflops"], teacher["gflops"] / student["gflops"]),
            summary_row(NAME, case, "FPS, image -> instances (ours/teacher; paper 13.0/2.85)", student["fps"],
                        teacher["fps"], ratio, f">= {PAPER_FPS_RATIO}x (paper)", ratio >= PAPER_FPS_RATIO),
            summary_row(NAME, case, "peak memory MiB (teacher/ours)", student["peak_mem_mb"], teacher["peak_mem_mb"],
                        teacher["peak_mem_mb"] / max(student["peak_mem_mb"], 1e-3)),
        ]
    if "sam3" in results:
        sam3 = results["sam3"]
        case = f"{where}, {args.student} vs SAM 3 ({len(CLASSES)} prompts) {tiny}{size[0]}x{size[1]} batch 1"
        summary += [
            summary_row(NAME, case, "SAM 3: parameters M (SAM 3/ours)", student["params_m"], sam3["params_m"],
                        sam3["params_m"] / student["params_m"]),
            summary_row(NAME, case, "SAM 3: GFLOPs (SAM 3/ours)", student["gflops"], sam3["gflops"],
                        sam3["gflops"] / student["gflops"]),
            summary_row(NAME, case, "SAM 3: FPS, image -> instances (ours/SAM 3)", student["fps"], sam3["fps"],
                        sam3["latency_ms"] / student["latency_ms"]),
            summary_row(NAME, case, "SAM 3: peak memory MiB (SAM 3/ours)", student["peak_mem_mb"], sam3["peak_mem_mb"],
                        sam3["peak_mem_mb"] / max(student["peak_mem_mb"], 1e-3)),
        ]
        if "teacher" in results:
            teacher = results["teacher"]
            case = f"{where}, SAM 3 vs GDINO-L+SAM2-L {tiny}{size[0]}x{size[1]} batch 1"
            summary += [
                summary_row(NAME, case, "SAM 3: GFLOPs (GDINO-L+SAM2-L/SAM 3)", sam3["gflops"], teacher["gflops"],
                            teacher["gflops"] / sam3["gflops"]),
                summary_row(NAME, case, "SAM 3: FPS, image -> instances (SAM 3/GDINO-L+SAM2-L)", sam3["fps"], teacher["fps"],
                            teacher["latency_ms"] / sam3["latency_ms"]),
            ]
    return {"input_size": list(size), "teacher_size": args.teacher_size, "warmup": warmup, "repeats": repeats,
            **results, "paper": PAPER}, summary


def presets(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    for preset in args.presets:
        size, batch = ((64, 64), 2) if args.quick else SETTINGS[preset]
        # The big presets are slow on a 2-core CPU: fewer passes there.
        slow = device.type == "cpu" and size[0] * size[1] > 128 * 128
        torch.manual_seed(0)
        model = build_student(preset, len(CLASSES), CLASSES)
        row = {"preset": preset, **profile(model, size, batch, device, args, 1 if slow else args.warmup,
                                           min(args.repeats, 3) if slow else args.repeats)}
        rows.append(row)
        print(f"{preset:13s} {device} {size[0]}x{size[1]} x{batch}  {row['params_m']:6.2f} M  "
              f"{row['gflops']:8.2f} GFLOPs  {row['latency_ms']:9.1f} ms  {row['fps']:7.2f} img/s  "
              f"{row['peak_mem_mb']:8.1f} MiB ({row['peak_mem_source']})", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--student", default="cast-s", help="the student preset compared with the teacher")
    parser.add_argument("--teacher-size", choices=["paper", "tiny"], default="paper")
    parser.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=list(TEACHERS),
                        help="the foundation-model teachers compared with the student")
    parser.add_argument("--size", type=int, nargs=2, default=[512, 1024], metavar=("H", "W"),
                        help="input of the student-vs-teacher comparison")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    add_common_arguments(parser, NAME)
    args = parser.parse_args(argv)
    if args.quick:
        args.presets, args.student, args.teacher_size, args.size = ["cast-tiny"], "cast-tiny", "tiny", [64, 64]
        args.warmup, args.repeats = 1, 2
    devices = setup(args)
    runs = {}
    for device in devices:
        machine = machine_info(device)  # before the work: its load average is the machine's own
        comparison, summary = student_vs_teacher(args, device)
        runs[device.type] = {"machine": machine,
                             "settings": {"precision": precision(device, args.amp),
                                          "flop_convention": "multiply-add = 2 FLOPs"},
                             "results": {"student_vs_teacher": comparison, "presets": presets(args, device)},
                             "summary": summary}
        print_summary(summary)
    write_results(args.output, NAME, runs)


if __name__ == "__main__":
    main()
