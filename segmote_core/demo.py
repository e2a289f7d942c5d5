"""`segmote demo`: both lungs of the chest CT that slicerio ships, offline, scored against its ground truth.

The right lung is prompted with a 3-D box, the left with a 2-D box on one axial slice propagated up and down.
The boxes are the ones a user would drag around each lung; here they come from the ground truth's extent
(dilated by one voxel in-plane), which is also what makes the run reproducible. With the shipped adapter
(segmote_core/data/adapters/chest_ct_lungs.safetensors) the demo also runs one-button automatic segmentation and
one click in the middle of each lung on every slice the adapter never trained on.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from .colors import palette_color
from .metrics import dice, pooled_dice
from .normalize import CT_WINDOWS, window
from .preview import save_overlay_png
from .segmentation_io import Segment, read_segments, save_segments
from .shipped import ADAPTER_DIR
from .toolbox import mask_extent

log = logging.getLogger(__name__)
SHIPPED_ADAPTER = ADAPTER_DIR / "chest_ct_lungs.safetensors"


def demo_data() -> tuple[Path, Path]:
    import slicerio

    folder = Path(os.path.dirname(slicerio.__file__)) / "data"
    return folder / "CTChest4.nrrd", folder / "Segmentation.seg.nrrd"


def _box_ras(volume, mask: np.ndarray, slice_k: int | None = None) -> np.ndarray:
    """RAS corners of the box around a (K, J, I) mask (or one of its axial slices), one voxel looser in-plane."""
    ks, js, is_ = mask_extent(mask if slice_k is None else (mask & (np.arange(mask.shape[0]) == slice_k)[:, None, None]))
    low = [max(is_.start - 1, 0), max(js.start - 1, 0), ks.start]
    high = [min(is_.stop, mask.shape[2] - 1), min(js.stop, mask.shape[1] - 1), ks.stop - 1]
    return volume.ijk_to_ras_points([low, high]).reshape(-1)


def run(out_dir: str | Path = "segmote-demo", device: str = "auto", engine=None, adapter_engine=None) -> int:
    """The demo; what it finds is logged at INFO level (the CLI shows it unless asked to be quiet).

    engine: the LiteMedSAM engine for the prompts; adapter_engine: one with the shipped adapter loaded, for the
    automatic segmentation and the clicks (default: a second engine on the same backbone)."""
    from .engine import Engine
    from .volume import read_volume

    out_dir = Path(out_dir)
    image_path, truth_path = demo_data()
    volume = read_volume(image_path)
    _, truth_segments = read_segments(truth_path)
    truth = {s.name: s.mask for s in truth_segments}
    log.info(f"chest CT {volume.describe_grid()}")

    started = time.perf_counter()
    engine = engine or Engine("lite_medsam", device=device)
    log.info(f"runtime: {engine.runtime_description}")
    for notice in engine.notices:
        log.info(f"note: {notice}")
    seen = engine.prepare(volume).normalization  # no window: the model's own default for the scan's modality
    log.info(f"normalisation: {seen.description}")
    right = truth["right lung"]
    right_box = volume.ras_to_ijk(_box_ras(volume, right).reshape(2, 3)).reshape(-1)
    right_mask = engine.segment(volume, box_ijk=right_box)
    left = truth["left lung"]
    middle_k = int(np.median(np.nonzero(left)[0]))
    left_box = volume.ras_to_ijk(_box_ras(volume, left, middle_k).reshape(2, 3)).reshape(-1)
    left_mask = engine.segment(volume, box_ijk=left_box, propagate=True)
    elapsed = time.perf_counter() - started

    predictions = {"right lung": right_mask, "left lung": left_mask}
    scores = {name: dice(mask, truth[name]) for name, mask in predictions.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_segments(out_dir / "demo.seg.nrrd", volume, [Segment("right lung", right_mask, palette_color(0)),
                                                      Segment("left lung", left_mask, palette_color(1))],
                  replace_same_name=True)
    log.info(f"right lung (3D box):               Dice {scores['right lung']:.3f}")
    log.info(f"left lung (2D box on slice {middle_k}, propagated): Dice {scores['left lung']:.3f}")
    log.info(f"prompted segmentation took {elapsed:.1f} s on {engine.device} ({engine.cache.misses} slices embedded)")

    if SHIPPED_ADAPTER.is_file():
        adapter_engine = adapter_engine or Engine(device=str(engine.device), backbone=engine.backbone,
                                                  adapter=SHIPPED_ADAPTER)
        started = time.perf_counter()
        automatic = adapter_engine.auto(volume)
        held_out = _held_out_slices(adapter_engine.adapter_header, volume.array.shape[0])
        for segment in automatic:
            if segment.name in truth:
                rows = held_out if held_out is not None else slice(None)
                log.info(f"automatic {segment.name}: Dice {dice(segment.mask[rows], truth[segment.name][rows]):.3f}"
                    f"{' on held-out slices' if held_out is not None else ''}")
        save_segments(out_dir / "demo-auto.seg.nrrd", volume, automatic, replace_same_name=True)
        log.info(f"automatic segmentation took {time.perf_counter() - started:.1f} s")
        if held_out is not None:
            for name, score in one_click_dice(adapter_engine, volume, truth, held_out).items():
                log.info(f"one click on the {name}: Dice {score:.3f} on held-out slices")
    else:
        log.info(f"no shipped adapter found ({SHIPPED_ADAPTER}): skipping automatic segmentation")

    save_overlay_png(out_dir / "demo.png", volume, predictions, window(*CT_WINDOWS["lung"]), truth,
                     f"SegMoTE demo (LiteMedSAM): right lung 3D box Dice {scores['right lung']:.3f}, "
                     f"left lung 2D box + propagation Dice {scores['left lung']:.3f}; lines = ground truth")
    log.info(f"wrote {out_dir / 'demo.seg.nrrd'} and {out_dir / 'demo.png'}")
    return 0


def one_click_dice(engine, volume, truth: dict, slices) -> dict[str, float]:
    """Per lung: one positive click at its innermost point on each of the given axial slices where it is present,
    the engine's answers pooled into one Dice (what a user gets by clicking once in the middle of a lung)."""
    from .evalset import innermost_point

    prepared = engine.prepare(volume)
    scores = {}
    for name in ("right lung", "left lung"):
        planes = prepared.stack.to_stack(truth[name])
        answers = []
        for k in slices:
            if planes[k].any():
                row, col = innermost_point(planes[k])
                click = engine.predict_slice(prepared, int(k), points=np.array([[col, row]], float),
                                             point_labels=np.array([1]))
                answers.append((click.mask, planes[k]))
        scores[name] = pooled_dice(answers)
    return scores


def _held_out_slices(header: dict | None, num_slices: int):
    """Axial slice indices the shipped adapter never saw in training, if its header records the split."""
    split = (header or {}).get("extra", {}).get("split", {})
    indices = split.get("val") if split.get("kind") == "slice" else None
    return np.asarray(indices, dtype=int) if indices else None
