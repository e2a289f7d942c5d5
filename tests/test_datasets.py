"""Dataset discovery (nnU-Net raw, Slicer pairs), grid checks, and the seeded splits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from segmote_core.datasets import (
    Case,
    find_cases,
    load_nnunet,
    load_slicer_pairs,
    pair_scan,
    read_labels,
    resolve_path,
    split_cases,
    split_slices,
)
from segmote_core.errors import InputError
from segmote_core.segmentation_io import Segment, save_segments
from segmote_core.volume import read_volume


def write_image(path, array, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return path


def scan_and_labels(seed=0, shape=(4, 16, 16)):
    rng = np.random.default_rng(seed)
    scan = rng.integers(-1000, 1000, shape).astype(np.int16)
    labels = np.zeros(shape, np.uint8)
    labels[1:3, 2:6, 2:6] = 1
    labels[:, 10:14, 8:12] = 2
    return scan, labels


def one_line(error) -> str:
    message = str(error.value)
    assert message and "\n" not in message
    return message


# ---- nnU-Net raw ---------------------------------------------------------------------------------------
def make_nnunet(root, cases=3, v1=False):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for index in range(cases):
        scan, labels = scan_and_labels(index)
        write_image(root / "imagesTr" / f"case_{index:03d}_0000.nii.gz", scan)
        write_image(root / "labelsTr" / f"case_{index:03d}.nii.gz", labels)
    if v1:
        info = {"modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "spleen"},
                "training": [{"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"}
                             for i in range(cases)]}
    else:
        info = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2},
                "numTraining": cases, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(info))
    return root


@pytest.mark.parametrize("v1", [False, True])
def test_nnunet_cases_classes_and_masks(tmp_path, v1):
    root = make_nnunet(tmp_path / "Dataset001_Test", v1=v1)
    cases = load_nnunet(root)
    assert [c.case_id for c in cases] == ["case_000", "case_001", "case_002"]
    assert all(c.modality == "CT" for c in cases)
    volume, masks = cases[1].load()
    _, labels = scan_and_labels(1)
    assert set(masks) == {"liver", "spleen"}
    np.testing.assert_array_equal(masks["liver"], labels == 1)
    np.testing.assert_array_equal(masks["spleen"], labels == 2)
    assert find_cases(root)[0].case_id == "case_000"  # layout detected from dataset.json


def test_nnunet_missing_image_is_one_line(tmp_path):
    root = make_nnunet(tmp_path / "ds")
    (root / "imagesTr" / "case_001_0000.nii.gz").unlink()
    with pytest.raises(InputError) as error:
        load_nnunet(root)
    assert "case_001" in one_line(error)


# ---- Slicer pairs --------------------------------------------------------------------------------------
def test_slicer_pair_beside_its_scan(tmp_path):
    scan, labels = scan_and_labels()
    folder = tmp_path / "patient1"
    folder.mkdir()
    write_image(folder / "chest.nrrd", scan)
    volume = read_volume(folder / "chest.nrrd")
    save_segments(folder / "Segmentation.seg.nrrd", volume,
                  [Segment("liver", labels == 1), Segment("spleen", labels == 2)])
    cases = load_slicer_pairs(tmp_path, modality="CT")
    assert len(cases) == 1 and cases[0].image.name == "chest.nrrd"
    _, masks = cases[0].load()
    np.testing.assert_array_equal(masks["spleen"], labels == 2)
    # Two scans in the folder: the one with the same name wins; without one the error names the scans.
    write_image(folder / "other.nrrd", scan)
    with pytest.raises(InputError) as error:
        pair_scan(folder / "Segmentation.seg.nrrd")
    assert "chest.nrrd" in one_line(error) and "other.nrrd" in one_line(error)
    (folder / "Segmentation.seg.nrrd").rename(folder / "chest.seg.nrrd")
    assert pair_scan(folder / "chest.seg.nrrd").name == "chest.nrrd"


def test_shipped_chest_ct_pair():
    cases = find_cases(image="pkg:slicerio/data/CTChest4.nrrd", segmentation="pkg:slicerio/data/Segmentation.seg.nrrd")
    assert cases[0].case_id == "CTChest4"
    assert resolve_path("pkg:slicerio/data/CTChest4.nrrd").is_file()
    with pytest.raises(InputError):
        resolve_path("pkg:no_such_package_xyz/file.nrrd")


# ---- grids -----------------------------------------------------------------------------------------------
def test_labels_on_another_grid_name_both_geometries(tmp_path):
    scan, labels = scan_and_labels()
    write_image(tmp_path / "scan.nrrd", scan, spacing=(1.0, 1.0, 2.0))
    write_image(tmp_path / "labels.nrrd", labels, spacing=(0.8, 0.8, 2.0))
    case = Case("c", tmp_path / "scan.nrrd", tmp_path / "labels.nrrd")
    with pytest.raises(InputError) as error:
        case.load()
    message = one_line(error)
    assert "labels.nrrd" in message and "different grid" in message
    assert "[0.8, 0.8, 2.0]" in message and "[1.0, 1.0, 2.0]" in message


def test_cropped_labels_are_pasted_into_the_image_grid(tmp_path):
    scan, labels = scan_and_labels()
    write_image(tmp_path / "scan.nrrd", scan)
    crop = labels[1:3, 2:14, 2:12]  # K 1..2, J 2..13, I 2..11 -> origin shifted by (2, 2, 1) voxels
    write_image(tmp_path / "crop.nrrd", crop, origin=(2.0, 2.0, 2.0))
    masks = read_labels(tmp_path / "crop.nrrd", read_volume(tmp_path / "scan.nrrd"), {"liver": (1,), "spleen": (2,)})
    expected = np.zeros_like(labels)
    expected[1:3, 2:14, 2:12] = crop
    np.testing.assert_array_equal(masks["liver"], expected == 1)
    # Half a voxel off: not a crop of this grid.
    write_image(tmp_path / "shifted.nrrd", crop, origin=(2.5, 2.0, 2.0))
    with pytest.raises(InputError):
        read_labels(tmp_path / "shifted.nrrd", read_volume(tmp_path / "scan.nrrd"))


# ---- splits ----------------------------------------------------------------------------------------------
def fake_cases(ids, patient=None):
    return [Case(i, None, None, patient=patient(i) if patient else None) for i in ids]


def test_patient_split_is_seeded_nine_to_one_and_keeps_patients_together():
    cases = fake_cases([f"case{i:02d}" for i in range(20)])
    split = split_cases(cases, seed=3)
    assert len(split["train"]) == 18 and len(split["val"]) == 2
    assert split == split_cases(cases, seed=3)
    assert split != split_cases(cases, seed=4)
    assert not set(split["train"]) & set(split["val"])
    # Two scans per patient: a patient's scans land on one side.
    paired = fake_cases([f"p{i}_scan{j}" for i in range(10) for j in range(2)], patient=lambda s: s.split("_")[0])
    split = split_cases(paired, val_fraction=0.2, seed=0)
    val_patients = {s.split("_")[0] for s in split["val"]}
    assert len(val_patients) == 2 and len(split["val"]) == 4
    assert not val_patients & {s.split("_")[0] for s in split["train"]}


def test_slice_split_holds_out_every_nth_slice():
    split = split_slices(10, holdout_every=3, holdout_offset=1)
    assert split["val"] == [1, 4, 7] and split["train"] == [0, 2, 3, 5, 6, 8, 9]
    with pytest.raises(InputError):
        split_slices(10, holdout_every=1)
    with pytest.raises(InputError):
        split_slices(10, holdout_every=3, holdout_offset=3)
