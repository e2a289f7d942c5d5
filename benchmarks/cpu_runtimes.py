"""PyTorch vs ONNX Runtime vs OpenVINO for LiteMedSAM on the CPU, in one process, interleaved: encoder ms per slice,
box prompt -> low-res logits ms, and what each does to masks (Dice against PyTorch fp32 on box prompts around the
seven structures of the chest CT that slicerio ships). The numbers behind `--runtime auto`'s order
(docs/benchmarks.md).

    python benchmarks/cpu_runtimes.py [--slices 6] [--prompts 30] [--json OUT.json]

"openvino-default" is OpenVINO without an inference-precision hint (its own choice for the CPU); the engine asks
for f32.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segmote_core import runtime as runtimes  # noqa: E402
from segmote_core.engine import Engine  # noqa: E402
from segmote_core.metrics import dice  # noqa: E402


class DefaultPrecisionSession(runtimes.Session):
    """OpenVINO with its default CPU settings (no f32 hint)."""

    def __init__(self, runtime, path, threads=None):
        import openvino as ov

        self.runtime, self._lock = "openvino", __import__("threading").Lock()
        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(path)), "CPU")
        self._request, self._outputs = compiled.create_infer_request(), compiled.outputs
        self.inputs = {name for port in compiled.inputs for name in port.get_names()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=30)
    parser.add_argument("--json")
    args = parser.parse_args()

    import slicerio

    from segmote_core.segmentation_io import read_segments
    from segmote_core.volume import read_volume

    data = Path(slicerio.__file__).parent / "data"
    volume = read_volume(data / "CTChest4.nrrd")
    truth = {s.name: s.mask for s in read_segments(data / "Segmentation.seg.nrrd")[1]}
    folder = Path(tempfile.mkdtemp(prefix="segmote-runtimes-"))
    os.environ["SEGMOTE_CACHE_DIR"] = str(folder)
    engines = {"torch": Engine("lite_medsam", device="cpu", runtime="torch")}
    for name in ("onnx", "openvino"):
        if runtimes.installed(name):
            begin = time.perf_counter()
            engines[name] = Engine(backbone=engines["torch"].backbone, device="cpu", runtime=name)
            print(f"{name}: export + load {time.perf_counter() - begin:.1f} s", file=sys.stderr)
    if runtimes.installed("openvino"):
        default = Engine(backbone=engines["torch"].backbone, device="cpu", runtime="openvino")
        fast = default._fast
        fast._encoder = DefaultPrecisionSession("openvino", next(folder.glob("exported/encoder-*.onnx")))
        fast._decoder = DefaultPrecisionSession("openvino", next(folder.glob("exported/decoder-*.onnx")))
        default.encode = fast.encode
        engines["openvino-default"] = default

    prepared = {name: engine.prepare(volume) for name, engine in engines.items()}
    middle = volume.array.shape[0] // 2
    slices = list(range(middle - args.slices // 2, middle - args.slices // 2 + args.slices))
    encode_ms = {name: [] for name in engines}
    for index in slices:  # interleaved slice by slice, so that load changes hit every runtime
        for name, engine in engines.items():
            begin = time.perf_counter()
            engine.embeddings(prepared[name], [index])
            encode_ms[name].append((time.perf_counter() - begin) * 1000)
    rng = np.random.default_rng(0)
    decode_ms = {name: [] for name in engines}
    for _ in range(args.prompts):
        x0, y0 = rng.uniform(10, 60, 2)
        box = np.array([x0, y0, x0 + rng.uniform(20, 60), y0 + rng.uniform(20, 60)])
        for name, engine in engines.items():
            begin = time.perf_counter()
            engine.predict_slice(prepared[name], middle, box=box)
            decode_ms[name].append((time.perf_counter() - begin) * 1000)
    agreement = {name: {} for name in engines if name != "torch"}
    embedding_difference = {}
    for structure, mask in truth.items():
        k = int(np.median(np.nonzero(mask)[0]))
        _, j, i = np.nonzero(mask[k:k + 1])
        box = [i.min(), j.min(), k, i.max(), j.max(), k]
        reference = engines["torch"].segment(volume, box_ijk=box)
        for name in agreement:
            found = engines[name].segment(volume, box_ijk=box)
            agreement[name][structure] = round(dice(found, reference), 4)
    reference = engines["torch"].embeddings(prepared["torch"], [middle])[middle][0]
    for name in agreement:
        embedding_difference[name] = float((engines[name].embeddings(prepared[name], [middle])[middle][0]
                                            - reference).abs().max())
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average": list(os.getloadavg()), "torch_threads": torch.get_num_threads(),
        "encoder_ms_median": {n: round(float(np.median(v)), 1) for n, v in encode_ms.items()},
        "prompt_ms_p50": {n: round(float(np.percentile(v, 50)), 1) for n, v in decode_ms.items()},
        "prompt_ms_p95": {n: round(float(np.percentile(v, 95)), 1) for n, v in decode_ms.items()},
        "embedding_max_abs_difference": embedding_difference,
        "mask_dice_vs_torch": agreement,
        "encoder_ms_all": {n: [round(x, 1) for x in v] for n, v in encode_ms.items()},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
