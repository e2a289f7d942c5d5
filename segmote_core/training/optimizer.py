"""The optimiser (AdamW over the adapter parameters only) and its learning-rate schedule."""

from __future__ import annotations

import math

import torch

from ..models.segmote import SegMoTE
from .config import TrainConfig


FAST_PARAMETERS = ("mote.residual_scale", "ppt.class_tokens")


def build_optimizer(model: SegMoTE, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the parameters that require grad; no decay on biases, norms, tokens and scalar scales.

    Two tensors gate everything behind them and start at (or near) zero: MoTE's residual scales (zero, they multiply
    the expert masks) and PPT's class tokens (std 0.02, the only class-specific input of PPT, next to image features
    of order 1 — until they grow, every class gets nearly the same prompt). With Adam every tensor moves by about lr
    per step, so these are slow to matter; ``fast_lr_multiplier`` gives them a larger learning rate (useful for
    short runs, e.g. LiteMedSAM with a click, whose own mask is poor)."""
    decay, no_decay, scales = [], [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if name in FAST_PARAMETERS:
            scales.append(parameter)
            continue
        plain = parameter.dim() < 2 or "norm" in name or "tokens" in name
        (no_decay if plain else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0},
              {"params": scales, "weight_decay": 0.0, "lr": config.lr * config.fast_lr_multiplier}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=(0.9, 0.999))


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to min_lr_ratio at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
