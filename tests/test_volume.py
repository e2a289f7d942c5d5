"""The geometry contract: exact round trips, RAS/LPS, slicing that follows the anatomy."""

from __future__ import annotations

import numpy as np
import torch
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from segmote_core.errors import InputError
from segmote_core.normalize import choose_normalization, normalize, window
from segmote_core.toolbox import ras_lps
from segmote_core.volume import SliceStack, Volume, read_volume


def rotation(angles) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


geometries = st.fixed_dictionaries({
    "angles": st.tuples(*[st.floats(-np.pi, np.pi)] * 3),
    "spacing": st.tuples(*[st.floats(0.2, 12.0)] * 3),
    "origin": st.tuples(*[st.floats(-500, 500)] * 3),
    "permutation": st.permutations([0, 1, 2]),
    "signs": st.tuples(*[st.sampled_from([-1.0, 1.0])] * 3),
})


def make_volume(geometry, shape=(5, 6, 7)) -> Volume:
    direction = rotation(geometry["angles"])[:, geometry["permutation"]] * np.array(geometry["signs"])
    array = np.random.default_rng(0).integers(-1000, 1000, size=shape).astype(np.int16)
    return Volume(array, geometry["spacing"], geometry["origin"], direction)


@settings(max_examples=40, deadline=None)
@given(geometries)
def test_ras_ijk_round_trip_including_left_handed_and_oblique(geometry):
    volume = make_volume(geometry)
    points = np.random.default_rng(1).uniform(-2, 8, size=(10, 3))
    assert np.allclose(volume.ras_to_ijk(volume.ijk_to_ras_points(points)), points, atol=1e-9)
    # RAS is LPS with x and y negated
    lps = volume.ijk_to_ras_points(points) * np.array([-1, -1, 1])
    assert np.allclose(lps, points @ volume.ijk_to_lps[:3, :3].T + volume.origin)


@settings(max_examples=25, deadline=None)
@given(geometries, st.sampled_from([".nrrd", ".nii.gz", ".mha"]))
def test_file_round_trip_is_exact(tmp_path_factory, geometry, suffix):
    volume = make_volume(geometry)
    if suffix == ".nii.gz" and np.linalg.det(volume.direction) < 0:
        # NIfTI's quaternion form cannot hold a left-handed frame; ITK flips the last axis (still the same grid
        # in world space, checked through the world positions below).
        pass
    path = tmp_path_factory.mktemp("io") / f"volume{suffix}"
    sitk.WriteImage(volume.to_sitk(), str(path))
    back = read_volume(path)
    corners = np.array([[0, 0, 0], [4, 5, 6], [6, 5, 4]], float)
    world = volume.ijk_to_ras_points(corners[:, [2, 1, 0]][:, ::-1])
    assert np.allclose(back.ijk_to_ras_points(back.ras_to_ijk(world)), world, atol=1e-3)
    if suffix != ".nii.gz":
        assert np.array_equal(back.array, volume.array)
        assert np.allclose(back.spacing, volume.spacing, rtol=1e-6)
        assert np.allclose(back.origin, volume.origin, atol=1e-4)
        assert np.allclose(back.direction, volume.direction, atol=1e-6)


