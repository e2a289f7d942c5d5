"""Boxes from masks and from clicks: what the engine prompts LiteMedSAM-style decoders with.

LiteMedSAM (and MedSAM) were trained with boxes only: one positive click gives an empty mask (Dice about 0.01 on
the chest CT), while a box gives a good one on almost any structure. So ``Engine.predict_slice`` answers clicks
with the box around the object under them:

1. ``class_under_clicks``: with an adapter that applies to the scan, the automatic (PPT) mask of one of its
   classes on that slice, if it holds every positive click and no negative one (the user clicked on a structure
   the adapter knows); the parts of that mask under the positive clicks are the answer.
2. ``search_box``: otherwise the frozen decoder with square boxes of growing size around the positive clicks
   (``CLICK_BOX_SIDES``); of the answers that hold every positive click, no negative one, and whose intensities
   include the clicked pixels', the one the model is surest of (predicted IoU), refined with the box around it
   (``CLICK_BOX_REFINES``). No labels and no training: it asks the decoder the question it was trained for.
3. Nothing found: the decoder's own answer to the clicks.

Measured in docs/training.md ("One click").
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import numpy as np
from scipy import ndimage

from .toolbox import mask_box

# Sides of the square boxes tried around the clicks, as shares of the slice's longer side (8 to 96 pixels on a
# 128-pixel slice): from a small structure to half a chest.
CLICK_BOX_SIDES = (1 / 16, 3 / 32, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 3 / 4)
CLICK_BOX_REFINES = 2  # passes with the box around the chosen mask (a box centred on a click is not the object's)
REFINE_TOLERANCE = 0.02  # a refined answer may be this much less sure and still replace the one before
BOX_MARGIN = (3.0, 0.05)  # pixels, share of the box's longer side: the margin is the larger
# A clicked pixel must look like the answer: its normalised intensity within the answer's 5th-95th percentiles,
# widened by this much (a click on the air of a lung apex is not answered with the chest wall around it).
INTENSITY_SLACK = 0.05


class Answer(Protocol):
    mask: np.ndarray  # bool (H, W)
    score: float  # predicted IoU


def loose_box(mask: np.ndarray) -> np.ndarray | None:
    """The box around a mask with BOX_MARGIN: SAM-family models were trained on slightly loose boxes."""
    tight = mask_box(mask)
    if tight is None:
        return None
    return mask_box(mask, margin=max(BOX_MARGIN[0], BOX_MARGIN[1] * max(tight[2] - tight[0], tight[3] - tight[1])))


def _pixels(points: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of (N, 2) slice xy points, rounded and kept on the slice."""
    cols = np.clip(np.round(points[:, 0]).astype(int), 0, shape[1] - 1)
    rows = np.clip(np.round(points[:, 1]).astype(int), 0, shape[0] - 1)
    return rows, cols


def fits_clicks(mask: np.ndarray, positives: np.ndarray, negatives: np.ndarray) -> bool:
    """Whether a mask holds every positive click and no negative one."""
    if not mask.any():
        return False
    if not mask[_pixels(positives, mask.shape)].all():
        return False
    return not (len(negatives) and mask[_pixels(negatives, mask.shape)].any())


def split_clicks(points, labels) -> tuple[np.ndarray, np.ndarray]:
    points = np.asarray(points, dtype=float).reshape(-1, 2)
    labels = np.asarray(labels).reshape(-1)
    return points[labels == 1], points[labels == 0]


def parts_under(mask: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """The connected parts of a 2-D mask that hold a positive click (an automatic mask may have other islands)."""
    parts, _ = ndimage.label(mask)
    wanted = np.unique(parts[_pixels(positives, mask.shape)])
    return np.isin(parts, wanted[wanted > 0])


def class_under_clicks(class_answers: Sequence[Answer], points, labels) -> tuple[int, np.ndarray, float] | None:
    """(class position, mask, predicted IoU) of the first class answer that fits the clicks, or None."""
    positives, negatives = split_clicks(points, labels)
    if not len(positives):
        return None
    for position, answer in enumerate(class_answers):
        if answer is not None and fits_clicks(answer.mask, positives, negatives):
            return position, parts_under(answer.mask, positives), answer.score
    return None


def looks_like(mask: np.ndarray, image: np.ndarray, positives: np.ndarray) -> bool:
    """Whether every positive click's intensity lies within the mask's 5th-95th percentiles (plus slack)."""
    low, high = np.percentile(image[mask], [5, 95])
    clicked = image[_pixels(positives, mask.shape)]
    return bool(((clicked >= low - INTENSITY_SLACK) & (clicked <= high + INTENSITY_SLACK)).all())


def search_box(decode_box: Callable[[np.ndarray], Answer], image: np.ndarray, points, labels,
               decode_boxes: Callable[[np.ndarray], Sequence[Answer]] | None = None) -> Answer | None:
    """The box decoder's surest answer that fits the clicks, over boxes of growing size around them; None if none
    fits. decode_box: box (x0, y0, x1, y1) on the slice grid -> an answer with ``mask`` and ``score``; image: the
    slice as the decoder sees it (normalised, 0..1); decode_boxes: (B, 4) boxes -> their B answers in one call
    (``Engine.decode_boxes``), the same answers as decode_box one by one, faster; when given, every box of the
    search goes to it."""
    positives, negatives = split_clicks(points, labels)
    if not len(positives):
        return None
    if decode_boxes is None:
        decode_boxes = lambda many: [decode_box(box) for box in many]  # noqa: E731

    def fits(mask):
        return fits_clicks(mask, positives, negatives) and looks_like(mask, image, positives)

    best = None
    for answer in decode_boxes(candidate_boxes(positives, image.shape)):
        if fits(answer.mask) and (best is None or answer.score > best.score):
            best = answer
    for _ in range(CLICK_BOX_REFINES if best is not None else 0):
        answer = decode_boxes(loose_box(best.mask)[None])[0]
        if fits(answer.mask) and answer.score >= best.score - REFINE_TOLERANCE:
            best = answer
    return best


def candidate_boxes(positives: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(len(CLICK_BOX_SIDES), 4) square boxes of growing size around the positive clicks, kept on the slice."""
    height, width = shape
    (x0, y0), (x1, y1) = positives.min(axis=0), positives.max(axis=0)
    half = np.asarray(CLICK_BOX_SIDES)[:, None] * max(height, width) / 2
    return np.hstack([np.maximum(x0 - half, 0), np.maximum(y0 - half, 0),
                      np.minimum(x1 + half, width - 1), np.minimum(y1 + half, height - 1)])
