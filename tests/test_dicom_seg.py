"""DICOM SEG output (segmote_core/dicom_seg.py, outputs.py): the shipped chest CT as a real DICOM series, its ground
truth and real prompt segmentations written as DICOM SEG, read back voxel for voxel with pydicom and highdicom,
checked for codes and geometry, and validated by dciodvfy (dicom3tools) where it is installed."""

from __future__ import annotations

import hashlib
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.valuerep import DS
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from conftest import CHEST_CT, CHEST_SEG
from segmote_core.metrics import dice
from segmote_core import cli
from segmote_core.dicom_seg import write_dicom_seg
from segmote_core.errors import InputError
from segmote_core.outputs import OUTPUT_FORMATS, plan_output, save_output
from segmote_core.segmentation_io import Segment, read_segments
from segmote_core.volume import Volume, read_volume

pytestmark = pytest.mark.slow  # LiteMedSAM or real scans throughout: `make test` only (tests/conftest.py)

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def decimals(values) -> list[DS]:
    """Numbers as DICOM decimal strings (at most 16 characters, as the standard requires)."""
    return [DS(float(v), auto_format=True) for v in values]


def write_ct_series(volume: Volume, folder, shuffle_names: bool = True) -> list[Dataset]:
    """The volume as a DICOM CT series (one single-frame instance per slice, int16), as a scanner would store it;
    file names are random so that slice order must come from the positions."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    datasets = []
    pixels = volume.array.astype(np.int16)
    rows, columns = pixels.shape[1:]
    for k in range(pixels.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Chest^Phantom", "CT4", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", ""
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.Manufacturer, ds.SeriesNumber, ds.InstanceNumber = "CT", "test", 1, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = decimals((volume.ijk_to_lps @ [0, 0, k, 1])[:3])
        ds.ImageOrientationPatient = decimals(volume.direction[:, :2].T.reshape(-1))
        ds.PixelSpacing = decimals([volume.spacing[1], volume.spacing[0]])
        ds.SliceThickness = decimals([volume.spacing[2]])[0]
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.KVP = 120
        ds.PixelData = pixels[k].tobytes()
        name = f"{generate_uid()[-12:]}.dcm" if shuffle_names else f"slice{k:03d}.dcm"
        ds.save_as(folder / name, enforce_file_format=True)
        datasets.append(ds)
    return datasets


@pytest.fixture(scope="module")
def chest_dicom(tmp_path_factory, chest_ct):
    """(folder, source datasets in slice order) of the shipped chest CT as a DICOM series."""
    folder = tmp_path_factory.mktemp("chest") / "series"
    return folder, write_ct_series(chest_ct, folder)


def read_seg_masks(path, sources: list[Dataset]) -> tuple[Dataset, dict[str, np.ndarray]]:
    """{segment label: (K, J, I) bool mask} from a DICOM SEG, placed by each frame's own position and source
    reference (plain pydicom, independent of the writer)."""
    seg = pydicom.dcmread(path)
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    positions = np.array([ds.ImagePositionPatient for ds in sources], float)
    uids = [ds.SOPInstanceUID for ds in sources]
    labels = {int(item.SegmentNumber): item.SegmentLabel for item in seg.SegmentSequence}
    masks = {label: np.zeros((len(sources), seg.Rows, seg.Columns), bool) for label in labels.values()}
    shared = seg.SharedFunctionalGroupsSequence[0]
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        def item(keyword):  # a functional group is per frame, or shared by all frames
            return (group if keyword in group else shared)[keyword][0]

        number = int(item("SegmentIdentificationSequence").ReferencedSegmentNumber)
        position = np.array(item("PlanePositionSequence").ImagePositionPatient, float)
        k = int(np.argmin(np.linalg.norm(positions - position, axis=1)))
        assert np.allclose(positions[k], position, atol=1e-3)
        source = item("DerivationImageSequence").SourceImageSequence[0].ReferencedSOPInstanceUID
        assert source == uids[k]
        masks[labels[number]][k] |= frame.astype(bool)
    return seg, masks


def codes_of(item) -> tuple:
    kind = item.SegmentedPropertyTypeCodeSequence[0]
    modifier = kind.get("SegmentedPropertyTypeModifierCodeSequence")
    return (item.SegmentedPropertyCategoryCodeSequence[0].CodeValue, kind.CodeValue,
            modifier[0].CodeValue if modifier else None)


def dciodvfy_errors(path) -> list[str]:
    result = subprocess.run([shutil.which("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def test_series_copy_reads_as_the_chest_ct(chest_dicom, chest_ct):
    folder, _ = chest_dicom
    volume = read_volume(folder)
    assert np.array_equal(volume.array, chest_ct.array) and volume.same_grid(chest_ct)
    assert volume.modality == "CT"


def test_ground_truth_as_dicom_seg_same_voxels_geometry_and_codes(tmp_path, chest_dicom, chest_truth):
    folder, sources = chest_dicom
    volume = read_volume(folder)
    _, truth = read_segments(CHEST_SEG)
    out = tmp_path / "truth.dcm"
    target = plan_output(out, None, folder)
    assert target.format == "dicom-seg"
    stored = save_output(target, volume, truth, automatic=False)
    assert stored == [int(s.mask.sum()) for s in truth] and target.notices == []

    seg, masks = read_seg_masks(out, sources)
    assert seg.SOPClassUID == SEG_STORAGE and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID and seg.PatientID == "CT4"
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert referenced == {ds.SOPInstanceUID for ds in sources}
    # same voxels, bit for bit, for every segment
    assert list(masks) == [s.name for s in truth]
    for segment in truth:
        assert np.array_equal(masks[segment.name], segment.mask), segment.name
        assert np.array_equal(masks[segment.name], chest_truth[segment.name])
    # same geometry: the shared functional groups carry the volume's spacing and orientation
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert np.allclose(shared.PixelMeasuresSequence[0].PixelSpacing, [volume.spacing[1], volume.spacing[0]])
    assert np.allclose(shared.PlaneOrientationSequence[0].ImageOrientationPatient,
                       volume.direction[:, :2].T.reshape(-1))
    # codes: the ones the ground-truth file itself carries (3D Slicer's terminology), laterality included
    codes = {item.SegmentLabel: codes_of(item) for item in seg.SegmentSequence}
    assert codes["right lung"] == ("123037004", "39607008", "24028007")
    assert codes["left lung"] == ("123037004", "39607008", "7771000")
    assert codes["ribs"] == ("123037004", "113197003", None)
    assert codes["thoracic vertebral column"] == ("123037004", "122495006", None)
    assert codes["tissue"] == ("85756007", "85756007", None)
    for item in seg.SegmentSequence:
        assert item.SegmentAlgorithmType == "SEMIAUTOMATIC" and len(item.RecommendedDisplayCIELabValue) == 3
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodingSchemeDesignator == "SCT"

    # highdicom reads it back to the same masks, on the source instances
    import highdicom as hd

    back = hd.seg.segread(out)
    for number, segment in enumerate(truth, start=1):
        pixels = back.get_pixels_by_source_instance(
            source_sop_instance_uids=[ds.SOPInstanceUID for ds in sources], segment_numbers=[number])
        assert np.array_equal(pixels[..., 0].astype(bool), segment.mask), segment.name


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy (dicom3tools) is not installed: apt-get install dicom3tools to validate DICOM SEG")
def test_dicom_seg_passes_dciodvfy(tmp_path, chest_dicom):
    folder, _ = chest_dicom
    volume = read_volume(folder)
    _, truth = read_segments(CHEST_SEG)
    out = tmp_path / "truth.dcm"
    write_dicom_seg(out, volume, truth, folder, automatic=True)
    errors = dciodvfy_errors(out)
    assert errors == [], errors
    # the validator does see errors: the same file without its segment codes is refused
    broken = pydicom.dcmread(out)
    del broken.SegmentSequence[0].SegmentedPropertyTypeCodeSequence
    broken.save_as(tmp_path / "broken.dcm")
    assert dciodvfy_errors(tmp_path / "broken.dcm")


def test_cli_segments_a_dicom_series_into_dicom_seg(tmp_path, capsys, cli_engine, chest_dicom, chest_truth):
    """A real prompt on one axial slice of the series (LiteMedSAM), written as DICOM SEG; an unknown name in a
    .seg.nrrd gets the generic code and a warning."""
    folder, sources = chest_dicom
    truth = chest_truth["right lung"]
    k = int(np.argmax(truth.sum(axis=(1, 2))))
    j, i = np.nonzero(truth[k])
    box = [str(v) for v in (i.min(), j.min(), k, i.max(), j.max(), k)]
    out = tmp_path / "right.dcm"
    code = cli.main(["segment", str(folder), "--out", str(out), "--box-ijk", *box, "--slice-only", "--preset", "lung_parenchyma",
                     "--name", "right lung", "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "warning" not in err
    seg, masks = read_seg_masks(out, sources)
    assert dice(masks["right lung"][k], truth[k]) >= 0.9
    assert not masks["right lung"][np.arange(len(sources)) != k].any()
    assert codes_of(seg.SegmentSequence[0]) == ("123037004", "39607008", "24028007")
    # an existing DICOM SEG is not replaced without --overwrite, in one line, before any model runs
    before = hashlib.sha256(out.read_bytes()).hexdigest()
    code = cli.main(["segment", str(folder), "--out", str(out), "--box-ijk", *box, "--slice-only", "--name", "right lung",
                     "--device", "cpu", "--quiet"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "exists" in lines[0] and "--overwrite" in lines[0], lines
    assert hashlib.sha256(out.read_bytes()).hexdigest() == before
    code = cli.main(["segment", str(folder), "--out", str(out), "--box-ijk", *box, "--slice-only", "--name", "lung tumour blob",
                     "--device", "cpu", "--quiet", "--overwrite", "--output-format", "dicom-seg"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.startswith("warning: segment 'lung tumour blob' has no standard terminology entry")
    seg, _ = read_seg_masks(out, sources)
    assert [item.SegmentLabel for item in seg.SegmentSequence] == ["lung tumour blob"]
    assert codes_of(seg.SegmentSequence[0]) == ("85756007", "85756007", None)


def one_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_dicom_seg_from_a_nifti_input_or_with_a_long_name_is_one_line_before_any_model(tmp_path, capsys, chest_ct):
    nifti = tmp_path / "chest.nii.gz"
    sitk.WriteImage(chest_ct.to_sitk(), str(nifti))
    for out, extra in ((tmp_path / "x.dcm", []), (tmp_path / "x.seg", ["--output-format", "dicom-seg"])):
        code = cli.main(["segment", str(nifti), "--out", str(out), "--box-ijk", "1", "1", "1", "9", "9", "1",
                         "--model", "no_such_model", "--quiet", *extra])
        assert code == 1 and "needs a DICOM series folder" in one_error(capsys) and not out.exists()
    folder = tmp_path / "series"
    folder.mkdir()
    code = cli.main(["segment", str(folder), "--out", str(tmp_path / "x.dcm"), "--box-ijk", "1", "1", "1", "9", "9",
                     "1", "--name", "x" * 65, "--model", "no_such_model", "--quiet"])
    assert code == 1 and "at most 64" in one_error(capsys)
    code = cli.main(["auto", str(CHEST_CT), "--adapter", "chest_ct_lungs",
                     "--out", str(tmp_path / "auto.dcm"), "--model", "no_such_model", "--quiet"])
    assert code == 1 and "needs a DICOM series folder" in one_error(capsys)


@pytest.mark.parametrize("out,fmt,message", [
    ("x.seg.nrrd", "nifti", "needs an output ending in .nii.gz or .nii"),
    ("x.nii.gz", "seg.nrrd", "needs an output ending in .seg.nrrd"),
    ("x.nrrd", "dicom-seg", "suffix of another format"),
])
def test_output_format_and_suffix_must_agree(tmp_path, chest_dicom, out, fmt, message):
    folder, _ = chest_dicom
    with pytest.raises(InputError, match=message):
        plan_output(tmp_path / out, fmt, folder)


def test_format_from_suffix_and_flag(tmp_path, chest_dicom):
    folder, _ = chest_dicom
    assert cli.OUTPUT_FORMATS == OUTPUT_FORMATS
    assert plan_output(tmp_path / "a.seg.nrrd", None, CHEST_CT).format == "seg.nrrd"
    assert plan_output(tmp_path / "a.nii.gz", "nifti", CHEST_CT).format == "labelmap"
    assert plan_output(tmp_path / "a.mha", None, CHEST_CT).format == "labelmap"
    assert plan_output(tmp_path / "a.DCM", None, folder).format == "dicom-seg"
    assert plan_output(tmp_path / "segmentation", "dicom-seg", folder).format == "dicom-seg"
    with pytest.raises(InputError, match="inside the input DICOM folder"):  # it would become a second series there
        plan_output(folder / "seg.dcm", None, folder)
    with pytest.raises(InputError, match="inside the input DICOM folder"):
        plan_output(folder / "derived" / "seg.dcm", None, folder)


def test_series_that_does_not_match_the_volume_is_refused(tmp_path, chest_dicom, chest_ct):
    """The masks are placed on the source images one to one: a volume on another grid is refused, nothing written."""
    folder, _ = chest_dicom
    shifted = Volume(chest_ct.array, chest_ct.spacing, chest_ct.origin + [0, 0, 5], chest_ct.direction)
    out = tmp_path / "x.dcm"
    mask = np.zeros(chest_ct.array.shape, bool)
    mask[5, 60:70, 60:70] = True
    with pytest.raises(InputError, match="does not lie on slice 0"):
        write_dicom_seg(out, shifted, [Segment("liver", mask)], folder)
    with pytest.raises(InputError, match="has 34 images for a volume of 33 slices"):
        write_dicom_seg(out, Volume(chest_ct.array[:33], chest_ct.spacing, chest_ct.origin, chest_ct.direction),
                        [Segment("liver", mask[:33])], folder)
    with pytest.raises(InputError, match="at most 64"):
        write_dicom_seg(out, chest_ct, [Segment("x" * 65, mask)], folder)
    with pytest.raises(InputError, match="backslash"):
        write_dicom_seg(out, chest_ct, [Segment("lung\\left", mask)], folder)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_auto_on_a_dicom_series_writes_one_automatic_segment_per_adapter_class(tmp_path, capsys, chest_ct,
                                                                                chest_truth):
    """The shipped adapter on three axial slices of the chest CT stored as DICOM: both lungs, coded, in the
    adapter's colours, marked AUTOMATIC."""
    from segmote_core.adapters import read_adapter_header

    adapter = "chest_ct_lungs"
    k0 = int(np.argmax(chest_truth["right lung"].sum(axis=(1, 2)))) - 1
    crop = Volume(chest_ct.array[k0:k0 + 3], chest_ct.spacing, (chest_ct.ijk_to_lps @ [0, 0, k0, 1])[:3],
                  chest_ct.direction)
    sources = write_ct_series(crop, tmp_path / "series")
    out = tmp_path / "lungs.dcm"
    code = cli.main(["auto", str(tmp_path / "series"), "--adapter", adapter, "--out", str(out), "--device", "cpu",
                     "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "terminology" not in err
    seg, masks = read_seg_masks(out, sources)
    classes = read_adapter_header(adapter)["classes"]
    assert [item.SegmentLabel for item in seg.SegmentSequence] == [c["name"] for c in classes]
    import highdicom as hd

    for item, cls in zip(seg.SegmentSequence, classes):
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentAlgorithmName == "SegMoTE"
        expected = hd.color.CIELabColor.from_rgb(*(round(c * 255) for c in cls["color"]))
        assert list(item.RecommendedDisplayCIELabValue) == list(expected.value)
        side = "24028007" if cls["name"] == "right lung" else "7771000"
        assert codes_of(item) == ("123037004", "39607008", side)
        score = dice(masks[cls["name"]], chest_truth[cls["name"]][k0:k0 + 3])
        assert score >= 0.85, (cls["name"], score)


def test_an_empty_segment_is_stored_empty(tmp_path, chest_dicom, caplog):
    """A model may find nothing: the SEG still lists the segment, with no voxels, and says nothing about it."""
    folder, sources = chest_dicom
    volume = read_volume(folder)
    empty = np.zeros(volume.array.shape, bool)
    out = tmp_path / "empty.dcm"
    assert write_dicom_seg(out, volume, [Segment("liver", empty)], folder) == [0]
    seg, masks = read_seg_masks(out, sources)
    assert list(masks) == ["liver"] and not masks["liver"].any() and not caplog.records


def test_the_chosen_series_of_a_folder_holding_two_is_the_one_referenced(tmp_path, chest_ct):
    crop = Volume(chest_ct.array[10:13], chest_ct.spacing, (chest_ct.ijk_to_lps @ [0, 0, 10, 1])[:3],
                  chest_ct.direction)
    folder = tmp_path / "study"
    first, second = write_ct_series(crop, folder), write_ct_series(crop, folder)
    uid = second[0].SeriesInstanceUID
    out = tmp_path / "x.dcm"
    volume = read_volume(folder, uid)
    mask = np.zeros(volume.array.shape, bool)
    mask[1, 40:50, 40:50] = True
    with pytest.raises(InputError, match="holds 2 DICOM series"):  # which one the masks belong to must be said
        write_dicom_seg(out, volume, [Segment("liver", mask)], folder)
    assert not out.exists()
    target = plan_output(out, None, folder, series=uid)
    save_output(target, volume, [Segment("liver", mask)])
    seg, masks = read_seg_masks(out, second)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid != first[0].SeriesInstanceUID
    assert np.array_equal(masks["liver"], mask)
