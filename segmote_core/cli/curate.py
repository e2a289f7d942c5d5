"""`segmote curate`: score (slice, label) samples of a dataset and keep a balanced high-quality subset.

Its flags come from CurationConfig (which needs numpy), so the top-level parser builds this one only when the
command is `curate` (LAZY_COMMANDS in main.py).
"""

from __future__ import annotations

import dataclasses

from .common import add_verbosity_options

HELP = "score (slice, label) samples and keep a balanced high-quality subset"
THRESHOLDS = ("min_clarity", "min_contrast", "min_entropy", "min_foreground", "max_foreground",
              "max_components", "min_area", "duplicate_threshold")


def add_cli(commands) -> None:
    from ..curate import CurationConfig  # numpy only; scipy and the volume layer load when curation runs

    parser = commands.add_parser(
        "curate", help=HELP,
        description="Score every (slice, label) sample of a dataset (clarity, contrast, entropy, foreground ratio, "
                    "connected components, area, near-duplicates) and write a manifest with every score and the "
                    "reason for every rejection.")
    parser.add_argument("data", nargs="?", help="nnU-Net raw folder or folder of scans with .seg.nrrd files")
    parser.add_argument("--image", help="one scan (with --segmentation) instead of a folder")
    parser.add_argument("--segmentation", help="the .seg.nrrd or label map of --image")
    parser.add_argument("--layout", default="auto", choices=("auto", "nnunet", "slicer"),
                        help="how DATA is laid out (default: recognised from its files)")
    parser.add_argument("--modality", default="unknown", help="modality of Slicer pairs (nnU-Net: from dataset.json)")
    parser.add_argument("--classes", nargs="+", help="class names to score (default: all)")
    parser.add_argument("--out", required=True, help="manifest to write (.json or .csv)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--budget", type=int, help="keep at most this many samples")
    size.add_argument("--fraction", type=float, help="keep this fraction of the samples that pass the filters")
    norm = parser.add_mutually_exclusive_group()
    norm.add_argument("--window", nargs=2, type=float, metavar=("LEVEL", "WIDTH"), help="CT window in HU")
    norm.add_argument("--preset", help="CT window preset (lung, soft_tissue, ...)")
    defaults = CurationConfig()
    for field in dataclasses.fields(CurationConfig):
        if field.name in THRESHOLDS:
            value = getattr(defaults, field.name)
            what = field.name.replace("_", " ")
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(value), default=value,
                                help=f"filter threshold: {what} (default {value})")
    add_verbosity_options(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..curate import CurationConfig, curate_cases
    from ..datasets import find_cases

    config = CurationConfig(**{name: getattr(args, name) for name in THRESHOLDS},
                            budget=args.budget, fraction=args.fraction)
    cases = find_cases(args.data, args.layout, args.image, args.segmentation, args.modality)
    result = curate_cases(cases, config, tuple(args.window) if args.window else None, args.preset, args.classes)
    path = result.write(args.out)
    summary = result.summary()
    removed = ", ".join(f"{k} {v}" for k, v in summary["removed_by"].items()) or "none"
    if not args.quiet:
        print(f"kept {summary['kept']} of {summary['samples']} samples (removed: {removed}); manifest {path}")
    return 0
