"""Reading and writing segmentations: Slicer .seg.nrrd (named, coloured segments, via slicerio) and label maps.

Adding to an existing file never changes its other segments: .seg.nrrd segments that would overlap go to a new
layer (as Slicer stores overlapping segments); in a label map the existing labels keep their voxels. Every write is
atomic (temp file + rename), so a failure leaves the previous file exactly as it was, and a read-modify-write holds
an exclusive lock (files.output_lock), so two processes adding to one file keep both their segments.

An existing output must hold a segmentation (judged by content, not by name): a .seg.nrrd with segments (or an
empty one), or a label map (whole, non-negative voxel values, at most MAX_LABELS of them). Anything else (an image,
a probability map) is refused unless the caller asks to replace the file.

New .seg.nrrd segments carry their standard terminology (SNOMED CT category, type and laterality; see
terminology.py) in 3D Slicer's TerminologyEntry tag; a segment without a colour of its own gets the colour the
terminology recommends for it.

Label maps store their segment names in the file's header (key ``SegMoTE_LabelNames``, JSON {value: name}; NIfTI:
in its 80-character description while they fit). Every name and header string is checked by ``check_header_text``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import nrrd
import numpy as np
import SimpleITK as sitk
import slicerio
from slicerio.segmentation import generate_unique_segment_id, terminology_entry_to_string

from .colors import palette_color
from .errors import InputError
from .files import atomic_write, output_lock
from .terminology import resolve as resolve_terminology
from .toolbox import mask_extent, ras_lps
from .volume import Volume, check_output_path, is_segmentation_path, read_volume, same_grid



@dataclass
class Segment:
    name: str
    mask: np.ndarray  # bool (K, J, I) on the reference volume's grid
    color: tuple[float, float, float] | None = None


def _grid_mismatch(volume: Volume, shape_ijk, ijk_to_lps) -> str | None:
    if same_grid(shape_ijk, ijk_to_lps, volume.shape_ijk, volume.ijk_to_lps):
        return None
    origin = np.round(np.asarray(ijk_to_lps)[:3, 3], 3).tolist()
    spacing = np.round(np.linalg.norm(np.asarray(ijk_to_lps)[:3, :3], axis=0), 4).tolist()
    return (f"{'x'.join(map(str, shape_ijk))} voxels, spacing {spacing} mm, origin {origin} (LPS) "
            f"vs the image's {volume.describe_grid()}")


MAX_LABELS = 1000  # more distinct values than this: an image, not a label map
MAX_NAME_LENGTH = 200
LABEL_NAMES_KEY = "SegMoTE_LabelNames"
NIFTI_NOTES_KEY, NIFTI_NOTES_PREFIX, NIFTI_NOTES_LENGTH = "ITK_FileNotes", "segmote-labels:", 79


def check_header_text(value: object, what: str = "segment name") -> str:
    """The one check for text that goes into a file header (segment and class names): printable ASCII, no
    leading or trailing spaces, at most MAX_NAME_LENGTH characters. A newline would end the header field and
    start another (header injection), and NRRD headers are ASCII; such a name is refused, never altered."""
    if not isinstance(value, str) or not value:
        raise InputError(f"{what} must be a non-empty string, got {value!r}")
    if len(value) > MAX_NAME_LENGTH:
        raise InputError(f"{what} is {len(value)} characters long; at most {MAX_NAME_LENGTH} can be stored")
    bad = next((c for c in value if not " " <= c <= "~"), None)
    if bad is not None:
        raise InputError(f"{what} {value!r} contains {bad!r}; file headers hold printable ASCII only "
                         "(no newlines, tabs or accents)")
    if value != value.strip():
        raise InputError(f"{what} {value!r} starts or ends with a space, which file headers do not keep")
    return value


def check_color(color, name: str) -> tuple[float, float, float]:
    try:
        rgb = tuple(float(c) for c in color)
    except (TypeError, ValueError):
        rgb = ()
    if len(rgb) != 3 or not all(0.0 <= c <= 1.0 for c in rgb):  # also refuses NaN
        raise InputError(f"segment {name!r}: colour must be three numbers in [0, 1], got {color!r}")
    return rgb


def read_segments(path: str | Path) -> tuple[Volume, list[Segment]]:
    """Read segments (bool masks in (K, J, I) order) and the grid they live on."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"segmentation not found: {path}")
    if is_segmentation_path(path):
        seg = _read_seg_nrrd(path, "segmentation")
        voxels = seg["voxels"]
        shape = voxels.shape[-3:]
        matrix = np.asarray(seg["ijkToLPS"], dtype=float)
        grid = Volume.from_ijk_to_ras(np.zeros(shape[::-1], np.uint8), ras_lps(matrix))
        segments = [
            Segment(s.get("name", s["id"]), np.transpose(slicerio.segment_mask(seg, s["id"]), (2, 1, 0)),
                    tuple(s.get("color", (0.5, 0.5, 0.5))))
            for s in seg["segments"]
        ]
        return grid, segments
    labels, names = _read_labelmap(path)
    values = [int(v) for v in np.unique(labels.array) if v != 0]
    return labels, [Segment(names.get(v, f"label {v}"), labels.array == v, palette_color(v - 1))
                    for v in values]


