"""Losses, and the objective of one step (a module, so that DistributedDataParallel can wrap it)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models.segmote import SegMoTE
from .config import TrainConfig
from .data import SliceItem
from .prompts import distillation_prompts, error_click, sample_box, sample_point


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss (SAM's weights), mean over pixels and batch."""
    logits, target = logits.float(), target.float()
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    return (loss * (alpha * target + (1 - alpha) * (1 - target))).mean()


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per mask, mean over the batch."""
    p = torch.sigmoid(logits.float()).flatten(1)
    t = target.float().flatten(1)
    return (1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


def iou_of(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) IoU of the thresholded logits with the target (no gradient); 1 when both are empty."""
    pred = (logits.detach() > 0).flatten(1)
    t = target.bool().flatten(1)
    inter, union = (pred & t).sum(1).float(), (pred | t).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


class Objective(nn.Module):
    """The loss of one step; a module so that DistributedDataParallel can wrap it (adapters are its parameters)."""

    def __init__(self, model: SegMoTE, config: TrainConfig):
        super().__init__()
        self.model = model
        self.config = config

    def mask_terms(self, logits, target, iou=None) -> dict[str, torch.Tensor]:
        terms = {"focal": focal_loss(logits, target), "dice": dice_loss(logits, target)}
        if iou is not None:
            terms["iou"] = F.mse_loss(iou.float().view(-1), iou_of(logits, target))
        return terms

    def weighted(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        c = self.config
        weights = {"focal": c.focal_weight, "dice": c.dice_weight, "iou": c.iou_weight,
                   "objectness": c.objectness_weight}
        return sum(weights[k] * v for k, v in terms.items())

    def forward(self, embedding, early, targets, items: list[SliceItem], rng: np.random.Generator,
                auto_classes: list[int]) -> dict[str, torch.Tensor]:
        """embedding (B, 256, h, w), early (B, C, h, w), targets (B, classes, 256, 256) -> named loss terms."""
        c, model, backbone = self.config, self.model, self.model.backbone
        zero = embedding.new_zeros((), dtype=torch.float32)
        out = {"loss": zero, "prompted": zero, "automatic": zero, "balance": zero}
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("focal", "dice", "iou", "objectness")}

        # ---- prompted, with simulated interaction ------------------------------------------------------
        chosen = [(row, int(rng.choice(item.prompt_classes))) for row, item in enumerate(items) if item.prompt_classes]
        if c.prompted and chosen:
            rows = torch.tensor([r for r, _ in chosen], device=embedding.device)
            emb, ear = embedding[rows], early[rows]
            target = torch.stack([targets[r, k] for r, k in chosen]).unsqueeze(1)  # (b, 1, 256, 256)
            masks = [items[r].masks[k] for r, k in chosen]
            shape = masks[0].shape
            to_model = lambda xy: backbone.slice_to_model_xy(  # noqa: E731
                torch.as_tensor(np.asarray(xy), dtype=torch.float32, device=embedding.device), shape)
            points = labels = boxes = mask_input = None
            if rng.random() < c.box_probability:
                boxes = to_model(np.stack([sample_box(m, rng, c.box_jitter) for m in masks]).reshape(-1, 2, 2))
                boxes = boxes.view(-1, 4)
            else:
                points = to_model(np.stack([sample_point(m, rng) for m in masks])[:, None])
                labels = torch.ones(len(chosen), 1, dtype=torch.int64, device=embedding.device)
            losses = []
            low_to_model = backbone.input_size / target.shape[-1]
            for interaction in range(c.interaction_steps + 1):
                result = model.decode(emb, ear, points, labels, boxes, mask_input)
                terms = self.mask_terms(result.logits, target, result.iou)
                for k, v in terms.items():
                    parts[k].append(v)
                losses.append(self.weighted(terms))
                out["balance"] = out["balance"] + result.balance_loss
                if interaction == c.interaction_steps:
                    break
                predicted = (result.logits.detach()[:, 0] > 0).cpu().numpy()
                truth = target[:, 0].bool().cpu().numpy()
                clicks = [error_click(p, t) for p, t in zip(predicted, truth)]
                xy = torch.tensor(np.stack([(p + 0.5) * low_to_model - 0.5 for p, _ in clicks]),
                                  dtype=torch.float32, device=embedding.device)[:, None]
                new_labels = torch.tensor([[lab] for _, lab in clicks], dtype=torch.int64, device=embedding.device)
                points = xy if points is None else torch.cat([points, xy], dim=1)
                labels = new_labels if labels is None else torch.cat([labels, new_labels], dim=1)
                mask_input = result.logits.detach()
            out["prompted"] = torch.stack(losses).mean()

        # ---- label-free clicks: the base model's box answers anywhere in the slice as click targets -----------
        distilled = (distillation_prompts(backbone, embedding, items, targets, c.distill_clicks, rng)
                     if c.prompted and c.distill_clicks else None)
        if distilled is not None:
            rows, clicks, target = distilled
            labels = torch.ones(len(rows), 1, dtype=torch.int64, device=embedding.device)
            result = model.decode(embedding[rows], early[rows], clicks, labels)
            terms = self.mask_terms(result.logits, target, result.iou)
            for k, v in terms.items():
                parts[k].append(v)
            out["prompted"] = out["prompted"] + c.distill_weight * self.weighted(terms)
            out["balance"] = out["balance"] + result.balance_loss

        # ---- automatic (PPT), for the classes drawn for this step ---------------------------------------
        if c.automatic:
            class_losses = []
            for auto_class in auto_classes:
                result = model.auto_decode(embedding, early, auto_class, refine_passes=c.refine_passes)
                target = targets[:, auto_class : auto_class + 1]
                present = target.flatten(1).any(dim=1)
                objectness = F.binary_cross_entropy_with_logits(result.objectness_logit.float(), present.float())
                parts["objectness"].append(objectness)
                loss = c.objectness_weight * objectness
                if present.any():
                    final = self.mask_terms(result.logits[present], target[present], result.iou[present])
                    coarse = self.mask_terms(result.coarse_logits[present], target[present])
                    for terms in (final, coarse):
                        for k, v in terms.items():
                            parts[k].append(v)
                    loss = loss + 0.5 * (self.weighted(final) + self.weighted(coarse))
                class_losses.append(loss)
                out["balance"] = out["balance"] + result.balance_loss
            out["automatic"] = torch.stack(class_losses).mean()

        out["loss"] = out["prompted"] + out["automatic"] + c.balance_weight * out["balance"]
        for k, values in parts.items():
            out[k] = torch.stack(values).mean().detach() if values else zero
        return out


def compute_losses(objective, embedding, early, targets, items, rng, auto_classes) -> dict[str, torch.Tensor]:
    """One forward pass of the objective (a module-level function, so that tests can make it misbehave)."""
    return objective(embedding, early, targets, items, rng, auto_classes)

