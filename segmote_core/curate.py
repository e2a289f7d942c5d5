"""Curation: score every (slice, label) sample, keep a small balanced high-quality subset, say why for the rest.

The paper trains on "MedSeg-HQ", under 1% of the usual corpora, kept after quality screening. This module is that
screening, made explicit and reproducible. Each sample is one axial slice of one case with one class's mask:

| score | what it is | filter |
|---|---|---|
| ``clarity`` | variance of the Laplacian of the normalised slice (blur lowers it) | ``>= min_clarity`` |
| ``contrast`` | RMS contrast: standard deviation of the normalised intensities | ``>= min_contrast`` |
| ``entropy`` | Shannon entropy (bits) of a 64-bin histogram of the normalised slice | ``>= min_entropy`` |
| ``foreground_ratio`` | mask pixels / slice pixels | in ``[min_foreground, max_foreground]`` |
| ``components`` | 8-connected components of the mask | ``<= max_components`` |
| ``area`` / ``smallest_component`` | mask pixels / pixels of its smallest component | ``area >= min_area`` |
| ``duplicate_of`` | an earlier kept slice of the same case and class that looks the same | distance ``>= duplicate_threshold`` |

Near-duplicates: the distance of two samples is the mean absolute difference of their 32x32 image thumbnails plus
that of their 32x32 mask thumbnails; samples are visited in slice order and one closer than ``duplicate_threshold``
to an already kept sample of its case and class is rejected as its duplicate.

Budget: ``budget`` (a count) or ``fraction`` (of the samples that pass every filter) keeps the best ones, balanced
over (modality, class) groups: groups take turns (round robin) in giving up their best remaining sample. Quality is
the mean percentile rank of clarity, contrast and entropy among the passing samples.

The manifest (JSON, or CSV by file suffix) lists every sample with every score, ``kept`` and the reason for every
rejection (the first failed filter; ``failed`` lists them all). A curation that keeps nothing is an ``InputError``
whose one line says how many samples each filter removed.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .errors import InputError
from .files import atomic_write, atomic_write_text
from .normalize import choose_normalization, normalize, rule_for_training

HISTOGRAM_BINS = 64
THUMBNAIL = 32
FILTERS = ("empty", "clarity", "contrast", "entropy", "foreground", "components", "min_area", "duplicate", "budget")


@dataclass
class CurationConfig:
    """Thresholds of the filters and the size of the kept subset (see the module docstring)."""

    min_clarity: float = 1e-4
    min_contrast: float = 0.02
    min_entropy: float = 1.0
    min_foreground: float = 1e-4
    max_foreground: float = 0.95
    max_components: int = 10
    min_area: int = 10
    duplicate_threshold: float = 0.005
    budget: int | None = None
    fraction: float | None = None

    def __post_init__(self):
        if self.budget is not None and self.fraction is not None:
            raise InputError("give a budget (a count) or a fraction, not both")
        if self.budget is not None and self.budget < 1:
            raise InputError(f"budget must be 1 or more, got {self.budget}")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise InputError(f"fraction must be in (0, 1], got {self.fraction}")


@dataclass
class Sample:
    """One (case, slice, class) sample with its scores and the curation verdict."""

    case: str
    slice: int
    label: str
    modality: str
    clarity: float
    contrast: float
    entropy: float
    foreground_ratio: float
    components: int
    area: int
    smallest_component: int
    duplicate_of: int | None = None
    quality: float | None = None
    kept: bool = False
    reason: str = ""
    failed: list[str] = field(default_factory=list)

    def row(self) -> dict:
        row = dataclasses.asdict(self)
        row["failed"] = ";".join(self.failed)
        return row


@dataclass
class CurationResult:
    samples: list[Sample]
    config: CurationConfig
    normalization: dict
    axis: str = "axial"

    @property
    def kept(self) -> list[Sample]:
        return [s for s in self.samples if s.kept]

    def removed_by(self) -> dict[str, int]:
        """How many samples each filter removed (counted by each sample's first failed filter)."""
        counts = {name: 0 for name in FILTERS}
        for sample in self.samples:
            if not sample.kept:
                counts[sample.failed[0]] += 1
        return {name: count for name, count in counts.items() if count}

    def summary(self) -> dict:
        groups: dict[str, int] = {}
        for sample in self.kept:
            key = f"{sample.modality}/{sample.label}"
            groups[key] = groups.get(key, 0) + 1
        return {"samples": len(self.samples), "kept": len(self.kept), "removed_by": self.removed_by(),
                "kept_by_group": groups}

    def write(self, path: str | Path) -> Path:
        """The manifest: JSON (config, normalisation, summary, samples) or, for a .csv path, one row per sample."""
        path = Path(path)
        if path.suffix.lower() == ".csv":
            def write_csv(temporary: Path):
                with open(temporary, "w", newline="", encoding="utf-8") as handle:
                    writer = csv.DictWriter(handle, fieldnames=[f.name for f in dataclasses.fields(Sample)])
                    writer.writeheader()
                    for sample in self.samples:
                        writer.writerow(sample.row())
            return atomic_write(path, write_csv)
        document = {"format": "segmote-curation", "version": 1, "axis": self.axis,
                    "config": dataclasses.asdict(self.config), "normalization": self.normalization,
                    "summary": self.summary(), "samples": [s.row() for s in self.samples]}
        return atomic_write_text(path, json.dumps(document, indent=1))


# ---- scores ----------------------------------------------------------------------------------------------
def image_scores(image01: np.ndarray) -> dict[str, float]:
    """clarity (variance of the Laplacian), contrast (std), entropy (bits) of one normalised slice."""
    from scipy import ndimage
    image = np.asarray(image01, dtype=np.float64)
    histogram, _ = np.histogram(image, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    p = histogram[histogram > 0] / max(histogram.sum(), 1)
    return {
        "clarity": float(ndimage.laplace(image).var()),
        "contrast": float(image.std()),
        "entropy": float(-(p * np.log2(p)).sum()),
    }


def mask_scores(mask: np.ndarray) -> dict[str, float | int]:
    """foreground_ratio, components (8-connected), area and smallest_component (pixels) of one 2-D mask."""
    from scipy import ndimage
    mask = np.asarray(mask, dtype=bool)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.reshape(-1))[1:] if count else np.zeros(0, int)
    return {
        "foreground_ratio": float(mask.mean()),
        "components": int(count),
        "area": int(mask.sum()),
        "smallest_component": int(sizes.min()) if count else 0,
    }


def thumbnail(array: np.ndarray) -> np.ndarray:
    """A THUMBNAIL x THUMBNAIL float version of a 2-D array (area averaging), for near-duplicate checks."""
    from scipy import ndimage
    array = np.asarray(array, dtype=np.float32)
    zoom = (THUMBNAIL / array.shape[0], THUMBNAIL / array.shape[1])
    small = ndimage.zoom(array, zoom, order=1, prefilter=False, grid_mode=True, mode="nearest")
    return small[:THUMBNAIL, :THUMBNAIL]


def score_volume(case: str, modality: str, slices01: np.ndarray, masks: dict[str, np.ndarray],
                 config: CurationConfig) -> list[Sample]:
    """Score every (slice, class) sample of one case and apply the per-sample filters.

    slices01: (N, H, W) normalised slices; masks: {class: (N, H, W) bool} on the same slices.
    """
    images = [image_scores(s) for s in slices01]
    thumbs = [thumbnail(s) for s in slices01]
    samples = []
    for label, stack in masks.items():
        kept_thumbs: list[tuple[int, np.ndarray, np.ndarray]] = []
        for index in range(len(slices01)):
            sample = Sample(case, index, label, modality, **images[index], **mask_scores(stack[index]))
            sample.failed = _failed_filters(sample, config)
            if not sample.failed:
                mask_thumb = thumbnail(stack[index])
                for other, other_image, other_mask in kept_thumbs:
                    distance = float(np.abs(thumbs[index] - other_image).mean() + np.abs(mask_thumb - other_mask).mean())
                    if distance < config.duplicate_threshold:
                        sample.duplicate_of = other
                        sample.failed = ["duplicate"]
                        break
                else:
                    kept_thumbs.append((index, thumbs[index], mask_thumb))
            samples.append(sample)
    return samples


def _failed_filters(sample: Sample, config: CurationConfig) -> list[str]:
    failed = []
    if sample.area == 0:
        failed.append("empty")
    if sample.clarity < config.min_clarity:
        failed.append("clarity")
    if sample.contrast < config.min_contrast:
        failed.append("contrast")
    if sample.entropy < config.min_entropy:
        failed.append("entropy")
    if sample.area and not config.min_foreground <= sample.foreground_ratio <= config.max_foreground:
        failed.append("foreground")
    if sample.components > config.max_components:
        failed.append("components")
    if sample.area and sample.area < config.min_area:
        failed.append("min_area")
    return failed


def _reason(sample: Sample, config: CurationConfig) -> str:
    first = sample.failed[0]
    texts = {
        "empty": "empty: the class is absent from this slice",
        "clarity": f"clarity {sample.clarity:.3g} < {config.min_clarity:g} (blurred or flat slice)",
        "contrast": f"contrast {sample.contrast:.3g} < {config.min_contrast:g}",
        "entropy": f"entropy {sample.entropy:.3g} bits < {config.min_entropy:g}",
        "foreground": (f"foreground ratio {sample.foreground_ratio:.3g} outside "
                       f"[{config.min_foreground:g}, {config.max_foreground:g}]"),
        "components": f"{sample.components} connected components > {config.max_components}",
        "min_area": f"mask area {sample.area} px < {config.min_area}",
        "duplicate": f"near-duplicate of slice {sample.duplicate_of}",
    }
    return texts.get(first, first)


# ---- selection -------------------------------------------------------------------------------------------
def _percentile_ranks(values: Sequence[float]) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if len(values) <= 1:
        return np.ones(len(values))
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    return ranks / (len(values) - 1)


def select(samples: list[Sample], config: CurationConfig) -> None:
    """Set quality, kept and reason on every sample (in place): filters, then the balanced budget."""
    passing = [s for s in samples if not s.failed]
    if passing:
        quality = np.mean([_percentile_ranks([getattr(s, name) for s in passing])
                           for name in ("clarity", "contrast", "entropy")], axis=0)
        for sample, value in zip(passing, quality):
            sample.quality = round(float(value), 6)
    if config.budget is not None:
        budget = min(config.budget, len(passing))
    elif config.fraction is not None:
        budget = math.ceil(config.fraction * len(passing))
    else:
        budget = len(passing)
    groups: dict[tuple[str, str], list[Sample]] = {}
    for sample in passing:
        groups.setdefault((sample.modality, sample.label), []).append(sample)
    for members in groups.values():  # best first; ties in slice order, so the result is deterministic
        members.sort(key=lambda s: (-s.quality, s.case, s.slice))
    chosen: set[int] = set()
    turn = 0
    while len(chosen) < budget:
        for key in sorted(groups):
            if turn < len(groups[key]) and len(chosen) < budget:
                chosen.add(id(groups[key][turn]))
        turn += 1
    for key, members in groups.items():
        for rank, sample in enumerate(members, 1):
            if id(sample) in chosen:
                sample.kept, sample.reason = True, "kept"
            else:
                sample.failed = ["budget"]
                sample.reason = (f"budget: ranked {rank} of {len(members)} in group {key[0]}/{key[1]}, "
                                 f"{budget} kept in all")
    for sample in samples:
        if sample.failed and not sample.reason:
            sample.reason = _reason(sample, config)


def curate_arrays(volumes: Iterable[tuple[str, str, np.ndarray, dict[str, np.ndarray]]],
                  config: CurationConfig | None = None, normalization: dict | None = None) -> CurationResult:
    """Curate already-sliced data: (case id, modality, slices01 (N, H, W), {class: (N, H, W) mask}) per case."""
    config = config or CurationConfig()
    samples: list[Sample] = []
    for case, modality, slices01, masks in volumes:
        samples.extend(score_volume(case, modality, slices01, masks, config))
    select(samples, config)
    result = CurationResult(samples, config, normalization or {})
    if not result.kept:
        removed = ", ".join(f"{name} removed {count}" for name, count in result.removed_by().items()) or "no samples"
        raise InputError(f"curation kept nothing from {len(samples)} samples: {removed}")
    return result


def curate_cases(cases, config: CurationConfig | None = None, window=None, preset: str | None = None,
                 classes: Sequence[str] | None = None, rule: dict | None = None,
                 progress=None) -> CurationResult:
    """Curate dataset cases (``segmote_core.datasets.Case``): axial slices normalised by one rule."""

    def volumes():
        from .volume import SliceStack
        for number, case in enumerate(cases):
            volume, labels = case.load()
            norm = choose_normalization(volume.array, window, preset, adapter_rule=rule, modality=volume.modality)
            stack = SliceStack.for_axis(volume, None)
            slices01 = normalize(stack.to_stack(volume.array), norm)
            names = list(classes) if classes else list(labels)
            missing = [n for n in names if n not in labels]
            if missing:
                raise InputError(f"case {case.case_id} has no class {', '.join(map(repr, missing))}; "
                                 f"it has: {', '.join(labels)}")
            if progress:
                progress(number + 1, len(cases))
            yield case.case_id, case.modality, slices01, {n: stack.to_stack(labels[n]) for n in names}

    norm_rule = rule if rule and window is None and preset is None else rule_for_training(window, preset)
    return curate_arrays(volumes(), config, norm_rule)


def read_manifest(path: str | Path) -> set[tuple[str, int, str]]:
    """The kept (case, slice, class) samples of a manifest (JSON or CSV)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"curation manifest not found: {path}")
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
            return {(r["case"], int(r["slice"]), r["label"]) for r in rows if r["kept"] in ("True", "true", "1")}
        document = json.loads(path.read_text(encoding="utf-8"))
        return {(r["case"], int(r["slice"]), r["label"]) for r in document["samples"] if r["kept"]}
    except (OSError, KeyError, ValueError, TypeError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read curation manifest {path.name}: {' '.join(str(error).split())}") from None
