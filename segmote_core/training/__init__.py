"""Train SegMoTE adapters (MoTE + PPT) on a frozen SAM-family backbone. Start at ``loop.train``.

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

Modules, in the order a run uses them: ``config`` (1), ``distributed``, ``data`` (2), ``prompts`` and ``objective``
(4), ``optimizer`` (3), ``state`` (5, 6), ``validation``, ``report`` (7), ``loop`` (the run), ``cli`` (the flags).
"""

from .config import TrainConfig, load_config, make_config
from .loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "load_config", "make_config", "train"]
