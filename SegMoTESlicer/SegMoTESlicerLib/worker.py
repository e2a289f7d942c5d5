"""One persistent worker thread for every engine call, and the Job handle the panel polls.

Torch keeps per-thread state (CUDA streams, autocast, the number of intra-op threads), and the engine's embedding
cache is only useful if the same engine answers every prompt, so all model work runs on one long-lived thread.
MRML is not thread-safe: a job reads the scene on the main thread before it starts (``prepare``), computes on the
worker from plain numpy data (``compute``) and writes the scene back on the main thread (``apply``, run by
``Job.poll`` or ``Job.wait``). Nothing here imports Qt, so it runs headless.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import sys
import threading
import time
from typing import Any, Callable

from segmote_core.errors import Cancelled, SegMoTEError
from segmote_core.toolbox import one_line

ProgressFn = Callable[[int, int], None]
# The panel's timer while a job runs: fire every POLL_INTERVAL_MS, then wait up to POLL_WAIT_S for the job. Inside
# Slicer the engine thread only gets the GIL while the main thread waits, so the wait is most of each cycle; Qt
# still handles the user's events between waits (about 11 times a second).
POLL_INTERVAL_MS = 10
POLL_WAIT_S = 0.08


def asSegMoTEError(error: BaseException, doing: str = "running the model") -> SegMoTEError:
    """Any failure as a SegMoTEError with one line for the panel (the original stays in __cause__)."""
    if isinstance(error, SegMoTEError):
        message = one_line(error)
        return error if message == str(error) else type(error)(message)
    if _isOutOfMemory(error):
        converted = SegMoTEError(
            f"out of GPU memory while {doing}: choose the CPU device or the smaller LiteMedSAM model, "
            "or close other programs that use the GPU")
    else:
        logging.getLogger("SegMoTE").error("unexpected error while %s", doing, exc_info=error)
        converted = SegMoTEError(f"unexpected error while {doing}: {one_line(error, 200, named=True)} "
                                 "(details in the Python console)")
    converted.__cause__ = error
    return converted


def _isOutOfMemory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")  # never imported: the error cannot be torch's (and importing takes seconds)
    cudaOutOfMemory = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if cudaOutOfMemory is not None and isinstance(error, cudaOutOfMemory):
        return True
    if isinstance(error, MemoryError):
        return False  # host memory: reported as unexpected, with its type
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def _releaseAcceleratorMemory() -> None:
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # best effort only
        pass


class EngineWorker:
    """A single persistent daemon thread that runs jobs one after another (created on first use).

    Not a ThreadPoolExecutor: its threads are joined when Python exits, so closing Slicer would wait for a model
    run to finish. A daemon thread is simply dropped at exit."""

    def __init__(self):
        self._queue: queue.SimpleQueue | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args, **kwargs) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._thread is None:
                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._loop, args=(self._queue,), name="SegMoTE-engine",
                                                daemon=True)
                self._thread.start()
            self._queue.put((future, fn, args, kwargs))
        return future

    def _loop(self, work: "queue.SimpleQueue") -> None:
        while True:
            item = work.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as error:  # handed to the polling thread
                future.set_exception(error)
            else:
                future.set_result(result)

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def shutdown(self, wait: bool = False) -> None:
        """Cancel queued work and let the thread end after its current job (which sees its job cancelled)."""
        with self._lock:
            work, thread, self._queue, self._thread = self._queue, self._thread, None, None
        if work is None:
            return
        while True:
            try:
                item = work.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        work.put(None)
        if wait and thread is not threading.current_thread():
            thread.join()


class Job:
    """One request: compute on the worker thread, then apply on the thread that polls.

    The panel calls ``poll()`` from a timer (main thread) and reads ``progress``; scripts and tests call
    ``wait()``. Either way the scene is written only by ``apply`` on the polling thread, and never when the job
    failed or was cancelled.
    """

    def __init__(self, description: str, compute: Callable[["Job"], Any], apply: Callable[[Any], Any],
                 progress: ProgressFn | None = None, cancel: Callable[[], bool] | None = None,
                 onDone: Callable[[Any], None] | None = None, onError: Callable[[SegMoTEError], None] | None = None):
        self.description = description
        self._compute = compute
        self._apply = apply
        self._userProgress = progress
        self._userCancel = cancel
        self.onDone = onDone
        self.onError = onError
        self._cancelEvent = threading.Event()
        self._future: concurrent.futures.Future | None = None
        self._finished = False
        self._progress: tuple[int, int] = (0, 0)
        self.progressProvider: Callable[[], tuple[int, int]] | None = None  # e.g. bytes of a download so far
        self.result: Any = None
        self.error: SegMoTEError | None = None
        self.summary = ""  # one line for the status label, set by compute/apply
        self.lowConfidence = False  # the model's predicted IoU is low: the panel flags the result
        self.startTime = 0.0
        self.elapsed = 0.0

    # ---- control ------------------------------------------------------------------------------------------
    def start(self, worker: EngineWorker) -> "Job":
        self.startTime = time.perf_counter()
        self._future = worker.submit(self._runCompute)
        return self

    def cancel(self) -> None:
        """Ask the computation to stop at its next check; the scene stays as it was."""
        self._cancelEvent.set()

    def cancelRequested(self) -> bool:
        if self._cancelEvent.is_set():
            return True
        if self._userCancel is not None and self._userCancel():
            self._cancelEvent.set()
            return True
        return False

    @property
    def progress(self) -> tuple[int, int]:
        """(done, total) so far; total 0 while unknown."""
        if self.progressProvider is not None:
            try:
                return self.progressProvider()
            except OSError:
                return self._progress
        return self._progress

    def reportProgress(self, done: int, total: int) -> None:
        """Called on the worker thread by the engine."""
        self._progress = (int(done), int(total))
        if self._userProgress is not None:
            self._userProgress(done, total)

    @property
    def running(self) -> bool:
        return not self._finished

    # ---- worker side -------------------------------------------------------------------------------------
    def _runCompute(self):
        if self.cancelRequested():
            raise Cancelled(f"cancelled before {self.description} started; nothing was changed")
        try:
            return self._compute(self)
        except BaseException as error:
            if _isOutOfMemory(error):
                _releaseAcceleratorMemory()
            raise

    # ---- main-thread side -------------------------------------------------------------------------------
    def poll(self, wait: float = 0.0) -> bool:
        """True once the job has finished (result applied or error set); call from the main thread.

        wait: seconds to wait for the computation first. Waiting releases the GIL, which the engine thread needs:
        inside Slicer, PythonQt holds the GIL while Qt's event loop idles, so a poll that returned at once would
        leave the engine thread almost no time to run."""
        if self._finished:
            return True
        if self._future is None:
            return False
        if wait > 0:
            concurrent.futures.wait([self._future], timeout=wait)
        if not self._future.done():
            return False
        self._finish()
        return True

    def wait(self, timeout: float | None = None):
        """Block until done, apply, and return the result or raise the SegMoTEError."""
        if self._future is None:
            raise SegMoTEError(f"{self.description} was never started")
        try:
            self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise SegMoTEError(f"{self.description} did not finish within {timeout:g} s") from None
        except Exception:
            pass  # reported by _finish
        self._finish()
        if self.error is not None:
            raise self.error
        return self.result

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        try:
            payload = self._future.result()
            if self.cancelRequested():
                raise Cancelled(f"{self.description} cancelled; nothing was changed")
            self.result = self._apply(payload)
        except BaseException as error:  # every failure becomes one line; the scene was not written
            self.error = asSegMoTEError(error, self.description)
        self.elapsed = time.perf_counter() - self.startTime
        callback = self.onError if self.error is not None else self.onDone
        if callback is not None:
            callback(self.error if self.error is not None else self.result)
