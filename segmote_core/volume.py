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

Why one module of about 600 lines: it is the one geometry-exact reader/writer (as nnU-Net keeps one), so every
rule about voxel grids, orientations, RAS/LPS and slice stacks sits together and is tested together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .toolbox import content_hash, ras_lps

ANATOMICAL_AXES = {"L": 0, "R": 0, "P": 1, "A": 1, "S": 2, "I": 2}  # index into LPS coordinates
AXIS_NAMES = {0: "sagittal (L-R)", 1: "coronal (A-P)", 2: "axial (S-I)"}
# Two grids are one grid when their voxel counts match and their ijk -> LPS matrices (spacing x direction, origin)
# differ by at most this, in mm: headers written by different tools round differently, and a thousandth of a
# millimetre is far below any scanner's resolution.
GRID_TOLERANCE_MM = 1e-3


def same_grid(shape_ijk_a, ijk_to_lps_a, shape_ijk_b, ijk_to_lps_b) -> bool:
    """The one rule for "the same voxel grid" (images, segmentations, label maps, crops)."""
    return (tuple(int(n) for n in shape_ijk_a) == tuple(int(n) for n in shape_ijk_b)
            and np.allclose(ijk_to_lps_a, ijk_to_lps_b, atol=GRID_TOLERANCE_MM))


def ijk_inside(points_ijk, shape_ijk) -> np.ndarray:
    """Whether continuous voxel positions (N, 3) lie inside an image of `shape_ijk` voxels (within half a voxel of
    the border)."""
    points = np.atleast_2d(points_ijk)
    upper = np.asarray(shape_ijk) - 0.5
    return np.all((points >= -0.5) & (points <= upper), axis=1)


def voxel_axis_closest(ijk_directions, direction) -> int:
    """Voxel axis (0 = I, 1 = J, 2 = K) running closest to `direction` (either sense), given the 3x3 matrix whose
    columns are the voxel axes' directions (any lengths) in the same space as `direction`."""
    columns = np.asarray(ijk_directions, dtype=float)
    columns = columns / np.linalg.norm(columns, axis=0)
    return int(np.argmax(np.abs(np.asarray(direction, dtype=float) @ columns)))


def _shares_writable_memory(array: np.ndarray) -> bool:
    """Whether `array` is a view of memory that another, writable array still exposes (a slice of the caller's
    array): making the view read-only would not stop changes through that array."""
    base = array.base
    while base is not None:
        if isinstance(base, np.ndarray) and base.flags.writeable:
            return True
        base = getattr(base, "base", None)
    return False


