"""Adapter checkpoints: one safetensors file with only the SegMoTE adapter tensors and a JSON header.

The header (safetensors metadata key ``segmote_adapter``) says what the tensors belong to::

    {"format": "segmote-adapter", "format_version": 1, "segmote_version": "0.1.0",
     "backbone": "lite_medsam", "backbone_sha256": "<64 hex>" | null, "input_size": 256, "early_channels": 160,
     "config": {SegMoTEConfig fields}, "classes": [{"name": "liver", "color": [r, g, b]}, ...],
     "normalization": {...}, "extra": {...}}

Colours are RGB floats in [0, 1]. Files are written atomically (temporary file in the same folder, then
``os.replace``), so a crash never leaves half an adapter under the real name. Pickle-based files (.pt, .pth, ...)
are refused without being opened by the unpickler: they can carry code. Every refusal is a one-line
``CheckpointError`` (or ``InputError`` for a bad request, e.g. a class the adapter does not know).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from . import __version__
from .colors import palette_color
from .errors import CheckpointError, InputError
from .files import atomic_write
from .segmentation_io import check_header_text
from .shipped import missing_adapter_error, resolve_adapter
from .toolbox import one_line
from .models.backbones import Backbone
from .models.segmote import SegMoTE, SegMoTEConfig

FORMAT = "segmote-adapter"
FORMAT_VERSION = 1
HEADER_KEY = "segmote_adapter"
SUFFIX = ".safetensors"
# Extensions of torch/pickle files; their content is never handed to an unpickler.
PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".tar"}
# A torch.save zip starts with "PK\x03\x04"; a raw pickle (protocol >= 2) starts with 0x80.
_PICKLE_MAGICS = (b"PK\x03\x04", b"\x80")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# More classes than this would take minutes per slice (each class is one decoder pass) and is no real model.
MAX_CLASSES = 512



@dataclass(frozen=True)
class AdapterClass:
    """One segmentable class: its name and display colour (RGB floats in [0, 1])."""

    name: str
    color: tuple[float, float, float]


ClassSpec = AdapterClass | str | tuple


def _normalise_classes(classes: Sequence[ClassSpec], expected: int) -> list[AdapterClass]:
    """Names alone get a palette colour; (name, (r, g, b)) and AdapterClass keep theirs."""
    result = []
    for index, spec in enumerate(classes):
        if isinstance(spec, AdapterClass):
            name, color = spec.name, spec.color
        elif isinstance(spec, str):
            name, color = spec, palette_color(index)
        else:
            try:
                name, color = spec
            except (TypeError, ValueError):
                raise InputError(f"class {index}: expected a name or (name, (r, g, b)), got {spec!r}") from None
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"class {index}: the name must be a non-empty string, got {name!r}")
        check_header_text(name, f"class {index} name")
        try:
            color = tuple(float(c) for c in color)
        except (TypeError, ValueError):
            raise InputError(f"class {name!r}: colour must be three floats in [0, 1], got {color!r}") from None
        if len(color) != 3 or not all(0.0 <= c <= 1.0 for c in color):
            raise InputError(f"class {name!r}: colour must be three floats in [0, 1], got {color!r}")
        result.append(AdapterClass(name, color))
    names = [c.name for c in result]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"class names must be unique; repeated: {', '.join(duplicates)}")
    if len(result) != expected:
        raise InputError(f"the model has {expected} class(es) but {len(result)} class name(s) were given")
    if len(result) > MAX_CLASSES:
        raise InputError(f"{len(result)} classes; an adapter holds at most {MAX_CLASSES}")
    return result


def _check_sha256(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _SHA256.match(value.lower()):
        raise InputError(f"{what} must be 64 hexadecimal characters, got {value!r}")
    return value.lower()


def _json_ready(value: object, what: str) -> object:
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise InputError(f"{what} must be JSON-serialisable: {one_line(error)}") from None


# ---- writing -------------------------------------------------------------------------------------------
def save_adapter(
    path: str | os.PathLike,
    model: SegMoTE,
    classes: Sequence[ClassSpec],
    normalization: dict,
    extra: dict | None = None,
    *,
    backbone_sha256: str | None,
) -> Path:
    """Write the model's adapter tensors and header to ``path`` (must end in .safetensors), atomically.

    classes: one entry per model class, a name or (name, (r, g, b)) or ``AdapterClass``; normalization: how slices
    were normalised for training (JSON); extra: anything else JSON (e.g. training summary); backbone_sha256: SHA-256
    of the backbone weights the adapter was trained on (None for a random-init backbone). Returns the path.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != SUFFIX:
        raise InputError(f"adapter files end in {SUFFIX}; got {path.name}")
    if not isinstance(normalization, dict):
        raise InputError(f"normalization must be a dict, got {type(normalization).__name__}")
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "segmote_version": __version__,
        "backbone": model.backbone.name,
        "backbone_sha256": _check_sha256(backbone_sha256, "backbone_sha256"),
        "input_size": int(model.backbone.input_size),
        "early_channels": int(model.backbone.early_channels),
        "config": model.config.to_dict(),
        "classes": [{"name": c.name, "color": list(c.color)}
                    for c in _normalise_classes(classes, model.config.num_classes)],
        "normalization": _json_ready(normalization, "normalization"),
        "extra": _json_ready(extra or {}, "extra"),
    }
    # Own, contiguous CPU copies: safetensors refuses shared or strided storage.
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in model.adapter_state_dict().items()}

    # 0644: an adapter is meant to be shared
    return atomic_write(path, lambda temporary: save_file(tensors, str(temporary),
                                                          metadata={HEADER_KEY: json.dumps(header)}), mode=0o644)


