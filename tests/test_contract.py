"""The error contract: a user error is one `error:` line and exit 1, a usage error argparse's exit 2, an internal
error exit 3 with a hint; writes leave no stray files (docs/reliability.md, "Contract")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_cli
from segmote_core import cli
from segmote_core.devices import resolve_device
from segmote_core.errors import DeviceError, InputError, SegMoTEError
from segmote_core.files import atomic_write
from segmote_core.segmentation_io import Segment, read_segments, save_segments
from segmote_core.volume import Volume, read_volume

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_ct() -> Volume:
    """Four slices of a synthetic 'CT': a bright disc on a dark background."""
    yy, xx = np.mgrid[:32, :32]
    disc = ((yy - 16) ** 2 + (xx - 14) ** 2 < 64).astype(np.int16)
    array = np.stack([disc * 900 - 700 + k for k in range(4)]).astype(np.int16)
    return Volume(array, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ---- prompts -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [-0.5, 3.5, 3.49])
def test_a_box_on_the_half_voxel_border_is_inside(lite_engine, tiny_ct, k):
    mask = lite_engine.segment(tiny_ct, box_ijk=[-0.5, -0.5, k, 31.5, 31.5, k], window=(40, 400))
    assert mask.shape == tiny_ct.array.shape and not mask[1:3].any()


def test_the_documented_border_box_through_the_cli(tmp_path, capsys, tiny_ct, cli_engine):
    image = tmp_path / "ct.nrrd"
    sitk.WriteImage(tiny_ct.to_sitk(), str(image))
    out = tmp_path / "o.seg.nrrd"
    code, stdout, err = run_cli(["segment", str(image), "--box-ijk", "4", "6", "-0.5", "26", "27", "-0.5", "--out",
                             str(out), "--device", "cpu"], capsys)
    assert code == 0, err
    assert read_segments(out)[1][0].mask[0].sum() > 50
    # what the command printed is what it recorded
    record = json.loads(out.with_name("o.json").read_text(encoding="utf-8"))
    (row,) = record["segments"]
    assert stdout.splitlines() == [f"normalisation: {record['normalization']}",
                                   f"segment: {row['voxels']} voxels, {row['volume_ml']:.1f} ml, {row['confidence']} "
                                   f"-> {out}"]


@pytest.mark.parametrize("box,message", [
    ([1, 2, 3], "6 numbers"), ([[1, 2, 3, 4, 5, 6]] * 2, "6 numbers"), ("abc", "must be numbers"),
    ([np.nan, 0, 0, 5, 5, 0], "NaN or infinite"), ([0, 0, 0, np.inf, 5, 0], "NaN or infinite"),
    ([0, 0, 0, 1e30, 5, 0], "outside"), ([None] * 6, "NaN or infinite"),
])
def test_wrong_boxes_through_the_python_api_are_one_line_errors(lite_engine, tiny_ct, box, message):
    with pytest.raises(InputError, match=message):
        lite_engine.segment(tiny_ct, box_ijk=box, window=(40, 400))


@pytest.mark.parametrize("points,labels,message", [
    ([[1, 2]], None, "3 numbers"), ([[1, 2, 1]], ["x"], "must be numbers"), ([[1, 2, 1]], [2], "1 \\(positive\\)"),
    ([[1, 2, 1]], [1, 1], "1 points but 2"), ([[np.nan, 2, 1]], None, "NaN"),
])
def test_wrong_points_through_the_python_api_are_one_line_errors(lite_engine, tiny_ct, points, labels, message):
    with pytest.raises(InputError, match=message):
        lite_engine.segment(tiny_ct, points_ijk=points, point_labels=labels, window=(40, 400))


BORDER = st.sampled_from([-0.5, -0.51, 0.0, 31.5, 31.51, 3.5, 3.51, np.nan, np.inf, -np.inf, 1e300, -1e300])
COORDINATE = st.one_of(BORDER, st.floats(-40, 40))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(corners=st.lists(COORDINATE, min_size=6, max_size=6), k=st.sampled_from([0.0, 3.5, -0.5, 3.51, np.nan]))
def test_fuzzed_boxes_give_a_mask_or_one_line(lite_engine, tiny_ct, corners, k):
    """NaN, inf, huge, reversed and border values: a mask on the grid or an InputError, never anything else."""
    box = [corners[0], corners[1], k, corners[3], corners[4], k]
    try:
        mask = lite_engine.segment(tiny_ct, box_ijk=box, window=(40, 400))
    except InputError as error:
        assert "\n" not in str(error)
    else:
        assert mask.shape == tiny_ct.array.shape


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(points=st.lists(st.lists(COORDINATE, min_size=2, max_size=2), min_size=1, max_size=3),
       k=st.sampled_from([0.0, 3.5, -0.5, 3.51, np.nan, np.inf]),
       labels=st.lists(st.sampled_from([0, 1, 2, -1]), min_size=1, max_size=3))
def test_fuzzed_points_give_a_mask_or_one_line(lite_engine, tiny_ct, points, k, labels):
    """Points with NaN, inf, huge, border values and labels other than 0/1 (or too few): a mask or an InputError."""
    ijk = [[i, j, k] for i, j in points]
    try:
        mask = lite_engine.segment(tiny_ct, points_ijk=ijk, point_labels=labels, window=(40, 400))
    except InputError as error:
        assert "\n" not in str(error)
    else:
        assert mask.shape == tiny_ct.array.shape
        assert len(labels) == len(points) and set(labels) <= {0, 1}, "bad labels were accepted"


def test_negative_numbers_in_exponent_form_are_numbers_not_options():
    args = cli.build_parser().parse_args(["segment", "ct.nrrd", "--out", "o.seg.nrrd", "--box-ras", "-1e2", "-2.5E+1",
                                          "-.5", "1e2", "-3", "-0"])
    assert args.box_ras == [-100.0, -25.0, -0.5, 100.0, -3.0, 0.0]
    args = cli.build_parser().parse_args(["segment", "ct.nrrd", "--out", "o.seg.nrrd", "--point-ras", "-1e-3", "0", "-7"])
    assert args.point_ras == [[-0.001, 0.0, -7.0]]


# ---- devices: one resolver ------------------------------------------------------------------------------
@pytest.mark.parametrize("device,message", [("cuda:0", "not available|does not exist"), ("gpu", "unknown device"),
                                            ("cuda:x", "unknown device"), ("cpu:1", "unknown device")])
def test_device_names_are_judged_by_one_resolver(tmp_path, capsys, device, message):
    import torch

    if device.startswith("cuda:0") and torch.cuda.is_available():
        assert resolve_device(device).type == "cuda"
        return
    with pytest.raises(DeviceError, match=message):
        resolve_device(device)
    code, _, err = run_cli(["segment", str(tmp_path / "ct.nrrd"), "--out", str(tmp_path / "o.seg.nrrd"), "--box-ijk",
                        "1", "1", "1", "5", "5", "1", "--device", device], capsys)
    assert code == 1  # the image is missing too: whichever is found first, one line and exit 1
    one_error_line(err)


# ---- outputs -------------------------------------------------------------------------------------------------
def test_an_output_whose_parent_is_a_file_is_a_user_error(tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("x")
    code, _, err = run_cli(["segment", "/nonexistent.nrrd", "--out", str(blocker / "o.seg.nrrd"), "--box-ijk", "1", "1",
                        "1", "5", "5", "1"], capsys)
    assert code == 1 and "is a file, not a folder" in one_error_line(err)
    volume = Volume(np.zeros((2, 3, 4), np.int16), (1, 1, 1), (0, 0, 0), np.eye(3))
    with pytest.raises(SegMoTEError, match="is a file, not a folder"):
        atomic_write(blocker / "sub" / "x.json", lambda temporary: temporary.write_text("{}"))
    with pytest.raises(InputError, match="is a file, not a folder"):
        save_segments(blocker / "o.seg.nrrd", volume, [Segment("a", np.ones((2, 3, 4), bool))])


def test_a_read_only_output_folder_is_a_user_error_before_the_model_runs(tmp_path, capsys, monkeypatch):
    """Tests run as root, whom permissions do not stop; the refusal is simulated where the OS answers."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == tmp_path else real_access(path, mode))
    code, _, err = run_cli(["segment", "/nonexistent.nrrd", "--out", str(tmp_path / "o.seg.nrrd"), "--box-ijk", "1", "1",
                        "1", "5", "5", "1"], capsys)
    assert code == 1 and "is not writable" in one_error_line(err)


