"""Folder runs of `segment` / `auto`, prompts from Slicer markups and CSV files, and the run record next to each
output: real files, the real LiteMedSAM model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import CHEST_CT, bounding_box_ijk, chest_ct_slab, run_cli
from segmote_core.metrics import dice
from segmote_core import engine as engine_module
from segmote_core.cases import find_input_cases
from segmote_core.cli import common
from segmote_core.errors import InputError
from segmote_core.prompt_files import read_prompts
from segmote_core.segmentation_io import read_segments

LPS = np.array([-1.0, -1.0, 1.0])


def lung_slice_box_ras(chest_ct, mask) -> tuple[np.ndarray, int]:
    """RAS corners of the box around the lung on its middle axial slice, and that slice."""
    k = int(np.median(np.nonzero(mask)[0]))
    box = bounding_box_ijk(mask & (np.arange(mask.shape[0]) == k)[:, None, None])
    return chest_ct.ijk_to_ras_points(np.reshape(box, (2, 3))), k


def test_a_folder_of_three_stored_copies_loads_the_model_once(tmp_path, capsys, monkeypatch, chest_ct, chest_truth):
    """Five slices of the chest CT stored three ways, NRRD, NIfTI and a transposed, flipped NRRD (+ one unreadable
    file): one engine, one output and run record per case, the broken case reported in one line, the others the
    same in world space."""
    from test_engine import reorder_mask_to
    from test_volume import reorder

    lung = chest_truth["right lung"]
    middle = int(np.median(np.nonzero(lung)[0]))
    slab = chest_ct_slab(chest_ct, middle - 2, middle + 3)
    truth = {"right lung": lung[middle - 2:middle + 3]}
    cases = tmp_path / "cases"
    cases.mkdir()
    sitk.WriteImage(slab.to_sitk(), str(cases / "a_ct.nrrd"))
    sitk.WriteImage(slab.to_sitk(), str(cases / "b_ct.nii.gz"))
    stored = reorder(slab, (2, 0, 1), (False, True, False))
    sitk.WriteImage(stored.to_sitk(), str(cases / "c_ct.nrrd"))
    (cases / "d_broken.nrrd").write_bytes(b"NRRD0004\nnot an image\n")

    built = []
    original_init = engine_module.Engine.__init__

    def counting_init(self, *args, **kwargs):
        built.append(args[0] if args else kwargs.get("model"))
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(engine_module.Engine, "__init__", counting_init)
    monkeypatch.setattr(common, "_engines", {})
    corners, k = lung_slice_box_ras(slab, truth["right lung"])
    out = tmp_path / "results"
    code, stdout, err = run_cli(["segment", "-i", str(cases), "-o", str(out), "--box-ras",
                             *[f"{v:.4f}" for v in corners.reshape(-1)], "--name", "right lung", "--preset",
                             "lung_parenchyma", "--device", "cpu", "--runtime", "torch"], capsys)
    assert code == 1  # one case failed
    assert built == ["lite_medsam"]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "d_broken" in errors[0]
    assert sorted(p.name for p in out.iterdir()) == ["a_ct.json", "a_ct.seg.nrrd", "b_ct.json", "b_ct.seg.nrrd",
                                                    "c_ct.json", "c_ct.seg.nrrd"]
    assert "3 of 4 cases done, 1 failed" in stdout and "a_ct" in stdout and "failed" in stdout

    grid_a, (a,) = read_segments(out / "a_ct.seg.nrrd")
    grid_b, (b,) = read_segments(out / "b_ct.seg.nrrd")
    grid_c, (c,) = read_segments(out / "c_ct.seg.nrrd")
    assert a.name == b.name == c.name == "right lung"
    assert dice(a.mask[k], truth["right lung"][k]) > 0.9
    assert dice(b.mask, a.mask) > 0.99
    assert not grid_a.same_grid(grid_c)
    assert dice(reorder_mask_to(grid_c, c.mask, grid_a), a.mask) > 0.98
    record = json.loads((out / "c_ct.json").read_text())
    assert record["case"] == "c_ct" and record["segments"][0]["voxels"] == int(c.mask.sum())
    np.testing.assert_allclose(record["prompts"][0]["box_ras"], corners, atol=1e-3)


def test_nnunet_images_folder_reads_channel_zero_of_each_case(tmp_path):
    image = sitk.GetImageFromArray(np.zeros((2, 3, 4), np.int16))
    for name in ("lung_001_0000.nii.gz", "lung_001_0001.nii.gz", "lung_002_0000.nii.gz", "lung_002.seg.nrrd"):
        sitk.WriteImage(image, str(tmp_path / name))
    found = find_input_cases(tmp_path)
    assert [(c.name, c.path.name) for c in found] == [("lung_001", "lung_001_0000.nii.gz"),
                                                     ("lung_002", "lung_002_0000.nii.gz")]


def test_a_folder_without_images_is_one_line_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("no scans here")
    code, _, err = run_cli(["segment", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--box-ijk", "1", "1",
                        "1", "4", "4", "1"], capsys)
    assert code == 1 and err.strip().startswith("error: folder") and "holds no images" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def roi(label, center, size, system="LPS") -> dict:
    """An ROI node as 3D Slicer 5 writes it."""
    return {"type": "ROI", "coordinateSystem": system, "coordinateUnits": "mm", "roiType": "Box",
            "center": list(center), "orientation": [1, 0, 0, 0, 1, 0, 0, 0, 1], "size": list(size),
            "controlPoints": [{"id": "1", "label": label, "description": "", "position": list(center),
                               "positionStatus": "defined"}]}


def slicer_markups(roi_lps_center, roi_size, points_lps, system="LPS", more_rois=()) -> dict:
    """A markups file as 3D Slicer 5 writes it: ROI nodes ("right lung" and more_rois), one point list node."""
    return {"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
                       "Schema/markups-schema-v1.0.3.json#",
            "markups": [
                roi("right lung", roi_lps_center, roi_size, system), *more_rois,
                {"type": "Fiducial", "coordinateSystem": system, "coordinateUnits": "mm",
                 "controlPoints": [{"id": str(n), "label": label, "description": description,
                                    "position": list(p), "positionStatus": "defined"}
                                   for n, (label, description, p) in enumerate(points_lps, 1)]},
            ]}


def test_prompts_from_slicer_markups_two_objects_with_record_statistics_and_preview(
        tmp_path, capsys, cli_engine, chest_ct, chest_truth):
    right, k = lung_slice_box_ras(chest_ct, chest_truth["right lung"])
    center_lps, size = (right.mean(axis=0) * LPS), np.abs(right[1] - right[0])
    left = chest_truth["left lung"]
    j, i = np.argwhere(left[k])[len(np.argwhere(left[k])) // 2]
    inside_lps = chest_ct.ijk_to_ras_points([[i, j, k]])[0] * LPS
    left_box = chest_ct.ijk_to_ras_points(np.reshape(bounding_box_ijk(left & (np.arange(left.shape[0]) == k)[:, None,
                                                                                                           None]), (2, 3)))
    markups = slicer_markups(center_lps, size, [("left lung-1", "", inside_lps)], more_rois=[
        roi("left lung", left_box.mean(axis=0) * LPS, np.abs(left_box[1] - left_box[0]))])
    prompts = tmp_path / "prompts.mrk.json"
    prompts.write_text(json.dumps(markups))
    out = tmp_path / "lungs.seg.nrrd"
    code, stdout, err = run_cli(["segment", str(CHEST_CT), "--out", str(out), "--prompts", str(prompts), "--preset",
                             "lung_parenchyma", "--device", "cpu", "--statistics", "--preview"], capsys)
    assert code == 0, err
    _, segments = read_segments(out)
    masks = {s.name: s.mask for s in segments}
    assert set(masks) == {"right lung", "left lung"}
    assert dice(masks["right lung"][k], chest_truth["right lung"][k]) > 0.9
    assert dice(masks["left lung"][k], left[k]) > 0.8
    record = json.loads((tmp_path / "lungs.json").read_text())
    assert record["model"]["name"] == "lite_medsam" and len(record["model"]["weights_sha256"]) == 64
    assert record["normalization"].startswith("window L-500 W1000") or "lung" in record["normalization"]
    by_name = {p["name"]: p for p in record["prompts"]}
    np.testing.assert_allclose(np.sort(by_name["right lung"]["box_ras"], axis=0), np.sort(right, axis=0), atol=1e-3)
    np.testing.assert_allclose(by_name["left lung"]["points_ijk"], [[i, j, k]], atol=1e-3)
    assert by_name["left lung"]["point_labels"] == [1]
    stats = {s["name"]: s for s in record["segments"]}
    voxel_ml = float(np.prod(chest_ct.spacing)) / 1000
    assert stats["left lung"]["volume_ml"] == pytest.approx(masks["left lung"].sum() * voxel_ml, abs=1e-3)
    assert stats["left lung"]["mean_intensity"] == pytest.approx(chest_ct.array[masks["left lung"]].mean())
    assert stats["left lung"]["mean_intensity"] < -500  # lung is air-filled
    assert 0 < stats["right lung"]["predicted_iou"] <= 1
    assert "mean" in stdout and "left lung" in stdout
    png = tmp_path / "lungs.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and record["preview"] == str(png)


def test_markups_in_ras_and_lps_give_the_same_voxels(tmp_path, chest_ct):
    center_ras, size = np.array([-50.0, -60.0, -150.0]), (40.0, 30.0, 0.5)
    point_ras = np.array([-40.0, -55.0, -150.0])
    files = {}
    for system, flip in (("RAS", np.ones(3)), ("LPS", LPS)):
        files[system] = tmp_path / f"{system}.mrk.json"
        files[system].write_text(json.dumps(slicer_markups(center_ras * flip, size, [
            ("lesion-1", "", point_ras * flip), ("lesion-2", "negative", (point_ras + 5) * flip)], system)))
    voxels = {system: {o.name: o.in_voxels(chest_ct) for o in read_prompts(path).for_case("any")}
              for system, path in files.items()}
    for name in ("right lung", "lesion"):
        for a, b in zip(voxels["RAS"][name], voxels["LPS"][name]):
            if a is not None:
                np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float))
    assert voxels["LPS"]["lesion"][2] == [1, 0]  # the "negative" description makes a negative point
    np.testing.assert_allclose(voxels["RAS"]["lesion"][1][0], chest_ct.ras_to_ijk([point_ras])[0])


CSV = """case,name,kind,x,y,z,space
a_ct,liver,box,10,20,5,IJK
a_ct,liver,box,40,50,5,IJK
a_ct,liver,negative,30,30,5,IJK
,marker,positive,-50,-60,-150,LPS
"""


def test_csv_prompts_per_case_and_for_every_case(tmp_path, chest_ct):
    path = tmp_path / "prompts.csv"
    path.write_text(CSV)
    table = read_prompts(path)
    objects = {o.name: o for o in table.for_case("a_ct")}
    box, points, labels = objects["liver"].in_voxels(chest_ct)
    assert box.tolist() == [10, 20, 5, 40, 50, 5] and labels == [0]
    _, marker, _ = objects["marker"].in_voxels(chest_ct)
    np.testing.assert_allclose(marker[0], chest_ct.ras_to_ijk([[50, 60, -150]])[0])
    assert [o.name for o in table.for_case("other")] == ["marker"]


@pytest.mark.parametrize("name,text,message", [
    ("p.csv", "case,name,kind,x,y,z\na,liver,circle,1,2,3\n", "p.csv line 2: kind 'circle'"),
    ("p.csv", "case,name,kind,x,y,z,space\na,liver,box,1,2,3,XYZ\n", "p.csv line 2: unknown coordinate system 'XYZ'"),
    ("p.csv", "case,name,kind,x,y,z\na,liver,box,1,2,3\n", "object 'liver' of case 'a' has 1 box corners"),
    ("p.csv", "case,name,kind,x\na,liver,box,1\n", "lacks the column(s) y, z"),
    ("p.csv", "case,name,kind,x,y,z\na,liver,box,1,two,3\n", "p.csv line 2: x, y, z must be numbers"),
    ("p.mrk.json", json.dumps({"markups": [{"type": "Fiducial", "coordinateSystem": "XYZ", "controlPoints": []}]}),
     "p.mrk.json markup 1 (Fiducial): unknown coordinate system 'XYZ'"),
    ("p.mrk.json", json.dumps({"markups": [{"type": "Line", "controlPoints": []}]}), "markup 1 (Line): type 'Line'"),
    ("p.mrk.json", json.dumps({"markups": [{"type": "ROI", "center": [1, 2], "size": [1, 1, 1]}]}),
     "markup 1 (ROI): center must be 3 finite numbers"),
    ("p.mrk.json", "{not json", "cannot read p.mrk.json: not valid JSON"),
])
def test_malformed_prompt_files_are_one_line_naming_the_entry(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InputError) as error:
        read_prompts(path)
    assert message in str(error.value) and "\n" not in str(error.value)
    code, _, err = run_cli(["segment", str(CHEST_CT), "--out", str(tmp_path / "o.seg.nrrd"), "--prompts", str(path)],
                       capsys)
    assert code == 1 and err.strip() == f"error: {error.value}"
    assert not (tmp_path / "o.seg.nrrd").exists()


def test_torchrun_shares_the_cases_between_two_processes(tmp_path, chest_ct):
    """Two CPU processes under torchrun: rank r takes cases r, r + 2, ...; one summary for the whole run. Each case
    is answered on its prompted slice only (--slice-only): what is tested is how the cases are shared."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from segmote_core.volume import Volume

    cases = tmp_path / "cases"
    cases.mkdir()
    for start in (15, 16, 17):
        crop = Volume(chest_ct.array[start:start + 3].copy(), chest_ct.spacing,
                      chest_ct.ijk_to_lps[:3, 3] + start * chest_ct.ijk_to_lps[:3, 2], chest_ct.direction)
        sitk.WriteImage(crop.to_sitk(), str(cases / f"crop{start}.nrrd"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(root),
                                                                                os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "segmote_core", "segment", "-i", str(cases), "-o",
               str(tmp_path / "out"), "--box-ijk", "20", "30", "1", "60", "95", "1", "--preset", "lung_parenchyma",
               "--slice-only", "--device", "cpu", "--runtime", "torch"]
    finished = subprocess.run(command, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count("3 of 3 cases done") == 1
    ranks = {name: json.loads((tmp_path / "out" / f"{name}.json").read_text())["process"]
             for name in ("crop15", "crop16", "crop17")}
    assert {name: p["rank"] for name, p in ranks.items()} == {"crop15": 0, "crop16": 1, "crop17": 0}
    assert {p["world_size"] for p in ranks.values()} == {2}
    for name in ranks:
        _, (segment,) = read_segments(tmp_path / "out" / f"{name}.seg.nrrd")
        assert segment.mask[1].sum() > 100  # the lung on the prompted slice


def test_a_preview_naming_an_input_or_the_output_is_refused_before_anything_is_written(tmp_path, capsys):
    image = tmp_path / "ct.nrrd"
    shutil.copy(CHEST_CT, image)
    before = image.read_bytes()
    out = tmp_path / "o.seg.nrrd"
    for preview, message in ((image, "is one of the inputs"), (out, "would overwrite the segmentation")):
        code, _, err = run_cli(["segment", str(image), "--out", str(out), "--box-ijk", "20", "30", "17", "60", "90", "17",
                            "--preview", str(preview)], capsys)
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1
    assert image.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ct.nrrd"]


# ---- what a folder holds: channels, DICOM beside images, odd names ------------------------------------------
def _tiny_image(path, value=0):
    sitk.WriteImage(sitk.GetImageFromArray(np.full((3, 8, 8), value, np.int16)), str(path))
    return path


def test_nnunet_channels_beside_a_stray_image_are_not_cases(tmp_path):
    for name in ("A_0000", "A_0001", "B_0000", "B_0001", "stray"):
        _tiny_image(tmp_path / f"{name}.nii.gz")
    cases = find_input_cases(tmp_path)
    assert [(c.name, c.path.name) for c in cases] == [("A", "A_0000.nii.gz"), ("B", "B_0000.nii.gz"),
                                                      ("stray", "stray.nii.gz")]


def test_a_dicom_series_beside_an_image_is_a_case_and_dot_names_the_folder(tmp_path, monkeypatch):
    from segmote_core.volume import Volume
    from test_dicom_seg import write_ct_series

    folder = tmp_path / "CT-series"
    write_ct_series(Volume(np.zeros((3, 8, 8), np.int16), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3)), folder)
    _tiny_image(folder / "extra.nii.gz")
    cases = find_input_cases(folder)
    assert [(c.name, c.path) for c in cases] == [("CT-series", folder), ("extra", folder / "extra.nii.gz")]
    (folder / "extra.nii.gz").unlink()
    monkeypatch.chdir(folder)
    assert [c.name for c in find_input_cases(".")] == ["CT-series"]  # was "" (results/.seg.nrrd)


def test_a_newline_in_a_case_name_stays_on_its_row_of_the_summary():
    from pathlib import Path

    from segmote_core.cli.batch import CaseResult, summary_table

    table = summary_table([CaseResult("evil\nname", Path("out/evil\nname.seg.nrrd")),
                           CaseResult("other", error="cannot read\nimage")])
    assert len(table.splitlines()) == 4 and "evil\\nname" in table  # header, two rows, the count


def test_an_unreadable_image_is_permission_denied_not_missing(tmp_path, capsys, monkeypatch):
    import builtins

    from segmote_core import volume as volume_module

    image = _tiny_image(tmp_path / "ct.nrrd")
    real_open = builtins.open

    def denied(path, *args, **kwargs):
        if str(path) == str(image):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(volume_module, "open", denied, raising=False)
    code, _, err = run_cli(["segment", str(image), "--out", str(tmp_path / "o.seg.nrrd"), "--box-ijk", "1", "1", "1",
                        "5", "5", "1"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "permission denied" in lines[0] and "exist" not in lines[0]


def test_ctrl_c_after_a_written_case_says_what_was_written(tmp_path, capsys, monkeypatch, cli_engine):
    from segmote_core import volume as volume_module

    cases = tmp_path / "cases"
    cases.mkdir()
    image = sitk.ReadImage(str(CHEST_CT))[:, :, 16:18]
    for name in ("a", "b"):
        sitk.WriteImage(image, str(cases / f"{name}.nrrd"))
    real_read = volume_module.read_volume
    calls = []

    def interrupt_second(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(volume_module, "read_volume", interrupt_second)
    out = tmp_path / "results"
    code, _, err = run_cli(["segment", "-i", str(cases), "-o", str(out), "--box-ijk", "20", "30", "1", "60", "90", "1",
                        "--device", "cpu", "--runtime", "torch", "-q"], capsys)
    assert code == 130 and (out / "a.seg.nrrd").is_file() and not (out / "b.seg.nrrd").exists()
    assert "nothing was written" not in err and "interrupted after 1 of 2 cases" in err and "a.seg.nrrd" in err


def test_a_folder_output_whose_parent_is_a_file_is_one_line(tmp_path, capsys):
    cases = tmp_path / "cases"
    cases.mkdir()
    for name in ("a", "b"):
        _tiny_image(cases / f"{name}.nrrd")
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = run_cli(["segment", "-i", str(cases), "-o", str(tmp_path / "notes.txt" / "results"), "--box-ijk", "1",
                        "1", "1", "5", "5", "1"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "is a file, not a folder" in lines[0]
    assert (tmp_path / "notes.txt").read_text() == "mine"
