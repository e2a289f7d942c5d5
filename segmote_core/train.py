"""Train SegMoTE adapters (MoTE + PPT) on a frozen SAM-family backbone. Read it top to bottom.

    segmote train --config configs/chest_ct_lungs.yaml            # one process
    torchrun --nproc_per_node 2 -m segmote_core.train --config ...  # DDP (gloo on CPU, NCCL on CUDA)
    segmote train --config ... --resume                           # continue exactly where the last checkpoint was

1. **Config**: a typed ``TrainConfig`` from YAML and/or flags (every field is a flag); unknown keys are refused;
   the resolved config goes into every checkpoint and into ``<out>/config.yaml``.
2. **Data**: cases (nnU-Net raw or Slicer pairs, ``segmote_core.datasets``), a patient-level seeded split (9:1) or a
   slice split for a single volume (written to ``<out>/split.json``); axial slices normalised by one rule (stored in
   the adapter); the frozen encoder embeds each slice once into a memory-mapped ``EmbeddingStore``; training reads
   only the cache, so a step costs decoder passes only.
3. **Model**: ``SegMoTE`` around the frozen backbone; AdamW over the adapter parameters only (no weight decay on
   biases, norms, tokens and scales); linear warm-up then cosine decay.
4. **A step** (per rank, a batch of slices from a ``DistributedSampler`` whose order is a function of the step):
   - *prompted*: one class present in each slice, a box (jittered) or a positive click sampled from its label, then
     ``interaction_steps`` more passes, each adding one click at the centre of the larger error region (positive on
     a miss, negative on a false alarm) and the previous logits as mask prompt;
   - *label-free clicks* (``distill_clicks`` per slice): random boxes anywhere in the slice go to the frozen model;
     where it is confident (predicted IoU) and its mask is not mostly a trained class, a click inside that mask is a
     prompt whose target is the mask (self-distillation: clicks learn the base model's box answers on any
     structure, without labels). A box alone is answered by the frozen decoder (``SegMoTEConfig.boxes_to_base``), so
     a box as first prompt trains MoTE only through the clicks that follow it;
   - *automatic*: PPT tokens for ``auto_classes_per_step`` classes drawn at random (0 = all), coarse pass +
     ``refine_passes`` box/mask passes, on every slice of the batch (slices without the class teach objectness);
   - loss per mask pass: ``20·focal + Dice + MSE(predicted IoU, actual IoU)``; automatic mode adds
     ``BCE(objectness)``; plus ``0.01·balance`` (MoTE's CV² load balancing). Averaged over passes.
   AMP on CUDA, gradient clipping, one optimiser step. A non-finite loss or gradient norm stops the run with the step
   number; the last good checkpoint stays as it was.
5. **Checkpoints** every ``save_every`` steps and at the end, all written atomically: ``<out>/adapter.safetensors``
   (adapter-only, what ships), ``<out>/best.safetensors`` (best mean validation Dice) and ``<out>/train_state.pt``
   (training side only: adapter, optimiser, scheduler, scaler, RNG states, step; plain tensors and dicts, read back
   with ``torch.load(weights_only=True)``). Every step reseeds its random generators from (seed, rank, step), so a
   resumed run reproduces an uninterrupted one's losses exactly.
6. **Logs**: tqdm, ``<out>/log.csv`` (one row per step) and ``<out>/val.csv`` (per-class validation Dice).
7. **Held-out report** (slice split): the shipped adapter through ``Engine.auto`` on the whole volume, scored on the
   held-out slices only; single-positive-click and tight-box Dice, base backbone vs adapter, for the trained classes
   and for every other labelled structure of the volume (the adapter must not make those worse).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import random
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from scipy import ndimage
from torch import nn

from .errors import InputError, SegMoTEError
from .files import atomic_write, atomic_write_text
from .models.segmote import SegMoTE, SegMoTEConfig

STATE_FILE = "train_state.pt"
ADAPTER_FILE = "adapter.safetensors"
BEST_FILE = "best.safetensors"
LOG_FIELDS = ("step", "loss", "prompted", "automatic", "focal", "dice", "iou", "objectness", "balance", "lr",
              "grad_norm", "seconds", "cpu_seconds")


class TrainingError(SegMoTEError):
    """Training had to stop (non-finite loss, unusable resume state); the message says where and why."""


# =====================================================================================================
# 1. Config
# =====================================================================================================
@dataclass
class TrainConfig:
    """Everything a run depends on. YAML keys and ``--flags`` have the same names (flags with dashes)."""

    # data: a folder (nnU-Net raw or Slicer pairs) or one image + segmentation; "pkg:slicerio/..." paths work
    data: str | None = None
    image: str | None = None
    segmentation: str | None = None
    layout: str = "auto"  # auto | nnunet | slicer
    modality: str = "unknown"  # for Slicer pairs (nnU-Net reads it from dataset.json)
    classes: list[str] = field(default_factory=list)  # class names to train; empty = every class of the first case
    manifest: str | None = None  # a curation manifest: train only on its kept (case, slice, class) samples
    split: str = "patient"  # patient (seeded, cases of a patient together) | slice (one volume, every n-th slice)
    val_fraction: float = 0.1
    patient_regex: str | None = None
    holdout_every: int = 3
    holdout_offset: int = 1
    # normalisation (stored in the adapter as a rule): a CT window, a preset, or the backbone's default per modality
    window: list[float] | None = None  # [level, width]
    preset: str | None = None
    # model
    backbone: str = "lite_medsam"
    checkpoint: str | None = None  # backbone weights file; None = shipped / downloaded weights
    model: dict = field(default_factory=dict)  # SegMoTEConfig fields except num_classes (= len(classes))
    # optimisation
    steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.01
    fast_lr_multiplier: float = 1.0  # lr factor for the near-zero-initialised gates (see build_optimizer)
    grad_clip: float = 1.0
    amp: str = "auto"  # auto (CUDA only) | on | off
    # losses
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    objectness_weight: float = 1.0
    balance_weight: float = 0.01
    # simulated interaction and automatic mode
    prompted: bool = True
    automatic: bool = True
    box_probability: float = 0.5
    box_jitter: float = 0.1  # share of the box side each edge may move outwards
    interaction_steps: int = 2
    # label-free clicks: per slice and step, a click inside the base model's mask for a random box, with that mask
    # as the target (self-distillation; teaches clicks on any structure, see distillation_prompts)
    distill_clicks: int = 0
    distill_weight: float = 1.0
    refine_passes: int = 1
    auto_classes_per_step: int = 1  # classes decoded automatically per step (0 = all)
    # bookkeeping
    out: str = "runs/segmote"
    cache_dir: str | None = None  # embedding store; default <out>/embeddings
    save_every: int = 100
    eval_every: int = 100  # 0 = validate at the end only
    seed: int = 0
    device: str = "auto"
    threads: int | None = None  # torch CPU threads per process
    export: str | None = None  # also write the chosen adapter here (the shipped artifact)
    export_which: str = "best"  # best | last
    final_report: bool = True  # slice split: held-out automatic and single-click Dice at the end

    def __post_init__(self):
        choices = {"layout": ("auto", "nnunet", "slicer"), "split": ("patient", "slice"),
                   "amp": ("auto", "on", "off"), "export_which": ("best", "last")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InputError(f"config: {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        positive = ("steps", "batch_size", "save_every", "holdout_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"config: {name} must be 1 or more, got {getattr(self, name)}")
        for name in ("lr", "grad_clip", "fast_lr_multiplier"):
            if not getattr(self, name) > 0:
                raise InputError(f"config: {name} must be positive, got {getattr(self, name)}")
        for name in ("interaction_steps", "refine_passes", "warmup_steps", "eval_every", "auto_classes_per_step",
                     "distill_clicks"):
            if getattr(self, name) < 0:
                raise InputError(f"config: {name} must be 0 or more, got {getattr(self, name)}")
        if self.distill_weight < 0:
            raise InputError(f"config: distill_weight must be 0 or more, got {self.distill_weight}")
        if not 0.0 <= self.box_probability <= 1.0:
            raise InputError(f"config: box_probability must be in [0, 1], got {self.box_probability}")
        if self.window is not None and len(self.window) != 2:
            raise InputError(f"config: window is [level, width], got {self.window!r}")
        if not (self.prompted or self.automatic):
            raise InputError("config: prompted and automatic are both off; nothing to train")
        if "num_classes" in self.model:
            raise InputError("config: model.num_classes comes from the class list; leave it out")
        SegMoTEConfig.from_dict({**self.model, "num_classes": 1})  # unknown or invalid model fields fail here

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def segmote_config(self, num_classes: int) -> SegMoTEConfig:
        return SegMoTEConfig.from_dict({**self.model, "num_classes": num_classes})


def _coerce(name: str, value, annotation):
    """Check/convert one config value against its field's type annotation (YAML already parsed it)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0])
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise InputError(f"config: {name} must be a list, got {value!r}")
        return [_coerce(name, v, args[0]) for v in value]
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise InputError(f"config: {name} must be a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise InputError(f"config: {name} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise InputError(f"config: {name} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise InputError(f"config: {name} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise InputError(f"config: {name} must be a string, got {value!r}")
    return value


def make_config(values: dict, source: str = "config") -> TrainConfig:
    """A TrainConfig from a dict (YAML + flags); unknown keys are refused, each value is type-checked."""
    hints = typing.get_type_hints(TrainConfig)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise InputError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"known keys: {', '.join(hints)}")
    return TrainConfig(**{name: _coerce(name, value, hints[name]) for name, value in values.items()})


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """YAML file (optional) then overrides (flags) -> TrainConfig."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise InputError(f"config {path.name} is not valid YAML: {' '.join(str(error).split())[:200]}") from None
        if not isinstance(loaded, dict):
            raise InputError(f"config {path.name} must be a mapping of keys to values")
        make_config(loaded, f"config {path.name}")  # refuse unknown keys naming the file
        values.update(loaded)
    values.update(overrides or {})
    return make_config(values, f"config {Path(path).name}" if path else "config")


# =====================================================================================================
# 2. Distributed setup
# =====================================================================================================
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor


def setup_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; then NCCL on CUDA, gloo on CPU. One process otherwise."""
    from .devices import resolve_device, tune_cpu_allocator

    device = resolve_device(device_name)
    if device.type == "cpu":
        tune_cpu_allocator()  # ~1.8x faster encoder passes on glibc (docs/benchmarks.md)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank), device


# =====================================================================================================
# 3. Data: cases -> split -> normalised slices -> cached embeddings
# =====================================================================================================
@dataclass
class SliceItem:
    """One axial slice, ready for the decoder: cached encoder outputs and per-class masks."""

    case: str
    index: int  # slice index along the axial SliceStack
    embedding: np.ndarray  # (256, 64, 64) float32, memory-mapped
    early: np.ndarray  # (C_early, 64, 64)
    masks: np.ndarray  # (classes, H, W) bool on the slice grid
    targets: np.ndarray  # (classes, 256, 256) bool in low-res model space (resized, padded like the input)
    prompt_classes: list[int]  # classes present (and kept by the manifest) that a prompt may target

    @property
    def present(self) -> np.ndarray:
        return self.masks.reshape(len(self.masks), -1).any(axis=1)


@dataclass
class TrainData:
    classes: list[str]
    normalization: dict  # the rule, stored in the adapter
    train: list[SliceItem]
    val: list[SliceItem]
    split: dict
    volumes: dict = field(default_factory=dict)  # case id -> (Volume, labels), kept for the held-out report


def normalization_rule(config: TrainConfig) -> dict:
    from .normalize import rule_for_training

    return rule_for_training(config.window, config.preset, config.backbone)


def low_res_target(mask: np.ndarray, backbone) -> np.ndarray:
    """(H, W) bool on the slice grid -> (256, 256) bool in low-res model space (the decoder's logit grid)."""
    low = 4 * backbone.embedding_size[0]
    scale = low / backbone.input_size
    new_h, new_w = backbone.resized_shape(*mask.shape)
    size = (max(1, round(new_h * scale)), max(1, round(new_w * scale)))
    resized = F.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None], size, mode="bilinear",
                            align_corners=False)[0, 0] > 0.5
    out = np.zeros((low, low), dtype=bool)
    out[: size[0], : size[1]] = resized.numpy()
    return out


