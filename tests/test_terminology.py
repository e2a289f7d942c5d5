"""Standard terminology (segmote_core/terminology.py, data/terminology.csv): names resolve to SNOMED CT codes that
agree with the codes 3D Slicer stored in the shipped ground truth; unknown names fall back to a generic code with a
notice; .seg.nrrd output carries the terminology of every new segment and keeps existing segments as they were."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import slicerio
import yaml

from conftest import CHEST_CT, CHEST_SEG
from segmote_core.adapters import read_adapter_header
from segmote_core.outputs import plan_output, save_output
from segmote_core.segmentation_io import Segment, read_segments, save_segments
from segmote_core.terminology import GENERIC, LATERALITY, _table, known_names, normalize_name, resolve

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "segmote_core" / "data" / "terminology.csv"


def codes(entry) -> tuple:
    return entry.category.value, entry.type.value, entry.modifier.value if entry.modifier else None


def slicer_codes(terminology: dict) -> tuple:
    modifier = terminology.get("typeModifier")
    return terminology["category"][1], terminology["type"][1], modifier[1] if modifier else None


@pytest.mark.slow
def test_the_ground_truth_names_get_the_codes_slicer_stored_for_them():
    """The shipped segmentation was labelled in 3D Slicer with its terminology: each name resolves to those codes."""
    truth = slicerio.read_segmentation(str(CHEST_SEG), skip_voxels=True)
    assert len(truth["segments"]) == 7
    for segment in truth["segments"]:
        resolution = resolve(segment["name"])
        assert resolution.notice is None, segment["name"]
        assert codes(resolution.entry) == slicer_codes(segment["terminology"]), segment["name"]


def test_every_class_of_the_configs_and_the_shipped_adapter_is_known():
    names = [read_adapter_header("chest_ct_lungs")["classes"][i]["name"]
             for i in range(2)]
    for config in sorted((ROOT / "configs").glob("*.yaml")):
        names += yaml.safe_load(config.read_text(encoding="utf-8"))["classes"]
    assert set(names) >= {"right lung", "left lung"}
    for name in names:
        assert resolve(name).notice is None, name


@pytest.mark.parametrize("name,expected", [
    ("Liver", ("123037004", "10200004", None)),
    ("LEFT-LUNG", ("123037004", "39607008", "7771000")),
    ("lung_right", ("123037004", "39607008", "24028007")),
    ("  both   lungs ", ("123037004", "39607008", "51440002")),
    ("kidney_left", ("123037004", "64033007", "7771000")),
    ("Urinary Bladder", ("123037004", "89837001", None)),
    ("bladder", ("123037004", "89837001", None)),
    ("tumor", ("49755003", "108369006", None)),
    ("Tumour", ("49755003", "108369006", None)),
    ("lesion", ("49755003", "52988006", None)),
    ("subcutaneous_fat", ("85756007", "67769002", None)),
    ("muscle", ("123037004", "127954009", None)),
    ("prostate", ("123037004", "41216001", None)),
    ("brain", ("123037004", "12738006", None)),
    ("spleen", ("123037004", "78961009", None)),
    ("heart", ("123037004", "80891009", None)),
    ("aorta", ("123037004", "15825003", None)),
    ("vertebrae", ("123037004", "51282000", None)),
])
def test_names_resolve_ignoring_case_spaces_underscores_with_synonyms_and_laterality(name, expected):
    resolution = resolve(name)
    assert resolution.notice is None and codes(resolution.entry) == expected


@pytest.mark.parametrize("name", ["segment", "left liver", "left right lung", "left atrium", "lung lobe 7"])
def test_an_unknown_name_falls_back_to_the_generic_code_with_a_notice(name):
    """Laterality only applies to paired organs, and only one side at a time; anything else is not guessed."""
    resolution = resolve(name)
    assert resolution.entry == GENERIC and codes(GENERIC) == ("85756007", "85756007", None)
    assert f"'{name}'" in resolution.notice and "85756007" in resolution.notice and "\n" not in resolution.notice


def test_the_table_is_well_formed_and_shipped_as_package_data():
    rows = _table()
    assert len(known_names()) >= 80 and all(name == normalize_name(name) for name in rows)
    categories = {"123037004": "Anatomical Structure", "85756007": "Tissue",
                  "49755003": "Morphologically Altered Structure"}
    for name, row in rows.items():
        entry = row.entry
        assert categories[entry.category.value] == entry.category.meaning, name
        assert entry.type.value.isdigit() and 6 <= len(entry.type.value) <= 18 and entry.type.meaning, name
        assert entry.color is not None and all(0 <= c <= 1 for c in entry.color), name
        assert not any(word in LATERALITY for word in name.split()), name  # laterality is a modifier, not a row
    # the same code never carries two meanings
    meanings = {}
    for row in rows.values():
        assert meanings.setdefault(row.entry.type.value, row.entry.type.meaning) == row.entry.type.meaning
    package_data = (ROOT / "pyproject.toml").read_text(encoding="utf-8").split("[tool.setuptools.package-data]")[1]
    assert 'segmote_core = ["data/**/*"]' in package_data and TABLE.is_file()  # tests/test_packaging.py builds it
    assert "segmote_core/data/terminology.csv" in (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")


@pytest.mark.slow
def test_seg_nrrd_output_carries_terminology_and_keeps_existing_segments(tmp_path, chest_ct):
    out = tmp_path / "case.seg.nrrd"
    shutil.copy(CHEST_SEG, out)
    before = slicerio.read_segmentation(str(out))
    mask = np.zeros(chest_ct.array.shape, bool)
    mask[20, 40:60, 30:50] = True
    target = plan_output(out, "seg.nrrd", CHEST_CT)
    save_output(target, chest_ct, [Segment("Liver", mask), Segment("lung_left copy blob", mask),
                                   Segment("kidney right", np.zeros_like(mask))])
    assert target.notices == [resolve("lung_left copy blob").notice]
    after = slicerio.read_segmentation(str(out))
    old = {s["name"]: s for s in after["segments"]}
    for segment in before["segments"]:  # existing segments: same voxels, same terminology, same colour
        kept = old[segment["name"]]
        assert kept["terminology"] == segment["terminology"] and kept["color"] == segment["color"]
        assert np.array_equal(slicerio.segment_mask(before, segment["id"]), slicerio.segment_mask(after, kept["id"]))
    assert slicer_codes(old["Liver"]["terminology"]) == ("123037004", "10200004", None)
    assert old["Liver"]["terminology"]["contextName"].startswith("Segmentation category and type")
    assert np.allclose(old["Liver"]["color"], resolve("liver").entry.color, atol=1e-5)  # its recommended colour
    assert slicer_codes(old["kidney right"]["terminology"]) == ("123037004", "64033007", "24028007")
    assert slicer_codes(old["lung_left copy blob"]["terminology"]) == ("85756007", "85756007", None)


def test_a_segment_colour_of_its_own_wins_over_the_recommended_one(tmp_path, chest_ct):
    out = tmp_path / "auto.seg.nrrd"
    mask = np.zeros(chest_ct.array.shape, bool)
    mask[10, 5:9, 5:9] = True
    save_segments(out, chest_ct, [Segment("right lung", mask, (0.902, 0.098, 0.294))])
    [segment] = slicerio.read_segmentation(str(out))["segments"]
    assert np.allclose(segment["color"], (0.902, 0.098, 0.294))
    assert slicer_codes(segment["terminology"]) == ("123037004", "39607008", "24028007")


@pytest.mark.slow
def test_label_maps_carry_no_terminology_and_give_no_notice(tmp_path, chest_ct):
    out = tmp_path / "labels.nii.gz"
    mask = np.zeros(chest_ct.array.shape, bool)
    mask[10, 5:9, 5:9] = True
    target = plan_output(out, "nifti", CHEST_CT)
    assert save_output(target, chest_ct, [Segment("blob", mask)]) == [16] and target.notices == []
    _, [segment] = read_segments(out)
    assert segment.name == "blob" and np.array_equal(segment.mask, mask)
