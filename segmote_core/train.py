"""`segmote train` and ``python -m segmote_core.train`` (what torchrun starts): the training package's command.

The code lives in ``segmote_core.training``; this module is where the CLI finds the command (``add_cli``) and what
``torchrun -m segmote_core.train`` runs.
"""

from __future__ import annotations

import sys
from typing import Sequence

from .training.cli import add_cli

__all__ = ["add_cli", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m segmote_core.train ARGS` is `segmote train ARGS`."""
    from .cli import main as segmote

    return segmote(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