def build_data(config: TrainConfig, backbone, ctx: Dist, log=print) -> TrainData:
    from .curate import read_manifest
    from .datasets import describe_split, find_cases, split_cases, split_slices
    from .embedding_store import EmbeddingStore
    from .normalize import from_rule, normalize
    from .volume import SliceStack

    cases = find_cases(config.data, config.layout, config.image, config.segmentation, config.modality,
                       config.patient_regex)
    rule = normalization_rule(config)
    kept = read_manifest(config.manifest) if config.manifest else None
    first_volume, first_labels = cases[0].load()
    classes = list(config.classes) or list(first_labels)
    if not classes:
        raise InputError(f"case {cases[0].case_id} has no labels to train on")
    if config.split == "slice":
        if len(cases) != 1:
            raise InputError(f"split: slice holds out slices of one volume, but the data has {len(cases)} cases; "
                             "use split: patient")
        stack_len = SliceStack.for_axis(first_volume, None).shape[0]
        slice_split = split_slices(stack_len, config.holdout_every, config.holdout_offset)
        split = describe_split("slice", config.seed, slice_split, case=cases[0].case_id,
                               holdout_every=config.holdout_every, holdout_offset=config.holdout_offset)
        wanted = {cases[0].case_id: slice_split}
    else:
        case_split = split_cases(cases, config.val_fraction, config.seed)
        split = describe_split("patient", config.seed, case_split, val_fraction=config.val_fraction)
        wanted = {c.case_id: ("train" if c.case_id in case_split["train"] else "val") for c in cases}

    cache = Path(config.cache_dir).expanduser() if config.cache_dir else Path(config.out) / "embeddings"
    data = TrainData(classes, rule, [], [], split)
    for number, case in enumerate(cases):
        volume, labels = (first_volume, first_labels) if number == 0 else case.load()
        missing = [name for name in classes if name not in labels]
        if missing:
            raise InputError(f"case {case.case_id} has no class {', '.join(map(repr, missing))}; "
                             f"it has: {', '.join(labels) or 'no labels'}")
        norm = from_rule(volume.array, rule, volume.modality)
        stack = SliceStack.for_axis(volume, None)
        raw = stack.to_stack(volume.array)
        masks = np.stack([stack.to_stack(labels[name]) for name in classes], axis=1)  # (N, C, H, W)
        store = EmbeddingStore(cache, backbone, norm)
        # Every rank embeds its share of the missing slices, then all read the complete store.
        share = range(ctx.rank, len(raw), ctx.world)
        entries = store.get([raw[i] for i in range(len(raw))], lambda i: normalize(raw[i], norm), only=share)
        if ctx.world > 1:
            ctx.barrier()
            entries = store.get([raw[i] for i in range(len(raw))], lambda i: normalize(raw[i], norm))
        if store.computed:
            log(f"embedded {store.computed} slice(s) of {case.case_id} ({store.recomputed} damaged entries redone)")
        assignment = wanted[case.case_id]
        for index in range(len(raw)):
            part = assignment if isinstance(assignment, str) else ("val" if index in assignment["val"] else "train")
            item_masks = masks[index]
            present = [c for c in range(len(classes)) if item_masks[c].any()]
            if part == "train" and kept is not None:
                present = [c for c in present if (case.case_id, index, classes[c]) in kept]
                if not present:
                    continue
            targets = np.stack([low_res_target(m, backbone) for m in item_masks])
            item = SliceItem(case.case_id, index, entries[index][0], entries[index][1], item_masks, targets, present)
            (data.train if part == "train" else data.val).append(item)
        data.volumes[case.case_id] = (volume, labels)
    if not data.train:
        raise InputError("no training slices left after the split" + (" and the manifest" if kept else ""))
    return data


