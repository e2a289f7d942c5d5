"""Intensity normalisation: one resolver that inference, training, curation and the Slicer module all call.

``choose_normalization`` decides how a scan is shown to the model, in this order: the user's explicit window >
a named preset > the rule stored in a loaded adapter > the backbone's training convention for the scan's
modality. The modality comes from the file's metadata where it has one (DICOM Modality, an NRRD ``modality``
field, a dataset's channel name) and otherwise from the data: CT in Hounsfield units has air at about -1000.
CT gets the window the backbone declares for CT; MR and everything else get robust percentile clipping, as in
MedSAM's preprocessing (bounds from the non-zero voxels).

A ``Normalization`` is resolved to concrete bounds (low, high) before use, so it can key the embedding cache, and
it keeps the rule that produced them (what an adapter checkpoint stores, so that percentile clipping is recomputed
on each new scan) and a one-line ``description`` of what was chosen and why (printed by the CLI, shown in Slicer).
The result of ``normalize`` is float32 in [0, 1]: clip((x - low) / (high - low), 0, 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import InputError

CT_WINDOWS = {  # (level, width) in HU, the usual radiology presets
    "lung": (-600.0, 1500.0),
    "lung_parenchyma": (-700.0, 600.0),  # aerated lung against everything denser
    "mediastinum": (50.0, 350.0),
    "soft_tissue": (40.0, 400.0),
    "abdomen": (60.0, 400.0),
    "liver": (80.0, 150.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "air_to_bone": (-300.0, 1400.0),  # -1000..400 HU: air, lung, fat, soft tissue and bone apart at once
    "wide": (0.0, 2000.0),
}
DEFAULT_PERCENTILES = (0.5, 99.5)
AIR_HU = (-1100.0, -900.0)  # where air reads in a CT stored in Hounsfield units
MIN_AIR_SHARE = 0.002  # share of voxels at air HU that marks a CT (a chest CT has ~30 %, a tight head crop ~1 %)
CT_OFFSET = 1024.0  # the usual RescaleIntercept (-1024) of CTs stored as unsigned values
RULE_KINDS = ("window", "percentiles", "range", "auto")


@dataclass(frozen=True)
class Normalization:
    """Resolved bounds, the rule that produced them, and why that rule was chosen."""

    low: float
    high: float
    rule: tuple = ()  # ("window", level, width) or ("percentiles", low_pct, high_pct, voxels)
    reason: str = field(default="", compare=False)  # why this rule: "automatic: CT ...", "the window given", ...
    auto_rule: dict | None = field(default=None, compare=False, hash=False)  # set when the rule was automatic
    # False when an adapter's stored rule was set aside because it does not fit the scan (a CT window on an MR):
    # the scan is then outside the adapter's domain.
    adapter_applies: bool = field(default=True, compare=False)

    def key(self) -> tuple[float, float]:
        return (round(self.low, 4), round(self.high, 4))

    @property
    def rule_text(self) -> str:
        if self.rule and self.rule[0] == "window":
            return f"window L{self.rule[1]:g} W{self.rule[2]:g}"
        if self.rule and self.rule[0] == "percentiles":
            which = " of the non-zero voxels" if len(self.rule) > 3 and self.rule[3] == "nonzero" else ""
            return f"percentiles {self.rule[1]:g}-{self.rule[2]:g}{which} ({self.low:g}..{self.high:g})"
        return f"range {self.low:g}..{self.high:g}"

    @property
    def description(self) -> str:
        """One line: what the model sees and why, e.g. 'window L-300 W1400 (automatic: CT in Hounsfield ...)'."""
        return f"{self.rule_text} ({self.reason})" if self.reason else self.rule_text

    @property
    def automatic(self) -> bool:
        """Whether this came from the modality default (no window, preset or adapter rule given)."""
        return self.auto_rule is not None

    def rule_dict(self) -> dict:
        if not self.rule:
            return {"kind": "range", "low": self.low, "high": self.high}
        if self.rule[0] == "window":
            return {"kind": "window", "level": self.rule[1], "width": self.rule[2]}
        rule = {"kind": "percentiles", "low_pct": self.rule[1], "high_pct": self.rule[2]}
        if len(self.rule) > 3 and self.rule[3] != "all":
            rule["voxels"] = self.rule[3]
        return rule

    def with_reason(self, reason: str, auto_rule: dict | None = None, adapter_applies: bool = True) -> "Normalization":
        return Normalization(self.low, self.high, self.rule, reason, auto_rule, adapter_applies)


# ---- the rule kinds -------------------------------------------------------------------------------------
def window(level: float, width: float) -> Normalization:
    if not np.isfinite(level) or not np.isfinite(width) or width <= 0:
        raise InputError(f"window width must be positive and finite (got level {level}, width {width})")
    return Normalization(level - width / 2, level + width / 2, ("window", float(level), float(width)))


def _sample(array: np.ndarray, size: int = 1_000_000) -> np.ndarray:
    # A strided sample keeps this fast on 500-slice volumes; statistics of ~1M voxels are stable.
    sample = np.asarray(array).reshape(-1)[:: max(1, array.size // size)].astype(np.float32)
    return sample[np.isfinite(sample)]


def percentiles(array: np.ndarray, low_pct: float = DEFAULT_PERCENTILES[0],
                high_pct: float = DEFAULT_PERCENTILES[1], voxels: str = "all") -> Normalization:
    """Clip at volume-wide percentiles; voxels="nonzero": of the non-zero voxels only (MedSAM's MR rule, so an
    MR's zero background does not decide the lower bound)."""
    sample = _sample(array)
    if sample.size == 0:
        raise InputError("the image holds no finite intensities")
    if voxels == "nonzero":
        nonzero = sample[sample != 0]
        sample = nonzero if nonzero.size else sample
    low, high = np.percentile(sample, [low_pct, high_pct])
    if high <= low:
        high = low + 1.0
    return Normalization(float(low), float(high), ("percentiles", float(low_pct), float(high_pct), voxels))


def check_rule(rule, origin: str = "the adapter's") -> dict:
    """A stored rule, validated: one line naming what is wrong (an unknown kind, a missing or non-numeric value)."""
    def bad(why: str) -> InputError:
        return InputError(f"{origin} normalisation rule {rule!r} is not usable: {why}; give a CT window or preset "
                          "to override it, or retrain the adapter")

    if not isinstance(rule, dict):
        raise bad("it is not a mapping")
    kind = rule.get("kind")
    needed = {"window": ("level", "width"), "percentiles": ("low_pct", "high_pct"), "range": ("low", "high"),
              "auto": ("ct", "other")}.get(kind)
    if needed is None:
        raise bad(f"unknown kind {kind!r} (known: {', '.join(RULE_KINDS)})")
    for name in needed:
        if name not in rule:
            raise bad(f"'{name}' is missing")
    if kind == "auto":
        for name in needed:
            check_rule(rule[name], origin)
        return rule
    values = [rule[name] for name in needed]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in values):
        raise bad(f"{' and '.join(needed)} must be finite numbers")
    if kind == "window" and values[1] <= 0:
        raise bad("the width must be positive")
    if kind == "percentiles" and not 0 <= values[0] < values[1] <= 100:
        raise bad("percentiles must satisfy 0 <= low_pct < high_pct <= 100")
    if kind == "percentiles" and rule.get("voxels", "all") not in ("all", "nonzero"):
        raise bad("voxels must be 'all' or 'nonzero'")
    if kind == "range" and values[1] <= values[0]:
        raise bad("high must be above low")
    return rule


