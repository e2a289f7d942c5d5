"""Writing files atomically: the one place that does it.

Every file SegMoTE writes (segmentations, label maps, adapters, training state, embedding caches, manifests,
reports, benchmark JSON) goes through ``atomic_write``: the content is written to a temporary file beside the
target, flushed to disk, and moved over the target in one step, so a crash or a full disk never leaves half a file
under the real name and an existing file survives any failure.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import SegMoTEError


def atomic_write(path: str | os.PathLike, write_to: Callable[[Path], object], mode: int | None = None) -> Path:
    """Call write_to(temporary_path), then move the result over `path`; returns `path`.

    The temporary file keeps the target's suffixes (writers that choose the format by extension, e.g. SimpleITK,
    see the right one). mode: permission bits for the result (default: mkstemp's owner-only 0600). An OSError (disk
    full, permissions) becomes a one-line SegMoTEError; the previous file, if any, is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    handle, name = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}-", suffix=suffix, dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        write_to(temporary)
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        if mode is not None:
            os.chmod(temporary, mode)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise SegMoTEError(f"cannot write {path.name}: {error.strerror or error}; any previous file is unchanged")
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, mode: int | None = None) -> Path:
    """atomic_write for text (JSON, YAML, CSV built in memory)."""
    return atomic_write(path, lambda temporary: temporary.write_text(text), mode)
