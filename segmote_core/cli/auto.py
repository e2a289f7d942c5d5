"""`segmote auto`: automatic segmentation, one segment per class of an adapter."""

from __future__ import annotations

from .batch import add_io_options, input_path, plan_outputs, run_cases
from .common import add_model_options, check_adapter_file, normalization_args, progress_bar

HELP = "automatic segmentation, one segment per adapter class"


def add_parser(commands) -> None:
    auto = commands.add_parser("auto", help=HELP, description="Segment every class of a SegMoTE adapter "
                               "without prompts, in one volume or in every volume of a folder.")
    add_io_options(auto)
    auto.add_argument("--adapter", required=True, metavar="CKPT", help="SegMoTE adapter (.safetensors) with "
                      "automatic-segmentation classes")
    auto.add_argument("--classes", nargs="+", metavar="NAME", help="only these classes of the adapter")
    auto.add_argument("--all-components", action="store_true",
                      help="keep every connected component (default: the largest per class)")
    add_model_options(auto)
    auto.set_defaults(func=run)


def run(args) -> int:
    cases, outputs, collection = plan_outputs(args, input_path(args), (args.adapter, args.checkpoint))
    normalization = normalization_args(args)
    check_adapter_file(args.adapter)

    def segment_case(engine, volume, case, show_progress: bool):
        with progress_bar("automatic", not show_progress) as progress:
            segments = engine.auto(volume, classes=args.classes, keep_largest=not args.all_components,
                                   axis=args.axis, progress=progress, **normalization)
        seen = engine.prepare(volume, args.axis, **normalization).normalization  # as auto() resolved it
        return segments, [{} for _ in segments], None, seen

    code, results = run_cases(args, "auto", cases, outputs, collection, segment_case)
    if not collection and not args.quiet:
        result = results[0]
        print(f"normalisation: {result.normalization}")
        for s in result.segments:
            print(f"{s['name']}: {s['voxels']} voxels")
        print(f"-> {result.output}")
    return code
