"""3-D boxes fill the box (chest CT, the same CT at 20 mm slices, an MR), and the predicted IoU reaches the user.

"Fill": every slice of the user's box where the object is gets a mask; inside the box a break in continuity does
not end the object (segmote_core.session.continue_object)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import CHEST_CT, bounding_box_ijk
from segmote_core.metrics import dice
from segmote_core import cli
from segmote_core.session import LOW_CONFIDENCE, Update
from segmote_core.models.backbones import input_convention
from segmote_core.normalize import window
from segmote_core.volume import Volume

CT_DEFAULT = input_convention("lite_medsam").ct_window  # as a window: shares the cached embeddings of the default


@pytest.fixture(scope="module")
def mni_case():
    from segmote_core.evalset import mni152_case

    return mni152_case()


def empty_slices_inside(mask: np.ndarray, truth: np.ndarray) -> list[int]:
    """Axial slices (K) where the ground truth is present but the mask is empty."""
    present = truth.any(axis=(1, 2))
    return [int(k) for k in np.flatnonzero(present & ~mask.any(axis=(1, 2)))]


def test_cli_3d_box_without_a_window_segments_both_lungs(tmp_path, capsys, chest_ct, chest_truth, cli_engine):
    """No --window, no --preset: the CT is recognised and gets the model's CT default (done-when of issue 12)."""
    from segmote_core.segmentation_io import read_segments

    out = tmp_path / "lungs.seg.nrrd"
    for name in ("right lung", "left lung"):
        corners = chest_ct.ijk_to_ras_points(np.reshape(bounding_box_ijk(chest_truth[name]), (2, 3))).reshape(-1)
        code = cli.main(["segment", str(CHEST_CT), "--out", str(out), "--box-ras", *[f"{v:.4f}" for v in corners],
                         "--name", name, "--device", "cpu"])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert "normalisation: window" in captured.out and "automatic: CT" in captured.out
        assert "predicted IoU 0." in captured.out and "low" not in captured.out
    _, segments = read_segments(out)
    masks = {s.name: s.mask for s in segments}
    for name in ("right lung", "left lung"):
        assert dice(masks[name], chest_truth[name]) >= 0.93, name  # 0.943 / 0.954 measured
        assert empty_slices_inside(masks[name], chest_truth[name]) == [], name


def test_cli_fill_box_puts_a_mask_on_every_slice_of_the_box(tmp_path, capsys, chest_ct, chest_truth, cli_engine):
    """--fill-box: the model's whole answer on every slice of the box; at the lung's base the box also holds the
    liver, which the model takes confidently, so Dice drops (0.843 measured, docs/training.md)."""
    from segmote_core.segmentation_io import read_segments

    out = tmp_path / "lung.seg.nrrd"
    truth = chest_truth["right lung"]
    corners = chest_ct.ijk_to_ras_points(np.reshape(bounding_box_ijk(truth), (2, 3))).reshape(-1)
    code = cli.main(["segment", str(CHEST_CT), "--out", str(out), "--box-ras", *[f"{v:.4f}" for v in corners],
                     "--name", "right lung", "--device", "cpu", "--fill-box", "--quiet"])
    assert code == 0, capsys.readouterr().err
    _, [segment] = read_segments(out)
    assert empty_slices_inside(segment.mask, truth) == []
    assert dice(segment.mask, truth) >= 0.82


@pytest.mark.parametrize("name", ["right lung", "left lung"])
def test_3d_box_continues_the_object_past_breaks_without_taking_the_neighbour(lite_engine, chest_ct, chest_truth,
                                                                              name):
    """At the lung's ends the model answers the liver or the chest wall with confidence; inside the box the slice
    keeps only what continues the lung, so the ends are neither empty nor another organ."""
    truth = chest_truth[name]
    mask = lite_engine.segment(chest_ct, box_ijk=bounding_box_ijk(truth))
    assert empty_slices_inside(mask, truth) == []
    assert dice(mask, truth) >= 0.93
    ends = [k for k in np.flatnonzero(truth.any(axis=(1, 2))) if truth[k].sum() >= 40][:3]
    assert all(dice(mask[k], truth[k]) >= 0.5 for k in ends), [round(dice(mask[k], truth[k]), 2) for k in ends]


