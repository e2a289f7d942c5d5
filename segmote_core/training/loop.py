"""The run: build, resume or start, loop, checkpoint, report. Read it top to bottom."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import InputError, TrainingError
from ..files import atomic_write_text
from ..models.segmote import SegMoTE
from .config import TrainConfig
from .data import StepSampler, build_data, to_batch, training_cases
from .distributed import setup_distributed
from .objective import Objective, compute_losses
from .optimizer import build_optimizer, lr_factor
from .report import export, heldout_report
from .state import (ADAPTER_FILE, BEST_FILE, LOG_FIELDS, LOG_FILE, REPORT_FILE, STATE_FILE, VAL_FILE, append_rows,
                    claim_run_folder, restore, save_best, save_checkpoint, start_fresh, step_generators,
                    truncate_logs)
from .validation import validate


@dataclass
class TrainResult:
    out: Path
    step: int
    losses: list[float]
    val: dict
    best: dict
    stopped: bool = False  # paused by stop_after
    report: dict | None = None


def build_backbone(config: TrainConfig, device: torch.device):
    """The frozen backbone: shipped or downloaded weights, or (sam_vit_tiny) a random one drawn from the seed."""
    from ..checkpoints import load_backbone
    from ..models.backbones import BACKBONES, build_tiny_sam_vit

    if config.backbone == "sam_vit_tiny":  # random-init test backbone: the weights come from the seed
        torch.manual_seed(config.seed)
        return build_tiny_sam_vit().to(device).eval().requires_grad_(False)
    if config.backbone in BACKBONES:
        return load_backbone(config.backbone, config.checkpoint, device)
    raise InputError(f"unknown backbone {config.backbone!r}; choose one of {', '.join(BACKBONES)}")


def train(config: TrainConfig, resume: bool = False, stop_after: int | None = None, quiet: bool = False,
          overwrite: bool = False) -> TrainResult:
    """Run (or resume) training as configured; returns the losses of the steps this call ran. A --out that holds a
    previous run is refused unless resuming it or `overwrite`; one training at a time writes into a folder."""
    from ..torchrun import torchrun_environment

    with claim_run_folder(Path(config.out), resume, overwrite, holder=torchrun_environment()[0] == 0):
        return _train(config, resume, stop_after, quiet)


def _train(config: TrainConfig, resume: bool, stop_after: int | None, quiet: bool) -> TrainResult:
    from tqdm import tqdm

    from ..models.backbones import BACKBONES

    if config.threads:
        torch.set_num_threads(config.threads)
    ctx, device = setup_distributed(config.device)
    out = Path(config.out)
    log = (lambda *a: None) if (quiet or not ctx.main) else (lambda *a: print(*a, flush=True))
    started = time.time()

    # ---- model and data ----------------------------------------------------------------------------------
    cases = training_cases(config)  # first: a wrong data path is reported before the model takes seconds to load
    backbone = build_backbone(config, device)
    backbone_sha = getattr(backbone, "weights_sha256", None)
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
    ctx.barrier()
    data = build_data(config, cases, backbone, ctx, log)
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
        start, best = restore(out, config, model, optimizer, scheduler, scaler)
        log(f"resumed at step {start} from {out / STATE_FILE}")
        if ctx.main:
            truncate_logs(out, start)
    elif ctx.main:
        start_fresh(out, config, data.split)
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
            append_rows(out / VAL_FILE, ("step", "class", "dice"), rows + [{"step": step, "class": "mean",
                                                                              "dice": round(mean, 6)}])
        if math.isfinite(mean) and mean > best["dice"]:
            best.update(dice=mean, step=step)
            if ctx.main:
                save_best(out, model, data, config, step, scores, backbone_sha)
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
            append_rows(out / LOG_FILE, LOG_FIELDS,
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
        ctx.close()
        return result
    log(f"trained {step} steps in {time.time() - started:.0f} s (this call)")

    # ---- what ships -------------------------------------------------------------------------------------------
    chosen = out / (BEST_FILE if config.export_which == "best" and (out / BEST_FILE).exists() else ADAPTER_FILE)
    if ctx.main and config.split == "slice" and config.final_report and config.backbone in BACKBONES:
        result.report = heldout_report(config, data, chosen, device, log)
        atomic_write_text(out / REPORT_FILE, json.dumps(result.report, indent=1))
    if ctx.main and config.export:
        export(chosen, Path(config.export), backbone, result.report, time.time() - started)
        log(f"adapter written to {config.export}")
    ctx.close()
    return result
