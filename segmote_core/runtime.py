"""CPU inference runtimes: the image encoder and the prompt decoder exported once to ONNX, run by ONNX Runtime or
OpenVINO.

PyTorch stays the reference and the training path. On a CPU, ``auto`` picks OpenVINO, else ONNX Runtime, else
PyTorch: the order measured fastest, each agreeing with PyTorch fp32 on masks (docs/benchmarks.md,
tests/test_runtime.py). GPUs always run PyTorch.

Exported files live in ``<SegMoTE cache>/exported``, one per (part, weights, adapter, exporter version, torch
version), named by a key over all of these, so changed weights or a new adapter get a new export. Each ``.onnx`` has
a ``.sha256`` beside it: a file whose checksum does not match (cut short, overwritten, stale) is never loaded, but
exported again. Both are written atomically, so processes exporting the same model at once each replace the file
with a complete one; at worst one of them exports twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .errors import SegMoTEError
from .files import atomic_write, atomic_write_text, sha256_file

RUNTIMES = ("auto", "torch", "onnx", "openvino")
EXPORTER_VERSION = 1  # bump when the exported graphs change
OPSET = 17
_RUNTIME_PACKAGES = {"onnx": "onnxruntime", "openvino": "openvino"}


class RuntimeUnavailable(SegMoTEError):
    """The runtime package is not installed, or the model could not be exported; the engine uses PyTorch."""


def installed(runtime: str) -> bool:
    import importlib.util

    return runtime == "torch" or importlib.util.find_spec(_RUNTIME_PACKAGES[runtime]) is not None


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

    points (1, N, 2) in model-input pixels with labels (1, N) as float: 1 positive, 0 negative, -1 padding, 2 and 3
    a box's corners (SAM's ONNX convention; the prompt encoder's own sums, so the same tokens in the same order).
    mask_input (1, 1, 256, 256) logits and has_mask (1,) 0 or 1. Returns low-res logits (1, 1, 256, 256), IoU (1, 1).
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


def cached_export(part: str, identity: dict, export: Callable[[Path], None], folder: Path | None = None) -> Path:
    """The exported file for `part` and `identity` (what it was exported from): verified by its checksum, exported
    (atomically) when missing, stale or damaged."""
    folder = Path(folder) if folder is not None else exported_dir()
    identity = dict(identity, part=part, exporter=EXPORTER_VERSION, torch=torch.__version__, opset=OPSET)
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    path = folder / f"{part}-{key}.onnx"
    checksum = path.with_suffix(".sha256")
    if path.is_file() and checksum.is_file():
        if checksum.read_text(encoding="utf-8").strip() == sha256_file(path):
            return path
    atomic_write(path, export)
    atomic_write_text(checksum, sha256_file(path))
    return path


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

    def __init__(self, runtime: str, path: Path, threads: int | None = None, static: dict | None = None):
        """static: OpenVINO also compiles the graph for these fixed input shapes ({name: shape}) and uses that when
        a call's shapes match (a box prompt: 25 % faster than the dynamic-shape graph)."""
        self.runtime = runtime
        self._static = None
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
            # f32: PyTorch's precision (CPUs with bf16 units would otherwise run bf16).
            config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads,
                      "PERFORMANCE_HINT": "LATENCY"}
            model = core.read_model(str(path))
            compiled = core.compile_model(model, "CPU", config)
            self._request = compiled.create_infer_request()
            self._outputs = compiled.outputs
            self.inputs = {name for port in compiled.inputs for name in port.get_names()}
            if static:
                shapes = {name: shape for name, shape in static.items() if name in self.inputs}
                model.reshape(shapes)
                fixed = core.compile_model(model, "CPU", config)
                self._static = (shapes, fixed.create_infer_request(), fixed.outputs)

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        feeds = {name: value for name, value in feeds.items() if name in self.inputs}  # the exporter drops unused ones
        if self.runtime == "onnx":
            return self._session.run(self._names, feeds)
        request, outputs = self._request, self._outputs
        if self._static and all(tuple(feeds[name].shape) == tuple(shape) for name, shape in self._static[0].items()):
            request, outputs = self._static[1], self._static[2]
        with self._lock:
            results = request.infer(feeds)
            return [np.array(results[output]) for output in outputs]


