"""The engine: load a model once, embed slices once, answer many prompts.

Coordinates: prompts arrive in continuous voxel indices (i, j, k) of the volume (``Volume.ras_to_ijk`` converts
RAS millimetres); masks come back as bool arrays in the volume's own (K, J, I) grid. Internally every slice is
taken from a ``SliceStack`` (slicing follows the anatomy), and in a slice x = column, y = row.

Embeddings are cached per (slice content, normalisation, backbone weights, encoder runtime), so a second prompt on
a slice runs only the decoder, and a changed volume or window never reuses a stale embedding. Engines on the same
backbone can share one cache (``embedding_cache``): each finds what the others embedded with the same encoder.

Prompts on an object are answered by an interactive session (``Engine.open`` -> ``segmote_core.session``), which
holds the object's 3-D state and decides which decoder answers what; the engine serves it single slices.

Why one module of about 650 lines: the Engine's parts (preparing a volume, the embedding cache and its batched
encoder loop with the out-of-memory fallback, the slice decoder and its answer to clicks, automatic segmentation)
share its cache key and device state; the rules they use live elsewhere (normalize, volume, boxes, models,
metrics).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from . import boxes
from .checkpoints import load_backbone
from .devices import default_cache_bytes, default_encoder_batch, release_free_heap, resolve_device, tune_cpu_allocator
from .errors import Cancelled, InputError, SegMoTEError
from .normalize import Normalization, check_rule, choose_normalization, normalize
from .segmentation_io import Segment
from .toolbox import mask_extent, one_line
from .volume import SliceStack, Volume, check_contrast

if TYPE_CHECKING:  # the session module imports this one
    from .session import Session

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]
SliceFn = Callable[[int, np.ndarray], None]  # (slice index along the slicing axis, the (K, J, I) mask so far)
AUTO_OBJECTNESS = 0.5  # PPT objectness from which a class counts as present on a slice (automatic segmentation)
# ... and from which its mask may answer a click: only where the adapter is sure (trained adapters give 0.99 on
# the lung slices of the chest CT; an untrained one about 0.5, so it answers clicks exactly like the base model).
CLICK_OBJECTNESS = 0.9
CLASS_ANSWERS_KEPT = 16  # slices whose automatic class answers are kept for further clicks
TRIM_EVERY = 32  # batches of automatic segmentation between two trims of the heap (the tuned allocator's growth)
# Answers to boxes alone kept per slice, for the last few slices (a 512² answer holds about 0.5 MB): a click's box
# search asks up to 10 boxes, and a click on the same spot asks the same ones again.
BOX_ANSWERS_PER_SLICE = 32
BOX_ANSWER_SLICES = 2


class _MovedToCpu(Exception):
    """Internal: the engine moved to the CPU mid-run; tensors computed before are on another device."""


class EmbeddingCache:
    """LRU cache of slice embeddings with a byte budget (thread-safe).

    keep_early: keep each slice's early feature even for engines that need none, so that an adapter's engine
    sharing the cache finds every slice the base model's engine embedded (an entry takes ~1.6x the bytes)."""

    def __init__(self, max_bytes: int = 2 << 30, keep_early: bool = False):
        self.max_bytes = max_bytes
        self.keep_early = keep_early
        self._items: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.misses = 0  # slices embedded, for tests and benchmarks

    @staticmethod
    def _size(value) -> int:
        return sum(t.numel() * t.element_size() for t in value if t is not None)

    def get(self, key):
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key, value) -> None:
        with self._lock:
            if key in self._items:
                self._bytes -= self._size(self._items.pop(key))
            self._items[key] = value
            self._bytes += self._size(value)
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= self._size(old)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


@dataclass
class Prepared:
    """A volume made ready for prompting along one axis with one normalisation."""

    volume: Volume
    stack: SliceStack
    normalization: Normalization
    key: tuple
    # Whether the frozen decoder gets its own input for boxes (an adapter's rule was chosen automatically): the box
    # search behind a click asks it with the input it was trained for (segmote_core.boxes). Resolved on first use.
    boxes_have_own_input: bool = False
    box_normalization: Normalization | None = None

    @property
    def num_slices(self) -> int:
        return self.stack.shape[0]

    @property
    def slice_shape(self) -> tuple[int, int]:
        return self.stack.shape[1:]

    def slice01(self, index: int) -> np.ndarray:
        return normalize(self.stack.to_stack(self.volume.array)[index], self.normalization)

    def embedding_key(self, index: int, early: bool) -> tuple:
        """The embedding cache's key for one slice: its voxels rather than its volume's (see
        ``SliceStack.slice_fingerprints``), the normalisation, the weights; early: with the early feature."""
        return (self.stack.slice_fingerprints()[index], *self.key[1:], early)


@dataclass
class SlicePrediction:
    mask: np.ndarray  # bool (H, W) on the slice grid
    low_res_logits: torch.Tensor  # (1, 1, 256, 256), usable as the next pass's mask prompt
    score: float  # predicted IoU


