"""SegMoTESlicerLogic: prompts placed in the scene -> segments in the scene.

No Qt, no ctk, no slicer.app: everything here runs on the MRML scene alone (inside Slicer, or headless with the
slicer-core wheel), so the tests exercise exactly the code the panel calls. The work is done by the modules this
façade ties together: ``planning`` (prompts -> engine calls, plain numpy), ``edits`` (results -> segments, undo,
rollback), ``compute`` (the engine on the worker thread), ``segments`` (MRML geometry and labelmaps), ``worker``
(jobs and the engine thread), ``catalogue`` (models).

A request goes through three steps:

1. ``prepare`` (caller's thread, normally the main thread): validate the nodes, copy the voxels, convert every
   prompt from world coordinates (parent transforms included) to voxel indices, plan the engine calls. Nothing is
   written; a bad input raises ``SegMoTEError`` with one line.
2. ``compute`` (the one persistent engine thread, see compute.py and worker.py): run the engine on numpy only.
3. ``apply`` (main thread again): write the result into the target segment, only in the region the request covered,
   and push an undo entry. If writing fails half-way, what was written is rolled back.

What an AI edit changes: the target segment on the slices the request ran on (a 2-D prompt: its slice, plus the
slices propagation reached; a 3-D box: the box's slices, inside the box and wherever the result extends). Other
slices of the target segment and all other segments stay bit-identical, unless ``overwriteOtherSegments`` is on;
then the new voxels are removed from the other segments (and restored by undo).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segmote_core.errors import CheckpointError, InputError, SegMoTEError

from . import catalogue, edits, planning
from . import segments as mrml
from .compute import EngineRunner
from .edits import Piece
from .worker import EngineWorker, Job, asSegMoTEError


# ---- plain data passed between the three steps -------------------------------------------------------------------
@dataclass(frozen=True)
class EngineSettings:
    model: str = catalogue.SHIPPED_MODEL
    checkpoint: str | None = None
    device: str = "auto"
    adapter: str | None = None


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
    tasks: list = field(default_factory=list)  # planning.PromptTask
    interaction: object = None  # planning.PromptInteraction: the prompt just placed, for the object's session
    classes: list | None = None
    beforeApply: object = None  # called on the main thread right before the scene is written


# ---- the logic ---------------------------------------------------------------------------------------------------
class SegMoTESlicerLogic:
    """Segment with the SegMoTE engine in a Slicer scene. All public methods are called from the main thread."""

    def __init__(self, engine=None, undoDepth: int = edits.UNDO_DEPTH, tuneAllocator: bool = False):
        """engine: an already built ``segmote_core.engine.Engine`` to use (tests share one); None builds one lazily
        at the first request, from ``model``/``checkpoint``/``device``. tuneAllocator: let the engine tune glibc's
        allocator for the whole process (off by default: inside Slicer it would keep VTK's and ITK's memory)."""
        self.runner = EngineRunner(engine, tuneAllocator)
        self.model = catalogue.SHIPPED_MODEL
        self.checkpoint: str | None = None
        self.device = "auto"
        self.adapterPath: str | None = None
        self.overwriteOtherSegments = False
        # "This slice only": a prompt placed in a view re-does its slice alone, with every prompt on that slice,
        # instead of giving (or correcting) the whole object through the object's session.
        self.sliceOnly = False
        self._sessionEdits: list = []  # (segmentation node ID, segment ID) of each undoable session interaction
        self.intensityMode = "auto"
        self.customWindow: tuple[float, float] | None = None  # (level, width) for "custom"
        self.history = edits.UndoHistory(undoDepth)
        self._worker = EngineWorker()
        self._downloadWorker = EngineWorker()
        if engine is not None:
            self.model, self.device = engine.model_name, engine.device.type
        self._volumeCacheKey = None
        self._volumeCache = None
        self._jobs: list[Job] = []

    # Engine state lives in the runner (worker thread); these read it for the panel and the tests.
    _engine = property(lambda self: self.runner.engine)
    engineDescription = property(lambda self: self.runner.description)
    engineNotice = property(lambda self: self.runner.notice, doc="The engine's latest notice for the user.")
    tuneAllocator = property(lambda self: self.runner.tuneAllocator)

    @property
    def prefetchNeighbours(self) -> bool | None:
        """Embed the neighbours of a prompted slice in the background (None: only on a GPU)."""
        return self.runner.prefetchNeighbours

    @prefetchNeighbours.setter
    def prefetchNeighbours(self, value: bool | None) -> None:
        self.runner.prefetchNeighbours = value

    @property
    def undoDepth(self) -> int:
        return self.history.depth

    @undoDepth.setter
    def undoDepth(self, depth: int) -> None:
        self.history.depth = depth

    # ---- settings ------------------------------------------------------------------------------------------
    def setModel(self, model: str, checkpoint: str | None = None) -> None:
        if model not in catalogue.MODELS:
            raise InputError(f"unknown model '{model}'; choose one of {', '.join(catalogue.MODELS)}")
        self.model, self.checkpoint = model, (str(checkpoint) if checkpoint else None)

    def setDevice(self, device: str) -> None:
        self.device = (device or "auto").lower()

    def setIntensityMode(self, mode: str, window: tuple[float, float] | None = None) -> None:
        """mode: one of catalogue.INTENSITY_MODES; window (level, width) for "custom"."""
        if mode not in catalogue.INTENSITY_MODES:
            raise InputError(f"unknown intensity mode '{mode}'; choose one of {', '.join(catalogue.INTENSITY_MODES)}")
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

    # ---- weights ---------------------------------------------------------------------------------------------
    def startWeightsDownload(self, model: str, onDone=None, onError=None) -> Job:
        """Download a SAM checkpoint (resumable, SHA-256 checked by segmote_core.weights) off the main thread.

        ``job.progress`` is (bytes so far, total bytes), read from the partial file."""
        from segmote_core import weights

        if not catalogue.needsDownload(model):
            raise InputError(f"{model} has no download; choose one of {', '.join(weights.KNOWN_WEIGHTS)}")

        def compute(job: Job):  # Cancel, or closing Slicer (shutdown), stops it between chunks
            return weights.download_weights(model, progress=False, cancel=job.cancelRequested)

        job = Job(f"downloading {model}", compute, lambda path: str(path), onDone=onDone, onError=onError)
        job.progressProvider = lambda: catalogue.downloadProgress(model)
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
        return mrml.sliceNodeByViewName(scene, viewName)

    def resolveAxis(self, volumeNode, axis=None) -> int:
        """The voxel axis (0 I, 1 J, 2 K) to slice along.

        axis: None (closest to superior-inferior), a voxel axis 0/1/2, an anatomical letter ('S', 'R', 'A'...), a
        slice view name ('Red' -> axial, 'Yellow' -> sagittal, 'Green' -> coronal; the view's actual orientation
        is used when the view exists) or a vtkMRMLSliceNode (the voxel axis closest to its normal). Directions are
        taken in world coordinates, so a volume under a rotating transform still slices as the views show it.
        """
        if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool):
            return planning.checkVoxelAxis(axis)
        ijkToWorld = mrml.volumeIjkToWorld(volumeNode)
        if axis is None:
            axis = "S"
        if isinstance(axis, str):
            letter = planning.viewLetter(axis)
            sliceNode = mrml.sliceNodeByViewName(volumeNode.GetScene(), axis.strip()) if letter else None
            if sliceNode is None:
                return planning.voxelAxisAlong(ijkToWorld, planning.letterDirection(letter or axis, given=axis))
            axis = sliceNode
        if not hasattr(axis, "GetSliceToRAS"):
            raise InputError(f"cannot slice along {axis!r}")
        return planning.voxelAxisAlong(ijkToWorld, mrml.sliceNormal(axis))

    @staticmethod
    def sliceViewOfPoint(scene, pointWorld, tolerance: float = 0.5):
        """The slice node whose plane holds a world point (the view a prompt was placed in), or None."""
        return mrml.sliceViewOfPoint(scene, pointWorld, tolerance)

    # ---- public API: prompts -----------------------------------------------------------------------------
    def segmentWithPrompts(self, volumeNode, segmentationNode, segmentId=None, roiNode=None,
                           positivePointsNode=None, negativePointsNode=None, propagate=False, axis=None, *,
                           activePoint=None, boxView=None, overwrite=None, progress=None, cancel=None,
                           timeout=None) -> str:
        """Segment from a box ROI and/or positive and negative points; blocks; returns the segment ID.

        segmentId None creates a new segment. activePoint (markupsNode, controlPointIndex), or the ROI node: the
        prompt just placed, answered by the object's session (what the panel does after each click): a new segment
        or a box starts an object and gives it in 3-D, a click on the segment the session wrote corrects it in 3-D,
        and ``undo`` steps the session back too. With ``sliceOnly`` (or propagate) it is the planned path instead:
        only the prompts on the active prompt's slice are run. Without activePoint every prompted slice is run
        (propagate: followed up and down).
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
        job = Job("AI segmentation", lambda job: self.runner.segment(request, job),
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
        job = Job("automatic segmentation", lambda job: self.runner.auto(request, job),
                  lambda found: self._applyAuto(request, found), progress=progress, cancel=cancel,
                  onDone=onDone, onError=onError)
        return self._start(job)

    # ---- public API: undo ---------------------------------------------------------------------------------------
    def canUndo(self, segmentationNode) -> bool:
        return self.history.steps(segmentationNode) > 0

    def undoSteps(self, segmentationNode) -> int:
        """How many AI edits of this segmentation can be undone."""
        return self.history.steps(segmentationNode)

    def undo(self, segmentationNode) -> bool:
        """Restore the segments as they were before the last AI edit on this segmentation; False if none.

        Raises SegMoTEError (and drops that undo step) if the segment was edited by other tools since, because
        restoring it would silently throw those edits away."""
        steps = self.undoSteps(segmentationNode)
        undone = self.history.undo(segmentationNode)
        if undone and self._sessionEdits and self._sessionEdits[-1][0] == segmentationNode.GetID() \
                and self._sessionEdits[-1][2] == steps:
            _, segmentId, _ = self._sessionEdits.pop()
            self.runner.undoInteraction(segmentationNode, segmentId)  # the object's 3-D state, as before that edit
        return undone

    def clearUndo(self, segmentationNode=None) -> None:
        self.history.clear(segmentationNode)

    def shutdown(self) -> None:
        """Cancel running jobs and let the worker threads end (the panel calls this on cleanup)."""
        for job in self._jobs:
            job.cancel()
        self.runner.stop()
        self._worker.shutdown(wait=False)
        self._downloadWorker.shutdown(wait=False)

    # ======================================================================================================
    # step 1: prepare (main thread, read-only)
    # ======================================================================================================
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

    def _prepareCommon(self, volumeNode, segmentationNode, segmentId, overwrite, axis=None):
        mrml.checkVolume(volumeNode)
        mrml.checkSegmentation(segmentationNode, segmentId)
        grid = mrml.VolumeGrid.fromNodes(volumeNode, segmentationNode)
        mrml.checkGeometry(grid, volumeNode, segmentationNode)
        volume = self._volumeFor(volumeNode)
        return Request(volumeNode, segmentationNode, segmentId or None, volume, grid,
                       self.resolveAxis(volumeNode, axis), self.modelWindow(volumeNode), self.settings(),
                       self.overwriteOtherSegments if overwrite is None else bool(overwrite))

    @staticmethod
    def _pointsIjk(node, label, worldToIjk, shapeIjk, volumeName) -> list[planning.PromptPoint]:
        points = []
        for index, world in mrml.definedPointsWorld(node):
            ijk = mrml.transformPoints(worldToIjk, world)[0]
            if not planning.pointInside(ijk, shapeIjk):
                raise InputError(f"{'positive' if label else 'negative'} point {index + 1} of '{node.GetName()}' "
                                 f"lies outside volume '{volumeName}'; move or delete it")
            points.append(planning.PromptPoint(ijk, label, (node, index)))
        return points

    def _prepareSegment(self, volumeNode, segmentationNode, segmentId, roiNode, positiveNode, negativeNode,
                        propagate, axis, activePoint, overwrite, boxView=None) -> Request:
        mrml.checkVolume(volumeNode)
        if positiveNode is not None and positiveNode is negativeNode:
            raise InputError("positive and negative points must be two different point lists")
        worldToIjk = np.linalg.inv(mrml.volumeIjkToWorld(volumeNode))
        dims = volumeNode.GetImageData().GetDimensions()
        name = volumeNode.GetName()
        points = (self._pointsIjk(positiveNode, 1, worldToIjk, dims, name)
                  + self._pointsIjk(negativeNode, 0, worldToIjk, dims, name))
        corners = mrml.roiCornersWorld(roiNode)
        box = None if corners is None else planning.boxBounds(mrml.transformPoints(worldToIjk, corners), dims)
        if corners is not None and box is None:
            raise InputError(f"box '{roiNode.GetName()}' lies outside volume '{name}'; move it onto the image")
        if not points and box is None:
            raise InputError("no prompt yet: place a positive point (P) or a box (Shift+B) on the image first")
        boxAxis = None
        if box is not None and boxView is not None:
            boxAxis = self.resolveAxis(volumeNode, boxView)
            box = planning.flattenBox(box, boxAxis)  # drawn in that view: a 2-D box on its slice
        if axis is None and box is not None:
            axis = planning.flatAxis(box)  # a flat box was drawn in the view that slices along that axis
        request = self._prepareCommon(volumeNode, segmentationNode, segmentId, overwrite, axis)
        active = None
        if activePoint is not None:
            node, index = activePoint if isinstance(activePoint, tuple) else (activePoint, None)
            active = planning.ACTIVE_BOX if roiNode is not None and node is roiNode else (node, index)
        if active is not None and not self.sliceOnly and not propagate:
            # The prompt just placed: one interaction with the object's session (a click corrects it in 3-D);
            # the object's earlier prompts live in that session, other objects' prompts are never sent.
            if active == planning.ACTIVE_BOX and boxAxis is not None:
                request.axis = boxAxis
            request.interaction = planning.planInteraction(points, box, active)
            return request
        request.tasks = planning.planPrompts(request.axis, points, box, bool(propagate), active, boxAxis)
        return request

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
    # step 3: apply (main thread)
    # ======================================================================================================
    def _applySegment(self, request: Request, pieces: list[Piece]) -> str:
        edits.checkStillValid(request.volumeNode, request.segmentationNode, request.grid, request.segmentId)
        if request.segmentId is None and not any(piece.mask.any() for piece in pieces):
            raise SegMoTEError("the model found nothing at these prompts; draw a box around the object or "
                               "move the point inside it")
        if request.beforeApply is not None:
            request.beforeApply()
        segmentId, edit = edits.writePrompted(request.segmentationNode, request.volumeNode, request.grid,
                                              request.segmentId, pieces, request.overwrite)
        self.history.push(request.segmentationNode, edit)
        if request.interaction is not None:
            self.runner.bindSession(request, segmentId)
            self._sessionEdits.append((request.segmentationNode.GetID(), segmentId,
                                       self.undoSteps(request.segmentationNode)))
        return segmentId

    def _applyAuto(self, request: Request, found) -> list[str]:
        edits.checkStillValid(request.volumeNode, request.segmentationNode, request.grid, None)
        if not found:
            raise SegMoTEError("the adapter found none of its classes in this volume")
        if request.beforeApply is not None:
            request.beforeApply()
        written, edit = edits.writeClasses(request.segmentationNode, request.volumeNode, request.grid, found,
                                           request.overwrite)
        self.history.push(request.segmentationNode, edit)
        return written
