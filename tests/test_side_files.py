"""The run record (OUT.json) and the preview (OUT.png) are outputs like the segmentation: checked before the model
runs, never written over a file segmote did not write for this output (unless --overwrite), and written together
with the segmentation or not at all. Symbolic links and read-only outputs (docs/reliability.md)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import CHEST_CT
from segmote_core import cli
from segmote_core.segmentation_io import read_segments

pytestmark = pytest.mark.slow  # LiteMedSAM or real scans throughout: `make test` only (tests/conftest.py)

BOX = ["--box-ijk", "20", "30", "1", "60", "90", "1"]


@pytest.fixture
def crop(tmp_path, cli_engine) -> Path:
    """Two axial slices of the chest CT; the CLI's engine is the session's, so a slice is embedded once."""
    image = sitk.ReadImage(str(CHEST_CT))[:, :, 16:18]
    path = tmp_path / "ct.nrrd"
    sitk.WriteImage(image, str(path))
    return path


def run(capsys, *args) -> tuple[int, list[str]]:
    code = cli.main(["-q", *args, "--device", "cpu", "--runtime", "torch"])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_users_json_or_png_beside_the_output_is_kept(tmp_path, capsys, crop):
    (tmp_path / "case.json").write_text('{"my": "notes"}')
    code, err = run(capsys, "segment", str(crop), "--out", str(tmp_path / "case.seg.nrrd"), *BOX)
    assert code == 1 and len(err) == 1 and "run record" in err[0] and "--overwrite" in err[0]
    assert json.loads((tmp_path / "case.json").read_text()) == {"my": "notes"}
    (tmp_path / "case.json").rename(tmp_path / "mine.json")
    (tmp_path / "case.png").write_bytes(b"my picture")
    before = digests(tmp_path)
    code, err = run(capsys, "segment", str(crop), "--out", str(tmp_path / "case.seg.nrrd"), *BOX, "--preview")
    assert code == 1 and len(err) == 1 and "preview" in err[0] and "was not written by segmote" in err[0]
    assert digests(tmp_path) == before  # nothing written, not even the segmentation


def test_a_preview_naming_another_segmentation_is_refused(tmp_path, capsys, crop):
    assert run(capsys, "segment", str(crop), "--out", str(tmp_path / "other.seg.nrrd"), *BOX)[0] == 0
    before = digests(tmp_path)
    code, err = run(capsys, "segment", str(crop), "--out", str(tmp_path / "case.seg.nrrd"), *BOX, "--name", "b",
                    "--preview", str(tmp_path / "other.seg.nrrd"))
    assert code == 1 and len(err) == 1 and "a preview is a PNG picture" in err[0]
    assert digests(tmp_path) == before


def test_two_outputs_of_one_name_do_not_share_a_run_record(tmp_path, capsys, crop):
    assert run(capsys, "segment", str(crop), "--out", str(tmp_path / "case.seg.nrrd"), *BOX, "--preview")[0] == 0
    record = json.loads((tmp_path / "case.json").read_text())
    assert record["output"] == str((tmp_path / "case.seg.nrrd").resolve())
    # Its own record and preview are rewritten by a rerun (here: a second segment in the same file) ...
    code, err = run(capsys, "segment", str(crop), "--out", str(tmp_path / "case.seg.nrrd"), *BOX, "--name", "b",
                    "--preview")
    assert code == 0, err
    # ... but the label map case.nii.gz would take case.json from the segmentation it describes.
    before = digests(tmp_path)
    code, err = run(capsys, "segment", str(crop), "--out", str(tmp_path / "case.nii.gz"), *BOX)
    assert code == 1 and len(err) == 1 and "run record" in err[0] and "case.nii.gz" in err[0]
    assert digests(tmp_path) == before
    code, err = run(capsys, "segment", str(crop), "--out", str(tmp_path / "case.nii.gz"), *BOX, "--overwrite")
    assert code == 0 and json.loads((tmp_path / "case.json").read_text())["output"].endswith("case.nii.gz")


def test_a_record_or_preview_that_cannot_be_written_leaves_the_segmentation_unchanged(tmp_path, capsys, crop,
                                                                                    monkeypatch):
    """matplotlib missing (or any failure drawing the preview) after the model ran: nothing is written."""
    import segmote_core.preview as preview
    from segmote_core.errors import SegMoTEError

    assert run(capsys, "segment", str(crop), "--out", str(tmp_path / "case.seg.nrrd"), *BOX)[0] == 0
    before = digests(tmp_path)

    def no_matplotlib(*args, **kwargs):
        raise SegMoTEError("pictures need matplotlib: pip install 'segmote[demo]'")

    monkeypatch.setattr(preview, "save_overlay_png", no_matplotlib)
    code, err = run(capsys, "segment", str(crop), "--out", str(tmp_path / "case.seg.nrrd"), *BOX, "--name", "b",
                    "--preview")
    assert code == 1 and len(err) == 1 and "matplotlib" in err[0]
    assert digests(tmp_path) == before and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_output_that_is_a_symlink_updates_the_linked_file(tmp_path, capsys, crop):
    store = tmp_path / "store"
    store.mkdir()
    assert run(capsys, "segment", str(crop), "--out", str(store / "real.seg.nrrd"), *BOX, "--name", "a")[0] == 0
    link = tmp_path / "link.seg.nrrd"
    link.symlink_to(store / "real.seg.nrrd")
    assert run(capsys, "segment", str(crop), "--out", str(link), *BOX, "--name", "b")[0] == 0
    assert link.is_symlink()
    _, segments = read_segments(store / "real.seg.nrrd")
    assert [s.name for s in segments] == ["a", "b"]


def test_a_read_only_output_is_refused_and_kept(tmp_path, capsys, crop):
    out = tmp_path / "case.seg.nrrd"
    assert run(capsys, "segment", str(crop), "--out", str(out), *BOX, "--name", "a")[0] == 0
    os.chmod(out, 0o444)
    before = digests(tmp_path)
    for extra in ([], ["--overwrite"]):
        code, err = run(capsys, "segment", str(crop), "--out", str(out), *BOX, "--name", "b", *extra)
        assert code == 1 and len(err) == 1 and "read-only" in err[0]
    assert digests(tmp_path) == before and (out.stat().st_mode & 0o777) == 0o444


def test_the_run_record_is_standard_json(tmp_path, capsys, crop):
    from segmote_core.cli.batch import json_safe

    assert json.dumps(json_safe({"iou": float("nan"), "x": [float("inf"), 1.5]}), allow_nan=False) == \
        '{"iou": null, "x": [null, 1.5]}'
    assert run(capsys, "segment", str(crop), "--out", str(tmp_path / "c.seg.nrrd"), *BOX)[0] == 0
    text = (tmp_path / "c.json").read_text()
    assert "NaN" not in text and "Infinity" not in text and np.isfinite(json.loads(text)["wall_time_s"])
