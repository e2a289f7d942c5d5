"""Hardening: bad files give an error, never a wrong answer; failures leave the user's data as it was.

Each test here backs a row of docs/reliability.md (rows covered elsewhere name their test file there).
"""

from __future__ import annotations

import errno
import hashlib
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import CHEST_SEG
from segmote_core.checkpoints import safe_torch_load
from segmote_core.engine import Engine
from segmote_core.errors import Cancelled, CheckpointError, InputError, SegMoTEError
from segmote_core.normalize import choose_normalization, normalize
from segmote_core.segmentation_io import Segment, save_segments
from segmote_core.volume import SliceStack, Volume, read_volume


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def small_ct(chest_ct):
    """Three axial slices of the real CT: cheap to embed."""
    return Volume(chest_ct.array[16:19].copy(), chest_ct.spacing,
                  chest_ct.ijk_to_lps[:3, 3] + 16 * chest_ct.ijk_to_lps[:3, 2], chest_ct.direction)


BOX_2D = [20, 30, 1, 60, 95, 1]  # around the right lung on the middle slice of small_ct


# ---- bad files ------------------------------------------------------------------------------------
def _write(tmp_path, name, array=None, **kwargs) -> Path:
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) if array is None else array
    path = tmp_path / name
    sitk.WriteImage(sitk.GetImageFromArray(array, **kwargs), str(path))
    return path


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_truncated_files_are_refused(tmp_path, suffix):
    path = _write(tmp_path, f"v{suffix}", np.random.default_rng(0).integers(0, 999, (20, 30, 40)).astype(np.int16))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError, match="cannot read image"):
        read_volume(path)


def test_mislabeled_file_is_an_error_not_a_guess(tmp_path):
    nifti = _write(tmp_path, "v.nii.gz")
    renamed = tmp_path / "v.nrrd"
    shutil.copy(nifti, renamed)
    with pytest.raises(InputError, match="cannot read image"):
        read_volume(renamed)


def test_corrupt_dicom_folder(tmp_path):
    (tmp_path / "a.dcm").write_bytes(b"DICM" + bytes(300))
    with pytest.raises(InputError, match="DICOM"):
        read_volume(tmp_path)


def test_vector_image_is_refused(tmp_path):
    path = _write(tmp_path, "rgb.nrrd", np.zeros((4, 5, 6, 3), np.uint8), isVector=True)
    with pytest.raises(InputError, match="scalar"):
        read_volume(path)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64, np.int32])
def test_any_numeric_dtype_reads_and_normalises(tmp_path, dtype):
    array = (np.random.default_rng(1).random((3, 8, 9)) * 200).astype(dtype)
    volume = read_volume(_write(tmp_path, "v.nrrd", array))
    out = normalize(volume.array, choose_normalization(volume.array))
    assert volume.array.dtype == dtype and out.dtype == np.float32 and 0 <= out.min() <= out.max() <= 1


def test_nan_and_inf_voxels_never_reach_the_model(lite_engine, small_ct):
    array = small_ct.array.astype(np.float32)
    array[1, :10, :10] = np.nan
    array[1, 10:20, :10] = np.inf
    array[1, 20:30, :10] = -np.inf
    volume = Volume(array, small_ct.spacing, small_ct.origin, small_ct.direction)
    prepared = lite_engine.prepare(volume, window=(-700, 600))
    assert np.isfinite(prepared.slice01(1)).all()
    mask = lite_engine.segment(volume, box_ijk=BOX_2D, window=(-700, 600))
    assert mask[1].sum() > 300


def test_one_voxel_thick_volume(lite_engine, small_ct):
    thin = Volume(small_ct.array[1:2].copy(), small_ct.spacing, small_ct.origin, small_ct.direction)
    mask = lite_engine.segment(thin, box_ijk=[20, 30, 0, 60, 95, 0], window=(-700, 600), propagate=True)
    assert mask.shape == (1, 128, 128) and mask.sum() > 300


def test_two_thousand_slices(lite_engine):
    rng = np.random.default_rng(3)
    tall = Volume(rng.integers(-1000, 400, (2000, 24, 24)).astype(np.int16), (0.5, 0.5, 0.5), (0, 0, 0), np.eye(3))
    mask = lite_engine.segment(tall, box_ijk=[4, 4, 1500, 18, 18, 1500], window=(-700, 600))
    assert mask.shape == tall.array.shape and not mask[:1500].any() and not mask[1501:].any()


