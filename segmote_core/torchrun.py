"""torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), checked once for every command
that runs distributed (training, folder runs of segment/auto). Torch-free: it is read before any model loads."""

from __future__ import annotations

import os

from .errors import InputError


TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def torchrun_environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without WORLD_SIZE > 1. Variables
    that are half set (WORLD_SIZE without RANK, a rank outside the world, text for a number) are a one-line error."""
    def number(name: str, default: str | None) -> int:
        text = os.environ.get(name, default)
        if text is None:
            raise InputError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {name} is not set: start distributed "
                             f"runs with torchrun, which sets {', '.join(TORCHRUN_VARIABLES)}")
        try:
            return int(text)
        except ValueError:
            raise InputError(f"environment variable {name} must be a whole number, got {text!r}") from None

    world = number("WORLD_SIZE", "1")
    if world <= 1:
        if world < 1:
            raise InputError(f"environment variable WORLD_SIZE must be 1 or more, got {world}")
        return 0, 1, 0
    rank, local_rank = number("RANK", None), number("LOCAL_RANK", "0")
    number("MASTER_PORT", None)
    for name in ("MASTER_ADDR",):
        if not os.environ.get(name):
            raise InputError(f"WORLD_SIZE is {world} but {name} is not set: start distributed runs with torchrun, "
                             f"which sets {', '.join(TORCHRUN_VARIABLES)}")
    if not 0 <= rank < world or local_rank < 0:
        raise InputError(f"RANK {rank} / LOCAL_RANK {local_rank} do not fit WORLD_SIZE {world}")
    return rank, world, local_rank