class StepSampler:
    """The batch of step s on this rank, a pure function of s: a DistributedSampler read as an endless stream."""

    def __init__(self, size: int, batch_size: int, ctx: Dist, seed: int):
        from torch.utils.data import DistributedSampler

        self.sampler = DistributedSampler(range(size), num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=seed)
        self.batch_size = batch_size
        self._epoch, self._order = None, None

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._epoch, self._order = epoch, list(self.sampler)
        return self._order

    def batch(self, step: int) -> list[int]:
        length = len(self.sampler)
        position, out = step * self.batch_size, []
        while len(out) < self.batch_size:
            epoch, offset = divmod(position, length)
            take = self._epoch_order(epoch)[offset: offset + self.batch_size - len(out)]
            out.extend(take)
            position += len(take)
        return out


def step_generators(seed: int, rank: int, step: int) -> np.random.Generator:
    """Reseed everything random for one step from (seed, rank, step): prompts (numpy) and gating noise (torch)."""
    torch.manual_seed(int(np.random.SeedSequence([seed, rank, step, 1]).generate_state(1)[0]))
    return np.random.default_rng([seed, rank, step])


# =====================================================================================================
# 4. Simulated interaction: prompts sampled from the labels, clicks from the error regions
# =====================================================================================================
def sample_box(mask: np.ndarray, rng: np.random.Generator, jitter: float) -> np.ndarray:
    """Tight box (x0, y0, x1, y1) of a (H, W) mask, each edge moved outwards by up to ``jitter`` of its side."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    x0, x1, y0, y1 = cols[0], cols[-1], rows[0], rows[-1]
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


# =====================================================================================================
# 5. Losses, and the objective that DDP wraps
# =====================================================================================================
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


# =====================================================================================================
# 6. Optimiser, schedule, checkpoints
# =====================================================================================================
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


def rng_state() -> dict:
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                  "has_gauss": int(numpy_state[3]), "gauss": float(numpy_state[4])},
        "python": {"version": python_state[0], "state": list(python_state[1]),
                   "gauss": python_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj, path: Path) -> None:
    atomic_write(path, lambda temporary: torch.save(obj, temporary))


def save_checkpoint(out: Path, model: SegMoTE, data: TrainData, config: TrainConfig, step: int, optimizer,
                    scheduler, scaler, best: dict, backbone_sha: str | None) -> None:
    """The shipped adapter (atomic, safetensors) and the training state for --resume (atomic, plain tensors)."""
    from .adapters import save_adapter

    extra = {"train_config": config.to_dict(), "step": step, "best": best, "split": data.split}
    save_adapter(out / ADAPTER_FILE, model, data.classes, data.normalization, extra, backbone_sha256=backbone_sha)
    state = {
        "format": "segmote-train-state", "version": 1, "step": step, "config": config.to_dict(),
        "classes": list(data.classes), "normalization": data.normalization, "best": dict(best),
        "adapter": {k: v.detach().cpu().clone() for k, v in model.adapter_state_dict().items()},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {}, "rng": rng_state(),
    }
    atomic_torch_save(state, out / STATE_FILE)


def load_state(out: Path) -> dict:
    path = out / STATE_FILE
    if not path.is_file():
        raise TrainingError(f"nothing to resume: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise TrainingError(f"cannot resume from {path}: {type(error).__name__}: "
                            f"{' '.join(str(error).split())[:160]}") from None
    if not isinstance(state, dict) or state.get("format") != "segmote-train-state":
        raise TrainingError(f"{path} is not a SegMoTE training state")
    return state


# Settings that may change between a run and its resumption without changing what it computes.
RESUME_MAY_CHANGE = {"save_every", "eval_every", "export", "export_which", "final_report", "threads", "device",
                     "cache_dir"}


def check_resumable(saved: dict, config: TrainConfig) -> None:
    current = config.to_dict()
    changed = sorted(k for k in current if k not in RESUME_MAY_CHANGE and saved.get(k) != current[k])
    if changed:
        details = "; ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed[:4])
        raise TrainingError(f"--resume needs the config the run started with; changed: {details}")


# =====================================================================================================
# 7. Validation: automatic (PPT) Dice per class
# =====================================================================================================
def to_batch(items: Sequence[SliceItem], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    embedding = torch.from_numpy(np.stack([np.asarray(i.embedding) for i in items])).to(device)
    early = torch.from_numpy(np.stack([np.asarray(i.early) for i in items])).to(device)
    targets = torch.from_numpy(np.stack([i.targets for i in items])).to(device)
    return embedding, early, targets


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


# =====================================================================================================
# 8. The run
# =====================================================================================================
@dataclass
class TrainResult:
    out: Path
    step: int
    losses: list[float]
    val: dict
    best: dict
    stopped: bool = False  # paused by stop_after
    report: dict | None = None


def append_rows(path: Path, fields: Sequence[str], rows: list[dict]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def truncate_log(path: Path, step: int) -> None:
    """Drop log rows after ``step`` (they belong to steps a resumed run will redo)."""
    if not path.exists():
        return
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
        fields = rows[0].keys() if rows else None
    if fields is None:
        return
    def write_kept_rows(temporary: Path):
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(fields))
            writer.writeheader()
            writer.writerows(r for r in rows if int(r["step"]) <= step)

    atomic_write(path, write_kept_rows)


def train(config: TrainConfig, resume: bool = False, stop_after: int | None = None, quiet: bool = False) -> TrainResult:
    """Run (or resume) training as configured; returns the losses of the steps this call ran."""
    from tqdm import tqdm

    from .checkpoints import load_backbone
    from .models.backbones import BACKBONES, build_tiny_sam_vit

    if config.threads:
        torch.set_num_threads(config.threads)
    ctx, device = setup_distributed(config.device)
    out = Path(config.out)
    log = (lambda *a: None) if (quiet or not ctx.main) else (lambda *a: print(*a, flush=True))
    started = time.time()

    # ---- model and data ----------------------------------------------------------------------------------
    if config.backbone == "sam_vit_tiny":  # random-init test backbone: the weights come from the seed
        torch.manual_seed(config.seed)
        backbone = build_tiny_sam_vit().to(device).eval().requires_grad_(False)
    elif config.backbone in BACKBONES:
        backbone = load_backbone(config.backbone, config.checkpoint, device)
    else:
        raise InputError(f"unknown backbone {config.backbone!r}; choose one of {', '.join(BACKBONES)}")
    backbone_sha = getattr(backbone, "weights_sha256", None)
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
    ctx.barrier()
    data = build_data(config, backbone, ctx, log)
    torch.manual_seed(config.seed)
    model = SegMoTE(backbone, config.segmote_config(len(data.classes))).to(device)
    model.train()
    objective = Objective(model, config)
    if ctx.world > 1:
        objective = nn.parallel.DistributedDataParallel(
            objective, device_ids=None, find_unused_parameters=True, broadcast_buffers=False)
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    use_amp = device.type == "cuda" and config.amp in ("auto", "on")
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if use_amp and amp_dtype == torch.float16 else None
    log(f"SegMoTE on {config.backbone}: {model.parameter_report()}")
    log(f"classes {data.classes}; {len(data.train)} training / {len(data.val)} validation slices; "
        f"normalisation {data.normalization}; {ctx.world} process(es) on {device}")

    # ---- resume or start ------------------------------------------------------------------------------------
    start, best = 0, {"dice": -1.0, "step": 0}
    if resume:
        state = load_state(out)
        check_resumable(state["config"], config)
        model.load_adapter_state_dict(state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start, best = int(state["step"]), dict(state["best"])
        log(f"resumed at step {start} from {out / STATE_FILE}")
        if ctx.main:
            truncate_log(out / "log.csv", start)
            truncate_log(out / "val.csv", start)
    elif ctx.main:
        for name in ("log.csv", "val.csv", BEST_FILE, "report.json"):
            (out / name).unlink(missing_ok=True)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        atomic_write_text(out / "split.json", json.dumps(data.split, indent=1))
    sampler = StepSampler(len(data.train), config.batch_size, ctx, config.seed)
    last_saved = start

    def checkpoint(step: int) -> None:
        nonlocal last_saved
        if ctx.main:
            save_checkpoint(out, model, data, config, step, optimizer, scheduler, scaler, best, backbone_sha)
        ctx.barrier()
        last_saved = step

    def evaluate(step: int) -> dict:
        if not data.val:
            return {}
        scores = validate(model, data.val, data.classes, config, ctx, device)
        finite = [v for v in scores.values() if math.isfinite(v)]
        mean = float(np.mean(finite)) if finite else float("nan")
        if ctx.main:
            rows = [{"step": step, "class": name, "dice": round(v, 6)} for name, v in scores.items()]
            append_rows(out / "val.csv", ("step", "class", "dice"), rows + [{"step": step, "class": "mean",
                                                                              "dice": round(mean, 6)}])
        if math.isfinite(mean) and mean > best["dice"]:
            best.update(dice=mean, step=step)
            if ctx.main:
                from .adapters import save_adapter

                extra = {"train_config": config.to_dict(), "step": step, "val_dice": scores, "split": data.split}
                save_adapter(out / BEST_FILE, model, data.classes, data.normalization, extra,
                             backbone_sha256=backbone_sha)
        log(f"step {step}: validation Dice " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        return scores

    # ---- the loop -----------------------------------------------------------------------------------------------
    losses, val_scores = [], {}
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    bar = tqdm(range(start, end), initial=start, total=config.steps, disable=quiet or not ctx.main,
               desc="train", dynamic_ncols=True)
    step = start
    for step in bar:
        tick, cpu_tick = time.time(), time.process_time()
        rng = step_generators(config.seed, ctx.rank, step)
        items = [data.train[i] for i in sampler.batch(step)]
        embedding, early, targets = to_batch(items, device)
        count = len(data.classes)
        per_step = count if config.auto_classes_per_step in (0, None) else min(config.auto_classes_per_step, count)
        auto_classes = sorted(int(k) for k in rng.choice(count, size=per_step, replace=False))
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            terms = compute_losses(objective, embedding, early, targets, items, rng, auto_classes)
        loss = terms["loss"]
        reported = ctx.all_reduce(torch.stack([terms[k].detach().float() for k in LOG_FIELDS[1:9]])) / ctx.world
        if not torch.isfinite(reported).all():
            raise TrainingError(f"loss is not finite at step {step + 1} ({float(reported[0])}): stopped; the last "
                                f"good checkpoint is {out / ADAPTER_FILE} (step {last_saved})"
                                if last_saved else f"loss is not finite at step {step + 1}: stopped before any "
                                                   f"checkpoint was written")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), config.grad_clip)
        if not torch.isfinite(grad_norm) and scaler is None:
            raise TrainingError(f"gradient norm is not finite at step {step + 1}: stopped; the last good checkpoint "
                                f"is {out / ADAPTER_FILE} (step {last_saved})")
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        done = step + 1
        values = dict(zip(LOG_FIELDS[1:9], reported.tolist()))
        losses.append(values["loss"])
        if ctx.main:
            append_rows(out / "log.csv", LOG_FIELDS,
                        [{"step": done, **{k: round(v, 6) for k, v in values.items()}, "lr": f"{lr:.3e}",
                          "grad_norm": round(float(grad_norm), 5), "seconds": round(time.time() - tick, 3),
                          "cpu_seconds": round(time.process_time() - cpu_tick, 3)}])
        bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}")
        if config.eval_every and done % config.eval_every == 0 and done < config.steps:
            val_scores = evaluate(done)
        if done % config.save_every == 0 or done == end:
            if done == config.steps:
                val_scores = evaluate(done)
            checkpoint(done)
    bar.close()
    step = max(end, start)
    result = TrainResult(out, step, losses, val_scores, dict(best), stopped=step < config.steps)
    if result.stopped:
        log(f"paused after step {step}; continue with --resume")
        return result
    log(f"trained {step} steps in {time.time() - started:.0f} s (this call)")

    # ---- what ships -------------------------------------------------------------------------------------------
    chosen = out / (BEST_FILE if config.export_which == "best" and (out / BEST_FILE).exists() else ADAPTER_FILE)
    if ctx.main and config.split == "slice" and config.final_report and config.backbone in BACKBONES:
        result.report = heldout_report(config, data, chosen, device, log)
        atomic_write_text(out / "report.json", json.dumps(result.report, indent=1))
    if ctx.main and config.export:
        export(chosen, Path(config.export), backbone, result.report, time.time() - started)
        log(f"adapter written to {config.export}")
    ctx.barrier()
    return result


def export(chosen: Path, target: Path, backbone, report: dict | None, seconds: float) -> None:
    """Copy the chosen adapter to ``target``; the held-out report goes into its header's ``extra``."""
    from .adapters import load_segmote, save_adapter

    model, header = load_segmote(chosen, backbone, getattr(backbone, "weights_sha256", None))
    extra = dict(header.get("extra", {}))
    if report is not None:
        extra["heldout_report"] = report
    extra["run_seconds"] = round(seconds, 1)
    classes = [(c["name"], tuple(c["color"])) for c in header["classes"]]
    save_adapter(target, model, classes, header["normalization"], extra,
                 backbone_sha256=header.get("backbone_sha256"))


