"""AI edits of a segmentation: results written into segments, undo steps, and rollback when a write fails.

What an AI edit changes: the target segment inside the regions the request covered (``Piece``); with overwrite,
also the new voxels are removed from the other segments. Every change records the segment's values before it, so
undo restores them bit for bit, and a write that fails half-way is rolled back before the error reaches the user.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import slicer

from segmote_core.errors import InputError, SegMoTEError

from . import catalogue
from . import segments as mrml

UNDO_DEPTH = 10
NEW_SEGMENT_PREFIX = "SegMoTE"

log = logging.getLogger("SegMoTE")


@dataclass
class Piece:
    """A result region: the target segment becomes `mask` inside `extent`."""

    extent: tuple
    mask: np.ndarray


@dataclass
class SegmentChange:
    """What one AI edit did to one segment, enough to undo it exactly."""

    segmentId: str
    created: bool
    extent: tuple | None = None
    shape: tuple | None = None
    before: np.ndarray | None = None  # np.packbits of the bool values in `extent` before the edit
    afterDigest: bytes = b""


@dataclass
class Edit:
    description: str
    grid: mrml.VolumeGrid
    changes: list


def digest(mask: np.ndarray) -> bytes:
    return hashlib.blake2b(np.packbits(mask).tobytes() + str(mask.shape).encode(), digest_size=16).digest()


def pieceOf(task, mask: np.ndarray, axis: int) -> Piece:
    """The region a planning.PromptTask replaces: its slice(s) across the whole plane, or for a 3-D box the box
    (grown to hold the whole result) over the box's slices."""
    shapeIjk = mask.shape[::-1]
    full = [0, shapeIjk[0] - 1, 0, shapeIjk[1] - 1, 0, shapeIjk[2] - 1]
    found = mrml.maskExtent(mask)
    if task.kind == "2d":
        low = high = task.slice
        if task.engineArgs.get("propagate") and found is not None:
            low, high = min(low, found[2 * axis]), max(high, found[2 * axis + 1])
        extent = list(full)
        extent[2 * axis], extent[2 * axis + 1] = low, high
    else:
        extent = [int(v) for pair in zip(task.roiLow, task.roiHigh) for v in pair]
        extent = mrml.extentUnion(tuple(extent), found)
    extent = tuple(extent)
    return Piece(extent, mask[mrml.extentSlices(extent, tuple(full))].copy())


# ---- writing ---------------------------------------------------------------------------------------------------
def checkStillValid(volumeNode, segmentationNode, grid, segmentId) -> None:
    """Refuse to write when the nodes changed while the model ran."""
    for node, what in ((volumeNode, "volume"), (segmentationNode, "segmentation")):
        if node.GetScene() is None:
            raise InputError(f"the {what} '{node.GetName()}' was removed while the model was running")
    if not mrml.VolumeGrid.fromNodes(volumeNode, segmentationNode).sameAs(grid):
        raise InputError("the volume or segmentation moved while the model was running; run it again")
    if segmentId and segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
        raise InputError(f"segment '{segmentId}' was deleted while the model was running")


def ensureGeometry(segmentationNode, volumeNode, grid):
    """Give a segmentation without (matching) reference geometry the volume's grid; returns an undo callable.

    Only reached when the segmentation is empty or has no geometry yet (the logic refused the rest)."""
    reference = mrml.referenceGeometryImage(segmentationNode)
    if reference is not None and grid.imageGeometryAligned(reference):
        return lambda: None
    segmentation = segmentationNode.GetSegmentation()
    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    role = segmentationNode.GetReferenceImageGeometryReferenceRole()
    oldGeometry, oldReference = segmentation.GetConversionParameter(name), segmentationNode.GetNodeReferenceID(role)
    segmentation.SetConversionParameter(name, mrml.serializeGeometry(grid))
    segmentationNode.SetNodeReferenceID(role, volumeNode.GetID())

    def restore():
        segmentation.SetConversionParameter(name, oldGeometry)
        segmentationNode.SetNodeReferenceID(role, oldReference)
    return restore


