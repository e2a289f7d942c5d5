"""Adapters through the engine and the CLI: a fresh adapter changes nothing; `auto` writes valid segments."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from conftest import LUNG_WINDOW
from segmote_core import cli
from segmote_core.adapters import save_adapter
from segmote_core.checkpoints import load_backbone
from segmote_core.models.segmote import SegMoTE, SegMoTEConfig
from segmote_core.normalize import window
from segmote_core.volume import Volume

pytestmark = pytest.mark.slow  # LiteMedSAM or real scans throughout: `make test` only (tests/conftest.py)


@pytest.fixture(scope="module")
def small_ct_file(tmp_path_factory, chest_ct):
    volume = Volume(chest_ct.array[15:19].copy(), chest_ct.spacing,
                    chest_ct.ijk_to_lps[:3, 3] + 15 * chest_ct.ijk_to_lps[:3, 2], chest_ct.direction)
    path = tmp_path_factory.mktemp("ct") / "small_ct.nrrd"
    sitk.WriteImage(volume.to_sitk(), str(path))
    return path


@pytest.fixture(scope="module")
def fresh_adapter(tmp_path_factory):
    backbone = load_backbone("lite_medsam")
    model = SegMoTE(backbone, SegMoTEConfig(num_classes=2))
    path = tmp_path_factory.mktemp("adapter") / "fresh.safetensors"
    save_adapter(path, model, ["right lung", ("left lung", (0.2, 0.4, 0.9))],
                 window(*LUNG_WINDOW).rule_dict(), backbone_sha256=backbone.weights_sha256)
    return path


def test_fresh_adapter_gives_the_same_segmentation_voxel_for_voxel(tmp_path, small_ct_file, fresh_adapter):
    outputs = []
    for extra in ([], ["--adapter", str(fresh_adapter)]):
        out = tmp_path / f"out{len(extra)}.seg.nrrd"
        code = cli.main(["segment", str(small_ct_file), "--out", str(out), "--box-ijk", "20", "30", "0", "60",
                         "95", "3", "--preset", "lung_parenchyma", "--device", "cpu", "--quiet"] + extra)
        assert code == 0
        outputs.append(slicerio.read_segmentation(str(out))["voxels"])
    assert outputs[0].any()
    assert np.array_equal(outputs[0], outputs[1])


def test_auto_with_an_untrained_adapter_writes_a_valid_segmentation(tmp_path, small_ct_file, fresh_adapter,
                                                                   capsys):
    out = tmp_path / "auto.seg.nrrd"
    code = cli.main(["auto", str(small_ct_file), "--adapter", str(fresh_adapter), "--out", str(out),
                     "--device", "cpu"])
    assert code == 0
    segmentation = slicerio.read_segmentation(str(out))
    names = [s["name"] for s in segmentation["segments"]]
    assert names == ["right lung", "left lung"]
    assert np.allclose(segmentation["segments"][1]["color"], (0.2, 0.4, 0.9))
    assert segmentation["voxels"].shape[-3:] == sitk.ReadImage(str(small_ct_file)).GetSize()
    record = json.loads((tmp_path / "auto.json").read_text())  # the run record beside the output
    assert record["command"] == "auto" and record["adapter"]["classes"] == ["right lung", "left lung"]
    assert record["adapter"]["sha256"] == hashlib.sha256(fresh_adapter.read_bytes()).hexdigest()
    assert [s["name"] for s in record["segments"]] == names and record["normalization"].startswith("window")
    # what the command printed is what it recorded
    assert capsys.readouterr().out.splitlines() == [f"normalisation: {record['normalization']}",
                                                    *(f"{s['name']}: {s['voxels']} voxels" for s in record["segments"]),
                                                    f"-> {out}"]


def test_auto_refuses_unknown_classes_and_adapters_for_other_backbones(tmp_path, small_ct_file, fresh_adapter, capsys):
    out = tmp_path / "never.seg.nrrd"
    code = cli.main(["auto", str(small_ct_file), "--adapter", str(fresh_adapter), "--out", str(out),
                     "--classes", "liver", "--device", "cpu", "--quiet"])
    assert code == 1 and "no class 'liver'" in capsys.readouterr().err and not out.exists()
    from segmote_core.models import build_tiny_sam_vit

    other = tmp_path / "tiny.safetensors"
    save_adapter(other, SegMoTE(build_tiny_sam_vit()), ["x"], {"kind": "percentiles", "low_pct": 0.5,
                                                                 "high_pct": 99.5}, backbone_sha256=None)
    code = cli.main(["auto", str(small_ct_file), "--adapter", str(other), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "sam_vit_tiny" in err and "lite_medsam" in err and not out.exists()


def test_auto_over_a_folder_writes_one_result_per_case(tmp_path, small_ct_file, fresh_adapter, capsys):
    import shutil

    cases = tmp_path / "imagesTs"
    cases.mkdir()
    shutil.copy(small_ct_file, cases / "chest_001_0000.nrrd")
    sitk.WriteImage(sitk.ReadImage(str(small_ct_file)), str(cases / "chest_002_0000.nii.gz"))
    out = tmp_path / "results"
    code = cli.main(["auto", "-i", str(cases), "-o", str(out), "--adapter", str(fresh_adapter), "--device", "cpu"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["chest_001.json", "chest_001.seg.nrrd", "chest_002.json",
                                                    "chest_002.seg.nrrd"]
    first, second = (slicerio.read_segmentation(str(out / f"chest_00{n}.seg.nrrd"))["voxels"] for n in (1, 2))
    assert np.array_equal(first, second)  # the same scan stored twice
    assert "2 of 2 cases done" in capsys.readouterr().out
