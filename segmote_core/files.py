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


def _umask() -> int:
    """The process umask, read without changing it (os.umask can only be read by setting it, racing threads)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def atomic_write(path: str | os.PathLike, write_to: Callable[[Path], object], mode: int | None = None) -> Path:
    """Call write_to(temporary_path), then move the result over `path`; returns `path`.

    The temporary file keeps the target's suffixes (writers that choose the format by extension, e.g. SimpleITK,
    see the right one). mode: permission bits for the result; by default an overwritten file keeps its mode and a
    new one gets what open() would give it (0666 minus the umask), not the temporary file's owner-only 0600. An
    OSError (disk full, permissions) becomes a one-line SegMoTEError; the previous file, if any, is untouched."""
    path = Path(path)
    if mode is None:
        mode = path.stat().st_mode & 0o7777 if path.is_file() else 0o666 & ~_umask()
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    handle, name = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}-", suffix=suffix, dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        write_to(temporary)
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
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
