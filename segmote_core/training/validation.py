"""Validation during training: automatic (PPT) Dice per class on the validation slices."""

from __future__ import annotations

import torch

from ..models.segmote import SegMoTE
from .config import TrainConfig
from .data import SliceItem, to_batch
from .distributed import Dist


@torch.no_grad()
def validate(model: SegMoTE, items: list[SliceItem], classes: list[str], config: TrainConfig, ctx: Dist,
             device) -> dict[str, float]:
    """Per-class Dice of automatic segmentation (objectness-gated) on the validation slices.

    Dice is computed per case over all its validation slices (a 3-D Dice), then averaged over the cases that have
    the class or a prediction of it. Ranks share the slices and sum their counts."""
    cases = sorted({i.case for i in items})
    counts = torch.zeros(len(cases), len(classes), 3, dtype=torch.float64)  # intersection, predicted, truth
    mine = items[ctx.rank::ctx.world]
    model.eval()
    try:
        for start in range(0, len(mine), config.batch_size):
            batch = mine[start:start + config.batch_size]
            for shape in {i.masks.shape[1:] for i in batch}:
                group = [i for i in batch if i.masks.shape[1:] == shape]
                embedding, early, _ = to_batch(group, device)
                for k in range(len(classes)):
                    result = model.auto_decode(embedding, early, k, refine_passes=config.refine_passes)
                    full = model.backbone.postprocess(result.logits.float(), shape)[:, 0] > 0
                    found = (result.objectness >= 0.5).view(-1, 1, 1)
                    predicted = (full & found).cpu().numpy()
                    for row, item in enumerate(group):
                        truth = item.masks[k]
                        counts[cases.index(item.case), k] += torch.tensor(
                            [(predicted[row] & truth).sum(), predicted[row].sum(), truth.sum()], dtype=torch.float64)
    finally:
        model.train()
    ctx.all_reduce(counts)
    result = {}
    for k, name in enumerate(classes):
        inter, pred, truth = counts[:, k, 0], counts[:, k, 1], counts[:, k, 2]
        valid = (pred + truth) > 0
        scores = 2 * inter[valid] / (pred + truth)[valid]
        result[name] = float(scores.mean()) if valid.any() else float("nan")
    return result

