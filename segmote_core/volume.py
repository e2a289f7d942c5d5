"""The volume layer: one geometry-exact I/O contract for inference and training.

A ``Volume`` is a 3-D numpy array in SimpleITK's order (K, J, I) plus the geometry that ITK and Slicer use:
``spacing`` along I, J, K (mm), ``origin`` and ``direction`` in **LPS** (ITK/DICOM's patient frame; column c of
``direction`` is the unit vector of voxel axis c). 3D Slicer shows and stores positions in **RAS**; RAS and LPS
differ by the sign of the first two coordinates: (R, A, S) = (-L, -P, S). Everything the user types
(``--box-ras``, ``--point-ras``) or places in Slicer is RAS; ``ras_to_ijk`` converts it.

Slicing that follows the anatomy: ``SliceStack`` presents the volume as (slice, row, col) along an anatomical
axis, independent of how the file stores its voxels (sagittal, flipped, DICOM order...). An axial stack always has
rows running anterior -> posterior and columns patient-right -> patient-left (radiological view); coronal and
sagittal stacks have superior at the top. The permutation and flips are exact (no resampling), so masks map back
to the file's voxel grid bit for bit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
ANATOMICAL_AXES = {"L": 0, "R": 0, "P": 1, "A": 1, "S": 2, "I": 2}  # index into LPS coordinates
AXIS_NAMES = {0: "sagittal (L-R)", 1: "coronal (A-P)", 2: "axial (S-I)"}


@dataclass
class Volume:
    """A scalar 3-D image: array (K, J, I) and its LPS geometry (see module docstring)."""

    array: np.ndarray
    spacing: np.ndarray
    origin: np.ndarray
    direction: np.ndarray
    _stack_fingerprints: dict = field(default_factory=dict, repr=False, compare=False)
    modality: str | None = None  # as the file declares it (DICOM Modality, NRRD "modality" field); None: unknown

    def __post_init__(self):
        self.spacing = np.asarray(self.spacing, dtype=float).reshape(3)
        self.origin = np.asarray(self.origin, dtype=float).reshape(3)
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        if self.array.ndim != 3:
            raise InputError(f"expected a 3-D image, got {self.array.ndim}-D with shape {self.array.shape}")
        if not np.all(np.isfinite(self.spacing)) or np.any(self.spacing <= 0):
            raise InputError(f"invalid voxel spacing {self.spacing.tolist()} (must be positive; flips belong in "
                             "the direction matrix)")
        if not np.all(np.isfinite(self.direction)) or abs(np.linalg.det(self.direction)) < 1e-6:
            raise InputError("the image's direction matrix is singular: its axes do not span 3-D space")

    # ---- geometry ----------------------------------------------------------------------------------
    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape[::-1])

    @property
    def ijk_to_lps(self) -> np.ndarray:
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction @ np.diag(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix

    @property
    def ijk_to_ras(self) -> np.ndarray:
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        return flip @ self.ijk_to_lps

    @classmethod
    def from_ijk_to_ras(cls, array_kji: np.ndarray, ijk_to_ras: np.ndarray) -> "Volume":
        """Build from a (K, J, I) array and a 4x4 IJK-to-RAS matrix (what a Slicer volume node holds)."""
        ijk_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(ijk_to_ras, dtype=float)
        columns = ijk_to_lps[:3, :3]
        spacing = np.linalg.norm(columns, axis=0)
        if np.any(spacing <= 0):
            raise InputError("the IJK-to-RAS matrix has a zero-length axis")
        return cls(np.asarray(array_kji), spacing, ijk_to_lps[:3, 3], columns / spacing)

    def ras_to_ijk(self, points_ras) -> np.ndarray:
        """(N, 3) RAS mm -> (N, 3) continuous voxel indices (i, j, k); voxel centres are integers."""
        points = np.atleast_2d(np.asarray(points_ras, dtype=float)) @ LPS_TO_RAS
        inverse = np.linalg.inv(self.ijk_to_lps)
        return points @ inverse[:3, :3].T + inverse[:3, 3]

    def ijk_to_ras_points(self, points_ijk) -> np.ndarray:
        points = np.atleast_2d(np.asarray(points_ijk, dtype=float))
        return (points @ self.ijk_to_lps[:3, :3].T + self.ijk_to_lps[:3, 3]) @ LPS_TO_RAS

    def contains_ijk(self, points_ijk) -> np.ndarray:
        """Whether continuous voxel positions lie inside the image (within half a voxel of the border)."""
        points = np.atleast_2d(points_ijk)
        upper = np.asarray(self.shape_ijk) - 0.5
        return np.all((points >= -0.5) & (points <= upper), axis=1)

    def voxel_axis_closest_to(self, anatomical: str) -> int:
        """Voxel axis (0 = I, 1 = J, 2 = K) whose direction is closest to an anatomical axis ('S', 'R', 'A')."""
        row = ANATOMICAL_AXES[anatomical.upper()]
        return int(np.argmax(np.abs(self.direction[row, :])))

    def anatomical_axes(self) -> tuple[np.ndarray, np.ndarray]:
        """For each voxel axis c: the LPS axis it runs along (0 L, 1 P, 2 S) and the sign (+1 or -1).

        Assignment is one-to-one (greedy by the largest cosine), so oblique scans still get a permutation."""
        cosines = np.abs(self.direction)
        anatomy = -np.ones(3, dtype=int)
        for _ in range(3):
            masked = np.where((anatomy[None, :] >= 0) | np.isin(np.arange(3), anatomy)[:, None], -1, cosines)
            row, col = np.unravel_index(np.argmax(masked), masked.shape)
            anatomy[col] = row
        signs = np.sign(self.direction[anatomy, np.arange(3)])
        signs[signs == 0] = 1
        return anatomy, signs.astype(int)

    def same_grid(self, other: "Volume", tolerance: float = 1e-4) -> bool:
        return self.shape_ijk == other.shape_ijk and np.allclose(self.ijk_to_lps, other.ijk_to_lps, atol=tolerance)

    def describe_grid(self) -> str:
        return (f"{'x'.join(map(str, self.shape_ijk))} voxels, spacing {np.round(self.spacing, 4).tolist()} mm, "
                f"origin {np.round(self.origin, 3).tolist()} (LPS)")

    # ---- SimpleITK ---------------------------------------------------------------------------------
    @classmethod
    def from_sitk(cls, image: sitk.Image) -> "Volume":
        if image.GetDimension() != 3:
            raise InputError(f"expected a 3-D image, got a {image.GetDimension()}-D image of size {image.GetSize()}")
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(f"expected a scalar image, got {image.GetNumberOfComponentsPerPixel()} components per voxel")
        spacing = np.array(image.GetSpacing())
        if np.any(spacing <= 0):
            raise InputError(f"invalid voxel spacing {spacing.tolist()}")
        direction = np.array(image.GetDirection()).reshape(3, 3)
        return cls(sitk.GetArrayFromImage(image), spacing, np.array(image.GetOrigin()), direction)

    def to_sitk(self, array: np.ndarray | None = None) -> sitk.Image:
        image = sitk.GetImageFromArray(self.array if array is None else array)
        image.SetSpacing(self.spacing.tolist())
        image.SetOrigin(self.origin.tolist())
        image.SetDirection(self.direction.reshape(-1).tolist())
        return image


def content_hash(array: np.ndarray) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str((array.shape, array.dtype.str)).encode())
    digest.update(np.ascontiguousarray(array).view(np.uint8).reshape(-1))
    return digest.hexdigest()


# ---- reading -----------------------------------------------------------------------------------------
def read_volume(path: str | Path) -> Volume:
    """Read NIfTI, NRRD, MHA/MHD (any format SimpleITK reads) or a DICOM series folder."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"image not found: {path}")
    try:
        if path.is_dir():
            image, modality = _read_dicom_series(path)
        else:
            if path.name.lower().endswith(".gz"):
                _check_gzip_complete(path)
            image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()
        detail = next((line.strip() for line in reason if "ERROR" in line or "Unable" in line), "")
        raise InputError(f"cannot read image {path.name}: unreadable or corrupt file{': ' + detail[-150:] if detail else ''}")
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    volume = Volume.from_sitk(image)
    volume.modality = modality if path.is_dir() else _declared_modality(image)
    if not np.issubdtype(volume.array.dtype, np.number):
        raise InputError(f"image {path.name} has non-numeric voxels ({volume.array.dtype})")
    return volume