class Engine:
    """Holds one backbone (and optionally a SegMoTE adapter) and serves prompts on volumes."""

    def __init__(self, model: str = "lite_medsam", checkpoint=None, device: str = "auto", adapter=None,
                 cache_bytes: int | None = None, batch_size: int | None = None, backbone=None,
                 precision: str = "fp32", compile: bool = False, runtime: str | None = None,
                 tune_allocator: bool = True, embedding_cache: "EmbeddingCache | None" = None):
        """backbone: an already built ``Backbone`` (tests, benchmarks, random weights) instead of `model` +
        `checkpoint`; precision: "fp32", or "bf16" to run the image encoder under bfloat16 autocast (GPUs), or on
        OpenVINO at bf16 (CPUs with native bf16: ~1.75x faster, but masks differ from fp32's; CPUs without it run
        PyTorch bf16 ~13x slower, docs/benchmarks.md); compile: torch.compile the image encoder
        (GPUs: the first run on a machine compiles for a minute or so, later runs load the kernels from disk);
        runtime: "torch", "onnx" (ONNX Runtime), "openvino", or "auto" (CPUs: the fastest installed one; GPUs
        and compile: torch), see segmote_core/runtime.py; None: $SEGMOTE_RUNTIME, else "auto";
        tune_allocator: on CPUs, tune glibc's allocator for the whole process (faster encoder passes; off inside a
        host application such as 3D Slicer, whose own buffers would then never be returned to the system);
        embedding_cache: another engine's ``cache``, to share it (an engine with an adapter beside the base model's,
        a report's base and tuned engines): entries are keyed by the encoder that computed them, so engines on
        other runtimes or weights share the budget but never each other's embeddings; cache_bytes is then unused."""
        self.device = resolve_device(device)
        if self.device.type == "cpu" and tune_allocator:
            tune_cpu_allocator()
        if precision not in ("fp32", "bf16"):
            raise InputError(f"precision must be fp32 or bf16, got {precision!r}")
        self.precision = precision
        if backbone is not None:
            backbone.requires_grad_(False)
            self.backbone = backbone.eval().to(self.device)
            model = backbone.name
        else:
            self.backbone = load_backbone(model, checkpoint, self.device)
        self.model_name = model
        self._prefetchers: list[threading.Thread] = []
        self._prefetch_generation = 0
        self.cache = embedding_cache or EmbeddingCache(cache_bytes or default_cache_bytes(self.device))
        self.batch_size = batch_size or default_encoder_batch(self.device)
        self.encode = self.backbone.encode  # the image encoder as the engine calls it
        self.compiled = False
        if compile:
            self._compile_encoder()
        self.segmote = None
        self.adapter_header: dict | None = None
        self._class_masks: OrderedDict = OrderedDict()  # (prepared key, slice) -> automatic answers per class
        self._box_inputs: OrderedDict = OrderedDict()  # (scan fingerprint, modality) -> the frozen decoder's input
        self._box_answers: OrderedDict = OrderedDict()  # (prepared key, slice) -> {box bytes: answer to the box alone}
        self.notices: list[str] = []  # things the user should know (shown by the CLI and the Slicer panel)
        self.runtime, self._fast, self._fast_decoder, self._fast_auto = "torch", None, False, False
        if adapter is not None:
            self.load_adapter(adapter)
        self._use_runtime(runtime or os.environ.get("SEGMOTE_RUNTIME", "auto"))
        release_free_heap()  # what the weights' loading and the exported graphs' probes used

    # ---- CPU runtimes (ONNX Runtime / OpenVINO) ------------------------------------------------------
    def _use_runtime(self, runtime: str) -> None:
        """Run the encoder and the prompt decoder on an exported graph; anything missing or failing: PyTorch and
        one notice."""
        from . import runtime as runtimes

        chosen = runtimes.choose(runtime, self.device)
        if chosen == "torch":
            if runtime == "auto" and self.device.type == "cpu" and not self.compiled:
                self.notices.append("no faster CPU runtime is installed: using PyTorch (pip install 'segmote[cpu]' "
                                    "for OpenVINO, about twice as fast on CPUs)")
            return
        precision = runtimes.exported_precision(self.precision, chosen)
        if precision is None or self.compiled:
            if runtime != "auto":
                self.notices.append(f"runtime {runtime} runs fp32 (bf16: OpenVINO on CPUs with native bf16) without "
                                    "torch.compile: using PyTorch")
            return
        if not runtimes.installed(chosen):
            self.notices.append(f"{runtimes._RUNTIME_PACKAGES[chosen]} is not installed: using PyTorch "
                                "(pip install 'segmote[cpu]' for the faster CPU runtimes)")
            return
        try:
            self._fast = runtimes.FastPaths(chosen, self.backbone, encoder_precision=precision)
        except Exception as error:  # noqa: BLE001 - any export/runtime failure: PyTorch still works
            self.notices.append(f"could not export the image encoder for {chosen} "
                                f"({one_line(error, 200, named=True)}): using PyTorch")
            return
        self.encode, self.runtime = self._fast.encode, chosen
        self._use_fast_decoder()

    def _use_fast_decoder(self) -> None:
        """The exported prompt decoder for the current adapter (or none), exported on first use."""
        self._fast_decoder = self._fast_auto = False
        if self._fast is None:
            return
        self._fast_decoder = self._exported("prompt decoder", "prompts", lambda: self._fast.use_decoder(self.segmote))
        if self._fast_decoder and self.segmote is not None:
            self._fast_auto = self._exported("automatic decoder", "automatic segmentation",
                                             lambda: self._fast.use_auto_decoder(self.segmote))

    def _exported(self, part: str, used_for: str, export: Callable[[], None]) -> bool:
        """Whether `export` (of a decoder graph) worked; if not, one notice, and PyTorch stays for `used_for`."""
        try:
            export()
            return True
        except Exception as error:  # noqa: BLE001 - any export/runtime failure: PyTorch still works
            self.notices.append(f"could not export the {part} for {self.runtime} "
                                f"({one_line(error, 200, named=True)}): using PyTorch for {used_for}")
            return False

    @property
    def runtime_description(self) -> str:
        """What runs the image encoder, in words: "OpenVINO, encoder f32", "PyTorch fp32 on cpu", ..."""
        if self._fast is None:
            return f"PyTorch {self.precision}{' compiled' if self.compiled else ''} on {self.device}"
        name = {"openvino": "OpenVINO", "onnx": "ONNX Runtime"}[self.runtime]
        return f"{name}, encoder {self._fast.models['encoder']['precision']}"

    @property
    def runtime_models(self) -> dict[str, dict]:
        """The exported graphs that run now (part -> the file, its SHA-256, how it was checked), each checked
        against the weights; empty on PyTorch. A decoder that could not be exported (prompt or automatic) is not
        among them."""
        if self._fast is None:
            return {}
        running = {"decoder": self._fast_decoder, "auto decoder": self._fast_auto, "auto refinement": self._fast_auto}
        return {part: found for part, found in self._fast.models.items() if running.get(part, True)}

    # ---- adapters ----------------------------------------------------------------------------------
    def load_adapter(self, path) -> None:
        """Use a SegMoTE adapter (MoTE decoder for prompts, PPT for automatic segmentation)."""
        from .adapters import load_segmote

        segmote, header = load_segmote(path, self.backbone, getattr(self.backbone, "weights_sha256", None))
        if header.get("normalization"):
            check_rule(header["normalization"], f"adapter {getattr(path, 'name', path)}:")
        self.segmote, self.adapter_header = segmote, header
        self.segmote.to(self.device).eval()
        # The embedding cache stays: the encoder is the same, and an adapter looks its slices up with their early
        # features, which entries embedded without one lack (the LRU budget retires those).
        self._class_masks.clear()
        self._box_answers.clear()  # which decoder answers a box alone may have changed
        self._use_fast_decoder()
        release_free_heap()

    @property
    def adapter_rule(self) -> dict | None:
        """The normalisation rule the loaded adapter was trained with (None: no adapter, or none stored)."""
        return (self.adapter_header or {}).get("normalization") or None

    @property
    def boxes_go_to_base(self) -> bool:
        """Whether a box without points is answered by the frozen decoder (no adapter, or its boxes_to_base)."""
        return self.segmote is None or bool(self.segmote.config.boxes_to_base)

    def unload_adapter(self) -> None:
        """Back to the plain backbone decoder (cached embeddings stay valid)."""
        self.segmote, self.adapter_header = None, None
        self._class_masks.clear()
        self._box_answers.clear()  # which decoder answers a box alone may have changed
        self._use_fast_decoder()

    @property
    def needs_early_features(self) -> bool:
        return self.segmote is not None

    # ---- preparing a volume ------------------------------------------------------------------------
    def prepare(self, volume: Volume, axis: int | None = None, normalization: Normalization | None = None,
                window=None, preset: str | None = None) -> Prepared:
        """The volume as the model sees it along one axis. axis: voxel axis to slice along (None: closest to
        superior-inferior); window: (level, width); preset: a CT_WINDOWS name. Neither: the adapter's stored rule,
        else the backbone's default for the scan's modality (``choose_normalization``);
        ``prepared.normalization.description`` says which and why. Boxes alone are answered on ``_for_boxes``:
        an adapter that sends them to the frozen decoder (``boxes_to_base``) then gives that decoder the input it
        was trained for, so a box alone is answered exactly as without the adapter."""
        if min(volume.shape_ijk) < 1:
            raise InputError(f"the image is empty: {volume.shape_ijk}")
        check_contrast(volume)
        own_input = False
        if normalization is None:
            base_rule = self.adapter_rule is None
            normalization = choose_normalization(
                volume.array, window, preset, modality=getattr(volume, "modality", None), backbone=self.model_name,
                adapter_rule=None if base_rule else self.adapter_rule)
            own_input = not base_rule and self.boxes_go_to_base and window is None and preset is None
        stack = SliceStack.for_axis(volume, axis)
        # Weights without a recorded checksum (random ones, in tests and benchmarks) are told apart by their object.
        weights = getattr(self.backbone, "weights_sha256", None) or f"backbone object {id(self.backbone)}"
        key = (stack.fingerprint(), normalization.key(), self.model_name, weights, self.runtime_description)
        return Prepared(volume, stack, normalization, key, own_input)

    def boxes_view(self, prepared: Prepared) -> Prepared:
        """The view a box alone is answered on: the same volume with the frozen decoder's input for boxes (itself
        when that is the same)."""
        if not prepared.boxes_have_own_input:
            return prepared
        if prepared.box_normalization is None:  # once per scan content, not per prompt: it reads every voxel
            modality = getattr(prepared.volume, "modality", None)
            found = self._box_inputs.get((prepared.key[0], modality))
            if found is None:
                found = choose_normalization(prepared.volume.array, modality=modality, backbone=self.model_name)
                self._box_inputs[(prepared.key[0], modality)] = found
                while len(self._box_inputs) > CLASS_ANSWERS_KEPT:
                    self._box_inputs.popitem(last=False)
            prepared.box_normalization = found
        if prepared.box_normalization.key() == prepared.normalization.key():
            # the same input (the adapter's rule did not apply): the same embeddings, described as without it
            return Prepared(prepared.volume, prepared.stack, prepared.box_normalization, prepared.key)
        key = (prepared.key[0], prepared.box_normalization.key(), *prepared.key[2:])
        return Prepared(prepared.volume, prepared.stack, prepared.box_normalization, key)

    # ---- embeddings ------------------------------------------------------------------------------------
    def embeddings(self, prepared: Prepared, indices: Sequence[int], progress: ProgressFn | None = None,
                   cancel: CancelFn | None = None, keep: bool = True) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
        """Embeddings of the given slices, computing the missing ones in batches; keep: put them in the cache."""
        try:
            return self._embeddings(prepared, indices, progress, cancel, keep)
        except _MovedToCpu:  # out of GPU memory even at batch 1: everything restarts on the CPU
            return self._embeddings(prepared, indices, progress, cancel, keep)

    def add_embeddings(self, prepared: Prepared, computed: dict[int, tuple[np.ndarray, np.ndarray | None]]) -> None:
        """Cache embeddings computed elsewhere by the same encoder on the same normalised slices (a training run's
        embedding store), so they are not computed again. computed: slice index -> (embedding (256, h, w), early
        feature (C, h, w), needed only with an adapter)."""
        early = self.needs_early_features
        for index, (embedding, early_feature) in computed.items():
            if early and early_feature is None:
                raise InputError(f"slice {index}: the adapter needs the early feature, none was given")
            value = (torch.from_numpy(np.array(embedding, dtype=np.float32))[None].to(self.device),
                     torch.from_numpy(np.array(early_feature, dtype=np.float32))[None].to(self.device)
                     if early else None)
            self.cache.put(prepared.embedding_key(index, early), value)

    def embedding_bytes(self) -> int:
        """Bytes one slice's cache entry takes (embedding, plus the early feature when an adapter needs it or the
        cache keeps it)."""
        height, width = self.backbone.embedding_size
        early = self.needs_early_features or self.cache.keep_early
        channels = self.backbone.prompt_encoder.embed_dim + (self.backbone.early_channels if early else 0)
        return channels * height * width * 4

    def _embeddings(self, prepared, indices, progress, cancel, keep=True):
        early = self.needs_early_features
        found, missing = {}, []
        for index in indices:
            value = self.cache.get(prepared.embedding_key(index, early))
            if value is None and not early:  # embedded for an adapter: its embedding serves without one too
                with_early = self.cache.get(prepared.embedding_key(index, True))
                value = None if with_early is None else (with_early[0], None)
            if value is None:
                missing.append(index)
            else:
                found[index] = value

        stored_early = early or self.cache.keep_early

        def computed(index: int, embedding: torch.Tensor, early_feature: torch.Tensor) -> None:
            value = (embedding.clone(), early_feature.clone() if stored_early else None)
            if keep:
                self.cache.put(prepared.embedding_key(index, stored_early), value)
            found[index] = value if early else (value[0], None)

        self._encode(prepared, missing, computed, progress, cancel, len(found), len(indices))
        return found

    def _encode(self, prepared: Prepared, indices: Sequence[int], computed, progress: ProgressFn | None,
                cancel: CancelFn | None, done: int, total: int) -> None:
        """The encoder loop: embed the slices in batches (halved on out-of-memory), calling computed(index,
        embedding (1, 256, h, w), early feature (1, C, h, w)) for each."""
        if progress:
            progress(done, total)
        stack = prepared.stack.to_stack(prepared.volume.array)
        start = 0
        while start < len(indices):
            if cancel and cancel():
                raise Cancelled("cancelled while embedding slices; nothing was changed")
            batch = indices[start:start + self.batch_size]
            try:
                with torch.inference_mode():
                    x = self.backbone.preprocess(self._normalized_batch(stack, batch, prepared.normalization))
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                        embedding, early_feature = self.encode(x)
                    embedding, early_feature = embedding.float(), early_feature.float()
            except torch.OutOfMemoryError:
                self._after_out_of_memory(len(batch))
                continue  # same start, smaller batch
            for offset, index in enumerate(batch):
                computed(index, embedding[offset:offset + 1], early_feature[offset:offset + 1])
                self.cache.misses += 1
            start += len(batch)
            done += len(batch)
            if progress:
                progress(done, total)

    def store_embeddings(self, prepared: Prepared, indices: Sequence[int], store, progress: ProgressFn | None = None,
                         cancel: CancelFn | None = None) -> int:
        """Make sure an on-disk ``EmbeddingStore`` (made for this backbone and ``prepared.normalization``) holds the
        given slices: entries missing or failing their checksums are embedded by this engine's encoder and written;
        the in-memory cache is left alone. Returns how many slices were embedded."""
        stack = prepared.stack.to_stack(prepared.volume.array)
        keys = {index: store.key(stack[index]) for index in indices}
        missing = [index for index in indices if store.load(keys[index]) is None]

        def computed(index: int, embedding: torch.Tensor, early_feature: torch.Tensor) -> None:
            store.write(keys[index], embedding[0].cpu().numpy(), early_feature[0].cpu().numpy())

        try:
            self._encode(prepared, missing, computed, progress, cancel, len(indices) - len(missing), len(indices))
        except _MovedToCpu:  # out of GPU memory even at batch 1: the rest is embedded on the CPU
            rest = [index for index in missing if store.load(keys[index]) is None]
            self._encode(prepared, rest, computed, progress, cancel, len(indices) - len(rest), len(indices))
        return len(missing)

    def _compile_encoder(self) -> None:
        """torch.compile (inductor) the image encoder for two static shapes, batch 1 (interactive) and the engine's
        batch size (other sizes are padded to it), so it never recompiles mid-volume. Compiled kernels are cached
        on disk (TORCHINDUCTOR_CACHE_DIR, default <SegMoTE cache>/inductor) and reused by later processes."""
        import os

        from .weights import user_cache_dir

        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(user_cache_dir("inductor")))
        # SEGMOTE_COMPILE_BACKEND: another torch.compile backend (tests use aot_eager: the same capture, no codegen)
        compiled = torch.compile(self.backbone.encode, dynamic=False,
                                 backend=os.environ.get("SEGMOTE_COMPILE_BACKEND", "inductor"))

        def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            count = x.shape[0]
            if count == 1 or count == self.batch_size:
                return compiled(x)
            padding = x.new_zeros((self.batch_size - count,) + tuple(x.shape[1:]))
            embedding, early = compiled(torch.cat([x, padding]))
            return embedding[:count], early[:count]

        self.encode = encode
        self.compiled = True

    def _normalized_batch(self, stack: np.ndarray, batch: Sequence[int], normalization) -> torch.Tensor:
        """(B, H, W) float slices in [0, 1] on the compute device. The CPU normalises in numpy (bit-identical to
        training's embedding store); a GPU gets the raw intensities through page-locked memory (asynchronous copy,
        int16 is half the bytes of float32) and normalises them itself."""
        if self.device.type == "cpu":
            return torch.from_numpy(np.stack([normalize(stack[i], normalization) for i in batch]))
        raw = np.stack([stack[i] for i in batch])
        if raw.dtype.kind == "u" and raw.dtype.itemsize > 1:  # torch has no arithmetic on uint16/32/64
            raw = raw.astype(np.int32 if raw.dtype.itemsize == 2 else np.int64)
        images = torch.from_numpy(raw)
        if self.device.type == "cuda":
            images = images.pin_memory()
        return normalize(images.to(self.device, non_blocking=True), normalization)

    def _after_out_of_memory(self, batch: int) -> None:
        """Out of memory: halve the batch; at batch 1 on a GPU, move to the CPU and say so; else give up."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if batch > 1:
            self.batch_size = max(1, batch // 2)
            self.notices.append(f"out of memory: embedding batch reduced to {self.batch_size}")
            return
        if self.device.type != "cpu":
            previous = self.device
            self.device = torch.device("cpu")
            self.backbone.to(self.device)
            if self.segmote is not None:
                self.segmote.to(self.device)
            self.cache.clear()
            self.notices.append(f"out of memory on {previous} even for one slice: continuing on the CPU")
            raise _MovedToCpu()
        raise SegMoTEError("out of memory while embedding one slice on the CPU; close other programs or crop "
                           "the image")

    def prefetch(self, prepared: Prepared, centre: int, radius: int = 8) -> None:
        """Embed the slices around `centre` (nearest first) in a background thread while the user works.

        A new call supersedes the previous one (its remaining slices are dropped); the cache is thread-safe, and a
        prompt on a slice that is not embedded yet simply embeds it in the foreground (a slice that both threads
        embed at the same moment is computed twice, harmlessly). Use it where the encoder
        does not compete with the prompt for the same cores (a GPU, or a CPU with cores to spare): on 2 CPU cores
        it doubles the latency of concurrent prompts (docs/benchmarks.md)."""
        order = sorted(range(max(0, centre - radius), min(prepared.num_slices, centre + radius + 1)),
                       key=lambda i: (abs(i - centre), i))
        self._prefetch_generation += 1
        generation = self._prefetch_generation

        def work():
            for index in order:
                if generation != self._prefetch_generation:
                    return
                self.embeddings(prepared, [index])

        thread = threading.Thread(target=work, name="segmote-prefetch", daemon=True)
        self._prefetchers = [t for t in self._prefetchers if t.is_alive()] + [thread]
        thread.start()

    def stop_prefetch(self, wait: bool = True) -> None:
        """Drop the remaining background work (a slice being embedded finishes; with wait, this waits for it)."""
        self._prefetch_generation += 1
        if wait:
            self.wait_prefetch()

    @property
    def prefetching(self) -> bool:
        """Whether background embedding is still running."""
        return any(thread.is_alive() for thread in self._prefetchers)

    def wait_prefetch(self) -> None:
        """Block until all background embedding has ended (tests, benchmarks, before closing a volume)."""
        for thread in self._prefetchers:
            thread.join()
        self._prefetchers = []

    # ---- one slice -------------------------------------------------------------------------------------
    def predict_slice(self, prepared: Prepared, index: int, points: np.ndarray | None = None,
                      point_labels: np.ndarray | None = None, box: np.ndarray | None = None,
                      mask_input: torch.Tensor | None = None) -> SlicePrediction:
        """Prompt one slice. points: (N, 2) slice xy; point_labels: (N,) 1/0; box: (4,) x0 y0 x1 y1.

        Clicks without a box (or mask) are answered with the box around the object under them (segmote_core.boxes):
        an adapter class's automatic mask, else the frozen decoder's surest box answer that fits the clicks, else
        the decoder's own answer to the clicks."""
        if points is None and box is None:
            raise InputError("give at least one point or a box")
        if points is not None and box is None and mask_input is None:
            labels = np.ones(len(points), int) if point_labels is None else np.asarray(point_labels)
            return self._answer_clicks(prepared, index, np.asarray(points, float), labels)
        return self._decode_slice(prepared, index, points, point_labels, box, mask_input)

    def _answer_clicks(self, prepared: Prepared, index: int, points: np.ndarray, labels: np.ndarray) -> SlicePrediction:
        # The adapter answers clicks only on scans its rule fits (a lung adapter knows nothing of an MR).
        in_domain = self.segmote is not None and prepared.normalization.adapter_applies
        if in_domain:
            answers = self._class_answers(prepared, index)
            chosen = boxes.class_under_clicks(answers, points, labels)
            if chosen is not None:
                position, mask, score = chosen
                return SlicePrediction(mask, answers[position].low_res_logits, score)
        for_boxes = self.boxes_view(prepared)
        found = boxes.search_box(lambda box: self._decode_slice(for_boxes, index, box=box),
                                 for_boxes.slice01(index), points, labels,
                                 decode_boxes=lambda many: self.decode_boxes(for_boxes, index, many))
        return found or self._decode_slice(prepared, index, points, labels, frozen=not in_domain)

    def _class_answers(self, prepared: Prepared, index: int) -> list[SlicePrediction | None]:
        """The adapter's automatic answer per class on one slice (None where objectness says absent); the last
        few slices are kept, so that more clicks on a slice cost no decoder pass."""
        key = (prepared.key, index)
        if key not in self._class_masks:
            embedding, early = self.embeddings(prepared, [index])[index]
            answers = []
            with torch.inference_mode():
                logits, iou, present = self._decode_classes(embedding, early, range(self.segmote.config.num_classes),
                                                            1, CLICK_OBJECTNESS)
                for row, kept in enumerate(present.tolist()):
                    mask = (self.backbone.postprocess(logits[row:row + 1], prepared.slice_shape)[0, 0] > 0).cpu().numpy()
                    answers.append(SlicePrediction(mask, logits[row:row + 1], float(iou[row, 0])) if kept else None)
            while len(self._class_masks) >= CLASS_ANSWERS_KEPT:
                self._class_masks.popitem(last=False)
            self._class_masks[key] = answers
        return self._class_masks[key]

    def _decode_slice(self, prepared: Prepared, index: int, points: np.ndarray | None = None,
                      point_labels: np.ndarray | None = None, box: np.ndarray | None = None,
                      mask_input: torch.Tensor | None = None, frozen: bool = False) -> SlicePrediction:
        """One decoder pass on one slice, as prompted; frozen: the backbone's own decoder even with an adapter."""
        embedding, early = self.embeddings(prepared, [index])[index]
        shape = prepared.slice_shape
        to_model = self.backbone.slice_to_model_xy
        with torch.inference_mode():
            pts = lbl = bx = None
            if points is not None:
                pts = to_model(torch.as_tensor(points, dtype=torch.float32, device=self.device)[None], shape)
                lbl = torch.as_tensor(point_labels, dtype=torch.int64, device=self.device)[None]
            if box is not None:
                corners = torch.as_tensor(box, dtype=torch.float32, device=self.device).view(1, 2, 2)
                bx = to_model(corners, shape).view(1, 4)
            box_alone_to_base = (self.segmote is not None and pts is None and bx is not None
                                 and self.segmote.config.boxes_to_base)  # the adapter's rule, on every runtime
            to_frozen = self.segmote is None or frozen or box_alone_to_base
            if self._fast_decoder:
                logits, iou = self._fast.decode(embedding, early, pts, lbl, bx, mask_input, frozen=to_frozen)
            elif to_frozen:
                logits, iou = self.backbone.decode(embedding, pts, lbl, bx, mask_input, multimask=False)
            else:
                out = self.segmote.decode(embedding, early, pts, lbl, bx, mask_input)
                logits, iou = out.logits, out.iou
            full = self.backbone.postprocess(logits, shape)
        return SlicePrediction((full[0, 0] > 0).cpu().numpy(), logits, float(iou[0, 0]))

    def decode_boxes(self, prepared: Prepared, index: int, boxes_xy) -> list[SlicePrediction]:
        """Boxes alone on one slice, (B, 4) x0 y0 x1 y1: each answered as ``_decode_slice(prepared, index, box=...)``
        answers it (the same decoder, the same mask to float rounding), all in one decoder call. The answers to the
        last few slices' boxes are kept, so that a box asked again (another click on the same spot, a click's
        refinement landing on a box already tried) costs no decoder pass."""
        boxes_xy = np.asarray(boxes_xy, float).reshape(-1, 4)
        key = (prepared.key, index)
        kept = self._box_answers.pop(key, {})
        self._box_answers[key] = kept  # most recently used last
        while len(self._box_answers) > BOX_ANSWER_SLICES:
            self._box_answers.popitem(last=False)
        missing = [row for row, box in enumerate(boxes_xy) if box.tobytes() not in kept]
        if missing:
            for box, answer in zip(boxes_xy[missing], self._decode_boxes(prepared, index, boxes_xy[missing])):
                if len(kept) >= BOX_ANSWERS_PER_SLICE:
                    kept.pop(next(iter(kept)))
                kept[box.tobytes()] = answer
        # copies of the masks: a caller that edits its answer must not edit the kept one
        return [SlicePrediction(kept[box.tobytes()].mask.copy(), kept[box.tobytes()].low_res_logits,
                                kept[box.tobytes()].score) for box in boxes_xy]

    def _decode_boxes(self, prepared: Prepared, index: int, boxes_xy: np.ndarray) -> list[SlicePrediction]:
        """One decoder call for boxes alone on one slice, routed as ``_decode_slice`` routes a box alone."""
        embedding, early = self.embeddings(prepared, [index])[index]
        shape = prepared.slice_shape
        with torch.inference_mode():
            corners = torch.as_tensor(boxes_xy, dtype=torch.float32, device=self.device).view(-1, 2, 2)
            bx = self.backbone.slice_to_model_xy(corners, shape).view(-1, 4)
            to_frozen = self.boxes_go_to_base
            if self._fast_decoder:
                logits, iou = self._fast.decode_boxes(embedding, early, bx, frozen=to_frozen)
            elif to_frozen:  # one embedding for many boxes: the mask decoder repeats it per box
                logits, iou = self.backbone.decode(embedding, boxes=bx, multimask=False)
            else:
                out = self.segmote.decode(embedding, early, boxes=bx)
                logits, iou = out.logits, out.iou
            masks = (self.backbone.postprocess(logits, shape)[:, 0] > 0).cpu().numpy()
        return [SlicePrediction(masks[row], logits[row:row + 1], float(iou[row, 0])) for row in range(len(boxes_xy))]

    # ---- volumes -------------------------------------------------------------------------------------
    def open(self, volume: Volume, axis: int | None = None, window=None, preset: str | None = None,
             fill_box: bool = False) -> "Session":
        """An interactive session on one object of `volume` (``segmote_core.session``): prompts, corrections and
        undo, each answered in 3-D. axis: the voxel axis to slice along (None: closest to superior-inferior);
        window: (level, width); preset: a CT_WINDOWS name; neither: the default rule (see ``prepare``)."""
        from .session import Session

        return Session(self, volume, axis, window=window, preset=preset, fill_box=fill_box)

    def segment(self, volume: Volume, box_ijk=None, points_ijk=None, point_labels=None, propagate: bool = False,
                axis: int | None = None, window=None, progress: ProgressFn | None = None,
                cancel: CancelFn | None = None, on_slice: SliceFn | None = None, preset: str | None = None,
                fill_box: bool = False) -> np.ndarray:
        """One prompt in a new session (``open``): the object's bool (K, J, I) mask. The session's ``Update``
        (predicted IoU, normalisation, changed slices) is what the command line and the Slicer module use.

        box_ijk: (i0, j0, k0, i1, j1, k1) voxel corners: a 2-D box if it spans one slice, else a 3-D box.
        points_ijk: (N, 3) voxel positions with point_labels (N,) 1 positive / 0 negative, on one slice.
        propagate: a 2-D prompt gives the whole object (followed while it continues); off: its slice alone.
        on_slice: streaming, called with (slice index, mask so far) after each slice written."""
        session = self.open(volume, axis, window=window, preset=preset, fill_box=fill_box)
        session.progress, session.cancel, session.on_slice = progress, cancel, on_slice
        return session.prompt(box_ijk, points_ijk, point_labels, slice_only=not propagate).mask

    # ---- automatic segmentation (needs a SegMoTE adapter with PPT classes) ----------------------------
    def auto(self, volume: Volume, classes: Sequence[str] | None = None, keep_largest: bool = True,
             axis: int | None = None, window=None, refine_passes: int = 1, objectness_threshold: float = AUTO_OBJECTNESS,
             progress: ProgressFn | None = None, cancel: CancelFn | None = None,
             preset: str | None = None) -> list[Segment]:
        """One segment per adapter class (names and colours from the checkpoint), no prompts.

        Slices where the class's objectness is below the threshold contribute nothing; keep_largest keeps the
        largest 3-D connected component per class (drops scattered false positives).
        """
        if self.segmote is None:
            raise InputError("automatic segmentation needs an adapter: load one with automatic classes")
        from .adapters import class_indices

        if refine_passes < 0:
            raise InputError(f"refine_passes must be 0 or more, got {refine_passes}")
        header_classes = self.adapter_header["classes"]
        names = list(classes) if classes else [c["name"] for c in header_classes]
        indices = class_indices(self.adapter_header, names)
        prepared = self.prepare(volume, axis, window=window, preset=preset)
        num = prepared.num_slices
        masks = np.zeros((len(indices),) + prepared.stack.shape, dtype=bool)
        if progress:
            progress(0, num)
        # Embed and decode batch by batch, each slice once. A volume whose embeddings do not all fit the cache is
        # not cached at all: caching it would only evict, slice after slice, what the cache held, and fill the RAM
        # (a 512x512x300 CT with an adapter: 2 GB of embeddings and early features).
        keep = num * self.embedding_bytes() <= self.cache.max_bytes
        for number, start in enumerate(range(0, num, self.batch_size)):
            if cancel and cancel():
                raise Cancelled("cancelled during automatic segmentation; nothing was changed")
            batch = list(range(start, min(start + self.batch_size, num)))
            found = self.embeddings(prepared, batch, keep=keep)
            embedding = torch.cat([found[i][0] for i in batch])
            early = torch.cat([found[i][1] for i in batch])
            with torch.inference_mode():
                logits, _, present = self._decode_classes(embedding, early, indices, refine_passes,
                                                          objectness_threshold)
                rows = torch.nonzero(present).flatten()
                if len(rows):  # up to the slice grid once, the present (slice, class) rows only
                    full = (self.backbone.postprocess(logits[rows], prepared.slice_shape)[:, 0] > 0).cpu().numpy()
                    for mask, row in zip(full, rows.tolist()):
                        slice_row, class_row = divmod(row, len(indices))
                        masks[class_row, batch[slice_row]] = mask
            if number % TRIM_EVERY == TRIM_EVERY - 1:
                release_free_heap()  # the tuned allocator would otherwise keep growing through a long volume
            if progress:
                progress(batch[-1] + 1, num)
        # Before the 3-D labelling (the run's largest arrays): the graphs' buffers and the heap's freed pages go back
        # (~0.3 and ~0.15 GB on a 512x512x300 CT); a later call allocates the buffers again (~40 ms a graph).
        if self._fast is not None:
            self._fast.release()
        release_free_heap()
        segments = []
        for row, class_index in enumerate(indices):
            mask = prepared.stack.from_stack(masks[row])
            if keep_largest:
                mask = largest_component(mask, in_place=True)  # `mask` is this call's own array (or a view of it)
            info = header_classes[class_index]
            segments.append(Segment(info["name"], mask, tuple(info.get("color", (0.5, 0.5, 0.5)))))
        return segments

    def _decode_classes(self, embedding: torch.Tensor, early: torch.Tensor, indices: Sequence[int],
                        refine_passes: int, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The adapter's automatic answer for classes `indices` on B slices: the first pass of every class in one
        decoder call, then ``refine_passes`` refinement passes for the (slice, class) rows whose objectness reaches
        `threshold` and whose first mask is not empty (objectness comes from the first pass, so the rows it rules
        out are never refined, and a refinement keeps an empty mask as it is: the same answer, fewer passes). Rows
        are slice-major (b * C + c). Returns low-res logits (B*C, 1, 256, 256), IoU (B*C, 1), present (B*C,) bool;
        the exported graphs run it where they could be exported, else PyTorch (the same SegMoTE methods)."""
        decoder = self._fast if self._fast_auto else self.segmote
        out = decoder.auto_coarse(embedding, early, torch.as_tensor(list(indices), dtype=torch.long,
                                                                    device=embedding.device))
        logits, iou = out.logits, out.iou
        present = out.objectness >= threshold
        rows = torch.nonzero(present & self.segmote.has_mask(logits).to(present.device)).flatten()
        if len(rows) and refine_passes:
            slices = rows.to(embedding.device) // len(indices)
            row_embedding, row_early = embedding[slices], early[slices]
            tokens, row_logits, row_iou = out.class_tokens[rows], logits[rows], iou[rows]
            for _ in range(refine_passes):
                row_logits, row_iou, _ = decoder.auto_refine(row_embedding, row_early, tokens, row_logits, row_iou)
            logits, iou = logits.clone(), iou.clone()
            logits[rows], iou[rows] = row_logits.to(logits.device), row_iou.to(iou.device)
        return logits, iou, present

    @staticmethod
    def _check_inside(volume: Volume, points_ijk: np.ndarray, what: str) -> None:
        inside = volume.contains_ijk(points_ijk)
        if not inside.all():
            bad = np.round(points_ijk[~inside][0], 2).tolist()
            raise InputError(f"{what} at voxel {bad} lies outside the image ({'x'.join(map(str, volume.shape_ijk))} voxels)")


def largest_component(mask: np.ndarray, in_place: bool = False) -> np.ndarray:
    """The largest 26-connected 3-D component of a bool mask (an empty mask stays empty). in_place: clear the other
    components in `mask` itself and return it (a 512x512x300 class mask is 79 MB; no second one is made)."""
    from scipy import ndimage

    box = mask_extent(mask)
    if box is None:
        return mask
    crop = mask[box]  # labelling only the mask's bounding box: same answer, a fraction of a 512x512x300 volume
    structure = np.ones((3, 3, 3), bool)
    try:  # 16-bit labels (half of scipy's default) unless the mask has more pieces than they can count
        labels, count = ndimage.label(crop, structure=structure, output=np.uint16)
    except RuntimeError:
        labels, count = ndimage.label(crop, structure=structure)
    if count <= 1:
        return mask
    largest = int(np.argmax(np.bincount(labels.reshape(-1))[1:])) + 1
    result = mask if in_place else mask.copy()
    result[box] &= labels == largest  # outside the box the mask is empty already
    return result
