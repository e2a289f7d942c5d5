"""``python -m segmote_core.train`` (what ``torchrun -m segmote_core.train`` starts): the same as `segmote train`.

The training code lives in ``segmote_core.training``, its command line in ``segmote_core.cli.train``.
"""

from __future__ import annotations

import sys
from typing import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m segmote_core.train ARGS` is `segmote train ARGS`."""
    from .cli import main as segmote

    return segmote(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