# =====================================================================================================
# 9. Held-out report (slice split): automatic through the Engine, single click before/after
# =====================================================================================================
def heldout_report(config: TrainConfig, data: TrainData, adapter: Path, device, log=print) -> dict:
    """Dice on the held-out slices of the single training volume.

    automatic: ``Engine(adapter=...).auto(volume)`` (whole volume, largest 3-D component kept), scored on the
    held-out slices only. single click: one positive click at the centre (farthest from the border) of each class on
    each held-out slice where it is present; base backbone vs the trained MoTE decoder; Dice over those slices.
    box (base): the tight box, base backbone, for reference. The engines' embedding caches are seeded from the
    training store (same encoder, normalisation and slices), so nothing is embedded twice.
    """
    from .engine import Engine

    case = data.split["case"]
    volume, labels = data.volumes[case]
    held = list(data.split["val"])
    tuned = Engine(config.backbone, config.checkpoint, str(device), adapter=adapter)
    base = Engine(config.backbone, config.checkpoint, str(device))
    tuned_prep = tuned.prepare(volume)
    base_prep = base.prepare(volume, normalization=tuned_prep.normalization)
    by_index = {item.index: item for item in data.train + data.val if item.case == case}
    for engine, prepared in ((tuned, tuned_prep), (base, base_prep)):
        early = engine.needs_early_features
        for index, item in by_index.items():
            engine.cache.put(prepared.key + (index, early),
                             (torch.from_numpy(np.array(item.embedding))[None].to(engine.device),
                              torch.from_numpy(np.array(item.early))[None].to(engine.device) if early else None))
    stack = tuned_prep.stack
    tick = time.time()
    automatic = {s.name: stack.to_stack(s.mask) for s in tuned.auto(volume, data.classes, keep_largest=True,
                                                                   refine_passes=config.refine_passes)}
    auto_seconds = time.time() - tick

    def dice_of(pairs):
        inter = sum((p & t).sum() for p, t in pairs)
        total = sum(p.sum() + t.sum() for p, t in pairs)
        return float(2 * inter / total) if total else float("nan")

    def prompted(name: str) -> dict:
        """Single-click and tight-box Dice, base vs adapter, over the held-out slices where ``name`` is present."""
        truth = stack.to_stack(labels[name])
        present = [i for i in held if truth[i].any()]
        scores = {key: [] for key in ("click_base", "click_tuned", "box_base", "box_tuned")}
        for i in present:
            x, y = centre_point(truth[i])
            point_ijk = volume_ijk(stack, i, x, y)
            rows, cols = np.flatnonzero(truth[i].any(1)), np.flatnonzero(truth[i].any(0))
            box = np.array([cols[0], rows[0], cols[-1], rows[-1]], float)
            for label, engine, prepared in (("base", base, base_prep), ("tuned", tuned, tuned_prep)):
                mask = stack.to_stack(engine.segment(volume, points_ijk=[point_ijk], point_labels=[1],
                                                     prepared=prepared))
                scores[f"click_{label}"].append((mask[i], truth[i]))
                scores[f"box_{label}"].append((engine.predict_slice(prepared, i, box=box).mask, truth[i]))
        return {"single_click_dice_base": dice_of(scores["click_base"]),
                "single_click_dice_tuned": dice_of(scores["click_tuned"]),
                "box_dice_base": dice_of(scores["box_base"]), "box_dice_tuned": dice_of(scores["box_tuned"]),
                "slices_with_class": len(present)}

    report = {"case": case, "heldout_slices": held, "classes": {}, "other_structures": {},
              "auto_seconds": round(auto_seconds, 1)}
    for name in data.classes:
        truth = stack.to_stack(labels[name])
        report["classes"][name] = r = {"automatic_dice": dice_of([(automatic[name][i], truth[i]) for i in held]),
                                       **prompted(name)}
        log(f"held-out {name}: automatic Dice {r['automatic_dice']:.4f}; single click {r['single_click_dice_base']:.4f}"
            f" (base) -> {r['single_click_dice_tuned']:.4f} (adapter); box {r['box_dice_base']:.4f} (base) -> "
            f"{r['box_dice_tuned']:.4f} (adapter)")
    # The labelled structures the adapter was not trained for: it must not make them worse (docs/training.md).
    for name in (n for n in labels if n not in data.classes):
        report["other_structures"][name] = r = prompted(name)
        log(f"held-out {name} (not trained): single click {r['single_click_dice_base']:.4f} (base) -> "
            f"{r['single_click_dice_tuned']:.4f} (adapter); box {r['box_dice_base']:.4f} (base) -> "
            f"{r['box_dice_tuned']:.4f} (adapter)")
    return report


