"""Simulated interaction: prompts sampled from the labels, clicks from the error regions, and label-free clicks
distilled from the frozen model's box answers."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from ..toolbox import mask_box
from .data import SliceItem


def sample_box(mask: np.ndarray, rng: np.random.Generator, jitter: float) -> np.ndarray:
    """Tight box (x0, y0, x1, y1) of a (H, W) mask, each edge moved outwards by up to ``jitter`` of its side."""
    x0, y0, x1, y1 = mask_box(mask)
    width, height = x1 - x0 + 1, y1 - y0 + 1
    grow = rng.uniform(0, jitter, 4) * np.array([width, height, width, height])
    h, w = mask.shape
    return np.array([max(x0 - grow[0], 0), max(y0 - grow[1], 0), min(x1 + grow[2], w - 1), min(y1 + grow[3], h - 1)])


def sample_point(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random pixel (x, y) inside a (H, W) mask."""
    ys, xs = np.nonzero(mask)
    pick = rng.integers(len(ys))
    return np.array([xs[pick], ys[pick]], dtype=float)


def centre_point(mask: np.ndarray) -> np.ndarray:
    """The pixel (x, y) of a mask farthest from its border (where a user clicks); first one on ties."""
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return np.array([x, y], dtype=float)


def error_click(prediction: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, int]:
    """Next click from the errors of a (h, w) prediction: the centre of the larger error region.

    Returns ((x, y) on the same grid, label 1 for a missed region or 0 for a false alarm). No error: a positive
    click at the target's centre (or a negative one at the prediction's, if the target is empty)."""
    missed, false = target & ~prediction, prediction & ~target
    if not missed.any() and not false.any():
        region, label = (target, 1) if target.any() else (prediction if prediction.any() else ~target, 0)
    elif missed.sum() >= false.sum():
        region, label = missed, 1
    else:
        region, label = false, 0
    return centre_point(region), label


# Label-free click targets: random boxes (sides 8-50 % of the slice) anywhere in the slice; the base model's mask
# for a box becomes the target of a click inside it when the base model is confident (predicted IoU) and the mask
# is a real object (area) that is not mostly one of the trained classes (those have their own labelled targets).
DISTILL_BOX_SIDES = (0.08, 0.5)
DISTILL_MIN_IOU = 0.7
DISTILL_MIN_AREA = 16  # low-res (256x256) pixels
DISTILL_MAX_CLASS_OVERLAP = 0.5
DISTILL_CANDIDATES = 2  # boxes drawn per wanted click (each costs a base decoder pass)


def random_box(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A box (x0, y0, x1, y1) on a (H, W) slice grid, each side a random share of the slice, placed anywhere."""
    h, w = shape
    bw, bh = rng.uniform(*DISTILL_BOX_SIDES, 2) * np.array([w, h])
    x0, y0 = rng.uniform(0, w - 1 - bw), rng.uniform(0, h - 1 - bh)
    return np.array([x0, y0, x0 + bw, y0 + bh])


@torch.no_grad()
def distillation_prompts(backbone, embedding: torch.Tensor, items: list[SliceItem], targets: torch.Tensor,
                         count: int, rng: np.random.Generator):
    """Self-distilled click prompts: up to ``count`` per slice, from the base model's answers to random boxes.

    embedding (B, 256, h, w); targets (B, classes, 256, 256) the trained classes' low-res labels. Returns
    (rows (n,) long, clicks (n, 1, 2) model-input xy, targets (n, 1, 256, 256) float) or None if no box passed.
    """
    device = embedding.device
    shape = items[0].masks.shape[1:]
    candidates = count * DISTILL_CANDIDATES
    rows = torch.arange(len(items), device=device).repeat_interleave(candidates)
    boxes = np.stack([random_box(shape, rng) for _ in range(len(rows))])
    boxes = backbone.slice_to_model_xy(torch.as_tensor(boxes, dtype=torch.float32, device=device).view(-1, 2, 2),
                                       shape).view(-1, 4)
    # SAM's decoder takes one image with many prompts: one call per slice.
    answers = [backbone.decode(embedding[row : row + 1], boxes=boxes[row * candidates : (row + 1) * candidates],
                               multimask=False) for row in range(len(items))]
    logits, iou = torch.cat([a[0] for a in answers]), torch.cat([a[1] for a in answers])
    masks = logits[:, 0] > 0  # (n, 256, 256)
    area = masks.flatten(1).sum(1)
    trained = targets.bool().any(dim=1)[rows]  # (n, 256, 256)
    overlap = (masks & trained).flatten(1).sum(1) / area.clamp(min=1)
    usable = ((iou[:, 0] >= DISTILL_MIN_IOU) & (area >= DISTILL_MIN_AREA)
              & (overlap <= DISTILL_MAX_CLASS_OVERLAP)).cpu().numpy()
    low_to_model = backbone.input_size / masks.shape[-1]
    keep, clicks = [], []
    for row in range(len(items)):
        chosen = [i for i in range(row * candidates, (row + 1) * candidates) if usable[i]][:count]
        for i in chosen:
            mask = masks[i].cpu().numpy()
            inner = ndimage.binary_erosion(mask, iterations=2)
            keep.append(i)
            clicks.append((sample_point(inner if inner.any() else mask, rng) + 0.5) * low_to_model - 0.5)
    if not keep:
        return None
    keep_index = torch.tensor(keep, device=device)
    clicks = torch.tensor(np.stack(clicks), dtype=torch.float32, device=device)[:, None]
    return rows[keep_index], clicks, masks[keep_index].unsqueeze(1).float()
