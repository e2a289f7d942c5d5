"""Nothing the user has is lost: outputs that hold something else, header injection, concurrent writers, outputs
that name inputs, and label maps (docs/reliability.md, "Data safety")."""

from __future__ import annotations

import hashlib
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from conftest import CHEST_SEG
from segmote_core.cli import main
from segmote_core.errors import InputError
from segmote_core.segmentation_io import Segment, read_segments, save_segments
from segmote_core.volume import Volume, read_volume

SHAPE = (4, 6, 8)  # (K, J, I)


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def grid() -> Volume:
    return Volume(np.zeros(SHAPE, np.int16), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))


def box(k=slice(None), j=slice(None), i=slice(None)) -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    mask[k, j, i] = True
    return mask


def write_image(path: Path, array: np.ndarray) -> Path:
    sitk.WriteImage(grid().to_sitk(array), str(path))
    return path


# ---- an output that holds something other than a segmentation ----------------------------------------------
IMAGES = {
    "ct": lambda: np.random.default_rng(0).integers(-1000, 1000, SHAPE).astype(np.int16),
    "probability map": lambda: np.random.default_rng(1).random(SHAPE).astype(np.float32),
    "mr (many values)": lambda: np.arange(np.prod(SHAPE), dtype=np.uint16).reshape(SHAPE) * 7,
}


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".seg.nrrd", ".mha"])
@pytest.mark.parametrize("kind", IMAGES)
def test_an_existing_image_as_output_is_refused_unless_overwrite(tmp_path, suffix, kind):
    out = write_image(tmp_path / f"scan{suffix}", IMAGES[kind]())
    before = sha(out)
    with pytest.raises(InputError, match="is not a segmentation.*--overwrite"):
        save_segments(out, grid(), [Segment("liver", box(k=1))])
    assert sha(out) == before
    assert save_segments(out, grid(), [Segment("liver", box(k=1))], replace_same_name=True) == [48]
    _, segments = read_segments(out)
    assert [s.name for s in segments] in (["liver"], ["label 1"]) and segments[0].mask.sum() == 48


def test_an_empty_segmentation_and_a_label_map_from_another_tool_are_added_to(tmp_path):
    empty = tmp_path / "empty.seg.nrrd"
    slicerio.write_segmentation(str(empty), slicerio.create_segmentation(grid().shape_ijk, grid().ijk_to_lps))
    save_segments(empty, grid(), [Segment("liver", box(k=1))])
    labels = write_image(tmp_path / "labels.nii.gz", box(k=0).astype(np.float32) * 3)  # float but whole values
    save_segments(labels, grid(), [Segment("liver", box(k=1))])
    assert np.unique(read_volume(labels).array).tolist() == [0, 3, 4]


@pytest.mark.parametrize("command", ["segment", "auto"])
def test_the_input_image_as_output_is_refused_even_with_overwrite(tmp_path, capsys, command):
    image = write_image(tmp_path / "mr.nii.gz", IMAGES["ct"]())
    before = sha(image)
    prompt = ["--box-ijk", "1", "1", "1", "5", "4", "1"] if command == "segment" else ["--adapter", "a.safetensors"]
    assert main([command, str(image), "--out", str(image), "--overwrite", "--quiet", *prompt]) == 1
    assert "is one of the inputs" in capsys.readouterr().err and sha(image) == before


