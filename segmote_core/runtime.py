"""CPU inference runtimes: the image encoder, the prompt decoder and an adapter's automatic decoder exported once to
ONNX, run by ONNX Runtime or OpenVINO.

PyTorch stays the reference and the training path. On a CPU, ``auto`` picks OpenVINO, else ONNX Runtime, else
PyTorch: the order measured fastest, each agreeing with PyTorch fp32 on masks (docs/benchmarks.md,
tests/test_runtime.py). GPUs always run PyTorch. Everything runs f32 unless the engine is asked for bf16, which
OpenVINO then runs on the encoder where the CPU has native bf16 (``exported_precision``); the lower precisions
measured (bf16, int8) do not give fp32's masks on LiteMedSAM, so none is a default.

The decoder takes a batch of prompt sets against one slice's embedding, so that a click's candidate boxes
(``segmote_core.boxes.search_box``) are one call. With an adapter, the backbone's frozen decoder stays exported
and loaded beside the adapter's: boxes alone, and the box search behind a click, go to it without PyTorch.

An adapter's automatic decoder is two graphs, ``SegMoTE.auto_coarse`` (PPT tokens and the first pass, every class of
a batch of slices in one call) and ``SegMoTE.auto_refine`` (one refinement pass on any rows): the engine refines only
the rows the first pass's objectness keeps (``Engine._decode_classes``), on either runtime or PyTorch.

Exported files live in ``<SegMoTE cache>/exported``, one per (part, weights, adapter, exporter version, torch
version), named by a key over all of these, so changed weights or a new adapter get a new export. Each ``.onnx`` has
a ``.sha256`` beside it: a file whose checksum does not match (cut short, overwritten, stale) is never loaded, but
exported again. Both are written atomically, so processes exporting the same model at once each replace the file
with a complete one; at worst one of them exports twice.

The checksum only catches damage: whoever can change a cached file can rewrite its ``.sha256`` too. So an export
read from the cache is also judged against the weights it claims to come from: a fixed, seeded probe input goes
through the loaded graph and through PyTorch, and the graph is used only if both agree (``PROBE_TOLERANCE``);
otherwise it is exported again from the weights in memory, and a warning says so. The check costs one slice
through each part, once per process and file. Which files ran (name, SHA-256, how they were checked) is in
``FastPaths.models``, and the CLI's run record names them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .boxes import CLICK_BOX_SIDES
from .errors import SegMoTEError
from .files import atomic_write, atomic_write_text, sha256_file

RUNTIMES = ("auto", "torch", "onnx", "openvino")
EXPORTER_VERSION = 2  # bump when the exported graphs change (2: the decoder takes a batch of prompt sets)
OPSET = 17
_RUNTIME_PACKAGES = {"onnx": "onnxruntime", "openvino": "openvino"}
PROBE_TOLERANCE = 1e-3  # relative L2 distance between the graph's and PyTorch's outputs on the probe
_PROBED: set[tuple[str, str]] = set()  # (file, SHA-256) that matched PyTorch in this process
log = logging.getLogger(__name__)


class RuntimeUnavailable(SegMoTEError):
    """The runtime package is not installed, or the model could not be exported; the engine uses PyTorch."""


def installed(runtime: str) -> bool:
    import importlib.util

    return runtime == "torch" or importlib.util.find_spec(_RUNTIME_PACKAGES[runtime]) is not None


def native_bf16() -> bool:
    """Whether OpenVINO runs bf16 natively on this CPU (AVX-512 BF16 or AMX: it lists BF16 among the CPU's
    optimisation capabilities); elsewhere bf16 would be emulated, and slower than f32."""
    if not installed("openvino"):
        return False
    import openvino as ov

    try:
        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # noqa: BLE001 - no CPU plugin, or it cannot say: not native
        return False


def exported_precision(precision: str, runtime: str) -> str | None:
    """The exported encoder's precision for the engine's `precision` on `runtime`, or None where that runtime
    cannot run it (the engine then uses PyTorch). fp32 everywhere by default: bf16 (OpenVINO on a CPU with native
    bf16, 1.7-1.8x faster encoder) changes LiteMedSAM's masks too much to be a default (Dice against fp32 down to
    0.93 on the chest CT's structures, docs/benchmarks.md), so it runs only when asked for."""
    if precision == "fp32":
        return "f32"
    return "bf16" if precision == "bf16" and runtime == "openvino" and native_bf16() else None