def _check_gzip_complete(path: Path) -> None:
    """ITK's NIfTI reader fills a truncated .gz with zeros without a word; refuse such a file instead."""
    import gzip
    import zlib

    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 24):
                pass
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(f"cannot read image {path.name}: truncated or corrupt compressed file ({type(exc).__name__})")


def _read_dicom_series(folder: Path) -> tuple[sitk.Image, str | None]:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"no DICOM series found in folder {folder}")
    # Several series in one folder: take the one with the most slices (the main scan, not a scout).
    files = max((reader.GetGDCMSeriesFileNames(str(folder), uid) for uid in series), key=len)
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    image = reader.Execute()
    modality = reader.GetMetaData(0, "0008|0060").strip() if reader.HasMetaDataKey(0, "0008|0060") else None
    return image, modality or None


def _declared_modality(image: sitk.Image) -> str | None:
    """The modality a file states: a DICOM tag (single-file DICOM) or a "modality" key (NRRD/MHA key-value)."""
    for key in ("0008|0060", "modality", "Modality"):
        if image.HasMetaDataKey(key) and image.GetMetaData(key).strip():
            return image.GetMetaData(key).strip()
    return None


# ---- slicing along anatomy ------------------------------------------------------------------------------
# Stack layouts per anatomical slicing axis: (LPS axis, direction) for the (slice, row, col) dimensions.
_STACK_LAYOUTS = {
    2: ((2, +1), (1, +1), (0, +1)),  # axial: rows anterior->posterior, cols right->left
    1: ((1, +1), (2, -1), (0, +1)),  # coronal: rows superior->inferior, cols right->left
    0: ((0, +1), (2, -1), (1, +1)),  # sagittal: rows superior->inferior, cols anterior->posterior
}