class FastPaths:
    """The engine's encoder and decoder on ONNX Runtime / OpenVINO (CPU, batch 1)."""

    def __init__(self, runtime: str, backbone, folder: Path | None = None):
        self.runtime, self.backbone, self.folder = runtime, backbone, folder
        self.backbone_sha256 = getattr(backbone, "weights_sha256", None) or tensors_sha256(backbone)
        size = backbone.input_size
        encoder_path = cached_export(
            "encoder", {"model": backbone.name, "weights": self.backbone_sha256, "input": size},
            export_onnx(EncoderGraph(backbone).eval(), (torch.zeros(1, 3, size, size),), ["image"],
                        ["embedding", "early"]), folder)
        self._encoder = Session(runtime, encoder_path)
        self._decoder = None
        self._decoder_for = None

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> (embedding, early) like Backbone.encode, one slice per call."""
        embeddings, earlies = [], []
        for image in x.float().cpu().numpy():
            embedding, early = self._encoder({"image": image[None]})
            embeddings.append(torch.from_numpy(embedding))
            earlies.append(torch.from_numpy(early))
        return torch.cat(embeddings), torch.cat(earlies)

    def use_decoder(self, segmote=None) -> None:
        """Export (or load from the cache) the prompt decoder: the backbone's, or `segmote`'s MoTE decoder."""
        backbone = self.backbone
        adapter = tensors_sha256(segmote.mote, segmote.ppt) if segmote is not None else None
        if self._decoder is not None and self._decoder_for == adapter:
            return
        height, width = backbone.embedding_size
        example = (torch.zeros(1, PROMPT_DIM, height, width), torch.zeros(1, backbone.early_channels, height, width),
                   torch.tensor([[[10.0, 10.0], [200.0, 200.0]]]), torch.tensor([[2.0, 3.0]]),
                   torch.zeros(1, 1, 4 * height, 4 * width), torch.zeros(1))
        path = cached_export(
            "decoder", {"model": backbone.name, "weights": self.backbone_sha256, "adapter": adapter},
            export_onnx(DecoderGraph(backbone, segmote).eval(), example,
                        ["embedding", "early", "points", "labels", "mask_input", "has_mask"], ["logits", "iou"],
                        {"points": {1: "n"}, "labels": {1: "n"}}), self.folder)
        box_only = {"embedding": (1, PROMPT_DIM, height, width), "early": (1, backbone.early_channels, height, width),
                    "points": (1, 2, 2), "labels": (1, 2), "mask_input": (1, 1, 4 * height, 4 * width),
                    "has_mask": (1,)}
        self._decoder, self._decoder_for = Session(self.runtime, path, static=box_only), adapter

    def decode(self, embedding, early, points, labels, box, mask_input):
        """Prompts as Backbone.decode / SegMoTE.decode take them (batch 1) -> (low-res logits, IoU) tensors."""
        coords, kinds = prompt_arrays(points, labels, box)
        height, width = self.backbone.embedding_size
        feeds = {"embedding": embedding.float().cpu().numpy(), "points": coords, "labels": kinds,
                 "mask_input": (mask_input.float().cpu().numpy() if mask_input is not None
                                else np.zeros((1, 1, 4 * height, 4 * width), np.float32)),
                 "has_mask": np.array([1.0 if mask_input is not None else 0.0], np.float32)}
        if early is not None:
            feeds["early"] = early.float().cpu().numpy()
        logits, iou = self._decoder(feeds)
        return torch.from_numpy(logits), torch.from_numpy(iou)


PROMPT_DIM = 256