@dataclass
class Volume:
    """A scalar 3-D image: array (K, J, I) and its LPS geometry (see module docstring).

    Volumes are immutable: the array is made read-only on construction (an in-place change raises ValueError), so
    the engine's embedding cache, keyed by content hashed once per volume, can never serve a stale embedding. To
    change voxels, build a new Volume from a changed copy: ``Volume(new_array, v.spacing, v.origin, v.direction)``.
    """

    array: np.ndarray
    spacing: np.ndarray
    origin: np.ndarray
    direction: np.ndarray
    _stack_fingerprints: dict = field(default_factory=dict, repr=False, compare=False)
    modality: str | None = None  # as the file declares it (DICOM Modality, NRRD "modality" field); None: unknown

    def __post_init__(self):
        for name, shape in (("spacing", (3,)), ("origin", (3,)), ("direction", (3, 3))):
            try:
                setattr(self, name, np.asarray(getattr(self, name), dtype=float).reshape(shape))
            except (TypeError, ValueError):
                given = " ".join(repr(getattr(self, name)).split())
                raise InputError(f"{name} must be {int(np.prod(shape))} numbers, got {given:.80}") from None
        if not isinstance(self.array, np.ndarray):
            try:
                self.array = np.asarray(self.array)
            except (TypeError, ValueError):
                raise InputError(f"the image must be a 3-D numeric array, got {type(self.array).__name__}") from None
        if not np.issubdtype(self.array.dtype, np.number) and self.array.dtype != bool:
            raise InputError(f"the image must be numeric, got {self.array.dtype} voxels")
        if self.array.ndim != 3:
            raise InputError(f"expected a 3-D image, got {self.array.ndim}-D with shape {self.array.shape}")
        if np.iscomplexobj(self.array):
            raise InputError("the image has complex voxels; SegMoTE reads real-valued (magnitude) images only")
        if _shares_writable_memory(self.array):
            self.array = self.array.copy()  # a view of the caller's array: changing that array would change ours
        if self.array.flags.writeable:
            self.array.flags.writeable = False  # see the class docstring
        if not np.all(np.isfinite(self.origin)):
            raise InputError(f"invalid image origin {self.origin.tolist()} (must be finite numbers)")
        if not np.all(np.isfinite(self.spacing)) or np.any(self.spacing <= 0):
            raise InputError(f"invalid voxel spacing {self.spacing.tolist()} (must be positive; flips belong in "
                             "the direction matrix)")
        if not np.all(np.isfinite(self.direction)) or abs(np.linalg.det(self.direction)) < 1e-6:
            raise InputError("the image's direction matrix is singular: its axes do not span 3-D space")
        lengths = np.linalg.norm(self.direction, axis=0)
        if not np.allclose(lengths, 1.0, atol=1e-3):
            raise InputError(f"the image's direction matrix has axes of length {np.round(lengths, 4).tolist()}, not 1 "
                             "(a scaled TransformMatrix?); voxel size belongs in the spacing")

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
        return ras_lps(self.ijk_to_lps)

    @classmethod
    def from_ijk_to_ras(cls, array_kji: np.ndarray, ijk_to_ras: np.ndarray) -> "Volume":
        """Build from a (K, J, I) array and a 4x4 IJK-to-RAS matrix (what a Slicer volume node holds)."""
        ijk_to_lps = ras_lps(ijk_to_ras)
        columns = ijk_to_lps[:3, :3]
        spacing = np.linalg.norm(columns, axis=0)
        if np.any(spacing <= 0):
            raise InputError("the IJK-to-RAS matrix has a zero-length axis")
        return cls(np.asarray(array_kji), spacing, ijk_to_lps[:3, 3], columns / spacing)

    def ras_to_ijk(self, points_ras) -> np.ndarray:
        """(N, 3) RAS mm -> (N, 3) continuous voxel indices (i, j, k); voxel centres are integers."""
        points = ras_lps(np.atleast_2d(points_ras))
        inverse = np.linalg.inv(self.ijk_to_lps)
        return points @ inverse[:3, :3].T + inverse[:3, 3]

    def ijk_to_ras_points(self, points_ijk) -> np.ndarray:
        points = np.atleast_2d(np.asarray(points_ijk, dtype=float))
        return ras_lps(points @ self.ijk_to_lps[:3, :3].T + self.ijk_to_lps[:3, 3])

    def contains_ijk(self, points_ijk) -> np.ndarray:
        """Whether continuous voxel positions lie inside the image (within half a voxel of the border)."""
        return ijk_inside(points_ijk, self.shape_ijk)

    def voxel_axis_closest_to(self, anatomical: str) -> int:
        """Voxel axis (0 = I, 1 = J, 2 = K) whose direction is closest to an anatomical axis ('S', 'R', 'A')."""
        return voxel_axis_closest(self.direction, np.eye(3)[ANATOMICAL_AXES[anatomical.upper()]])

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

    def same_grid(self, other: "Volume") -> bool:
        return same_grid(self.shape_ijk, self.ijk_to_lps, other.shape_ijk, other.ijk_to_lps)

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


def check_contrast(volume: Volume) -> None:
    """Refuse an image with nothing to segment: all NaN/Inf, or one constant value (all zero, say)."""
    found = volume._stack_fingerprints
    if "contrast" not in found:
        finite = volume.array[np.isfinite(volume.array)] if volume.array.dtype.kind == "f" else volume.array
        if finite.size == 0:
            raise InputError("the image has no contrast: every voxel is NaN or infinite")
        low, high = finite.min(), finite.max()
        if low == high:
            raise InputError(f"the image has no contrast: every voxel is {low.item()}")
        found["contrast"] = True