# ---- reading -------------------------------------------------------------------------------------------
def _refuse_unsafe_or_missing(path: Path) -> None:
    if not path.exists():
        raise missing_adapter_error(path)
    if not path.is_file():
        raise CheckpointError(f"adapter path {path} is not a file")
    with open(path, "rb") as file:
        start = file.read(9)
    # A safetensors file opens with an 8-byte little-endian header length and then '{'; that length's first
    # byte can be 0x80 (like a pickle's), so only a file that is not laid out that way is judged by its magic.
    looks_like_safetensors = len(start) == 9 and start[8:9] == b"{"
    if path.suffix.lower() in PICKLE_SUFFIXES or (not looks_like_safetensors and start.startswith(_PICKLE_MAGICS)):
        raise CheckpointError(
            f"refusing {path.name}: it is a pickle-based torch file, which can contain pickled code; "
            f"SegMoTE adapters are {SUFFIX} files"
        )


def read_adapter_header(path: str | os.PathLike) -> dict:
    """The JSON header of an adapter file, checked for format and version; no tensors are read."""
    from safetensors import safe_open

    path = resolve_adapter(path)
    _refuse_unsafe_or_missing(path)
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for every kind of damage
        raise CheckpointError(f"adapter {path.name} is truncated or corrupt ({one_line(error)})") from None
    if HEADER_KEY not in metadata:
        raise CheckpointError(f"{path.name} is a safetensors file but not a SegMoTE adapter (no '{HEADER_KEY}' header)")
    try:
        header = json.loads(metadata[HEADER_KEY])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"adapter {path.name} has a corrupt header ({one_line(error)})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{path.name} is not a SegMoTE adapter (header format {header.get('format')!r})"
                              if isinstance(header, dict) else f"adapter {path.name} has a corrupt header")
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"adapter {path.name} uses format version {version!r}; this SegMoTE reads up to "
                              f"{FORMAT_VERSION}: update segmote")
    missing = [key for key in ("backbone", "config", "classes", "input_size") if key not in header]
    if missing:
        raise CheckpointError(f"adapter {path.name} has a corrupt header (missing {', '.join(missing)})")
    problem = _header_schema_problem(header)
    if problem:
        raise CheckpointError(f"adapter {path.name} has a corrupt header ({problem})")
    return header


