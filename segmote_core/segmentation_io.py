"""Reading and writing segmentations: Slicer .seg.nrrd (named, coloured segments, via slicerio) and label maps.

Adding to an existing file never changes its other segments: .seg.nrrd segments that would overlap go to a new
layer (as Slicer stores overlapping segments); in a label map the existing labels keep their voxels. Every write is
atomic (temp file + rename), so a failure leaves the previous file exactly as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicerio

from .errors import InputError
from .files import atomic_write
from .volume import Volume, check_output_path, is_segmentation_path, read_volume

PALETTE = [  # distinguishable colours (0-1 RGB) for segments without a colour of their own
    (0.90, 0.30, 0.25), (0.25, 0.55, 0.90), (0.30, 0.75, 0.35), (0.95, 0.75, 0.20), (0.65, 0.40, 0.85),
    (0.20, 0.80, 0.80), (0.95, 0.50, 0.70), (0.60, 0.45, 0.25), (0.55, 0.75, 0.20), (0.45, 0.45, 0.95),
]


@dataclass
class Segment:
    name: str
    mask: np.ndarray  # bool (K, J, I) on the reference volume's grid
    color: tuple[float, float, float] | None = None


def _grid_mismatch(volume: Volume, shape_ijk, ijk_to_lps) -> str | None:
    if tuple(shape_ijk) == volume.shape_ijk and np.allclose(ijk_to_lps, volume.ijk_to_lps, atol=1e-3):
        return None
    origin = np.round(np.asarray(ijk_to_lps)[:3, 3], 3).tolist()
    spacing = np.round(np.linalg.norm(np.asarray(ijk_to_lps)[:3, :3], axis=0), 4).tolist()
    return (f"{'x'.join(map(str, shape_ijk))} voxels, spacing {spacing} mm, origin {origin} (LPS) "
            f"vs the image's {volume.describe_grid()}")


def read_segments(path: str | Path) -> tuple[Volume, list[Segment]]:
    """Read segments (bool masks in (K, J, I) order) and the grid they live on."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"segmentation not found: {path}")
    if is_segmentation_path(path):
        try:
            seg = slicerio.read_segmentation(str(path))
        except Exception as exc:  # slicerio raises many types on bad files
            raise InputError(f"cannot read segmentation {path.name}: {type(exc).__name__}: {str(exc)[:120]}")
        voxels = seg["voxels"]
        shape = voxels.shape[-3:]
        matrix = np.asarray(seg["ijkToLPS"], dtype=float)
        grid = Volume.from_ijk_to_ras(np.zeros(shape[::-1], np.uint8), np.diag([-1.0, -1.0, 1, 1]) @ matrix)
        segments = [
            Segment(s.get("name", s["id"]), np.transpose(slicerio.segment_mask(seg, s["id"]), (2, 1, 0)),
                    tuple(s.get("color", (0.5, 0.5, 0.5))))
            for s in seg["segments"]
        ]
        return grid, segments
    labels = read_volume(path)
    values = [int(v) for v in np.unique(labels.array) if v != 0]
    return labels, [Segment(f"label {v}", labels.array == v, PALETTE[(v - 1) % len(PALETTE)]) for v in values]


def save_segments(path: str | Path, volume: Volume, segments: list[Segment], replace_same_name: bool = False) -> None:
    """Add segments to the file at `path` (created if absent) on `volume`'s grid, atomically.

    replace_same_name: an existing segment with the same name as a new one is replaced (the CLI's --overwrite);
    otherwise a name clash is an error. Other existing segments are always kept bit-identical.
    """
    path = check_output_path(path)
    for segment in segments:
        if segment.mask.shape != volume.array.shape:
            raise InputError(f"segment '{segment.name}' has shape {segment.mask.shape}, image {volume.array.shape}")
    if is_segmentation_path(path):
        _save_seg_nrrd(path, volume, segments, replace_same_name)
    else:
        _save_labelmap(path, volume, segments, replace_same_name)


def _save_seg_nrrd(path: Path, volume: Volume, segments: list[Segment], replace_same_name: bool) -> None:
    if path.exists():
        try:
            seg = slicerio.read_segmentation(str(path))
        except Exception as exc:
            raise InputError(f"existing output {path.name} is not a readable segmentation ({type(exc).__name__}); "
                             "choose another --out")
        problem = _grid_mismatch(volume, seg["voxels"].shape[-3:], seg["ijkToLPS"])
        if problem:
            raise InputError(f"existing output {path.name} lies on another grid: {problem}")
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
    for index, segment in enumerate(segments):
        color = segment.color or PALETTE[(used_colors + index) % len(PALETTE)]
        slicerio.add_segment(seg, np.transpose(segment.mask.astype(bool), (2, 1, 0)),
                             {"name": segment.name, "color": [float(c) for c in color]})
    atomic_write(path, lambda temp: slicerio.write_segmentation(str(temp), seg))


def _remove_segment(seg: dict, segment: dict) -> None:
    voxels = seg["voxels"]
    layer = voxels[segment.get("layer", 0)] if voxels.ndim == 4 else voxels
    layer[layer == segment.get("labelValue", 1)] = 0
    seg["segments"] = [s for s in seg["segments"] if s is not segment]


def _save_labelmap(path: Path, volume: Volume, segments: list[Segment], replace_same_name: bool) -> None:
    if path.exists():
        labels = read_volume(path)
        problem = _grid_mismatch(volume, labels.shape_ijk, labels.ijk_to_lps)
        if problem:
            raise InputError(f"existing output {path.name} lies on another grid: {problem}")
        labels = labels.array.astype(np.uint16)
    else:
        labels = np.zeros(volume.array.shape, np.uint16)
    for segment in segments:
        value = int(labels.max()) + 1
        free = segment.mask.astype(bool) if replace_same_name else (segment.mask.astype(bool) & (labels == 0))
        labels[free] = value
    dtype = np.uint8 if labels.max() <= 255 else np.uint16
    image = volume.to_sitk(labels.astype(dtype))
    atomic_write(path, lambda temp: sitk.WriteImage(image, str(temp), useCompression=True))
