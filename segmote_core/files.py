"""Writing files atomically: the one place that does it.

Every file SegMoTE writes (segmentations, label maps, adapters, training state, embedding caches, manifests,
reports, benchmark JSON) goes through ``atomic_write``: the content is written to a temporary file beside the
target, flushed to disk, and moved over the target in one step, so a crash or a full disk never leaves half a file
under the real name and an existing file survives any failure.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import InputError, SegMoTEError


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


# Formats whose header names a separate data file (ITK writes both, naming the data file after the header).
DETACHED_SUFFIXES = (".mhd", ".nhdr")


def atomic_write(path: str | os.PathLike, write_to: Callable[[Path], object], mode: int | None = None) -> Path:
    """Call write_to(temporary_path), then move the result over `path`; returns `path`.

    The temporary file keeps the target's suffixes (writers that choose the format by extension, e.g. SimpleITK,
    see the right one). A header + data pair (.mhd, .nhdr) is written under its real names in a temporary folder
    beside the target, so the header names the real data file; the data file moves into place first, the header
    last. mode: permission bits for the result; by default an overwritten file keeps its mode and a new one gets
    what open() would give it (0666 minus the umask), not the temporary file's owner-only 0600. A `path` that is a
    symbolic link updates the file it links to (the link stays); a read-only file is refused, not replaced. An
    OSError (disk full, permissions, a parent that is a file) becomes a one-line SegMoTEError; the previous file is
    untouched."""
    path = target_of(path)
    if not path.name.lower().endswith(DETACHED_SUFFIXES):
        staged = StagedFile(path, mode)
        try:
            staged.write(write_to)
            staged.commit()
        finally:
            staged.discard()
        return path
    folder = None
    try:
        mode = _mode_for(path, mode)
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{path.name.split('.')[0]}-", suffix=".tmp", dir=path.parent))
        write_to(folder / path.name)
        written = sorted(folder.iterdir(), key=lambda p: p.name == path.name)  # the header last
        for part in written:
            _sync_and_chmod(part, mode)
        for part in written:
            os.replace(part, path.parent / part.name)
    except OSError as error:
        raise SegMoTEError(f"cannot write {path.name}: {_reason(error, path)}; any previous file is unchanged") from None
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    return path


def target_of(path: str | os.PathLike) -> Path:
    """Where a write to `path` lands: the file a symbolic link points to (so the link keeps working), else `path`.
    A read-only file is refused: the user marked it so."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.is_file() and not path.stat().st_mode & 0o222:
        raise SegMoTEError(f"cannot write {path.name}: the file is read-only; it is left as it is")
    return path


def _mode_for(path: Path, mode: int | None) -> int:
    if mode is not None:
        return mode
    return path.stat().st_mode & 0o7777 if path.is_file() else 0o666 & ~_umask()


class StagedFile:
    """A file written now and put in place later: a temporary file beside `path` (creating it proves the folder
    writable), filled by write(), moved over `path` by commit() (one rename), removed by discard() otherwise.
    Several staged files of one result are committed together after everything was written, so a failure
    leaves none of them in place (see cli/batch.py: segmentation, run record, preview)."""

    def __init__(self, path: str | os.PathLike, mode: int | None = None):
        self.path = target_of(path)
        self.temporary: Path | None = None
        try:
            self.mode = _mode_for(self.path, mode)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            suffix = "".join(self.path.suffixes) or ".tmp"
            handle, name = tempfile.mkstemp(prefix=f".{self.path.name.split('.')[0]}-", suffix=suffix,
                                            dir=self.path.parent)
            os.close(handle)
            self.temporary = Path(name)
        except OSError as error:
            raise self._error(error) from None

    def _error(self, error: OSError) -> SegMoTEError:
        return SegMoTEError(f"cannot write {self.path.name}: {_reason(error, self.path)}; any previous file is "
                            "unchanged")

    def write(self, write_to: Callable[[Path], object]) -> "StagedFile":
        try:
            write_to(self.temporary)
            _sync_and_chmod(self.temporary, self.mode)
        except OSError as error:
            raise self._error(error) from None
        return self

    def commit(self) -> Path:
        try:
            os.replace(self.temporary, self.path)
        except OSError as error:
            raise self._error(error) from None
        self.temporary = None
        return self.path

    def discard(self) -> None:
        if self.temporary is not None:
            self.temporary.unlink(missing_ok=True)
            self.temporary = None


def _sync_and_chmod(path: Path, mode: int) -> None:
    with open(path, "rb+") as written:
        os.fsync(written.fileno())
    os.chmod(path, mode)


def _reason(error: OSError, path: Path) -> str:
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file, not a folder"
            break
    return error.strerror or str(error)


def refuse_input_as_output(output: str | os.PathLike, *inputs: str | os.PathLike | None,
                           option: str = "output") -> None:
    """An output that names one of the command's inputs (the image, the ground truth...) would destroy it."""
    out = Path(output)
    for given in inputs:
        if given is None or not out.exists():
            continue
        source = Path(given)
        try:
            same = source.exists() and os.path.samefile(out, source)
        except OSError:
            same = False
        if same:
            raise InputError(f"{option} {out.name} is one of the inputs ({source}); choose another file")


@contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock for a read-modify-write of `path` (another process adding to the same file waits).

    The lock is an flock on the file's folder, so no lock file is left behind; where flock does not exist
    (Windows, some network file systems) writes are atomic but not serialised."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = os.open(folder, os.O_RDONLY)
    except OSError as error:
        raise SegMoTEError(f"cannot write {Path(path).name}: {_reason(error, Path(path))}") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # a file system without locks (some network mounts): atomic, not serialised
            pass
        yield
    finally:
        os.close(handle)  # closing releases the lock


def exit_cleanly_on_sigterm() -> Callable[[], None]:
    """Turn SIGTERM into SystemExit so that atomic writes in progress remove their temporary files (the default
    action ends the process on the spot). Only from the main thread, and only where nobody set a handler. Returns
    the function that puts the previous handler back (in-process callers must not inherit this one)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_signal)
        return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return lambda: None


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


def atomic_write_text(path: str | os.PathLike, text: str, mode: int | None = None) -> Path:
    """atomic_write for text (JSON, YAML, CSV built in memory)."""
    return atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"), mode)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks so multi-GB checkpoints never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