def existing_segment_names(path: str | Path) -> set[str] | None:
    """The segment names an existing output holds (a .seg.nrrd's header, a label map's stored names), read before
    any model runs; None when there is no such file or it is not a readable segmentation (saving says why)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        if is_segmentation_path(path):
            return {s.get("name", s["id"]) for s in slicerio.read_segmentation(str(path), skip_voxels=True)["segments"]}
        labels, names = _read_labelmap(path)
        if labelmap_problem(labels.array):
            return None
        return {names.get(int(v), f"label {int(v)}") for v in np.unique(labels.array) if v != 0}
    except Exception:  # noqa: BLE001 - an unreadable file is judged (and refused) when saving
        return None


def _read_seg_nrrd(path: Path, what: str) -> dict:
    try:
        return slicerio.read_segmentation(str(path))
    except Exception as exc:  # slicerio raises many types on bad files
        raise InputError(f"cannot read {what} {path.name}: {type(exc).__name__}: {str(exc)[:120]}") from None


def _read_labelmap(path: Path) -> tuple[Volume, dict[int, str]]:
    labels = read_volume(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    text = None
    if reader.HasMetaDataKey(LABEL_NAMES_KEY):
        text = reader.GetMetaData(LABEL_NAMES_KEY)
    elif reader.HasMetaDataKey(NIFTI_NOTES_KEY) and reader.GetMetaData(NIFTI_NOTES_KEY).startswith(NIFTI_NOTES_PREFIX):
        text = reader.GetMetaData(NIFTI_NOTES_KEY)[len(NIFTI_NOTES_PREFIX):]
    names = {}
    if text:
        try:
            names = {int(value): str(name) for value, name in json.loads(text).items()}
        except (ValueError, AttributeError, TypeError):
            names = {}  # foreign or damaged notes: labels keep their "label N" names
    return labels, names


def labelmap_problem(array: np.ndarray) -> str | None:
    """Why an array is not a label map (None if it is one): labels are whole, non-negative and few."""
    if array.dtype.kind not in "iub" and not (array.dtype.kind == "f" and np.all(np.isfinite(array))
                                              and np.array_equal(array, np.round(array))):
        return f"it holds {array.dtype} values that are not whole numbers (an image or a probability map?)"
    if array.size and array.min() < 0:
        return f"it holds negative values (down to {array.min()}): an image, not labels"
    values = np.unique(array)
    # Labels are few, and each covers many voxels; an image's values are many, each on a few voxels.
    if len(values) > MAX_LABELS or (len(values) > 64 and len(values) > np.count_nonzero(array) / 4):
        return f"it holds {len(values)} distinct values: an image, not labels"
    return None


def save_segments(path: str | Path, volume: Volume, segments: list[Segment], replace_same_name: bool = False,
                  replace_other_file: bool | None = None, notices: list[str] | None = None) -> list[int]:
    """Add segments to the file at `path` (created if absent) on `volume`'s grid, atomically; returns the number
    of voxels stored per segment (in a label map a new label only takes voxels no other label holds).

    replace_same_name: an existing segment with the same name as a new one is replaced (the CLI's --overwrite);
    otherwise a name clash is an error. Other existing segments are always kept bit-identical.
    replace_other_file: an existing file that holds no segmentation (an image...) is replaced instead of refused
    (default: replace_same_name, as the CLI's --overwrite means both).
    notices: receives what the user should know (a NIfTI label map that cannot hold the names).
    """
    path = check_output_path(path)
    if replace_other_file is None:
        replace_other_file = replace_same_name
    names = []
    for segment in segments:
        check_header_text(segment.name)
        if segment.color is not None:
            segment.color = check_color(segment.color, segment.name)
        if segment.mask.shape != volume.array.shape:
            raise InputError(f"segment '{segment.name}' has shape {segment.mask.shape}, image {volume.array.shape}")
        if segment.name in names:
            raise InputError(f"two new segments are both named '{segment.name}'")
        names.append(segment.name)
    with output_lock(path):
        if is_segmentation_path(path):
            return _save_seg_nrrd(path, volume, segments, replace_same_name, replace_other_file)
        return _save_labelmap(path, volume, segments, replace_same_name, replace_other_file, notices)


def _not_a_segmentation(path: Path, reason: str) -> InputError:
    return InputError(f"existing output {path.name} is not a segmentation ({reason}); choose another --out, "
                      "or pass --overwrite to replace the file")


def _save_seg_nrrd(path: Path, volume: Volume, segments: list[Segment], replace_same_name: bool,
                   replace_other_file: bool) -> list[int]:
    seg, header = None, None
    if path.exists():
        try:
            seg = slicerio.read_segmentation(str(path))
            if not seg["segments"] and np.any(seg["voxels"]):
                raise _not_a_segmentation(path, "an image without segments")
            header = nrrd.read_header(str(path))
        except Exception as exc:
            if not replace_other_file:
                raise exc if isinstance(exc, InputError) else _not_a_segmentation(path, f"unreadable: {type(exc).__name__}")
            seg, header = None, None
    if seg is not None:
        problem = _grid_mismatch(volume, seg["voxels"].shape[-3:], seg["ijkToLPS"])
        if problem:
            raise InputError(f"existing output {path.name} lies on another grid: {problem}")
        # Every field another tool (or Slicer) wrote is kept as written: a segment's fields by their raw text.
        raw = _raw_segment_fields(header)
        for segment, fields in zip(seg["segments"], raw):
            segment["raw_fields"] = fields
        existing = {s.get("name"): s for s in seg["segments"]}
        for segment in segments:
            if segment.name in existing:
                if not replace_same_name:
                    raise InputError(f"{path.name} already has a segment named '{segment.name}'; "
                                     "give another --name or pass --overwrite to replace it")
                _remove_segment(seg, existing[segment.name])
    else:
        seg = slicerio.create_segmentation(volume.shape_ijk, volume.ijk_to_lps)
    used_colors = len(seg["segments"])
    fields = []
    for index, segment in enumerate(segments):
        entry = resolve_terminology(segment.name).entry
        color = segment.color or entry.color or palette_color(used_colors + index)
        fields.append({"name": segment.name, "color": [float(c) for c in color],
                       "terminology": entry.slicer_terminology()})
    _add_segments(seg, [np.transpose(np.asarray(segment.mask, bool), (2, 1, 0)) for segment in segments], fields)
    atomic_write(path, lambda temp: _write_seg_nrrd(temp, seg, header))
    return [int(np.count_nonzero(segment.mask)) for segment in segments]


_SEGMENT_FIELD = re.compile(r"^Segment([0-9]+)_(.+)$")


def _remove_segment(seg: dict, segment: dict) -> None:
    """Take a segment out of a slicerio segmentation: its voxels in its layer are cleared, its entry dropped (the
    other segments, their labels and layers stay as they were)."""
    voxels = seg["voxels"]
    layer = voxels[segment.get("layer", 0)] if voxels.ndim == 4 else voxels
    layer[layer == segment.get("labelValue", 1)] = 0
    seg["segments"] = [s for s in seg["segments"] if s is not segment]


def _raw_segment_fields(header: dict) -> list[dict]:
    """Each segment's header fields (name after `SegmentN_` -> the text as written), in slicerio's order."""
    fields: dict[int, dict] = {}
    for key, value in header.items():
        match = _SEGMENT_FIELD.match(key)
        if match:
            fields.setdefault(int(match.group(1)), {})[match.group(2)] = value
    return [fields[index] for index in sorted(fields)]


def _add_segments(seg: dict, masks: list[np.ndarray], fields: list[dict]) -> None:
    """Add segments ((I, J, K) masks) to a slicerio segmentation as Slicer stores them: each in a layer where it
    overlaps nothing, a new layer where none is free. Linear in the number of segments: a per-voxel count of the
    layers in use picks the layer (the first above everything already at the segment's voxels), each mask is
    touched only within its bounding box, and the layers are stacked once at the end."""
    voxels = seg["voxels"]
    layers = list(voxels) if voxels.ndim == 4 else [voxels]
    max_label = int(np.iinfo(voxels.dtype).max)
    next_label = [1] * len(layers)
    for segment in seg["segments"]:
        layer = segment.get("layer", 0)
        next_label[layer] = max(next_label[layer], segment.get("labelValue", 1) + 1)
    # layers in use at each voxel (1 + the highest one), in the smallest type that counts every layer there can be
    used = np.zeros(voxels.shape[-3:], np.min_scalar_type(len(layers) + len(masks)))
    for index, layer in enumerate(layers):
        used[layer != 0] = index + 1
    ids = {s.get("id") for s in seg["segments"]}
    for mask, field in zip(masks, fields):
        extent = mask_extent(mask)
        box = extent or (slice(0, 0),) * 3
        inside = mask[box]
        layer = int(used[box][inside].max(initial=0))
        while layer < len(layers) and next_label[layer] > max_label:
            layer += 1
        if layer == len(layers):
            layers.append(np.zeros(voxels.shape[-3:], voxels.dtype))
            next_label.append(1)
        label = next_label[layer]
        next_label[layer] += 1
        layers[layer][box][inside] = label
        used[box][inside] = layer + 1
        segment = dict(field)
        segment.setdefault("id", generate_unique_segment_id(ids))
        ids.add(segment["id"])
        segment.update(labelValue=int(label), layer=int(layer),
                       extent=[0, -1, 0, -1, 0, -1] if extent is None else [v for b in box for v in (b.start, b.stop - 1)])
        seg["segments"].append(segment)
    seg["voxels"] = np.stack(layers) if len(layers) > 1 else layers[0]


_GEOMETRY_FIELDS = ("type", "dimension", "sizes", "endian", "kinds", "space directions", "space origin", "space",
                    "data file", "line skip", "byte skip")


def _write_seg_nrrd(file: Path, seg: dict, header: dict | None) -> None:
    """Write a segmentation. The fields of the file it was read from (`header`) are written back as they were
    (another tool's fields, each kept segment's fields as raw text, in their order); only the geometry follows the
    voxels (a new layer) and new segments get slicerio's fields."""
    voxels, ijk_to_lps = seg["voxels"], np.asarray(seg["ijkToLPS"], float)
    if header is None:  # a new file: slicerio's fields and defaults
        slicerio.write_segmentation(str(file), seg)
        return
    out = {key: value for key, value in header.items()
           if key not in _GEOMETRY_FIELDS and not _SEGMENT_FIELD.match(key)}
    if "space directions" in header:
        kinds, directions = list(header.get("kinds", ["domain"] * 3)), np.asarray(header["space directions"], float)
        geometry = {"space": header.get("space", "left-posterior-superior"),
                    "space origin": header.get("space origin", ijk_to_lps[:3, 3])}
    else:
        kinds, directions = ["domain"] * 3, ijk_to_lps[:3, :3].T
        geometry = {"space": "left-posterior-superior", "space origin": ijk_to_lps[:3, 3]}
    if voxels.ndim == 4 and len(kinds) == 3:  # the first overlapping segment: a list axis in front
        kinds, directions = ["list", *kinds], np.vstack([np.full(3, np.nan), directions])
    geometry.update({"kinds": kinds, "space directions": directions})
    fields: dict = {}
    for index, segment in enumerate(seg["segments"]):
        raw = segment.get("raw_fields")
        if raw is None:
            raw = _new_segment_fields(segment)
        fields.update({f"Segment{index}_{key}": value for key, value in raw.items()})
    nrrd.write(str(file), voxels, {**geometry, **out, **fields}, index_order="F")


def _new_segment_fields(segment: dict) -> dict[str, str]:
    """The header fields slicerio writes for a segment added by SegMoTE."""
    return {"Name": segment["name"], "Color": " ".join(str(c) for c in segment["color"]), "ID": segment["id"],
            "LabelValue": str(segment["labelValue"]), "Layer": str(segment["layer"]),
            "Extent": " ".join(str(v) for v in segment["extent"]),
            "Tags": f"TerminologyEntry:{terminology_entry_to_string(segment['terminology'])}|"}


def _save_labelmap(path: Path, volume: Volume, segments: list[Segment], replace_same_name: bool,
                   replace_other_file: bool, notices: list[str] | None = None) -> list[int]:
    labels, names, fields = np.zeros(volume.array.shape, np.int64), {}, {}
    nifti = path.name.lower().endswith((".nii", ".nii.gz"))
    if path.exists():
        try:
            existing, names = _read_labelmap(path)
            problem = labelmap_problem(existing.array)
        except InputError as error:
            existing, problem = None, f"unreadable: {error}"
        if problem and not replace_other_file:
            raise _not_a_segmentation(path, problem)
        if not problem:
            mismatch = _grid_mismatch(volume, existing.shape_ijk, existing.ijk_to_lps)
            if mismatch:
                raise InputError(f"existing output {path.name} lies on another grid: {mismatch}")
            labels = existing.array.astype(np.int64)
            present = {int(v) for v in np.unique(labels) if v != 0}
            names = {value: names.get(value, f"label {value}") for value in present}
            fields = _own_header_fields(path)
        else:
            names = {}
    by_name = {name: value for value, name in names.items()}
    top = max([int(labels.max(initial=0)), *names])
    stored = []
    for segment in segments:
        value = by_name.get(segment.name)
        if value is not None:
            if not replace_same_name:
                raise InputError(f"{path.name} already has a segment named '{segment.name}' (label {value}); "
                                 "give another --name or pass --overwrite to replace it")
            labels[labels == value] = 0  # only the replaced label gives up its voxels
        else:
            top = value = top + 1
        free = segment.mask.astype(bool) & (labels == 0)
        labels[free] = value
        names[value] = segment.name
        by_name[segment.name] = value
        stored.append(int(np.count_nonzero(free)))
    top = int(labels.max(initial=0))
    dtype = next(t for t in (np.uint8, np.uint16, np.uint32, np.uint64) if top <= np.iinfo(t).max)
    image = volume.to_sitk(labels.astype(dtype))
    for key, value in fields.items():  # the file's own fields (another tool's), as they were
        image.SetMetaData(key, value)
    text = _names_text(names)
    if nifti:
        notes = fields.get(NIFTI_NOTES_KEY, "")
        foreign = bool(notes) and not notes.startswith(NIFTI_NOTES_PREFIX)  # another tool's description: kept
        kept = {} if foreign else _names_that_fit(names)
        if not foreign:
            image.SetMetaData(NIFTI_NOTES_KEY, NIFTI_NOTES_PREFIX + _names_text(kept) if kept else "")
        unnamed = [v for v in sorted(names) if v not in kept and names[v] != f"label {v}"]
        if unnamed and notices is not None:
            why = ("its description holds another tool's text, which is kept" if foreign
                   else f"its description holds {NIFTI_NOTES_LENGTH + 1} characters")
            notices.append(f"{path.name}: a NIfTI label map cannot store every segment name ({why}); read back, "
                           + ", ".join(f"label {v} ({names[v]!r})" for v in unnamed) + " will be named 'label N' "
                           "(the run record keeps the names; a .seg.nrrd or .nrrd output stores them)")
    else:
        image.SetMetaData(LABEL_NAMES_KEY, text)
    atomic_write(path, lambda temp: sitk.WriteImage(image, str(temp), useCompression=True))
    return stored


def _names_text(names: dict[int, str]) -> str:
    return json.dumps({str(v): names[v] for v in sorted(names)}, separators=(",", ":"))


def _names_that_fit(names: dict[int, str]) -> dict[int, str]:
    """As many label names (in label order) as NIfTI's 80-character description holds with the prefix."""
    kept: dict[int, str] = {}
    for value in sorted(names):
        if names[value] == f"label {value}":
            continue  # the name reading gives an unnamed label anyway
        trial = {**kept, value: names[value]}
        if len(NIFTI_NOTES_PREFIX) + len(_names_text(trial)) <= NIFTI_NOTES_LENGTH:
            kept = trial
    return kept


# Fields the image readers derive from the file's own structure (ITK, NRRD, NIfTI): not the file's own text.
_DERIVED_FIELD = re.compile(r"^(ITK_(?!FileNotes$)|NRRD_)")


def _own_header_fields(path: Path) -> dict[str, str]:
    """The header fields of an existing label map that its writer chose (an NRRD/MHA `key:=value`, a NIfTI
    description), to write back unchanged; NIfTI's structural fields (dims, qform...) are rewritten by ITK."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    if path.name.lower().endswith((".nii", ".nii.gz")):
        notes = reader.GetMetaData(NIFTI_NOTES_KEY) if reader.HasMetaDataKey(NIFTI_NOTES_KEY) else ""
        return {NIFTI_NOTES_KEY: notes} if notes else {}
    return {key: reader.GetMetaData(key) for key in reader.GetMetaDataKeys()
            if not _DERIVED_FIELD.match(key) and key != LABEL_NAMES_KEY}
