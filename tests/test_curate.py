"""Curation: every filter keeps and rejects the right synthetic samples, with the right reasons."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from segmote_core.curate import CurationConfig, curate_arrays, image_scores, mask_scores, read_manifest
from segmote_core.errors import InputError

H = W = 64


def textured(seed: int) -> np.ndarray:
    """A clear, contrasted, information-rich slice in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    image = 0.5 + 0.3 * np.sin(xx / (3 + seed % 5)) * np.cos(yy / 4) + 0.1 * rng.standard_normal((H, W))
    return np.clip(image, 0, 1).astype(np.float32)


def disc(radius=10, centre=(32, 32)) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def synthetic_volume():
    """Slices and the verdict each (slice, 'organ') sample must get."""
    slices, masks, expected = [], [], []

    def add(image, mask, verdict):
        slices.append(image)
        masks.append(mask)
        expected.append(verdict)

    add(textured(0), disc(10), "kept")
    add(np.full((H, W), 0.5, np.float32), disc(10), "clarity")  # flat: no edges, no contrast, no entropy
    add(textured(2), np.zeros((H, W), bool), "empty")
    small = np.zeros((H, W), bool)
    small[5:7, 5:7] = True
    add(textured(3), small, "min_area")  # 4 pixels
    dots = np.zeros((H, W), bool)
    dots[2:62:5, 2:62:5] = True  # 144 single-pixel components
    add(textured(4), dots, "components")
    add(textured(0).copy(), disc(10), "duplicate")  # the first slice again
    add(textured(6), np.ones((H, W), bool), "foreground")  # the whole slice
    add(textured(7), disc(12, (20, 40)), "kept")
    return np.stack(slices), np.stack(masks), expected


def test_scores_of_simple_images():
    flat = image_scores(np.full((8, 8), 0.3))
    assert flat["clarity"] == 0 and flat["contrast"] == 0 and flat["entropy"] == 0
    halves = np.zeros((8, 8))
    halves[:, 4:] = 1.0
    scores = image_scores(halves)
    assert scores["contrast"] == pytest.approx(0.5) and scores["entropy"] == pytest.approx(1.0)
    two = np.zeros((10, 10), bool)
    two[1:3, 1:3] = True
    two[6:9, 6:9] = True
    assert mask_scores(two) == {"foreground_ratio": 0.13, "components": 2, "area": 13, "smallest_component": 4}


def test_every_filter_rejects_with_its_reason(tmp_path):
    slices, masks, expected = synthetic_volume()
    result = curate_arrays([("vol1", "CT", slices, {"organ": masks})])
    verdicts = {s.slice: ("kept" if s.kept else s.failed[0]) for s in result.samples}
    assert [verdicts[i] for i in range(len(expected))] == expected
    by_slice = {s.slice: s for s in result.samples}
    assert by_slice[5].duplicate_of == 0 and "near-duplicate of slice 0" in by_slice[5].reason
    assert "mask area 4 px < 10" in by_slice[3].reason
    assert "connected components" in by_slice[4].reason and by_slice[4].components == 144
    assert "clarity" in by_slice[1].reason and set(by_slice[1].failed) >= {"clarity", "contrast", "entropy"}
    assert by_slice[2].reason.startswith("empty")
    assert result.removed_by() == {"empty": 1, "clarity": 1, "foreground": 1, "components": 1, "min_area": 1,
                                   "duplicate": 1}
    # The manifest holds every sample with every score and reason, in JSON and CSV.
    path = result.write(tmp_path / "manifest.json")
    document = json.loads(path.read_text())
    assert len(document["samples"]) == len(expected) and document["summary"]["kept"] == 2
    row = document["samples"][3]
    assert {"clarity", "contrast", "entropy", "foreground_ratio", "components", "area", "reason"} <= set(row)
    assert read_manifest(path) == {("vol1", 0, "organ"), ("vol1", 7, "organ")}
    assert read_manifest(result.write(tmp_path / "manifest.csv")) == read_manifest(path)


def test_budget_is_balanced_over_modality_and_class():
    # Class "big" has 6 good slices, class "small" 2, in two modalities: a budget of 6 takes turns between groups.
    volumes = []
    for case, modality in (("a", "CT"), ("b", "MR")):
        slices = np.stack([textured(10 + i) for i in range(6)])
        big = np.stack([disc(8 + i) for i in range(6)])
        small = np.zeros_like(big)
        small[:2] = [disc(5, (15, 15)), disc(6, (15, 15))]
        volumes.append((case, modality, slices, {"big": big, "small": small}))
    result = curate_arrays(volumes, CurationConfig(budget=6))
    kept = [(s.modality, s.label) for s in result.kept]
    assert len(kept) == 6
    # Groups take turns in sorted order: every group gets one, then the first two groups a second.
    assert {group: kept.count(group) for group in set(kept)} == {("CT", "big"): 2, ("CT", "small"): 2,
                                                                  ("MR", "big"): 1, ("MR", "small"): 1}
    over = [s for s in result.samples if s.failed == ["budget"]]
    assert over and all(s.reason.startswith("budget: ranked") for s in over)
    # Within a group the best quality goes first.
    for group in {("CT", "big"), ("MR", "big")}:
        members = [s for s in result.samples if (s.modality, s.label) == group and s.quality is not None]
        kept_q = [s.quality for s in members if s.kept]
        dropped_q = [s.quality for s in members if not s.kept]
        assert min(kept_q) >= max(dropped_q)
    fraction = curate_arrays(volumes, CurationConfig(fraction=0.5))
    assert len(fraction.kept) == 8  # half of the 16 passing samples


def test_nothing_kept_says_which_filter_removed_what():
    slices = np.stack([np.full((H, W), 0.5, np.float32)] * 3)
    masks = np.zeros((3, H, W), bool)
    masks[0] = disc(10)
    with pytest.raises(InputError) as error:
        curate_arrays([("v", "CT", slices, {"organ": masks})])
    message = str(error.value)
    assert "\n" not in message
    assert "curation kept nothing from 3 samples" in message
    assert "empty removed 2" in message and "clarity removed 1" in message
    with pytest.raises(InputError):
        CurationConfig(budget=3, fraction=0.5)


def test_cli_writes_a_manifest_and_reports_errors_in_one_line(tmp_path, capsys):
    slices, masks, _ = synthetic_volume()
    hu = (slices * 1000 - 500).astype(np.int16)
    image = sitk.GetImageFromArray(hu)
    sitk.WriteImage(image, str(tmp_path / "scan.nrrd"))
    labels = sitk.GetImageFromArray(masks.astype(np.uint8))
    sitk.WriteImage(labels, str(tmp_path / "labels.nrrd"))
    from segmote_core.cli import main

    assert main(["curate", "--image", str(tmp_path / "scan.nrrd"), "--segmentation",
                 str(tmp_path / "labels.nrrd"), "--window", "0", "1000", "--out", str(tmp_path / "m.json")]) == 0
    assert "kept 2 of 8 samples" in capsys.readouterr().out
    assert read_manifest(tmp_path / "m.json") == {("scan", 0, "label 1"), ("scan", 7, "label 1")}
    assert main(["curate", "--image", str(tmp_path / "scan.nrrd"), "--segmentation",
                 str(tmp_path / "labels.nrrd"), "--classes", "liver", "--out", str(tmp_path / "x.json")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "liver" in err and "\n" not in err
