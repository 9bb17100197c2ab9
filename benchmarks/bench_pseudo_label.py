"""Benchmark: pseudo-labeling throughput (images/s) of a teacher over a folder of images, in one
process and in several (torchrun, gloo), and whether both give the same labels.

What is timed is `cast.pipeline.pseudo_labels.pseudo_label` as the pipeline calls it: the hash
of the teacher's weights that keys the label store, the folder's images loaded by the data
loader, the teacher's `predict`, COCO RLE encoding, the gather over processes, filtering and the
atomic write of the label file; from a
barrier before to a barrier after, median of --repeats passes over the folder (each writing a
new file, so nothing is reused), after one untimed pass over the first batch of each process.
Process start-up and teacher building are outside that window; the wall time of each whole
launch is recorded too.

Teachers (built with seed 0 in every process, so the processes hold the same weights; the label
manifest's weights hash confirms it):
  demo-teacher  the stand-in teacher preset (build_student). With random weights its mask
                logits hardly vary over an image, so its masks are simpler to encode than a
                trained teacher's (`instances_single` in the results says how many it kept).
  vfm-paper     Grounding-DINO-L + SAM2-L with random weights (cast.teachers.vfm.random_teacher).
  vfm-tiny      the same classes at a few hundred thousand parameters (smoke runs, 64 x 64).
Images: scenes of the demo generator (cast.data.demo.render_scene, target domain) written as PNGs.
CPU threads: the processes share the cores (each gets cores // processes threads), so the
speed-up is what splitting one machine's cores gives. CUDA: autocast; processes use GPU
local_rank % GPU count, so two processes may share one GPU (gloo gathers the small result
lists; NCCL would refuse two ranks on one device). Every instance is kept (score threshold 0),
so the comparison of one and several processes covers all of them.

    python benchmarks/bench_pseudo_label.py                          # demo-teacher and vfm-paper
    python benchmarks/bench_pseudo_label.py --teachers demo-teacher --images 64
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_common_arguments, autocast, machine_info, measure_devices, precision, setup,  # noqa: E402
                    summary_row, sync, time_stats)
from cast.config import PseudoLabelConfig  # noqa: E402
from cast.data.demo import DEMO_CLASSES, render_scene  # noqa: E402
from cast.data.folder import read_image_folder  # noqa: E402
from cast.models.student import build_student  # noqa: E402
from cast.pipeline.pseudo_labels import pseudo_label  # noqa: E402
from cast.utils.distributed import DistContext, barrier, cleanup  # noqa: E402

NAME = "pseudo_label"
TEACHERS = ("demo-teacher", "vfm-paper", "vfm-tiny")
# Per teacher: (images in the folder, image side, batch per process, timed passes) for a full
# run; the paper teacher runs SAM2-L at 1024 x 1024 on every image (about half a minute on a
# 2-core CPU), hence fewer images and one pass.
DEFAULTS = {"demo-teacher": (96, 128, 4, 3), "vfm-paper": (4, 512, 1, 1), "vfm-tiny": (16, 64, 2, 3)}
QUICK = {"demo-teacher": (8, 64, 2, 1), "vfm-tiny": (4, 64, 2, 1), "vfm-paper": (2, 256, 1, 1)}


def build_teacher(name: str) -> nn.Module:
    torch.manual_seed(0)
    classes = list(DEMO_CLASSES)
    if name == "demo-teacher":
        return build_student("demo-teacher", len(classes), classes)
    from cast.teachers.vfm import random_teacher  # the VFM stack is only imported when asked for

    return random_teacher(classes, size=name.removeprefix("vfm-"))


def write_images(folder: Path, count: int, side: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image, _, _ = render_scene(np.random.default_rng([0, i]), "target", side)
        Image.fromarray(image).save(folder / f"{i:05d}.png")


def worker(args: argparse.Namespace) -> None:
    """One process of a pseudo-labeling run (plain, or one of torchrun's)."""
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1:
        dist.init_process_group("gloo")  # see the module docstring
    device = torch.device(args.devices[0])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    ctx = DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)
    try:
        images = read_image_folder(args.folder, classes=list(DEMO_CLASSES), progress=False)
        teacher = build_teacher(args.teacher).to(device)
        cfg = PseudoLabelConfig(score_threshold=0.0)
        out = Path(args.work_dir)

        def label(samples, tag: str) -> list[dict]:
            with autocast(device, args.amp):
                return pseudo_label(teacher, samples, images.category_ids, cfg, out / f"{tag}.json",
                                    out / f"{tag}.manifest.json", test_size=None, batch_size=args.batch, ctx=ctx,
                                    teacher=args.teacher)

        label(images.subset(images.image_ids[:args.batch * world_size]), "warmup")
        seconds = []
        for r in range(args.repeats):
            barrier()
            start = time.perf_counter()
            results = label(images, f"pass{r}")
            sync(device)
            barrier()
            seconds.append(time.perf_counter() - start)
        if ctx.is_main:
            manifest = json.loads((out / "pass0.manifest.json").read_text())
            Path(args.result).write_text(json.dumps({
                "seconds": seconds, "images": len(images), "world_size": world_size,
                "threads_per_process": torch.get_num_threads(), "device": str(device),
                "teacher_hash": manifest["settings"]["teacher_hash"], "results": results}))
    finally:
        cleanup()


