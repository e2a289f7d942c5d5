"""The `segmote` command line. Thin: parses arguments, calls the engine, writes files atomically.

Every user error is one line on stderr and a non-zero exit; no output file is written or changed on error.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager

import numpy as np

from .errors import SegMoTEError

EXIT_USER_ERROR = 1
EXIT_INTERNAL_ERROR = 3


@contextmanager
def progress_bar(description: str, quiet: bool):
    """A tqdm bar driven by the engine's progress(done, total) callback."""
    if quiet:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(desc=description, unit="slice", leave=False, file=sys.stderr)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    from .devices import DEVICE_CHOICES
    from .models import BACKBONES

    parser.add_argument("--model", default="lite_medsam", metavar="NAME",
                        help=f"backbone: {', '.join(BACKBONES)} (default lite_medsam)")
    parser.add_argument("--checkpoint", metavar="PATH", help="backbone weights file (default: shipped/cached)")
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="image encoder precision; bf16 for GPUs (on CPUs without native bf16 it is far slower)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the image encoder (GPUs; the first run on a machine compiles for a minute)")
    parser.add_argument("--window", nargs=2, type=float, metavar=("LEVEL", "WIDTH"), help="CT window in HU")
    parser.add_argument("--preset", metavar="NAME", help="CT window preset (lung, lung_parenchyma, soft_tissue, ...)")
    parser.add_argument("--axis", type=int, choices=(0, 1, 2),
                        help="voxel axis to slice along (default: the one closest to superior-inferior)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a segment of the same name in OUT (other segments are always kept)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segmote", description="SegMoTE: prompt or automatic segmentation of "
                                     "CT/MRI volumes with Segment Anything + token-level mixture of experts.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    segment = commands.add_parser("segment", help="segment one object from a box and/or points")
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
    segment.add_argument("--name", default="segment", help="segment name (default: segment)")
    segment.add_argument("--adapter", metavar="CKPT", help="SegMoTE adapter (.safetensors): MoTE decoder for prompts")
    _add_model_options(segment)
    segment.set_defaults(func=run_segment)

    auto = commands.add_parser("auto", help="automatic segmentation, one segment per adapter class")
    auto.add_argument("image")
    auto.add_argument("--adapter", required=True, metavar="CKPT")
    auto.add_argument("--out", required=True)
    auto.add_argument("--classes", nargs="+", metavar="NAME", help="only these classes of the adapter")
    auto.add_argument("--all-components", action="store_true",
                      help="keep every connected component (default: the largest per class)")
    _add_model_options(auto)
    auto.set_defaults(func=run_auto)

    demo = commands.add_parser("demo", help="offline demo on the chest CT that slicerio ships")
    demo.add_argument("--out-dir", default="segmote-demo")
    demo.add_argument("--device", default="auto")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=run_demo)

    from . import weights

    weights.add_cli(commands)
    for module_name in ("train", "curate", "evaluate", "bench"):
        module = _optional_module(module_name)
        if module is not None and hasattr(module, "add_cli"):
            module.add_cli(commands)
    return parser


def _optional_module(name: str):
    import importlib

    try:
        return importlib.import_module(f"segmote_core.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"segmote_core.{name}":
            return None
        raise


def _normalization_args(args) -> dict:
    """--window / --preset as the engine takes them; checked by the resolver now, before anything is loaded."""
    from .normalize import choose_normalization

    window = tuple(args.window) if args.window is not None else None
    if window is not None or args.preset:
        choose_normalization(np.zeros(1), window, args.preset)
    return {"window": window, "preset": args.preset}


_engines: dict[tuple, "object"] = {}


def engine_for(model: str, checkpoint, device: str, adapter, precision: str = "fp32", compile: bool = False):
    """One engine per model setup in this process, so that in-process callers (notebooks, tests, scripts calling
    main() repeatedly) reuse loaded weights and cached embeddings."""
    from .engine import Engine

    key = (model, str(checkpoint), device, str(adapter), precision, compile)
    if key not in _engines:
        _engines[key] = Engine(model, checkpoint, device, adapter=adapter, precision=precision, compile=compile)
    return _engines[key]


def run_segment(args) -> int:
    from .errors import InputError
    from .segmentation_io import Segment, save_segments
    from .volume import check_output_path, read_volume

    out = check_output_path(args.out)
    normalization = _normalization_args(args)
    volume = read_volume(args.image)
    box = points = None
    if args.box_ras is not None:
        box = volume.ras_to_ijk(np.reshape(args.box_ras, (2, 3))).reshape(-1)
    elif args.box_ijk is not None:
        box = np.asarray(args.box_ijk, float)
    if args.point_ras:
        points = volume.ras_to_ijk(np.asarray(args.point_ras))
    elif args.point_ijk:
        points = np.asarray(args.point_ijk, float)
    if box is None and points is None:
        raise InputError("give a prompt: --box-ras/--box-ijk and/or --point-ras/--point-ijk")
    labels = args.point_label
    if labels is not None and (points is None or len(labels) != len(points)):
        raise InputError(f"--point-label given {len(labels)} time(s) for {0 if points is None else len(points)} point(s)")
    engine = engine_for(args.model, args.checkpoint, args.device, args.adapter, args.precision, args.compile)
    with progress_bar("segmenting", args.quiet) as progress:
        mask = engine.segment(volume, box_ijk=box, points_ijk=points, point_labels=labels,
                              propagate=args.propagate, axis=args.axis, progress=progress, **normalization)
    _print_notices(engine)
    result = engine.last_result
    save_segments(out, volume, [Segment(args.name, mask)], replace_same_name=args.overwrite)
    if not args.quiet:
        print(f"normalisation: {result.normalization.description}")
        print(f"{args.name}: {int(mask.sum())} voxels, {mask.sum() * np.prod(volume.spacing) / 1000:.1f} ml, "
              f"{result.confidence_text} -> {out}")
    elif result.low_confidence:
        print(f"warning: {args.name}: {result.confidence_text}", file=sys.stderr)
    return 0


def run_auto(args) -> int:
    from .segmentation_io import save_segments
    from .volume import check_output_path, read_volume

    out = check_output_path(args.out)
    normalization = _normalization_args(args)
    volume = read_volume(args.image)
    engine = engine_for(args.model, args.checkpoint, args.device, args.adapter, args.precision, args.compile)
    with progress_bar("automatic", args.quiet) as progress:
        segments = engine.auto(volume, classes=args.classes, keep_largest=not args.all_components,
                               axis=args.axis, progress=progress, **normalization)
    _print_notices(engine)
    save_segments(out, volume, segments, replace_same_name=args.overwrite)
    if not args.quiet:
        print(f"normalisation: {engine.last_result.normalization.description}")
        for segment in segments:
            print(f"{segment.name}: {int(segment.mask.sum())} voxels")
        print(f"-> {out}")
    return 0


def _print_notices(engine) -> None:
    for notice in engine.notices:
        print(f"warning: {notice}", file=sys.stderr)
    engine.notices.clear()


def run_demo(args) -> int:
    from .demo import run

    return run(args.out_dir, device=args.device, quiet=args.quiet)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SegMoTEError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the user gets one line; developers set SEGMOTE_DEBUG=1
        if os.environ.get("SEGMOTE_DEBUG"):
            raise
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        print(f"error: internal error ({type(error).__name__}: {first}); rerun with SEGMOTE_DEBUG=1 for details",
              file=sys.stderr)
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
