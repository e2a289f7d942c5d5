"""The module as a guest in Slicer's process: downloads that cancel and never hold up Slicer's exit, dependency
installs that show pip's output and can be stopped, a clear line on a Slicer that is too old, and no process-wide
allocator tuning."""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

MODULE = Path(__file__).resolve().parents[1] / "SegMoTESlicer"
sys.path.insert(0, str(MODULE))

from SegMoTESlicerLib import dependencies  # noqa: E402
from segmote_core.errors import Cancelled, SegMoTEError  # noqa: E402

PAYLOAD = os.urandom(3 * 1024 * 1024)
PIECE = 64 * 1024


class SlowHandler(BaseHTTPRequestHandler):
    """Sends a checkpoint in 64 KiB pieces, 20 ms apart: a slow mirror (about 3 MB/s)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        try:
            for start in range(0, len(PAYLOAD), PIECE):
                self.wfile.write(PAYLOAD[start:start + PIECE])
                self.wfile.flush()
                time.sleep(0.02)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def slow_mirror(monkeypatch, tmp_path):
    from segmote_core import weights

    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("SEGMOTE_CACHE_DIR", str(tmp_path))
    info = weights.WeightsInfo("sam_vit_b", f"http://127.0.0.1:{server.server_port}/vit_b.pth", "vit_b_test.pth",
                               hashlib.sha256(PAYLOAD).hexdigest(), len(PAYLOAD))
    monkeypatch.setitem(weights.KNOWN_WEIGHTS, "sam_vit_b", info)
    yield weights.cache_dir() / info.filename
    server.shutdown()
    server.server_close()


def test_closing_slicer_cancels_a_download_at_once_and_keeps_the_part(slow_mirror):
    from SegMoTESlicerLib.logic import SegMoTESlicerLogic

    logic = SegMoTESlicerLogic()
    job = logic.startWeightsDownload("sam_vit_b")
    part = slow_mirror.with_name(slow_mirror.name + ".part")
    deadline = time.monotonic() + 20
    while not (part.is_file() and part.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert part.is_file(), "the download never started"
    done, total = job.progress  # what the panel's Download button shows, read from the partial file
    assert total == len(PAYLOAD) and 0 < done < total
    started = time.monotonic()
    logic.shutdown()  # what the panel's cleanup does when Slicer closes
    with pytest.raises(Cancelled):
        job.wait(timeout=5)
    assert time.monotonic() - started < 2.0, "shutdown waited for the download"
    assert not slow_mirror.exists() and 0 < part.stat().st_size < len(PAYLOAD)


def test_a_download_can_be_cancelled_and_then_resumed(slow_mirror):
    from SegMoTESlicerLib.logic import SegMoTESlicerLogic

    logic = SegMoTESlicerLogic()
    try:
        job = logic.startWeightsDownload("sam_vit_b")
        time.sleep(0.3)
        job.cancel()
        with pytest.raises(Cancelled):
            job.wait(timeout=5)
        assert not slow_mirror.exists()
        job = logic.startWeightsDownload("sam_vit_b")
        path = job.wait(timeout=60)
        assert Path(path).read_bytes() == PAYLOAD and job.progress == (len(PAYLOAD), len(PAYLOAD))
    finally:
        logic.shutdown()


def test_an_old_slicer_gets_one_line_and_no_install(monkeypatch):
    line = dependencies.unsupportedSlicer((3, 9))
    assert "Slicer 5.10" in line and "3.9" in line and "\n" not in line
    assert dependencies.unsupportedSlicer((3, 12)) == ""
    monkeypatch.setattr(dependencies, "unsupportedSlicer", lambda: "SegMoTE needs 3D Slicer 5.10 or later")
    monkeypatch.setattr(dependencies, "_installPackages", lambda *a, **k: pytest.fail("pip ran on an old Slicer"))
    with pytest.raises(SegMoTEError, match="5.10"):
        dependencies.ensureDependencies(confirm=lambda packages: pytest.fail("asked to install on an old Slicer"))


def fake_python(tmp_path, script: str) -> str:
    """An executable that stands in for PythonSlicer: records its arguments, then runs `script`."""
    path = tmp_path / "PythonSlicer"
    path.write_text(f'#!/bin/sh\necho "$@" > "{tmp_path}/args"\n{script}\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_pip_output_reaches_the_panel_and_bundled_packages_stay_pinned(monkeypatch, tmp_path):
    monkeypatch.setattr(dependencies, "_pythonExecutable", lambda: fake_python(
        tmp_path, 'cp "$6" "%s/constraints"; echo "Collecting segment-anything"; echo "Successfully installed"'
        % tmp_path))
    shown = []
    dependencies._installPackages(["segment-anything>=1.0"], progress=shown.append)
    assert shown == ["Installing: Collecting segment-anything", "Installing: Successfully installed"]
    args = (tmp_path / "args").read_text().split()
    assert args[:3] == ["-m", "pip", "install"] and args[-1] == "segment-anything>=1.0"
    pins = (tmp_path / "constraints").read_text().split()
    assert "numpy==" + __import__("importlib.metadata").metadata.version("numpy") in pins
    assert any(pin.startswith("torch==") for pin in pins)


def test_pip_failure_is_one_line_and_cancel_stops_pip(monkeypatch, tmp_path):
    monkeypatch.setattr(dependencies, "_pythonExecutable", lambda: fake_python(
        tmp_path, 'echo "Collecting nothing"; echo "ERROR: No matching distribution found for nothing"; exit 1'))
    with pytest.raises(SegMoTEError) as raised:
        dependencies._installPackages(["nothing"])
    assert "No matching distribution" in str(raised.value) and "\n" not in str(raised.value)

    marker = tmp_path / "finished"
    monkeypatch.setattr(dependencies, "_pythonExecutable", lambda: fake_python(
        tmp_path, f'for i in 1 2 3 4 5 6 7 8 9 10; do echo "Downloading part $i"; sleep 0.2; done; touch "{marker}"'))
    seen = []
    started = time.monotonic()
    with pytest.raises(Cancelled):
        dependencies._installPackages(["slow-package"], progress=seen.append, cancelled=lambda: len(seen) >= 2)
    assert time.monotonic() - started < 1.5 and not marker.exists(), "pip was not stopped"


def test_the_slicer_logic_leaves_the_process_allocator_alone(lite_engine):
    import inspect

    from SegMoTESlicerLib.logic import SegMoTESlicerLogic

    assert SegMoTESlicerLogic().tuneAllocator is False
    from segmote_core.engine import Engine

    assert inspect.signature(Engine).parameters["tune_allocator"].default is True  # the CLI keeps its speed-up


def test_closing_slicer_does_not_wait_for_a_running_model_call():
    """Python joins non-daemon threads at exit: a model call still running must not hold up Slicer's exit."""
    import subprocess

    code = ("import sys, time; sys.path.insert(0, %r)\n"
            "from SegMoTESlicerLib.worker import EngineWorker\n"
            "worker = EngineWorker()\n"
            "worker.submit(time.sleep, 60)\n"
            "time.sleep(0.2)\n"
            "print('leaving')\n" % str(MODULE))
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("the process waited for the 60 s model call before exiting")
    assert result.returncode == 0 and "leaving" in result.stdout, result.stderr


