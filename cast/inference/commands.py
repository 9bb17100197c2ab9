"""What `python -m cast predict | label | export | eval` do, once `cast.cli` has parsed their flags.

Errors: `UsageError` (exit code 2) for what the flags name wrongly: a model path of an unknown kind
or without its files, an .onnx without its sidecar json, class names the teacher's tokenizer
cannot take, a model that cannot be exported. Data errors (exit code 1) are `DataError` (no image
in --source, an unreadable image with --strict, predictions that do not fit the ground truth),
`OSError` (an output that cannot be written) and `SettingsChangedError` (an output folder holding
the partial results of other settings). Each message names the path it is about.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from cast.data.errors import DataError
from cast.utils.cache import file_digest
from cast.utils.distributed import DistContext


class UsageError(ValueError):
    """A flag names something that cannot serve its purpose (exit code 2)."""


def open_model(path: str | os.PathLike, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """The model at `path` (a model folder of a run or an exported .onnx) on `device`, and what
    identifies it for the resume check (its path and the hash of its weights)."""
    from cast.models.auto import load_model
    from cast.models.protocol import weights_hash

    try:
        model = load_model(path, map_location=device)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--model {e}" if not str(e).startswith(str(path)) else str(e)) from None
    if isinstance(model, torch.nn.Module):
        model = model.to(device)
        digest = weights_hash(model)
    else:
        digest = file_digest(path)
    return model, {"path": os.path.abspath(path), "weights": digest}


def check_writable(folder: str | os.PathLike) -> Path:
    """Create `folder` and check a file can be written in it (before any model is loaded)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise OSError(e.errno, f"output folder cannot be written ({e.strerror})", str(folder)) from None
    return folder


def _options(args: argparse.Namespace, output_name: str, test_size: int | None, score_threshold: float):
    from cast.inference.stream import StreamOptions

    return StreamOptions(output_name=output_name, score_threshold=score_threshold, test_size=test_size,
                         batch_size=args.batch_size, shard_size=args.shard_size,
                         save_overlays=getattr(args, "save_overlays", False), strict=args.strict,
                         workers=args.workers or 0)


def _report(summary: Any, what: str) -> None:
    resumed = f" ({summary.resumed_images} done by an earlier run)" if summary.resumed_images else ""
    print(f"{what}: {summary.instances} instances on {summary.images} images{resumed} -> {summary.path}")
    if summary.skipped:
        print(f"skipped {len(summary.skipped)} unreadable images (listed in the json's info.skipped_images)")
    if summary.seconds > 0 and summary.images > summary.resumed_images:
        print(f"{(summary.images - summary.resumed_images) / summary.seconds:.2f} images/s")


def predict(args: argparse.Namespace, ctx: DistContext, output_name: str = "predictions.json",
            out: str | None = None, quiet: bool = False) -> Path | None:
    """`predict`: the model of --model on every image of --source into --out (rank 0 returns the json)."""
    from cast.inference.sources import open_source
    from cast.inference.stream import OVERLAYS, stream_predictions

    out_dir = Path(out or args.out)
    if ctx.is_main:
        check_writable(out_dir)
    model, identity = open_model(args.model, ctx.device)
    source = open_source(args.source, model.classes, strict=args.strict, exclude=out_dir / OVERLAYS)
    if getattr(args, "require_categories", False) and source.kind == "coco":
        _require_categories(source, model.classes)
    test_size = args.test_size if args.test_size is not None else getattr(model, "default_test_size", None)
    summary = stream_predictions(model, source, out_dir, _options(args, output_name, test_size, args.score_threshold),
                                 identity, ctx, device=ctx.device)
    if summary is not None and not quiet:
        _report(summary, "predict")
    return summary.path if summary is not None else None


def _require_categories(source: Any, classes: list[str]) -> None:
    missing = [c for c in classes if c not in source.category_names]
    if missing:
        raise DataError(source.path, f"its categories {source.category_names} do not name the model's classes "
                                     f"{missing}: its annotations cannot score the model's predictions")


def label(args: argparse.Namespace, ctx: DistContext) -> None:
    """`label`: zero-shot instances of a folder by the foundation-model teacher, as a COCO training set."""
    from cast.inference.sources import open_source
    from cast.inference.stream import OVERLAYS, stream_predictions
    from cast.models.protocol import weights_hash

    classes = parse_classes(args.classes)
    out_dir = Path(args.out)
    if ctx.is_main:
        check_writable(out_dir)
    teacher = build_teacher(args, classes).to(ctx.device).eval()
    source = open_source(args.source, classes, strict=args.strict, exclude=out_dir / OVERLAYS)
    identity = {"teacher": args.teacher, "grounding_dino": os.path.abspath(args.grounding_dino),
                "sam": os.path.abspath(args.sam), "weights": weights_hash(teacher)}
    options = _options(args, "annotations.json", args.test_size, 0.0)
    summary = stream_predictions(teacher, source, out_dir, options, identity, ctx, device=ctx.device)
    if summary is not None:
        _report(summary, "label")
        print(f"a training set: point a config's data.root at {out_dir.parent} (data.kind: coco, "
              f"{out_dir.name}/annotations.json)")


def parse_classes(text: str) -> list[str]:
    classes = [c.strip() for c in text.split(",") if c.strip()]
    if not classes:
        raise UsageError(f"--classes {text!r}: give class names separated by commas, e.g. \"car,person\"")
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:
        raise UsageError(f"--classes {text!r}: {repeated} named more than once")
    return classes