class SliceStack:
    """A (slice, row, col) view of a volume along one anatomical axis; exact permutation and flips.

    ``anatomical_axis`` is an LPS axis index (0 sagittal, 1 coronal, 2 axial).
    """

    def __init__(self, volume: Volume, anatomical_axis: int):
        self.volume = volume
        self.anatomical_axis = anatomical_axis
        anatomy, signs = volume.anatomical_axes()
        self.numpy_dims = []  # numpy dim of the (K, J, I) array for each stack dim
        self.flipped = []
        for lps_axis, wanted in _STACK_LAYOUTS[anatomical_axis]:
            voxel_axis = int(np.where(anatomy == lps_axis)[0][0])
            self.numpy_dims.append(2 - voxel_axis)
            self.flipped.append(bool(signs[voxel_axis] * wanted < 0))
        self.voxel_axis = 2 - self.numpy_dims[0]

    def fingerprint(self) -> str:
        """Hash of the voxels in stack order, computed once per volume and axis (arrays are treated as
        immutable). Slices depend only on it, so the same scan stored in another axis order or flipped shares
        its embeddings: it keys the engine's cache."""
        found = self.volume._stack_fingerprints
        if self.anatomical_axis not in found:
            found[self.anatomical_axis] = content_hash(self.to_stack(self.volume.array))
        return found[self.anatomical_axis]

    @classmethod
    def for_axis(cls, volume: Volume, voxel_axis: int | None) -> "SliceStack":
        """Stack along a voxel axis (0 I, 1 J, 2 K) or, if None, along the one closest to superior-inferior."""
        if voxel_axis is None:
            return cls(volume, 2)
        if voxel_axis not in (0, 1, 2):
            raise InputError(f"--axis must be 0, 1 or 2 (voxel I, J or K), got {voxel_axis}")
        anatomy, _ = volume.anatomical_axes()
        return cls(volume, int(anatomy[voxel_axis]))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.volume.array.shape[d] for d in self.numpy_dims)

    def to_stack(self, array_kji: np.ndarray) -> np.ndarray:
        """(K, J, I) array -> (slice, row, col) view (no copy)."""
        view = np.transpose(array_kji, self.numpy_dims)
        for dim, flip in enumerate(self.flipped):
            if flip:
                view = np.flip(view, axis=dim)
        return view

    def from_stack(self, stack: np.ndarray) -> np.ndarray:
        """(slice, row, col) array -> (K, J, I) array in the volume's voxel grid (contiguous copy)."""
        view = stack
        for dim, flip in enumerate(self.flipped):
            if flip:
                view = np.flip(view, axis=dim)
        return np.ascontiguousarray(np.transpose(view, np.argsort(self.numpy_dims)))

    def ijk_to_stack(self, points_ijk) -> np.ndarray:
        """(N, 3) continuous voxel (i, j, k) -> (N, 3) continuous (slice, row, col)."""
        points = np.atleast_2d(np.asarray(points_ijk, dtype=float))
        sizes = self.volume.array.shape
        out = np.empty_like(points)
        for dim, (numpy_dim, flip) in enumerate(zip(self.numpy_dims, self.flipped)):
            coordinate = points[:, 2 - numpy_dim]
            out[:, dim] = (sizes[numpy_dim] - 1 - coordinate) if flip else coordinate
        return out


# ---- writing -----------------------------------------------------------------------------------------
def is_segmentation_path(path: str | Path) -> bool:
    return str(path).lower().endswith(".seg.nrrd")


LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def check_output_path(path: str | Path) -> Path:
    path = Path(path)
    if not (is_segmentation_path(path) or str(path).lower().endswith(LABELMAP_SUFFIXES)):
        raise InputError(f"output {path.name} must end in .seg.nrrd or a label-map format ({', '.join(LABELMAP_SUFFIXES)})")
    if path.exists() and path.is_dir():
        raise InputError(f"output {path} is a folder")
    return path