def newSegment(segmentationNode, name=None, color=None) -> str:
    segmentation = segmentationNode.GetSegmentation()
    count = segmentation.GetNumberOfSegments()
    if name is None:
        number = 1
        while segmentation.GetSegmentIdBySegmentName(f"{NEW_SEGMENT_PREFIX} {number}"):
            number += 1
        name = f"{NEW_SEGMENT_PREFIX} {number}"
    color = color or catalogue.segmentColor(count)
    segmentId = segmentation.AddEmptySegment("", name, [float(c) for c in color])
    tagTerminology(segmentation.GetSegment(segmentId), name)
    return segmentId


def tagTerminology(segment, name: str) -> None:
    """A segment named after a structure the terminology table knows (an adapter's classes) carries its SNOMED CT
    codes in Slicer's TerminologyEntry tag, as the CLI's .seg.nrrd and DICOM SEG do; other names keep Slicer's
    default."""
    from segmote_core.terminology import resolve

    resolution = resolve(name)
    if resolution.notice is None:
        from slicerio.segmentation import terminology_entry_to_string  # the tag's text, as slicerio writes files

        segment.SetTag("TerminologyEntry", terminology_entry_to_string(resolution.entry.slicer_terminology()))


def replaceRegions(segmentationNode, grid, segmentId, pieces, created, changes) -> np.ndarray:
    """Write pieces into one segment; record the change; returns the new values in the changed extent."""
    changed = None
    for piece in pieces:
        changed = mrml.extentUnion(changed, piece.extent)
    current, currentValues = (None, None) if created else grid.readWholeSegment(segmentationNode, segmentId)
    writeExtent = mrml.extentUnion(changed, current)
    values = np.zeros(mrml.extentShape(writeExtent), dtype=bool)
    if current is not None:
        values[mrml.extentSlices(current, writeExtent)] = currentValues
    before = values[mrml.extentSlices(changed, writeExtent)].copy()
    for piece in pieces:
        values[mrml.extentSlices(piece.extent, writeExtent)] = piece.mask
    after = values[mrml.extentSlices(changed, writeExtent)]
    change = SegmentChange(segmentId, False, changed, before.shape, np.packbits(before), digest(after))
    changes.append(change)  # recorded first, so a failing write is rolled back too
    grid.writeSegment(segmentationNode, segmentId, writeExtent, values)
    return after.copy()


def maskOthers(segmentationNode, grid, keep: set, changed, newValues, changes) -> None:
    """overwrite: remove the new voxels from every other segment (inside the changed extent only)."""
    segmentation = segmentationNode.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        otherId = segmentation.GetNthSegmentID(index)
        if otherId in keep:
            continue
        current, values = grid.readWholeSegment(segmentationNode, otherId)
        overlap = mrml.extentIntersection(current, changed)
        if overlap is None:
            continue
        region = values[mrml.extentSlices(overlap, current)]
        taken = newValues[mrml.extentSlices(overlap, changed)]
        if not (region & taken).any():
            continue
        before = region.copy()
        region &= ~taken
        changes.append(SegmentChange(otherId, False, overlap, before.shape, np.packbits(before), digest(region)))
        grid.writeSegment(segmentationNode, otherId, current, values)


def applyEdit(segmentationNode, volumeNode, grid, description: str, write):
    """Run write(changes) -> result as one edit: (result, Edit). The segmentation gets the volume's geometry first
    if it has none; on any error everything recorded in `changes` is rolled back and the error re-raised."""
    changes: list[SegmentChange] = []
    restoreGeometry = lambda: None  # noqa: E731
    wasModifying = segmentationNode.StartModify()
    try:
        restoreGeometry = ensureGeometry(segmentationNode, volumeNode, grid)
        result = write(changes)
    except BaseException:
        rollback(segmentationNode, grid, changes, restoreGeometry)
        raise
    finally:
        segmentationNode.EndModify(wasModifying)
    return result, Edit(description, grid, changes)


