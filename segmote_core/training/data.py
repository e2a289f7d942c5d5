"""Training data: cases -> split -> normalised axial slices -> cached embeddings, and the batch of each step.

The frozen encoder embeds each slice once into a memory-mapped ``EmbeddingStore`` (through the engine's encoder
loop, ``Engine.store_embeddings``); training reads only the store, so a step costs decoder passes only."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import InputError
from .config import TrainConfig
from .distributed import Dist


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
    from ..normalize import rule_for_training

    return rule_for_training(config.window, config.preset, config.backbone)


def training_cases(config: TrainConfig) -> list:
    """The cases the config names (a missing or empty data folder is an InputError here, before any model loads)."""
    from ..datasets import find_cases

    return find_cases(config.data, config.layout, config.image, config.segmentation, config.modality,
                      config.patient_regex)


def build_data(config: TrainConfig, cases: list, backbone, ctx: Dist, log=print) -> TrainData:
    from ..curate import read_manifest
    from ..datasets import describe_split, split_cases, split_slices
    from ..embedding_store import EmbeddingStore
    from ..engine import Engine, Prepared
    from ..normalize import from_rule
    from ..volume import SliceStack

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
    # The frozen encoder as the engine runs it (PyTorch, fp32): the one encoder loop, writing into the store.
    encoder = Engine(backbone=backbone, device=str(backbone.device), runtime="torch", cache_bytes=1,
                     tune_allocator=False)
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
        # Every rank embeds its share of the missing slices with the engine's encoder loop, then all read the
        # complete store.
        encoder.store_embeddings(Prepared(volume, stack, norm, key=()), range(ctx.rank, len(raw), ctx.world), store)
        ctx.barrier()
        entries = store.get([raw[i] for i in range(len(raw))])
        if any(entry is None for entry in entries):  # pragma: no cover - the disk lost what was just written
            raise OSError(f"embedding store {store.root}: entries of {case.case_id} unreadable right after writing")
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
            targets = np.stack([backbone.low_res_mask(torch.from_numpy(np.ascontiguousarray(m))).numpy()
                                for m in item_masks])
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


def to_batch(items: Sequence[SliceItem], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    embedding = torch.from_numpy(np.stack([np.asarray(i.embedding) for i in items])).to(device)
    early = torch.from_numpy(np.stack([np.asarray(i.early) for i in items])).to(device)
    targets = torch.from_numpy(np.stack([i.targets for i in items])).to(device)
    return embedding, early, targets
