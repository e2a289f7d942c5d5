"""The one normalisation resolver: priorities, modality from data and metadata, bad input (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from segmote_core.errors import InputError
from segmote_core.models.backbones import BACKBONES, input_convention
from segmote_core.normalize import (CT_OFFSET, CT_WINDOWS, check_rule, choose_normalization, detect_modality,
                                    from_rule, normalize, rule_for_training)
from segmote_core.volume import read_volume

CT_DEFAULT = input_convention("lite_medsam").ct_window


def mr_like(seed: int = 0) -> np.ndarray:
    """An MR-like volume: zero background, positive tissue with a bright tail (no air at -1000)."""
    rng = np.random.default_rng(seed)
    array = rng.gamma(3.0, 120.0, (6, 40, 40)).astype(np.float32)
    array[:, :8] = 0
    return array


def test_every_backbone_declares_its_training_input_convention():
    for info in BACKBONES.values():
        level, width = info.input_convention.ct_window
        assert width > 0 and info.input_convention.other_percentiles == (0.5, 99.5)
    assert input_convention("an unregistered test model") == BACKBONES["lite_medsam"].input_convention


def test_ct_in_hounsfield_units_gets_the_backbones_ct_default(chest_ct):
    norm = choose_normalization(chest_ct.array)
    assert norm.rule == ("window", *CT_DEFAULT)
    assert norm.automatic and "automatic: CT" in norm.description and "CT default" in norm.description
    assert norm.description.startswith(f"window L{CT_DEFAULT[0]:g} W{CT_DEFAULT[1]:g}")


def test_mr_and_others_get_percentiles_of_the_nonzero_voxels():
    array = mr_like()
    norm = choose_normalization(array)
    nonzero = array[array != 0]
    assert norm.rule[0] == "percentiles" and "MR/other default" in norm.description
    assert np.isclose(norm.low, np.percentile(nonzero, 0.5), rtol=1e-3)
    assert np.isclose(norm.high, np.percentile(nonzero, 99.5), rtol=1e-3)
    # declared MR wins over data that happen to contain air-like values
    hu_like = np.linspace(-1000, 500, 6 * 40 * 40).reshape(6, 40, 40)
    assert choose_normalization(hu_like).rule[0] == "window"
    declared = choose_normalization(hu_like, modality="MR")
    assert declared.rule[0] == "percentiles" and "MR per the file's metadata" in declared.description


def test_priority_window_then_preset_then_adapter_rule_then_default(chest_ct):
    adapter_rule = {"kind": "window", "level": -700.0, "width": 600.0}
    array = chest_ct.array
    assert choose_normalization(array, (40, 400), adapter_rule=adapter_rule).rule == ("window", 40.0, 400.0)
    assert choose_normalization(array, preset="bone", adapter_rule=adapter_rule).rule == ("window", *CT_WINDOWS["bone"])
    from_adapter = choose_normalization(array, adapter_rule=adapter_rule)
    assert from_adapter.rule == ("window", -700.0, 600.0) and "adapter" in from_adapter.description
    assert not from_adapter.automatic
    with pytest.raises(InputError, match="either"):
        choose_normalization(array, (40, 400), "lung")
    with pytest.raises(InputError, match="unknown CT window preset"):
        choose_normalization(array, preset="lungs")


def test_an_adapters_ct_window_is_not_applied_to_an_mr():
    adapter_rule = {"kind": "window", "level": -700.0, "width": 600.0}
    on_mr = choose_normalization(mr_like(), adapter_rule=adapter_rule)
    assert on_mr.rule == choose_normalization(mr_like()).rule and on_mr.rule[0] == "percentiles"
    assert "adapter's CT window does not apply" in on_mr.description
    declared_mr = choose_normalization(np.linspace(-1000, 500, 6 * 40 * 40).reshape(6, 40, 40), modality="MR",
                                       adapter_rule=adapter_rule)
    assert declared_mr.rule[0] == "percentiles"


def test_training_stores_the_automatic_rule_and_it_resolves_per_modality(chest_ct):
    rule = rule_for_training()
    assert rule["kind"] == "auto" and check_rule(rule) is rule
    assert from_rule(chest_ct.array, rule).rule == ("window", *CT_DEFAULT)
    assert from_rule(mr_like(), rule).rule[0] == "percentiles"
    assert rule_for_training((40, 400)) == {"kind": "window", "level": 40.0, "width": 400.0}


def test_ct_stored_without_hounsfield_units_says_which_default_was_used(chest_ct):
    unsigned = (chest_ct.array.clip(-1024) + CT_OFFSET).astype(np.uint16)  # RescaleIntercept dropped
    declared = choose_normalization(unsigned, modality="CT")
    level, width = CT_DEFAULT
    assert declared.rule == ("window", level + CT_OFFSET, width)  # the same HU window in the file's values
    assert f"HU = value - {CT_OFFSET:g}" in declared.description
    # the same voxels then look exactly as the HU scan does to the model
    assert np.allclose(normalize(unsigned, declared), normalize(chest_ct.array.clip(-1024), choose_normalization(chest_ct.array)))
    undeclared = choose_normalization(unsigned)
    assert undeclared.rule[0] == "percentiles"
    assert "not CT in Hounsfield units" in undeclared.description and "needs a window" in undeclared.description


@pytest.mark.parametrize("array,message", [
    (np.zeros((3, 8, 8), np.int16), "every voxel is 0"),
    (np.full((3, 8, 8), np.nan, np.float32), "no finite intensities"),
])
def test_image_with_no_decidable_default_asks_for_a_window_or_preset(array, message):
    with pytest.raises(InputError, match=message) as error:
        choose_normalization(array)
    assert "\n" not in str(error.value)
    if "every voxel" in message:
        assert "give a window (level, width) or a preset" in str(error.value)
    assert choose_normalization(array, (40, 400)).rule == ("window", 40.0, 400.0)  # an explicit window still works


@pytest.mark.parametrize("rule,message", [
    ({"kind": "sigmoid", "a": 1}, "unknown kind 'sigmoid'"),
    ({"mode": "ct_window", "level": 40, "width": 400}, "unknown kind None"),
    ({"kind": "window", "level": 40}, "'width' is missing"),
    ({"kind": "window", "level": "40", "width": 400}, "finite numbers"),
    ({"kind": "window", "level": 40, "width": -1}, "positive"),
    ({"kind": "percentiles", "low_pct": 99, "high_pct": 1}, "low_pct < high_pct"),
    ({"kind": "percentiles", "low_pct": 1, "high_pct": 99, "voxels": "some"}, "voxels"),
    ({"kind": "auto", "ct": {"kind": "window", "level": 0, "width": 1}, "other": {"kind": "x"}}, "unknown kind 'x'"),
    ([1, 2], "not a mapping"),
])
def test_unknown_or_malformed_rules_are_one_line_errors(rule, message):
    with pytest.raises(InputError, match=message) as error:
        check_rule(rule)
    assert "\n" not in str(error.value) and "give a CT window or preset" in str(error.value)


def test_modality_metadata_reaches_the_resolver(tmp_path, chest_ct):
    image = sitk.GetImageFromArray(chest_ct.array[10:14])
    image.SetMetaData("modality", "MR")
    sitk.WriteImage(image, str(tmp_path / "declared.nrrd"))
    volume = read_volume(tmp_path / "declared.nrrd")
    assert volume.modality == "MR"
    assert choose_normalization(volume.array, modality=volume.modality).rule[0] == "percentiles"
    assert read_volume(tmp_path / "declared.nrrd").modality == "MR"
    sitk.WriteImage(sitk.GetImageFromArray(chest_ct.array[10:14]), str(tmp_path / "plain.nrrd"))
    assert read_volume(tmp_path / "plain.nrrd").modality is None
    assert detect_modality(read_volume(tmp_path / "plain.nrrd").array)[0] == "ct"


def test_dicom_series_modality_is_read(tmp_path, chest_ct):
    image = sitk.GetImageFromArray(chest_ct.array[10:13].astype(np.int16))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for index in range(image.GetDepth()):
        plane = image[:, :, index]
        for key, value in (("0008|0060", "CT"), ("0020|000e", "1.2.826.0.1.3680043.2.1125.1"),
                           ("0020|0013", str(index + 1)),
                           ("0020|0032", f"0\\0\\{index * 10}"), ("0020|0037", "1\\0\\0\\0\\1\\0")):
            plane.SetMetaData(key, value)
        writer.SetFileName(str(tmp_path / f"{index}.dcm"))
        writer.Execute(plane)
    volume = read_volume(tmp_path)
    assert volume.modality == "CT"
    assert choose_normalization(volume.array, modality=volume.modality).rule == ("window", *CT_DEFAULT)


def test_adapter_with_a_malformed_rule_is_refused_at_load_in_one_line(tmp_path):
    from segmote_core.adapters import save_adapter
    from segmote_core.engine import Engine
    from segmote_core.models import build_tiny_sam_vit
    from segmote_core.models.segmote import SegMoTE

    engine = Engine(backbone=build_tiny_sam_vit(), device="cpu")
    path = save_adapter(tmp_path / "odd.safetensors", SegMoTE(engine.backbone), ["organ"],
                        {"kind": "gamma", "gamma": 0.5}, backbone_sha256=None)
    with pytest.raises(InputError, match="odd.safetensors.*unknown kind 'gamma'") as error:
        engine.load_adapter(path)
    assert "\n" not in str(error.value) and engine.segmote is None and engine.adapter_header is None
