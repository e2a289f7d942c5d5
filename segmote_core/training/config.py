"""The training config: a typed ``TrainConfig`` from YAML and/or flags; unknown keys are refused, each value is
type-checked against its field's annotation."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import InputError
from ..models.segmote import SegMoTEConfig
from ..toolbox import one_line


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
        if self.threads is not None and self.threads < 1:
            raise InputError(f"config: threads must be 1 or more (or left out for one per core), got {self.threads}")
        if not 0 <= self.seed < 2**32:
            raise InputError(f"config: seed must be a whole number from 0 to {2**32 - 1}, got {self.seed}")
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
    if origin in (typing.Union, types.UnionType):
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


MAX_CONFIG_BYTES = 1 << 20


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without aliases: `*name` copies a node, and nested copies (a "billion laughs" file of a few
    hundred bytes) expand to gigabytes. A training config never needs them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError(f"aliases (*{self.peek_event().anchor}) are not accepted in a config; "
                                 "write the value out")
        return super().compose_node(parent, index)


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """YAML file (optional) then overrides (flags) -> TrainConfig."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"config file not found: {path}")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise InputError(f"config {path.name} holds {path.stat().st_size >> 20} MiB; a config is at most "
                             f"{MAX_CONFIG_BYTES >> 20} MiB")
        try:
            loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_NoAliasLoader) or {}  # noqa: S506 - safe
        except UnicodeDecodeError:
            raise InputError(f"config {path.name} is not UTF-8 text") from None
        except yaml.YAMLError as error:
            raise InputError(f"config {path.name} is not valid YAML: {one_line(error, 200)}") from None
        if not isinstance(loaded, dict):
            raise InputError(f"config {path.name} must be a mapping of keys to values")
        make_config(loaded, f"config {path.name}")  # refuse unknown keys naming the file
        values.update(loaded)
    values.update(overrides or {})
    return make_config(values, f"config {Path(path).name}" if path else "config")

