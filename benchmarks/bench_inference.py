"""Benchmark: student inference at batch 1 in PyTorch eager, with torch.compile, and in ONNX
Runtime, on the same input; latency, the ratios against eager, and how far each path's outputs
are from eager's (so that a fast but wrong path cannot win). Then `predict` throughput (images/s,
decoding, resizing, post-processing and COCO encoding included) eager vs ONNX on the demo val,
and the mask AP of each path there (fp32 and int8 ONNX beside eager).

Latency times the forward to the class and mask logits (post-processing excluded), median of
--repeats after warm-up calls; eager and the ONNX graphs are timed in interleaved rounds (one call
of each per round), so that a change in the machine's load between blocks of calls cannot favour
one of them:
  eager:        `model(pixel_values, pixel_mask)` under torch.no_grad (and autocast on CUDA). It
                also computes the contrastive projection head, a 1x1-conv pair at stride 32 that
                the exported graph leaves out (a negligible share of the work).
  compile:      `torch.compile(model)` (inductor, default mode); its first call, which compiles, is
                timed separately as compile_s; the graph count, graph breaks and whether anything
                recompiled during the timed calls are recorded. A failure is recorded with its
                reason, not raised.
  onnx:         `cast.models.export.export_onnx` at the input size, as `python -m cast export`
                writes it (the graph shaped by cast.models.onnx_graph: fused attention, constant
                position embeddings, low-resolution attention masks), run by `OnnxStudent` with
                CPUExecutionProvider, intra-op threads = torch's thread count (on CUDA with
                onnxruntime's CUDA provider when the installed onnxruntime has one, in float32).
  onnx_literal: the same export without shaping (`--no-optimize`): the eager model's operations.
  onnx_int8:    the shaped graph with dynamic int8 quantisation of its MatMul weights (`--int8`).
Outputs agree when the largest absolute difference to eager's class and mask logits is within 1e-3
(float32; 5e-2 under autocast) times max(1, largest |eager logit|); the full-resolution masks (x4
upsampled logits, binarised) of eager's 10 best queries are compared by IoU as well.

    python benchmarks/bench_inference.py                  # cast-s at 512x1024, predict on data/demo
    python benchmarks/bench_inference.py --predict-model data/cache/standin-.../model   # AP of a trained model
    python benchmarks/bench_inference.py --quick          # cast-tiny at 64x64, a tiny demo set
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

import onnxruntime as ort
import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_common_arguments, autocast, machine_info, measure_devices, precision, setup,  # noqa: E402
                    summary_row, sync, time_calls, time_stats)
from cast.models.export import OnnxStudent, agreement, export_onnx  # noqa: E402
from cast.models.student import build_student  # noqa: E402
from predict_throughput import measure_predict  # noqa: E402

NAME = "inference"
NUM_CLASSES = 8
GOAL_ONNX = 1.5  # ONNX Runtime at least this much faster than eager at batch 1 (CPU)
# name -> (label, export options) of the ONNX graphs measured; "onnx" is what `cast export` writes.
ONNX_VARIANTS = {"onnx": ("onnxruntime", {}), "onnx_literal": ("onnxruntime, literal graph", {"optimize": False}),
                 "onnx_int8": ("onnxruntime, int8", {"int8": True})}


def _agreement(outputs: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor],
               tolerance: float) -> dict:
    diff = max(float((a.float().cpu() - b.float().cpu()).abs().max()) for a, b in zip(outputs, reference))
    scale = max(float(r.float().abs().max()) for r in reference)
    return {"max_abs_diff": diff, "reference_max_abs": scale, "agrees": diff <= tolerance * max(1.0, scale)}


def _failure(e: BaseException) -> str:
    """The exception's type and first line, plus where in our or torch's code it came from."""
    where = traceback.extract_tb(e.__traceback__)[-1]
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:300]} (at {Path(where.filename).name}:{where.lineno})"


def logits(model, inputs: tuple[torch.Tensor, torch.Tensor], device: torch.device,
           amp: str) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad(), autocast(device, amp):
        out = model(*inputs)
    return out.class_logits, out.mask_logits


def measure_compiled(model: torch.nn.Module, inputs: tuple[torch.Tensor, torch.Tensor],
                     reference: tuple[torch.Tensor, torch.Tensor], device: torch.device,
                     args: argparse.Namespace, tolerance: float) -> dict:
    """torch.compile's latency, compile time and agreement with eager; a failure (no compiler,
    an unsupported operator) is the result rather than an error."""
    try:
        compiled = torch.compile(model)
        start = time.perf_counter()
        logits(compiled, inputs, device, args.amp)  # compiles
        sync(device)
        compile_s = time.perf_counter() - start
        graphs = counters["stats"]["unique_graphs"]
        seconds = time_calls(lambda: logits(compiled, inputs, device, args.amp), device, args.warmup, args.repeats)
        # A graph compiled during the timed calls would make them time compilation, not inference.
        return {**time_stats(seconds), "compile_s": compile_s, "precision": precision(device, args.amp),
                "graphs": graphs, "graph_breaks": sum(counters["graph_break"].values()),
                "recompiled_while_timed": counters["stats"]["unique_graphs"] > graphs,
                **_agreement(logits(compiled, inputs, device, args.amp), reference, tolerance)}
    except Exception as e:  # noqa: BLE001 - any compile failure is recorded, not fatal
        return {"failed": _failure(e)}
    finally:
        torch._dynamo.reset()


def onnx_sessions(model: torch.nn.Module, size: tuple[int, int], device: torch.device, folder: Path) -> dict:
    """Each ONNX variant exported at `size` and opened (or the reason it could not be)."""
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            reason = (f"onnxruntime {ort.__version__} here has no CUDAExecutionProvider "
                      f"(available: {ort.get_available_providers()})")
            return {name: {"failed": reason} for name in ONNX_VARIANTS}
        providers = ["CUDAExecutionProvider"]
    out = {}
    for name, (_, options) in ONNX_VARIANTS.items():
        start = time.perf_counter()
        path = export_onnx(model.cpu(), folder / f"{name}.onnx", image_size=size, **options)
        export_s = time.perf_counter() - start
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = torch.get_num_threads()  # the same cores as eager
        out[name] = {"model": OnnxStudent(path, providers=providers, session_options=session_options),
                     "path": path, "export_s": export_s, "provider": providers[0]}
    model.to(device)
    return out


def interleaved(fns: dict, device: torch.device, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Wall seconds of `repeats` rounds, each calling every function once, after `warmup` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def onnx_result(session: dict, seconds: list[float], model: torch.nn.Module, inputs: tuple,
                reference: tuple, tolerance: float) -> dict:
    """Latency and agreement of one ONNX variant (against a float32 eager pass on the CPU)."""
    pixel_values, pixel_mask = inputs
    if pixel_values.device.type != "cpu":
        with torch.no_grad():
            out = model.cpu()(pixel_values.cpu(), pixel_mask.cpu())
        reference = (out.class_logits, out.mask_logits)
    check = agreement(model.cpu(), session["path"])
    model.to(pixel_values.device)
    result = {**time_stats(seconds), "export_s": session["export_s"], "provider": session["provider"],
              "precision": "int8 weights" if "int8" in session["path"].name else "fp32",
              **_agreement(session["model"](pixel_values, pixel_mask), reference, tolerance),
              "full_resolution_mask_iou_min": check["mask_iou_min"]}
    result["agrees"] = result["agrees"] and check["mask_iou_min"] >= 0.99
    return result


def measure_device(args: argparse.Namespace, device: torch.device) -> dict:
    machine = machine_info(device)  # before the work: its load average is the machine's own
    size = tuple(args.size)
    torch.manual_seed(0)
    model = build_student(args.preset, NUM_CLASSES).eval().to(device)
    pixel_values = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)
    pixel_mask = torch.ones(1, *size, dtype=torch.bool, device=device)
    tolerance = 5e-2 if precision(device, args.amp) != "fp32" else 1e-3
    inputs = (pixel_values, pixel_mask)
    results = {}

    reference = logits(model, inputs, device, args.amp)
    if args.no_compile:
        results["compile"] = {"failed": "skipped (--no-compile)"}
    else:
        results["compile"] = measure_compiled(model, inputs, reference, device, args, tolerance)

    with tempfile.TemporaryDirectory() as tmp:
        sessions = onnx_sessions(model, size, device, Path(tmp))
        fns = {"eager": lambda: logits(model, inputs, device, args.amp)}
        fns.update({name: (lambda m=s["model"]: m(pixel_values, pixel_mask))
                    for name, s in sessions.items() if "failed" not in s})
        seconds = interleaved(fns, device, args.warmup, args.repeats)
        results["eager"] = {**time_stats(seconds["eager"]), "precision": precision(device, args.amp)}
        for name, session in sessions.items():
            results[name] = session if "failed" in session else onnx_result(
                session, seconds[name], model, inputs, reference, 1e-3)
    results["onnx_literal"]["note"] = "the same export without cast.models.onnx_graph's shaping"

    eager_ms = results["eager"]["median_ms"]
    for path_name, r in results.items():
        if "failed" in r:
            print(f"{device} {path_name:8s}: FAILED {r['failed']}", flush=True)
        else:
            check = f", max |diff| to eager {r['max_abs_diff']:.2e} ({'agrees' if r['agrees'] else 'DISAGREES'})" \
                if "agrees" in r else ""
            print(f"{device} {path_name:8s}: {r['median_ms']:9.1f} ms (spread {r['spread_pct']:.0f}%), "
                  f"{eager_ms / r['median_ms']:.2f}x eager{check}", flush=True)

    case = f"{device.type} {precision(device, args.amp)}, {args.preset} {size[0]}x{size[1]} batch 1"
    summary = []
    for path_name, label in [*((k, v[0]) for k, v in ONNX_VARIANTS.items()), ("compile", "torch.compile")]:
        r = results[path_name]
        # The goal is set for onnxruntime on the CPU (its CPUExecutionProvider); a failure misses it.
        goal = f">= {GOAL_ONNX}x, outputs agree" if path_name == "onnx" and device.type == "cpu" else None
        if "failed" in r:
            summary.append(summary_row(NAME, case, f"latency ms, {label} vs eager ({r['failed'][:80]})", None,
                                       eager_ms, None, goal, False if goal else None))
            continue
        ratio = eager_ms / r["median_ms"]
        met = ratio >= GOAL_ONNX and r["agrees"] if goal else None
        note = "; RECOMPILED while timed" if r.get("recompiled_while_timed") else ""
        summary.append(summary_row(NAME, case, f"latency ms, {label} vs eager (max abs diff "
                                   f"{r['max_abs_diff']:.1e}{note})", r["median_ms"], eager_ms, ratio, goal, met))
    settings = {"preset": args.preset, "input_size": list(size), "batch": 1, "warmup": args.warmup,
                "repeats": args.repeats, "precision": precision(device, args.amp), "tolerance": tolerance,
                "timing": "interleaved rounds (eager and the ONNX graphs)"}
    if not args.no_predict:
        results["predict"], rows = measure_predict(args, device)
        summary += rows
        settings["predict"] = results["predict"]["settings"]
    return {"machine": machine, "settings": settings, "results": results, "summary": summary}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cast-s")
    parser.add_argument("--size", type=int, nargs=2, default=[512, 1024], metavar=("H", "W"))
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls (default 1 on CPU, 10 on CUDA)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 5 on CPU, 50 on CUDA)")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out (it compiles for minutes)")
    parser.add_argument("--no-predict", action="store_true", help="leave the demo-val predict throughput out")
    parser.add_argument("--predict-model", type=Path, default=None,
                        help="a trained model folder for the predict part (its AP means something); default: "
                             "an untrained demo-student (speed only)")
    parser.add_argument("--predict-rounds", type=int, default=2, help="passes over the demo val per path")
    parser.add_argument("--demo-root", type=Path, default=None,
                        help="demo data folder (default data/demo; generated when missing)")
    add_common_arguments(parser, NAME)
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.size = "cast-tiny", [64, 64]
    devices = setup(args)

    def measure(device: torch.device) -> dict:
        # cast-s takes seconds per call on a 2-core CPU, milliseconds on a GPU.
        big = device.type == "cuda" and not args.quick
        device_args = argparse.Namespace(**{
            **vars(args), "warmup": args.warmup if args.warmup is not None else (10 if big else 1),
            "repeats": args.repeats or (50 if big else 3 if args.quick else 5)})
        return measure_device(device_args, device)

    measure_devices(args.output, NAME, devices, measure)


if __name__ == "__main__":
    main()
