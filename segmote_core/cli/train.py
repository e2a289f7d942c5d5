"""`segmote train`: every TrainConfig field is a flag (YAML syntax for values); the run is training/loop.train.

Building this parser imports the training package (and torch), so the top-level parser adds it only when the
command is `train` (see LAZY_COMMANDS in main.py).
"""

from __future__ import annotations

import argparse
import dataclasses

import yaml

from ..training.config import TrainConfig

HELP = "train SegMoTE adapters (MoTE + PPT) on a frozen backbone"


def add_cli(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "train", help=HELP,
        description="Train SegMoTE adapters on an nnU-Net raw folder, Slicer .seg.nrrd pairs or one image. Runs under "
                    "torchrun for DDP. See docs/training.md.")
    parser.add_argument("--config", help="YAML file with TrainConfig keys (flags override it)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/train_state.pt exactly")
    parser.add_argument("--overwrite", action="store_true",
                        help="train into an --out that holds a previous run, replacing its adapter, state and logs")
    parser.add_argument("--stop-after", type=int, metavar="N", help="pause after step N (continue with --resume)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    group = parser.add_argument_group("config keys (YAML syntax for values, e.g. --classes '[right lung, left lung]')")
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f"cfg_{f.name}", metavar="VALUE",
                           help=f"default {default!r}")
    parser.set_defaults(func=run)
    return parser


def config_overrides(args) -> dict:
    """The config keys given as flags, parsed as YAML values (a value YAML cannot read stays a string)."""
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


def run(args) -> int:
    import torch.distributed as dist

    from ..training.config import load_config
    from ..training.loop import train

    try:
        config = load_config(args.config, config_overrides(args))
        result = train(config, resume=args.resume, stop_after=args.stop_after, quiet=args.quiet,
                       overwrite=args.overwrite)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0 if result is not None else 1
