"""The shared rules of segmote_core.toolbox, each against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from segmote_core.errors import InputError
from segmote_core.toolbox import box_mask, content_hash, mask_box, mask_extent, one_line, ras_lps


def test_one_line_joins_lines_and_cuts_long_messages():
    assert one_line("cannot read\n  the file\n\n(truncated)") == "cannot read the file (truncated)"
    assert one_line("x" * 50, limit=10) == "x" * 9 + "…"
    assert one_line(ValueError("bad\nvalue"), named=True) == "ValueError: bad value"
    assert one_line(KeyError(), named=True) == "KeyError"
    assert one_line(InputError("a user's mistake")) == "a user's mistake"  # unnamed: as the user should read it


def test_mask_extent_and_box_of_a_mask():
    mask = np.zeros((4, 6, 8), bool)
    mask[1, 2, 3] = mask[2, 4, 6] = True
    assert mask_extent(mask) == (slice(1, 3), slice(2, 5), slice(3, 7))
    assert mask_extent(np.zeros((3, 3), bool)) is None
    plane = np.zeros((10, 12), bool)
    plane[2:5, 7:9] = True  # rows 2-4, columns 7-8
    assert mask_box(plane).tolist() == [7, 2, 8, 4]
    assert mask_box(plane, margin=3).tolist() == [4, 0, 11, 7]  # grown, kept on the image
    assert mask_box(np.zeros((5, 5), bool)) is None


def test_box_mask_is_the_inverse_of_mask_box():
    inside = box_mask([7.2, 1.6, 8.4, 4.0], (10, 12))  # corners rounded to pixels and included
    assert mask_box(inside).tolist() == [7, 2, 8, 4] and inside.sum() == 2 * 3
    assert not box_mask([-5, -5, -2, -2], (4, 4)).any()  # a box beside the image holds nothing of it
    assert box_mask([-5, -5, 1, 1], (4, 4)).sum() == 4


def test_ras_lps_flips_points_and_matrices():
    assert ras_lps([10.0, -20.0, 30.0]).tolist() == [-10.0, 20.0, 30.0]
    points = np.arange(12.0).reshape(4, 3)
    assert np.array_equal(ras_lps(ras_lps(points)), points)
    ijk_to_lps = np.array([[0.5, 0, 0, 1], [0, 0.5, 0, 2], [0, 0, 2, 3], [0, 0, 0, 1.0]])
    ijk_to_ras = ras_lps(ijk_to_lps)
    voxel = np.array([4.0, 5.0, 6.0, 1.0])
    assert np.allclose((ijk_to_ras @ voxel)[:3], ras_lps((ijk_to_lps @ voxel)[:3]))
    with pytest.raises(ValueError):
        ras_lps(np.zeros((3, 2)))


def test_content_hash_follows_values_shape_and_type():
    array = np.arange(12, dtype=np.int16).reshape(3, 4)
    assert content_hash(array) == content_hash(array.copy()) == content_hash(np.asfortranarray(array))
    changed = array.copy()
    changed[2, 3] += 1
    assert len({content_hash(array), content_hash(changed), content_hash(array.reshape(4, 3)),
                content_hash(array.astype(np.int32))}) == 4
