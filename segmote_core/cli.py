"""The `segmote` command line. Thin: parses arguments, calls the engine, writes files atomically.

Every user error is one line on stderr and a non-zero exit; no output file is written or changed on error.
Starting is cheap: torch and the models are imported only once a command needs a model, and every check that needs
no model (arguments, paths, prompts) runs before one is loaded. Subcommands defined in other modules (train, eval,
...) are imported only when they are the command being run.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from contextlib import contextmanager

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


# Commands whose parser lives in another module: name -> (module, one-line help). The module (which may import
# torch) is imported only when its command runs; tests/test_cli_startup.py checks the help lines match.
LAZY_COMMANDS = {
    "weights": ("weights", "download and locate backbone checkpoints"),
    "train": ("train", "train SegMoTE adapters (MoTE + PPT) on a frozen backbone"),
    "curate": ("curate", "score (slice, label) samples and keep a balanced high-quality subset"),
    "eval": ("evaluate", "Dice and normalised surface Dice of a segmentation against ground truth"),
}
RUNTIME_CHOICES = ("auto", "torch", "onnx", "openvino")  # segmote_core.runtime.RUNTIMES, without importing it
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps (default auto)"  # devices.DEVICE_HELP, without importing torch
OUTPUT_FORMATS = ("seg.nrrd", "nifti", "dicom-seg")  # outputs.OUTPUT_FORMATS, without importing SimpleITK


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="lite_medsam", metavar="NAME",
                        help="backbone: lite_medsam, sam_vit_b, sam_vit_l, sam_vit_h (default lite_medsam)")
    parser.add_argument("--checkpoint", metavar="PATH", help="backbone weights file (default: shipped/cached)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)  # checked by devices.resolve_device
    parser.add_argument("--runtime", choices=RUNTIME_CHOICES,
                        help="CPU inference runtime: PyTorch, or the model exported once to ONNX and run by ONNX "
                             "Runtime or OpenVINO; auto picks the fastest installed one (default: $SEGMOTE_RUNTIME, "
                             "else auto)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="image encoder precision; bf16 for GPUs (on CPUs without native bf16 it is far slower)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the image encoder (GPUs; the first run on a machine compiles for a minute)")
    parser.add_argument("--window", nargs=2, type=float, metavar=("LEVEL", "WIDTH"), help="CT window in HU")
    parser.add_argument("--preset", metavar="NAME", help="CT window preset (lung, lung_parenchyma, soft_tissue, ...)")
    parser.add_argument("--axis", type=int, choices=(0, 1, 2),
                        help="voxel axis to slice along (default: the one closest to superior-inferior)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a segment of the same name in OUT (other segments are always kept; a DICOM "
                             "SEG is replaced whole)")
    parser.add_argument("--output-format", choices=OUTPUT_FORMATS,
                        help="OUT's format (default: from its suffix; .dcm means dicom-seg, which needs a DICOM "
                             "series input)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--series", metavar="UID", help="the DICOM series to read when the folder holds several")


class _Parser(argparse.ArgumentParser):
    """argparse that takes "-1e2" for a number, not an option (its own test only knows "-100" and "-.5")."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf$|^-nan$")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser for `command` (None: every command's parser, importing their modules); other commands
    from LAZY_COMMANDS get a placeholder that only names them in --help."""
    parser = _Parser(prog="segmote", description="SegMoTE: prompt or automatic segmentation of "
                                     "CT/MRI volumes with Segment Anything + token-level mixture of experts.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    segment = commands.add_parser("segment", help="segment one object from a box and/or points")
    segment.add_argument("image", help="NIfTI, NRRD, MHA file or DICOM series folder")
    segment.add_argument("--out", required=True,
                         help="OUT.seg.nrrd (Slicer), a label map (.nii.gz, .nrrd) or a DICOM SEG (.dcm)")
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

    for name, (module_name, help_line) in LAZY_COMMANDS.items():
        module = _optional_module(module_name) if command in (None, name) else None
        if module is not None and hasattr(module, "add_cli"):
            module.add_cli(commands)
        elif command != name:
            commands.add_parser(name, help=help_line, add_help=False)
    return parser


def _command_in(argv: list[str]) -> str | None:
    """The subcommand named in argv (the first word that is not an option), or None."""
    for word in argv:
        if not word.startswith("-"):
            return word
    return None


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
    import numpy as np

    from .normalize import choose_normalization

    window = tuple(args.window) if args.window is not None else None
    if window is not None or args.preset:
        choose_normalization(np.zeros(1), window, args.preset)
    return {"window": window, "preset": args.preset}


_engines: dict[tuple, "object"] = {}


def engine_key(model: str, checkpoint, device: str, adapter, precision: str = "fp32", compile: bool = False,
               runtime: str | None = None) -> tuple:
    return (model, str(checkpoint), device, str(adapter), precision, compile, runtime)


def engine_for(model: str, checkpoint, device: str, adapter, precision: str = "fp32", compile: bool = False,
               runtime: str | None = None):
    """One engine per model setup in this process, so that in-process callers (notebooks, tests, scripts calling
    main() repeatedly) reuse loaded weights and cached embeddings."""
    key = engine_key(model, checkpoint, device, adapter, precision, compile, runtime)
    if key not in _engines:
        from .engine import Engine

        _engines[key] = Engine(model, checkpoint, device, adapter=adapter, precision=precision, compile=compile,
                               runtime=runtime)
    return _engines[key]


def _engine_for_args(args):
    return engine_for(args.model, args.checkpoint, args.device, args.adapter, args.precision, args.compile,
                      args.runtime)


def _check_adapter_file(path) -> None:
    """Before a model is loaded: the adapter file exists (its contents are checked when it is loaded)."""
    from .shipped import missing_adapter_error, resolve_adapter

    if path is not None and not resolve_adapter(path).is_file():
        raise missing_adapter_error(path)


def run_segment(args) -> int:
    import numpy as np

    from .errors import InputError
    from .outputs import plan_output, save_output
    from .segmentation_io import Segment, check_header_text
    from .volume import read_volume

    from .files import refuse_input_as_output

    target = plan_output(args.out, args.output_format, args.image, args.series, args.overwrite, names=(args.name,))
    out = target.path
    refuse_input_as_output(out, args.image, args.adapter, args.checkpoint)
    check_header_text(args.name)  # before the model runs
    normalization = _normalization_args(args)
    _check_adapter_file(args.adapter)
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
    engine = _engine_for_args(args)
    with progress_bar("segmenting", args.quiet) as progress:
        mask = engine.segment(volume, box_ijk=box, points_ijk=points, point_labels=labels,
                              propagate=args.propagate, axis=args.axis, progress=progress, fill_box=args.fill_box,
                              **normalization)
    _print_notices(engine)
    result = engine.last_result
    [stored] = save_output(target, volume, [Segment(args.name, mask)], replace_same_name=args.overwrite)
    _print_notices(target)
    if not args.quiet:
        print(f"normalisation: {result.normalization.description}")
        print(f"{args.name}: {stored} voxels, {stored * np.prod(volume.spacing) / 1000:.1f} ml, "
              f"{result.confidence_text} -> {out}")
    elif result.low_confidence:
        print(f"warning: {args.name}: {result.confidence_text}", file=sys.stderr)
    return 0


def run_auto(args) -> int:
    from .files import refuse_input_as_output
    from .outputs import plan_output, save_output
    from .volume import read_volume

    target = plan_output(args.out, args.output_format, args.image, args.series, args.overwrite)
    out = target.path
    refuse_input_as_output(out, args.image, args.adapter, args.checkpoint)
    normalization = _normalization_args(args)
    _check_adapter_file(args.adapter)
    volume = read_volume(args.image, args.series)
    engine = _engine_for_args(args)
    with progress_bar("automatic", args.quiet) as progress:
        segments = engine.auto(volume, classes=args.classes, keep_largest=not args.all_components,
                               axis=args.axis, progress=progress, **normalization)
    _print_notices(engine)
    stored = save_output(target, volume, segments, replace_same_name=args.overwrite, automatic=True)
    _print_notices(target)
    if not args.quiet:
        print(f"normalisation: {engine.last_result.normalization.description}")
        for segment, count in zip(segments, stored):
            print(f"{segment.name}: {count} voxels")
        print(f"-> {out}")
    return 0


def _print_notices(source) -> None:
    """Warnings an engine or an output target collected (one line each)."""
    for notice in source.notices:
        print(f"warning: {notice}", file=sys.stderr)
    source.notices.clear()


def run_demo(args) -> int:
    from .demo import run

    return run(args.out_dir, device=args.device, quiet=args.quiet)


def main(argv: list[str] | None = None) -> int:
    from .files import exit_cleanly_on_sigterm

    restore_sigterm = exit_cleanly_on_sigterm()  # a SIGTERM mid-write removes the temporary file
    try:
        return _main(argv)
    finally:
        restore_sigterm()  # in-process callers (notebooks, test runners) keep their own SIGTERM behaviour


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_in(argv) or "")
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