def test_a_read_only_folder_met_while_writing_is_a_user_error(tmp_path, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    for name in ("o.seg.nrrd", "o.mhd"):
        with pytest.raises(SegMoTEError, match="Permission denied; any previous file is unchanged"):
            atomic_write(tmp_path / name, lambda temporary: temporary.write_text("x"))
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_cache_folder_is_a_user_error(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("SEGMOTE_CACHE_DIR", str(blocker / "cache"))
    code, _, err = run_cli(["weights", "download", "sam_vit_b", "--url", "http://127.0.0.1:9/w.pth", "--quiet"], capsys)
    assert code == 1 and "cannot create the cache folder" in one_error_line(err)


@pytest.mark.parametrize("name,data", [("labels.mhd", "labels.zraw"), ("labels.nhdr", "labels.raw.gz")])
def test_header_and_data_outputs_name_their_real_data_file_and_orphan_nothing(tmp_path, name, data):
    volume = Volume(np.zeros((3, 4, 5), np.int16), (1, 1, 2), (0, 0, 0), np.eye(3))
    for index, segment in enumerate(("liver", "spleen", "kidney")):
        mask = np.zeros((3, 4, 5), bool)
        mask[index] = True
        save_segments(tmp_path / name, volume, [Segment(segment, mask)])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, data])
    assert data.encode() in (tmp_path / name).read_bytes()
    assert [s.name for s in read_segments(tmp_path / name)[1]] == ["liver", "spleen", "kidney"]
    assert np.unique(read_volume(tmp_path / name).array).tolist() == [1, 2, 3]


