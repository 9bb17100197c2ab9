"""The predict part of bench_inference.py: `python -m cast predict`'s own path (decode, resize, batch,
model, post-processing, RLE, the streamed COCO json) over the demo's val images, eager vs the ONNX
graph `python -m cast export` writes (fp32) vs its int8 variant; images/s and the mask AP of each
against the val annotations. Each path runs --predict-rounds times, in alternating order; its
throughput is the images over its median wall time.

The AP only means something for a trained model (--predict-model, e.g. the demo's stand-in
teacher from `python -m cast pretrain-teacher --config configs/demo.yaml`, or a run's student);
without one an untrained demo-student is timed and its AP recorded as such.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from common import ROOT, summary_row
from cast.data.demo import DEMO_CLASSES, generate
from cast.evaluation.coco import evaluate_instances, load_results
from cast.inference.sources import open_source
from cast.inference.stream import StreamOptions, stream_predictions
from cast.models.auto import load_model
from cast.models.export import OnnxStudent, export_onnx
from cast.models.student import build_student

NAME = "inference"
PATHS = ("eager", "onnx", "onnx_int8")


def _demo(args: argparse.Namespace, folder: Path) -> Path:
    """The demo val json (the demo set generated when missing; a tiny one under --quick)."""
    if args.quick:
        root = folder / "demo"
        generate(root, image_size=64, num_source_train=1, num_target_train=1, num_target_val=4, max_objects=3,
                 progress=False)
    else:
        root = args.demo_root or ROOT / "data" / "demo"
        generate(root, progress=False)  # configs/demo.yaml's settings: kept when already complete
    return root / "target_val" / "annotations.json"


def measure_predict(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, Any], list[dict]]:
    rounds = getattr(args, "predict_rounds", 2)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        val = _demo(args, folder)
        if args.predict_model is not None:
            model, trained, name = load_model(args.predict_model), True, str(args.predict_model)
        else:
            torch.manual_seed(0)
            preset = "cast-tiny" if args.quick else "demo-student"
            model, trained, name = build_student(preset, len(DEMO_CLASSES), list(DEMO_CLASSES)).eval(), False, preset
        test_size = 64 if args.quick else 128  # the demo's image size and configs/demo.yaml's data.test_size
        models = {"eager": model.to(device)}
        for path_name, int8 in (("onnx", False), ("onnx_int8", True)):
            path = export_onnx(model.cpu(), folder / f"{path_name}.onnx", (test_size, test_size), int8=int8)
            models[path_name] = OnnxStudent(path)
        model.to(device)
        seconds: dict[str, list[float]] = {p: [] for p in PATHS}
        metrics: dict[str, dict] = {}
        for r in range(rounds):
            for path_name in (PATHS if r % 2 == 0 else PATHS[::-1]):
                out = folder / f"{path_name}-{r}"
                source = open_source(val, models[path_name].classes)
                options = StreamOptions(score_threshold=0.0, test_size=test_size, batch_size=1, shard_size=64)
                start = time.perf_counter()
                summary = stream_predictions(models[path_name], source, out, options, {"path": path_name},
                                             device=device if path_name == "eager" else "cpu")
                seconds[path_name].append(time.perf_counter() - start)
                if path_name not in metrics:
                    metrics[path_name] = evaluate_instances(val, load_results(summary.path))
                images = summary.images
    results: dict[str, Any] = {"settings": {"model": name, "trained": trained, "data": str(val.relative_to(val.parents[2]))
                                            if not args.quick else "tiny demo", "images": images,
                                            "test_size": test_size, "batch_size": 1, "rounds": rounds,
                                            "score_threshold": 0.0}}
    for path_name in PATHS:
        wall = statistics.median(seconds[path_name])
        results[path_name] = {"images_per_s": images / wall, "median_s": wall, "seconds": seconds[path_name],
                              "AP": metrics[path_name]["AP"], "AP50": metrics[path_name]["AP50"]}
        print(f"{device} predict {path_name:9s}: {images / wall:7.2f} images/s, mask AP {metrics[path_name]['AP']:.1f}"
              f"{'' if trained else ' (untrained model)'}", flush=True)
    case = f"{device.type}, predict on {images} demo val images ({name}{'' if trained else ', untrained'}, batch 1)"
    eager = results["eager"]["images_per_s"]
    rows = [summary_row(NAME, case, f"predict images/s, {label} vs eager", results[p]["images_per_s"], eager,
                        results[p]["images_per_s"] / eager)
            for p, label in (("onnx", "onnxruntime"), ("onnx_int8", "onnxruntime int8"))]
    fp32, int8 = results["onnx"]["AP"], results["onnx_int8"]["AP"]
    rows.append(summary_row(NAME, case, "mask AP, onnxruntime int8 vs fp32", int8, fp32,
                            int8 / fp32 if fp32 > 0 and int8 > 0 else None))
    return results, rows