def test_eval_json_naming_an_input_is_refused(tmp_path, capsys):
    truth = tmp_path / "gt.seg.nrrd"
    save_segments(truth, grid(), [Segment("liver", box(k=1))])
    prediction = tmp_path / "pred.seg.nrrd"
    save_segments(prediction, grid(), [Segment("liver", box(k=slice(1, 3)))])
    before = sha(truth), sha(prediction)
    for target in (truth, prediction):
        assert main(["eval", "--pred", str(prediction), "--gt", str(truth), "--json", str(target)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: --json") and "is one of the inputs" in err and err.count("\n") == 1
    assert (sha(truth), sha(prediction)) == before
    assert main(["eval", "--pred", str(prediction), "--gt", str(truth), "--json", str(tmp_path / "r.json")]) == 0


# ---- one header writer: names are checked, never injected --------------------------------------------------
BAD_NAMES = ["liver\n", "x\nSegment0_Name:=HIJACKED", "tab\there", "Rückenmark", " padded", "", "x" * 201, "nul\0"]


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.slow
def test_a_name_that_a_header_cannot_hold_is_refused_and_the_file_kept(tmp_path, chest_ct, name):
    out = tmp_path / "seg.seg.nrrd"
    shutil.copy(CHEST_SEG, out)
    before = sha(out)
    with pytest.raises(InputError) as error:
        save_segments(out, chest_ct, [Segment(name, np.zeros(chest_ct.array.shape, bool))])
    assert "\n" not in str(error.value)
    assert sha(out) == before and len(slicerio.read_segmentation(str(out))["segments"]) == 7


def test_a_name_with_header_punctuation_round_trips(tmp_path):
    out = tmp_path / "seg.seg.nrrd"
    name = "a:=b | c~d; Segment0_Name:=x"
    save_segments(out, grid(), [Segment(name, box(k=1)), Segment("other", box(k=2))])
    assert [s.name for s in read_segments(out)[1]] == [name, "other"]


def test_the_cli_refuses_a_bad_name_with_one_line(tmp_path, capsys):
    image = write_image(tmp_path / "ct.nrrd", IMAGES["ct"]())
    assert main(["segment", str(image), "--out", str(tmp_path / "o.seg.nrrd"), "--name", "x\nSegment0_Name:=HIJACKED",
                 "--box-ijk", "1", "1", "1", "5", "4", "1", "--device", "cpu", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: segment name") and err.count("\n") == 1 and not (tmp_path / "o.seg.nrrd").exists()


def test_colours_outside_the_unit_range_are_refused(tmp_path):
    with pytest.raises(InputError, match="colour"):
        save_segments(tmp_path / "s.seg.nrrd", grid(), [Segment("a", box(k=1), (float("nan"), 0, 0))])


# ---- concurrent writers: both segments kept ----------------------------------------------------------------
def _add_one(path: str, name: str, k: int, start) -> None:
    start.wait()
    save_segments(path, grid(), [Segment(name, box(k=k))])


@pytest.mark.parametrize("suffix,runs", [(".seg.nrrd", 20), (".nrrd", 10)])
def test_two_processes_adding_to_one_file_keep_both_segments(tmp_path, suffix, runs):
    context = multiprocessing.get_context("fork")  # real processes, without re-importing numpy and ITK each time
    kept = 0
    for run in range(runs):
        out = tmp_path / f"run{run}{suffix}"
        save_segments(out, grid(), [Segment("first", box(k=0))])
        start = context.Barrier(2)
        writers = [context.Process(target=_add_one, args=(str(out), name, k, start))
                   for name, k in (("liver", 1), ("spleen", 2))]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join(30)
        assert all(writer.exitcode == 0 for writer in writers)
        kept += {s.name for s in read_segments(out)[1]} == {"first", "liver", "spleen"}
    assert kept == runs
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"run{r}{suffix}" for r in range(runs))


# ---- label maps ---------------------------------------------------------------------------------------------
def test_overwrite_in_a_label_map_takes_only_the_replaced_labels_voxels(tmp_path):
    out = tmp_path / "labels.nrrd"
    save_segments(out, grid(), [Segment("liver", box(k=1)), Segment("spleen", box(k=2))])
    assert save_segments(out, grid(), [Segment("liver", box(k=slice(1, 4)))], replace_same_name=True) == [96]
    stored = read_volume(out).array
    assert (stored[2] == 2).all() and (stored[1] == 1).all() and (stored[3] == 1).all() and (stored[0] == 0).all()
    assert [s.name for s in read_segments(out)[1]] == ["liver", "spleen"]


def test_overwrite_in_a_seg_nrrd_replaces_only_that_segment(tmp_path):
    out = tmp_path / "objects.seg.nrrd"
    save_segments(out, grid(), [Segment("liver", box(k=1)), Segment("spleen", box(k=slice(1, 3), j=0))])
    assert save_segments(out, grid(), [Segment("liver", box(k=3))], replace_same_name=True) == [48]
    segments = {s.name: s.mask for s in read_segments(out)[1]}
    assert sorted(segments) == ["liver", "spleen"]
    assert np.array_equal(segments["liver"], box(k=3)), "the old liver's voxels are gone, the new ones there"
    assert np.array_equal(segments["spleen"], box(k=slice(1, 3), j=0)), "the overlapping segment is untouched"


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_the_same_name_twice_in_a_label_map_is_refused(tmp_path, suffix):
    out = tmp_path / f"labels{suffix}"
    save_segments(out, grid(), [Segment("liver", box(k=1))])
    before = sha(out)
    with pytest.raises(InputError, match="already has a segment named 'liver'"):
        save_segments(out, grid(), [Segment("liver", box(k=2))])
    assert sha(out) == before
    with pytest.raises(InputError, match="both named"):
        save_segments(tmp_path / f"new{suffix}", grid(), [Segment("a", box(k=1)), Segment("a", box(k=2))])


def test_labels_beyond_16_bits_are_kept(tmp_path):
    out = write_image(tmp_path / "labels.nrrd", box(k=0).astype(np.uint32) * 70000)
    save_segments(out, grid(), [Segment("liver", box(k=1))])
    stored = read_volume(out).array
    assert np.unique(stored).tolist() == [0, 70000, 70001] and (stored[0] == 70000).all()


def test_the_reported_voxel_count_is_what_was_stored(tmp_path):
    out = tmp_path / "labels.nii.gz"
    save_segments(out, grid(), [Segment("liver", box(k=1))])
    assert save_segments(out, grid(), [Segment("spleen", box(k=slice(1, 3)))]) == [48]  # k=1 is liver's
    assert (read_volume(out).array == 2).sum() == 48
    assert save_segments(tmp_path / "s.seg.nrrd", grid(), [Segment("a", box(k=slice(1, 3)))]) == [96]


# ---- files other tools wrote: every field they hold stays as written --------------------------------------------
def _header_fields(path: Path) -> dict:
    import nrrd

    return {key: value for key, value in nrrd.read_header(str(path)).items()
            if isinstance(value, str) and key not in ("type", "encoding")}


def test_appending_keeps_another_tools_seg_nrrd_fields_as_written(tmp_path):
    import nrrd

    out = tmp_path / "case.seg.nrrd"
    voxels = np.zeros(SHAPE[::-1], np.uint8)
    voxels[:, :, 0] = 1
    header = {"space": "left-posterior-superior", "space directions": np.diag([1.0, 1.0, 2.0]),
              "space origin": np.zeros(3), "kinds": ["domain"] * 3, "encoding": "gzip",
              "MyTool_Version": "3.1 (build 7)", "Segment0_ID": "Segment_1", "Segment0_Name": "ribs",
              "Segment0_Color": "1 1 0.811765", "Segment0_LabelValue": "1", "Segment0_Layer": "0",
              "Segment0_Extent": "0 7 0 5 0 0", "Segment0_MyNote": "checked by Dr. A, 2026-11-30",
              "Segment0_Tags": "Some field:some value|Segmentation.Status:inprogress|"}
    nrrd.write(str(out), voxels, header)
    before = _header_fields(out)
    save_segments(out, grid(), [Segment("liver", box(k=1)), Segment("overlap", box(k=0))])
    after = _header_fields(out)
    assert {key: after[key] for key in before} == before  # every field bit-identical, the custom ones too
    assert after["Segment1_Name"] == "liver" and after["Segment2_Name"] == "overlap"
    _, segments = read_segments(out)
    assert [s.name for s in segments] == ["ribs", "liver", "overlap"]
    assert np.array_equal(segments[0].mask, box(k=0)) and np.array_equal(segments[2].mask, box(k=0))


def test_appending_keeps_a_label_maps_own_header_field(tmp_path):
    out = tmp_path / "labels.nrrd"
    image = grid().to_sitk(box(k=0).astype(np.uint8))
    image.SetMetaData("MyField", "atlas v2; do not edit")
    sitk.WriteImage(image, str(out))
    save_segments(out, grid(), [Segment("liver", box(k=1))])
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(out))
    reader.ReadImageInformation()
    assert reader.GetMetaData("MyField") == "atlas v2; do not edit"
    assert [s.name for s in read_segments(out)[1]] == ["label 1", "liver"]


def test_a_long_name_in_a_nifti_label_map_is_a_notice_and_the_names_that_fit_stay(tmp_path):
    out = tmp_path / "labels.nii.gz"
    save_segments(out, grid(), [Segment("liver", box(k=0))])
    notices: list[str] = []
    long_name = "left hepatic vein, segment IVa branch, as drawn by the second reader"
    assert len(long_name) == 68
    save_segments(out, grid(), [Segment(long_name, box(k=1))], notices=notices)
    assert len(notices) == 1 and "cannot store every segment name" in notices[0] and long_name in notices[0]
    assert [s.name for s in read_segments(out)[1]] == ["liver", "label 2"]  # liver keeps its name


def test_a_nifti_description_from_another_tool_is_kept(tmp_path):
    out = tmp_path / "aseg.nii.gz"
    image = grid().to_sitk(box(k=0).astype(np.uint8))
    image.SetMetaData("ITK_FileNotes", "FreeSurfer aseg 7.4")
    sitk.WriteImage(image, str(out))
    notices: list[str] = []
    save_segments(out, grid(), [Segment("liver", box(k=1))], notices=notices)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(out))
    reader.ReadImageInformation()
    assert reader.GetMetaData("descrip") == "FreeSurfer aseg 7.4"
    assert len(notices) == 1 and "another tool's text" in notices[0]


def test_many_overlapping_segments_are_added_in_linear_time(tmp_path):
    """600 segments on one spot need 600 layers: each used to rescan (and copy) every layer: 600 took ~30 s."""
    import time

    shape = (16, 64, 64)
    volume = Volume(np.zeros(shape, np.int16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    mask = np.zeros(shape, bool)
    mask[4:8, 10:30, 10:30] = True
    started = time.perf_counter()
    save_segments(tmp_path / "many.seg.nrrd", volume, [Segment(f"s{n}", mask) for n in range(600)])
    assert time.perf_counter() - started < 8.0
    _, segments = read_segments(tmp_path / "many.seg.nrrd")
    assert len(segments) == 600 and all(np.array_equal(s.mask, mask) for s in segments)
