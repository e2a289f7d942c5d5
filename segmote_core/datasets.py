"""Training data: finding (image, labels) cases on disk, checking they share one grid, and splitting them.

Two layouts are read:

- **nnU-Net raw** (``imagesTr/ labelsTr/ dataset.json``). v2 ``dataset.json`` (``"labels": {"background": 0,
  "liver": 1}``, ``"file_ending": ".nii.gz"``, ``"channel_names": {"0": "CT"}``) and v1 (``"labels": {"0":
  "background", "1": "liver"}``, ``"modality"``, ``"training": [{"image": ..., "label": ...}]``). Only channel
  ``_0000`` of multi-channel cases is used. v2 region labels (a list of values) mean the union of those values.
- **Slicer pairs**: a scan beside its ``.seg.nrrd`` (segment names come from the file). ``X.seg.nrrd`` pairs with the
  scan ``X.nrrd`` / ``X.nii.gz`` / ... in the same folder; a folder with exactly one scan pairs every
  ``.seg.nrrd`` in it with that scan (e.g. slicerio's ``CTChest4.nrrd`` + ``Segmentation.seg.nrrd``).

Labels must lie on the image's voxel grid. A Slicer segmentation cropped to its segments' extent (same spacing and
direction, an integer voxel offset, inside the image) is pasted into the image grid, as Slicer itself does; any
other mismatch is a one-line ``InputError`` naming both geometries.

Splits: ``split_cases`` is the patient-level seeded split (default 9:1; cases of one patient stay together);
``split_slices`` holds out every n-th slice of one volume (the single-CT demo). ``describe_split`` is what a run
writes down next to its checkpoints.

Paths may start with ``pkg:`` to name a file inside an installed Python package (``pkg:slicerio/data/CTChest4.nrrd``),
so configs that use data shipped with a package work on any machine.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError
from .segmentation_io import read_segments
from .volume import GRID_TOLERANCE_MM, IMAGE_SUFFIXES, Volume, is_segmentation_path, read_volume, strip_image_suffix



@dataclass
class Case:
    """One scan with its labels. ``classes`` maps class name -> label value(s) for label maps (nnU-Net); for a
    ``.seg.nrrd`` it is empty and the file's segment names are the classes."""

    case_id: str
    image: Path
    labels: Path
    modality: str = "unknown"
    classes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    patient: str | None = None

    @property
    def patient_id(self) -> str:
        return self.patient or self.case_id

    def load(self) -> tuple[Volume, dict[str, np.ndarray]]:
        """(image volume, {class name: bool (K, J, I) mask on the image grid})."""
        volume = read_volume(self.image)
        if self.modality not in ("", "unknown"):  # the data set's word (dataset.json, config) beats the file's
            volume.modality = self.modality
        return volume, read_labels(self.labels, volume, self.classes)


# ---- paths ---------------------------------------------------------------------------------------------------
# The packages whose shipped data ``pkg:`` paths may name. A name is looked up in this table, never imported: a
# config naming ``pkg:some.module/...`` must not run that module's code (find_spec imports a dotted name's parents).
DATA_PACKAGES = ("slicerio", "pydicom", "nilearn", "segmote_core")


def resolve_path(path: str | Path) -> Path:
    """A path, or ``pkg:PACKAGE/relative/path`` for a file shipped inside one of the DATA_PACKAGES."""
    text = str(path)
    if not text.startswith("pkg:"):
        return Path(text).expanduser()
    package, _, relative = text[4:].partition("/")
    if package not in DATA_PACKAGES:
        raise InputError(f"{text}: pkg: paths name a file in one of the packages {', '.join(DATA_PACKAGES)}, "
                         f"not {package!r}")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"{text}: no installed Python package named {package!r}")
    root = Path(list(spec.submodule_search_locations)[0])
    resolved = root / relative
    if ".." in Path(relative).parts:
        raise InputError(f"{text}: a pkg: path stays inside its package (no '..')")
    return resolved