def writePrompted(segmentationNode, volumeNode, grid, segmentId, pieces, overwrite: bool):
    """A prompted result into `segmentId` (None: a new segment): (segment ID, Edit)."""
    def write(changes):
        created = segmentId is None
        target = newSegment(segmentationNode) if created else segmentId
        if created:
            changes.append(SegmentChange(target, True))
        newValues = replaceRegions(segmentationNode, grid, target, pieces, created, changes)
        if overwrite:
            maskOthers(segmentationNode, grid, {target}, changes[-1].extent, newValues, changes)
        return target
    return applyEdit(segmentationNode, volumeNode, grid, "AI segmentation", write)


def writeClasses(segmentationNode, volumeNode, grid, found, overwrite: bool):
    """One segment per found class (replacing the segment of that name, else added): (segment IDs, Edit)."""
    segmentation = segmentationNode.GetSegmentation()
    full = grid.fullExtent

    def write(changes):
        written = []
        for segment in found:
            segmentId = segmentation.GetSegmentIdBySegmentName(segment.name)
            created = not segmentId
            if created:
                segmentId = newSegment(segmentationNode, segment.name, segment.color)
                changes.append(SegmentChange(segmentId, True))
            replaceRegions(segmentationNode, grid, segmentId, [Piece(full, segment.mask)], created, changes)
            written.append(segmentId)
        if overwrite:
            union = np.zeros(found[0].mask.shape, dtype=bool)
            for segment in found:
                union |= segment.mask
            maskOthers(segmentationNode, grid, set(written), full, union, changes)
        return written
    return applyEdit(segmentationNode, volumeNode, grid, "automatic segmentation", write)


# ---- undo --------------------------------------------------------------------------------------------------------
def rollback(segmentationNode, grid, changes, restoreGeometry) -> None:
    """Undo a failed apply; never raises (the original error is what the user must see)."""
    try:
        revert(segmentationNode, grid, changes)
    except Exception:
        log.exception("rolling back a failed AI edit was incomplete")
    finally:
        restoreGeometry()


def revert(segmentationNode, grid, changes) -> None:
    """Put every recorded change back, newest first (used by undo and by a failed apply).

    Segments the edit created are simply removed. A restore that fails is logged and the others still run, so a
    failing write during a rollback cannot leave the rest half-done."""
    segmentation = segmentationNode.GetSegmentation()
    created = {change.segmentId for change in changes if change.created}
    failures = []
    wasModifying = segmentationNode.StartModify()
    try:
        for change in reversed(changes):
            if change.segmentId in created or segmentation.GetSegment(change.segmentId) is None:
                continue
            try:
                before = np.unpackbits(change.before, count=int(np.prod(change.shape))).reshape(change.shape)
                current, currentValues = grid.readWholeSegment(segmentationNode, change.segmentId)
                extent = mrml.extentUnion(change.extent, current)
                values = np.zeros(mrml.extentShape(extent), dtype=bool)
                if current is not None:
                    values[mrml.extentSlices(current, extent)] = currentValues
                values[mrml.extentSlices(change.extent, extent)] = before.astype(bool)
                grid.writeSegment(segmentationNode, change.segmentId, extent, values)
            except Exception as error:  # keep restoring the others
                log.exception("could not restore segment %s", change.segmentId)
                failures.append(error)
        for segmentId in created:
            if segmentation.GetSegment(segmentId) is not None:
                segmentation.RemoveSegment(segmentId)
    finally:
        segmentationNode.EndModify(wasModifying)
    if failures:
        raise SegMoTEError(f"could not restore {len(failures)} segment(s): {type(failures[0]).__name__}: "
                           f"{str(failures[0]).strip()[:150]}")


