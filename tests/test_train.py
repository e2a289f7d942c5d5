"""Training end to end on a tiny synthetic volume with a random tiny SAM ViT (CPU, seconds per run).

Loss falls; --resume reproduces an uninterrupted run's losses exactly; two-process gloo DDP runs under torchrun;
a NaN loss stops with its step number and leaves the last good checkpoint; unknown config keys are refused; the
embedding store detects corrupted entries and recomputes them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml

from conftest import all_torch_threads
from segmote_core import train as train_command
from segmote_core.adapters import load_segmote, read_adapter_header
from segmote_core.embedding_store import EmbeddingStore
from segmote_core.engine import Engine, Prepared
from segmote_core.errors import InputError, TrainingError
from segmote_core.models.backbones import build_tiny_sam_vit
from segmote_core.normalize import window
from segmote_core.training import data as training_data
from segmote_core.training import load_config, loop, make_config, prompts, train
from segmote_core.volume import SliceStack, Volume

TINY_MODEL = {"expert_rank": 8, "ppt_mlp_dim": 64, "early_hidden_channels": 16}


pytestmark = pytest.mark.usefixtures("single_torch_thread")  # conftest: tiny models run faster on one thread


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """An 8-slice 32x32 'CT' with a bright disc (label 1, every slice) and a grey square (label 2, slices 2-7)."""
    folder = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    image = np.full((8, 32, 32), -1000.0)
    labels = np.zeros((8, 32, 32), np.uint8)
    yy, xx = np.mgrid[:32, :32]
    for k in range(8):
        radius = 4 + k % 3
        disc = (yy - 12) ** 2 + (xx - 10) ** 2 <= radius**2
        image[k][disc], labels[k][disc] = 200, 1
        if k >= 2:
            square = (yy >= 18) & (yy < 26) & (xx >= 18) & (xx < 27)
            image[k][square], labels[k][square] = -300, 2
    image += rng.normal(0, 20, image.shape)
    scan = sitk.GetImageFromArray(image.astype(np.int16))
    scan.SetSpacing((1.5, 1.5, 3.0))
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(scan)
    sitk.WriteImage(scan, str(folder / "scan.nrrd"))
    sitk.WriteImage(label_image, str(folder / "labels.nrrd"))
    (folder / "cache").mkdir()
    return folder


def tiny_values(data: Path, out: Path, **overrides) -> dict:
    values = dict(
        image=str(data / "scan.nrrd"), segmentation=str(data / "labels.nrrd"), split="slice", holdout_every=4,
        window=[-500, 1500], backbone="sam_vit_tiny", model=TINY_MODEL, steps=4, batch_size=2, lr=1e-3,
        warmup_steps=1, interaction_steps=1, out=str(out), cache_dir=str(data / "cache"), save_every=2,
        eval_every=0, final_report=False, threads=1,
    )
    values.update(overrides)
    return values


def tiny_config(data: Path, out: Path, **overrides):
    return make_config(tiny_values(data, out, **overrides))


# ---- config ------------------------------------------------------------------------------------------
def test_unknown_or_mistyped_config_keys_are_refused(tmp_path, tiny_data):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**tiny_values(tiny_data, tmp_path), "stepz": 3}))
    with pytest.raises(InputError) as error:
        load_config(path)
    message = str(error.value)
    assert "\n" not in message and "'stepz'" in message and "bad.yaml" in message
    with pytest.raises(InputError, match="steps must be an integer"):
        make_config(tiny_values(tiny_data, tmp_path, steps="many"))
    with pytest.raises(InputError, match="unknown fields"):
        make_config(tiny_values(tiny_data, tmp_path, model={"experts": 4}))
    with pytest.raises(InputError, match="split must be one of"):
        make_config(tiny_values(tiny_data, tmp_path, split="random"))
    # Flags override the file and go through the same checks.
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(tiny_values(tiny_data, tmp_path)))
    assert load_config(good, {"steps": 7, "lr": 3}).steps == 7
    with pytest.raises(InputError):
        load_config(good, {"unknown_flag": 1})
    # The CLI reports it in one line and a non-zero exit.
    assert train_command.main(["--config", str(path), "--quiet"]) == 1


def test_a_missing_data_folder_is_reported_before_any_model_loads(tmp_path, tiny_data, monkeypatch, capsys):
    def no_model(*args):
        raise AssertionError("the backbone was loaded before the data was found")

    monkeypatch.setattr(loop, "build_backbone", no_model)
    config = tmp_path / "train.yaml"
    values = tiny_values(tiny_data, tmp_path / "run", image=None, segmentation=None)
    values["data"] = str(tmp_path / "no_such_folder")
    config.write_text(yaml.safe_dump(values))
    assert train_command.main(["--config", str(config), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no_such_folder" in err and "\n" not in err


# ---- training ----------------------------------------------------------------------------------------
def test_loss_falls_and_checkpoints_are_complete(tmp_path, tiny_data):
    # One class, box prompts (through MoTE: boxes_to_base off), the whole training set in every batch: the loss is
    # comparable from step to step.
    config = tiny_config(tiny_data, tmp_path / "run", steps=12, batch_size=6, lr=3e-3, classes=["label 1"],
                         box_probability=1.0, interaction_steps=0, save_every=12, eval_every=6,
                         model={**TINY_MODEL, "boxes_to_base": False})
    result = train(config, quiet=True)
    losses = result.losses
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    out = tmp_path / "run"
    # Adapter-only safetensors with the rule, the classes and the resolved config in the header.
    header = read_adapter_header(out / "adapter.safetensors")
    assert header["normalization"] == {"kind": "window", "level": -500.0, "width": 1500.0}
    assert [c["name"] for c in header["classes"]] == ["label 1"]
    assert header["extra"]["train_config"]["steps"] == 12 and header["extra"]["step"] == 12
    assert (out / "best.safetensors").exists() and (out / "val.csv").exists()
    torch.manual_seed(config.seed)
    model, _ = load_segmote(out / "adapter.safetensors", build_tiny_sam_vit())
    assert model.config.expert_rank == 8
    # The training state is plain tensors and dicts (weights_only), with everything resume needs.
    state = torch.load(out / "train_state.pt", map_location="cpu", weights_only=True)
    assert {"step", "config", "adapter", "optimizer", "scheduler", "rng"} <= set(state)
    assert state["step"] == 12 and state["config"]["lr"] == 3e-3
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss") and len(rows) == 13
    assert json.loads((out / "split.json").read_text())["val"] == [1, 5]


def test_distilled_clicks_take_the_base_models_box_answers_outside_the_trained_classes(monkeypatch):
    """Label-free click prompts: each target is the frozen model's mask for a random box, the click lies inside it,
    and masks that are mostly a trained class are left to the labelled prompts."""
    torch.manual_seed(0)
    backbone = build_tiny_sam_vit().eval()
    generator = torch.Generator().manual_seed(1)
    embedding = torch.randn(2, 256, *backbone.embedding_size, generator=generator)
    items = [training_data.SliceItem("case", i, None, None, np.zeros((1, 40, 40), bool), None, []) for i in range(2)]
    low = 4 * backbone.embedding_size[0]  # the decoder's logit grid
    no_class = torch.zeros(2, 1, low, low)
    # A random tiny model is not confident; accept every box with some area to check the bookkeeping.
    monkeypatch.setattr(prompts, "DISTILL_MIN_IOU", -1e9)
    monkeypatch.setattr(prompts, "DISTILL_MIN_AREA", 1)
    rng = np.random.default_rng(0)
    rows, clicks, targets = prompts.distillation_prompts(backbone, embedding, items, no_class, 3, rng)
    assert len(rows) >= 2 and set(rows.tolist()) <= {0, 1}
    assert clicks.shape == (len(rows), 1, 2) and targets.shape == (len(rows), 1, low, low)
    on_grid = (clicks[:, 0] + 0.5) * low / backbone.input_size - 0.5
    for n in range(len(rows)):
        x, y = (int(round(float(v))) for v in on_grid[n])
        assert targets[n, 0, y, x] == 1  # the click lies inside its target
    # The same draws reproduce the same boxes: the targets are exactly the base model's box answers.
    rng, per_slice = np.random.default_rng(0), 3 * prompts.DISTILL_CANDIDATES
    boxes = torch.as_tensor(np.stack([prompts.random_box((40, 40), rng) for _ in range(2 * per_slice)]),
                            dtype=torch.float32)
    with torch.no_grad():
        model_boxes = backbone.slice_to_model_xy(boxes[:per_slice].view(-1, 2, 2), (40, 40)).view(-1, 4)
        base, _ = backbone.decode(embedding[:1], boxes=model_boxes)
    assert any(torch.equal(targets[0, 0], (base[i, 0] > 0).float()) for i in range(per_slice))
    # Where a trained class covers everything, nothing is distilled.
    everything = torch.ones(2, 1, low, low)
    assert prompts.distillation_prompts(backbone, embedding, items, everything, 3,
                                             np.random.default_rng(0)) is None


def test_training_with_distilled_clicks_runs_and_moves_the_click_path(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setattr(prompts, "DISTILL_MIN_IOU", -1e9)
    config = tiny_config(tiny_data, tmp_path / "run", steps=3, distill_clicks=2, interaction_steps=0,
                         box_probability=0.0, automatic=False, save_every=3)
    result = train(config, quiet=True)
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))
    # Only click prompts trained MoTE here (no labelled boxes, no automatic pass): its residual gate moved.
    model, _ = load_segmote(tmp_path / "run" / "adapter.safetensors", build_tiny_sam_vit())
    assert model.mote.residual_scale.abs().max() > 0
    with pytest.raises(InputError, match="distill_weight"):
        tiny_config(tiny_data, tmp_path, distill_weight=-1)


def test_resume_reproduces_an_uninterrupted_run_exactly(tmp_path, tiny_data):
    whole = train(tiny_config(tiny_data, tmp_path / "whole"), quiet=True)
    first = train(tiny_config(tiny_data, tmp_path / "paused"), stop_after=2, quiet=True)
    assert first.stopped and len(first.losses) == 2
    rest = train(tiny_config(tiny_data, tmp_path / "paused"), resume=True, quiet=True)
    assert first.losses + rest.losses == whole.losses  # exactly, not approximately
    from safetensors.torch import load_file

    a = load_file(tmp_path / "whole" / "adapter.safetensors")
    b = load_file(tmp_path / "paused" / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = (tmp_path / "paused" / "log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in log[1:]] == ["1", "2", "3", "4"]
    # A changed config cannot silently resume.
    with pytest.raises(TrainingError, match="lr"):
        train(tiny_config(tiny_data, tmp_path / "paused", lr=5e-3), resume=True, quiet=True)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_data, monkeypatch):
    original = loop.compute_losses
    calls = []

    def poisoned(*args, **kwargs):
        terms = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # the third step
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(loop, "compute_losses", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(TrainingError) as error:
        train(tiny_config(tiny_data, out, steps=4, save_every=2), quiet=True)
    message = str(error.value)
    assert "\n" not in message and "step 3" in message and "(step 2)" in message
    assert read_adapter_header(out / "adapter.safetensors")["extra"]["step"] == 2
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 2


@pytest.mark.slow
def test_heldout_report_scores_the_shipped_adapter_through_the_engine(tmp_path, tiny_data, monkeypatch):
    """Slice split with the real LiteMedSAM: the held-out report runs Engine.auto and single-click / box prompts on
    the held-out slices, with the engines seeded from the training store (nothing embedded twice with one input)."""
    from segmote_core import engine as engine_module

    config = tiny_config(tiny_data, tmp_path / "run", backbone="lite_medsam", steps=2, final_report=True,
                         cache_dir=str(tmp_path / "cache"), export=str(tmp_path / "shipped.safetensors"),
                         threads=None)  # LiteMedSAM's encoder on every core, as users train
    embedded = []
    original = engine_module.Engine._encode

    def counting(self, prepared, indices, *args, **kwargs):
        embedded.extend(indices)
        return original(self, prepared, indices, *args, **kwargs)

    monkeypatch.setattr(engine_module.Engine, "_encode", counting)
    monkeypatch.setenv("SEGMOTE_RUNTIME", "torch")  # the exported CPU runtimes have their own tests
    with all_torch_threads():
        result = train(config, quiet=True)
    report = result.report
    assert report["heldout_slices"] == [1, 5] and set(report["classes"]) == {"label 1", "label 2"}
    for scores in report["classes"].values():
        assert 0.0 <= scores["automatic_dice"] <= 1.0
        assert 0.0 <= scores["single_click_dice_base"] <= 1.0 and 0.0 <= scores["box_dice_tuned"] <= 1.0
    assert report["classes"]["label 1"]["slices_with_class"] == 2
    assert json.loads((tmp_path / "run" / "report.json").read_text()) == report
    assert read_adapter_header(tmp_path / "shipped.safetensors")["extra"]["heldout_report"] == report
    # The training store's 8 slices, once; the report adds only the held-out slices with the backbone's own input
    # (the base model's default; the frozen decoder's input behind the adapter's boxes and the box search behind its
    # clicks, segmote_core/boxes.py), once for both engines: they share one embedding cache.
    assert embedded[:8] == list(range(8)) and sorted(embedded[8:]) == [1, 5]


@pytest.mark.slow  # two processes under torchrun: about 10 s on 2 cores
def test_two_process_ddp_under_torchrun(tmp_path, tiny_data):
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(tiny_values(tiny_data, tmp_path / "ddp", steps=2, interaction_steps=0)))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "segmote_core.train", "--config", str(config)]
    finished = subprocess.run(command, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "2 process(es) on cpu" in finished.stdout
    rows = (tmp_path / "ddp" / "log.csv").read_text().splitlines()
    assert len(rows) == 3
    assert read_adapter_header(tmp_path / "ddp" / "adapter.safetensors")["extra"]["step"] == 2


# ---- embedding store ---------------------------------------------------------------------------------
def test_corrupted_embedding_entries_are_detected_and_recomputed(tmp_path):
    """The store is a backend: Engine.store_embeddings fills it with the engine's encoder loop, and embeds again only
    the entries that are missing or fail their checksums."""
    torch.manual_seed(0)
    backbone = build_tiny_sam_vit().eval()
    rng = np.random.default_rng(1)
    volume = Volume(rng.integers(-1000, 1000, (3, 24, 24)).astype(np.int16), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0),
                    np.eye(3))
    norm = window(0, 2000)
    engine = Engine(backbone=backbone, device="cpu", runtime="torch", cache_bytes=1)
    stack = SliceStack.for_axis(volume, None)
    prepared = Prepared(volume, stack, norm, key=())
    raw = list(stack.to_stack(volume.array))
    store = EmbeddingStore(tmp_path, backbone, norm)
    assert store.get(raw) == [None, None, None]
    assert engine.store_embeddings(prepared, range(3), store) == 3
    first = [(np.array(e), np.array(f)) for e, f in store.get(raw)]
    assert store.computed == 3 and first[0][0].shape == (256, 16, 16) and first[0][1].shape == (48, 16, 16)
    # What the store holds is what the engine's own embedding of the slice gives.
    own = Engine(backbone=backbone, device="cpu", runtime="torch").embeddings(engine.prepare(volume,
                                                                                             normalization=norm), [1])
    np.testing.assert_array_equal(own[1][0][0].numpy(), first[1][0])

    again = EmbeddingStore(tmp_path, backbone, norm)
    assert engine.store_embeddings(prepared, range(3), again) == 0
    assert again.computed == 0 and engine.cache.misses == 3  # nothing embedded twice

    embedding_path, early_path, meta_path = again.paths(again.key(raw[1]))
    data = bytearray(embedding_path.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte inside the array
    embedding_path.write_bytes(bytes(data))
    with open(early_path, "r+b") as handle:  # and a truncated file
        handle.truncate(200)
    (tmp_path / f"{again.key(raw[2])}.json").unlink()  # an entry whose write never finished

    repaired = EmbeddingStore(tmp_path, backbone, norm)
    assert repaired.get(raw)[1:] == [None, None]
    assert engine.store_embeddings(prepared, range(3), repaired) == 2
    values = repaired.get(raw)
    assert repaired.computed == 2 and repaired.recomputed == 2
    for (e, f), (e0, f0) in zip(values, first):
        np.testing.assert_array_equal(e, e0)
        np.testing.assert_array_equal(f, f0)
    # Another window or backbone never reuses these entries.
    assert EmbeddingStore(tmp_path, backbone, window(40, 400)).key(raw[0]) != repaired.key(raw[0])
    torch.manual_seed(1)
    assert EmbeddingStore(tmp_path, build_tiny_sam_vit(), norm).key(raw[0]) != repaired.key(raw[0])