def test_cancel_stops_a_silent_pip_and_the_panel_gets_idle_calls(monkeypatch, tmp_path):
    """pip often prints nothing for a long time (resolving, downloading): Cancel must still act."""
    marker = tmp_path / "finished"
    monkeypatch.setattr(dependencies, "_pythonExecutable", lambda: fake_python(
        tmp_path, f'echo "Collecting quiet-package"; sleep 20; touch "{marker}"'))
    idle = []
    started = time.monotonic()
    with pytest.raises(Cancelled):
        dependencies._installPackages(["quiet-package"], idle=lambda: idle.append(time.monotonic()),
                                      cancelled=lambda: len(idle) >= 5)
    assert time.monotonic() - started < 5 and not marker.exists(), "a silent pip could not be cancelled"


def test_pip_runs_with_its_console_hidden_on_windows(monkeypatch):
    import subprocess

    class StartupInfo:
        dwFlags = 0
        wShowWindow = 1

    launched = []
    monkeypatch.setattr(dependencies, "_windows", lambda: True)
    monkeypatch.setattr(subprocess, "STARTUPINFO", StartupInfo, raising=False)
    monkeypatch.setattr(subprocess, "STARTF_USESHOWWINDOW", 1, raising=False)
    monkeypatch.setattr(subprocess, "Popen", lambda command, **options: launched.append(options) or "process")
    assert dependencies._launch(["pip"]) == "process"
    info = launched[0]["startupinfo"]
    assert info.dwFlags & 1 and info.wShowWindow == 0  # STARTF_USESHOWWINDOW with SW_HIDE


def test_a_failed_pytorch_install_is_one_line_for_the_panel(monkeypatch):
    import subprocess
    import types

    for failure in (subprocess.CalledProcessError(1, ["pip", "install", "torch"]), ImportError("no module torch")):
        fake_utils = types.ModuleType("PyTorchUtils")

        class FailingTorchLogic:
            def installTorch(self, failure=failure, **kwargs):
                raise failure

        fake_utils.PyTorchUtilsLogic = FailingTorchLogic
        monkeypatch.setitem(sys.modules, "PyTorchUtils", fake_utils)
        monkeypatch.setattr(dependencies, "torchMissing", lambda: True)
        monkeypatch.setattr(dependencies, "missingPackages", lambda: [])
        shown = []
        with pytest.raises(SegMoTEError) as raised:
            dependencies.ensureDependencies(progress=shown.append)
        assert "installing PyTorch failed" in str(raised.value) and "\n" not in str(raised.value)
        assert any("PyTorch" in line for line in shown)  # said before the blocking install started
        assert not dependencies.installing()


def test_a_second_install_cannot_start_while_one_runs(monkeypatch):
    """The panel handles events during an install, so a second click on a place button can arrive."""
    monkeypatch.setattr(dependencies, "torchMissing", lambda: False)
    state = {"missing": ["segment-anything>=1.0"], "runs": 0, "nested": None}
    monkeypatch.setattr(dependencies, "missingPackages", lambda: state["missing"])

    def install(requirements, progress=None, cancelled=None, idle=None):
        state["runs"] += 1
        try:
            dependencies.ensureDependencies()  # what a click delivered during the install would call
        except SegMoTEError as error:
            state["nested"] = str(error)
        state["missing"] = []

    monkeypatch.setattr(dependencies, "_installPackages", install)
    assert dependencies.ensureDependencies() is True
    assert state["runs"] == 1 and "being installed" in state["nested"]
