"""`segmote segment`: one object from a box and/or points."""

from __future__ import annotations

import sys

from .common import (add_model_options, check_adapter_file, engine_for_args, log_notices, normalization_args,
                     progress_bar)

HELP = "segment one object from a box and/or points"


def add_parser(commands) -> None:
    segment = commands.add_parser("segment", help=HELP, description="Segment one object of a volume from a box "
                                  "and/or points given in patient RAS mm or voxel indices.")
    segment.add_argument("image", help="NIfTI, NRRD, MHA file or DICOM series folder")
    segment.add_argument("--out", required=True, help="OUT.seg.nrrd (Slicer) or a label map (.nii.gz, .nrrd)")
    boxes = segment.add_mutually_exclusive_group()
    boxes.add_argument("--box-ras", nargs=6, type=float, metavar=("X0", "Y0", "Z0", "X1", "Y1", "Z1"),
                       help="box corners in patient RAS mm (3D Slicer's coordinates)")
    boxes.add_argument("--box-ijk", nargs=6, type=float, metavar=("I0", "J0", "K0", "I1", "J1", "K1"),
                       help="box corners in voxel indices")
    points = segment.add_mutually_exclusive_group()
    points.add_argument("--point-ras", nargs=3, type=float, action="append", metavar=("X", "Y", "Z"),
                        help="a point in RAS mm (repeat for more)")
    points.add_argument("--point-ijk", nargs=3, type=float, action="append", metavar=("I", "J", "K"),
                        help="a point in voxel indices (repeat for more)")
    segment.add_argument("--point-label", type=int, action="append", choices=(0, 1),
                         help="1 positive / 0 negative, once per point in order (default: all positive)")
    segment.add_argument("--propagate", action="store_true",
                         help="carry a one-slice result up and down the slicing axis until the object ends")
    segment.add_argument("--fill-box", action="store_true",
                         help="3-D box: segment every slice inside it while the model is confident, instead of "
                              "stopping where a slice stops continuing the object (may take neighbouring organs)")
    segment.add_argument("--name", default="segment", help="segment name (default: segment)")
    segment.add_argument("--adapter", metavar="CKPT", help="SegMoTE adapter (.safetensors): MoTE decoder for prompts")
    add_model_options(segment)
    segment.set_defaults(func=run)


def run(args) -> int:
    import numpy as np

    from ..errors import InputError
    from ..files import refuse_input_as_output
    from ..segmentation_io import Segment, check_header_text, save_segments
    from ..volume import check_output_path, read_volume

    out = check_output_path(args.out)
    refuse_input_as_output(out, args.image, args.adapter, args.checkpoint, option="--out")
    check_header_text(args.name)  # before the model runs
    normalization = normalization_args(args)
    check_adapter_file(args.adapter)
    if args.box_ras is None and args.box_ijk is None and not args.point_ras and not args.point_ijk:
        raise InputError("give a prompt: --box-ras/--box-ijk and/or --point-ras/--point-ijk")
    count = len(args.point_ras or args.point_ijk or [])
    labels = args.point_label
    if labels is not None and len(labels) != count:
        raise InputError(f"--point-label given {len(labels)} time(s) for {count} point(s)")
    volume = read_volume(args.image, args.series)
    box = points = None
    if args.box_ras is not None:
        box = volume.ras_to_ijk(np.reshape(args.box_ras, (2, 3))).reshape(-1)
    elif args.box_ijk is not None:
        box = np.asarray(args.box_ijk, float)
    if args.point_ras:
        points = volume.ras_to_ijk(np.asarray(args.point_ras))
    elif args.point_ijk:
        points = np.asarray(args.point_ijk, float)
    engine = engine_for_args(args)
    with progress_bar("segmenting", args.quiet) as progress:
        mask = engine.segment(volume, box_ijk=box, points_ijk=points, point_labels=labels,
                              propagate=args.propagate, axis=args.axis, progress=progress, fill_box=args.fill_box,
                              **normalization)
    log_notices(engine)
    result = engine.last_result
    [stored] = save_segments(out, volume, [Segment(args.name, mask)], replace_same_name=args.overwrite)
    if not args.quiet:
        print(f"normalisation: {result.normalization.description}")
        print(f"{args.name}: {stored} voxels, {stored * np.prod(volume.spacing) / 1000:.1f} ml, "
              f"{result.confidence_text} -> {out}")
    elif result.low_confidence:
        print(f"warning: {args.name}: {result.confidence_text}", file=sys.stderr)
    return 0