# ---- labels on the image grid ----------------------------------------------------------------------------
def read_labels(path: Path, volume: Volume, classes: dict[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """Masks of a label file on ``volume``'s grid: {class name: bool (K, J, I)}.

    ``.seg.nrrd``: one mask per segment, named as in the file. Label maps: ``classes`` maps names to values
    (nnU-Net's dataset.json); without it every non-zero value becomes ``label N``.
    """
    path = Path(path)
    if is_segmentation_path(path):
        grid, segments = read_segments(path)
        return {s.name: on_image_grid(s.mask, grid, volume, path) for s in segments}
    labels = read_volume(path)
    array = on_image_grid(labels.array, labels, volume, path, fill=0)
    if not classes:
        values = [int(v) for v in np.unique(array) if v != 0]
        classes = {f"label {v}": (v,) for v in values}
    return {name: np.isin(array, values) for name, values in classes.items()}


def on_image_grid(array: np.ndarray, grid: Volume, volume: Volume, path: Path, fill=False) -> np.ndarray:
    """An array on ``grid`` brought onto ``volume``'s grid: as is if the grids match; pasted if ``grid`` is a crop
    of the image grid (same spacing and direction, integer offset, inside); otherwise InputError naming both."""
    if grid.same_grid(volume):
        return array
    offset = None
    if (np.allclose(grid.spacing, volume.spacing, atol=GRID_TOLERANCE_MM)
            and np.allclose(grid.direction, volume.direction, atol=GRID_TOLERANCE_MM)):
        continuous = volume.ras_to_ijk(grid.ijk_to_ras_points([[0.0, 0.0, 0.0]]))[0]  # crop origin in image ijk
        rounded = np.round(continuous)
        if np.allclose(continuous, rounded, atol=1e-2):
            offset = rounded.astype(int)
            end = offset + np.asarray(grid.shape_ijk)
            if np.any(offset < 0) or np.any(end > np.asarray(volume.shape_ijk)):
                offset = None
    if offset is None:
        raise InputError(f"labels {path.name} lie on a different grid than image: labels {grid.describe_grid()}; "
                         f"image {volume.describe_grid()}")
    full = np.full(volume.array.shape, fill, dtype=array.dtype)
    i, j, k = offset
    ni, nj, nk = grid.shape_ijk
    full[k:k + nk, j:j + nj, i:i + ni] = array
    return full


# ---- nnU-Net raw ------------------------------------------------------------------------------------------
def _nnunet_classes(labels: dict) -> dict[str, tuple[int, ...]]:
    """dataset.json "labels" (v2 name -> value(s), or v1 "value" -> name) -> {name: values}, background dropped."""
    result = {}
    if labels and all(str(key).isdigit() for key in labels):  # v1
        items = [(name, [int(value)]) for value, name in labels.items()]
    else:
        items = [(name, value if isinstance(value, list) else [value]) for name, value in labels.items()]
    for name, values in items:
        try:
            values = tuple(int(v) for v in values)
        except (TypeError, ValueError):
            raise InputError(f"dataset.json: label {name!r} has a non-integer value {values!r}") from None
        if values == (0,) or str(name).lower() == "background":
            continue
        result[str(name)] = values
    if not result:
        raise InputError("dataset.json names no foreground labels")
    return result


def load_nnunet(root: str | Path, patient_regex: str | None = None) -> list[Case]:
    """Cases of an nnU-Net raw dataset folder (imagesTr/, labelsTr/, dataset.json)."""
    root = resolve_path(root)
    description = root / "dataset.json"
    if not description.is_file():
        raise InputError(f"{root} is not an nnU-Net dataset: no dataset.json")
    try:
        info = json.loads(description.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read {description}: {' '.join(str(error).split())}") from None
    if not isinstance(info, dict) or "labels" not in info:
        raise InputError(f"{description} has no 'labels' entry")
    classes = _nnunet_classes(info["labels"])
    channels = info.get("channel_names") or info.get("modality") or {}
    modality = str(channels.get("0", "unknown")) if isinstance(channels, dict) else "unknown"
    images, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images.is_dir() or not labels_dir.is_dir():
        raise InputError(f"{root} is not an nnU-Net dataset: imagesTr/ and labelsTr/ are both needed")
    cases = []
    if "file_ending" in info:  # v2: pair by file name
        ending = info["file_ending"]
        for label in sorted(labels_dir.glob(f"*{ending}")):
            case_id = label.name[: -len(ending)]
            image = images / f"{case_id}_0000{ending}"
            if not image.is_file():
                raise InputError(f"nnU-Net case {case_id}: labels {label.name} but no image {image.name} in imagesTr/")
            cases.append(Case(case_id, image, label, modality, classes))
    else:  # v1: the "training" list
        for entry in info.get("training", []):
            label = (root / entry["label"]).resolve()
            case_id = strip_image_suffix(label.name) or label.stem
            image = (root / entry["image"]).resolve()
            if not image.is_file():  # v1 lists the case name; files carry the _0000 channel suffix
                suffix = next((s for s in IMAGE_SUFFIXES if image.name.endswith(s)), "")
                image = image.with_name(image.name[: len(image.name) - len(suffix)] + "_0000" + suffix)
            if not image.is_file() or not label.is_file():
                raise InputError(f"nnU-Net case {case_id}: image or labels missing ({entry})")
            cases.append(Case(case_id, image, label, modality, classes))
    if not cases:
        raise InputError(f"no labelled cases found in {labels_dir}")
    return _with_patients(cases, patient_regex)


# ---- Slicer pairs ------------------------------------------------------------------------------------------
def load_slicer_pairs(root: str | Path, modality: str = "unknown", patient_regex: str | None = None) -> list[Case]:
    """Cases from ``.seg.nrrd`` files under ``root`` (searched recursively), each paired with the scan beside it."""
    root = resolve_path(root)
    if not root.is_dir():
        raise InputError(f"data folder not found: {root}")
    cases = []
    for seg in sorted(root.rglob("*.seg.nrrd")):
        cases.append(Case(_case_id(seg, root), pair_scan(seg), seg, modality))
    if not cases:
        raise InputError(f"no .seg.nrrd files found under {root}")
    return _with_patients(cases, patient_regex)


def _case_id(seg: Path, root: Path) -> str:
    relative = seg.relative_to(root)
    return str(relative)[: -len(".seg.nrrd")].replace("\\", "/")


def pair_scan(seg: Path) -> Path:
    """The scan a ``.seg.nrrd`` belongs to: same name without ``.seg``, else the only scan in its folder."""
    stem = seg.name[: -len(".seg.nrrd")]
    scans = sorted(p for p in seg.parent.iterdir()
                   if p.is_file() and not is_segmentation_path(p) and strip_image_suffix(p.name) is not None)
    same = [p for p in scans if strip_image_suffix(p.name) == stem]
    if same:
        return same[0]
    if len(scans) == 1:
        return scans[0]
    found = ", ".join(p.name for p in scans) or "none"
    raise InputError(f"cannot tell which scan {seg.name} belongs to (scans in its folder: {found}); "
                     f"name the scan {stem}.nrrd or keep one scan per folder")


def single_pair(image: str | Path, segmentation: str | Path, modality: str = "unknown") -> list[Case]:
    """One explicitly named (scan, segmentation) pair."""
    image, segmentation = resolve_path(image), resolve_path(segmentation)
    for path in (image, segmentation):
        if not path.exists():
            raise InputError(f"not found: {path}")
    case_id = strip_image_suffix(image.name) or image.stem
    return [Case(case_id, image, segmentation, modality)]


def find_cases(data: str | Path | None = None, layout: str = "auto", image: str | Path | None = None,
               segmentation: str | Path | None = None, modality: str = "unknown",
               patient_regex: str | None = None) -> list[Case]:
    """Cases from an explicit pair (image + segmentation) or a folder (layout auto | nnunet | slicer)."""
    if image is not None or segmentation is not None:
        if image is None or segmentation is None:
            raise InputError("give both an image and a segmentation, or a data folder")
        return single_pair(image, segmentation, modality)
    if data is None:
        raise InputError("no training data: give a data folder, or an image and its segmentation")
    root = resolve_path(data)
    if layout not in ("auto", "nnunet", "slicer"):
        raise InputError(f"unknown data layout {layout!r}; choose auto, nnunet or slicer")
    if layout == "nnunet" or (layout == "auto" and (root / "dataset.json").is_file()):
        return load_nnunet(root, patient_regex)
    return load_slicer_pairs(root, modality, patient_regex)


def _with_patients(cases: list[Case], patient_regex: str | None) -> list[Case]:
    """patient_regex: a regular expression whose first group (or whole match) in the case id is the patient."""
    if not patient_regex:
        return cases
    try:
        pattern = re.compile(patient_regex)
    except re.error as error:
        raise InputError(f"patient_regex {patient_regex!r} is not a valid regular expression ({error})") from None
    for case in cases:
        match = pattern.search(case.case_id)
        if match is None:
            raise InputError(f"patient_regex {patient_regex!r} does not match case {case.case_id!r}")
        case.patient = match.group(1) if pattern.groups else match.group(0)
    return cases


# ---- splits ----------------------------------------------------------------------------------------------
def split_cases(cases: list[Case], val_fraction: float = 0.1, seed: int = 0) -> dict[str, list[str]]:
    """Patient-level seeded split: {"train": case ids, "val": case ids}; a patient's cases never straddle.

    The patients are sorted, shuffled with ``seed``, and round(val_fraction * patients) of them (at least one
    when there are two or more patients and val_fraction > 0) go to validation.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"val_fraction must be in [0, 1), got {val_fraction}")
    patients = sorted({case.patient_id for case in cases})
    order = np.random.default_rng(seed).permutation(len(patients))
    count = int(round(val_fraction * len(patients)))
    if val_fraction > 0 and len(patients) >= 2:
        count = min(max(count, 1), len(patients) - 1)
    val_patients = {patients[i] for i in order[:count]}
    return {
        "train": [c.case_id for c in cases if c.patient_id not in val_patients],
        "val": [c.case_id for c in cases if c.patient_id in val_patients],
    }


def split_slices(num_slices: int, holdout_every: int = 3, holdout_offset: int = 1) -> dict[str, list[int]]:
    """Single-volume split: slice i is held out when ``i % holdout_every == holdout_offset``.

    With the defaults, slices 1, 4, 7, ... are held out and every held-out slice has a training slice on each side.
    """
    if holdout_every < 2:
        raise InputError(f"holdout_every must be 2 or more, got {holdout_every}")
    if not 0 <= holdout_offset < holdout_every:
        raise InputError(f"holdout_offset must be in [0, {holdout_every}), got {holdout_offset}")
    held = [i for i in range(num_slices) if i % holdout_every == holdout_offset]
    return {"train": [i for i in range(num_slices) if i % holdout_every != holdout_offset], "val": held}


def describe_split(kind: str, seed: int, split: dict, **details) -> dict:
    """The JSON a run writes down (split.json), so that its held-out data is known exactly."""
    return {"kind": kind, "seed": seed, **details, **{name: list(items) for name, items in split.items()}}