def choose(runtime: str, device: torch.device) -> str:
    """The runtime to use: 'auto' -> the fastest installed one on a CPU, PyTorch on a GPU."""
    if runtime not in RUNTIMES:
        raise SegMoTEError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if device.type != "cpu" or runtime == "torch":
        return "torch"
    if runtime == "auto":
        return next((name for name in ("openvino", "onnx") if installed(name)), "torch")
    return runtime


# ---- what gets exported ----------------------------------------------------------------------------------
class EncoderGraph(nn.Module):
    """(1, 3, S, S) model input -> (embedding, early feature), as Backbone.encode."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, image):
        return self.backbone.encode(image)


class DecoderGraph(nn.Module):
    """SAM's prompt encoder + single-mask decoder, or SegMoTE's MoTE decoder, with every prompt as an input.

    points (B, N, 2) in model-input pixels with labels (B, N) as float: 1 positive, 0 negative, -1 padding, 2 and 3
    a box's corners (SAM's ONNX convention; the prompt encoder's own sums, so the same tokens in the same order).
    B prompt sets against one slice's embedding (1, ...): the candidate boxes of a click's box search in one call.
    mask_input (1, 1, 256, 256) logits and has_mask (1,) 0 or 1. Returns low-res logits (B, 1, 256, 256), IoU (B, 1).
    """

    def __init__(self, backbone, segmote=None):
        super().__init__()
        self.backbone, self.segmote = backbone, segmote

    def forward(self, embedding, early, points, labels, mask_input, has_mask):
        prompt_encoder = self.backbone.prompt_encoder
        coords = prompt_encoder.pe_layer.forward_with_coords(points + 0.5, prompt_encoder.input_image_size)
        labels = labels.unsqueeze(-1)
        sparse = coords * (labels != -1) + prompt_encoder.not_a_point_embed.weight * (labels == -1)
        for index, embed in enumerate(prompt_encoder.point_embeddings):
            sparse = sparse + embed.weight * (labels == index)
        given = has_mask.view(-1, 1, 1, 1)
        dense = (given * prompt_encoder.mask_downscaling(mask_input)
                 + (1 - given) * prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1))
        if self.segmote is not None:
            out = self.segmote.decode_embeddings(embedding, early, sparse, dense)
            return out.logits, out.iou
        masks, iou = self.backbone.mask_decoder.predict_masks(
            image_embeddings=embedding, image_pe=prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense)
        return masks[:, 0:1], iou[:, 0:1]


class AutoCoarseGraph(nn.Module):
    """SegMoTE.auto_coarse: embedding (B, 256, 64, 64), early (B, C', 64, 64), classes (C,) int64 -> per (slice,
    class) row, slice-major: class tokens (B*C, K, 256), logits (B*C, 1, 256, 256), IoU (B*C, 1), objectness logit
    (B*C,). Every class of a batch of slices in one call."""

    def __init__(self, segmote):
        super().__init__()
        self.segmote = segmote

    def forward(self, embedding, early, classes):
        out = self.segmote.auto_coarse(embedding, early, classes)
        return out.class_tokens, out.logits, out.iou, out.objectness_logit


class AutoRefineGraph(nn.Module):
    """SegMoTE.auto_refine: one refinement pass on N (slice, class) rows -> (logits (N, 1, 256, 256), IoU (N, 1))."""

    def __init__(self, segmote):
        super().__init__()
        self.segmote = segmote

    def forward(self, embedding, early, class_tokens, logits, iou):
        logits, iou, _ = self.segmote.auto_refine(embedding, early, class_tokens, logits, iou)
        return logits, iou


AUTO_COARSE_INPUTS = ("embedding", "early", "classes")
AUTO_REFINE_INPUTS = ("embedding", "early", "class_tokens", "previous_logits", "previous_iou")


def prompt_arrays(points: torch.Tensor | None, labels: torch.Tensor | None, box: torch.Tensor | None):
    """Engine prompts (model-input coordinates, batch 1) -> DecoderGraph's points and labels, as PromptEncoder
    would embed them: points first, then the box's two corners; points without a box get SAM's padding point."""
    coords, kinds = [], []
    if points is not None:
        coords.append(points.reshape(-1, 2).float().cpu().numpy())
        kinds.append(labels.reshape(-1).float().cpu().numpy())
        if box is None:
            coords.append(np.zeros((1, 2), np.float32))
            kinds.append(np.full(1, -1.0, np.float32))
    if box is not None:
        coords.append(box.reshape(2, 2).float().cpu().numpy())
        kinds.append(np.array([2.0, 3.0], np.float32))
    return np.concatenate(coords)[None].astype(np.float32), np.concatenate(kinds)[None].astype(np.float32)


# ---- cache -----------------------------------------------------------------------------------------------
def exported_dir() -> Path:
    from .weights import user_cache_dir

    return user_cache_dir("exported")


def tensors_sha256(*modules: nn.Module) -> str:
    """SHA-256 over the modules' parameters and buffers (names, shapes, bytes): what an export depends on."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            data = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{tuple(data.shape)}:{data.dtype}".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def cached_export(part: str, identity: dict, export: Callable[[Path], None], folder: Path | None = None,
                  fresh: bool = False) -> tuple[Path, str, bool]:
    """The exported file for `part` and `identity` (what it was exported from), its SHA-256, and whether it was
    exported now: a cached file whose checksum matches is reused, one missing, stale or damaged (or any, with
    `fresh`) is exported again (atomically)."""
    folder = Path(folder) if folder is not None else exported_dir()
    identity = dict(identity, part=part, exporter=EXPORTER_VERSION, torch=torch.__version__, opset=OPSET)
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    path = folder / f"{part}-{key}.onnx"
    checksum = path.with_suffix(".sha256")
    if not fresh and path.is_file() and checksum.is_file():
        digest = sha256_file(path)
        if checksum.read_text(encoding="utf-8").strip() == digest:
            return path, digest, False
    atomic_write(path, export)
    digest = sha256_file(path)
    atomic_write_text(checksum, digest)
    return path, digest, True


