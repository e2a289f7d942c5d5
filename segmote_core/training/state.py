"""What a run leaves on disk and reads back on --resume: checkpoints, the training state, random states, logs.

Every step reseeds its random generators from (seed, rank, step), so a resumed run reproduces an uninterrupted
one's losses exactly. All files are written atomically."""

from __future__ import annotations

import csv
import json
import os
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import yaml

from ..errors import InputError, TrainingError
from ..files import _reason, atomic_write, atomic_write_text
from ..models.segmote import SegMoTE
from ..toolbox import one_line
from .config import TrainConfig
from .data import TrainData

STATE_FILE = "train_state.pt"
ADAPTER_FILE = "adapter.safetensors"
BEST_FILE = "best.safetensors"
LOG_FILE = "log.csv"
VAL_FILE = "val.csv"
REPORT_FILE = "report.json"
LOG_FIELDS = ("step", "loss", "prompted", "automatic", "focal", "dice", "iou", "objectness", "balance", "lr",
              "grad_norm", "seconds", "cpu_seconds")


def step_generators(seed: int, rank: int, step: int) -> np.random.Generator:
    """Reseed everything random for one step from (seed, rank, step): prompts (numpy) and gating noise (torch)."""
    torch.manual_seed(int(np.random.SeedSequence([seed, rank, step, 1]).generate_state(1)[0]))
    return np.random.default_rng([seed, rank, step])



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
    from ..adapters import save_adapter

    extra = {"train_config": config.to_dict(), "step": step, "best": best, "split": data.split}
    save_adapter(out / ADAPTER_FILE, model, data.classes, data.normalization, extra, backbone_sha256=backbone_sha)
    state = {
        "format": "segmote-train-state", "version": STATE_VERSION, "step": step, "config": config.to_dict(),
        "classes": list(data.classes), "normalization": data.normalization, "best": dict(best),
        "adapter": {k: v.detach().cpu().clone() for k, v in model.adapter_state_dict().items()},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {}, "rng": rng_state(),
    }
    atomic_torch_save(state, out / STATE_FILE)


def save_best(out: Path, model: SegMoTE, data: TrainData, config: TrainConfig, step: int, scores: dict,
              backbone_sha: str | None) -> None:
    """The adapter with the best mean validation Dice so far (atomic, safetensors)."""
    from ..adapters import save_adapter

    extra = {"train_config": config.to_dict(), "step": step, "val_dice": scores, "split": data.split}
    save_adapter(out / BEST_FILE, model, data.classes, data.normalization, extra, backbone_sha256=backbone_sha)


RUN_FILES = (ADAPTER_FILE, BEST_FILE, STATE_FILE, LOG_FILE, VAL_FILE, REPORT_FILE)  # what a run leaves in --out
LOCK_FILE = ".segmote-train.lock"


@contextmanager
def claim_run_folder(out: Path, resume: bool, overwrite: bool, holder: bool = True) -> Iterator[None]:
    """Checked before anything is built: a folder that holds a previous run (its adapter, state or logs) is
    trained into only to resume it or when the user asked to overwrite it, and one training at a time writes into
    a folder (an exclusive flock on LOCK_FILE, held by the process that writes, `holder`; released when the run
    ends, however it ends). Windows has no flock: there the previous-run check stands alone."""
    if resume and overwrite:
        raise InputError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    previous = [name for name in RUN_FILES if (out / name).exists()]
    if previous and not (resume or overwrite):
        raise InputError(f"{out} holds a previous training run ({', '.join(previous)}); continue it with --resume, "
                         "choose another --out, or pass --overwrite to replace it")
    if not holder:
        yield
        return
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise InputError(f"cannot train into {out}: {_reason(error, out / LOCK_FILE)}") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"another training is writing into {out} right now; wait for it to end or choose "
                             "another --out") from None
        except OSError:  # a file system without locks (some network mounts): the previous-run check stands alone
            pass
        yield
    finally:
        if created and os.listdir(out) == [LOCK_FILE]:  # a run that wrote nothing leaves no folder behind
            os.unlink(out / LOCK_FILE)
            os.rmdir(out)
        os.close(handle)  # closing releases the lock


def start_fresh(out: Path, config: TrainConfig, split: dict) -> None:
    """A new run in ``out``: a previous run's logs, best adapter and report go; the config and the split are
    written."""
    for name in (LOG_FILE, VAL_FILE, BEST_FILE, REPORT_FILE):
        (out / name).unlink(missing_ok=True)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    atomic_write_text(out / "split.json", json.dumps(split, indent=1))


STATE_VERSION = 1  # bump when what train_state.pt holds changes
STATE_KEYS = ("config", "adapter", "optimizer", "scheduler", "scaler", "rng", "step", "best")


def restore(out: Path, config: TrainConfig, model: SegMoTE, optimizer, scheduler, scaler) -> tuple[int, dict]:
    """Continue the run in ``out`` (refused if its config changed): the adapter, optimiser, scheduler, scaler and
    random generators as they were at its last checkpoint. Returns (step, best)."""
    state = load_state(out)
    check_resumable(state["config"], config)
    try:
        model.load_adapter_state_dict(state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        return int(state["step"]), dict(state["best"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as error:
        raise TrainingError(f"cannot resume from {out / STATE_FILE}: its contents do not fit this run "
                            f"({one_line(error, 150, named=True)})") from None


def load_state(out: Path) -> dict:
    path = out / STATE_FILE
    if not path.is_file():
        raise TrainingError(f"nothing to resume: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise TrainingError(f"cannot resume from {path}: {one_line(error, 200, named=True)}") from None
    if not isinstance(state, dict) or state.get("format") != "segmote-train-state":
        raise TrainingError(f"{path} is not a SegMoTE training state")
    if state.get("version") != STATE_VERSION:
        raise TrainingError(f"{path} was written by another SegMoTE version (state version {state.get('version')!r}, "
                            f"this one reads {STATE_VERSION}); start a new run in another --out")
    missing = [key for key in STATE_KEYS if key not in state]
    if missing or not isinstance(state["config"], dict):
        raise TrainingError(f"{path} is incomplete (no {', '.join(missing) or 'config'}); start a new run")
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


def truncate_logs(out: Path, step: int) -> None:
    """Drop the log rows of the steps after ``step`` (a resumed run redoes them)."""
    for name in (LOG_FILE, VAL_FILE):
        truncate_log(out / name, step)