def from_rule(array: np.ndarray, rule: dict, modality: str | None = None) -> Normalization:
    """Re-apply a stored rule (see Normalization.rule_dict, or default_rule's "auto") to a new scan."""
    check_rule(rule)
    kind = rule["kind"]
    if kind == "window":
        return window(float(rule["level"]), float(rule["width"]))
    if kind == "percentiles":
        return percentiles(array, float(rule["low_pct"]), float(rule["high_pct"]), rule.get("voxels", "all"))
    if kind == "range":
        return Normalization(float(rule["low"]), float(rule["high"]))
    found, why = detect_modality(array, modality)
    if found == "ct":
        return from_rule(array, rule["ct"]).with_reason(why)
    if found == "ct_offset":
        shifted = dict(rule["ct"], level=float(rule["ct"]["level"]) + CT_OFFSET) if rule["ct"]["kind"] == "window" \
            else rule["ct"]
        return from_rule(array, shifted).with_reason(why)
    return from_rule(array, rule["other"]).with_reason(why)


# ---- modality -------------------------------------------------------------------------------------------
def _declared(modality: str | None) -> str | None:
    """'ct', 'other', or None (decide from the data). Like nnU-Net, any channel name but CT is not CT."""
    if modality is None:
        return None
    name = str(modality).strip().lower()
    if name in ("", "auto", "unknown", "ot"):  # DICOM "OT" = other / unknown
        return None
    return "ct" if name == "ct" else "other"


