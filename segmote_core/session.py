"""An interactive session: one object of one volume, prompted and corrected in 3-D.

``session = engine.open(volume)`` holds what every prompt on that object shares: the slicing, the normalisation
(the frozen decoder's own input for boxes, the adapter's for clicks), the embeddings (the engine's cache) and the
current 3-D mask. Each interaction returns an ``Update``: the whole 3-D mask, the slices it changed and each
slice's predicted IoU.

- ``add_box(box_ijk)``: a box drawn on one slice gives the whole object: that slice, then the object followed slice
  by slice while it continues (never past ``z_range`` when one is given). A box that spans several slices is a 3-D
  box: the object inside it.
- ``add_point(ijk, positive)``: the first click gives the object under it, in 3-D. A later click on any slice
  corrects the object: that slice is answered again with all of its clicks and the current mask, and the change is
  carried to the neighbouring slices until they stop changing (``docs/interactive.md``).
- ``undo()`` restores the state before the last interaction; ``reset()`` forgets the object and its prompts.

How prompts reach the model lives here, in one place: a box (or the box a mask or click leads to) goes to the frozen
decoder with the input it was trained for; clicks go through ``segmote_core.boxes`` (an adapter class under them,
else a box search); a box with clicks goes to the adapter's decoder when one is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
from scipy import ndimage

from . import boxes
from .errors import Cancelled, InputError
from .toolbox import box_mask, mask_box
from .volume import Volume, prompt_array

if TYPE_CHECKING:  # the engine imports this module
    from .engine import Engine, SlicePrediction

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]
SliceFn = Callable[[int, np.ndarray], None]  # (stack slice index, the (K, J, I) mask so far)

MIN_SCORE = 0.3  # predicted IoU under which following the object stops
MIN_OVERLAP = 0.6  # share of a new slice's mask that must lie over the previous slice's mask
MAX_INTENSITY_JUMP = 0.2  # largest change of the mask's mean normalised intensity from one slice to the next
LOW_CONFIDENCE = 0.75  # predicted IoU under which a result is flagged for the user to check (docs/training.md)
CONTINUE_GROWTH = 2  # pixels an object may grow by from one slice to the next where the model's answer breaks off
CONTINUE_SLACK = 0.05  # normalised intensity beyond the object's 5th-95th percentiles still taken as the object
CHANGE_SHARE = 0.5  # most of a slice's mask one click may add or remove (the rest: an answer to something else)
LEVEL_GAP = 0.05  # least normalised intensity difference between two tissues for intensity to tell them apart
RING_WIDTH = 3  # pixels around a box's answer whose intensity is its surroundings' level
DESCRIBED_SHARE = 0.8  # share of a removed region nearer its own level than the object's for intensity to carry it
UNDO_DEPTH = 50  # interactions kept for undo


@dataclass
class Update:
    """What one interaction left: the object's 3-D mask (a copy, (K, J, I) on the volume's grid), the stack slices
    it changed (``changed``: (first, last) along the slicing axis, None if nothing changed), each slice's predicted
    IoU, and how the scan was normalised for the model."""

    mask: np.ndarray
    changed: tuple[int, int] | None
    slice_scores: dict[int, float]
    slice_areas: dict[int, int]
    normalization: object
    axis: int  # the voxel axis (0 I, 1 J, 2 K) the slices are taken along

    @property
    def predicted_iou(self) -> float | None:
        """The model's own estimate of the object's IoU: per-slice predictions weighted by mask area."""
        total = sum(self.slice_areas.values())
        if not total:
            return None
        return float(sum(self.slice_scores[i] * a for i, a in self.slice_areas.items()) / total)

    @property
    def low_confidence(self) -> bool:
        score = self.predicted_iou
        return score is None or score < LOW_CONFIDENCE

    @property
    def confidence_text(self) -> str:
        """One line for the user, e.g. 'predicted IoU 0.93' or 'predicted IoU 0.52 - low: check this result'."""
        score = self.predicted_iou
        if score is None:
            return "empty result - nothing found for this prompt"
        low = f" - low (under {LOW_CONFIDENCE:g}): check this result" if score < LOW_CONFIDENCE else ""
        return f"predicted IoU {score:.2f}{low}"


@dataclass
class _Step:
    """One interaction as undo needs it: the slices it overwrote (before) and the prompts before it."""

    slices: dict[int, tuple[np.ndarray, float | None]] = field(default_factory=dict)
    prompts: tuple = ()


class Session:
    """One object of one volume, prompted and corrected interactively (see the module docstring)."""

    def __init__(self, engine: "Engine", volume: Volume, axis: int | None = None, window=None,
                 preset: str | None = None, fill_box: bool = False):
        self.engine = engine
        self.volume = volume
        self.view = engine.prepare(volume, axis, window=window, preset=preset)  # the adapter's input for clicks
        self.stack = self.view.stack
        self.fill_box = fill_box
        self._mask = np.zeros(volume.array.shape, dtype=bool)  # (K, J, I)
        self._stack_mask = self.stack.to_stack(self._mask)  # writable view: slices written here land in _mask
        self._scores: dict[int, float] = {}
        self._boxes: dict[int, np.ndarray] = {}  # slice -> the user's 2-D box (slice xy)
        self._clicks: dict[int, list[tuple[np.ndarray, int]]] = {}  # slice -> [(xy, 1 positive / 0 negative)]
        self._z_range: tuple[int, int] | None = None
        self._history: list[_Step] = []
        self._step: _Step | None = None
        self._used_boxes = False  # whether the answer came from the box decoder's view (reported normalisation)
        self.on_slice: SliceFn | None = None
        self.progress: ProgressFn | None = None
        self.cancel: CancelFn | None = None

    # ---- state -----------------------------------------------------------------------------------------------
    @property
    def mask(self) -> np.ndarray:
        """The current object (a copy), bool (K, J, I) on the volume's grid."""
        return self._mask.copy()

    @property
    def num_slices(self) -> int:
        return self.stack.shape[0]

    @property
    def axis(self) -> int:
        return self.stack.voxel_axis

    @property
    def has_object(self) -> bool:
        return bool(self._boxes or self._clicks)

    @property
    def normalization(self):
        return self.engine.boxes_view(self.view).normalization if self._used_boxes else self.view.normalization

    def can_undo(self) -> bool:
        return bool(self._history)

    # ---- interactions ----------------------------------------------------------------------------------------
    def add_box(self, box_ijk, z_range=None, slice_only: bool = False) -> Update:
        """A box: (i0, j0, k0, i1, j1, k1) continuous voxel corners. Flat along the slicing axis: a 2-D box on that
        slice, followed up and down while the object continues (z_range: (first, last) voxel index along the
        slicing axis it never leaves; slice_only: that slice alone). Spanning several slices: a 3-D box."""
        corners = prompt_array(box_ijk, 6, "the box", single=True).reshape(2, 3)
        self._check_inside(corners, "box corner")
        in_stack = self.stack.ijk_to_stack(corners)
        low = self.stack.nearest_index(in_stack.min(axis=0))[0]
        high = self.stack.nearest_index(in_stack.max(axis=0))[0]
        if high[1] <= low[1] or high[2] <= low[2]:
            raise InputError("the box is empty: it has no extent in the slice plane")
        box_xy = np.array([low[2], low[1], high[2], high[1]], dtype=float)
        limits = self._limits(z_range)
        with self._interaction():
            if high[0] > low[0]:
                if z_range is not None:
                    raise InputError("a 3-D box has its own slice range; give z_range with a 2-D box only")
                self._box3d(box_xy, int(low[0]), int(high[0]))
            else:
                index = int(low[0])
                if not limits[0] <= index <= limits[1]:
                    raise InputError(f"the box's slice {index} lies outside the z range {limits}")
                self._z_range = limits if z_range is not None else self._z_range
                self._boxes[index] = box_xy
                self._used_boxes = self._used_boxes or not self._clicks.get(index)
                answer = self._answer(index)
                self._settle(index, answer, follow=not slice_only)
        return self._update()

    def add_point(self, ijk, positive: bool = True, slice_only: bool = False) -> Update:
        """A click at continuous voxel position ijk: include (positive) or exclude. The first click of an object
        must include; later clicks correct the object in 3-D (slice_only: on their slice alone)."""
        point = prompt_array(ijk, 3, "the point", single=True).reshape(1, 3)
        self._check_inside(point, "point")
        index, row, col = self.stack.nearest_index(self.stack.ijk_to_stack(point))[0]
        xy = self.stack.ijk_to_stack(point)[0, [2, 1]]
        if not self.has_object and not positive:
            raise InputError("the first click on an object must include it (a positive click); nothing changed")
        with self._interaction():
            self._clicks.setdefault(int(index), []).append((xy, 1 if positive else 0))
            self._settle(int(index), self._answer(int(index)), follow=not slice_only)
        return self._update()

    def prompt(self, box_ijk=None, points_ijk=None, point_labels=None, slice_only: bool = False) -> Update:
        """A box and/or points given together as one interaction (a prompt file's object, the command line):
        points must lie on one slice, a 2-D box on the same slice."""
        if box_ijk is None and points_ijk is None:
            raise InputError("give a box or at least one point")
        if points_ijk is None:
            return self.add_box(box_ijk, slice_only=slice_only)
        points = prompt_array(points_ijk, 3, "points")
        labels = (np.ones(len(points), int) if point_labels is None
                  else prompt_array(point_labels, 1, "point labels").reshape(-1))
        if len(labels) != len(points):
            raise InputError(f"{len(points)} points but {len(labels)} point labels")
        if not set(np.unique(labels)) <= {0, 1}:
            raise InputError("point labels must be 1 (positive) or 0 (negative)")
        self._check_inside(points, "point")
        in_stack = self.stack.ijk_to_stack(points)
        slices = np.unique(self.stack.nearest_index(in_stack)[:, 0])
        if len(slices) > 1:
            raise InputError(f"points lie on different slices {slices.tolist()} along the "
                             f"{'IJK'[self.axis]} axis; place them on one slice")
        index = int(slices[0])
        if not self.has_object and not (labels == 1).any() and box_ijk is None:
            raise InputError("only exclude points: give at least one include point or a box")
        box_xy = None
        if box_ijk is not None:
            corners = prompt_array(box_ijk, 6, "the box", single=True).reshape(2, 3)
            self._check_inside(corners, "box corner")
            box_stack = self.stack.ijk_to_stack(corners)
            low = self.stack.nearest_index(box_stack.min(axis=0))[0]
            high = self.stack.nearest_index(box_stack.max(axis=0))[0]
            if not low[0] <= index <= high[0]:
                raise InputError("the points and the box are on different slices")
            if high[1] <= low[1] or high[2] <= low[2]:
                raise InputError("the box is empty: it has no extent in the slice plane")
            box_xy = np.array([low[2], low[1], high[2], high[1]], dtype=float)
        with self._interaction():
            if box_xy is not None:
                self._boxes[index] = box_xy
            for xy, label in zip(in_stack[:, [2, 1]], labels):
                self._clicks.setdefault(index, []).append((xy, int(label)))
            self._settle(index, self._answer(index), follow=not slice_only)
        return self._update()

    def undo(self) -> Update:
        """Restore the mask and prompts before the last interaction; with nothing to undo, an InputError."""
        if not self._history:
            raise InputError("nothing to undo")
        step = self._history.pop()
        changed = sorted(step.slices)
        self._restore(step)
        update = self._update()
        update.changed = (changed[0], changed[-1]) if changed else None
        return update

    def reset(self) -> None:
        """Forget the object, its prompts and its undo history (a new object on the same volume)."""
        self._mask[...] = False
        self._scores.clear()
        self._boxes.clear()
        self._clicks.clear()
        self._z_range = None
        self._history.clear()
        self._used_boxes = False

    # ---- bookkeeping -------------------------------------------------------------------------------------------
    def _interaction(self):
        session = self

        class Interaction:
            def __enter__(self):
                session._step = _Step(prompts=session._prompt_state())
                return self

            def __exit__(self, kind, error, trace):
                step, session._step = session._step, None
                if kind is not None:  # an error or cancel: nothing changed
                    session._restore(step)
                    return False
                session._history.append(step)
                del session._history[:-UNDO_DEPTH]
                return False

        return Interaction()

    def _prompt_state(self) -> tuple:
        return ({k: v.copy() for k, v in self._boxes.items()}, {k: list(v) for k, v in self._clicks.items()},
                self._z_range, self._used_boxes)

    def _restore(self, step: _Step) -> None:
        for index, (old, score) in step.slices.items():
            self._stack_mask[index] = old
            if score is None:
                self._scores.pop(index, None)
            else:
                self._scores[index] = score
        boxes_, clicks, self._z_range, self._used_boxes = step.prompts
        self._boxes, self._clicks = boxes_, clicks

    def _write(self, index: int, mask: np.ndarray, score: float | None) -> None:
        if self._step is not None and index not in self._step.slices:
            self._step.slices[index] = (self._stack_mask[index].copy(), self._scores.get(index))
        self._stack_mask[index] = mask
        if score is None or not mask.any():
            self._scores.pop(index, None)
        else:
            self._scores[index] = score
        if self.on_slice:
            self.on_slice(index, self._mask)

    def _update(self) -> Update:
        step = self._history[-1] if self._history else None
        changed = sorted(step.slices) if step else []
        areas = {i: int(self._stack_mask[i].sum()) for i in self._scores}
        areas = {i: a for i, a in areas.items() if a}
        return Update(self._mask.copy(), (changed[0], changed[-1]) if changed else None,
                      {i: self._scores[i] for i in areas}, areas, self.normalization, self.axis)

    def _check_cancel(self) -> None:
        if self.cancel and self.cancel():
            raise Cancelled("cancelled; the object is as it was before this prompt")

    def _check_inside(self, points_ijk: np.ndarray, what: str) -> None:
        inside = self.volume.contains_ijk(points_ijk)
        if not inside.all():
            bad = np.round(points_ijk[~inside][0], 2).tolist()
            raise InputError(f"{what} at voxel {bad} lies outside the image "
                             f"({'x'.join(map(str, self.volume.shape_ijk))} voxels)")

    def _limits(self, z_range) -> tuple[int, int]:
        if z_range is None:
            return self._z_range or (0, self.num_slices - 1)
        values = prompt_array(z_range, 2, "the z range", single=True).reshape(-1)
        if values[0] > values[1]:
            raise InputError(f"the z range starts after it ends: {values.tolist()}")
        # z_range is in voxel indices along the slicing axis; stack order may be flipped
        ends = np.zeros((2, 3))
        ends[:, self.axis] = values
        stack = self.stack.nearest_index(self.stack.ijk_to_stack(ends))[:, 0]
        low, high = int(stack.min()), int(stack.max())
        if high < 0 or low > self.num_slices - 1:
            raise InputError(f"the z range {values.tolist()} lies outside the image")
        return max(low, 0), min(high, self.num_slices - 1)

    # ---- answering one slice -----------------------------------------------------------------------------------
    def _decode_box(self, index: int, box: np.ndarray, reach: np.ndarray | None = None,
                    prior=None) -> "SlicePrediction":
        """The model's answer to a box alone: the frozen decoder (or the adapter's, if it answers boxes) with the
        input that decoder was trained for. With `reach` (where the object may be), the answer is completed there
        (``complete_in_box``; `prior`: the object's levels so far): LiteMedSAM often outlines only the largest
        part of an object from a box."""
        prediction = self.engine._decode_slice(self.engine.boxes_view(self.view), index, box=box)
        if reach is not None and prediction.mask.any():
            prediction.mask = complete_in_box(prediction.mask, box, self._image(index), reach, prior)
        return prediction

    def _decode_next(self, index: int, box: np.ndarray, after: int) -> "SlicePrediction":
        """The answer on slice `index` to a box that follows the object from its neighbour `after`."""
        previous = self._stack_mask[after]
        prior = object_levels(previous, boxes.loose_box(previous), self._image(after))
        return self._decode_box(index, box, reach=_near(previous), prior=prior)

    def _image(self, index: int) -> np.ndarray:
        """A slice as the box decoder sees it (normalised, 0..1)."""
        return self.engine.boxes_view(self.view).slice01(index)

    def _answer(self, index: int) -> "SlicePrediction":
        """One slice answered with all of its prompts and the current mask."""
        from .engine import SlicePrediction

        box = self._boxes.get(index)
        clicks = self._clicks.get(index, [])
        current = self._stack_mask[index]
        points = np.array([xy for xy, _ in clicks], float).reshape(-1, 2)
        labels = np.array([label for _, label in clicks], int)
        positives, negatives = boxes.split_clicks(points, labels)
        if box is not None and not len(points):
            return self._decode_box(index, box, reach=box_mask(box, current.shape))
        if box is None and not current.any():
            if not len(positives):
                return SlicePrediction(np.zeros_like(current), None, 0.0)
            # A slice the object has not reached: the object continuing from a neighbour, if it holds the clicks;
            # else the object under the clicks.
            for neighbour in (index - 1, index + 1):
                if 0 <= neighbour < self.num_slices and self._stack_mask[neighbour].any():
                    answer = self._decode_box(index, boxes.loose_box(self._stack_mask[neighbour]))
                    # only what looks like the clicked pixels (past an organ's end the box takes its neighbour)
                    image = self._image(index)
                    spread = max(float(np.std(self._image(neighbour)[self._stack_mask[neighbour]])), 0.02)
                    clicked = image[boxes._pixels(positives, image.shape)]
                    alike = (image >= clicked.min() - spread) & (image <= clicked.max() + spread)
                    answer.mask = boxes.parts_under(answer.mask & alike, positives)
                    if boxes.fits_clicks(answer.mask, positives, negatives):
                        return answer
            return self.engine._answer_clicks(self.view, index, points, labels)
        if not current.any():  # a box with clicks on a new object
            current = self._decode_box(index, box, reach=box_mask(box, current.shape)).mask
        score = self._scores.get(index, 0.5)
        mask = current.copy()
        held = mask[boxes._pixels(positives, mask.shape)] if len(positives) else np.zeros(0, bool)
        for x, y in positives[~held]:
            mask |= self._added_at(index, mask, x, y, negatives)
        for x, y in negatives:
            if mask[int(round(y)), int(round(x))]:
                mask &= ~self._removed_at(index, mask, x, y, positives)
        return SlicePrediction(mask, None, score)

    def _added_at(self, index, current, x, y, negatives) -> np.ndarray:
        """What a positive click at (x, y) adds to a slice's mask (at most CHANGE_SHARE of it): the pixels of the
        object's intensity connected to the click; where the clicked pixel does not have it, the part of the
        model's object under the click that the mask lacks; else the pixels of the clicked intensity around it."""
        image = self._image(index)
        limit = max(CHANGE_SHARE * current.sum(), 16)
        within = _within(image, self._intensities(index, current))
        row, col = int(round(y)), int(round(x))
        if within is not None and within[row, col]:
            alike = ~current & within
            levels = object_levels(current, mask_box(current, margin=RING_WIDTH), image)
            if levels is not None:  # and nearer the object's level than what borders it
                alike &= _nearer(image, *levels)
            region = _region_at(alike, row, col)
            if region.sum() <= limit:
                return region
        click = np.array([[x, y]])
        view = self.engine.boxes_view(self.view)
        under = boxes.search_box(lambda b: self._decode_box(index, b), image, click, np.ones(1, int),
                                 decode_boxes=lambda many: self.engine.decode_boxes(view, index, many))
        if under is not None:
            added = boxes.parts_under(under.mask | current, click) & ~current
            if negatives.size and added[boxes._pixels(negatives, added.shape)].any():
                added = np.zeros_like(added)
            if added.any() and added.sum() <= limit:
                return added
        region = self._alike_region(image, ~current, x, y, current, limit=limit)
        if region.any():
            return region
        spot = np.zeros_like(current)
        spot[max(row - 1, 0):row + 2, max(col - 1, 0):col + 2] = True
        return spot & ~current

    def _removed_at(self, index, current, x, y, positives) -> np.ndarray:
        """What a negative click at (x, y) removes from a slice's mask: a separate island it sits on; else another
        tissue under it (``_other_tissue``); else, on the object's last slice, the part it sits on (``_ends_here``);
        else the part under the click that the model's answer to the mask's box cut short of the click leaves out."""
        row, col = int(round(y)), int(round(x))
        parts, count = ndimage.label(current)
        keep_clicks = boxes._pixels(positives, current.shape) if len(positives) else None
        if count > 1:
            island = parts == parts[row, col]
            largest = np.argmax(np.bincount(parts.reshape(-1))[1:]) + 1
            if parts[row, col] != largest and (keep_clicks is None or not island[keep_clicks].any()):
                return island
        image = self._image(index)
        region = self._other_tissue(image, current, row, col)
        if region.any() and (keep_clicks is None or not region[keep_clicks].any()):
            return region
        if self._ends_here(index, positives):
            return _region_at(current, row, col)
        best = None
        x0, y0, x1, y1 = mask_box(current)
        for cut in ((x0, y0, x - 2, y1), (x + 2, y0, x1, y1), (x0, y0, x1, y - 2), (x0, y + 2, x1, y1)):
            cut = np.array(cut, float)
            if cut[2] - cut[0] < 2 or cut[3] - cut[1] < 2:
                continue
            kept = self._decode_box(index, cut).mask & current
            if kept[row, col] or (keep_clicks is not None and not kept[keep_clicks].all()):
                continue
            if (current & ~kept).sum() > CHANGE_SHARE * current.sum():
                continue
            if best is None or kept.sum() > best.sum():
                best = kept
        if best is not None and best.any():
            # only the cut-off part under the click: the answer to a smaller box also trims the mask's far edges
            return _region_at(current & ~best, row, col)
        return peeled_spot(current, row, col)  # nothing better

    def _ends_here(self, index, positives) -> bool:
        """Whether an exclude click on the object's own tissue on its last slice on one side (no box or include
        click of the user's on it) says the object ends before that slice: followed objects overshoot their end
        by a slice or two where the next structure continues them (a vertebral column into the next). A leak of
        another tissue is taken out before this is asked (``_other_tissue``)."""
        if index in self._boxes or len(positives):
            return False
        ends = [not (0 <= t < self.num_slices and self._stack_mask[t].any()) for t in (index - 1, index + 1)]
        return any(ends) and not all(ends)

    @staticmethod
    def _other_tissue(image, current, row, col) -> np.ndarray:
        """The part of the mask an exclude click at (row, col) marks as another tissue: where the clicked spot's
        intensity (its 3x3 median) differs from the object's median by LEVEL_GAP or more, the pixels of the mask
        nearer the clicked intensity, connected to the click; nothing where that is smaller than the clicked spot
        (a few pixels brighter than the rest are the object's own texture, bone's cortex beside its marrow) or
        most of the mask."""
        spot = image[max(row - 1, 0):row + 2, max(col - 1, 0):col + 2]
        clicked, kept = float(np.median(spot)), float(np.median(image[current]))
        if abs(clicked - kept) < LEVEL_GAP:
            return np.zeros_like(current)
        region = _region_at(current & _nearer(image, clicked, kept), row, col)
        if not spot.size <= region.sum() <= CHANGE_SHARE * current.sum():
            return np.zeros_like(current)
        return region

    def _alike_region(self, image, allowed, x, y, reference, limit) -> np.ndarray:
        """The pixels of `allowed` connected to (x, y) whose intensity is within the object's spread (the standard
        deviation over `reference`) of the clicked pixel's; empty if that exceeds `limit` pixels."""
        row, col = int(round(y)), int(round(x))
        spread = max(float(np.std(image[reference])) if reference.any() else 0.0, 0.02)
        alike = allowed & (np.abs(image - image[row, col]) <= spread)
        parts, _ = ndimage.label(alike)
        if not parts[row, col]:
            return np.zeros_like(allowed)
        region = parts == parts[row, col]
        return region if region.sum() <= limit else np.zeros_like(allowed)

    # ---- 3-D -------------------------------------------------------------------------------------------------
    def _settle(self, index: int, answer: "SlicePrediction", follow: bool) -> None:
        """Write a slice's new answer, then carry it up and down: a change to a slice the object had is carried to
        the neighbours while they change (``_carry``); from a slice the object had not reached (a box, a first
        click, a click past the object's end), the model follows the object while it continues (``_follow``)."""
        old = self._stack_mask[index].copy()
        self._write(index, answer.mask, answer.score)
        if not follow or not (answer.mask.any() or old.any()):
            return
        for step in (1, -1):
            start = index
            if old.any():
                start = self._carry(index, old, answer.mask, step)
                if start is None:
                    continue
            self._follow(start, step)

    def _in_range(self, index: int) -> bool:
        low, high = self._z_range or (0, self.num_slices - 1)
        return low <= index <= high

    def _carry(self, index: int, old: np.ndarray, new: np.ndarray, step: int) -> int | None:
        """Carry a slice's change (what it gained, what it lost) to the next slices in direction `step` while it
        continues there: the gained region grows into the neighbour's pixels of its intensity next to it, the
        lost region takes the neighbour's pixels of its intensity under it. Returns the last slice written when
        the object had not reached the next one yet (the model then follows on from there), else None."""
        added, removed = new & ~old, old & ~new
        gained_like = self._intensities(index, added)
        lost_levels = None  # (the removed tissue's intensity, the kept object's)
        if removed.any() and new.any():
            image = self._image(index)
            lost_levels = float(np.median(image[removed])), float(np.median(image[new]))
            described = _nearer(image, *lost_levels)[removed].mean() >= DESCRIBED_SHARE
            if abs(lost_levels[0] - lost_levels[1]) < LEVEL_GAP or not described:
                lost_levels = None  # intensity does not tell what was removed from what stays
        whole = old.any() and not new.any()  # the object was removed from this slice: it ended before it
        if whole and not self._anchored(index, step):
            return None  # the user's own prompts lie that way: the object is there
        t, previous = index + step, index
        while self._in_range(t) and (added.any() or removed.any()):
            self._check_cancel()
            before = self._stack_mask[t]
            if not before.any():
                return previous if added.any() and not whole else None
            image = self._image(t)
            if whole:
                lost = before & _touching(before, ndimage.binary_dilation(removed, iterations=CONTINUE_GROWTH))
                gained = np.zeros_like(before)
            else:
                gained = _grow(added, ~before, _within(image, gained_like), shrink=False)
                gained &= ndimage.binary_dilation(before, iterations=CONTINUE_GROWTH)  # what the object misses
                if gained.sum() > CHANGE_SHARE * before.sum():
                    gained = np.zeros_like(gained)
                lost = np.zeros_like(before)
                if lost_levels is not None:
                    lost = _grow(removed, before, _nearer(image, *lost_levels), shrink=True)
                if lost.sum() > CHANGE_SHARE * before.sum():  # most of the object: not the same error any more
                    lost = np.zeros_like(lost)
            after = (before | gained) & ~lost
            if t in self._boxes:
                after &= box_mask(self._boxes[t], after.shape)
            clicks = self._clicks.get(t)
            if clicks:
                positives, negatives = boxes.split_clicks([xy for xy, _ in clicks], [label for _, label in clicks])
                if not boxes.fits_clicks(after, positives, negatives):
                    return None
            if np.array_equal(after, before):
                return None
            self._write(t, after, self._scores.get(t))
            added, removed = gained, lost
            previous, t = t, t + step
        return None

    def _anchored(self, index: int, step: int) -> bool:
        """Whether all of the user's boxes and include clicks lie behind slice `index` when going in direction
        `step` (so that the object ending at `index` is what they say)."""
        prompted = list(self._boxes) + [i for i, clicks in self._clicks.items() if any(label for _, label in clicks)]
        return all((i - index) * step < 0 for i in prompted)

    def _intensities(self, index: int, region: np.ndarray):
        """5th-95th percentiles of a region's normalised intensities (None for an empty region)."""
        if not region.any():
            return None
        return np.percentile(self._image(index)[region], [5, 95])

    def _follow(self, start: int, step: int) -> None:
        """The model follows the object from slice `start` in direction `step` into slices it has not reached: each
        next slice is prompted with the loose box around the previous slice's mask, until the object ends or a
        slice already holds it (a change to those is carried by ``_carry``)."""
        previous = self._stack_mask[start].copy()
        if not previous.any():
            return
        image = self.view.slice01(start)
        previous_mean = image[previous].mean()
        alike = np.percentile(image[previous], [5, 95])
        t = start + step
        while self._in_range(t):
            self._check_cancel()
            if self._stack_mask[t].any():
                break
            following = self._next_slice(t, t - step, previous, previous_mean, alike)
            if following is None:
                break
            self._write(t, following.mask, following.score)
            previous = following.mask
            previous_mean = self.view.slice01(t)[previous].mean()
            t += step
            if self.progress:
                self.progress(abs(t - start), self.num_slices)

    def _next_slice(self, index: int, after: int, previous: np.ndarray, previous_mean: float,
                    alike) -> "SlicePrediction | None":
        """The object on a slice from the previous slice's mask: the model's answer to the loose box around it,
        or None where the object has ended (the model finds almost nothing, is unsure, or jumps to a region that
        does not continue the previous slice in place and intensity). Inside a z range the user gave, the object
        is there: a break keeps what continues it (``continue_object``)."""
        prediction = self._decode_next(index, boxes.loose_box(previous), after)
        image = self.view.slice01(index)
        if _breaks_off(prediction, previous, previous_mean, image):
            if self._z_range is None:
                return None
            prediction.mask = continue_object(prediction.mask, previous, image, alike, None)
            if not prediction.mask.any():
                return None
        clicks = self._clicks.get(index)
        if clicks:
            positives, negatives = boxes.split_clicks([xy for xy, _ in clicks], [label for _, label in clicks])
            if not boxes.fits_clicks(prediction.mask, positives, negatives):
                return None
        return prediction

    def _box3d(self, box_xy: np.ndarray, first: int, last: int) -> None:
        """A 3-D box: its central slice with the box's projection, then the object followed slice by slice inside
        the box. Inside it the user has said the object is there, so a break does not end it: the slice keeps the
        part that continues the previous slice (``continue_object``). fill_box keeps the model's whole answer
        while it is sure (docs/training.md: at an organ's thin ends it is often confidently too large)."""
        centre = (first + last) // 2
        self._used_boxes = True
        self._boxes[centre] = box_xy
        answer = self._decode_box(centre, box_xy, reach=box_mask(box_xy, self._stack_mask[centre].shape))
        self._write(centre, self._clip(answer.mask, box_xy), answer.score)
        if not answer.mask.any():
            return
        engine = self.engine
        if engine.batch_size > 1:
            engine.embeddings(engine.boxes_view(self.view), list(range(first, last + 1)), None, self.cancel)
        total, done = last - first + 1, 1
        start_image = self.view.slice01(centre)
        start_mask = self._stack_mask[centre].copy()
        alike = np.percentile(start_image[start_mask], [5, 95])
        for step in (1, -1):
            previous = start_mask
            previous_mean = start_image[start_mask].mean()
            index = centre + step
            while first <= index <= last:
                self._check_cancel()
                box = boxes.loose_box(previous)
                box = np.concatenate([np.maximum(box[:2], box_xy[:2]), np.minimum(box[2:], box_xy[2:])])
                prediction = self._decode_next(index, box, index - step)
                prediction.mask = self._clip(prediction.mask, box_xy)
                image = self.view.slice01(index)
                mean = image[prediction.mask].mean() if prediction.mask.any() else 0.0
                if _breaks_off(prediction, previous, previous_mean, image):
                    if not (self.fill_box and prediction.mask.sum() >= 4 and prediction.score >= MIN_SCORE):
                        prediction.mask = continue_object(prediction.mask, previous, image, alike, box_xy)
                        if not prediction.mask.any():
                            break
                        mean = previous_mean  # a continuation keeps the object's intensity by construction
                previous_mean = mean
                self._write(index, prediction.mask, prediction.score)
                previous = prediction.mask
                index += step
                done += 1
                if self.progress:
                    self.progress(done, total)

    @staticmethod
    def _clip(mask: np.ndarray, box_xy: np.ndarray) -> np.ndarray:
        """SAM can spill outside its box; the user's 3-D box is a hard limit."""
        return mask & box_mask(box_xy, mask.shape)


