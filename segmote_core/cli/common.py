"""What several commands share: the parser class, model options, verbosity, the progress bar and the engine cache.

Cheap to import: no numpy, torch or model; those are imported inside the functions that need them.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from contextlib import contextmanager

RUNTIME_CHOICES = ("auto", "torch", "onnx", "openvino")  # segmote_core.runtime.RUNTIMES, without importing it
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps (default auto)"  # devices.DEVICE_HELP, without importing torch
OUTPUT_FORMATS = ("seg.nrrd", "nifti", "dicom-seg")  # outputs.OUTPUT_FORMATS, without importing SimpleITK

log = logging.getLogger("segmote_core.cli")


class Parser(argparse.ArgumentParser):
    """argparse that takes "-1e2" for a number, not an option (its own test only knows "-100" and "-.5")."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf$|^-nan$")


def add_verbosity_options(parser: argparse.ArgumentParser, top_level: bool = False) -> None:
    """-v/--verbose and -q/--quiet, accepted before or after the command. After the command they default to
    SUPPRESS, so that a subcommand does not reset what was given before it."""
    default = (lambda value: value) if top_level else (lambda value: argparse.SUPPRESS)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", default=default(False),
                       help="more detail: debug messages from the engine and file layers")
    group.add_argument("-q", "--quiet", action="store_true", default=default(False),
                       help="only warnings and errors: no progress bars, no result lines")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="lite_medsam", metavar="NAME",
                        help="backbone: lite_medsam, sam_vit_b, sam_vit_l, sam_vit_h (default lite_medsam)")
    parser.add_argument("--checkpoint", metavar="PATH", help="backbone weights file (default: shipped/cached)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)  # checked by devices.resolve_device
    parser.add_argument("--runtime", choices=RUNTIME_CHOICES,
                        help="CPU inference runtime: PyTorch, or the model exported once to ONNX and run by ONNX "
                             "Runtime or OpenVINO; auto picks the fastest installed one (default: $SEGMOTE_RUNTIME, "
                             "else auto)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="image encoder precision (default fp32); bf16 for GPUs, and OpenVINO on CPUs with native "
                             "bf16 (faster, but masks differ from fp32's; on other CPUs far slower)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the image encoder (GPUs; the first run on a machine compiles for a minute)")
    parser.add_argument("--window", nargs=2, type=float, metavar=("LEVEL", "WIDTH"), help="CT window in HU")
    parser.add_argument("--preset", metavar="NAME", help="CT window preset (lung, lung_parenchyma, soft_tissue, ...)")
    parser.add_argument("--axis", type=int, choices=(0, 1, 2),
                        help="voxel axis to slice along (default: the one closest to superior-inferior)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a segment of the same name in OUT (other segments are always kept; a DICOM "
                             "SEG is replaced whole), and a run record or preview segmote did not write for OUT")
    parser.add_argument("--output-format", choices=OUTPUT_FORMATS,
                        help="OUT's format (default: from its suffix; .dcm means dicom-seg, which needs a DICOM "
                             "series input)")
    parser.add_argument("--series", metavar="UID", help="the DICOM series to read when the folder holds several")
    add_verbosity_options(parser)


@contextmanager
def progress_bar(description: str, quiet: bool, unit: str = "slice"):
    """A tqdm bar driven by a progress(done, total) callback (the engine's, or a loop over cases)."""
    if quiet:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(desc=description, unit=unit, leave=False, file=sys.stderr)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()


def normalization_args(args) -> dict:
    """--window / --preset as the engine takes them; checked by the resolver now, before anything is loaded."""
    import numpy as np

    from ..normalize import choose_normalization

    window = tuple(args.window) if args.window is not None else None
    if window is not None or args.preset:
        choose_normalization(np.zeros(1), window, args.preset)
    return {"window": window, "preset": args.preset}


_engines: dict[tuple, object] = {}


def engine_key(model: str, checkpoint, device: str, adapter, precision: str = "fp32", compile: bool = False,
               runtime: str | None = None) -> tuple:
    return (model, str(checkpoint), device, str(adapter), precision, compile, runtime)


def engine_for(model: str, checkpoint, device: str, adapter, precision: str = "fp32", compile: bool = False,
               runtime: str | None = None):
    """One engine per model setup in this process, so that in-process callers (notebooks, tests, scripts calling
    main() repeatedly) and every case of a folder reuse loaded weights and cached embeddings."""
    key = engine_key(model, checkpoint, device, adapter, precision, compile, runtime)
    if key not in _engines:
        from ..engine import Engine

        _engines[key] = Engine(model, checkpoint, device, adapter=adapter, precision=precision, compile=compile,
                               runtime=runtime)
    return _engines[key]


def engine_for_args(args):
    return engine_for(args.model, args.checkpoint, args.device, args.adapter, args.precision, args.compile,
                      args.runtime)


def check_adapter_file(path) -> None:
    """Before a model is loaded: the adapter file exists (its contents are checked when it is loaded)."""
    from ..shipped import missing_adapter_error, resolve_adapter

    if path is not None and not resolve_adapter(path).is_file():
        raise missing_adapter_error(path)


def log_notices(source) -> None:
    """Warnings an engine or an output target collected, one line each."""
    for notice in source.notices:
        log.warning(notice)
    source.notices.clear()