class UndoHistory:
    """The last `depth` AI edits per segmentation node, keyed by the node's scene and ID.

    Not by the node's Python object: VTK drops a node's Python wrapper as soon as Python holds no reference to it
    (the node itself lives on in the scene), and a weak key went with it. A node's entries are dropped when it
    leaves its scene, since a closed scene's IDs are given to the next scene's nodes."""

    def __init__(self, depth: int = UNDO_DEPTH):
        self.depth = depth
        self._stacks: dict[tuple[str, str], list] = {}

    @staticmethod
    def _key(segmentationNode):
        """(scene, node ID, node): the node itself too, because a closed scene hands its IDs out again."""
        scene = segmentationNode.GetScene() if segmentationNode is not None else None
        if scene is None or not segmentationNode.GetID():
            return None
        return scene.__this__, segmentationNode.GetID(), segmentationNode.__this__

    def _prune(self, scene) -> None:
        """Drop the history of nodes no longer in `scene` (removed, or the scene closed and its IDs reused).

        Checked when the history is used rather than observed on the scene: a scene's callbacks can run while the
        garbage collector tears objects down, where calling back into Python is not safe."""
        sceneKey = scene.__this__
        for key in [k for k in self._stacks if k[0] == sceneKey]:
            node = scene.GetNodeByID(key[1])
            if node is None or node.__this__ != key[2]:
                del self._stacks[key]

    def push(self, segmentationNode, edit: Edit) -> None:
        key = self._key(segmentationNode)
        if key is None:
            return
        self._prune(segmentationNode.GetScene())
        stack = self._stacks.setdefault(key, [])
        stack.append(edit)
        del stack[:-self.depth]

    def steps(self, segmentationNode) -> int:
        self._pruneFor(segmentationNode)
        return len(self._stacks.get(self._key(segmentationNode), ()))

    def _pruneFor(self, segmentationNode) -> None:
        if segmentationNode is None:
            return
        if segmentationNode.GetScene() is not None:
            self._prune(segmentationNode.GetScene())
        else:  # removed from its scene: its history goes with it
            for key in [k for k in self._stacks if k[2] == segmentationNode.__this__]:
                del self._stacks[key]

    def undo(self, segmentationNode) -> bool:
        """Restore the segments as they were before the last AI edit on this segmentation; False if none.

        Raises SegMoTEError (and drops that undo step) if a segment was edited by other tools since, because
        restoring it would silently throw those edits away: for a segment the edit created, that is any voxel
        outside the region the edit wrote."""
        self._pruneFor(segmentationNode)
        stack = self._stacks.get(self._key(segmentationNode))
        if not stack:
            return False
        edit = stack.pop()
        segmentation = segmentationNode.GetSegmentation()
        created = {change.segmentId for change in edit.changes if change.created}
        for change in edit.changes:
            segment = segmentation.GetSegment(change.segmentId)
            if change.created or segment is None:
                continue
            current = edit.grid.readSegment(segmentationNode, change.segmentId, change.extent)
            edited = digest(current) != change.afterDigest
            if not edited and change.segmentId in created:
                edited = _voxelsOutside(segmentationNode, edit.grid, change.segmentId, change.extent)
            if edited:
                raise SegMoTEError(f"segment '{segment.GetName()}' was edited after the AI edit; undo those edits "
                                   "in the Segment Editor instead")
        revert(segmentationNode, edit.grid, edit.changes)
        return True

    def clear(self, segmentationNode=None) -> None:
        if segmentationNode is None:
            self._stacks.clear()
        else:
            self._stacks.pop(self._key(segmentationNode), None)


def _voxelsOutside(segmentationNode, grid, segmentId, extent) -> bool:
    """Whether the segment has voxels outside `extent` (painted there after the AI edit that created it)."""
    current, values = grid.readWholeSegment(segmentationNode, segmentId)
    if current is None or not values.any():
        return False
    inside = mrml.extentIntersection(current, extent)
    insideCount = int(values[mrml.extentSlices(inside, current)].sum()) if inside is not None else 0
    return int(values.sum()) != insideCount