def detect_modality(array: np.ndarray, modality: str | None = None) -> tuple[str, str]:
    """("ct" | "ct_offset" | "other", why). ct_offset: a CT whose values are not Hounsfield units (stored
    unsigned, no RescaleIntercept): HU = value - CT_OFFSET is assumed. Raises for an image no default fits."""
    sample = _sample(array)
    if sample.size == 0:
        raise InputError("the image holds no finite intensities; no normalisation can be chosen")
    if float(sample.min()) == float(sample.max()):
        raise InputError(f"cannot choose a normalisation automatically: every voxel is {float(sample[0]):g}; "
                         "give a window (level, width) or a preset")
    declared = _declared(modality)
    air = float(np.mean((sample >= AIR_HU[0]) & (sample <= AIR_HU[1])))
    if declared == "ct":
        if float(sample.min()) >= 0 and air < MIN_AIR_SHARE:
            return "ct_offset", (f"CT per the file's metadata but not in Hounsfield units (no value below 0): "
                                 f"assumed HU = value - {CT_OFFSET:g}")
        return "ct", "CT per the file's metadata"
    if declared == "other":
        return "other", f"{str(modality).strip()} per the file's metadata, not CT"
    if air >= MIN_AIR_SHARE:
        return "ct", f"CT ({100 * air:.0f} % of voxels at air, -1000 HU)"
    return "other", ("not CT in Hounsfield units (no air at -1000 HU; a CT stored with an offset needs a window "
                     "or preset in its own values)")


# ---- the resolver ---------------------------------------------------------------------------------------
def default_rule(backbone: str = "lite_medsam") -> dict:
    """The backbone's training convention as a storable rule: its CT window for CT, percentiles otherwise."""
    from .models.backbones import input_convention

    convention = input_convention(backbone)
    level, width = convention.ct_window
    low_pct, high_pct = convention.other_percentiles
    return {"kind": "auto", "ct": {"kind": "window", "level": level, "width": width},
            "other": {"kind": "percentiles", "low_pct": low_pct, "high_pct": high_pct,
                      "voxels": convention.other_voxels}}


def choose_normalization(array: np.ndarray, window_level_width=None, preset: str | None = None, *,
                         adapter_rule: dict | None = None, modality: str | None = None,
                         backbone: str = "lite_medsam") -> Normalization:
    """The one resolver: explicit window > preset > the adapter's stored rule > the backbone's default for the
    scan's modality (see module docstring). modality: the file's declared modality ("CT", "MR", a channel name;
    None or "auto" = decide from the data). The result's ``description`` says what was chosen and why."""
    if window_level_width is not None and preset is not None:
        raise InputError("give either a window or a preset, not both")
    if window_level_width is not None:
        if len(window_level_width) != 2:
            raise InputError(f"a window is (level, width), got {tuple(window_level_width)}")
        return window(*window_level_width).with_reason("the window given")
    if preset is not None:
        if preset not in CT_WINDOWS:
            raise InputError(f"unknown CT window preset '{preset}'; choose one of {', '.join(CT_WINDOWS)}")
        return window(*CT_WINDOWS[preset]).with_reason(f"preset {preset}")
    rule = default_rule(backbone)
    if adapter_rule:
        if adapter_rule.get("kind") == "window" and detect_modality(array, modality)[0] == "other":
            # A window is in Hounsfield units: it means nothing on an MR, so the backbone's own default serves.
            chosen = from_rule(array, rule, modality)
            return chosen.with_reason(f"automatic: {chosen.reason}; the adapter's CT window does not apply to a "
                                      f"scan that is not CT; {backbone}'s MR/other default", rule,
                                      adapter_applies=False)
        chosen = from_rule(array, adapter_rule, modality)
        return chosen.with_reason("the adapter's stored rule" + (f"; {chosen.reason}" if chosen.reason else ""))
    found, why = detect_modality(array, modality)
    chosen = from_rule(array, rule, modality)
    default = "CT default" if found != "other" else "MR/other default"
    return chosen.with_reason(f"automatic: {why}; {backbone}'s {default}", rule)


def rule_for_training(window_level_width=None, preset: str | None = None, backbone: str = "lite_medsam") -> dict:
    """The rule an adapter stores: the user's window or preset, else the backbone's automatic default."""
    if window_level_width is None and preset is None:
        return default_rule(backbone)
    return choose_normalization(np.zeros(1), window_level_width, preset).rule_dict()


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
