"""Benchmark: student inference at batch 1 in PyTorch eager, with torch.compile, and in ONNX
Runtime, on the same input; latency, the ratios against eager, and how far each path's outputs
are from eager's (so that a fast but wrong path cannot win).

All three time the forward to the class and mask logits (post-processing excluded), median of
--repeats after warm-up calls:
  eager:    `model(pixel_values, pixel_mask)` under torch.no_grad (and autocast on CUDA). It
            also computes the contrastive projection head, a 1x1-conv pair at stride 32 that
            the exported graph leaves out (a negligible share of the work).
  compile:  `torch.compile(model)` (inductor, default mode); its first call, which compiles, is
            timed separately as compile_s; the graph count, graph breaks and whether anything
            recompiled during the timed calls are recorded. A failure is recorded with its
            reason, not raised.
  onnx:     `cast.models.export.export_onnx` at the input size, run by `OnnxStudent` with
            CPUExecutionProvider, intra-op threads = torch's thread count (on CUDA with
            onnxruntime's CUDA provider when the installed onnxruntime has one, in float32).
Outputs agree when the largest absolute difference to eager's logits is within 1e-3 (float32;
5e-2 under autocast) times max(1, largest |eager logit|).

    python benchmarks/bench_inference.py                  # cast-s at 512x1024
    python benchmarks/bench_inference.py --quick          # cast-tiny at 64x64
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
from cast.models.export import OnnxStudent, export_onnx  # noqa: E402
from cast.models.student import build_student  # noqa: E402

NAME = "inference"
NUM_CLASSES = 8
GOAL_ONNX = 1.5  # ONNX Runtime at least this much faster than eager at batch 1 (CPU)


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


def measure_onnx(model: torch.nn.Module, inputs: tuple[torch.Tensor, torch.Tensor],
                 reference: tuple[torch.Tensor, torch.Tensor], device: torch.device,
                 args: argparse.Namespace) -> dict:
    """ONNX Runtime's latency (export time apart) and agreement with a float32 eager pass."""
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return {"failed": f"onnxruntime {ort.__version__} here has no CUDAExecutionProvider "
                              f"(available: {ort.get_available_providers()})"}
        providers = ["CUDAExecutionProvider"]
    pixel_values, pixel_mask = inputs
    if device.type != "cpu":  # the graph is float32: compare with float32 eager on the CPU
        with torch.no_grad():
            out = model.cpu()(pixel_values.cpu(), pixel_mask.cpu())
        reference = (out.class_logits, out.mask_logits)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = export_onnx(model.cpu(), Path(tmp) / "student.onnx", image_size=tuple(pixel_values.shape[-2:]))
        export_s = time.perf_counter() - start
        model.to(device)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the same cores as eager
        onnx_model = OnnxStudent(path, providers=providers, session_options=options)
        seconds = time_calls(lambda: onnx_model(pixel_values, pixel_mask), device, args.warmup, args.repeats)
        return {**time_stats(seconds), "export_s": export_s, "provider": providers[0], "precision": "fp32",
                **_agreement(onnx_model(pixel_values, pixel_mask), reference, 1e-3)}


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

    seconds = time_calls(lambda: logits(model, inputs, device, args.amp), device, args.warmup, args.repeats)
    reference = logits(model, inputs, device, args.amp)
    results["eager"] = {**time_stats(seconds), "precision": precision(device, args.amp)}

    if args.no_compile:
        results["compile"] = {"failed": "skipped (--no-compile)"}
    else:
        results["compile"] = measure_compiled(model, inputs, reference, device, args, tolerance)

    results["onnx"] = measure_onnx(model, inputs, reference, device, args)

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
    for path_name, label in (("onnx", "onnxruntime"), ("compile", "torch.compile")):
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
                "repeats": args.repeats, "precision": precision(device, args.amp), "tolerance": tolerance}
    return {"machine": machine, "settings": settings, "results": results, "summary": summary}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cast-s")
    parser.add_argument("--size", type=int, nargs=2, default=[512, 1024], metavar=("H", "W"))
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls (default 1 on CPU, 10 on CUDA)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 5 on CPU, 50 on CUDA)")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out (it compiles for minutes)")
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
