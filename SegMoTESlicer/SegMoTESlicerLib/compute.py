"""Step 2 of a request: the engine, run on the worker thread on numpy data only (no MRML, no scene access).

The engine is built lazily for the chosen model, checkpoint and device, and rebuilt only when one of them changes;
an adapter is loaded or unloaded when the choice changes. Importing this module does not import torch.
"""

from __future__ import annotations

import time

import numpy as np

from segmote_core.errors import Cancelled, CheckpointError

from . import catalogue, edits


class EngineRunner:
    """Owns the engine; touched only on the worker thread once jobs run."""

    def __init__(self, engine=None, tuneAllocator: bool = False):
        """engine: an already built ``segmote_core.engine.Engine`` (tests share one); tuneAllocator: let the engine
        tune glibc's allocator for the whole process (off in Slicer: it would keep VTK's and ITK's memory)."""
        self.engine = engine
        self.tuneAllocator = tuneAllocator
        self.key = None if engine is None else (engine.model_name, None, engine.device.type)
        self.adapter = None
        self.description = ""
        # The object being prompted: its session (segmote_core.session) and what it belongs to (the volume's
        # content, the slicing, the engine settings, the segmentation node and segment). Touched on the worker
        # thread while a job runs, and by ``undoInteraction`` on the main thread when none does.
        self.session = None
        self.sessionKey = None
        # Embed the slices around a prompted one in the background, so the next slice answers at once. None: only
        # where the encoder does not share the prompt's cores (a GPU); on a 2-core CPU it doubles prompt latency.
        self.prefetchNeighbours: bool | None = None

    @property
    def notice(self) -> str:
        """The engine's latest notice for the user (e.g. it moved to the CPU after running out of GPU memory)."""
        notices = getattr(self.engine, "notices", None)
        return notices[-1] if notices else ""

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop_prefetch(wait=False)

    def engineFor(self, settings):
        key = (settings.model, settings.checkpoint, settings.device)
        if self.engine is None or self.key != key:
            self.engine = None  # free the old model's memory before loading the new one
            if not settings.checkpoint and not catalogue.weightsAvailable(settings.model):
                raise CheckpointError(f"{catalogue.MODELS.get(settings.model, settings.model)}: weights not "
                                      "downloaded yet; press Download or choose a checkpoint file")
            from segmote_core.engine import Engine

            self.engine = Engine(settings.model, checkpoint=settings.checkpoint, device=settings.device,
                                 tune_allocator=self.tuneAllocator)
            self.key, self.adapter = key, None
        engine = self.engine
        if settings.adapter != self.adapter:
            if settings.adapter:
                engine.load_adapter(settings.adapter)
            else:
                engine.unload_adapter()
            self.adapter = settings.adapter
        self.description = f"{engine.model_name} on {engine.device}"
        return engine

    def segment(self, request, job) -> list[edits.Piece]:
        """Run a request's planned tasks, or its one interaction with the object's session; returns the region each
        one replaces."""
        engine = self.engineFor(request.settings)
        if request.interaction is not None:
            return [self._interact(engine, request, job)]
        start = time.perf_counter()
        pieces, slices, update, session = [], 0, None, None
        for task in request.tasks:
            # Each task is one object's prompt, answered by a session as on the command line; one session serves
            # them all (opening one resolves the normalisation, which reads every voxel).
            session = session or engine.open(request.volume, request.axis, window=request.window)
            session.reset()
            session.progress, session.cancel = job.reportProgress, job.cancelRequested
            args = task.engineArgs
            update = session.prompt(args.get("box_ijk"), args.get("points_ijk"), args.get("point_labels"),
                                    slice_only=not args.get("propagate", False) and task.kind == "2d")
            if job.cancelRequested():
                raise Cancelled("AI segmentation cancelled; nothing was changed")
            piece = edits.pieceOf(task, update.mask, request.axis)
            slices += piece.extent[2 * request.axis + 1] - piece.extent[2 * request.axis] + 1
            pieces.append(piece)
        prefetch = self.prefetchNeighbours
        if prefetch is None:
            prefetch = engine.device.type != "cpu"
        if prefetch and session is not None and request.tasks[-1].kind == "2d":
            voxel = np.zeros((1, 3))
            voxel[0, request.axis] = request.tasks[-1].slice
            engine.prefetch(session.view, int(round(session.stack.ijk_to_stack(voxel)[0, 0])))
        result = update
        job.summary = (f"{slices} slice(s) in {time.perf_counter() - start:.2f} s ({self.description}); "
                       f"{result.confidence_text}; intensities: {result.normalization.description}")
        job.lowConfidence = bool(result.low_confidence)
        return pieces

    def _objectKey(self, request, segmentId) -> tuple:
        return (id(request.volume), request.window, request.settings, request.segmentationNode.GetID(), segmentId)

    def _interact(self, engine, request, job) -> edits.Piece:
        """The prompt just placed, answered by the object's session: a new segment or a box starts a new object;
        a click on the same segment corrects it in 3-D. The piece covers every slice the object changed on."""
        start = time.perf_counter()
        interaction = request.interaction
        key = self._objectKey(request, request.segmentId)
        previous = None
        if self.session is None or request.segmentId is None or key != self.sessionKey:
            self.session = engine.open(request.volume, request.axis, window=request.window)
            self.sessionKey = None  # bound to the segment once the result is written (bindSession)
        elif interaction.kind == "box":
            previous = self.session.mask  # a new box replaces the object: its old slices are rewritten too
            self.session.reset()
        session = self.session
        session.progress, session.cancel = job.reportProgress, job.cancelRequested
        try:
            if interaction.kind == "box":
                update = session.add_box(np.concatenate([interaction.low, interaction.high]))
            else:
                update = session.add_point(interaction.ijk, positive=bool(interaction.label))
        finally:  # the session outlives the job; holding it would keep the job's scene nodes alive
            session.progress = session.cancel = None
        if job.cancelRequested():
            session.undo()
            raise Cancelled("AI segmentation cancelled; nothing was changed")
        extent = _slabExtent(update, session.stack, previous)
        mask = update.mask
        full = (0, mask.shape[2] - 1, 0, mask.shape[1] - 1, 0, mask.shape[0] - 1)
        from . import segments as mrml

        piece = edits.Piece(extent, mask[mrml.extentSlices(extent, full)].copy())
        first, last = extent[2 * session.axis], extent[2 * session.axis + 1]
        job.summary = (f"{last - first + 1} slice(s) in {time.perf_counter() - start:.2f} s ({self.description}); "
                       f"{update.confidence_text}; intensities: {update.normalization.description}")
        job.lowConfidence = bool(update.low_confidence)
        return piece

    def bindSession(self, request, segmentId) -> None:
        """After an interaction's result was written into `segmentId`: that segment's next clicks correct this
        session's object."""
        if request.interaction is not None and self.session is not None:
            self.sessionKey = self._objectKey(request, segmentId)

    def undoInteraction(self, segmentationNode, segmentId) -> bool:
        """Step the object's session back with the segment's undo (main thread, no job running)."""
        if self.session is None or self.sessionKey is None or not self.session.can_undo():
            return False
        if self.sessionKey[3:] != (segmentationNode.GetID(), segmentId):
            return False
        self.session.undo()
        return True

    def auto(self, request, job) -> list:
        """One segment per adapter class; returns those found (non-empty)."""
        engine = self.engineFor(request.settings)
        start = time.perf_counter()
        found = engine.auto(request.volume, classes=request.classes, axis=request.axis, window=request.window,
                            progress=job.reportProgress, cancel=job.cancelRequested)
        if job.cancelRequested():
            raise Cancelled("automatic segmentation cancelled; nothing was changed")
        present = [s for s in found if s.mask.any()]
        missing = [s.name for s in found if not s.mask.any()]
        job.summary = (f"{len(present)} of {len(found)} classes found in {time.perf_counter() - start:.1f} s"
                       + (f"; not found: {', '.join(missing)}" if missing else ""))
        return present


def _slabExtent(update, stack, previous=None) -> tuple:
    """IJK extent (i0, i1, j0, j1, k0, k1) of the slices an update changed (with `previous`: also every slice that
    object had), across the whole slice plane."""
    shapeIjk = update.mask.shape[::-1]
    first, last = update.changed or (0, 0)
    if previous is not None and previous.any():
        had = np.flatnonzero(stack.to_stack(previous).any(axis=(1, 2)))
        first, last = min(first, int(had[0])), max(last, int(had[-1]))
    ends = stack.stack_to_ijk(np.array([[first, 0, 0], [last, 0, 0]], float))[:, stack.voxel_axis]
    extent = [0, shapeIjk[0] - 1, 0, shapeIjk[1] - 1, 0, shapeIjk[2] - 1]
    extent[2 * stack.voxel_axis], extent[2 * stack.voxel_axis + 1] = int(ends.min()), int(ends.max())
    return tuple(extent)
