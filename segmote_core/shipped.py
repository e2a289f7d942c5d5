"""Files that ship inside the package, so that a plain `pip install segmote` has them: trained adapters.

An adapter is named by its file's stem (``chest_ct_lungs``); wherever a command or the engine takes an adapter
file, it also takes a shipped adapter's name.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CheckpointError

DATA_DIR = Path(__file__).resolve().parent / "data"
ADAPTER_DIR = DATA_DIR / "adapters"


def shipped_adapters() -> dict[str, Path]:
    """Name -> file of every adapter that ships with the package."""
    return {path.stem: path for path in sorted(ADAPTER_DIR.glob("*.safetensors"))}


def shipped_adapter(name: str) -> Path:
    adapters = shipped_adapters()
    if name not in adapters:
        raise CheckpointError(f"no shipped adapter named {name!r}; shipped: {', '.join(adapters) or 'none'}")
    return adapters[name]


def resolve_adapter(name_or_path: str | os.PathLike) -> Path:
    """The path as given when something is there; else the shipped adapter of that name; else the path as given,
    for the reader's one-line error."""
    path = Path(name_or_path)
    if not path.exists() and os.fspath(name_or_path) in shipped_adapters():
        return shipped_adapter(os.fspath(name_or_path))
    return path


def missing_adapter_error(path: str | os.PathLike) -> CheckpointError:
    shipped = ", ".join(shipped_adapters()) or "none"
    return CheckpointError(f"adapter file {os.fspath(path)} does not exist (shipped adapters, usable by name: {shipped})")
