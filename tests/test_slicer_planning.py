"""The Slicer module's prompt planning (SegMoTESlicerLib.planning) on plain numpy: no MRML, no model.

Prompts in voxel coordinates go in, engine calls come out. Where the engine's volume layer defines the geometry
(which voxel axis runs along a direction, what lies inside the image, which slices a box spans), the plans are
checked against segmote_core.volume itself.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

MODULE_DIR = Path(__file__).resolve().parents[1] / "SegMoTESlicer"
sys.path.insert(0, str(MODULE_DIR))

from SegMoTESlicerLib import planning  # noqa: E402
from SegMoTESlicerLib.planning import ACTIVE_BOX, PromptPoint, planPrompts, planTasks  # noqa: E402
from segmote_core.errors import InputError  # noqa: E402
from segmote_core.volume import SliceStack, Volume  # noqa: E402

SHAPE_IJK = (40, 30, 12)


def point(i, j, k, label=1, key=None):
    return PromptPoint(np.array([i, j, k], dtype=float), label, key)


def box(low, high):
    return np.array(low, dtype=float), np.array(high, dtype=float)


def engine_slices(volume: Volume, axis: int, box_ijk) -> list[int]:
    """The slices the engine prompts for a box: its corners rounded to voxels in the slice stack (engine.segment)."""
    stack = SliceStack.for_axis(volume, axis)
    corners = stack.ijk_to_stack(np.asarray(box_ijk, dtype=float).reshape(2, 3))
    low, high = stack.nearest_index(corners.min(axis=0))[0], stack.nearest_index(corners.max(axis=0))[0]
    return list(range(low[0], high[0] + 1))


# ---- 2-D and 3-D boxes ----------------------------------------------------------------------------------------
def test_a_flat_box_is_one_2d_task_on_its_centre_slice_and_a_thick_box_one_3d_task():
    flat = planTasks(2, [], box([5, 4, 6.2], [20, 18, 7.4]))  # 1.2 voxels thick: drawn in the axial view
    assert [(t.kind, t.slice) for t in flat] == [("2d", 7)]
    assert flat[0].engineArgs == {"propagate": False, "box_ijk": (5.0, 4.0, 7.0, 20.0, 18.0, 7.0)}

    thick = planTasks(2, [], box([5, 4, 3.0], [20, 18, 8.6]))
    assert [t.kind for t in thick] == ["3d"]
    assert thick[0].engineArgs["box_ijk"] == (5.0, 4.0, 3.0, 20.0, 18.0, 8.6)
    assert thick[0].roiLow.tolist() == [5, 4, 3] and thick[0].roiHigh.tolist() == [20, 18, 9]


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("thickness", [0.0, 0.4, 0.9, 1.2, 1.49, 1.5, 1.51, 2.0, 4.7])
def test_the_engine_sees_one_slice_for_a_2d_task_and_several_for_a_3d_task(thickness, flip):
    """Whatever the box's thickness and where it starts, the engine's own slice rounding agrees with the plan,
    also on a volume whose K axis runs inferior (the stack then counts slices the other way)."""
    direction = np.diag([1.0, 1.0, -1.0 if flip else 1.0])
    volume = Volume(np.zeros(SHAPE_IJK[::-1], dtype=np.int16), (1.0, 1.0, 2.5), (0, 0, 0), direction)
    for start in np.arange(0.0, 9.0, 0.37):
        tasks = planTasks(2, [], box([5, 4, start], [20, 18, start + thickness]))
        assert len(tasks) == 1
        slices = engine_slices(volume, 2, tasks[0].engineArgs["box_ijk"])
        if tasks[0].kind == "2d":
            expected_k = SHAPE_IJK[2] - 1 - tasks[0].slice if flip else tasks[0].slice
            assert slices == [expected_k], (thickness, start)
        else:
            assert thickness >= planning.THIN_BOX_VOXELS and len(slices) >= 2, (thickness, start)


def test_a_box_drawn_in_a_view_is_flattened_there_and_names_the_slicing_axis():
    drawn = box([5, 10.2, 3], [20, 11.0, 9])  # thin along J only: drawn in the view slicing along J
    assert planning.flatAxis(drawn) == 1
    assert planning.flatAxis(box([5, 4, 3], [20, 18, 9])) is None
    assert planning.flatAxis(box([5, 4, 3], [5.5, 18, 3.2])) is None  # thin along two axes: no single view

    padded = box([5, 4, 2.0], [20, 18, 6.0])  # Slicer pads a box drawn in the axial view: still that view's slice
    low, high = planning.flattenBox(padded, 2)
    assert low[2] == high[2] == 4 and padded[0][2] == 2.0  # the original is left alone
    assert [t.kind for t in planTasks(2, [], (low, high))] == ["2d"]


def test_a_box_from_another_view_is_left_out():
    flat_in_j = planning.flattenBox(box([5, 10, 3], [20, 11, 9]), 1)
    with pytest.raises(InputError, match="another view; place a point in this view"):
        planPrompts(2, [], flat_in_j, boxAxis=1)
    tasks = planPrompts(2, [point(8, 9, 4)], flat_in_j, boxAxis=1)
    assert [(t.kind, t.slice) for t in tasks] == [("2d", 4)] and "box_ijk" not in tasks[0].engineArgs


# ---- points --------------------------------------------------------------------------------------------------
def test_points_go_to_their_nearest_slice_snapped_onto_it_with_the_box_there():
    points = [point(10, 10, 4.4), point(12, 11, 3.6, label=0), point(30, 20, 8.2), point(5, 5, 6.1, label=0)]
    tasks = planTasks(2, points, box([6, 6, 3.8], [25, 25, 4.3]), propagate=True)
    assert [t.slice for t in tasks] == [4, 8]  # slice 6 has only an exclude point and no box: nothing to segment
    on4 = tasks[0].engineArgs
    assert on4["points_ijk"].tolist() == [[10, 10, 4], [12, 11, 4]]
    assert on4["point_labels"].tolist() == [1, 0]
    assert on4["box_ijk"] == (6.0, 6.0, 4.0, 25.0, 25.0, 4.0) and on4["propagate"] is True
    assert "box_ijk" not in tasks[1].engineArgs and tasks[1].engineArgs["point_labels"].tolist() == [1]


def test_points_inside_a_3d_box_refine_its_slices_after_the_box():
    tasks = planTasks(2, [point(10, 10, 5), point(10, 10, 11)], box([5, 4, 3], [20, 18, 8]))
    assert [(t.kind, t.slice) for t in tasks] == [("3d", None), ("2d", 5), ("2d", 11)]
    assert "box_ijk" in tasks[1].engineArgs and "box_ijk" not in tasks[2].engineArgs


def test_the_active_prompt_runs_only_its_slice():
    first, second = point(10, 10, 4, key=("include", 0)), point(12, 14, 9, key=("include", 1))
    negative = point(11, 11, 9, label=0, key=("exclude", 0))
    tasks = planTasks(2, [first, second, negative], box([5, 4, 8.8], [20, 18, 9.1]), active=("include", 1))
    assert [(t.slice, t.engineArgs["point_labels"].tolist()) for t in tasks] == [(9, [1, 0])]
    assert "box_ijk" in tasks[0].engineArgs

    assert [t.slice for t in planTasks(2, [first], box([5, 4, 8.8], [20, 18, 9.1]), active=ACTIVE_BOX)] == [9]
    assert [t.kind for t in planTasks(2, [first], box([5, 4, 3], [20, 18, 8]), active=ACTIVE_BOX)] == ["3d"]
    with pytest.raises(InputError, match="no prompt on the active slice"):
        planPrompts(2, [first, negative], None, active=("exclude", 0))


# ---- geometry shared with the engine's volume layer ----------------------------------------------------------
def small_rotation(rng, degrees=25.0) -> np.ndarray:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.radians(rng.uniform(-degrees, degrees))
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def test_the_slicing_axis_is_the_voxel_axis_running_along_the_direction():
    """Voxel axes permuted, flipped and tilted by up to 25 degrees: the axis along S, R, A is the one built to run
    there, and the volume layer (what the engine slices by) finds the same one."""
    rng = np.random.default_rng(3)
    for permutation in ([0, 1, 2], [2, 0, 1], [1, 2, 0], [2, 1, 0]):
        for _ in range(5):
            direction = small_rotation(rng) @ np.eye(3)[:, permutation] @ np.diag(rng.choice([-1.0, 1.0], 3))
            volume = Volume(np.zeros((4, 5, 6), dtype=np.int16), rng.uniform(0.5, 3, 3), (0, 0, 0), direction)
            for letter, lps_axis in (("S", 2), ("I", 2), ("R", 0), ("L", 0), ("A", 1), ("P", 1)):
                expected = permutation.index(lps_axis)
                found = planning.voxelAxisAlong(volume.ijk_to_ras, planning.letterDirection(letter))
                assert found == expected == volume.voxel_axis_closest_to(letter), (permutation, letter)
    assert planning.viewLetter(" Red ") == "S" and planning.viewLetter("Yellow") == "R"
    assert planning.viewLetter("Green") == "A" and planning.viewLetter("Axial") is None
    with pytest.raises(InputError, match="unknown slicing axis 'X'"):
        planning.letterDirection("X")
    with pytest.raises(InputError, match="axis must be 0, 1 or 2"):
        planning.checkVoxelAxis(3)


def test_inside_and_box_bounds_follow_the_volume_layer():
    volume = Volume(np.zeros(SHAPE_IJK[::-1], dtype=np.int16), (1, 1, 1), (0, 0, 0), np.eye(3))
    cases = {(-0.5, 0, 0): True, (-0.51, 0, 0): False, (39.5, 29.5, 11.5): True, (39.51, 0, 0): False,
             (3, 4, 11.6): False, (3, 4, 5): True}
    for ijk, inside in cases.items():
        assert planning.pointInside(ijk, SHAPE_IJK) is inside and bool(volume.contains_ijk(ijk)[0]) is inside
    corners = np.array([[-3.0, 2, 1], [45.0, 10, 4], [10, 12, 3]])
    low, high = planning.boxBounds(corners, SHAPE_IJK)
    assert low.tolist() == [0, 2, 1] and high.tolist() == [39, 12, 4]
    assert planning.boxBounds(np.array([[41.0, 2, 1], [45.0, 10, 4]]), SHAPE_IJK) is None


def test_planning_imports_neither_torch_nor_slicer():
    code = ("import sys; sys.path.insert(0, %r); import SegMoTESlicerLib.planning, SegMoTESlicerLib.catalogue; "
            "bad = [m for m in ('torch', 'slicer', 'vtk', 'qt', 'segmote_core.engine') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)" % str(MODULE_DIR))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
