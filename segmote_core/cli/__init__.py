"""The `segmote` command line: one module per command, `main` in main.py (see its docstring for exit codes).

Thin: parses arguments, calls the engine, writes files atomically. Importing this package is cheap (no torch).
"""

from .common import DEVICE_HELP, OUTPUT_FORMATS, RUNTIME_CHOICES, _engines, engine_for, engine_key, progress_bar
from .main import EXIT_INTERNAL_ERROR, EXIT_USER_ERROR, LAZY_COMMANDS, build_parser, main

__all__ = ["DEVICE_HELP", "EXIT_INTERNAL_ERROR", "EXIT_USER_ERROR", "LAZY_COMMANDS", "OUTPUT_FORMATS",
           "RUNTIME_CHOICES",
           "build_parser", "engine_for", "engine_key", "main", "progress_bar"]
