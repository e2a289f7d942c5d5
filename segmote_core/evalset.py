"""A small evaluation set beyond the chest CT: real scans that PyPI packages ship, with labels derived by rule.

Nothing is downloaded: the files are read from the installed packages (``pip install segmote[test]`` brings them).

| case | image | structure | how the label is made |
|---|---|---|---|
| ``mni152_t1`` | nilearn's MNI152 2009c T1 template (an average of 152 T1 MR scans, skull-stripped, 1 mm; uint8) | ``brain`` | every non-zero voxel (the template ships skull-stripped) |
| | | ``white matter`` | nilearn's white-matter probability map shipped with it >= 50 % |
| | | ``ventricles`` | CSF (brain, grey + white matter probability < 50 %) not connected to the CSF on the brain's surface: the largest such 3-D component |
| ``pydicom_ct`` | pydicom's ``CT_small.dcm`` (one real 128x128 CT slice of the thoracic spine, HU) | ``vertebra`` | the largest 2-D component of voxels >= 200 HU (the vertebra with the rib head joined to it) |

Only a slab of the template is used (``MNI_SLAB``: axial slices through the ventricles) so that a run embeds few
slices. ``evaluate`` gives, per structure, 2-D box Dice (the tight box of each slice's label, one voxel looser)
and one-click Dice (one positive click at the label's innermost point on each slice), as mean Dice over the
structure's slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .datasets import resolve_path
from .metrics import dice
from .toolbox import mask_box
from .volume import Volume, read_volume

MNI_DIR = "pkg:nilearn/datasets/data"
MNI_T1 = f"{MNI_DIR}/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
MNI_GM = f"{MNI_DIR}/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
MNI_WM = f"{MNI_DIR}/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"
PYDICOM_CT = "pkg:pydicom/data/test_files/CT_small.dcm"
MNI_SLAB = (86, 102)  # axial voxel slices [start, stop) of the template: the bodies of the lateral ventricles


@dataclass
class EvalCase:
    name: str
    modality: str
    volume: Volume
    labels: dict[str, np.ndarray]  # structure -> bool (K, J, I) on the volume's grid


def _read(path: str) -> Volume:
    resolved = resolve_path(path)
    if not resolved.exists():
        from .errors import InputError

        raise InputError(f"{path} is not installed (pip install 'segmote[test]' brings nilearn and pydicom)")
    return read_volume(resolved)


def _slab(volume: Volume, start: int, stop: int) -> Volume:
    """Axial voxel slices [start, stop) of a volume whose K axis is axial, with the right origin."""
    origin = volume.ijk_to_lps[:3, 3] + start * volume.ijk_to_lps[:3, 2]
    return Volume(volume.array[start:stop].copy(), volume.spacing, origin, volume.direction)


def mni152_case(slab: tuple[int, int] = MNI_SLAB) -> EvalCase:
    from scipy import ndimage

    t1, gm, wm = _read(MNI_T1), _read(MNI_GM), _read(MNI_WM)
    brain = t1.array > 0
    tissue = gm.array.astype(np.int32) + wm.array.astype(np.int32)
    csf = brain & (tissue < 128)
    # CSF touching the brain's outer surface is sulcal/cisternal; the ventricles are enclosed by tissue.
    surface = ndimage.binary_dilation(~brain, iterations=2)
    components, count = ndimage.label(csf)
    touching = np.unique(components[surface & csf])
    sizes = np.bincount(components.reshape(-1), minlength=count + 1)
    sizes[0] = 0
    sizes[touching] = 0
    ventricles = components == int(np.argmax(sizes))
    labels = {"brain": brain, "white matter": wm.array >= 128, "ventricles": ventricles}
    start, stop = slab
    volume = _slab(t1, start, stop)
    volume.modality = "MR"
    return EvalCase("mni152_t1", "MR", volume, {name: mask[start:stop] for name, mask in labels.items()})


def pydicom_ct_case() -> EvalCase:
    from scipy import ndimage

    volume = _read(PYDICOM_CT)
    hu = volume.array[0]

    def largest(mask: np.ndarray) -> np.ndarray:
        components, _ = ndimage.label(mask)
        return components == int(np.argmax(np.bincount(components.reshape(-1))[1:]) + 1)

    return EvalCase("pydicom_ct", "CT", volume, {"vertebra": largest(hu >= 200)[None]})


def cases() -> list[EvalCase]:
    return [mni152_case(), pydicom_ct_case()]


def innermost_point(mask2d: np.ndarray) -> tuple[int, int]:
    """(row, col) of the label voxel farthest from its edge: where a user clicks "in the middle" of it."""
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(np.pad(mask2d, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(row), int(col)


def evaluate(engine, case: EvalCase, structures=None, slices=None, modes=("box", "click"),
             record: list | None = None) -> dict:
    """{structure: {mode: mean Dice over its slices, "slices": n, "predicted_iou": mean}} on axial slices.

    slices: stack indices to use (None: every slice where the structure is present); record: a list to append
    (case, structure, mode, slice, Dice, predicted IoU) to, one tuple per prompt."""
    prepared = engine.prepare(case.volume)
    prepared_for = {mode: engine.boxes_view(prepared) if mode == "box" else prepared for mode in modes}
    stack = prepared_for[modes[0]].stack
    results = {"normalization": {mode: p.normalization.description for mode, p in prepared_for.items()}}
    for name in structures or case.labels:
        truth = stack.to_stack(case.labels[name])
        present = [int(k) for k in np.flatnonzero(truth.any(axis=(1, 2))) if slices is None or k in slices]
        row = {"slices": len(present)}
        for mode in modes:
            prepared = prepared_for[mode]
            scores, ious = [], []
            for k in present:
                plane = truth[k]
                if mode == "box":
                    prediction = engine.predict_slice(prepared, k, box=mask_box(plane, margin=1))
                else:
                    row_, col = innermost_point(plane)
                    prediction = engine.predict_slice(prepared, k, points=np.array([[col, row_]], float),
                                                      point_labels=np.array([1]))
                scores.append(dice(prediction.mask, plane))
                ious.append(prediction.score)
                if record is not None:
                    record.append((case.name, name, mode, k, scores[-1], prediction.score))
            row[mode] = round(float(np.mean(scores)), 3)
            row[f"{mode}_predicted_iou"] = round(float(np.mean(ious)), 3)
        results[name] = row
    return results


def main(argv=None) -> int:
    """python -m segmote_core.evalset [--adapter FILE]: the table quoted in docs/training.md."""
    import argparse
    import json

    from .engine import Engine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", help="also evaluate with this adapter loaded")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    engine = Engine("lite_medsam", device="cpu")
    report = {}
    for case in cases():
        report[case.name] = {"base": evaluate(engine, case)}
        if args.adapter:
            engine.load_adapter(args.adapter)
            report[case.name]["adapter"] = evaluate(engine, case)
            engine.unload_adapter()
        print(case.name, json.dumps(report[case.name], indent=1), flush=True)
    if args.json:
        from .files import atomic_write_text

        atomic_write_text(args.json, json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
