"""Command line: `python -m cast <command> --config CONFIG [...]`.

    run               the whole CAST pipeline into runs/<name>/
    ablate            one of the paper's ablation studies into runs/<name>/ablations/
    pretrain-teacher  only pretrain (or find in the cache) the demo's stand-in teacher
    fiftyone          export a finished run to a FiftyOne dataset and open the FiftyOne App
    predict           a model (folder or .onnx) on an image, a folder or a COCO json -> COCO instances json
    label             zero-shot labels of an image folder by the foundation-model teacher -> COCO json
    export            a student to ONNX (+ sidecar json)
    eval              COCO mask AP of predictions (or of a model) against a COCO ground-truth json

Launch run / ablate under torchrun (`torchrun --nproc_per_node N -m cast run ...`) to train with
DDP (gloo on CPU, nccl on CUDA); predict / label / eval --model shard their images the same way.
Exit codes: 0 done, 2 usage (bad flags, a model path of an unknown kind, an .onnx without its
sidecar, class names the teacher cannot take), 1 data (no or unreadable images, an output that
cannot be written, data that do not fit); the one-line message names the path.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from cast.config import ABLATION_STUDIES, CastConfig, ConfigError, load_config
from cast.teachers.hub import FOUNDATION_TEACHERS, ZeroShotSettings

INFERENCE_COMMANDS = ("predict", "label", "export", "eval")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", required=True, help="YAML run configuration (e.g. configs/demo.yaml)")
    common.add_argument("--name", help="run name (folder under output_dir); default: the config's name")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set training.knowledge_transfer.steps=10")
    seeds = argparse.ArgumentParser(add_help=False)
    seeds.add_argument("--seeds", type=_seeds, help="e.g. 0,1,2: repeat everything after the teacher over these "
                       "seeds into runs/<name>/seed_<k>/ and report mean, std and per-seed values")
    sub.add_parser("run", parents=[common, seeds], help="run the whole CAST pipeline")
    ablate = sub.add_parser("ablate", parents=[common, seeds], help="run one ablation study of the paper")
    ablate.add_argument("--study", required=True, choices=ABLATION_STUDIES)
    sub.add_parser("pretrain-teacher", parents=[common], help="pretrain the demo's stand-in teacher")
    fo = sub.add_parser("fiftyone", help="open a run in the FiftyOne App (127.0.0.1)")
    fo.add_argument("--run", required=True, help="run folder, e.g. runs/demo")
    fo.add_argument("--port", type=int, default=5151)
    fo.add_argument("--data-root", help="data folder when it moved since the run")
    _inference_parsers(sub)
    return parser


def _seeds(text: str) -> list[int]:
    from cast.pipeline.seeds import parse_seeds

    try:
        return parse_seeds(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _inference_parsers(sub: argparse._SubParsersAction) -> None:
    images = argparse.ArgumentParser(add_help=False)
    images.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:N")
    images.add_argument("--batch-size", type=_positive, default=1, help="images per forward pass")
    images.add_argument("--test-size", type=_positive, default=None, metavar="N",
                        help="short side images are resized to (default: the run's data.test_size when the "
                             "model lies in a run folder or .onnx sidecar records it, else each image's own size)")
    images.add_argument("--strict", action="store_true", help="stop at an unreadable image instead of skipping it")
    images.add_argument("--shard-size", type=_positive, default=64, metavar="N",
                        help="images per result shard written to DIR/.shards (the resume granularity)")
    images.add_argument("--workers", type=_positive, default=None, help="image-decoding worker processes "
                        "(default: none, the main process decodes)")
    predict = sub.add_parser("predict", parents=[images], help="run a model on images -> DIR/predictions.json")
    predict.add_argument("--model", required=True, help="a model folder of a run or an .onnx written by export")
    predict.add_argument("--source", required=True, help="an image, a folder (recursive) or a COCO json")
    predict.add_argument("--out", required=True, metavar="DIR")
    predict.add_argument("--score-threshold", type=float, default=0.5)
    predict.add_argument("--save-overlays", action="store_true", help="DIR/overlays/<image>.png with the instances")
    label = sub.add_parser("label", parents=[images], help="zero-shot labels of a folder -> DIR/annotations.json")
    label.add_argument("--source", required=True, help="an image folder (or an image, or a COCO json)")
    label.add_argument("--classes", required=True, help='class names, comma-separated: "car,person,bicycle"')
    label.add_argument("--out", required=True, metavar="DIR")
    label.add_argument("--teacher", choices=list(FOUNDATION_TEACHERS), default="gdino-sam2")
    label.add_argument("--grounding-dino", default="models/grounding-dino-base", metavar="DIR",
                       help="local Grounding-DINO folder in the hub layout")
    label.add_argument("--sam", default="models/sam2.1-hiera-large", metavar="DIR",
                       help="local SAM 2 (gdino-sam2) or SAM (gdino-sam) folder in the hub layout")
    label.add_argument("--sam3", default="models/sam3", metavar="DIR", help="local SAM 3 folder (--teacher sam3)")
    defaults = ZeroShotSettings()
    for key in ("box_threshold", "text_threshold", "mask_threshold"):
        label.add_argument(f"--{key.replace('_', '-')}", type=float, default=getattr(defaults, key))
    label.add_argument("--max-instances", type=int, default=defaults.max_instances)
    label.add_argument("--save-overlays", action="store_true", help="DIR/overlays/<image>.png with the instances")
    export = sub.add_parser("export", help="a student to ONNX + sidecar json")
    export.add_argument("--model", required=True, help="a student's model folder")
    export.add_argument("--format", choices=["onnx"], default="onnx")
    export.add_argument("--out", required=True, metavar="FILE", help="the .onnx file (sidecar: FILE.json)")
    export.add_argument("--opset", type=int, default=17)
    export.add_argument("--image-size", type=_positive, nargs=2, metavar=("H", "W"),
                        help="the graph's input size (default: the run's data.test_size, square)")
    export.add_argument("--int8", action="store_true", help="dynamic int8 quantisation of the MatMul weights")
    export.add_argument("--no-optimize", action="store_true",
                        help="export the eager operations as they are (no fused attention, constant position "
                             "embeddings, low-resolution attention masks nor Winograd convolutions)")
    evaluate = sub.add_parser("eval", parents=[images], help="COCO mask AP as one json object on stdout")
    what = evaluate.add_mutually_exclusive_group(required=True)
    what.add_argument("--predictions", metavar="FILE", help="COCO instances json or COCO results list")
    what.add_argument("--model", help="predict with this model (folder or .onnx) on --data's images, then score")
    evaluate.add_argument("--data", required=True, metavar="FILE", help="COCO ground-truth json")
    evaluate.add_argument("--score-threshold", type=float, default=0.0, help="with --model (AP wants every score)")
    evaluate.add_argument("--out", metavar="DIR", help="with --model: keep its predictions.json there")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _inference(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from cast.data.errors import DataError
    from cast.inference.commands import UsageError, main as run_command
    from cast.utils.cache import SettingsChangedError

    try:
        return run_command(args)
    except UsageError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (DataError, OSError, SettingsChangedError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1


def _one_line(error: BaseException) -> str:
    """The error's message on one line, an operating-system error as "<path>: <reason>"."""
    from cast.data.errors import DataError

    text = str(error)
    if isinstance(error, OSError) and not isinstance(error, DataError) and error.filename is not None:
        text = f"{error.filename}: {error.strerror or error}"
    return " ".join(text.split())


