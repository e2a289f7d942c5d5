"""``segmote eval``: per-segment Dice and normalised surface Dice of a prediction against ground truth.

Segments are matched by name (a label map's segments are named ``label N``). Both files must lie on one voxel grid
(a Slicer segmentation cropped to its extent is pasted into the ground truth's grid; any other mismatch is a
one-line error naming both geometries). Dice is the project's one rule, ``segmote_core.metrics.dice`` (equal to
MONAI's ``compute_dice``; tests compare them); surface Dice is ``monai.metrics.compute_surface_dice`` with the voxel
spacing in millimetres, so the surface tolerance is physical.

Conventions: both masks empty -> Dice 1 and surface Dice 1 (nothing to find, nothing found); a ground-truth segment
without a prediction of the same name scores 0 and is flagged ``missing``; predicted segments without ground truth
are listed as ``unmatched`` and not scored.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputError
from .metrics import dice

DEFAULT_TOLERANCE_MM = 2.0


@dataclass
class SegmentScore:
    name: str
    dice: float
    surface_dice: float
    gt_volume_ml: float
    pred_volume_ml: float
    missing: bool = False


def dice_score(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two bool masks (any dimension); 1.0 when both are empty (``segmote_core.metrics.dice``)."""
    return dice(pred, gt)


def surface_dice_score(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> float:
    """MONAI normalised surface Dice of two bool masks; ``spacing`` in the arrays' axis order (mm).

    The share of both boundaries that lies within ``tolerance_mm`` of the other boundary; 1.0 when both masks are
    empty, 0.0 when exactly one is.
    """
    try:
        from monai.metrics import compute_surface_dice
    except ModuleNotFoundError:
        raise InputError("surface Dice needs MONAI: pip install 'segmote[eval]'") from None

    if tolerance_mm < 0 or not math.isfinite(tolerance_mm):
        raise InputError(f"the surface tolerance must be a finite number of mm >= 0, got {tolerance_mm}")
    pred_t, gt_t = _as_batch(pred), _as_batch(gt)
    if not gt_t.any() and not pred_t.any():
        return 1.0
    if not gt_t.any() or not pred_t.any():
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = compute_surface_dice(pred_t, gt_t, class_thresholds=[float(tolerance_mm)], include_background=True,
                                     distance_metric="euclidean", spacing=[float(s) for s in spacing])
    return float(value[0, 0])


def _as_batch(mask: np.ndarray) -> "torch.Tensor":
    """(spatial...) bool -> (1, 1, spatial...) float tensor, MONAI's (batch, channel, ...) layout."""
    import torch  # here, not at the top: `segmote --help` builds this command's parser without torch

    return torch.from_numpy(np.ascontiguousarray(mask, dtype=bool)).float()[None, None]


def evaluate_segments(pred: dict[str, np.ndarray], gt: dict[str, np.ndarray], spacing_kji: Sequence[float],
                      tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> tuple[list[SegmentScore], list[str]]:
    """Scores of every ground-truth segment (matched by name) and the names of unmatched predicted segments.

    Masks are (K, J, I) bool arrays on one grid; spacing_kji: voxel spacing in that axis order (mm).
    """
    voxel_ml = float(np.prod(spacing_kji)) / 1000.0
    scores = []
    for name, truth in gt.items():
        truth = np.asarray(truth, bool)
        if name in pred:
            guess = np.asarray(pred[name], bool)
            if guess.shape != truth.shape:
                raise InputError(f"segment {name!r}: prediction shape {guess.shape} differs from ground truth "
                                 f"{truth.shape}")
            scores.append(SegmentScore(name, dice_score(guess, truth),
                                       surface_dice_score(guess, truth, spacing_kji, tolerance_mm),
                                       truth.sum() * voxel_ml, guess.sum() * voxel_ml))
        else:
            scores.append(SegmentScore(name, 0.0, 0.0, truth.sum() * voxel_ml, 0.0, missing=True))
    unmatched = [name for name in pred if name not in gt]
    return scores, unmatched


def evaluate_files(pred_path: str | Path, gt_path: str | Path, tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> dict:
    """Read both files, put the prediction on the ground truth's grid and score every segment (a JSON dict)."""
    from .datasets import on_image_grid
    from .segmentation_io import read_segments

    pred_path, gt_path = Path(pred_path), Path(gt_path)
    gt_grid, gt_segments = read_segments(gt_path)
    pred_grid, pred_segments = read_segments(pred_path)
    try:
        pred = {s.name: on_image_grid(s.mask, pred_grid, gt_grid, pred_path) for s in pred_segments}
    except InputError:
        raise InputError(f"prediction {pred_path.name} and ground truth {gt_path.name} lie on different grids: "
                         f"prediction {pred_grid.describe_grid()}; ground truth {gt_grid.describe_grid()}") from None
    gt = {s.name: s.mask for s in gt_segments}
    scores, unmatched = evaluate_segments(pred, gt, gt_grid.spacing[::-1], tolerance_mm)
    scored = [s for s in scores if not s.missing]
    return {
        "prediction": str(pred_path), "ground_truth": str(gt_path), "tolerance_mm": tolerance_mm,
        "spacing_mm": [float(s) for s in gt_grid.spacing],
        "segments": [asdict(s) for s in scores],
        "mean_dice": float(np.mean([s.dice for s in scores])) if scores else None,
        "mean_surface_dice": float(np.mean([s.surface_dice for s in scores])) if scores else None,
        "matched": len(scored), "missing": [s.name for s in scores if s.missing], "unmatched": unmatched,
    }


def format_table(report: dict) -> str:
    width = max([len("segment")] + [len(s["name"]) for s in report["segments"]])
    tolerance = f"NSD@{report['tolerance_mm']:g}mm"
    lines = [f"{'segment':<{width}}  {'Dice':>6}  {tolerance:>10}  {'GT mL':>8}  {'pred mL':>8}"]
    for s in report["segments"]:
        note = "  (missing in prediction)" if s["missing"] else ""
        lines.append(f"{s['name']:<{width}}  {s['dice']:6.4f}  {s['surface_dice']:10.4f}  "
                     f"{s['gt_volume_ml']:8.1f}  {s['pred_volume_ml']:8.1f}{note}")
    if report["segments"]:
        lines.append(f"{'mean':<{width}}  {report['mean_dice']:6.4f}  {report['mean_surface_dice']:10.4f}")
    if report["unmatched"]:
        lines.append(f"not scored (no ground truth of that name): {', '.join(report['unmatched'])}")
    return "\n".join(lines)