def test_anisotropic_spacing_picks_the_axial_axis():
    volume = Volume(np.zeros((12, 64, 64), np.int16), (0.3, 0.3, 10.0), (0, 0, 0), np.eye(3))
    assert SliceStack.for_axis(volume, None).shape == (12, 64, 64)
    point = np.array([[10.0, 20.0, 5.0]])
    assert np.allclose(volume.ras_to_ijk(volume.ijk_to_ras_points(point)), point)


def test_non_orthogonal_direction_still_slices_exactly():
    shear = np.array([[1.0, 0.3, 0.0], [0.0, 1.0, 0.0], [0.1, 0.0, 1.0]])
    shear /= np.linalg.norm(shear, axis=0)
    volume = Volume(np.random.default_rng(4).integers(0, 9, (4, 5, 6)).astype(np.int16), (1, 1, 2), (0, 0, 0), shear)
    for axis in (0, 1, 2):
        stack = SliceStack(volume, axis)
        assert np.array_equal(stack.from_stack(stack.to_stack(volume.array)), volume.array)
    point = np.array([[1.0, 2.0, 3.0]])
    assert np.allclose(volume.ras_to_ijk(volume.ijk_to_ras_points(point)), point)


@pytest.mark.parametrize("spacing,direction,message", [
    ((1.0, -1.0, 1.0), np.eye(3), "spacing"),
    ((1.0, 0.0, 1.0), np.eye(3), "spacing"),
    ((1.0, 1.0, 1.0), np.array([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1]]), "singular"),
])
def test_negative_zero_spacing_and_degenerate_directions_are_refused(spacing, direction, message):
    with pytest.raises(InputError, match=message):
        Volume(np.zeros((2, 2, 2)), spacing, (0, 0, 0), direction)


@pytest.mark.slow
def test_labels_on_another_grid_are_refused_with_both_geometries(tmp_path, chest_ct):
    out = tmp_path / "seg.seg.nrrd"
    shutil.copy(CHEST_SEG, out)
    before = sha(out)
    moved = Volume(chest_ct.array, chest_ct.spacing, chest_ct.origin + 5.0, chest_ct.direction)
    with pytest.raises(InputError, match=r"another grid: .*vs the image's"):
        save_segments(out, moved, [Segment("x", np.zeros(chest_ct.array.shape, bool))])
    assert sha(out) == before


def test_thousands_of_points(lite_engine, small_ct):
    rng = np.random.default_rng(5)
    points = np.column_stack([rng.uniform(25, 55, 2000), rng.uniform(40, 90, 2000), np.ones(2000)])
    mask = lite_engine.segment(small_ct, points_ijk=points, point_labels=np.ones(2000, int), window=(-700, 600))
    # runs and answers on the prompted slice only (what LiteMedSAM, trained on boxes, makes of 2000 clicks is
    # its own business)
    assert mask.shape == small_ct.array.shape and not mask[0].any() and not mask[2].any()


def test_backbone_checkpoint_with_pickled_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pth"
    with path.open("wb") as handle:
        pickle.dump({"image_encoder.weight": Payload()}, handle)
    torch.save({"a": Payload()}, tmp_path / "evil2.pth")
    for candidate in (path, tmp_path / "evil2.pth"):
        with pytest.raises(CheckpointError, match="refusing|cannot read"):
            safe_torch_load(candidate)
    assert not marker.exists()