def relative_distance(got, expected) -> float:
    """||got - expected|| / ||expected|| over arrays or tensors (0 when both are zero)."""
    got, expected = np.asarray(got, np.float64).ravel(), np.asarray(expected, np.float64).ravel()
    if got.shape != expected.shape or not np.all(np.isfinite(got)):
        return float("inf")
    scale = np.linalg.norm(expected)
    return float(np.linalg.norm(got - expected) / scale) if scale else float(np.linalg.norm(got))


def graph_probe(graph: nn.Module, names, probes: list[tuple]) -> Callable[["Session"], float]:
    """A probe for ``checked_session``: the largest relative distance between the session's outputs and the PyTorch
    graph's over the probe inputs (tuples of tensors in the order of `names`)."""
    def probe(session) -> float:
        distances = []
        for inputs in probes:
            with torch.no_grad():
                expected = graph(*inputs)
            got = session({name: value.numpy() for name, value in zip(names, inputs)})
            distances += [relative_distance(g, e.cpu()) for g, e in zip(got, expected)]
        return max(distances)
    return probe


def checked_session(runtime: str, part: str, identity: dict, export: Callable[[Path], None], folder: Path | None,
                    probe: Callable[["Session"], float], static: list[dict] | None = None,
                    precision: str = "f32") -> tuple["Session", dict]:
    """A Session on the cached (or new) export of `part`, judged against PyTorch: probe(session) is the relative
    distance between its outputs and PyTorch's on a fixed input. A cached file that disagrees is exported again
    (with a warning); a new export that disagrees is an error (the engine then uses PyTorch). The file is always
    judged at f32, so that a lower `precision` (OpenVINO bf16) runs a graph known to compute what the weights
    compute. Returns the session and what the run record says about the file."""
    path, digest, exported = cached_export(part, identity, export, folder)
    options = {"static": static} if static else {}
    for attempt in range(2):
        known = (str(path), digest) in _PROBED
        judged = None if known and precision != "f32" else Session(runtime, path, **options)
        distance = 0.0 if known else probe(judged)
        if distance <= PROBE_TOLERANCE:
            _PROBED.add((str(path), digest))
            if judged is not None:
                judged.release()  # the probe's buffers: the run may never call this graph
            session = judged if precision == "f32" else Session(runtime, path, precision=precision, **options)
            return session, {"file": path.name, "sha256": digest, "precision": precision,
                             "checked": "exported now" if exported else "cached; agrees with PyTorch on the probe"}
        if exported or attempt:
            raise RuntimeUnavailable(f"the exported {part} disagrees with PyTorch (relative distance {distance:.3g})")
        log.warning(f"the cached {runtime} {part} {path.name} does not compute what its weights compute (changed "
                    "after export?); exporting it again")
        shutil.rmtree(compiled_cache(path), ignore_errors=True)  # OpenVINO would load the same damaged blob again
        path, digest, exported = cached_export(part, identity, export, folder, fresh=True)
    raise AssertionError("unreachable")


