"""SDPA attention in SAM ViT encoders equals segment-anything's own attention (same weights, same state dict)."""

import torch

from segmote_core.models.backbones import SDPAAttention, build_tiny_sam_vit, use_sdpa


def test_sdpa_attention_equals_sam_attention_with_relative_positions():
    torch.manual_seed(0)
    backbone = build_tiny_sam_vit().eval()
    with torch.no_grad():
        for name, param in backbone.named_parameters():
            if "rel_pos" in name:  # zero at init; random so that the bias path is exercised
                param.normal_(0, 0.5)
    assert all(isinstance(b.attn, SDPAAttention) for b in backbone.image_encoder.blocks)  # on by default
    x = torch.randn(2, 3, 256, 256)
    with torch.inference_mode():
        fast = backbone.encode(x)
        assert use_sdpa(backbone.image_encoder, enabled=False) == 2
        reference = backbone.encode(x)
    for a, b in zip(fast, reference):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    assert set(backbone.state_dict()) == set(build_tiny_sam_vit().state_dict())