def _near(previous: np.ndarray) -> np.ndarray:
    """Where a followed object may lie on the next slice: within CONTINUE_GROWTH pixels of the previous slice's
    mask, inside that mask's box (anatomy is continuous; the box keeps a completion from running along a neighbour)."""
    near = ndimage.binary_dilation(previous, iterations=CONTINUE_GROWTH)
    return near & box_mask(mask_box(previous), near.shape)


def object_levels(mask: np.ndarray, box_xy: np.ndarray, image: np.ndarray) -> tuple[float, float] | None:
    """(the object's intensity, its surroundings' intensity): the medians of a slice's answer and of the ring of
    RING_WIDTH pixels around it inside its box (what borders the object, not the far side of the box: the lung
    beside a vertebra is not what the vertebra must be told from); None where they lie closer than LEVEL_GAP."""
    inside = box_mask(box_xy, mask.shape)
    rest = inside & ~mask & ndimage.binary_dilation(mask, iterations=RING_WIDTH)
    if mask.sum() < 4 or rest.sum() < 4:
        return None
    levels = float(np.median(image[mask])), float(np.median(image[rest]))
    return levels if abs(levels[0] - levels[1]) >= LEVEL_GAP else None


def complete_in_box(mask: np.ndarray, box_xy: np.ndarray, image: np.ndarray, reach: np.ndarray,
                    prior: tuple[float, float] | None = None) -> np.ndarray:
    """A box's answer completed: the pixels of `reach` nearer the object's intensity than its surroundings'
    (``object_levels``) and connected to the answer are added. From a box LiteMedSAM often outlines only an
    object's largest part (a vertebra's body without its arch); the box says where the object is, the answer says
    what it looks like. Where the answer is not set apart from what borders it, it has taken some of its
    surroundings: with `prior` (the object's levels on the slice it is followed from), it keeps what is nearer the
    object's level, completed the same way."""
    levels = object_levels(mask, box_xy, image)
    if levels is None:
        if prior is None:
            return mask
        trimmed = mask & _nearer(image, *prior)
        if trimmed.sum() < 4:
            return mask
        mask, levels = trimmed, prior
    return _touching(mask | (reach & _nearer(image, *levels)), mask)


