"""Intensity normalisation: the one function that inference and training both use.

A ``Normalization`` is always resolved to concrete bounds (low, high) before use, so it can key the
embedding cache and be stored in an adapter checkpoint: CT uses a window (level, width) — a preset or the
user's; MR and other modalities clip at volume-wide percentiles (robust to bright outliers). The result is
float32 in [0, 1]: clip((x - low) / (high - low), 0, 1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .errors import InputError

CT_WINDOWS = {  # (level, width) in HU, the usual radiology presets
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft_tissue": (40.0, 400.0),
    "abdomen": (60.0, 400.0),
    "liver": (80.0, 150.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "wide": (0.0, 2000.0),
}
DEFAULT_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class Normalization:
    low: float
    high: float
    description: str = ""

    def key(self) -> tuple[float, float]:
        return (round(self.low, 4), round(self.high, 4))

    def as_dict(self) -> dict:
        return asdict(self)


def window(level: float, width: float) -> Normalization:
    if not np.isfinite(level) or not np.isfinite(width) or width <= 0:
        raise InputError(f"window width must be positive and finite (got level {level}, width {width})")
    return Normalization(level - width / 2, level + width / 2, f"window L{level:g} W{width:g}")


def looks_like_ct(array: np.ndarray) -> bool:
    """CT in Hounsfield units: integer-valued, air near -1000 present."""
    sample = array.reshape(-1)[:: max(1, array.size // 200_000)]
    return bool(np.issubdtype(array.dtype, np.integer) or np.allclose(sample, np.round(sample))) and \
        float(np.nanmin(sample)) <= -900


def percentiles(array: np.ndarray, low_pct: float = DEFAULT_PERCENTILES[0],
                high_pct: float = DEFAULT_PERCENTILES[1]) -> Normalization:
    # A strided sample keeps this fast on 500-slice volumes; percentiles of ~1M voxels are stable.
    sample = array.reshape(-1)[:: max(1, array.size // 1_000_000)].astype(np.float32)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        raise InputError("the image holds no finite intensities")
    low, high = np.percentile(sample, [low_pct, high_pct])
    if high <= low:
        high = low + 1.0
    return Normalization(float(low), float(high), f"percentiles {low_pct:g}-{high_pct:g}")


def choose_normalization(array: np.ndarray, window_level_width=None, preset: str | None = None,
                         modality: str = "auto") -> Normalization:
    """Resolve the user's choice: explicit window > CT preset > percentile clipping (the default)."""
    if window_level_width is not None:
        return window(*window_level_width)
    if preset is not None:
        if preset not in CT_WINDOWS:
            raise InputError(f"unknown CT window preset '{preset}'; choose one of {', '.join(CT_WINDOWS)}")
        return window(*CT_WINDOWS[preset])
    if modality not in ("auto", "ct", "mr", "other"):
        raise InputError(f"unknown modality '{modality}'; choose auto, ct, mr or other")
    return percentiles(array)


def normalize(array: np.ndarray, norm: Normalization) -> np.ndarray:
    """Intensities -> float32 in [0, 1]; NaN and Inf voxels map to 0 (never propagate into the model)."""
    out = (np.asarray(array, dtype=np.float32) - np.float32(norm.low)) / np.float32(norm.high - norm.low)
    np.clip(out, 0.0, 1.0, out=out)
    out[~np.isfinite(out)] = 0.0
    return out