def test_nifti_round_trip_right_handed_is_exact(tmp_path):
    volume = Volume(np.arange(60, dtype=np.int16).reshape(3, 4, 5), (0.7, 0.8, 2.5), (10.0, -20.0, 30.0),
                    rotation((0.3, -0.2, 0.1)))
    path = tmp_path / "v.nii.gz"
    sitk.WriteImage(volume.to_sitk(), str(path))
    back = read_volume(path)
    assert np.array_equal(back.array, volume.array)
    assert np.allclose(back.spacing, volume.spacing, rtol=1e-6)
    assert np.allclose(back.origin, volume.origin, atol=1e-4)
    assert np.allclose(back.direction, volume.direction, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(geometries, st.sampled_from([0, 1, 2]))
def test_slice_stack_round_trip_is_exact(geometry, axis):
    volume = make_volume(geometry)
    stack = SliceStack(volume, axis)
    assert np.array_equal(stack.from_stack(stack.to_stack(volume.array)), volume.array)
    # a voxel's stack coordinates point at that voxel
    k, j, i = 1, 2, 3
    s, r, c = np.round(stack.ijk_to_stack([[i, j, k]])[0]).astype(int)
    assert stack.to_stack(volume.array)[s, r, c] == volume.array[k, j, i]
    # stack_to_ijk is its exact inverse, for continuous points too
    points = np.array([[i, j, k], [0.25, 1.5, 0.75]])
    assert np.allclose(stack.stack_to_ijk(stack.ijk_to_stack(points)), points)


@settings(max_examples=30, deadline=None)
@given(st.permutations([0, 1, 2]), st.tuples(*[st.sampled_from([False, True])] * 3))
def test_axial_slices_do_not_depend_on_storage_order(permutation, flips):
    """The same scan stored with another axis order or flipped axes gives the same slices, in the same
    orientation, along the anatomical axis (and so the same segmentation in world space)."""
    rng = np.random.default_rng(2)
    original = Volume(rng.integers(0, 100, (4, 5, 6)).astype(np.int16), (0.8, 0.9, 3.0), (1.0, 2.0, 3.0),
                      rotation((0.1, 0.05, -0.08)))
    stored = reorder(original, permutation, flips)
    for axis in (0, 1, 2):
        a = SliceStack(original, axis)
        b = SliceStack(stored, axis)
        assert np.array_equal(a.to_stack(original.array), b.to_stack(stored.array))
        assert a.fingerprint() == b.fingerprint()


def reorder(volume: Volume, permutation, flips) -> Volume:
    """The same image stored with voxel axes permuted and flipped (identical world positions)."""
    array = volume.array  # (K, J, I)
    ijk_to_lps = volume.ijk_to_lps.copy()
    sizes = np.array(volume.shape_ijk)
    for axis, flip in enumerate(flips):
        if flip:
            array = np.flip(array, axis=2 - axis)
            ijk_to_lps[:3, 3] += ijk_to_lps[:3, axis] * (sizes[axis] - 1)
            ijk_to_lps[:3, axis] *= -1
    # new voxel axis n is old voxel axis permutation[n]
    array = np.transpose(array, [2 - permutation[2 - d] for d in range(3)])
    ijk_to_lps[:3, :3] = ijk_to_lps[:3, list(permutation)]
    return Volume.from_ijk_to_ras(np.ascontiguousarray(array), ras_lps(ijk_to_lps))


def test_reorder_helper_keeps_world_positions():
    volume = Volume(np.arange(120, dtype=np.int16).reshape(4, 5, 6), (1, 2, 3), (0, 0, 0), np.eye(3))
    stored = reorder(volume, (2, 0, 1), (True, False, True))
    for ijk in [(0, 0, 0), (5, 4, 3), (2, 3, 1)]:
        world = volume.ijk_to_ras_points([ijk])
        i2, j2, k2 = np.round(stored.ras_to_ijk(world)[0]).astype(int)
        assert stored.array[k2, j2, i2] == volume.array[ijk[2], ijk[1], ijk[0]]


def test_dicom_series_folder_reads_like_the_volume(tmp_path, chest_ct):
    cropped = Volume(chest_ct.array[10:14], chest_ct.spacing, chest_ct.ijk_to_lps[:3, 3] +
                     chest_ct.ijk_to_lps[:3, 2] * 10, chest_ct.direction)
    image = sitk.Cast(cropped.to_sitk(), sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in [("0008|0060", "CT"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
                           ("0020|000e", "1.2.826.0.1.3680043.2.1125.2"), ("0020|0013", str(k + 1)),
                           ("0020|0032", "\\".join(map(str, position))),
                           ("0020|0037", "\\".join(map(str, direction[0:7:3] + direction[1:8:3]))),
                           ("0018|0050", str(image.GetSpacing()[2]))]:
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(tmp_path / f"slice{k:03d}.dcm"))
        writer.Execute(plane)
    back = read_volume(tmp_path)
    assert np.array_equal(back.array, cropped.array.astype(np.int16))
    assert np.allclose(back.ijk_to_lps, cropped.ijk_to_lps, atol=1e-3)


@pytest.mark.parametrize("shape,message", [((5, 6), "3-D"), ((2, 3, 4, 5), "3-D")])
def test_reading_2d_or_4d_image_is_a_clear_error(tmp_path, shape, message):
    path = tmp_path / "bad.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros(shape, np.int16), isVector=False), str(path))
    with pytest.raises(InputError, match=message):
        read_volume(path)


def test_normalisation_window_and_percentiles():
    array = np.array([-1000, -700, -400, 0, 3000, np.nan], dtype=np.float32)
    out = normalize(array, window(-700, 600))
    assert np.allclose(out, [0.0, 0.5, 1.0, 1.0, 1.0, 0.0])
    # the same function on a tensor (how GPU engines normalise on the device) gives the same numbers
    assert np.array_equal(normalize(torch.from_numpy(array), window(-700, 600)).numpy(), out)
    raw = np.random.default_rng(0).integers(-1024, 3000, (4, 9, 9)).astype(np.int16)
    assert np.array_equal(normalize(torch.from_numpy(raw), window(40, 400)).numpy(), normalize(raw, window(40, 400)))
    ct = np.linspace(-1000, 2000, 10_000).astype(np.int16)
    norm = choose_normalization(ct, modality="MR")  # not CT: robust percentile clipping
    assert norm.rule[0] == "percentiles" and -1000 < norm.low < norm.high < 2000
    with pytest.raises(InputError):
        window(40, 0)
