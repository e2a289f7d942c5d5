"""Nothing is sent: `segment`, `auto`, `train` and `demo` contact no address but the loopback one.

The commands run in fresh processes (telemetry starts when a dependency is first imported) whose socket layer
records every name lookup and connection before refusing those that leave the machine; the fork of a dependency's
sender process inherits the hooks. `segment`, `auto` and `demo` run one after another in one process, as a script
calling the CLI would: whatever any of them imports first, or sends, is seen; `train` runs beside them. The crops
are tiny so the commands take seconds; the CPU runtime is OpenVINO, the one whose import used to post a usage event
to www.google-analytics.com.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from conftest import chest_ct_slab

pytestmark = pytest.mark.slow  # LiteMedSAM or real scans throughout: `make test` only (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent('''
    import ipaddress, json, os, socket, sys

    LOG = os.environ["NET_LOG"]

    def loopback(host) -> bool:
        if isinstance(host, bytes):
            host = host.decode()
        if host in (None, "", "localhost"):
            return True
        try:
            return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
        except ValueError:
            return False

    def note(call, host):
        with open(LOG, "a") as log:
            log.write(json.dumps({"call": call, "host": str(host), "pid": os.getpid()}) + "\\n")
        if not loopback(host):
            raise OSError(f"test: {call} to {host} refused")

    real_getaddrinfo, real_connect, real_connect_ex, real_sendto = (
        socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto)

    def getaddrinfo(host, *args, **kwargs):
        note("getaddrinfo", host)
        return real_getaddrinfo(host, *args, **kwargs)

    def address(addr):
        return addr[0] if isinstance(addr, tuple) else None  # AF_UNIX paths are local

    def connect(self, addr):
        note("connect", address(addr))
        return real_connect(self, addr)

    def connect_ex(self, addr):
        note("connect", address(addr))
        return real_connect_ex(self, addr)

    def sendto(self, data, *args):
        note("sendto", address(args[-1]))
        return real_sendto(self, data, *args)

    socket.getaddrinfo, socket.socket.connect = getaddrinfo, connect
    socket.socket.connect_ex, socket.socket.sendto = connect_ex, sendto

    if sys.argv[1] == "selftest":  # proves the hooks see what a dependency would do
        try:
            socket.create_connection(("192.0.2.1", 9), timeout=0.1)
        except OSError:
            pass
        sys.exit(0)

    import segmote_core.demo
    # The demo on the crop of its CT, its prompted part only (the adapter part is `auto`'s code, probed beside it).
    segmote_core.demo.demo_data = lambda: (os.environ["DEMO_CT"], os.environ["DEMO_SEG"])
    segmote_core.demo.SHIPPED_ADAPTER = segmote_core.demo.SHIPPED_ADAPTER.with_name("absent.safetensors")
    from segmote_core.cli import main
    for command in json.loads(sys.argv[1]):  # one after another; the first that fails ends the run
        code = main(command)
        if code:
            sys.exit(code)
''')


def run_probed(tmp_path: Path, commands: dict[str, list[list[str]] | str], threads: dict[str, int],
               **env) -> dict[str, list[dict]]:
    """Run each named list of commands (CLI arguments; "selftest": the hooks' own check) in its own probed process,
    the commands of a list one after another, the processes all at once (they read the same copied graphs and write
    only their own files), each with threads[name] threads (default one); return the calls each made, by name."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    (tmp_path / "home").mkdir(exist_ok=True)
    running = {}
    for name, args in commands.items():
        environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path / "home"),
                       "PYTHONPATH": str(ROOT), "NET_LOG": str(tmp_path / f"{name}.log"),
                       "SEGMOTE_CACHE_DIR": str(tmp_path / "cache"), "SEGMOTE_RUNTIME": "openvino",
                       "OMP_NUM_THREADS": str(threads.get(name, 1)), **env}
        with open(tmp_path / f"{name}.out", "w") as out, open(tmp_path / f"{name}.err", "w") as err:
            argument = args if isinstance(args, str) else json.dumps(args)
            running[name] = subprocess.Popen([sys.executable, str(probe), argument], stdout=out, stderr=err,
                                             env=environment, cwd=tmp_path)
    for name, process in running.items():
        assert process.wait(timeout=600) == 0, (name, (tmp_path / f"{name}.err").read_text()[-2000:])
    time.sleep(0.5)  # a forked sender outlives its parent by a moment
    logs = {name: tmp_path / f"{name}.log" for name in commands}
    return {name: [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
            for name, log in logs.items()}


def outside(calls: list[dict]) -> list[dict]:
    return [c for c in calls if c["host"] not in ("None", "", "localhost")
            and not c["host"].startswith(("127.", "::1"))]


def test_no_command_contacts_any_address_but_loopback(tmp_path, chest_ct, chest_truth, exported_graphs):
    from segmote_core.segmentation_io import Segment, save_segments

    # The graphs the session exported, as a user's cache holds them after the first run (exporting is torch's
    # own code; what is probed is running the commands).
    shutil.copytree(exported_graphs, tmp_path / "cache" / "exported")

    # Three axial slices of the chest CT through both lungs, and the ground truth cropped to them.
    k0, k1 = 15, 18
    crop = chest_ct_slab(chest_ct, k0, k1)
    crop_ct = tmp_path / "crop.nrrd"
    sitk.WriteImage(crop.to_sitk(), str(crop_ct))
    crop_seg = tmp_path / "crop_truth.seg.nrrd"
    save_segments(crop_seg, crop, [Segment(name, mask[k0:k1]) for name, mask in chest_truth.items()
                                   if name.endswith("lung")])
    labels = np.zeros(crop.array.shape, np.uint8)
    labels[:, 40:60, 40:70] = 1
    sitk.WriteImage(crop.to_sitk(labels), str(tmp_path / "labels.nrrd"))
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(dict(
        image=str(crop_ct), segmentation=str(tmp_path / "labels.nrrd"), split="slice", holdout_every=3,
        window=[-500, 1500], backbone="sam_vit_tiny", steps=1, batch_size=1, warmup_steps=0, interaction_steps=0,
        out=str(tmp_path / "run"), cache_dir=str(tmp_path / "store"), save_every=1, eval_every=0,
        final_report=False, threads=1, model={"expert_rank": 8, "ppt_mlp_dim": 64, "early_hidden_channels": 16})))

    box = ["30", "30", "1", "60", "90", "1"]
    calls = run_probed(tmp_path, {
        "selftest": "selftest",
        "segment-auto-demo": [
            ["-q", "segment", str(crop_ct), "--out", "s.seg.nrrd", "--box-ijk", *box, "--device", "cpu"],
            ["-q", "auto", str(crop_ct), "--out", "a.seg.nrrd", "--adapter", "chest_ct_lungs", "--device", "cpu"],
            ["-q", "demo", "--out-dir", "demo", "--device", "cpu"]],
        "train": [["train", "--config", str(config), "--quiet"]],
    }, threads={"segment-auto-demo": 2},  # the longest of the three
        DEMO_CT=str(crop_ct), DEMO_SEG=str(crop_seg))
    # The hooks work: a connection to a documentation address is seen (and refused).
    assert [c["host"] for c in outside(calls.pop("selftest"))] == ["192.0.2.1"]

    assert (tmp_path / "s.seg.nrrd").is_file() and (tmp_path / "a.seg.nrrd").is_file()
    assert (tmp_path / "demo" / "demo.seg.nrrd").is_file() and (tmp_path / "run" / "adapter.safetensors").is_file()
    assert not (tmp_path / "demo" / "demo-auto.seg.nrrd").exists()  # the demo ran on the crop, its prompts only
    for process, made in calls.items():
        assert outside(made) == [], f"{process} contacted {outside(made)}"
    # Quiet commands print nothing, in a fresh process, where a dependency would warn on import (a run without -q:
    # tests/test_cli_conventions.py).
    assert [(tmp_path / f"segment-auto-demo.{stream}").read_text() for stream in ("out", "err")] == ["", ""]
    # Nothing was written for a telemetry client either (its id file lives in the home folder).
    assert not (tmp_path / "home" / "intel").exists()
