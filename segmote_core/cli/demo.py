"""`segmote demo`: the offline demo on the chest CT that slicerio ships."""

from __future__ import annotations

from .common import DEVICE_HELP, add_verbosity_options

HELP = "offline demo on the chest CT that slicerio ships"


def add_parser(commands) -> None:
    demo = commands.add_parser("demo", help=HELP, description="Segment both lungs of slicerio's chest CT with box "
                               "prompts (and automatically with the shipped adapter), score them against the ground "
                               "truth and write a segmentation and an overlay picture.")
    demo.add_argument("--out-dir", default="segmote-demo", help="folder for demo.seg.nrrd and demo.png "
                      "(default segmote-demo)")
    demo.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_verbosity_options(demo)
    demo.set_defaults(func=run)


def run(args) -> int:
    from ..demo import run as run_demo

    return run_demo(args.out_dir, device=args.device)