def _nearer(image: np.ndarray, level: float, other: float) -> np.ndarray:
    """Pixels whose intensity lies nearer `level` than `other`."""
    return np.abs(image - level) < np.abs(image - other)


def _breaks_off(prediction: "SlicePrediction", previous: np.ndarray, previous_mean: float, image: np.ndarray) -> bool:
    """Whether a slice's answer does not continue the previous slice's object: the model finds (almost) nothing,
    is unsure, or jumps to a region that does not continue it in place and intensity (anatomy is continuous)."""
    area = prediction.mask.sum()
    overlap = (prediction.mask & previous).sum() / max(area, 1)
    mean = image[prediction.mask].mean() if area else 0.0
    return bool(area < max(4, 0.05 * previous.sum()) or prediction.score < MIN_SCORE or overlap < MIN_OVERLAP
                or abs(mean - previous_mean) > MAX_INTENSITY_JUMP)


def peeled_spot(mask: np.ndarray, row: int, col: int) -> np.ndarray:
    """The mask's pixels within two of (row, col), peeled from the mask's edge down to that pixel's depth: a click
    on the mask's rim takes the rim, not the object inside it; a click deep inside takes the spot."""
    near = np.zeros_like(mask)
    near[max(row - 2, 0):row + 3, max(col - 2, 0):col + 3] = True
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    return mask & near & (depth <= depth[row, col])