def build_teacher(args: argparse.Namespace, classes: list[str]) -> torch.nn.Module:
    from cast.config import TeacherConfig
    from cast.teachers.hub import zero_shot_teacher

    config = TeacherConfig(kind=args.teacher, grounding_dino_dir=args.grounding_dino, sam_dir=args.sam,
                           sam3_dir=args.sam3,
                           box_threshold=args.box_threshold, text_threshold=args.text_threshold,
                           mask_threshold=args.mask_threshold, max_instances=args.max_instances)
    problems = config.problems()
    if problems:
        key, problem = problems[0]
        raise UsageError(f"--{key.replace('_', '-')} {problem}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr keeps our progress bar and our one-line errors
    try:
        return zero_shot_teacher(config, classes, projection_stride=8)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    except ValueError as e:  # a folder of another kind, or class names the tokenizer cannot take
        message = str(e)
        raise UsageError(f"--classes {args.classes!r}: {message}" if message.startswith("class ")
                         or "prompt" in message else message) from None
    finally:
        hf_logging.enable_progress_bar()


def export(args: argparse.Namespace) -> None:
    """`export`: the student of --model as an ONNX graph + sidecar json, with its agreement with eager."""
    from cast.models.export import agreement, export_onnx, sidecar_path
    from cast.models.student import CastStudent

    model, _ = open_model(args.model, torch.device("cpu"))
    if not isinstance(model, CastStudent):
        raise UsageError(f"{args.model}: only CAST students export to ONNX (this is a {type(model).__name__})")
    out = Path(args.out)
    if out.suffix.lower() != ".onnx":
        raise UsageError(f"--out {out}: the graph's file name must end in .onnx")
    test_size = getattr(model, "default_test_size", None)
    image_size = args.image_size or ([test_size, test_size] if test_size else None)
    if image_size is None:
        raise UsageError(f"{args.model}: not inside a run folder, so no test size is known: pass --image-size H W")
    if min(image_size) < 32:
        raise UsageError(f"--image-size {image_size}: both sides must be >= 32")
    path = export_onnx(model, out, tuple(image_size), opset=args.opset, optimize=not args.no_optimize,
                       int8=args.int8, test_size=test_size)
    check = agreement(model, path)
    print(f"exported {path} and {sidecar_path(path)} ({image_size[0]}x{image_size[1]}, opset {args.opset}"
          f"{', int8' if args.int8 else ''})")
    print(f"agreement with eager on a test input: max |diff| class logits {check['class_logits_max_abs_diff']:.2e}, "
          f"mask logits {check['mask_logits_max_abs_diff']:.2e}; full-resolution mask IoU of matched instances "
          f"{check['mask_iou_mean']:.4f} (min {check['mask_iou_min']:.4f}, {check['instances']} instances)")


def evaluate(args: argparse.Namespace, ctx: DistContext) -> None:
    """`eval`: COCO mask AP of --predictions (or of --model's predictions) against --data, one json on stdout."""
    from cast.evaluation.coco import evaluate_instances, load_results

    data = Path(args.data)
    if not data.is_file():
        raise DataError(data, "ground-truth json not found")
    if args.model is not None:
        from cast.utils.distributed import broadcast_object

        # One folder for every process of a torchrun launch: rank 0's.
        tmp = tempfile.mkdtemp(prefix="cast-eval-") if ctx.is_main and not args.out else None
        try:
            args.source, args.require_categories = str(data), True
            path = predict(args, ctx, out=broadcast_object(args.out or tmp), quiet=True)
            results = load_results(path) if path is not None else None
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    else:
        path = Path(args.predictions)
        try:
            results = load_results(path)
        except ValueError as e:
            raise DataError(path, str(e).removeprefix(f"{path}: ")) from None
    if not ctx.is_main:
        return
    try:
        metrics = evaluate_instances(_ground_truth(data), results)
    except ValueError as e:
        raise DataError(path, f"cannot be scored against {data}: {e}") from None
    metrics.pop("summary", None)
    out = {"predictions": str(path) if args.model is None else None, "model": args.model, "data": str(data),
           **_finite(metrics)}
    print(json.dumps(out))


def _ground_truth(path: Path) -> dict[str, Any]:
    from cast.utils.io import read_json

    gt = read_json(path)
    if not isinstance(gt, dict) or not isinstance(gt.get("images"), list) or not isinstance(gt.get("categories"), list):
        raise DataError(path, "not a COCO instances json (needs 'images' and 'categories' lists)")
    gt.setdefault("annotations", [])
    for ann in gt["annotations"]:
        ann.setdefault("iscrowd", 0)
    return gt


def _finite(value: Any) -> Any:
    """NaN (a metric without data, e.g. no small objects) as null: stdout stays valid json."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def main(args: argparse.Namespace) -> int:
    """Run the command; rank-aware under torchrun. Errors propagate to `cast.cli` for their exit code."""
    if args.command == "export":
        export(args)
        return 0
    from cast.utils.distributed import cleanup, init_distributed

    if args.command == "eval" and args.model is None:
        evaluate(args, DistContext())
        return 0
    try:
        ctx = init_distributed(args.device)
    except RuntimeError as e:
        raise UsageError(f"--device {args.device}: {e}") from None
    try:
        {"predict": predict, "label": label, "eval": evaluate}[args.command](args, ctx)
    finally:
        cleanup()
    return 0

