"""Hostile inputs to the newer surfaces (issue #24): what a file or the environment names is never imported or
run, and every bad value is one line with exit 1 (or 3 for an internal error), never a traceback."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml

from segmote_core.cli import main
from segmote_core.datasets import resolve_path
from segmote_core.torchrun import torchrun_environment
from segmote_core.errors import InputError

TINY_MODEL = {"expert_rank": 8, "ppt_mlp_dim": 64, "early_hidden_channels": 16}


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


@pytest.fixture
def tiny_scan(tmp_path) -> tuple[Path, Path]:
    image = np.full((6, 32, 32), -1000, np.int16)
    image[:, 10:20, 10:20] = 200
    scan = sitk.GetImageFromArray(image)
    labels = sitk.GetImageFromArray((image > 0).astype(np.uint8))
    labels.CopyInformation(scan)
    sitk.WriteImage(scan, str(tmp_path / "scan.nrrd"))
    sitk.WriteImage(labels, str(tmp_path / "labels.nrrd"))
    return tmp_path / "scan.nrrd", tmp_path / "labels.nrrd"


def tiny_config(tmp_path: Path, scan: tuple[Path, Path], **overrides) -> Path:
    values = dict(image=str(scan[0]), segmentation=str(scan[1]), split="slice", holdout_every=3, window=[-500, 1500],
                  backbone="sam_vit_tiny", steps=1, batch_size=1, warmup_steps=0, interaction_steps=0,
                  out=str(tmp_path / "run"), cache_dir=str(tmp_path / "store"), save_every=1, eval_every=0,
                  final_report=False, threads=1, model=TINY_MODEL)
    values.update(overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


# ---- nothing a file names is imported ----------------------------------------------------------------------
def test_a_pkg_path_naming_a_module_never_imports_it(tmp_path, monkeypatch, tiny_scan, capsys):
    """`pkg:marker.sub/x` used to import `marker` (find_spec imports a dotted name's parents): any code ran."""
    package = tmp_path / "site" / "hostile_marker"
    package.mkdir(parents=True)
    ran = tmp_path / "ran"
    (package / "__init__.py").write_text(f"open({str(ran)!r}, 'w').close()\n")
    (package / "sub.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(InputError, match="pkg: paths name a file in one of the packages"):
        resolve_path("pkg:hostile_marker.sub/data.nrrd")
    config = tiny_config(tmp_path, tiny_scan, image="pkg:hostile_marker.sub/scan.nrrd")
    code = main(["train", "--config", str(config), "--quiet"])
    lines = error_lines(capsys.readouterr().err)
    assert code == 1 and len(lines) == 1 and "hostile_marker" in lines[0]
    assert not ran.exists() and "hostile_marker" not in sys.modules
    with pytest.raises(InputError, match="inside its package"):
        resolve_path("pkg:slicerio/../../etc/passwd")
    assert resolve_path("pkg:slicerio/data/CTChest4.nrrd").is_file()  # the shipped data still resolves


# ---- training values, resume states and torchrun variables: one line -------------------------------------
@pytest.mark.parametrize("overrides, message", [
    ({"threads": 0}, "threads must be 1 or more"),
    ({"seed": -1}, "seed must be a whole number from 0"),
    ({"model": None}, "model must be a mapping"),
], ids=["threads 0", "negative seed", "empty model section"])
def test_bad_training_values_are_one_line(tmp_path, tiny_scan, capsys, overrides, message):
    code = main(["train", "--config", str(tiny_config(tmp_path, tiny_scan, **overrides)), "--quiet"])
    lines = error_lines(capsys.readouterr().err)
    assert code == 1 and len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_resume_state_from_another_version_is_one_line(tmp_path, tiny_scan, capsys):
    from segmote_core.training.state import STATE_FILE

    config = tiny_config(tmp_path, tiny_scan)
    assert main(["train", "--config", str(config), "--quiet"]) == 0
    state_file = tmp_path / "run" / STATE_FILE
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    torch.save({**state, "version": 99, "rng": {"other": "layout"}}, state_file)
    before = state_file.read_bytes()
    code = main(["train", "--config", str(config), "--resume", "--quiet"])
    lines = error_lines(capsys.readouterr().err)
    assert code == 1 and len(lines) == 1 and "another SegMoTE version" in lines[0]
    del state["rng"]  # same version, a part missing
    torch.save(state, state_file)
    code = main(["train", "--config", str(config), "--resume", "--quiet"])
    lines = error_lines(capsys.readouterr().err)
    assert code == 1 and len(lines) == 1 and "incomplete (no rng)" in lines[0]
    assert before != state_file.read_bytes()  # the test's own edit; the run did not write it


@pytest.mark.parametrize("variables, message", [
    ({"WORLD_SIZE": "2"}, "RANK is not set"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "29500"}, "MASTER_ADDR is not set"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE must be a whole number"),
    ({"WORLD_SIZE": "2", "RANK": "5", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, "do not fit"),
], ids=["no rank", "no master address", "text world size", "rank outside the world"])
def test_half_set_torchrun_variables_are_one_line(tmp_path, tiny_scan, capsys, monkeypatch, variables, message):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(InputError, match=message):
        torchrun_environment()
    code = main(["train", "--config", str(tiny_config(tmp_path, tiny_scan)), "--quiet"])
    lines = error_lines(capsys.readouterr().err)
    assert code == 1 and len(lines) == 1 and message in lines[0]
    code = main(["segment", "-i", str(tmp_path), "-o", str(tmp_path / "out"), "--box-ijk", "1", "1", "1", "5", "5",
                 "1", "--device", "cpu"])
    lines = error_lines(capsys.readouterr().err)
    assert code == 1 and len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "out").exists()


# ---- SEGMOTE_DEBUG=0 means off ------------------------------------------------------------------------------
@pytest.mark.parametrize("value, traceback", [("0", False), ("", False), ("false", False), ("1", True)])
def test_segmote_debug_zero_means_off(tmp_path, capsys, monkeypatch, value, traceback):
    import segmote_core.volume as volume_module

    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setenv("SEGMOTE_DEBUG", value)
    monkeypatch.setattr(volume_module, "read_volume", broken)
    args = ["segment", str(tmp_path / "ct.nrrd"), "--out", str(tmp_path / "o.seg.nrrd"), "--box-ijk", "1", "1", "1",
            "5", "5", "1"]
    if traceback:
        with pytest.raises(KeyError):
            main(args)
        return
    code = main(args)
    lines = error_lines(capsys.readouterr().err)
    assert code == 3 and len(lines) == 1 and "SEGMOTE_DEBUG=1" in lines[0]


# ---- resources: aliases, huge prompt files ------------------------------------------------------------------
def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, tiny_scan, capsys):
    lines = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for n in range(1, 9):
        lines.append(f"{chr(97 + n)}: &{chr(97 + n)} [" + ", ".join([f"*{chr(96 + n)}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    code = main(["train", "--config", str(bomb), "--quiet"])
    err = error_lines(capsys.readouterr().err)
    assert code == 1 and len(err) == 1 and "aliases (*a) are not accepted" in err[0]


def test_a_huge_prompt_file_is_refused_by_its_size(tmp_path, capsys):
    from segmote_core.prompt_files import MAX_PROMPT_FILE_BYTES, read_prompts

    big = tmp_path / "p.csv"
    with open(big, "wb") as handle:
        handle.write(b"case,name,kind,x,y,z\n")
        handle.truncate(MAX_PROMPT_FILE_BYTES + 1)
    with pytest.raises(InputError, match="a prompt file of boxes and points is at most"):
        read_prompts(big)


# ---- prompt files: malformed shapes, BOM, negative-only, unknown cases -------------------------------------
MARKUPS = {
    "markups a string": '{"markups": ["ROI"]}',
    "control points a number": '{"markups": [{"type": "Fiducial", "controlPoints": 5}]}',
    "control point a string": '{"markups": [{"type": "Fiducial", "controlPoints": ["p"]}]}',
    "deep nesting": '{"markups": ' + "[" * 100000 + "]" * 100000 + "}",
    "5000-digit number": '{"markups": [{"type": "ROI", "center": [' + "9" * 5000 + ', 0, 0], "size": [1, 1, 1]}]}',
}


@pytest.mark.parametrize("text", MARKUPS.values(), ids=MARKUPS.keys())
def test_malformed_markups_shapes_are_one_line(tmp_path, capsys, text):
    prompts = tmp_path / "p.mrk.json"
    prompts.write_text(text)
    code = main(["segment", str(tmp_path / "ct.nrrd"), "--out", str(tmp_path / "o.seg.nrrd"), "--prompts",
                 str(prompts)])
    err = error_lines(capsys.readouterr().err)
    assert code == 1 and len(err) == 1 and "p.mrk.json" in err[0]
    assert not (tmp_path / "o.seg.nrrd").exists()


def write_csv(path: Path, rows: list[str], bom: bool = False) -> Path:
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + ("\n".join(["case,name,kind,x,y,z,space", *rows]) + "\n")
                     .encode())
    return path


def test_prompt_tables_negative_only_bom_and_unknown_cases(tmp_path, capsys, monkeypatch):
    from segmote_core.cli import batch
    from segmote_core.prompt_files import read_prompts

    table = read_prompts(write_csv(tmp_path / "bom.csv", [",liver,positive,1,2,3,IJK"], bom=True))
    assert list(table.objects[None]) == ["liver"]
    with pytest.raises(InputError, match="only negative points"):
        read_prompts(write_csv(tmp_path / "neg.csv", [",liver,negative,1,2,3,IJK"]))

    # Before any model: the CLI must not get as far as building an engine.
    def no_engine(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(batch, "engine_for_args", no_engine)
    folder = tmp_path / "cases"
    folder.mkdir()
    for name in ("a", "b"):
        sitk.WriteImage(sitk.Image(8, 8, 2, sitk.sitkInt16), str(folder / f"{name}.nrrd"))
    rows = ["a,liver,positive,1,2,0,IJK", "typo,liver,positive,1,2,0,IJK"]
    code = main(["segment", "-i", str(folder), "-o", str(tmp_path / "out"), "--prompts",
                 str(write_csv(tmp_path / "p.csv", rows))])
    err = error_lines(capsys.readouterr().err)
    assert code == 1 and len(err) == 1 and "names case(s) 'typo' that the input does not hold" in err[0]
    code = main(["segment", "-i", str(folder), "-o", str(tmp_path / "out"), "--name", "spleen", "--prompts",
                 str(write_csv(tmp_path / "q.csv", rows[:1]))])
    err = error_lines(capsys.readouterr().err)
    assert code == 1 and len(err) == 1 and "--name names a command-line prompt" in err[0]
    assert not (tmp_path / "out").exists()


def test_an_existing_segment_name_is_refused_before_the_model(tmp_path, capsys, monkeypatch):
    from segmote_core.cli import batch
    from segmote_core.segmentation_io import Segment, save_segments
    from segmote_core.volume import Volume

    grid = Volume(np.zeros((2, 8, 8), np.int16), (1, 1, 1), (0, 0, 0), np.eye(3))
    sitk.WriteImage(grid.to_sitk(np.arange(128, dtype=np.int16).reshape(2, 8, 8)), str(tmp_path / "ct.nrrd"))
    for suffix in (".seg.nrrd", ".nii.gz"):
        out = tmp_path / f"o{suffix}"
        mask = np.zeros((2, 8, 8), bool)
        mask[:, 2:6, 2:6] = True
        save_segments(out, grid, [Segment("liver", mask)])
        before = out.read_bytes()
        monkeypatch.setattr(batch, "engine_for_args", lambda args: (_ for _ in ()).throw(AssertionError("model")))
        code = main(["segment", str(tmp_path / "ct.nrrd"), "--out", str(out), "--box-ijk", "1", "1", "0", "5", "5",
                     "0", "--name", "liver"])
        err = error_lines(capsys.readouterr().err)
        assert code == 1 and len(err) == 1 and "already has a segment named 'liver'" in err[0]
        assert out.read_bytes() == before


def test_a_volume_on_a_view_of_the_callers_array_does_not_change_with_it():
    from segmote_core.volume import Volume

    data = np.zeros((3, 8, 8), np.float32)
    volume = Volume(data[:, :, :], (1, 1, 1), (0, 0, 0), np.eye(3))
    data[1] = 5.0  # the caller changes its own array afterwards
    assert float(volume.array.max()) == 0.0 and not volume.array.flags.writeable
    owned = np.zeros((3, 8, 8), np.float32)
    Volume(owned, (1, 1, 1), (0, 0, 0), np.eye(3))
    with pytest.raises(ValueError):  # an array the Volume owns outright is frozen, not copied
        owned[0] = 1.0


# ---- training into a folder that holds a previous run --------------------------------------------------------
def test_training_into_a_previous_run_is_refused_unless_resume_or_overwrite(tmp_path, tiny_scan, capsys):
    from segmote_core.training.state import RUN_FILES

    config = tiny_config(tmp_path, tiny_scan)
    assert main(["train", "--config", str(config), "--quiet"]) == 0
    run = tmp_path / "run"
    kept = {path.name: path.read_bytes() for path in run.iterdir() if path.name in RUN_FILES}
    assert {"adapter.safetensors", "train_state.pt", "log.csv"} <= set(kept)
    capsys.readouterr()
    code = main(["train", "--config", str(config), "--quiet"])
    lines = error_lines(capsys.readouterr().err)
    assert code == 1 and len(lines) == 1 and "holds a previous training run" in lines[0] and "--resume" in lines[0]
    assert {name: (run / name).read_bytes() for name in kept} == kept  # nothing replaced
    code = main(["train", "--config", str(config), "--resume", "--overwrite", "--quiet"])
    assert code == 1 and "give one of them" in capsys.readouterr().err
    assert main(["train", "--config", str(config), "--overwrite", "--quiet"]) == 0  # asked for: replaced


def test_a_second_training_into_a_busy_folder_is_refused(tmp_path, tiny_scan, capsys):
    import fcntl
    import os

    from segmote_core.training.state import LOCK_FILE

    config = tiny_config(tmp_path, tiny_scan)
    (tmp_path / "run").mkdir()
    handle = os.open(tmp_path / "run" / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)  # another training holds the folder
        code = main(["train", "--config", str(config), "--quiet"])
        lines = error_lines(capsys.readouterr().err)
        assert code == 1 and len(lines) == 1 and "another training is writing into" in lines[0]
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_FILE]
    finally:
        os.close(handle)
    assert main(["train", "--config", str(config), "--quiet"]) == 0  # released: the folder is free again


STORE_BACKBONE = {"name": "sam_vit_tiny", "input_size": 64, "weights_sha256": "0" * 64}


def _store(root):
    from types import SimpleNamespace

    from segmote_core.embedding_store import EmbeddingStore
    from segmote_core.normalize import window

    return EmbeddingStore(root, SimpleNamespace(**STORE_BACKBONE), window(-500, 1500))


def _write_entries(root: str, seed: int, rounds: int, start) -> None:
    store, rng = _store(root), np.random.default_rng(seed)
    start.wait()
    for _ in range(rounds):
        for key in ("a", "b", "c"):  # each process computes slightly different numbers (another CPU, threads...)
            store.write(key, rng.random((4, 8, 8), np.float32), rng.random((2, 8, 8), np.float32))


@pytest.mark.slow  # two training processes: about 20 s on 2 cores
def test_two_trainings_sharing_an_embedding_store_leave_every_entry_whole(tmp_path):
    """Unserialised, one writer's rename could land between another's checks (a FileNotFoundError ended that
    training) and an entry's three files could come from different writers."""
    import multiprocessing

    context = multiprocessing.get_context("fork")  # real processes, without re-importing numpy each time
    for run in range(3):
        root = tmp_path / f"store{run}"
        start = context.Barrier(3)
        workers = [context.Process(target=_write_entries, args=(str(root), seed, 40, start)) for seed in (1, 2, 3)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(120)
        assert [worker.exitcode for worker in workers] == [0, 0, 0]
        store = _store(root)
        assert all(store.load(key) is not None for key in ("a", "b", "c"))  # each entry's files belong together
        assert not [p for p in root.iterdir() if p.name.startswith(".")]