def volume_ijk(stack, index: int, x: float, y: float) -> list[float]:
    """Continuous voxel (i, j, k) of stack position (slice index, row y, column x)."""
    position = [0.0, 0.0, 0.0]
    sizes = stack.volume.array.shape
    for dim, (numpy_dim, flip) in enumerate(zip(stack.numpy_dims, stack.flipped)):
        value = (index, y, x)[dim]
        position[2 - numpy_dim] = (sizes[numpy_dim] - 1 - value) if flip else value
    return position


# =====================================================================================================
# 10. CLI: `segmote train` and `python -m segmote_core.train` (what torchrun runs)
# =====================================================================================================
def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", help="YAML file with TrainConfig keys (flags override it)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/train_state.pt exactly")
    parser.add_argument("--stop-after", type=int, metavar="N", help="pause after step N (continue with --resume)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    group = parser.add_argument_group("config keys (YAML syntax for values, e.g. --classes '[right lung, left lung]')")
    for f in dataclasses.fields(TrainConfig):
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f"cfg_{f.name}", metavar="VALUE",
                           help=f"default {f.default if f.default is not dataclasses.MISSING else f.default_factory()!r}")
    parser.set_defaults(func=handler)
    return parser


def add_cli(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train SegMoTE adapters (MoTE + PPT) on a frozen backbone",
        description="Train SegMoTE adapters on an nnU-Net raw folder, Slicer .seg.nrrd pairs or one image. Runs under "
                    "torchrun for DDP. See docs/training.md.")
    return configure_parser(parser)


def overrides_from_args(args) -> dict:
    values = {}
    for f in dataclasses.fields(TrainConfig):
        text = getattr(args, f"cfg_{f.name}", None)
        if text is None:
            continue
        try:
            values[f.name] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            values[f.name] = text
    return values


def handler(args) -> int:
    try:
        config = load_config(args.config, overrides_from_args(args))
        result = train(config, resume=args.resume, stop_after=args.stop_after, quiet=args.quiet)
    except SegMoTEError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1  # a user error, as in every command
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0 if result is not None else 1


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m segmote_core.train ARGS` (what torchrun starts) is `segmote train ARGS`."""
    from .cli import main as segmote

    return segmote(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