def test_3d_box_on_thick_slices_leaves_no_empty_slice(lite_engine, chest_ct, chest_truth):
    """Every second slice of the 10 mm CT (20 mm apart): the lung jumps in shape between slices, and the box
    still gets a mask on each slice where the lung is."""
    thick = Volume(chest_ct.array[1::2].copy(), chest_ct.spacing * [1, 1, 2],
                   chest_ct.ijk_to_lps[:3, 3] + chest_ct.ijk_to_lps[:3, 2], chest_ct.direction)
    truth = chest_truth["right lung"][1::2]
    mask = lite_engine.segment(thick, box_ijk=bounding_box_ijk(truth))
    assert empty_slices_inside(mask, truth) == []
    assert dice(mask, truth) >= 0.8
    assert not mask[:, :, : bounding_box_ijk(truth)[0]].any()  # never outside the box


def test_3d_box_on_mr_fills_the_box(lite_engine, mni_case):
    """The lateral ventricles of an MR: LiteMedSAM outlines their rim rather than the dark CSF (docs/training.md),
    and flags it; still, no slice of the box where they are is left empty, and nothing leaves the box."""
    truth = mni_case.labels["ventricles"]
    box = bounding_box_ijk(truth)
    result = lite_engine.open(mni_case.volume).add_box(box)
    mask = result.mask
    assert result.normalization.rule[0] == "percentiles"
    assert result.low_confidence
    assert empty_slices_inside(mask, truth) == []
    outside = np.ones_like(mask)
    outside[box[2]:box[5] + 1, box[1]:box[4] + 1, box[0]:box[3] + 1] = False
    assert not (mask & outside).any()


def test_continuity_checks_still_end_propagation_outside_a_box(lite_engine, chest_ct, chest_truth):
    """A 2-D box propagated (no 3-D box) still stops where the lung ends: nothing far above or below it."""
    truth = chest_truth["left lung"]
    k = int(np.median(np.nonzero(truth)[0]))
    i0, j0, _, i1, j1, _ = bounding_box_ijk(truth[k][None])
    mask = lite_engine.segment(chest_ct, box_ijk=[i0, j0, k, i1, j1, k], propagate=True)
    present = np.flatnonzero(truth.any(axis=(1, 2)))
    filled = np.flatnonzero(mask.any(axis=(1, 2)))
    assert filled.min() >= present.min() - 1 and filled.max() <= present.max() + 1


def test_segment_result_reports_normalisation_and_predicted_iou(lite_engine, chest_ct, chest_truth):
    box = bounding_box_ijk(chest_truth["right lung"])
    k = (box[2] + box[5]) // 2
    result = lite_engine.open(chest_ct, window=CT_DEFAULT).add_box([box[0], box[1], k, box[3], box[4], k],
                                                                   slice_only=True)
    assert isinstance(result, Update) and list(result.slice_scores) == [k] and result.changed == (k, k)
    assert result.predicted_iou == pytest.approx(result.slice_scores[k]) and result.predicted_iou > LOW_CONFIDENCE
    assert not result.low_confidence and result.confidence_text.startswith("predicted IoU ")
    assert result.normalization.description == f"window L{CT_DEFAULT[0]:g} W{CT_DEFAULT[1]:g} (the window given)"


def test_low_predicted_iou_is_flagged():
    norm = window(40, 400)
    unsure = Update(np.zeros(1, bool), (3, 4), {3: 0.4, 4: 0.9}, {3: 300, 4: 100}, norm, 2)
    assert unsure.predicted_iou == pytest.approx((0.4 * 300 + 0.9 * 100) / 400)
    assert unsure.low_confidence and "low" in unsure.confidence_text and "check" in unsure.confidence_text
    empty = Update(np.zeros(1, bool), None, {}, {}, norm, 2)
    assert empty.predicted_iou is None and empty.low_confidence and "empty" in empty.confidence_text
