"""segmote eval: Dice and normalised surface Dice against hand-computed cases, name matching, grids, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segmote_core.errors import InputError
from segmote_core.evaluate import dice_score, evaluate_files, evaluate_segments, surface_dice_score
from segmote_core.segmentation_io import Segment, save_segments
from segmote_core.volume import Volume


def cubes(shift=1):
    """Two 10^3 cubes, the second shifted by `shift` voxels along the first array axis."""
    a = np.zeros((30, 30, 30), bool)
    b = np.zeros_like(a)
    a[10:20, 10:20, 10:20] = True
    b[10 + shift:20 + shift, 10:20, 10:20] = True
    return a, b


def test_dice_of_two_cubes_with_known_overlap():
    a, b = cubes(1)
    assert dice_score(a, b) == pytest.approx(2 * 900 / 2000)  # 9 of 10 layers overlap
    a, b = cubes(5)
    assert dice_score(a, b) == pytest.approx(0.5)
    assert dice_score(a, a) == 1.0
    assert dice_score(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert dice_score(a, np.zeros_like(a)) == 0.0


def test_the_one_dice_rule_agrees_with_monai():
    """segmote_core.metrics.dice (used by every command, report and benchmark) against MONAI's compute_dice."""
    import torch
    from monai.metrics import compute_dice

    from segmote_core.metrics import dice, pooled_dice

    rng = np.random.default_rng(0)
    for density in (0.01, 0.3, 0.9):
        a, b = rng.random((2, 12, 20, 16)) < density
        expected = float(compute_dice(torch.from_numpy(a)[None, None].float(), torch.from_numpy(b)[None, None].float(),
                                      include_background=True, ignore_empty=False)[0, 0])
        assert dice(a, b) == pytest.approx(expected, abs=1e-6)
        # Pooled over slices it is the Dice of the stacked slices.
        assert pooled_dice(zip(a, b)) == pytest.approx(expected, abs=1e-6)
    empty = np.zeros((4, 4), bool)
    assert dice(empty, empty) == 1.0 and pooled_dice([(empty, empty)]) == 1.0
    assert np.isnan(pooled_dice([]))  # nothing measured
    with pytest.raises(ValueError, match="shapes"):
        dice(empty, np.zeros((4, 5), bool))


def test_surface_dice_of_a_one_voxel_shift_uses_physical_spacing():
    # Boundaries: 488 voxels each (10^3 - 8^3). With the shift, 324 boundary voxels of each cube lie on the other's
    # boundary (the 9 shared layers' rims, 36 each); every other boundary voxel is exactly one step (0.5 mm along
    # axis 0) away from the other boundary.
    a, b = cubes(1)
    spacing = (0.5, 1.0, 1.0)
    exact = 2 * 324 / (2 * 488)
    assert surface_dice_score(a, b, spacing, 0.0) == pytest.approx(exact)
    assert surface_dice_score(a, b, spacing, 0.4) == pytest.approx(exact)
    assert surface_dice_score(a, b, spacing, 0.5) == pytest.approx(1.0)
    # The same shift with 1 mm along axis 0: 0.5 mm is no longer enough.
    assert surface_dice_score(a, b, (1.0, 1.0, 1.0), 0.5) == pytest.approx(exact)
    assert surface_dice_score(a, a, spacing, 0.0) == 1.0
    assert surface_dice_score(a, np.zeros_like(a), spacing, 1.0) == 0.0
    with pytest.raises(InputError):
        surface_dice_score(a, b, spacing, -1.0)


def test_segments_are_matched_by_name():
    a, b = cubes(1)
    scores, unmatched = evaluate_segments({"extra": a, "liver": b}, {"liver": a, "spleen": b}, (1.0, 1.0, 1.0))
    by_name = {s.name: s for s in scores}
    assert by_name["liver"].dice == pytest.approx(0.9) and not by_name["liver"].missing
    assert by_name["spleen"].missing and by_name["spleen"].dice == 0.0
    assert by_name["liver"].gt_volume_ml == pytest.approx(1.0)  # 1000 voxels of 1 mm^3
    assert unmatched == ["extra"]


def grid(shape=(30, 30, 30), spacing=(1.0, 1.0, 0.5)) -> Volume:
    return Volume(np.zeros(shape, np.int16), spacing, (0.0, 0.0, 0.0), np.eye(3))


def test_files_and_cli(tmp_path, capsys):
    a, b = cubes(1)
    volume = grid()  # spacing (I, J, K) = (1, 1, 0.5): array axis 0 (K) is 0.5 mm
    save_segments(tmp_path / "gt.seg.nrrd", volume, [Segment("liver", a), Segment("kidney", b)])
    save_segments(tmp_path / "pred.seg.nrrd", volume, [Segment("kidney", b), Segment("liver", b)])
    report = evaluate_files(tmp_path / "pred.seg.nrrd", tmp_path / "gt.seg.nrrd", tolerance_mm=0.5)
    scores = {s["name"]: s for s in report["segments"]}
    assert scores["liver"]["dice"] == pytest.approx(0.9) and scores["liver"]["surface_dice"] == pytest.approx(1.0)
    assert scores["kidney"]["dice"] == 1.0
    assert report["mean_dice"] == pytest.approx(0.95)

    from segmote_core.cli import main

    assert main(["eval", "--pred", str(tmp_path / "pred.seg.nrrd"), "--gt", str(tmp_path / "gt.seg.nrrd"),
                 "--tolerance-mm", "0.4", "--json", str(tmp_path / "r.json")]) == 0
    table = capsys.readouterr().out
    assert "liver" in table and "NSD@0.4mm" in table and "0.9000" in table
    written = json.loads((tmp_path / "r.json").read_text())
    assert {s["name"]: s for s in written["segments"]}["liver"]["surface_dice"] == pytest.approx(2 * 324 / 976)


def test_prediction_on_another_grid_is_one_line_error(tmp_path, capsys):
    a, _ = cubes(1)
    save_segments(tmp_path / "gt.seg.nrrd", grid(), [Segment("liver", a)])
    save_segments(tmp_path / "pred.seg.nrrd", grid(spacing=(0.7, 0.7, 0.5)), [Segment("liver", a)])
    with pytest.raises(InputError) as error:
        evaluate_files(tmp_path / "pred.seg.nrrd", tmp_path / "gt.seg.nrrd")
    message = str(error.value)
    assert "\n" not in message and "different grids" in message and "0.7" in message
    from segmote_core.cli import main

    assert main(["eval", "--pred", str(tmp_path / "pred.seg.nrrd"), "--gt", str(tmp_path / "gt.seg.nrrd")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
