"""The benchmark harness (benchmarks/bench.py) runs and writes what docs/benchmarks.md promises. Not a timed test:
no speed is checked."""

from __future__ import annotations

import importlib.util
import json
import mmap
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
_spec = importlib.util.spec_from_file_location("bench", BENCH)
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench"] = bench  # dataclasses resolve their module by name
_spec.loader.exec_module(bench)

SCENARIO_ROWS = {"embed_batch1", "embed_batched", "prompt_cached_p50", "prompt_cached_p95", "prompt_click_p50",
                 "prompt_uncached", "prompt_click_adapter_p50",
                 "box3d_first_mask", "box3d", "auto", "startup_help", "startup_weights"}  # ct_box3d, peer_process:
# LiteMedSAM only


def test_bench_tiny_runs_side_by_side_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    threads_before = torch.get_num_threads()
    code = bench.main(["--size", "tiny", "--model", "sam_vit_tiny", "--random-weights", "--device", "cpu",
                 "--threads", "1", "--quiet", "--json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "embed_batch1" in table and "targets:" in table and "ratio" in table

    result = json.loads(out.read_text())
    assert result["schema"] == bench.SCHEMA
    machine = result["machine"]
    for key in ("date", "cpu_model", "cpu_cores", "torch", "torch_threads", "device", "device_name", "load_average"):
        assert key in machine
    assert machine["device"] == "cpu" and machine["torch"] == torch.__version__
    config = result["config"]
    assert config["model"] == "sam_vit_tiny" and config["size"] == "tiny" and config["random_weights"] is True
    assert config["volume_shape_kji"] == list(bench.SIZES["tiny"].shape)
    assert torch.get_num_threads() == threads_before  # --threads is undone after the run
    assert "SamPredictor" in config["peer"]

    rows = {row["name"]: row for row in result["results"]}
    assert set(rows) == SCENARIO_ROWS
    for name, row in rows.items():
        assert row["project"] > 0, name
        if name == "auto":
            assert row["peer"] is None and row["ratio"] is None
            assert row["project_memory"]["peak_rss_mb"] > 0
            assert 0 < row["encoder_s"] <= row["project"]
        elif name.startswith("startup"):
            assert row["peer"] is None  # the peer has no CLI
        else:
            assert row["peer"] > 0, name
            assert row["ratio"] == pytest.approx(row["project"] / row["peer"], rel=1e-2), name
    # both sides ran the same weights on the same slice: their masks agree
    assert rows["prompt_cached_p50"]["agreement_dice"] > 0.9
    assert rows["box3d"]["slices"] == bench.SIZES["tiny"].shape[0]
    assert rows["box3d_first_mask"]["project"] <= rows["box3d"]["project"]
    assert rows["box3d"]["project_memory"]["peak_vram_mb"] is None  # CPU run

    targets = {t["name"]: t for t in result["targets"]}
    assert any("prompt" in name for name in targets)
    assert targets["cpu: peak RAM, automatic on 512x512x300"]["met"] is None  # only judged at --size full
    # the test-only model does not stay in the public registry
    from segmote_core.models import BACKBONES

    assert "sam_vit_tiny" not in BACKBONES


def test_gpu_targets_are_judged_from_the_rows_of_a_full_size_run():
    rows = [{"name": "prompt_cached_p50", "project": 4.0},
            {"name": "embed_batched", "project": 6.0, "vs_peer_loop": 0.08, "project_memory": {"peak_vram_mb": 5000.0}},
            {"name": "auto", "project": 2.5, "project_memory": {"peak_rss_mb": 3000.0, "peak_vram_mb": 7000.0}}]
    targets = {t["name"]: t for t in bench.evaluate_targets(rows, "full", torch.device("cuda"), "sam_vit_b")}
    met = {name.removeprefix("cuda: "): t["met"] for name, t in targets.items()}
    assert met == {"prompt -> mask p50, cached embedding": True,
                   "ViT-B embedding per slice, batched": False,  # 6 ms > 5 ms
                   "ViT-B batched embedding vs the SamPredictor loop": True,
                   "automatic segmentation of 300 slices (sam_vit_b)": True,
                   "peak VRAM (engine, any scenario)": False}  # 7000 MiB > 6 GiB
    assert targets["cuda: peak VRAM (engine, any scenario)"]["value"] == 7000.0
    lite = {t["name"]: t for t in bench.evaluate_targets(rows, "small", torch.device("cuda"), "lite_medsam")}
    assert lite["cuda: automatic segmentation of 300 slices (lite_medsam)"]["met"] is None  # small size: not judged


@pytest.mark.parametrize("args, message", [(["--model", "sam_vit_x", "--size", "tiny"], "unknown model 'sam_vit_x'"),
                                           (["--device", "gpu"], "unknown device")])
def test_bad_arguments_are_a_one_line_error(args, message, capsys):
    assert bench.main([*args, "--quiet"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_the_installed_package_has_no_bench_command():
    """The benchmark wraps the peers' code and registers a test backbone: it lives in benchmarks/, not in segmote."""
    import segmote_core
    from segmote_core.cli import LAZY_COMMANDS

    assert "bench" not in LAZY_COMMANDS and not (Path(segmote_core.__file__).parent / "bench.py").exists()


def test_bench_without_weights_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEGMOTE_CACHE_DIR", str(tmp_path))  # no cached SAM weights here
    assert bench.main(["--model", "sam_vit_b", "--size", "tiny", "--device", "cpu", "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--random-weights" in err and len(err.splitlines()) == 1


def test_synthetic_ct_and_boxes_fit_the_volume():
    volume = bench.synthetic_ct((5, 40, 48))
    assert volume.array.shape == (5, 40, 48) and volume.array.dtype == np.int16
    assert volume.array.min() < -900 and volume.array.max() > 100  # CT-like: air and a bright organ
    box = np.reshape(bench.organ_box_ijk(volume.array.shape), (2, 3))
    assert volume.contains_ijk(box).all()
    boxes = bench.random_boxes((40, 48), 7)
    assert boxes.shape == (7, 4) and (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


def test_peak_memory_probe_counts_a_block_freed_inside_it():
    before = bench.current_rss_mb()
    with bench.Probe(torch.device("cpu")) as probe:
        # 128 MiB of fresh pages, every one written (an array could reuse pages the allocator already holds)
        block = mmap.mmap(-1, 128 * 2**20)
        np.frombuffer(block, np.uint8)[:] = 1
        block.close()
        time.sleep(0.05)
    assert before is not None and probe.peak_rss_mb >= before + 100  # the peak, not what is left at the end
    assert bench.current_rss_mb() < probe.peak_rss_mb - 50
    assert probe.seconds >= 0.05 and probe.peak_vram_mb is None