def compiled_cache(path: Path) -> Path:
    """Where OpenVINO keeps what it compiled from the exports beside `path`."""
    return path.parent / "openvino-compiled"


def export_onnx(module: nn.Module, inputs: tuple, input_names, output_names, dynamic_axes=None) -> Callable:
    def write(path: Path) -> None:
        import warnings

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, inputs, str(path), dynamo=False, opset_version=OPSET,
                              input_names=list(input_names), output_names=list(output_names),
                              dynamic_axes=dynamic_axes or {}, do_constant_folding=True)
    return write


# ---- running ---------------------------------------------------------------------------------------------
class Session:
    """One exported graph loaded into ONNX Runtime or OpenVINO: dict of numpy inputs -> list of numpy outputs."""

    def __init__(self, runtime: str, path: Path, threads: int | None = None, static: list[dict] | None = None,
                 precision: str = "f32"):
        """static: OpenVINO also compiles the graph for each of these fixed input shapes ({name: shape}), on the
        first call with those shapes, and uses it for them (a box prompt, a click's candidate boxes: 20-25 % faster
        than the dynamic-shape graph; ~0.07 GB each, so not compiled before a call needs it); precision:
        OpenVINO's inference precision, "f32" (PyTorch's) or "bf16"."""
        if precision != "f32" and runtime != "openvino":
            raise RuntimeUnavailable(f"{runtime} runs the exported graphs at f32 only, not {precision}")
        self.runtime, self.precision = runtime, precision
        self._static = []
        threads = threads or torch.get_num_threads()
        self._lock = threading.Lock()  # an OpenVINO infer request serves one call at a time (prefetch thread)
        if runtime == "onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.log_severity_level = 3
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self._names = [o.name for o in self._session.get_outputs()]
            self.inputs = {i.name for i in self._session.get_inputs()}
        else:
            import openvino as ov

            core = ov.Core()
            # Always said explicitly: CPUs with bf16 units would otherwise run bf16 even when f32 is wanted.
            config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads,
                      "PERFORMANCE_HINT": "LATENCY",
                      # What OpenVINO compiled, kept for the next start (~0.4 s a graph saved); keyed by the graph
                      # and these settings, and probed like a fresh compile (checked_session)
                      "CACHE_DIR": str(compiled_cache(path))}
            model = core.read_model(str(path))
            self._compile = lambda model: core.compile_model(model, "CPU", config)
            # None: the dynamic-shape graph; i: the variant for static[i], compiled when a call first needs it
            self._compiled = {None: self._compile(model)}
            self.inputs = {name for port in self._compiled[None].inputs for name in port.get_names()}
            self._static = [{name: shape for name, shape in fixed_shapes.items() if name in self.inputs}
                            for fixed_shapes in static or ()]
            self._model = model if self._static else None  # reshaped for each variant
        # OpenVINO's infer requests (same keys), made on first use: each holds buffers for the largest shapes it has
        # run (a decoder's: ~0.2-0.3 GB for a click's eight candidate boxes), so a graph never called costs none
        self._requests: dict[int | None, object] = {}

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        feeds = {name: value for name, value in feeds.items() if name in self.inputs}  # the exporter drops unused ones
        if self.runtime == "onnx":
            return self._session.run(self._names, feeds)
        graph = next((position for position, shapes in enumerate(self._static)
                      if all(tuple(feeds[name].shape) == tuple(shape) for name, shape in shapes.items())), None)
        with self._lock:
            if graph not in self._compiled:
                model = self._model.clone()
                model.reshape(self._static[graph])
                self._compiled[graph] = self._compile(model)
            compiled = self._compiled[graph]
            if graph not in self._requests:
                self._requests[graph] = compiled.create_infer_request()
            results = self._requests[graph].infer(feeds)
            return [np.array(results[output]) for output in compiled.outputs]

    def release(self) -> None:
        """Give back what running took (OpenVINO: the infer requests, and the compiled graphs' intermediate buffers,
        sized for the largest shapes they ran; both come back at the next call): after the load probe, so that a
        graph the run never calls holds no memory (ONNX Runtime: nothing to do)."""
        with self._lock:
            self._requests.clear()
            if self.runtime == "openvino":
                for compiled in self._compiled.values():
                    compiled.release_memory()  # ~0.1-0.2 GB a graph after its probe; allocated again (~40 ms) if called


