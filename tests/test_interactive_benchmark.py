"""benchmarks/interactive.py (the CVPR 2025 interactive protocol through the session, the peer in the same run)
runs end to end on a tiny case and writes what docs/benchmarks.md quotes. Not a timed test: no speed is checked."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "interactive.py"
_spec = importlib.util.spec_from_file_location("interactive", SCRIPT)
interactive = importlib.util.module_from_spec(_spec)
sys.modules["interactive"] = interactive
_spec.loader.exec_module(interactive)


def test_protocol_clicks_the_centre_of_the_largest_error():
    truth = np.zeros((5, 20, 20), bool)
    truth[1:4, 5:15, 5:15] = True
    prediction = truth.copy()
    prediction[1:4, 5:15, 5:9] = False  # a missed block
    prediction[0, 0:2, 0:2] = True  # a small false positive
    voxel, positive = interactive.next_click(prediction, truth)
    assert positive and tuple(voxel) == (2, 9, 6) or (positive and voxel[0] == 2 and 5 <= voxel[2] <= 8)
    assert interactive.next_click(truth, truth) is None
    assert interactive.auc([1, 1, 1]) == 1.0 and interactive.auc([0, 1]) == 0.5


@pytest.mark.slow  # the protocol loads LiteMedSAM
def test_tiny_case_runs_both_sides_and_writes_json(tmp_path, capsys):
    array = np.full((4, 40, 40), -1000, np.int16)
    labels = np.zeros(array.shape, np.uint8)
    array[:, 8:30, 10:28] = 40
    labels[:, 8:30, 10:28] = 1
    for data, name in ((array, "case.nii.gz"), (labels, "case_label.nii.gz")):
        image = sitk.GetImageFromArray(data)
        image.SetSpacing((1.0, 1.0, 3.0))
        sitk.WriteImage(image, str(tmp_path / name))
    out = tmp_path / "result.json"
    assert interactive.main(["--pair", str(tmp_path / "case.nii.gz"), str(tmp_path / "case_label.nii.gz"),
                             "--json", str(out), "--quiet", "--threads", "2"]) == 0
    assert "DSC per step" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["schema"] == interactive.SCHEMA and result["config"]["peer"]
    (run,) = result["objects"]
    assert len(run["dsc"]) == len(run["nsd"]) == len(run["seconds"]) == interactive.STEPS
    assert all(0.0 <= v <= 1.0 for v in run["dsc"] + run["nsd"])
    assert run["dsc"][0] > 0.5 and run["peer_dsc"] > 0.5  # a box on a plain block is found by both
    assert result["overall"]["objects"] == 1 and len(result["overall"]["dsc_per_step"]) == interactive.STEPS