def _touching(mask: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The connected parts of `mask` that overlap `region`."""
    parts, _ = ndimage.label(mask)
    found = np.unique(parts[mask & region])
    return np.isin(parts, found[found > 0])


def _region_at(mask: np.ndarray, row: int, col: int) -> np.ndarray:
    """The connected part of `mask` at (row, col) (empty if that pixel is not in it)."""
    if not mask[row, col]:
        return np.zeros_like(mask)
    parts, _ = ndimage.label(mask)
    return parts == parts[row, col]


def _within(image: np.ndarray, like) -> np.ndarray | None:
    """Pixels within `like` (5th-95th percentiles of a region's intensity), plus slack; None without `like`."""
    if like is None:
        return None
    return (image >= like[0] - CONTINUE_SLACK) & (image <= like[1] + CONTINUE_SLACK)


def _grow(change: np.ndarray, allowed: np.ndarray, alike: np.ndarray | None, shrink: bool) -> np.ndarray:
    """A change carried to the next slice: the pixels of `allowed` next to it (CONTINUE_GROWTH pixels) that look
    like it (``alike``), in parts that overlap it. Where that is more than half as large again as the change (its
    intensity does not set it apart), only the pixels of `allowed` under it, one pixel in from its edge, so that it
    ends a few slices on."""
    if not change.any() or alike is None:
        return np.zeros_like(change)
    near = ndimage.binary_dilation(change, iterations=CONTINUE_GROWTH)
    carried = _touching(allowed & near & alike, change)
    if carried.sum() > 1.5 * change.sum() + 8:
        # its intensity does not set it apart: only what lies under it, one pixel in, so that it ends a few slices
        # on (a removal); an addition stops here
        carried = allowed & ndimage.binary_erosion(change) if shrink else np.zeros_like(change)
    return carried if carried.sum() >= 4 else np.zeros_like(change)


def continue_object(answer: np.ndarray, previous: np.ndarray, image: np.ndarray, alike: np.ndarray,
                    clip_box: np.ndarray | None) -> np.ndarray:
    """The part of a slice that continues the previous slice's object, where the model's answer does not.

    Object-like pixels: within CONTINUE_GROWTH pixels of the previous mask, inside the user's box (if any), with the
    object's intensity (``alike``: its 5th-95th percentiles on the prompted slice, plus slack). The model's answer
    limited to them, or (if that keeps almost nothing: the model answered another organ) the object-like pixels
    themselves; only the parts that touch the previous mask."""
    near = ndimage.binary_dilation(previous, iterations=CONTINUE_GROWTH)
    inside = box_mask(clip_box, near.shape) if clip_box is not None else np.ones_like(near)
    like = near & inside & _within(image, alike)
    wanted = max(4, 0.05 * previous.sum())
    # In order: the answer where it looks like the object; the pixels that look like it; the answer where the
    # object was (an object's thin end blurred by a thick slice no longer has the object's intensity).
    for kept in (answer & like, like, answer & near & inside):
        parts, _ = ndimage.label(kept)
        touching = np.unique(parts[previous & kept])
        kept = np.isin(parts, touching[touching > 0])
        if kept.sum() >= wanted:
            return kept
    return kept
