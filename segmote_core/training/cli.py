"""`segmote train`: every TrainConfig field is a flag; the handler loads the config and runs the loop."""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch.distributed as dist
import yaml

from ..errors import SegMoTEError
from .config import TrainConfig, load_config
from .loop import train


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", help="YAML file with TrainConfig keys (flags override it)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/train_state.pt exactly")
    parser.add_argument("--stop-after", type=int, metavar="N", help="pause after step N (continue with --resume)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    group = parser.add_argument_group("config keys (YAML syntax for values, e.g. --classes '[right lung, left lung]')")
    for f in dataclasses.fields(TrainConfig):
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f"cfg_{f.name}", metavar="VALUE",
                           help=f"default {f.default if f.default is not dataclasses.MISSING else f.default_factory()!r}")
    parser.set_defaults(func=handler)
    return parser


def add_cli(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train SegMoTE adapters (MoTE + PPT) on a frozen backbone",
        description="Train SegMoTE adapters on an nnU-Net raw folder, Slicer .seg.nrrd pairs or one image. Runs under "
                    "torchrun for DDP. See docs/training.md.")
    return configure_parser(parser)


def overrides_from_args(args) -> dict:
    values = {}
    for f in dataclasses.fields(TrainConfig):
        text = getattr(args, f"cfg_{f.name}", None)
        if text is None:
            continue
        try:
            values[f.name] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            values[f.name] = text
    return values


def handler(args) -> int:
    try:
        config = load_config(args.config, overrides_from_args(args))
        result = train(config, resume=args.resume, stop_after=args.stop_after, quiet=args.quiet)
    except SegMoTEError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1  # a user error, as in every command
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0 if result is not None else 1
