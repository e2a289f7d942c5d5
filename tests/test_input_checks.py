"""Never a wrong answer: inputs that would be read wrongly are refused with one line (docs/reliability.md,
"Wrong answers" and "Hangs and exhaustion")."""

from __future__ import annotations

import gzip
import locale
import os
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from segmote_core.cli import main
from segmote_core.errors import InputError
from segmote_core.volume import Volume, check_contrast, read_volume

STUDY = "1.2.826.0.1.3680043.2.1125.1"


def write_series(folder: Path, uid: str, positions_mm, size=(6, 5), first_file=0) -> list[Path]:
    """A DICOM series of axial slices at the given z positions (written by ITK's GDCM writer)."""
    folder.mkdir(exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    previous_locale = locale.setlocale(locale.LC_ALL)
    try:
        for index, z in enumerate(positions_mm):
            paths.append(write_slice(writer, folder / f"{uid[-3:]}-{first_file + index:03d}.dcm", uid, index, z,
                                     size))
    finally:  # ITK's GDCM writer leaves the process in the C locale (text then decodes as ASCII in later tests)
        locale.setlocale(locale.LC_ALL, previous_locale)
    return paths


def write_slice(writer, path: Path, uid: str, index: int, z: float, size) -> Path:
    plane = sitk.GetImageFromArray((np.arange(size[0] * size[1]).reshape(size[::-1]) + index).astype(np.int16))
    for tag, value in [("0008|0060", "CT"), ("0020|000d", STUDY), ("0020|000e", uid), ("0020|0013", str(index + 1)),
                       ("0020|0032", f"0\\0\\{z}"), ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0018|0050", "2")]:
        plane.SetMetaData(tag, value)
    writer.SetFileName(str(path))
    writer.Execute(plane)
    return path


# ---- DICOM ------------------------------------------------------------------------------------------------
def test_a_folder_with_two_series_lists_them_and_reads_the_chosen_one(tmp_path, capsys):
    write_series(tmp_path, STUDY + ".101", [0, 2, 4, 6])
    write_series(tmp_path, STUDY + ".202", [0, 3, 6])
    with pytest.raises(InputError) as error:
        read_volume(tmp_path)
    message = str(error.value)
    assert "2 DICOM series" in message and ".101 (4 slices)" in message and ".202 (3 slices)" in message
    assert "series UID" in message and "\n" not in message
    assert read_volume(tmp_path, series=STUDY + ".202").array.shape == (3, 5, 6)
    assert read_volume(tmp_path, series=STUDY + ".101").spacing[2] == pytest.approx(2.0)
    with pytest.raises(InputError, match="has no DICOM series 9.9"):
        read_volume(tmp_path, series="9.9")
    assert main(["segment", str(tmp_path), "--out", str(tmp_path.parent / "o.seg.nrrd"), "--series", "9.9",
                 "--box-ijk", "1", "1", "1", "4", "4", "1", "--quiet"]) == 1
    assert "has no DICOM series 9.9" in capsys.readouterr().err


def test_a_series_with_a_missing_slice_is_refused_not_misplaced(tmp_path):
    write_series(tmp_path, STUDY + ".303", [0, 2, 4, 8, 10])  # the slice at 6 mm is missing
    with pytest.raises(InputError, match="uneven slice spacing.*missing slice"):
        read_volume(tmp_path)


def test_a_series_with_a_truncated_slice_is_refused(tmp_path):
    paths = write_series(tmp_path, STUDY + ".404", [0, 2, 4, 6, 8])
    paths[2].write_bytes(paths[2].read_bytes()[:200])
    with pytest.raises(InputError):
        read_volume(tmp_path)


def test_an_evenly_spaced_series_still_reads(tmp_path):
    write_series(tmp_path, STUDY + ".505", [10, 12.5, 15, 17.5])
    volume = read_volume(tmp_path)
    assert volume.array.shape == (4, 5, 6) and volume.spacing[2] == pytest.approx(2.5)


# ---- files that would be read with the wrong geometry ------------------------------------------------------
def _nifti(tmp_path, name="v.nii") -> Path:
    path = tmp_path / name
    image = sitk.GetImageFromArray(np.arange(60, dtype=np.int16).reshape(3, 4, 5))
    image.SetOrigin((10.0, -20.0, 5.0))
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz"])
def test_a_nifti_with_a_damaged_magic_is_not_read_as_analyze(tmp_path, name):
    path = _nifti(tmp_path, name)
    raw = bytearray(gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes())
    raw[344:348] = b"xx1\0"
    path.write_bytes(gzip.compress(bytes(raw)) if name.endswith(".gz") else bytes(raw))
    with pytest.raises(InputError, match="not a NIfTI file.*Analyze"):
        read_volume(path)


def _meta_header_edit(tmp_path, key: str, value: str) -> Path:
    path = tmp_path / "v.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(60, dtype=np.int16).reshape(3, 4, 5)), str(path))
    lines = path.read_bytes().split(b"\n")
    lines = [f"{key} = {value}".encode() if line.startswith(key.encode() + b" =") else line for line in lines]
    path.write_bytes(b"\n".join(lines))
    return path


def test_an_mha_with_a_scaled_transform_matrix_is_refused(tmp_path):
    with pytest.raises(InputError, match=r"axes of length \[8.0, 8.0, 8.0\].*scaled TransformMatrix"):
        read_volume(_meta_header_edit(tmp_path, "TransformMatrix", "8 0 0 0 8 0 0 0 8"))


def test_a_nan_origin_is_refused(tmp_path):
    with pytest.raises(InputError, match="invalid image origin"):
        read_volume(_meta_header_edit(tmp_path, "Offset", "nan 0 0"))
    with pytest.raises(InputError, match="invalid image origin"):
        Volume(np.zeros((2, 2, 2)), (1, 1, 1), (0, np.inf, 0), np.eye(3))


def test_complex_voxels_are_refused(tmp_path):
    with pytest.raises(InputError, match="complex voxels"):
        Volume(np.ones((2, 3, 4), np.complex64), (1, 1, 1), (0, 0, 0), np.eye(3))
    path = tmp_path / "c.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((2, 3, 4), np.complex64) * (1 + 2j)), str(path))
    with pytest.raises(InputError, match="complex|scalar"):
        read_volume(path)


@pytest.mark.parametrize("fill,message", [(np.nan, "every voxel is NaN"), (0.0, "every voxel is 0"),
                                          (37.5, "every voxel is 37.5"), (np.inf, "every voxel is NaN or infinite")])
def test_an_image_without_contrast_is_refused(lite_engine, fill, message):
    volume = Volume(np.full((3, 16, 16), fill, np.float32), (1, 1, 1), (0, 0, 0), np.eye(3))
    with pytest.raises(InputError, match=f"no contrast: {message}"):
        check_contrast(volume)
    with pytest.raises(InputError, match="no contrast"):
        lite_engine.segment(volume, box_ijk=[2, 2, 1, 12, 12, 1])


# ---- the embedding cache and changed volumes ----------------------------------------------------------------
def test_volumes_are_immutable_so_the_cache_cannot_go_stale(lite_engine):
    array = np.random.default_rng(0).integers(-500, 500, (3, 16, 16)).astype(np.int16)
    volume = Volume(array, (1, 1, 1), (0, 0, 0), np.eye(3))
    key = lite_engine.prepare(volume, window=(0, 1000)).key
    with pytest.raises(ValueError, match="read-only"):
        volume.array[1, 2, 3] = 999
    with pytest.raises(ValueError, match="read-only"):
        array[1, 2, 3] = 999  # the array handed over is the volume's own
    changed = array.copy()
    changed[1, 2, 3] = 999
    assert lite_engine.prepare(Volume(changed, (1, 1, 1), (0, 0, 0), np.eye(3)), window=(0, 1000)).key != key


# ---- hangs and exhaustion -----------------------------------------------------------------------------------
def test_a_fifo_as_input_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "image.nrrd"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(InputError, match="not a regular file"):
        read_volume(fifo)
    assert time.monotonic() - started < 5


HEADER_BOMBS = {
    "nrrd raw": b"NRRD0004\ntype: short\ndimension: 3\nsizes: 1000 1000 1000\nencoding: raw\n\n" + bytes(1000),
    "nrrd gzip": b"NRRD0004\ntype: double\ndimension: 3\nsizes: 1500 1500 1500\nencoding: gzip\n\n" + bytes(1000),
    "mha": b"ObjectType = Image\nNDims = 3\nDimSize = 1000 1000 1000\nElementType = MET_SHORT\n"
           b"ElementDataFile = LOCAL\n" + bytes(1000),
}


@pytest.mark.parametrize("kind", HEADER_BOMBS)
def test_a_header_declaring_more_voxels_than_the_file_holds_is_refused_before_allocating(tmp_path, kind):
    path = tmp_path / ("bomb.mha" if kind == "mha" else "bomb.nrrd")
    path.write_bytes(HEADER_BOMBS[kind])
    started = time.monotonic()
    with pytest.raises(InputError, match="declares .* bytes of voxels but the file holds"):
        read_volume(path)
    assert time.monotonic() - started < 2


def test_a_nifti_declaring_more_voxels_than_it_holds_is_refused(tmp_path):
    path = _nifti(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[42:48] = np.array([1000, 1000, 1000], "<i2").tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="declares"):
        read_volume(path)