def _fiftyone(args: argparse.Namespace) -> int:
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    from cast.integrations.fiftyone_export import launch

    if not os.path.isdir(args.run):
        print(f"error: {args.run}: no such run folder", file=sys.stderr)
        return 2
    launch(args.run, port=args.port, address="127.0.0.1", data_root=args.data_root)
    return 0


def _config(args: argparse.Namespace) -> CastConfig:
    overrides = list(args.overrides) + ([f"name={args.name}"] if args.name else [])
    return load_config(args.config, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "fiftyone":
        return _fiftyone(args)
    if args.command in INFERENCE_COMMANDS:
        return _inference(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from local folders only
    try:
        cfg = _config(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Heavy imports only once the config is known to be valid.
    from cast.data.errors import DataError
    from cast.utils.cache import SettingsChangedError
    from cast.utils.distributed import cleanup, init_distributed
    from cast.training.trainer import NonFiniteLossError

    ctx = init_distributed(cfg.device)
    try:
        if args.command == "run":
            from cast.pipeline.runner import run

            report = run(cfg, ctx, args.seeds)
            if ctx.is_main:
                print((cfg.run_dir / "report.md").read_text())
            if report.get("failed_seeds"):
                return 1
        elif args.command == "ablate":
            from cast.pipeline.ablations import run_ablation

            table = run_ablation(cfg, args.study, ctx, args.seeds)
            if ctx.is_main:
                print(table["markdown"])
            if table.get("failed_seeds"):
                return 1
        else:
            from cast.pipeline.teachers import pretrain_teacher

            path = pretrain_teacher(cfg, ctx)
            if ctx.is_main:
                print(f"stand-in teacher: {path}")
    except (DataError, OSError, NonFiniteLossError, SettingsChangedError) as e:
        # Problems with the user's files, the disk or the run itself: the message names what and where.
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        cleanup()
    return 0