def _header_schema_problem(header: dict) -> str | None:
    """What in a header does not fit the schema in the module docstring (None if it fits)."""
    def positive_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    if not isinstance(header["backbone"], str):
        return f"backbone must be a name, got {header['backbone']!r}"
    for key in ("input_size", "early_channels"):
        if key in header and not positive_int(header[key]):
            return f"{key} must be a positive integer, got {header[key]!r}"
    if not isinstance(header["config"], dict):
        return f"config must be an object, got {type(header['config']).__name__}"
    count = header["config"].get("num_classes", 1)
    if positive_int(count) and count > MAX_CLASSES:
        return f"{count} classes; an adapter holds at most {MAX_CLASSES}"
    for key, kind in (("normalization", dict), ("extra", dict), ("backbone_sha256", (str, type(None)))):
        if key in header and not isinstance(header[key], kind):
            return f"{key} has the wrong type ({type(header[key]).__name__})"
    classes = header["classes"]
    if not isinstance(classes, list) or not all(isinstance(c, dict) for c in classes):
        return "classes must be a list of {name, color} objects"
    try:
        _normalise_classes([(c.get("name"), c.get("color", palette_color(0))) for c in classes], len(classes))
    except InputError as error:
        return str(error)
    return None


def class_indices(header: dict, requested: Iterable[str]) -> list[int]:
    """Indices of the requested class names in an adapter header; unknown names raise InputError naming them."""
    names = [c["name"] for c in header["classes"]]
    requested = list(requested)
    unknown = [name for name in requested if name not in names]
    if unknown:
        raise InputError(f"the adapter has no class {', '.join(map(repr, unknown))}; it has: {', '.join(names)}")
    return [names.index(name) for name in requested]


def load_adapter(
    path: str | os.PathLike,
    backbone_name: str,
    backbone_sha256: str | None = None,
    classes: Iterable[str] | None = None,
) -> tuple[SegMoTEConfig, dict, dict[str, torch.Tensor]]:
    """Read an adapter for the backbone ``backbone_name`` -> (config, header, adapter state dict on CPU).

    backbone_sha256: SHA-256 of the loaded backbone weights; refused if the adapter names other weights.
    classes: names the caller needs; any the adapter lacks raise InputError naming them.
    """
    from safetensors.torch import load_file

    path = resolve_adapter(path)
    header = read_adapter_header(path)
    if header["backbone"] != backbone_name:
        raise CheckpointError(f"adapter {path.name} was trained for {header['backbone']}, "
                              f"but the loaded backbone is {backbone_name}")
    wanted_sha = _check_sha256(backbone_sha256, "backbone_sha256")
    trained_sha = header.get("backbone_sha256")
    if wanted_sha and trained_sha and wanted_sha != trained_sha.lower():
        raise CheckpointError(f"adapter {path.name} was trained on {backbone_name} weights {trained_sha[:12]}…, "
                              f"but the loaded weights are {wanted_sha[:12]}…")
    try:
        config = SegMoTEConfig.from_dict(header["config"])
    except (InputError, TypeError, AttributeError) as error:
        raise CheckpointError(f"adapter {path.name} has an unusable config ({one_line(error)})") from None
    if len(header["classes"]) != config.num_classes:
        raise CheckpointError(f"adapter {path.name} names {len(header['classes'])} classes but its config has "
                              f"{config.num_classes}")
    if classes is not None:
        class_indices(header, classes)
    try:
        state_dict = load_file(str(path), device="cpu")
    except Exception as error:
        raise CheckpointError(f"adapter {path.name} is truncated or corrupt ({one_line(error)})") from None
    for key, tensor in state_dict.items():
        if not tensor.is_floating_point():
            raise CheckpointError(f"adapter {path.name}: tensor {key} holds {tensor.dtype}, not floating-point weights")
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"adapter {path.name}: tensor {key} holds NaN or infinite values (a diverged training?)")
    return config, header, state_dict


def load_segmote(
    path: str | os.PathLike, backbone: Backbone, backbone_sha256: str | None = None
) -> tuple[SegMoTE, dict]:
    """Build a SegMoTE model around ``backbone`` from an adapter file or a shipped adapter's name -> (model in eval
    mode, header)."""
    path = resolve_adapter(path)
    config, header, state_dict = load_adapter(path, backbone.name, backbone_sha256)
    for key, actual in (("input_size", backbone.input_size), ("early_channels", backbone.early_channels)):
        if key in header and header[key] != actual:
            raise CheckpointError(f"adapter {path.name} expects {key} {header[key]}, but the loaded "
                                  f"{backbone.name} has {actual}")
    model = SegMoTE(backbone, config)
    model.load_adapter_state_dict(state_dict)
    return model.to(backbone.device).eval(), header