def test_sigterm_in_the_middle_of_a_write_leaves_no_temporary_file(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from segmote_core.files import atomic_write, exit_cleanly_on_sigterm
        exit_cleanly_on_sigterm()

        def slow(temporary):
            temporary.write_bytes(b"half")
            print("writing", flush=True)
            time.sleep(30)

        atomic_write({str(tmp_path / "out.seg.nrrd")!r}, slow)
    """)
    (tmp_path / "out.seg.nrrd").write_bytes(b"previous")
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"
    assert len(list(tmp_path.iterdir())) == 2  # the temporary file exists now
    process.send_signal(signal.SIGTERM)
    assert process.wait(20) == 128 + signal.SIGTERM
    assert [p.name for p in tmp_path.iterdir()] == ["out.seg.nrrd"]
    assert (tmp_path / "out.seg.nrrd").read_bytes() == b"previous"


# ---- one error policy -----------------------------------------------------------------------------------------
def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as usage:
        cli.main(["segment", "ct.nrrd"])  # --out missing
    assert usage.value.code == 2 and "--out" in capsys.readouterr().err


def test_internal_errors_exit_3_with_a_hint(capsys, monkeypatch):
    import segmote_core.volume as volume_module

    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.delenv("SEGMOTE_DEBUG", raising=False)
    monkeypatch.setattr(volume_module, "read_volume", broken)
    code = cli.main(["segment", "ct.nrrd", "--out", "/tmp/never-written.seg.nrrd", "--box-ijk", "1", "1", "1", "5",
                     "5", "1"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 3 and "internal error (KeyError" in line and "SEGMOTE_DEBUG=1" in line


def test_no_dependency_warning_precedes_the_error_line(tmp_path):
    """A folder of two DICOM series through the real console entry: stderr is exactly one line."""
    from test_input_checks import STUDY, write_series

    write_series(tmp_path, STUDY + ".101", [0, 2, 4])
    write_series(tmp_path, STUDY + ".202", [0, 3, 6])
    result = subprocess.run([sys.executable, "-m", "segmote_core.cli", "segment", str(tmp_path), "--out",
                             str(tmp_path.parent / "never.seg.nrrd"), "--box-ijk", "1", "1", "1", "4", "4", "1"],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "2 DICOM series" in result.stderr, result.stderr


@pytest.mark.parametrize("arguments,message", [
    (("abc", (1, 1, 1), (0, 0, 0), np.eye(3)), "numeric|3-D"),
    ((np.zeros((2, 2, 2)), (1, 1), (0, 0, 0), np.eye(3)), "spacing must be 3 numbers"),
    ((np.zeros((2, 2, 2)), (1, 1, 1), "origin", np.eye(3)), "origin must be 3 numbers"),
    ((np.zeros((2, 2, 2)), (1, 1, 1), (0, 0, 0), np.eye(2)), "direction must be 9 numbers"),
    ((np.zeros((2, 2, 2), dtype=object), (1, 1, 1), (0, 0, 0), np.eye(3)), "numeric"),
])
def test_a_volume_built_from_wrong_arguments_is_a_one_line_error(arguments, message):
    with pytest.raises(InputError, match=message) as error:
        Volume(*arguments)
    assert "\n" not in str(error.value)


def test_an_in_process_caller_keeps_its_own_sigterm_behaviour(tmp_path, capsys):
    """cli.main turns SIGTERM into a clean exit only while it runs: a notebook or test runner calling it keeps the
    default action afterwards."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    cli.main(["segment", str(tmp_path / "missing.nrrd"), "--out", str(tmp_path / "o.seg.nrrd"), "--box-ijk",
              "1", "1", "1", "2", "2", "1"])
    capsys.readouterr()
    assert signal.getsignal(signal.SIGTERM) == before
