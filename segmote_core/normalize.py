"""Intensity normalisation: the one function that inference and training both use.

A ``Normalization`` is always resolved to concrete bounds (low, high) before use, so it can key the
embedding cache and be stored in an adapter checkpoint: CT uses a window (level, width) — a preset or the
user's; MR and other modalities clip at volume-wide percentiles (robust to bright outliers). The result is
float32 in [0, 1]: clip((x - low) / (high - low), 0, 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError

CT_WINDOWS = {  # (level, width) in HU, the usual radiology presets
    "lung": (-600.0, 1500.0),
    "lung_parenchyma": (-700.0, 600.0),  # aerated lung against everything denser; best for lung masks
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
    """Resolved bounds plus the rule that produced them (the rule is what an adapter checkpoint stores, so
    that percentile clipping is recomputed on each new scan rather than reusing the training scan's bounds)."""

    low: float
    high: float
    rule: tuple = ()  # ("window", level, width) or ("percentiles", low_pct, high_pct)

    def key(self) -> tuple[float, float]:
        return (round(self.low, 4), round(self.high, 4))

    @property
    def description(self) -> str:
        if self.rule and self.rule[0] == "window":
            return f"window L{self.rule[1]:g} W{self.rule[2]:g}"
        if self.rule and self.rule[0] == "percentiles":
            return f"percentiles {self.rule[1]:g}-{self.rule[2]:g}"
        return f"range {self.low:g}..{self.high:g}"

    def rule_dict(self) -> dict:
        if not self.rule:
            return {"kind": "range", "low": self.low, "high": self.high}
        names = {"window": ("level", "width"), "percentiles": ("low_pct", "high_pct")}[self.rule[0]]
        return {"kind": self.rule[0], names[0]: self.rule[1], names[1]: self.rule[2]}


def from_rule(array: np.ndarray, rule: dict) -> Normalization:
    """Re-apply a stored rule (see Normalization.rule_dict) to a new scan."""
    kind = rule.get("kind")
    if kind == "window":
        return window(float(rule["level"]), float(rule["width"]))
    if kind == "percentiles":
        return percentiles(array, float(rule["low_pct"]), float(rule["high_pct"]))
    if kind == "range":
        return Normalization(float(rule["low"]), float(rule["high"]))
    raise InputError(f"unknown normalisation rule {rule!r}")


def window(level: float, width: float) -> Normalization:
    if not np.isfinite(level) or not np.isfinite(width) or width <= 0:
        raise InputError(f"window width must be positive and finite (got level {level}, width {width})")
    return Normalization(level - width / 2, level + width / 2, ("window", float(level), float(width)))


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
    return Normalization(float(low), float(high), ("percentiles", float(low_pct), float(high_pct)))


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


def normalize(array, norm: Normalization):
    """Intensities -> float32 in [0, 1]; NaN voxels map to 0 (never propagate into the model).

    `array` is a numpy array, or a torch tensor already on the compute device (GPU engines copy the raw slices
    there and normalise them in place: half the bytes of float32 to copy, no host work)."""
    width = np.float32(norm.high - norm.low)
    if not isinstance(array, np.ndarray) and type(array).__module__.startswith("torch"):
        import torch  # here, not at the top: the CLI reads presets without loading torch
        out = (array.float() - float(np.float32(norm.low))) / float(width)
        return torch.nan_to_num(out.clamp_(0.0, 1.0), nan=0.0)
    out = (np.asarray(array, dtype=np.float32) - np.float32(norm.low)) / width
    np.clip(out, 0.0, 1.0, out=out)
    out[~np.isfinite(out)] = 0.0
    return out
