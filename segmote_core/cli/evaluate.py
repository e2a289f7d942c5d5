"""`segmote eval`: Dice and normalised surface Dice of a segmentation against ground truth.

Its default tolerance comes from segmote_core.evaluate (which needs numpy), so the top-level parser builds this
one only when the command is `eval` (LAZY_COMMANDS in main.py).
"""

from __future__ import annotations

from .common import add_verbosity_options

HELP = "Dice and normalised surface Dice of a segmentation against ground truth"


def add_cli(commands) -> None:
    from ..evaluate import DEFAULT_TOLERANCE_MM  # torch and MONAI load when scoring runs

    parser = commands.add_parser(
        "eval", help=HELP,
        description="Per-segment Dice and normalised surface Dice (MONAI, physical spacing); segments are matched "
                    "by name. Prints a table; --json also writes the numbers.")
    parser.add_argument("--pred", required=True, help="predicted segmentation (.seg.nrrd or label map)")
    parser.add_argument("--gt", required=True, help="ground-truth segmentation (.seg.nrrd or label map)")
    parser.add_argument("--tolerance-mm", type=float, default=DEFAULT_TOLERANCE_MM,
                        help=f"surface Dice tolerance in mm (default {DEFAULT_TOLERANCE_MM:g})")
    parser.add_argument("--json", help="also write the report as JSON to this file ('-' for stdout)")
    add_verbosity_options(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    import json

    from ..evaluate import evaluate_files, format_table
    from ..files import atomic_write_text, refuse_input_as_output

    if args.json and args.json != "-":
        refuse_input_as_output(args.json, args.pred, args.gt, option="--json")
    report = evaluate_files(args.pred, args.gt, args.tolerance_mm)
    if args.json == "-":
        print(json.dumps(report, indent=1))
    else:
        print(format_table(report))
        if args.json:
            atomic_write_text(args.json, json.dumps(report, indent=1))
    return 0
