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
        """Run a request's planned tasks; returns the region each one replaces."""
        engine = self.engineFor(request.settings)
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