# ---- reading -----------------------------------------------------------------------------------------
def read_volume(path: str | Path, series: str | None = None) -> Volume:
    """Read NIfTI, NRRD, MHA/MHD (any format SimpleITK reads) or a DICOM series folder.

    series: the SeriesInstanceUID to read from a folder holding several series (they are listed if it is not
    given). Before anything is allocated, the size a header declares is checked against the bytes the file holds."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"image not found: {path}")
    if not path.is_dir() and not path.is_file():
        raise InputError(f"image {path} is not a regular file or a folder (a pipe or a device?)")
    if path.is_file():
        try:
            open(path, "rb").close()  # ITK would call an unreadable file one that "doesn't exist"
        except PermissionError:
            raise InputError(f"cannot read image {path}: permission denied") from None
        except OSError as error:
            raise InputError(f"cannot read image {path}: {error.strerror or error}") from None
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's warnings would precede our one-line error
    try:
        if path.is_dir():
            image, modality = _read_dicom_series(path, series)
        else:
            check_declared_size(path)
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


# ---- declared sizes, checked before a reader allocates them --------------------------------------------------
_NRRD_TYPES = {
    1: ("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"),
    2: ("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort", "unsigned short",
        "unsigned short int", "uint16", "uint16_t"),
    4: ("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"),
    8: ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t",
        "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t", "double"),
}
_NRRD_BYTES = {name: size for size, names in _NRRD_TYPES.items() for name in names}
_META_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
               "MET_LONG": 8, "MET_ULONG": 8, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
               "MET_DOUBLE": 8}
_NIFTI_BYTES = {2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8,
                1536: 16, 1792: 16, 2048: 32, 2304: 4}
MAX_COMPRESSION_RATIO = 1100  # deflate and bzip2 cannot shrink data further than ~1:1032


def check_declared_size(path: Path) -> None:
    """A header declaring more voxels than its file can hold is refused before a reader allocates them (a 1 KB
    NRRD can declare 1000^3 voxels)."""
    name = path.name.lower()
    try:
        if name.endswith((".nrrd", ".nhdr")):
            declared, available, compressed = _nrrd_sizes(path)
        elif name.endswith((".mha", ".mhd")):
            declared, available, compressed = _meta_sizes(path)
        elif name.endswith((".nii", ".nii.gz")):
            _check_nifti_magic(path)
            if name.endswith(".gz"):
                return  # _check_gzip_complete streams the whole member and compares it with the header
            declared, available, compressed = _nifti_sizes(path)
        else:
            return
    except (ValueError, KeyError, IndexError, OSError):
        return  # a header we cannot parse is left to the reader, which refuses it
    limit = available * MAX_COMPRESSION_RATIO if compressed else available
    if declared > limit:
        raise InputError(f"cannot read image {path.name}: its header declares {declared:,} bytes of voxels but the "
                         f"file holds {available:,}{' compressed' if compressed else ''}: truncated or corrupt")


def _header_lines(path: Path, limit: int = 1 << 16) -> tuple[list[str], int]:
    with open(path, "rb") as stream:
        head = stream.read(limit)
    end = head.find(b"\n\n")
    text = head[: end if end >= 0 else len(head)].decode("latin-1")
    return text.splitlines(), (end + 2 if end >= 0 else len(head))


def _nrrd_sizes(path: Path) -> tuple[int, int, bool]:
    lines, header_bytes = _header_lines(path)
    fields = {}
    for line in lines[1:]:
        if ":" in line and ":=" not in line and not line.startswith("#"):
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
    count = int(np.prod([int(v) for v in fields["sizes"].split()], dtype=object))
    item = _NRRD_BYTES[fields["type"].lower()]
    encoding = fields.get("encoding", "raw").lower()
    data_file = fields.get("data file") or fields.get("datafile")
    if data_file:
        available = (path.parent / data_file).stat().st_size  # a list or pattern of files raises: not checked
    else:
        available = path.stat().st_size - header_bytes
    if encoding in ("raw",):
        return count * item, available, False
    if encoding in ("gzip", "gz", "bzip2", "bz2"):
        return count * item, available, True
    return count, available, False  # text encodings: at least one character per value


def _meta_sizes(path: Path) -> tuple[int, int, bool]:
    with open(path, "rb") as stream:
        head = stream.read(1 << 16)
    fields, header_bytes = {}, 0
    for raw in head.split(b"\n"):
        header_bytes += len(raw) + 1
        key, _, value = raw.decode("latin-1").partition("=")
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break
    for key in ("Offset", "Origin", "Position", "ElementSpacing", "TransformMatrix", "Rotation", "Orientation"):
        if key in fields:  # MetaIO reads "nan" or a typo as 0 without a word
            try:
                values = [float(v) for v in fields[key].split()]
            except ValueError:
                values = [float("nan")]
            if not np.all(np.isfinite(values)):
                raise InputError(f"cannot read image {path.name}: invalid image origin or geometry "
                                 f"({key} = {fields[key][:60]})")
    count = int(np.prod([int(v) for v in fields["DimSize"].split()], dtype=object))
    count *= int(fields.get("ElementNumberOfChannels", "1"))
    item = _META_BYTES[fields["ElementType"]]
    compressed = fields.get("CompressedData", "False").lower() == "true"
    data_file = fields["ElementDataFile"]
    if data_file == "LOCAL":
        available = path.stat().st_size - header_bytes
    else:
        available = (path.parent / data_file).stat().st_size
    return count * item, available, compressed


def _nifti_header(path: Path) -> bytes:
    import gzip

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as stream:
        return stream.read(540)


def _check_nifti_magic(path: Path) -> None:
    """A .nii whose magic is damaged would be read as Analyze 7.5 (no orientation, origin 0): refuse it."""
    header = _nifti_header(path)
    if len(header) >= 12 and header[4:12] == b"n+2\0\r\n\x1a\n":
        return
    if len(header) < 348 or header[344:348] not in (b"n+1\0", b"ni1\0"):
        raise InputError(f"cannot read image {path.name}: not a NIfTI file (its magic is "
                         f"{header[344:348]!r}, not 'n+1'); it would be read as Analyze, without its orientation")


def _nifti_sizes(path: Path) -> tuple[int, int, bool]:
    header = _nifti_header(path)
    order = "<" if int.from_bytes(header[0:4], "little") == 348 else ">"
    dims = np.frombuffer(header[40:56], dtype=f"{order}i2")
    datatype = int(np.frombuffer(header[70:72], dtype=f"{order}i2")[0])
    offset = int(np.frombuffer(header[108:112], dtype=f"{order}f4")[0])
    count = int(np.prod([max(int(d), 1) for d in dims[1: 1 + min(max(int(dims[0]), 1), 7)]], dtype=object))
    return count * _NIFTI_BYTES[datatype], path.stat().st_size - offset, False


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


def dicom_series_files(folder: str | Path, series: str | None = None) -> tuple[str, tuple[str, ...]]:
    """(SeriesInstanceUID, its files in slice order: file k holds voxel slice k of read_volume's array); a folder
    with several series needs `series`."""
    folder = Path(folder)
    reader = sitk.ImageSeriesReader()
    found = reader.GetGDCMSeriesIDs(str(folder))
    if not found:
        raise InputError(f"no DICOM series found in folder {folder}")
    files = {uid: reader.GetGDCMSeriesFileNames(str(folder), uid) for uid in found}
    if series is None and len(found) > 1:
        listing = "; ".join(f"{uid} ({len(files[uid])} slices)" for uid in found)
        raise InputError(f"folder {folder.name} holds {len(found)} DICOM series: {listing}; choose one by its series UID")
    uid = series or found[0]
    if uid not in files:
        raise InputError(f"folder {folder.name} has no DICOM series {uid}; it has: {', '.join(found)}")
    return uid, tuple(files[uid])


def _read_dicom_series(folder: Path, series: str | None = None) -> tuple[sitk.Image, str | None]:
    """The series (its modality too, DICOM 0008,0060); a folder with several series needs `series`."""
    uid, files = dicom_series_files(folder, series)
    _check_even_slices(files, uid)
    reader = sitk.ImageSeriesReader()
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


def _check_even_slices(files: tuple[str, ...], uid: str) -> None:
    """ITK reads a series as evenly spaced: a missing or unreadable slice would shift every later one."""
    positions, normal = [], None
    for name in files:
        header = sitk.ImageFileReader()
        header.SetFileName(name)
        try:
            header.ReadImageInformation()
            position = [float(v) for v in header.GetMetaData("0020|0032").split("\\")]
            if normal is None:
                cosines = [float(v) for v in header.GetMetaData("0020|0037").split("\\")]
                normal = np.cross(cosines[:3], cosines[3:])
        except (RuntimeError, ValueError):
            raise InputError(f"DICOM series {uid}: slice {Path(name).name} is unreadable or has no position; "
                             "the series is incomplete") from None
        positions.append(float(np.dot(position, normal)))
    if len(positions) < 3:
        return
    gaps = np.diff(np.sort(positions))
    typical = float(np.median(gaps))
    uneven = np.flatnonzero(np.abs(gaps - typical) > max(0.01, 0.05 * abs(typical)))
    if typical <= 0 or uneven.size:
        where = int(uneven[0]) + 1 if uneven.size else 0
        raise InputError(f"DICOM series {uid} has uneven slice spacing: {gaps[where - 1 if where else 0]:.3g} mm "
                         f"after slice {where} vs {typical:.3g} mm elsewhere (a missing slice?); it would be read "
                         "with later slices misplaced")


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

    def slice_fingerprints(self) -> list[str]:
        """A hash of each slice's voxels in stack order, computed once per volume and axis (a Volume's array is
        read-only). A slice's embedding depends only on its voxels (and the normalisation), so the same scan
        stored in another axis order or flipped, a slab of it, every other slice of it, or a copy with a few
        slices edited shares the embeddings of the slices it has in common: they key the engine's cache."""
        found = self.volume._stack_fingerprints
        if self.anatomical_axis not in found:
            found[self.anatomical_axis] = [content_hash(one) for one in self.to_stack(self.volume.array)]
        return found[self.anatomical_axis]

    def fingerprint(self) -> str:
        """A hash of the whole stack (of its slices' hashes, in order)."""
        return content_hash(np.frombuffer("".join(self.slice_fingerprints()).encode(), np.uint8))

    @classmethod
    def for_axis(cls, volume: Volume, voxel_axis: int | None) -> "SliceStack":
        """Stack along a voxel axis (0 I, 1 J, 2 K) or, if None, along the one closest to superior-inferior."""
        if voxel_axis is None:
            return cls(volume, 2)
        if voxel_axis not in (0, 1, 2):
            raise InputError(f"slicing axis must be 0, 1 or 2 (voxel I, J or K), got {voxel_axis}")
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

    def nearest_index(self, points_stack) -> np.ndarray:
        """(N, 3) continuous (slice, row, col) -> the nearest voxel's integer indices, kept inside the stack (a
        point on the outer half-voxel border, e.g. -0.5 or n - 0.5, belongs to the border voxel)."""
        rounded = np.round(np.atleast_2d(points_stack)).astype(int)
        return np.clip(rounded, 0, np.asarray(self.shape) - 1)

    def ijk_to_stack(self, points_ijk) -> np.ndarray:
        """(N, 3) continuous voxel (i, j, k) -> (N, 3) continuous (slice, row, col)."""
        points = np.atleast_2d(np.asarray(points_ijk, dtype=float))
        sizes = self.volume.array.shape
        out = np.empty_like(points)
        for dim, (numpy_dim, flip) in enumerate(zip(self.numpy_dims, self.flipped)):
            coordinate = points[:, 2 - numpy_dim]
            out[:, dim] = (sizes[numpy_dim] - 1 - coordinate) if flip else coordinate
        return out

    def stack_to_ijk(self, points_stack) -> np.ndarray:
        """(N, 3) continuous (slice, row, col) -> (N, 3) continuous voxel (i, j, k); the inverse of ijk_to_stack."""
        points = np.atleast_2d(np.asarray(points_stack, dtype=float))
        sizes = self.volume.array.shape
        out = np.empty_like(points)
        for dim, (numpy_dim, flip) in enumerate(zip(self.numpy_dims, self.flipped)):
            coordinate = points[:, dim]
            out[:, 2 - numpy_dim] = (sizes[numpy_dim] - 1 - coordinate) if flip else coordinate
        return out


