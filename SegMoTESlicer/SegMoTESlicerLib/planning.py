"""Prompt planning: prompts in voxel coordinates -> the engine calls that serve them. Plain numpy, no MRML.

Decides which voxel axis to slice along, whether a box is a 2-D box on one slice or a 3-D box over many, and which
points go with which slice. Geometry the engine's volume layer already defines (which voxel axis runs along a
direction, what lies inside the image) is taken from ``segmote_core.volume``, so both sides agree.

The panel's one rule of its own is the flat box: a box drawn in a slice view is padded a little along the view's
normal, so a box thinner than THIN_BOX_VOXELS along the slicing axis means "this slice" and is sent to the engine
flattened onto its centre slice. A thicker box always spans two or more slices once rounded to voxels, which is what
makes the engine treat it as 3-D.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from segmote_core.errors import InputError
from segmote_core.volume import ANATOMICAL_AXES, ijk_inside, voxel_axis_closest

THIN_BOX_VOXELS = 1.5  # a box thinner than this along the slicing axis is a 2-D box on one slice
VIEW_AXES = {"red": "S", "yellow": "R", "green": "A"}  # default orientation of Slicer's slice views
ACTIVE_BOX = "box"  # `active` value for "the box was the prompt just placed"


@dataclass(frozen=True)
class PromptPoint:
    """A point prompt: continuous voxel position, label 1 (include) or 0 (exclude), and what identifies it for
    ``active`` (the panel uses (markups node, control point index))."""

    ijk: np.ndarray
    label: int
    key: object = None


@dataclass
class PromptTask:
    """One engine call. ``kind`` '2d': a slice (``slice``) with points and/or a box; '3d': a box over many slices."""

    kind: str
    engineArgs: dict
    slice: int | None = None
    roiLow: np.ndarray | None = None  # IJK, rounded and clipped (3-D boxes)
    roiHigh: np.ndarray | None = None


@dataclass
class PromptInteraction:
    """The prompt just placed, for the object's session (segmote_core.session): a box (IJK low and high corners,
    flattened onto its slice when drawn in a view) or a point (IJK and label 1 include / 0 exclude)."""

    kind: str  # "box" or "point"
    low: np.ndarray | None = None
    high: np.ndarray | None = None
    ijk: np.ndarray | None = None
    label: int = 1


def planInteraction(points: list[PromptPoint], box, active) -> PromptInteraction:
    """The session interaction for the active prompt (ACTIVE_BOX or a point's key); InputError if it is gone."""
    if active == ACTIVE_BOX:
        if box is None:
            raise InputError("the box is gone; draw it again (Shift+B)")
        return PromptInteraction("box", low=np.asarray(box[0], float), high=np.asarray(box[1], float))
    for point in points:
        if point.key == active:
            return PromptInteraction("point", ijk=np.asarray(point.ijk, float), label=int(point.label))
    raise InputError("the point is gone; place it again")


# ---- the slicing axis -----------------------------------------------------------------------------------------
def checkVoxelAxis(axis) -> int:
    if int(axis) not in (0, 1, 2):
        raise InputError(f"axis must be 0, 1 or 2 (voxel I, J or K), got {axis}")
    return int(axis)


def viewLetter(viewName: str) -> str | None:
    """The anatomical axis a slice view looks along by default ('Red' -> 'S'), or None for another name."""
    return VIEW_AXES.get(viewName.strip().lower())


def letterDirection(letter: str, given=None) -> np.ndarray:
    """Unit vector of an anatomical axis letter (R/L, A/P, S/I) in RAS or LPS (only the axis matters)."""
    index = ANATOMICAL_AXES.get(letter.strip().upper())
    if index is None:
        raise InputError(f"unknown slicing axis '{given if given is not None else letter}'; use S, R, A, a view "
                         "name or 0, 1, 2")
    return np.eye(3)[index]


def voxelAxisAlong(ijkToWorld: np.ndarray, direction) -> int:
    """The voxel axis (0 I, 1 J, 2 K) closest to a world direction, for a 4x4 (or 3x3) IJK-to-world matrix."""
    return voxel_axis_closest(np.asarray(ijkToWorld, dtype=float)[:3, :3], direction)


# ---- prompts in voxel coordinates --------------------------------------------------------------------------------
def pointInside(ijk, shapeIjk) -> bool:
    return bool(ijk_inside(ijk, shapeIjk)[0])


def boxBounds(cornersIjk, shapeIjk):
    """(low, high) continuous voxel bounds of a box given by its corners, clipped to the image; None when the box
    lies wholly outside it."""
    corners = np.atleast_2d(np.asarray(cornersIjk, dtype=float))
    low, high = corners.min(axis=0), corners.max(axis=0)
    upper = np.asarray(shapeIjk, dtype=float) - 1
    if np.any(high < -0.5) or np.any(low > upper + 0.5):
        return None
    return np.clip(low, 0, upper), np.clip(high, 0, upper)


def flattenBox(box, axis: int):
    """The box as a 2-D box on the slice through its centre along `axis` (a box drawn in that axis's view)."""
    low, high = box[0].copy(), box[1].copy()
    low[axis] = high[axis] = int(np.round((low[axis] + high[axis]) / 2))
    return low, high


def flatAxis(box) -> int | None:
    """The one axis along which the box is flat (it was drawn in that axis's view), or None."""
    thin = np.flatnonzero(box[1] - box[0] < THIN_BOX_VOXELS)
    return int(thin[0]) if len(thin) == 1 else None


def isBox3d(box, axis: int) -> bool:
    return box is not None and box[1][axis] - box[0][axis] >= THIN_BOX_VOXELS


# ---- tasks -------------------------------------------------------------------------------------------------------
def planPrompts(axis: int, points: list[PromptPoint], box, propagate: bool = False, active=None,
                boxAxis: int | None = None) -> list[PromptTask]:
    """The engine calls for these prompts along `axis`; raises InputError (one line) when there are none.

    boxAxis: the axis of the view the box was drawn in (the box already flattened onto its slice there); a box from
    another view than `axis` says nothing about this axis's slices and is left out."""
    if boxAxis is not None and boxAxis != axis:
        box = None
        if not points:
            raise InputError("the box was drawn in another view; place a point in this view")
    tasks = planTasks(axis, points, box, propagate, active)
    if not tasks:
        raise InputError("no prompt on the active slice")
    return tasks


def planTasks(axis: int, points: list[PromptPoint], box, propagate: bool = False, active=None) -> list[PromptTask]:
    """One task per prompted slice, or one 3-D box task (then the points' slices refine it).

    active: ACTIVE_BOX or a point's key: only the slice of that prompt (with every prompt on it) is run; None runs
    every prompted slice. Points on one view plane may straddle two voxel slices: each goes to its nearest slice and
    is snapped onto it. A slice with only exclude points and no box has nothing to segment and is skipped."""
    box3d = isBox3d(box, axis)
    boxSlice = None if box is None or box3d else int(np.round((box[0][axis] + box[1][axis]) / 2))

    def boxCovers(index):
        return box is not None and (boxSlice == index if not box3d
                                    else box[0][axis] - 0.5 <= index <= box[1][axis] + 0.5)

    def task2d(index, group):
        args = {"propagate": propagate}
        if group:
            ijk = np.array([point.ijk for point in group], dtype=float)
            ijk[:, axis] = index
            args["points_ijk"] = ijk
            args["point_labels"] = np.array([point.label for point in group], dtype=int)
        if boxCovers(index):
            low, high = box[0].copy(), box[1].copy()
            low[axis] = high[axis] = index
            args["box_ijk"] = tuple(low.tolist() + high.tolist())
        elif not any(point.label == 1 for point in group):
            return None
        return PromptTask("2d", args, slice=index)

    groups: dict[int, list[PromptPoint]] = {}
    for point in points:
        groups.setdefault(int(np.round(point.ijk[axis])), []).append(point)

    activeSlice = None
    if active is not None:
        if active == ACTIVE_BOX:
            if box3d:
                return [task3d(box)]
            activeSlice = boxSlice
        else:
            for point in points:
                if point.key == active:
                    activeSlice = int(np.round(point.ijk[axis]))
    if activeSlice is not None:
        task = task2d(activeSlice, groups.get(activeSlice, []))
        return [task] if task else []
    tasks = [task3d(box)] if box3d else []
    if boxSlice is not None and boxSlice not in groups:
        groups[boxSlice] = []
    for index in sorted(groups):
        task = task2d(index, groups[index])
        if task:
            tasks.append(task)
    return tasks


def task3d(box) -> PromptTask:
    low, high = np.round(box[0]).astype(int), np.round(box[1]).astype(int)
    return PromptTask("3d", {"box_ijk": tuple(box[0].tolist() + box[1].tolist())}, roiLow=low, roiHigh=high)
