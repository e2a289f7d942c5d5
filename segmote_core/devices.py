"""Compute device choice: auto picks CUDA, then Apple MPS, then CPU; and the CPU allocator setting that goes with it."""

from __future__ import annotations

import os
import sys

import torch

from .errors import DeviceError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps (default auto)"


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
    if kind not in DEVICE_CHOICES or (":" in name and (kind != "cuda" or not name.split(":", 1)[1].isdigit())):
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


def default_encoder_batch(device: torch.device) -> int:
    """Slices per image-encoder call. CPU: 1 -- batches are slower per slice there (LiteMedSAM, 2 cores: 1.04 s at
    batch 1 vs 1.29 s at batch 4) and each extra slice adds ~0.25 GB of activations to the peak RAM
    (docs/benchmarks.md). GPUs: 16, cut in half on out-of-memory by the engine."""
    return 1 if device.type == "cpu" else 16


def default_cache_bytes(device: torch.device) -> int:
    """Byte budget of the engine's embedding cache: 1 GiB of RAM on the CPU (~250 LiteMedSAM slices, ~150 with an
    adapter's early features; keeps a 512x512x300 automatic run under 4 GB), 2 GiB on GPUs."""
    return (1 << 30) if device.type == "cpu" else (2 << 30)


_allocator_tuned = False


def tune_cpu_allocator() -> bool:
    """glibc: serve large blocks from the heap instead of fresh mmap()s, and keep freed memory for reuse.

    glibc maps every block above its mmap threshold afresh and unmaps it on free, so each encoder pass re-faults its
    activations page by page (LiteMedSAM on 2 cores: ~490k minor faults and ~1.8 s of kernel time per slice; tuned,
    ~2k and 8 ms, and the encoder 1.8x faster). Costs retained heap (docs/benchmarks.md). Process-wide, so it is
    done once; SEGMOTE_MALLOC_TUNING=0 leaves the allocator alone. Returns whether the allocator is tuned."""
    global _allocator_tuned
    if _allocator_tuned or os.environ.get("SEGMOTE_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return _allocator_tuned
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        _allocator_tuned = bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # not glibc (musl, ...)
        pass
    return _allocator_tuned


def release_free_heap() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim): the tuned allocator keeps up to 1 GiB of
    freed memory for the next encoder pass, which one-off work (an engine's load probes: ~0.3 GB) would otherwise
    hold for the whole run. A no-op where the allocator is not tuned."""
    if not _allocator_tuned:
        return
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)


def cpu_allocator_tuned() -> bool:
    """Whether tune_cpu_allocator() has tuned this process's allocator (engines on the CPU do it)."""
    return _allocator_tuned

