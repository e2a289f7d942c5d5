"""`segmote auto`: automatic segmentation, one segment per class of an adapter."""

from __future__ import annotations

from .common import (add_model_options, check_adapter_file, engine_for_args, log_notices, normalization_args,
                     progress_bar)

HELP = "automatic segmentation, one segment per adapter class"


def add_parser(commands) -> None:
    auto = commands.add_parser("auto", help=HELP, description="Segment every class of a SegMoTE adapter "
                               "without prompts.")
    auto.add_argument("image", help="NIfTI, NRRD, MHA file or DICOM series folder")
    auto.add_argument("--adapter", required=True, metavar="CKPT", help="SegMoTE adapter (.safetensors) with "
                      "automatic-segmentation classes")
    auto.add_argument("--out", required=True, help="OUT.seg.nrrd (Slicer) or a label map (.nii.gz, .nrrd)")
    auto.add_argument("--classes", nargs="+", metavar="NAME", help="only these classes of the adapter")
    auto.add_argument("--all-components", action="store_true",
                      help="keep every connected component (default: the largest per class)")
    add_model_options(auto)
    auto.set_defaults(func=run)


def run(args) -> int:
    from ..files import refuse_input_as_output
    from ..segmentation_io import save_segments
    from ..volume import check_output_path, read_volume

    out = check_output_path(args.out)
    refuse_input_as_output(out, args.image, args.adapter, args.checkpoint, option="--out")
    normalization = normalization_args(args)
    check_adapter_file(args.adapter)
    volume = read_volume(args.image, args.series)
    engine = engine_for_args(args)
    with progress_bar("automatic", args.quiet) as progress:
        segments = engine.auto(volume, classes=args.classes, keep_largest=not args.all_components,
                               axis=args.axis, progress=progress, **normalization)
    log_notices(engine)
    stored = save_segments(out, volume, segments, replace_same_name=args.overwrite)
    if not args.quiet:
        print(f"normalisation: {engine.last_result.normalization.description}")
        for segment, count in zip(segments, stored):
            print(f"{segment.name}: {count} voxels")
        print(f"-> {out}")
    return 0
