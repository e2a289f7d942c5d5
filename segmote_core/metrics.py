"""Overlap scores, one rule each, used by every command, report and benchmark that scores a mask.

Dice = 2|A ∩ B| / (|A| + |B|) over all voxels of two masks of any shape. Two empty masks score 1.0: there was
nothing to find and nothing was found (MONAI's ``compute_dice`` with ``ignore_empty=False`` agrees; tests compare
the two).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two bool masks of the same shape; 1.0 when both are empty."""
    prediction, truth = np.asarray(prediction, bool), np.asarray(truth, bool)
    if prediction.shape != truth.shape:
        raise ValueError(f"Dice of masks of different shapes: {prediction.shape} and {truth.shape}")
    total = int(prediction.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((prediction & truth).sum()) / total


def pooled_dice(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    """One Dice over several (prediction, truth) pairs, e.g. the slices of a volume (counts summed, not scores
    averaged); NaN when there are no pairs (nothing was measured), 1.0 when every mask is empty."""
    intersection = total = count = 0
    for prediction, truth in pairs:
        prediction, truth = np.asarray(prediction, bool), np.asarray(truth, bool)
        intersection += int((prediction & truth).sum())
        total += int(prediction.sum()) + int(truth.sum())
        count += 1
    if count == 0:
        return float("nan")
    return 1.0 if total == 0 else 2.0 * intersection / total
