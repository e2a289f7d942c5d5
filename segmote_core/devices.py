"""Compute device choice: auto picks CUDA, then Apple MPS, then CPU."""

from __future__ import annotations

import torch

from .errors import DeviceError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def available_devices() -> list[str]:
    """Devices usable in this process, best first (what a device menu should show)."""
    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    found.append("cpu")
    return found


def resolve_device(name: str | None = "auto") -> torch.device:
    """Turn 'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps' into a torch.device, or raise DeviceError."""
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device(available_devices()[0])
    kind = name.split(":")[0]
    if kind not in DEVICE_CHOICES:
        raise DeviceError(f"unknown device '{name}'; choose one of {', '.join(DEVICE_CHOICES)}")
    if kind != "cpu" and kind not in available_devices():
        raise DeviceError(
            f"device '{name}' was asked for but is not available here (available: {', '.join(available_devices())})"
        )
    if kind == "cuda" and ":" in name:
        index = int(name.split(":")[1])
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device '{name}' does not exist ({torch.cuda.device_count()} CUDA device(s))")
    return torch.device(name)