class FastPaths:
    """The engine's encoder (one slice per call), prompt decoders (one slice, one or more prompt sets per call) and
    automatic decoder (``auto_coarse`` / ``auto_refine``, as SegMoTE's) on ONNX Runtime / OpenVINO."""

    def __init__(self, runtime: str, backbone, folder: Path | None = None, encoder_precision: str = "f32"):
        """encoder_precision: "f32", or "bf16" (OpenVINO on a CPU with native bf16: ``exported_precision()``); the
        prompt decoders always run f32."""
        self.runtime, self.backbone, self.folder = runtime, backbone, folder
        self.backbone_sha256 = getattr(backbone, "weights_sha256", None) or tensors_sha256(backbone)
        self.models: dict[str, dict] = {}  # part -> the file that runs it (name, SHA-256, how it was checked)
        size = backbone.input_size
        graph = EncoderGraph(backbone).eval()
        image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))

        def probe(session) -> float:
            with torch.no_grad():
                expected = graph(image)
            got = session({"image": image.numpy()})
            return max(relative_distance(g, e.cpu()) for g, e in zip(got, expected))

        self._encoder, self.models["encoder"] = checked_session(
            runtime, "encoder", {"model": backbone.name, "weights": self.backbone_sha256, "input": size},
            export_onnx(graph, (torch.zeros(1, 3, size, size),), ["image"], ["embedding", "early"]), folder, probe,
            precision=encoder_precision)
        self._decoders: dict[str | None, Session] = {}  # adapter's SHA-256 (None: the frozen decoder) -> graph
        self._records: dict[str | None, dict] = {}  # the same -> its file, for ``models``
        self._adapter: str | None = None  # whose decoder answers prompts
        self._auto_adapter: str | None = None  # whose automatic decoder is exported and loaded in _auto
        self._auto: tuple[Session, Session] | None = None  # (first pass, refinement pass)

    def release(self) -> None:
        """Every graph gives back its run-time buffers (``Session.release``), allocated again at its next call."""
        for session in (self._encoder, *self._decoders.values(), *(self._auto or ())):
            session.release()

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> (embedding, early) like Backbone.encode, one slice per call."""
        embeddings, earlies = [], []
        for image in x.float().cpu().numpy():
            embedding, early = self._encoder({"image": image[None]})
            embeddings.append(torch.from_numpy(embedding))
            earlies.append(torch.from_numpy(early))
        return torch.cat(embeddings), torch.cat(earlies)

    def use_decoder(self, segmote=None) -> None:
        """Export (or load from the cache) the prompt decoders: the backbone's frozen one always (boxes alone and a
        click's box search go to it even with an adapter), and `segmote`'s MoTE decoder when given."""
        self._load_decoder(None)
        adapter = tensors_sha256(segmote.mote, segmote.ppt) if segmote is not None else None
        if adapter is not None:
            self._load_decoder(adapter, segmote)
        self._adapter = adapter
        self.models["decoder"] = self._records[adapter]
        self.models.pop("frozen decoder", None)
        if adapter is not None:
            self.models["frozen decoder"] = self._records[None]

    def _load_decoder(self, adapter: str | None, segmote=None) -> None:
        if adapter in self._decoders:
            return
        backbone = self.backbone
        height, width = backbone.embedding_size
        # two prompt sets, so that the exported graph keeps the prompt-set axis dynamic
        example = (torch.zeros(1, PROMPT_DIM, height, width), torch.zeros(1, backbone.early_channels, height, width),
                   torch.tensor([[[10.0, 10.0], [200.0, 200.0]], [[20.0, 30.0], [120.0, 140.0]]]),
                   torch.tensor([[2.0, 3.0], [2.0, 3.0]]),
                   torch.zeros(1, 1, 4 * height, 4 * width), torch.zeros(1))
        graph = DecoderGraph(backbone, segmote).eval()
        generator = torch.Generator().manual_seed(0)
        embedding = torch.randn(1, PROMPT_DIM, height, width, generator=generator)
        early = torch.randn(1, backbone.early_channels, height, width, generator=generator)
        no_mask = (torch.zeros(1, 1, 4 * height, 4 * width), torch.zeros(1))
        # a box with a click, and three candidate boxes in one call: both shapes the engine feeds
        probes = [(embedding, early, torch.tensor([[[30.0, 40.0], [150.0, 170.0], [90.0, 100.0]]]),
                   torch.tensor([[2.0, 3.0, 1.0]]), *no_mask),
                  (embedding, early, torch.tensor([[[30.0, 40.0], [150.0, 170.0]], [[60.0, 70.0], [110.0, 120.0]],
                                                   [[5.0, 8.0], [250.0, 240.0]]]),
                   torch.tensor([[2.0, 3.0]] * 3), *no_mask)]
        names = ["embedding", "early", "points", "labels", "mask_input", "has_mask"]
        probe = graph_probe(graph, names, probes)

        # boxes alone: one (a box prompt), or a click's candidate boxes
        box_only = [{"embedding": (1, PROMPT_DIM, height, width), "early": (1, backbone.early_channels, height, width),
                     "points": (sets, 2, 2), "labels": (sets, 2), "mask_input": (1, 1, 4 * height, 4 * width),
                     "has_mask": (1,)} for sets in (1, len(CLICK_BOX_SIDES))]
        prompt_sets = {"points": {0: "sets", 1: "n"}, "labels": {0: "sets", 1: "n"}, "logits": {0: "sets"},
                       "iou": {0: "sets"}}
        self._decoders[adapter], self._records[adapter] = checked_session(
            self.runtime, "decoder", {"model": backbone.name, "weights": self.backbone_sha256, "adapter": adapter},
            export_onnx(graph, example, names, ["logits", "iou"], prompt_sets), self.folder, probe, static=box_only)

    def use_auto_decoder(self, segmote) -> None:
        """Export (or load from the cache) `segmote`'s automatic decoder: its first pass (PPT tokens, every class of
        a batch of slices in one call) and its refinement pass, each checked against PyTorch on a probe."""
        adapter = tensors_sha256(segmote.mote, segmote.ppt)
        if self._auto_adapter == adapter:
            return
        self._auto_adapter, self._auto = None, None
        for part in ("auto decoder", "auto refinement"):
            self.models.pop(part, None)
        backbone, config = self.backbone, segmote.config
        height, width = backbone.embedding_size
        side, tokens = 4 * height, config.ppt_tokens_per_class
        generator = torch.Generator().manual_seed(0)

        def features(slices: int):
            return (torch.randn(slices, PROMPT_DIM, height, width, generator=generator),
                    torch.randn(slices, backbone.early_channels, height, width, generator=generator))

        identity = {"model": backbone.name, "weights": self.backbone_sha256, "adapter": adapter}
        last = config.num_classes - 1
        coarse = AutoCoarseGraph(segmote).eval()
        # exported on 2 slices x 2 classes, probed on other counts: both axes stay dynamic. Probes of at most the
        # rows the engine feeds (one CPU slice's classes): OpenVINO keeps buffers for the largest shape it has run,
        # about 0.1 GB per row of this decoder.
        coarse_probes = [(*features(1), torch.arange(config.num_classes)), (*features(2), torch.tensor([last]))]
        rows = {"class_tokens": {0: "rows"}, "logits": {0: "rows"}, "iou": {0: "rows"}, "objectness_logit": {0: "rows"}}
        coarse_session, coarse_record = checked_session(
            self.runtime, "auto-decoder", identity,
            export_onnx(coarse, (*features(2), torch.tensor([0, last])), AUTO_COARSE_INPUTS,
                        ["class_tokens", "logits", "iou", "objectness_logit"],
                        {"embedding": {0: "slices"}, "early": {0: "slices"}, "classes": {0: "classes"}, **rows}),
            self.folder, graph_probe(coarse, AUTO_COARSE_INPUTS, coarse_probes))

        refine = AutoRefineGraph(segmote).eval()

        def refine_inputs(masks: torch.Tensor):
            count = len(masks)
            return (*features(count), torch.randn(count, tokens, PROMPT_DIM, generator=generator),
                    masks, torch.rand(count, 1, generator=generator))

        def blobs(*extents):  # logits: positive inside each box, negative elsewhere (None: an empty mask)
            masks = torch.full((len(extents), 1, side, side), -4.0)
            for row, extent in enumerate(extents):
                if extent is not None:
                    y0, y1, x0, x1 = extent
                    masks[row, 0, y0:y1, x0:x1] = 4.0
            return masks

        # an empty mask among them: that row keeps its input
        refine_probes = [refine_inputs(blobs((60, 140, 30, 110))), refine_inputs(blobs((20, 200, 120, 250), None))]
        refine_session, refine_record = checked_session(
            self.runtime, "auto-refinement", identity,
            export_onnx(refine, refine_inputs(blobs((40, 90, 50, 160), None)), AUTO_REFINE_INPUTS,
                        ["logits", "iou"], {name: {0: "rows"} for name in (*AUTO_REFINE_INPUTS, "logits", "iou")}),
            self.folder, graph_probe(refine, AUTO_REFINE_INPUTS, refine_probes))
        self._auto = (coarse_session, refine_session)
        self._auto_adapter = adapter
        self.models["auto decoder"], self.models["auto refinement"] = coarse_record, refine_record

    def auto_coarse(self, embedding, early, classes: torch.Tensor):
        """SegMoTE.auto_coarse on the exported graph (same arguments, an ``AutoOutput`` of tensors)."""
        from .models.segmote import AutoOutput

        class_tokens, logits, iou, objectness_logit = (torch.from_numpy(out) for out in self._auto[0]({
            "embedding": embedding.float().cpu().numpy(), "early": early.float().cpu().numpy(),
            "classes": classes.cpu().numpy().astype(np.int64)}))
        return AutoOutput(logits=logits, objectness=torch.sigmoid(objectness_logit), balance_loss=torch.zeros(()),
                          objectness_logit=objectness_logit, iou=iou, coarse_logits=logits, class_tokens=class_tokens)

    def auto_refine(self, embedding, early, class_tokens, logits, iou):
        """SegMoTE.auto_refine on the exported graph: (logits, iou, balance loss (zero))."""
        inputs = (embedding, early, class_tokens, logits, iou)
        refined, refined_iou = self._auto[1]({name: value.float().cpu().numpy()
                                              for name, value in zip(AUTO_REFINE_INPUTS, inputs)})
        return torch.from_numpy(refined), torch.from_numpy(refined_iou), torch.zeros(())

    def _feeds(self, embedding, early, coords, kinds, mask_input) -> dict[str, np.ndarray]:
        height, width = self.backbone.embedding_size
        feeds = {"embedding": embedding.float().cpu().numpy(), "points": coords, "labels": kinds,
                 "mask_input": (mask_input.float().cpu().numpy() if mask_input is not None
                                else np.zeros((1, 1, 4 * height, 4 * width), np.float32)),
                 "has_mask": np.array([1.0 if mask_input is not None else 0.0], np.float32)}
        if early is not None:
            feeds["early"] = early.float().cpu().numpy()
        return feeds

    def decode(self, embedding, early, points, labels, box, mask_input, frozen: bool = False):
        """Prompts as Backbone.decode / SegMoTE.decode take them (batch 1) -> (low-res logits, IoU) tensors;
        frozen: the backbone's own decoder even with an adapter."""
        coords, kinds = prompt_arrays(points, labels, box)
        decoder = self._decoders[None if frozen else self._adapter]
        logits, iou = decoder(self._feeds(embedding, early, coords, kinds, mask_input))
        return torch.from_numpy(logits), torch.from_numpy(iou)

    def decode_boxes(self, embedding, early, boxes: torch.Tensor, frozen: bool = False):
        """(B, 4) boxes alone (model-input coordinates) on one slice's embedding, in one call -> (low-res logits
        (B, 1, 256, 256), IoU (B, 1)), each row what ``decode`` gives for that box."""
        coords = boxes.reshape(-1, 2, 2).float().cpu().numpy()
        kinds = np.tile(np.array([[2.0, 3.0]], np.float32), (len(coords), 1))
        decoder = self._decoders[None if frozen else self._adapter]
        logits, iou = decoder(self._feeds(embedding, early, coords, kinds, None))
        return torch.from_numpy(logits), torch.from_numpy(iou)


PROMPT_DIM = 256