# ---- writing -----------------------------------------------------------------------------------------
def is_segmentation_path(path: str | Path) -> bool:
    return str(path).lower().endswith(".seg.nrrd")


LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES = LABELMAP_SUFFIXES  # the single-file image formats read_volume takes (and label maps are written in)


def strip_image_suffix(name: str) -> str | None:
    """A file name without its image suffix (``case_0000.nii.gz`` -> ``case_0000``); None if it has none."""
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return None


def check_output_path(path: str | Path) -> Path:
    """An output path that can be written: the right suffix, not a folder, its folder writable (checked before
    any model runs, so a long run does not end in a write error)."""
    path = Path(path)
    if not (is_segmentation_path(path) or str(path).lower().endswith(LABELMAP_SUFFIXES)):
        raise InputError(f"output {path.name} must end in .seg.nrrd or a label-map format ({', '.join(LABELMAP_SUFFIXES)})")
    return check_writable_output(path)


def check_writable_output(path: str | Path) -> Path:
    """An output path (any format) that can be written: not a folder, its folder writable."""
    import os

    path = Path(path)
    if path.exists() and path.is_dir():
        raise InputError(f"output {path} is a folder")
    if path.exists() and not path.is_file():
        raise InputError(f"output {path} is not a regular file")
    if path.is_file() and not path.stat().st_mode & 0o222:
        raise InputError(f"output {path} is read-only; it is left as it is: make it writable or choose another file")
    folder = next((parent for parent in path.parents if parent.exists()), Path("."))
    if not folder.is_dir():
        raise InputError(f"cannot write {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {path}: the folder {folder} is not writable")
    return path


def prompt_array(values, columns: int, what: str, single: bool = False) -> np.ndarray:
    """A prompt given through the Python API as an (N, columns) array of finite numbers (single: N = 1), or a
    one-line error."""
    try:
        array = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be numbers, got {type(values).__name__}: {str(values)[:60]}") from None
    if (array.size == 0 or array.size % columns or array.ndim > 2 or (array.ndim == 2 and array.shape[1] != columns)
            or (single and array.size != columns)):
        raise InputError(f"{what} must be {columns} numbers per entry, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise InputError(f"{what} holds NaN or infinite values: {np.round(array.reshape(-1), 2).tolist()[:6]}")
    return array.reshape(-1, columns)
