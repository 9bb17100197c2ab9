"""Command line: `python -m cast <command> --config CONFIG [...]`.

    run               the whole CAST pipeline into runs/<name>/
    ablate            one of the paper's ablation studies into runs/<name>/ablations/
    pretrain-teacher  only pretrain (or find in the cache) the demo's stand-in teacher
    fiftyone          export a finished run to a FiftyOne dataset and open the FiftyOne App

Launch any of them under torchrun (`torchrun --nproc_per_node N -m cast run ...`) to train with
DDP: gloo on CPU, nccl on CUDA.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from cast.config import ABLATION_STUDIES, CastConfig, ConfigError, load_config


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
    return parser


def _seeds(text: str) -> list[int]:
    from cast.pipeline.seeds import parse_seeds

    try:
        return parse_seeds(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
