"""`segmote segment`: one object from a box and/or points."""

from __future__ import annotations

import logging

from .batch import add_io_options, input_path, plan_outputs, run_cases
from .common import add_model_options, check_adapter_file, normalization_args, progress_bar

log = logging.getLogger("segmote_core.cli")

HELP = "segment one object from a box and/or points"
DEFAULT_NAME = "segment"


def add_parser(commands) -> None:
    segment = commands.add_parser("segment", help=HELP, description="Segment objects of a volume (or of every "
                                  "volume in a folder) from a box and/or points given on the command line in "
                                  "patient RAS mm or voxel indices, or in a prompts file (Slicer markups or CSV).")
    add_io_options(segment)
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
    segment.add_argument("--prompts", metavar="FILE",
                         help="prompts from a 3D Slicer markups file (.mrk.json: ROI = box, Fiducial = points) or a "
                              "CSV table (case,name,kind,x,y,z[,space]); each named object becomes a segment")
    extent = segment.add_mutually_exclusive_group()
    extent.add_argument("--slice-only", action="store_true",
                        help="a 2-D box or points segment their slice alone (default: the whole object, followed up "
                             "and down the slicing axis while it continues)")
    extent.add_argument("--propagate", action="store_true",
                        help="the default: a 2-D prompt gives the whole object (kept for older scripts)")
    segment.add_argument("--fill-box", action="store_true",
                         help="3-D box: keep the model's whole answer on every slice while it is confident, "
                              "instead of only the part that continues the object (may take neighbouring organs)")
    segment.add_argument("--name", help=f"segment name of a command-line prompt, ideally a structure the terminology "
                         f"table knows (default: {DEFAULT_NAME}, stored with the generic code Tissue)")
    segment.add_argument("--adapter", metavar="CKPT", help="SegMoTE adapter (.safetensors): MoTE decoder for prompts")
    add_model_options(segment)
    segment.set_defaults(func=run)


def command_line_prompts(args):
    """The prompt given by --box-*/--point-* as a prompts table (one object named --name, for every case)."""
    from ..errors import InputError
    from ..prompt_files import PromptTable

    count = len(args.point_ras or args.point_ijk or [])
    labels = args.point_label
    if labels is not None and len(labels) != count:
        raise InputError(f"--point-label given {len(labels)} time(s) for {count} point(s)")
    table = PromptTable("the command line")
    obj = table.object(None, args.name)
    if args.box_ras is not None or args.box_ijk is not None:
        space, values = ("RAS", args.box_ras) if args.box_ras is not None else ("IJK", args.box_ijk)
        obj.corners = [(space, tuple(values[:3])), (space, tuple(values[3:]))]
    for space, given in (("RAS", args.point_ras), ("IJK", args.point_ijk)):
        obj.points += [(space, tuple(p)) for p in given or []]
    obj.labels = list(labels) if labels is not None else [1] * count
    return table


def run(args) -> int:
    # A name the user chose and the terminology table lacks gets a warning; the default name is generic by design.
    args.terminology_notices = args.name is not None or bool(args.prompts)
    from ..errors import InputError
    from ..prompt_files import read_prompts
    from ..segmentation_io import check_header_text

    command_line = (args.box_ras is not None or args.box_ijk is not None or bool(args.point_ras or args.point_ijk))
    if args.prompts and (command_line or args.point_label):
        raise InputError("give prompts on the command line or in --prompts, not both")
    if args.prompts and args.name is not None:
        raise InputError("--name names a command-line prompt; in --prompts each object carries its own name")
    args.name = args.name or DEFAULT_NAME
    if not args.prompts and not command_line:
        raise InputError("give a prompt: --box-ras/--box-ijk and/or --point-ras/--point-ijk, or --prompts FILE")
    table = read_prompts(args.prompts) if args.prompts else command_line_prompts(args)
    names = tuple(dict.fromkeys(name for objects in table.objects.values() for name in objects))
    for name in names:
        check_header_text(name)  # before the model runs
    cases, outputs, collection = plan_outputs(args, input_path(args), (args.adapter, args.checkpoint, args.prompts),
                                              names=names)
    if collection:
        table.check_cases([case.name for case in cases])
    normalization = normalization_args(args)
    check_adapter_file(args.adapter)

    def segment_case(engine, volume, case, show_progress: bool):
        from ..segmentation_io import Segment

        segments, details, prompts, result = [], [], [], None
        for obj in table.for_case(case.name):
            box, points, labels = obj.in_voxels(volume)
            session = engine.open(volume, args.axis, fill_box=args.fill_box, **normalization)  # one object each
            with progress_bar(f"segmenting {obj.name}", not show_progress) as progress:
                session.progress = progress
                result = session.prompt(box, points, labels, slice_only=args.slice_only)
            segments.append(Segment(obj.name, result.mask))
            details.append({"predicted_iou": result.predicted_iou, "confidence": result.confidence_text})
            prompts.append(prompt_record(volume, obj.name, box, points, labels))
            if result.low_confidence and (args.quiet or collection):  # otherwise it is in the result line
                log.warning(f"{case.name + ': ' if collection else ''}{obj.name}: {result.confidence_text}")
        seen = result.normalization if result else engine.prepare(volume, args.axis, **normalization).normalization
        return segments, details, prompts, seen

    code, results = run_cases(args, "segment", cases, outputs, collection, segment_case)
    if not collection and not args.quiet:
        print_single(results[0])
    return code


def prompt_record(volume, name, box, points, labels) -> dict:
    """The prompt as the model got it: voxel indices, and the same positions in patient RAS mm."""
    import numpy as np

    record = {"name": name}
    if box is not None:
        record["box_ijk"] = [round(float(v), 3) for v in box]
        record["box_ras"] = np.round(volume.ijk_to_ras_points(np.reshape(box, (2, 3))), 3).tolist()
    if points is not None:
        record["points_ijk"] = np.round(points, 3).tolist()
        record["points_ras"] = np.round(volume.ijk_to_ras_points(points), 3).tolist()
        record["point_labels"] = list(labels)
    return record


def print_single(result) -> None:
    """The result lines of a one-case run: what its run record holds."""
    print(f"normalisation: {result.normalization}")
    for s in result.segments:
        print(f"{s['name']}: {s['voxels']} voxels, {s['volume_ml']:.1f} ml, {s['confidence']} -> {result.output}")
