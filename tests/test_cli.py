"""The `segmote` CLI: specified behaviour, bad input (one line, non-zero exit, nothing written), existing segments."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from conftest import CHEST_CT, CHEST_SEG, bounding_box_ijk, run_cli
from segmote_core.metrics import dice
from segmote_core.segmentation_io import read_segments


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lung_box_ras(chest_ct, truth) -> list[str]:
    corners = chest_ct.ijk_to_ras_points(np.reshape(bounding_box_ijk(truth), (2, 3))).reshape(-1)
    return [f"{v:.4f}" for v in corners]


def test_segment_adds_to_existing_segmentation_keeping_every_segment(tmp_path, capsys, chest_ct, chest_truth,
                                                                     cli_engine):
    out = tmp_path / "case.seg.nrrd"
    shutil.copy(CHEST_SEG, out)
    before = slicerio.read_segmentation(str(out))
    code, stdout, err = run_cli(["segment", str(CHEST_CT), "--out", str(out), "--box-ras",
                             *lung_box_ras(chest_ct, chest_truth["right lung"]), "--name", "AI right lung",
                             "--device", "cpu", "--quiet"], capsys)
    assert code == 0, err
    after = slicerio.read_segmentation(str(out))
    for segment in before["segments"]:
        assert np.array_equal(slicerio.segment_mask(before, segment["id"]), slicerio.segment_mask(after, segment["name"]))
    _, segments = read_segments(out)
    new = next(s for s in segments if s.name == "AI right lung")
    assert dice(new.mask, chest_truth["right lung"]) >= 0.90
    # same name again: refused without --overwrite, file unchanged
    saved = digest(out)
    code, _, err = run_cli(["segment", str(CHEST_CT), "--out", str(out), "--box-ras",
                        *lung_box_ras(chest_ct, chest_truth["right lung"]), "--name", "AI right lung",
                        "--device", "cpu", "--quiet"], capsys)
    assert code == 1 and "already has a segment" in err and digest(out) == saved


def test_segment_label_map_output_and_point_prompts(tmp_path, capsys, chest_ct, chest_truth, cli_engine):
    out = tmp_path / "lung.nii.gz"
    truth = chest_truth["left lung"]
    k = int(np.median(np.nonzero(truth)[0]))
    j, i = np.argwhere(truth[k])[len(np.argwhere(truth[k])) // 2]
    code, _, err = run_cli(["segment", str(CHEST_CT), "--out", str(out), "--point-ijk", str(i), str(j), str(k),
                        "--point-label", "1", "--preset", "lung_parenchyma", "--device", "cpu", "--quiet"], capsys)
    assert code == 0, err
    labels = sitk.ReadImage(str(out))
    assert labels.GetSize() == chest_ct.shape_ijk
    assert np.allclose(labels.GetDirection(), chest_ct.direction.reshape(-1))
    assert np.allclose(labels.GetOrigin(), chest_ct.origin, atol=1e-4)
    array = sitk.GetArrayFromImage(labels)
    assert set(np.unique(array)) <= {0, 1} and array[k].any()
    # one click gives the whole lung (followed up and down), not only its slice; --slice-only gives the slice
    assert array[k - 2].any() and array[k + 2].any() and dice(array, truth) >= 0.8
    one_slice = tmp_path / "one_slice.nii.gz"
    code, _, err = run_cli(["segment", str(CHEST_CT), "--out", str(one_slice), "--point-ijk", str(i), str(j), str(k),
                        "--preset", "lung_parenchyma", "--device", "cpu", "--quiet", "--slice-only"], capsys)
    assert code == 0, err
    one = sitk.GetArrayFromImage(sitk.ReadImage(str(one_slice)))
    assert one[k].any() and np.flatnonzero(one.any(axis=(1, 2))).tolist() == [k]


def test_same_ct_stored_with_another_axis_order(tmp_path, capsys, chest_ct, chest_truth, cli_engine):
    """A transposed, flipped copy of the CT gives the same segmentation in world space."""
    from test_engine import reorder_mask_to
    from test_volume import reorder

    stored = reorder(chest_ct, (2, 0, 1), (False, True, False))
    stored_path = tmp_path / "stored.nrrd"
    sitk.WriteImage(stored.to_sitk(), str(stored_path))
    box = lung_box_ras(chest_ct, chest_truth["left lung"])
    outs = []
    for image in (CHEST_CT, stored_path):
        out = tmp_path / f"{image.stem}.seg.nrrd"
        code, _, err = run_cli(["segment", str(image), "--out", str(out), "--box-ras", *box, "--preset",
                            "lung_parenchyma", "--device", "cpu", "--quiet"], capsys)
        assert code == 0, err
        outs.append(out)
    grid_a, (a,) = read_segments(outs[0])
    grid_b, (b,) = read_segments(outs[1])
    assert not grid_a.same_grid(grid_b)
    assert np.array_equal(reorder_mask_to(grid_b, b.mask, grid_a), a.mask)


@pytest.fixture
def bad_files(tmp_path):
    corrupt = tmp_path / "corrupt.nrrd"
    corrupt.write_bytes(CHEST_CT.read_bytes()[:3000])
    flat = tmp_path / "flat.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.int16)), str(flat))
    four = tmp_path / "four.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.int16), isVector=False), str(four))
    other = tmp_path / "other_arch.pth"
    import torch

    from segmote_core.models import build_tiny_sam_vit

    torch.save(build_tiny_sam_vit().state_dict(), other)
    constant = tmp_path / "constant.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((3, 16, 16), 7, np.int16)), str(constant))
    return {"corrupt": corrupt, "flat": flat, "four": four, "other": other, "constant": constant}


BOX_IJK = ["20", "30", "10", "60", "90", "12"]


@pytest.mark.parametrize("case,args,message", [
    ("missing", ["segment", "{tmp}/nope.nrrd", "--box-ijk", *BOX_IJK], "not found"),
    ("corrupt", ["segment", "{corrupt}", "--box-ijk", *BOX_IJK], "cannot read image"),
    ("2d", ["segment", "{flat}", "--box-ijk", *BOX_IJK], "3-D"),
    ("4d", ["segment", "{four}", "--box-ijk", *BOX_IJK], "3-D"),
    ("box outside", ["segment", str(CHEST_CT), "--box-ijk", "-50", "30", "10", "60", "90", "12"], "outside"),
    ("point outside", ["segment", str(CHEST_CT), "--point-ras", "0", "0", "900"], "outside"),
    ("empty box", ["segment", str(CHEST_CT), "--box-ijk", "20", "30", "10", "20", "90", "12"], "empty"),
    ("no prompt", ["segment", str(CHEST_CT)], "give a prompt"),
    ("unknown model", ["segment", str(CHEST_CT), "--box-ijk", *BOX_IJK, "--model", "sam_vit_x"], "unknown model"),
    ("other architecture", ["segment", str(CHEST_CT), "--box-ijk", *BOX_IJK, "--model", "sam_vit_b",
                            "--checkpoint", "{other}"], "does not fit sam_vit_b"),
    ("bad output", ["segment", str(CHEST_CT), "--box-ijk", *BOX_IJK, "--out", "{tmp}/x.png"], "must end in"),
    ("no contrast, so no default window", ["segment", "{constant}", "--box-ijk", "2", "2", "0", "12", "12", "2"],
     "no contrast"),
    ("window and preset", ["segment", str(CHEST_CT), "--box-ijk", *BOX_IJK, "--window", "0", "100", "--preset",
                           "lung"], "either"),
    ("unknown preset", ["segment", str(CHEST_CT), "--box-ijk", *BOX_IJK, "--preset", "lungs"], "unknown CT window"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, bad_files, case, args, message, cli_engine):
    out = tmp_path / "existing.seg.nrrd"
    shutil.copy(CHEST_SEG, out)
    before = digest(out)
    args = [a.format(tmp=tmp_path, **bad_files) for a in args]
    if "--out" not in args:
        args += ["--out", str(out)]
    code, stdout, err = run_cli(args + ["--device", "cpu", "--quiet"], capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err
    assert digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files left


def test_absent_cuda_is_a_clear_error(tmp_path, capsys, cli_engine):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present on this machine")
    code, _, err = run_cli(["segment", str(CHEST_CT), "--box-ijk", *BOX_IJK, "--out", str(tmp_path / "x.seg.nrrd"),
                        "--device", "cuda"], capsys)
    assert code == 1 and "not available" in err and not (tmp_path / "x.seg.nrrd").exists()


def test_console_script_runs_as_a_process():
    result = subprocess.run([sys.executable, "-m", "segmote_core.cli", "segment", "/nonexistent.nrrd", "--out",
                             "/tmp/never.seg.nrrd", "--box-ijk", *BOX_IJK], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: image not found: /nonexistent.nrrd"]