def test_truncated_backbone_checkpoint(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        safe_torch_load(path)


# ---- faults -----------------------------------------------------------------------------------------
def test_cancel_in_the_middle_of_a_propagation(lite_engine, chest_ct):
    calls = {"n": 0}

    def cancel_after_a_few():
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(Cancelled):
        lite_engine.segment(chest_ct, box_ijk=[70, 30, 18, 115, 100, 18], propagate=True, window=(-700, 600),
                            cancel=cancel_after_a_few)
    assert calls["n"] == 4


@pytest.mark.slow
def test_out_of_memory_halves_the_batch_then_gives_a_clear_error(small_ct):
    engine = Engine("lite_medsam", device="cpu", batch_size=4)
    real_encode = engine.encode  # the image encoder as the engine calls it

    def encode_small_batches_only(x):
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError("simulated")
        return real_encode(x)

    engine.encode = encode_small_batches_only
    found = engine.embeddings(engine.prepare(small_ct, window=(-700, 600)), [0, 1, 2])
    assert len(found) == 3 and engine.batch_size == 1 and "batch reduced" in engine.notices[0]

    def always_out_of_memory(x):
        raise torch.OutOfMemoryError("simulated")

    engine.encode = always_out_of_memory
    with pytest.raises(SegMoTEError, match="out of memory"):
        engine.embeddings(engine.prepare(small_ct, window=(40, 400)), [0])


@pytest.mark.slow
def test_disk_full_while_writing_keeps_the_previous_file(tmp_path, chest_ct, monkeypatch):
    import nrrd  # the NRRD writer under every .seg.nrrd write (slicerio's and the appending one)

    out = tmp_path / "seg.seg.nrrd"
    shutil.copy(CHEST_SEG, out)
    before = sha(out)

    def write_half_then_fail(path, data, header=None, **kwargs):
        Path(path).write_bytes(b"NRRD0004\n" + bytes(1000))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nrrd, "write", write_half_then_fail)
    with pytest.raises(SegMoTEError, match="No space left on device.*unchanged"):
        save_segments(out, chest_ct, [Segment("new", np.zeros(chest_ct.array.shape, bool))])
    assert sha(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["seg.seg.nrrd"]


# ---- property-based: prompt conversion, and a fuzzing run of the readers -------------------------------
@settings(max_examples=60, deadline=None)
@given(st.tuples(*[st.floats(-0.49, 127.49)] * 2), st.floats(-0.49, 33.49))
def test_prompt_conversion_lands_on_the_voxel(chest_ct, ij, k):
    # A point exactly on the boundary between two voxels (x.5) belongs to either; the flips of the stack may round it
    # to the other one, so such points say nothing about the conversion.
    assume(all(abs(abs(value - np.floor(value)) - 0.5) > 1e-6 for value in (*ij, k)))
    point = np.array([[ij[0], ij[1], k]])
    ras = chest_ct.ijk_to_ras_points(point)
    stack = SliceStack.for_axis(chest_ct, None)
    s, r, c = np.round(stack.ijk_to_stack(chest_ct.ras_to_ijk(ras))[0]).astype(int)
    i, j, kk = np.round(point[0]).astype(int)
    assert stack.to_stack(chest_ct.array)[s, r, c] == chest_ct.array[kk, j, i]


SEEDS = {}


def _seed_file(suffix: str) -> bytes:
    if suffix not in SEEDS:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            path = _write(Path(folder), f"seed{suffix}", np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4))
            SEEDS[suffix] = path.read_bytes()
    return SEEDS[suffix]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from([".nrrd", ".nii", ".mha"]), st.data())
def test_fuzzed_files_read_correctly_or_fail_cleanly(tmp_path, suffix, data):
    """Random byte edits and truncations: either a valid 3-D Volume or a one-line InputError, nothing else."""
    content = bytearray(_seed_file(suffix))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(content) - 1))
        content[position] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        content = content[: data.draw(st.integers(0, len(content)))]
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(bytes(content))
    try:
        volume = read_volume(path)
    except InputError as error:
        assert "\n" not in str(error)
    else:
        assert volume.array.ndim == 3 and np.all(volume.spacing > 0)


@pytest.mark.slow
def test_out_of_memory_at_batch_one_on_an_accelerator_moves_to_the_cpu(small_ct):
    """The GPU -> CPU step, exercised on any machine: the 'accelerator' is torch's meta device, whose every
    encoding fails with out-of-memory, as a full GPU would."""
    engine = Engine("lite_medsam", device="cpu", batch_size=2)
    real_preprocess = engine.backbone.preprocess

    def preprocess_out_of_memory_off_cpu(images):
        if images.device.type != "cpu":
            raise torch.OutOfMemoryError("simulated")
        return real_preprocess(images)

    engine.backbone.preprocess = preprocess_out_of_memory_off_cpu
    engine.device = torch.device("meta")
    found = engine.embeddings(engine.prepare(small_ct, window=(-700, 600)), [0, 1])
    assert engine.device.type == "cpu" and len(found) == 2
    assert found[0][0].device.type == "cpu"
    assert any("continuing on the CPU" in notice for notice in engine.notices)
