"""The `segmote` command line: the parser of every command, logging, and the one error policy.

Exit status: 0 done; 1 a user error (bad input, missing file: one `error: ...` line on stderr, nothing written);
2 a usage error (argparse); 3 an internal error (one line; SEGMOTE_DEBUG=1 shows the traceback); 130 interrupted.
Starting is cheap: command modules import torch and the models only inside their run functions, and every check
that needs no model (arguments, paths, prompts) runs before one is loaded.
"""

from __future__ import annotations

import logging
import os
import sys

from .. import __version__
from ..errors import SegMoTEError
from . import auto, demo, segment, weights
from .common import Parser, add_verbosity_options

EXIT_USER_ERROR = 1
EXIT_INTERNAL_ERROR = 3
EXIT_INTERRUPTED = 130

COMMANDS = (segment, auto, demo, weights)
# Commands whose parser needs numpy or torch to build: name -> (module in this package, one-line help). The
# module is imported only when its command runs; tests/test_cli_startup.py checks the help lines match.
LAZY_COMMANDS = {
    "eval": ("evaluate", "Dice and normalised surface Dice of a segmentation against ground truth"),
    "curate": ("curate", "score (slice, label) samples and keep a balanced high-quality subset"),
    "train": ("train", "train SegMoTE adapters (MoTE + PPT) on a frozen backbone"),
}


def build_parser(command: str | None = None) -> Parser:
    """The parser of every command; the LAZY_COMMANDS get their full parser only when `command` names them
    (None: all of them), otherwise a placeholder that only names them in --help."""
    parser = Parser(prog="segmote", description="SegMoTE: prompt or automatic segmentation of CT/MRI volumes "
                                                "with Segment Anything + token-level mixture of experts.")
    parser.add_argument("--version", action="version", version=f"segmote {__version__}")
    add_verbosity_options(parser, top_level=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.add_parser(commands)
    for name, (module_name, help_line) in LAZY_COMMANDS.items():
        module = _optional_module(module_name) if command in (None, name) else None
        if module is not None:
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
        return importlib.import_module(f"segmote_core.cli.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"segmote_core.cli.{name}":
            return None
        raise


class _StderrHandler(logging.StreamHandler):
    """Writes to the sys.stderr of the moment (test runners and notebooks swap it), with `warning: ` before
    warnings and `error: ` before errors, plain text otherwise."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass

    def emit(self, record: logging.LogRecord) -> None:
        tqdm = sys.modules.get("tqdm")
        if tqdm is None:
            return super().emit(record)
        try:
            tqdm.tqdm.write(self.format(record), file=sys.stderr)  # above a progress bar, not inside its line
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"error: {text}"
        if record.levelno >= logging.WARNING:
            return f"warning: {text}"
        return text


def configure_logging(verbose: bool, quiet: bool) -> None:
    """One logger for the whole package: library modules log to `segmote_core.<module>`, the CLI shows it."""
    logger = logging.getLogger("segmote_core")
    if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        logger.addHandler(_StderrHandler())
    logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


def debug_enabled() -> bool:
    """SEGMOTE_DEBUG=1 (or true, yes, on) shows tracebacks; unset, empty, 0, false, no or off mean off."""
    return os.environ.get("SEGMOTE_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


def main(argv: list[str] | None = None) -> int:
    from ..files import exit_cleanly_on_sigterm

    restore_sigterm = exit_cleanly_on_sigterm()  # a SIGTERM mid-write removes the temporary file
    try:
        return _main(argv)
    finally:
        restore_sigterm()  # in-process callers (notebooks, test runners) keep their own SIGTERM behaviour


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_in(argv) or "")
    args = parser.parse_args(argv)  # a usage error exits here with argparse's status 2
    configure_logging(getattr(args, "verbose", False), getattr(args, "quiet", False))
    try:
        return int(args.func(args) or 0)
    except SegMoTEError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(getattr(args, "interrupted", "interrupted; nothing was written"), file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - the user gets one line; developers set SEGMOTE_DEBUG=1
        if debug_enabled():
            raise
        from ..toolbox import one_line

        print(f"error: internal error ({one_line(error, 250, named=True)}); rerun with SEGMOTE_DEBUG=1 for details",
              file=sys.stderr)
        return EXIT_INTERNAL_ERROR