def launch(args: argparse.Namespace, teacher: str, folder: Path, batch: int, repeats: int, processes: int,
           threads: int, device: torch.device, tmp: Path) -> dict:
    """Run the worker in `processes` processes; its rank-0 record plus the launch's wall time."""
    work = tmp / f"{teacher}-{processes}"
    work.mkdir()
    result = work / "result.json"
    worker_args = [__file__, "--worker", "--teacher", teacher, "--folder", str(folder), "--work-dir", str(work),
                   "--result", str(result), "--batch", str(batch), "--repeats", str(repeats),
                   "--threads", str(threads), "--devices", device.type, "--amp", args.amp]
    if processes == 1:
        cmd = [sys.executable, *worker_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               *worker_args]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall_s = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{teacher} with {processes} process(es) failed (exit {done.returncode}):\n"
                           f"{done.stderr[-4000:]}")
    record = json.loads(result.read_text())
    return {**record, "launch_wall_s": wall_s}


def compare(single: list[dict], multi: list[dict]) -> dict:
    """Same images, instance counts and classes; largest score difference; share of identical masks."""
    def key(r: dict) -> tuple:
        return r["image_id"], r["category_id"], r["segmentation"]["counts"]

    same_count = len(single) == len(multi)
    pairs = list(zip(single, multi)) if same_count else []
    identical = sum(key(a) == key(b) for a, b in pairs)
    return {"instances_single": len(single), "instances_multi": len(multi),
            "same_images_and_classes": same_count and all(a["image_id"] == b["image_id"] and
                                                          a["category_id"] == b["category_id"] for a, b in pairs),
            "max_score_diff": max((abs(a["score"] - b["score"]) for a, b in pairs), default=0.0),
            "identical_masks_fraction": identical / len(pairs) if pairs else float(same_count)}


def measure_device(args: argparse.Namespace, device: torch.device) -> dict:
    machine = machine_info(device)  # before the work: its load average is the machine's own
    total_threads = torch.get_num_threads()
    results, summary = {}, []
    for teacher in args.teachers:
        count, side, batch, repeats = (QUICK if args.quick else DEFAULTS)[teacher]
        count, side, batch = args.images or count, args.image_size or side, args.batch or batch
        repeats = args.repeats or repeats
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            write_images(tmp / "images", count, side)
            runs = {}
            for processes in (1, args.processes):
                threads = max(1, total_threads // processes)
                runs[processes] = launch(args, teacher, tmp / "images", batch, repeats, processes, threads, device,
                                         tmp)
        single, multi = runs[1], runs[args.processes]
        agreement = compare(single.pop("results"), multi.pop("results"))
        agreement["same_teacher_weights"] = single["teacher_hash"] == multi["teacher_hash"]
        for r in (single, multi):
            r.update(time_stats(r["seconds"]))
            r["images_per_s"] = r["images"] / (r["median_ms"] / 1e3)
        speedup = multi["images_per_s"] / single["images_per_s"]
        results[teacher] = {"images": count, "image_size": side, "batch_per_process": batch, "passes": repeats,
                            "single": single,
                            "multi": multi, "speedup": speedup, "agreement": agreement}
        print(f"{device} {teacher}: {count} images {side}x{side}: 1 process {single['images_per_s']:.2f} img/s, "
              f"{args.processes} processes {multi['images_per_s']:.2f} img/s ({speedup:.2f}x); {agreement}", flush=True)
        agrees = agreement["same_images_and_classes"] and agreement["same_teacher_weights"]
        case = f"{device.type} {precision(device, args.amp)}, {teacher}, {count} images {side}x{side}"
        summary.append(summary_row(NAME, case, f"pseudo-label images/s, {args.processes} processes vs 1 "
                                   f"({'same labels' if agrees else 'LABELS DIFFER'})",
                                   multi["images_per_s"], single["images_per_s"], speedup))
    settings = {"teachers": args.teachers, "processes": args.processes,
                "cpu_threads_total": total_threads, "precision": precision(device, args.amp),
                "score_threshold": 0.0}
    return {"machine": machine, "settings": settings, "results": results, "summary": summary}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", nargs="+", choices=TEACHERS, default=None,
                        help="default: demo-teacher vfm-paper (--quick: demo-teacher)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--images", type=int, default=None, help="images in the folder (default per teacher)")
    parser.add_argument("--image-size", type=int, default=None, help="square image side (default per teacher)")
    parser.add_argument("--batch", type=int, default=None, help="images per batch and process (default per teacher)")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes (default per teacher)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--teacher", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    add_common_arguments(parser, NAME)
    args = parser.parse_args(argv)
    args.teachers = args.teachers or (["demo-teacher"] if args.quick else ["demo-teacher", "vfm-paper"])
    devices = setup(args)
    if args.worker:
        worker(args)
        return
    measure_devices(args.output, NAME, devices, lambda device: measure_device(args, device))


if __name__ == "__main__":
    main()
