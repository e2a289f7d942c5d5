"""SegMoTE: a frozen SAM-family backbone plus two small adapters, MoTE and PPT.

MoTE (mixture of token experts) lives in the mask decoder
-----------------------------------------------------------
``T`` learnable *expert tokens* (default 4) join SAM's query sequence (IoU token, mask tokens, prompt tokens) and
run through every block of the frozen TwoWayTransformer, with one difference: instead of the block's frozen MLP,
a float32 *router* picks for each expert token, per image, one of ``E`` low-rank experts (top-1; noisy Shazeer
gating while training, plain arg-max at inference; a straight-through estimator so the router gets gradient).

The expert tokens attend to the image and to every SAM token, but no SAM token and no image position attends to
them: they are left out of the keys of the SAM tokens' self-attention and of the image-to-token attention. The SAM
tokens and the image embedding therefore flow exactly as in the frozen decoder, so the base mask and IoU are the
frozen model's, bit for bit (``SegMoTE.decode`` at step 0 equals ``Backbone.decode(..., multimask=False)``).

Each expert token ``t`` turns into a mask through its own hypernetwork MLP applied to high-resolution features
(HQ-SAM recipe): the decoder's upscaled embedding (B, 32, 256, 256) plus the backbone's early feature map
(B, C, 64, 64) projected by two transposed convolutions to (B, 32, 256, 256).

How the final mask is chosen
----------------------------
As in the paper, the expert token whose top-1 router logit (last transformer block, noise-free) is highest is
selected, per image. Its mask enters as a learned residual on top of the frozen model's single-mask output::

    final_logits = base_logits + residual_scale[t*] * expert_logits[t*]
    final_iou    = base_iou    + iou_correction(expert_token[t*])

``residual_scale`` (one scalar per expert token) and ``iou_correction`` (Linear 256 -> 1) start at zero, so a fresh
adapter reproduces the base model; training grows the correction. The token selection uses a straight-through
estimator too (forward: hard one-hot; backward: softmax over the tokens' scores).

Note on the first optimiser steps: the residual scales and each expert's last layer start at zero, so gradient
reaches the adapter in stages. Step 1 moves the residual scales, the IoU correction, PPT and (through the balance
loss) the routers; step 2 adds the hypernetworks, the early-feature projection, the expert tokens and the experts'
last layers; from step 3 on the experts' first layers and the routers' task-loss gradient (straight-through) join.
This is the price of an exact step-0 identity.

Box prompts go to the frozen decoder
------------------------------------
A prompt that is a box alone (no positive or negative click; a mask prompt may come with it) returns the frozen
model's mask and IoU unchanged (``boxes_to_base``, on by default). LiteMedSAM was trained on boxes and is good with
them on any structure, while an adapter trained on a few classes learns a residual that fires on every prompt:
trained on the lungs of one CT, it dropped a box on the thoracic spine from Dice 0.55 to 0.003. Clicks, and a box
with clicks, are what the base model does poorly; they go through MoTE (training distils the base model's box
answers into clicks anywhere in the scan, see ``segmote_core.training.prompts``). The automatic path (PPT tokens plus
a box in the refinement pass) is the adapter's own and always uses MoTE.

PPT (progressive prompt tokens) makes the decoder prompt-free
-------------------------------------------------------------
Per class ``K`` learnable query tokens (default 2) attend over the image embedding plus the prompt encoder's dense
positional encoding (multi-head attention, then MLP, each with residual and LayerNorm). The resulting tokens are
the *sparse prompt embeddings* of the (MoTE) decoder, the dense prompt is the prompt encoder's no-mask embedding:
the automatic path uses SAM's unchanged prompt interface. Progressive: each refinement pass turns the previous
mask into a box (bounding box of logits > 0) plus a mask prompt (the low-res logits) and decodes again with the
class tokens plus that box. Objectness, per class per slice, is ``sigmoid(head([mean PPT token, IoU token]))``
where the IoU token is the decoder's output state in the coarse (first) pass. ``auto_coarse`` runs the first pass of
several classes on several slices in one decoder batch, ``auto_refine`` one refinement pass on any rows, and
``auto_decode`` (one class, training) is the two in sequence: the engine's fast paths export exactly these.

Balance loss: ``CV²(importance) + CV²(load)`` per block (see ``balance_loss``), summed over blocks and passes,
computed in training and returned next to the masks; the training loop weights it (paper: 0.01). At inference it is
not computed (a zero), and only the selected expert token's full-resolution mask is (``MixtureOfTokenExperts``).

Why one module of about 600 lines: MoTE and PPT share the decoder pass they are woven into (the step-0 identity
with the frozen decoder depends on both), so the model reads as one piece next to the paper.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, InputError
from .backbones import Backbone
from .sam import MLP, LayerNorm2d

# Lower bound of the gating noise's scale (the "noise_epsilon" of common noisy top-k implementations).
_NOISE_FLOOR = 1e-2


@dataclass(frozen=True)
class SegMoTEConfig:
    """Sizes of the adapters; stored in every adapter checkpoint's header."""

    num_classes: int = 1
    num_expert_tokens: int = 4
    num_experts: int = 4
    expert_rank: int = 32
    ppt_tokens_per_class: int = 2
    ppt_heads: int = 8
    ppt_mlp_dim: int = 1024
    early_hidden_channels: int = 64
    # A prompt that is a box alone (no click) gets the frozen decoder's answer: see "Box prompts" above.
    boxes_to_base: bool = True

    def __post_init__(self):
        for name in ("num_classes", "num_expert_tokens", "num_experts", "expert_rank", "ppt_tokens_per_class",
                     "ppt_heads", "ppt_mlp_dim", "early_hidden_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"SegMoTE config: {name} must be a positive integer, got {value!r}")
        if not isinstance(self.boxes_to_base, bool):
            raise InputError(f"SegMoTE config: boxes_to_base must be true or false, got {self.boxes_to_base!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "SegMoTEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"SegMoTE config has unknown fields {unknown} (written by a newer SegMoTE?)")
        return cls(**values)


@dataclass
class SegMoTEOutput:
    """Result of a prompted decode.

    logits: (B, 1, 256, 256) final low-res mask logits; iou: (B, 1); balance_loss: scalar tensor (sum over blocks;
    zero at inference); base_logits / base_iou: the frozen model's own prediction; expert_logits: (B, T, 256, 256)
    each expert token's mask before the residual scale (in training; at inference (B, 1, 256, 256), the selected
    token's alone); selected_token: (B,) index of the chosen expert token; expert_choice: (B, depth, T) the expert
    each token was routed to in each block.
    """

    logits: torch.Tensor
    iou: torch.Tensor
    balance_loss: torch.Tensor
    base_logits: torch.Tensor | None = None
    base_iou: torch.Tensor | None = None
    expert_logits: torch.Tensor | None = None
    selected_token: torch.Tensor | None = None
    expert_choice: torch.Tensor | None = None
    iou_token: torch.Tensor | None = field(default=None, repr=False)


@dataclass
class AutoOutput:
    """Result of a prompt-free decode for one class.

    logits: (B, 1, 256, 256); objectness: (B,) probability that the class is present (sigmoid of
    objectness_logit, use the logit for a BCE loss); iou: (B, 1); balance_loss: scalar tensor (all passes);
    coarse_logits: (B, 1, 256, 256) the first pass, before refinement.
    """

    logits: torch.Tensor
    objectness: torch.Tensor
    balance_loss: torch.Tensor
    objectness_logit: torch.Tensor | None = None
    iou: torch.Tensor | None = None
    coarse_logits: torch.Tensor | None = None
    class_tokens: torch.Tensor | None = field(default=None, repr=False)  # (B, K, D): the refinement passes' prompt


@dataclass
class ParameterReport:
    trainable: int
    total: int
    by_part: dict[str, int]

    @property
    def share(self) -> float:
        """Trainable parameters as a fraction of all parameters (backbone + adapters)."""
        return self.trainable / self.total

    def __str__(self) -> str:
        parts = ", ".join(f"{name} {count / 1e6:.2f}M" for name, count in self.by_part.items())
        return (f"trainable {self.trainable / 1e6:.2f}M of {self.total / 1e6:.2f}M "
                f"({100 * self.share:.2f}%): {parts}")


# ---- routing -------------------------------------------------------------------------------------------
def coefficient_of_variation_squared(values: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """CV² = population variance / mean² of a 1-D tensor; 0 for a single value."""
    if values.numel() <= 1:
        return values.new_zeros(())
    values = values.float()
    return values.var(correction=0) / (values.mean() ** 2 + eps)


def balance_loss(gates: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Shazeer's load-balancing loss for one router: CV²(importance) + CV²(load).

    gates: (tokens, E) top-1 gates, one-hot in the forward pass (straight-through gates carry gradient);
    probs: (tokens, E) router softmax probabilities. importance = probs summed over tokens (how much each expert is
    wanted), load = gates summed over tokens (how many tokens each expert got). CV² uses the population variance.
    Returns a float32 scalar; 0 when every expert is equally wanted and equally loaded.
    """
    if gates.shape != probs.shape or gates.dim() != 2:
        raise ValueError(f"gates and probs must both be (tokens, experts), got {tuple(gates.shape)} and "
                         f"{tuple(probs.shape)}")
    importance = probs.float().sum(dim=0)
    load = gates.float().sum(dim=0)
    return coefficient_of_variation_squared(importance) + coefficient_of_variation_squared(load)


def straight_through_one_hot(probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Hard one-hot at ``index`` in the forward pass, gradient of ``probs`` in the backward pass.

    probs: (..., E); index: (...,) long. ``hard + (probs - probs.detach())`` equals ``hard`` exactly in floating point.
    """
    hard = F.one_hot(index, probs.shape[-1]).to(probs.dtype)
    return hard + (probs - probs.detach())


class LowRankExpert(nn.Sequential):
    """Linear(dim -> rank) -> GELU -> Linear(rank -> dim); the last layer starts at zero (no-op expert)."""

    def __init__(self, dim: int, rank: int):
        super().__init__(nn.Linear(dim, rank), nn.GELU(), nn.Linear(rank, dim))
        nn.init.zeros_(self[2].weight)
        nn.init.zeros_(self[2].bias)


class TokenMixtureOfExperts(nn.Module):
    """Top-1 token-level mixture of low-rank experts, replacing a block's MLP for the expert tokens."""

    def __init__(self, dim: int, num_experts: int, rank: int):
        super().__init__()
        self.num_experts = num_experts
        self.router = nn.Linear(dim, num_experts)
        self.noise = nn.Linear(dim, num_experts)
        # Zero noise weights: the noise scale starts at softplus(0) ≈ 0.69 for every token, as in Shazeer et al.
        nn.init.zeros_(self.noise.weight)
        nn.init.zeros_(self.noise.bias)
        self.experts = nn.ModuleList(LowRankExpert(dim, rank) for _ in range(num_experts))

    def router_logits(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, D) tokens -> (clean logits, noise std), both (B, T, E) float32 (outside autocast)."""
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            x = tokens.float()
            clean = F.linear(x, self.router.weight.float(), self.router.bias.float())
            noise_std = F.softplus(F.linear(x, self.noise.weight.float(), self.noise.bias.float())) + _NOISE_FLOOR
        return clean, noise_std

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B, T, D) tokens -> (B, T, D) chosen expert's output and routing facts.

        The routing facts: ``clean_logits`` (B, T, E), ``choice`` (B, T) long, ``balance_loss`` scalar (training
        only: at inference nothing uses it, and it is a zero).
        """
        clean, noise_std = self.router_logits(tokens)
        logits = clean + torch.randn_like(clean) * noise_std if self.training else clean
        probs = logits.softmax(dim=-1)
        choice = logits.argmax(dim=-1)
        gates = straight_through_one_hot(probs, choice)  # (B, T, E)
        # Every expert runs on the (few) expert tokens; the hard gate keeps only the chosen one in the forward pass
        # while its straight-through part hands the router the gradient of the softmax probabilities.
        expert_out = torch.stack([expert(tokens) for expert in self.experts], dim=-2)  # (B, T, E, D)
        mixed = (gates.to(expert_out.dtype).unsqueeze(-1) * expert_out).sum(dim=-2)
        if self.training:
            loss = balance_loss(gates.flatten(0, -2), probs.flatten(0, -2))
        else:
            loss = clean.new_zeros(())
        return mixed, {"clean_logits": clean, "choice": choice, "balance_loss": loss}


# ---- MoTE ----------------------------------------------------------------------------------------------
class MixtureOfTokenExperts(nn.Module):
    """The MoTE adapter's parameters: expert tokens, one MoE per transformer block, per-token hypernetworks,
    high-resolution feature fusion, and the zero-initialised residual that adds the expert mask to the base mask."""

    def __init__(self, config: SegMoTEConfig, transformer_dim: int, depth: int, early_channels: int):
        super().__init__()
        tokens, dim = config.num_expert_tokens, transformer_dim
        self.expert_tokens = nn.Embedding(tokens, dim)
        self.moe_layers = nn.ModuleList(
            TokenMixtureOfExperts(dim, config.num_experts, config.expert_rank) for _ in range(depth)
        )
        mask_channels = dim // 8
        self.hypernetworks = nn.ModuleList(MLP(dim, dim, mask_channels, 3) for _ in range(tokens))
        # HQ-SAM: the early encoder feature brought to the upscaled embedding's 4x resolution and added to it.
        # (HQ-SAM's extra 3x3 convolutions on the upscaled embedding are left out: on CPU they cost ~0.2 s per
        # decode at 256x256, as much as everything else added here.)
        hidden = config.early_hidden_channels
        self.early_projection = nn.Sequential(
            nn.ConvTranspose2d(early_channels, hidden, kernel_size=2, stride=2),
            LayerNorm2d(hidden),
            nn.GELU(),
            nn.ConvTranspose2d(hidden, mask_channels, kernel_size=2, stride=2),
        )
        self.residual_scale = nn.Parameter(torch.zeros(tokens))
        self.iou_correction = nn.Linear(dim, 1)
        nn.init.zeros_(self.iou_correction.weight)
        nn.init.zeros_(self.iou_correction.bias)

    def forward(self, decoder, image_pe: torch.Tensor, src: torch.Tensor, sparse: torch.Tensor, early: torch.Tensor,
                every_expert_mask: bool | None = None) -> SegMoTEOutput:
        """SAM's mask decoder (``decoder``, frozen) with the expert tokens beside its own: the base mask exactly as
        SAM makes it, plus the selected expert token's mask (on the early, high-resolution features) times its
        residual scale.

        image_pe (1, D, h, w) the prompt encoder's dense positional encoding; src (B, D, h, w) the image embedding
        plus the dense prompt; sparse (B, N, D) sparse prompts; early (B, C, h, w). every_expert_mask (default:
        in training) computes every expert token's full-resolution mask, as training needs for the gradient of the
        token selection; otherwise only the selected token's, since the others are weighted by exactly zero (the
        same logits to float rounding, T times fewer full-resolution products). ``expert_logits`` is then
        (B, 1, 256, 256).
        """
        transformer = decoder.transformer
        batch = src.shape[0]
        # SAM's token sequence, built exactly as MaskDecoder.predict_masks builds it.
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(batch, -1, -1)
        sam_tokens = torch.cat((output_tokens, sparse), dim=1)
        height, width = src.shape[-2:]
        keys = src.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)

        expert_pe = self.expert_tokens.weight.unsqueeze(0).expand(batch, -1, -1).to(sam_tokens.dtype)
        queries, experts = sam_tokens, expert_pe
        balance = sam_tokens.new_zeros((), dtype=torch.float32)
        choices, last_logits = [], None
        for block, moe in zip(transformer.layers, self.moe_layers):
            queries, experts, keys, routing = _two_way_block(block, moe, queries, experts, keys,
                                                             sam_tokens, expert_pe, key_pe)
            balance = balance + routing["balance_loss"]
            choices.append(routing["choice"])
            last_logits = routing["clean_logits"]

        # Final token-to-image attention, for SAM tokens as in TwoWayTransformer.forward, and for expert tokens.
        final_keys = keys + key_pe
        queries = transformer.norm_final_attn(
            queries + transformer.final_attn_token_to_image(q=queries + sam_tokens, k=final_keys, v=keys))
        experts = transformer.norm_final_attn(
            experts + transformer.final_attn_token_to_image(q=experts + expert_pe, k=final_keys, v=keys))

        # Base masks exactly as MaskDecoder.predict_masks; multimask=False keeps mask token 0.
        iou_token = queries[:, 0, :]
        mask_tokens = queries[:, 1 : 1 + decoder.num_mask_tokens, :]
        upscaled = decoder.output_upscaling(keys.transpose(1, 2).view(batch, -1, height, width))
        hyper = torch.stack([mlp(mask_tokens[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], 1)
        channels, up_h, up_w = upscaled.shape[1:]
        base_masks = (hyper @ upscaled.view(batch, channels, up_h * up_w)).view(batch, -1, up_h, up_w)
        base_logits = base_masks[:, 0:1]
        base_iou = decoder.iou_prediction_head(iou_token)[:, 0:1]

        # Expert masks on HQ features, from the expert token with the highest top-1 router logit in the last block.
        fused = upscaled + self.early_projection(early.to(upscaled.dtype))
        expert_hyper = torch.stack([mlp(experts[:, t, :]) for t, mlp in enumerate(self.hypernetworks)], 1)
        token_scores = last_logits.max(dim=-1).values  # (B, T)
        selected = token_scores.argmax(dim=-1)
        if every_expert_mask is None:
            every_expert_mask = self.training
        if every_expert_mask:
            expert_logits = (expert_hyper @ fused.flatten(2)).view(batch, -1, up_h, up_w)  # (B, T, 256, 256)
            selection = straight_through_one_hot(token_scores.softmax(dim=-1), selected).to(expert_logits.dtype)
            weights = selection * self.residual_scale  # (B, T)
            logits = base_logits + (weights[:, :, None, None] * expert_logits).sum(dim=1, keepdim=True)
            selected_token_state = (selection.unsqueeze(-1) * experts).sum(dim=1)
        else:
            rows = torch.arange(batch, device=selected.device)
            expert_logits = (expert_hyper[rows, selected].unsqueeze(1) @ fused.flatten(2)).view(batch, 1, up_h, up_w)
            weight = self.residual_scale[selected].to(expert_logits.dtype)  # (B,)
            logits = base_logits + weight[:, None, None, None] * expert_logits
            selected_token_state = experts[rows, selected]
        iou = base_iou + self.iou_correction(selected_token_state)
        return SegMoTEOutput(
            logits=logits, iou=iou, balance_loss=balance, base_logits=base_logits, base_iou=base_iou,
            expert_logits=expert_logits, selected_token=selected, expert_choice=torch.stack(choices, dim=1),
            iou_token=iou_token,
        )


class ProgressivePromptTokens(nn.Module):
    """Per-class learnable query tokens that read the image and become sparse prompt embeddings."""

    def __init__(self, config: SegMoTEConfig, dim: int):
        super().__init__()
        if dim % config.ppt_heads:
            raise InputError(f"SegMoTE config: ppt_heads ({config.ppt_heads}) must divide the decoder width {dim}")
        self.class_tokens = nn.Parameter(torch.randn(config.num_classes, config.ppt_tokens_per_class, dim) * 0.02)
        self.attention = nn.MultiheadAttention(dim, config.ppt_heads, batch_first=True)
        self.norm_attention = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, config.ppt_mlp_dim), nn.GELU(), nn.Linear(config.ppt_mlp_dim, dim))
        self.norm_mlp = nn.LayerNorm(dim)
        # Objectness from [mean class token after reading the image, decoder IoU token].
        self.objectness_head = MLP(2 * dim, dim, 1, 2)

    def forward(self, embedding: torch.Tensor, dense_pe: torch.Tensor, classes: int | torch.Tensor) -> torch.Tensor:
        """embedding (B, D, h, w), dense_pe (1, D, h, w) -> prompt tokens (B, K, D) of one class, or (B, C*K, D) of
        C classes (a (C,) long tensor of indices) in one pass: each query token reads the image alone (attention,
        LayerNorm and MLP are per token), so the classes' tokens are what C separate passes give."""
        batch = embedding.shape[0]
        values = embedding.flatten(2).transpose(1, 2)  # (B, hw, D)
        keys = values + dense_pe.flatten(2).transpose(1, 2)
        queries = self.class_tokens[classes].reshape(-1, values.shape[-1]).unsqueeze(0).expand(batch, -1, -1)
        attended, _ = self.attention(queries, keys, values, need_weights=False)
        tokens = self.norm_attention(queries + attended)
        return self.norm_mlp(tokens + self.mlp(tokens))


# ---- the model -----------------------------------------------------------------------------------------
class SegMoTE(nn.Module):
    """A frozen ``Backbone`` plus the MoTE and PPT adapters (see the module docstring).

    Coordinates and shapes follow ``Backbone.decode``: prompts in model-input pixels (x = column, y = row),
    embedding (B, 256, 64, 64), early feature (B, C, 64, 64), low-res logits (B, 1, 256, 256).
    A new model is in eval mode (no gating noise); call ``train()`` for training.
    """

    def __init__(self, backbone: Backbone, config: SegMoTEConfig | None = None):
        super().__init__()
        self.config = config or SegMoTEConfig()
        self.backbone = backbone
        backbone.requires_grad_(False)
        decoder = backbone.mask_decoder
        self.mote = MixtureOfTokenExperts(
            self.config, decoder.transformer_dim, len(decoder.transformer.layers), backbone.early_channels
        )
        self.ppt = ProgressivePromptTokens(self.config, decoder.transformer_dim)
        self.train(False)

    def train(self, mode: bool = True) -> "SegMoTE":
        """Adapters follow ``mode``; the frozen backbone stays in eval mode (its BatchNorm statistics never move)."""
        super().train(mode)
        self.backbone.eval()
        return self

    # ---- parameters -----------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the adapters' tensors (keys start with ``mote.`` or ``ppt.``), detached."""
        return {k: v.detach() for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def load_adapter_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load adapter tensors; any missing, unexpected or mis-shaped key raises CheckpointError (one line)."""
        own = self.adapter_state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        wrong_shape = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                problems.append(f"{label} {len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        if problems:
            raise CheckpointError("adapter weights do not fit this SegMoTE model: " + "; ".join(problems))
        with torch.no_grad():
            for key, value in self.state_dict().items():
                if key in state_dict:
                    value.copy_(state_dict[key])

    def parameter_report(self) -> ParameterReport:
        count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
        return ParameterReport(
            trainable=sum(p.numel() for p in self.trainable_parameters()),
            total=count(self),
            by_part={"mote": count(self.mote), "ppt": count(self.ppt), "backbone (frozen)": count(self.backbone)},
        )

    # ---- encoding ---------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) model input -> (embedding (B, 256, 64, 64), early (B, C, 64, 64)), frozen backbone."""
        return self.backbone.encode(x)

    # ---- prompted decode -------------------------------------------------------------------------------
    def decode(
        self,
        embedding: torch.Tensor,
        early: torch.Tensor,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
    ) -> SegMoTEOutput:
        """Point/box/mask prompts -> one mask per prompt set.

        embedding (B or 1, 256, 64, 64); early (B or 1, C, 64, 64); points (B, N, 2) model-input xy;
        point_labels (B, N) with 1 positive, 0 negative, -1 padding; boxes (B, 4) x0 y0 x1 y1; mask_input
        (B, 1, 256, 256) logits of a previous pass. Returns ``SegMoTEOutput`` (logits (B, 1, 256, 256), iou (B, 1)).
        """
        sparse, dense = self.backbone.encode_prompts(points, point_labels, boxes, mask_input)
        out = self.decode_embeddings(embedding, early, sparse, dense)
        if self.config.boxes_to_base and boxes is not None:
            box_only = self.box_only_rows(boxes.shape[0], point_labels, out.logits.device)
            out.logits = torch.where(box_only.view(-1, 1, 1, 1), out.base_logits, out.logits)
            out.iou = torch.where(box_only.view(-1, 1), out.base_iou, out.iou)
        return out

    @staticmethod
    def box_only_rows(batch: int, point_labels: torch.Tensor | None, device) -> torch.Tensor:
        """(B,) bool: the prompt sets (all with a box) that have no click (labels -1 are padding)."""
        if point_labels is None:
            return torch.ones(batch, dtype=torch.bool, device=device)
        return ~(point_labels >= 0).any(dim=1).to(device)

    def decode_embeddings(
        self, embedding: torch.Tensor, early: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor
    ) -> SegMoTEOutput:
        """The MoTE decoder on already-encoded prompts: sparse (B, N, 256), dense (B, 256, 64, 64)."""
        # Prompt-less calls give batch-1 prompt embeddings; one image may serve many prompt sets.
        batch = max(sparse.shape[0], embedding.shape[0])
        embedding = _match_batch(embedding, batch, "embedding")
        early = _match_batch(early, batch, "early feature")
        sparse = _match_batch(sparse, batch, "sparse prompt")
        dense = _match_batch(dense, batch, "dense prompt")
        return self.mote(self.backbone.mask_decoder, self.backbone.prompt_encoder.get_dense_pe(), embedding + dense,
                         sparse, early)

    # ---- prompt-free decode -----------------------------------------------------------------------------
    def auto_decode(
        self, embedding: torch.Tensor, early: torch.Tensor, class_index: int, refine_passes: int = 1
    ) -> AutoOutput:
        """Segment one class without prompts: PPT tokens -> coarse mask -> ``refine_passes`` box+mask passes.

        embedding (B, 256, 64, 64); early (B, C, 64, 64). Returns ``AutoOutput`` (logits (B, 1, 256, 256),
        objectness (B,)). A slice whose mask is empty after a pass keeps that pass's result (no box to refine).
        """
        try:
            class_index = operator.index(class_index)  # ints and integer scalars (numpy, 0-d tensors)
        except TypeError:
            raise InputError(f"class index must be an integer, got {class_index!r}") from None
        if not 0 <= class_index < self.config.num_classes:
            raise InputError(f"class index {class_index!r} is out of range: this adapter has "
                             f"{self.config.num_classes} class(es)")
        if refine_passes < 0:
            raise InputError(f"refine_passes must be 0 or more, got {refine_passes}")
        out = self.auto_coarse(embedding, early, torch.tensor([class_index], device=embedding.device))
        logits, iou, balance = out.logits, out.iou, out.balance_loss
        for _ in range(refine_passes):
            logits, iou, refined_balance = self.auto_refine(embedding, early, out.class_tokens, logits, iou)
            balance = balance + refined_balance
        return dataclasses.replace(out, logits=logits, iou=iou, balance_loss=balance)

    def auto_coarse(self, embedding: torch.Tensor, early: torch.Tensor, classes: torch.Tensor) -> AutoOutput:
        """The first automatic pass for C classes (a (C,) long tensor) on B slices at once: PPT tokens -> mask,
        objectness. Rows are slice-major (row b * C + c: slice b, class classes[c]); ``class_tokens`` (B*C, K, D)
        are the refinement passes' prompt (``auto_refine``)."""
        prompt_encoder = self.backbone.prompt_encoder
        batch, count = embedding.shape[0], classes.shape[0]
        tokens = self.ppt(embedding, prompt_encoder.get_dense_pe(), classes)  # (B, C*K, D)
        class_tokens = tokens.reshape(batch * count, -1, tokens.shape[-1])
        embedding, early = _per_class(embedding, count), _per_class(early, count)
        no_mask = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dense = no_mask.expand(batch * count, -1, *embedding.shape[-2:])
        coarse = self.decode_embeddings(embedding, early, class_tokens, dense)
        objectness_logit = self.ppt.objectness_head(
            torch.cat([class_tokens.mean(dim=1), coarse.iou_token], dim=-1)).squeeze(-1)
        return AutoOutput(logits=coarse.logits, objectness=torch.sigmoid(objectness_logit),
                          balance_loss=coarse.balance_loss, objectness_logit=objectness_logit, iou=coarse.iou,
                          coarse_logits=coarse.logits, class_tokens=class_tokens)

    def auto_refine(self, embedding: torch.Tensor, early: torch.Tensor, class_tokens: torch.Tensor,
                    logits: torch.Tensor, iou: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One refinement pass on N rows: the previous mask (logits (N, 1, 256, 256)) becomes a box plus a mask
        prompt, decoded with the rows' class tokens (N, K, D) on their slices' embedding and early feature (N, ...).
        A row whose mask is empty keeps its logits and IoU (no box to refine). Returns (logits, iou, balance loss)."""
        boxes, found = self.boxes_from_logits(logits)
        # The previous mask is a prompt, not a path for gradient (SAM's iterative training does the same).
        box_sparse, mask_dense = self.backbone.encode_prompts(boxes=boxes, mask_input=logits.detach())
        refined = self.decode_embeddings(embedding, early, torch.cat([class_tokens, box_sparse], dim=1), mask_dense)
        logits = torch.where(found.view(-1, 1, 1, 1), refined.logits, logits)
        iou = torch.where(found.view(-1, 1), refined.iou, iou)
        return logits, iou, refined.balance_loss

    @staticmethod
    def has_mask(logits: torch.Tensor) -> torch.Tensor:
        """(B, 1, h, w) low-res logits -> (B,) bool: whether the mask (logits > 0) is not empty, i.e. whether a
        refinement pass has a box to refine (``auto_refine`` keeps the other rows as they are)."""
        return (logits.detach()[:, 0] > 0).flatten(1).any(dim=1)

    def boxes_from_logits(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, h, w) low-res logits -> (boxes (B, 4) x0 y0 x1 y1 in model-input pixels, found (B,) bool).

        The box encloses logits > 0; a slice with an empty mask gets the whole input as a placeholder box and
        found = False.
        """
        foreground = logits.detach()[:, 0] > 0
        low_h, low_w = foreground.shape[-2:]
        scale_x = self.backbone.input_size / low_w
        scale_y = self.backbone.input_size / low_h
        rows, cols = foreground.any(dim=2), foreground.any(dim=1)  # (B, h), (B, w)
        found = self.has_mask(logits)
        row_index = torch.arange(low_h, device=logits.device)
        col_index = torch.arange(low_w, device=logits.device)
        y0 = torch.where(rows, row_index, low_h).min(dim=1).values
        y1 = torch.where(rows, row_index, -1).max(dim=1).values + 1
        x0 = torch.where(cols, col_index, low_w).min(dim=1).values
        x1 = torch.where(cols, col_index, -1).max(dim=1).values + 1
        boxes = torch.stack([x0 * scale_x, y0 * scale_y, x1 * scale_x, y1 * scale_y], dim=1).float()
        whole = torch.tensor([0.0, 0.0, self.backbone.input_size, self.backbone.input_size], device=logits.device)
        boxes = torch.where(found.unsqueeze(1), boxes, whole)
        return boxes.to(logits.dtype), found


def _per_class(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """(B, ...) per slice -> (B * count, ...) per (slice, class) row, slice-major."""
    return tensor.unsqueeze(1).expand(-1, count, *tensor.shape[1:]).flatten(0, 1)


def _match_batch(tensor: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """One image for many prompt sets is broadcast; otherwise the batches must agree."""
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    raise InputError(f"{what} has batch {tensor.shape[0]}, which does not match batch {batch}")


def _two_way_block(block, moe, queries, experts, keys, query_pe, expert_pe, key_pe):
    """One TwoWayAttentionBlock for SAM tokens (unchanged) and expert tokens (MoE instead of the MLP).

    queries (B, Nq, D) SAM tokens; experts (B, T, D); keys (B, HW, D) image. Expert tokens read the SAM tokens and
    the image but are kept out of every key set the SAM tokens or the image read, so those flow as in SAM.
    Returns (queries, experts, keys, routing facts of the MoE).
    """
    # Self-attention: SAM tokens over SAM tokens; expert tokens over SAM + expert tokens.
    if block.skip_first_layer_pe:
        all_tokens = torch.cat([queries, experts], dim=1)
        new_queries = block.self_attn(q=queries, k=queries, v=queries)
        new_experts = block.self_attn(q=experts, k=all_tokens, v=all_tokens)
    else:
        q = queries + query_pe
        e = experts + expert_pe
        all_q, all_v = torch.cat([q, e], dim=1), torch.cat([queries, experts], dim=1)
        new_queries = queries + block.self_attn(q=q, k=q, v=queries)
        new_experts = experts + block.self_attn(q=e, k=all_q, v=all_v)
    queries, experts = block.norm1(new_queries), block.norm1(new_experts)

    # Token-to-image cross-attention, the same for both.
    k = keys + key_pe
    queries = block.norm2(queries + block.cross_attn_token_to_image(q=queries + query_pe, k=k, v=keys))
    experts = block.norm2(experts + block.cross_attn_token_to_image(q=experts + expert_pe, k=k, v=keys))

    # Frozen MLP for SAM tokens, routed low-rank experts for expert tokens.
    queries = block.norm3(queries + block.mlp(queries))
    moe_out, routing = moe(experts)
    experts = block.norm3(experts + moe_out)

    # Image-to-token attention reads the SAM tokens only.
    attn_out = block.cross_attn_image_to_token(q=k, k=queries + query_pe, v=queries)
    keys = block.norm4(keys + attn_out)
    return queries, experts, keys, routing
