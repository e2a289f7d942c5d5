"""Every command under one error policy: a user error is one `error:` line and exit 1, with no warning before it
(docs/reliability.md, "Every entry point"). Cheap cases only: none of them loads a model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from segmote_core.cli import main
from segmote_core.shipped import shipped_adapter

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_ADAPTER = shipped_adapter("chest_ct_lungs")

CASES = {
    "train: missing data folder": (["train", "--data", "{tmp}/nope", "--out", "{tmp}/run", "--quiet"], "not found"),
    "train: missing config": (["train", "--config", "{tmp}/missing.yaml"], "config file not found"),
    "train: config not a mapping": (["train", "--config", "{tmp}/list.yaml"], "mapping"),
    "train: steps not a number": (["train", "--steps", "abc", "--data", "{tmp}/nope"], "steps must be an integer"),
    "train: negative steps": (["train", "--steps", "-5", "--data", "{tmp}/nope"], "steps must be 1 or more"),
    "curate: missing data folder": (["curate", "{tmp}/nope", "--out", "{tmp}/m.json"], "not found"),
    "curate: missing image": (["curate", "--image", "{tmp}/nope.nrrd", "--segmentation", "{tmp}/s.seg.nrrd",
                               "--out", "{tmp}/m.json"], "not found"),
    "curate: folder without data": (["curate", "{tmp}", "--out", "{tmp}/m.json"], "no .seg.nrrd files"),
    "weights: unknown name": (["weights", "download", "nope"], "unknown model"),
    "eval: missing prediction": (["eval", "--pred", "{tmp}/p.seg.nrrd", "--gt", "{tmp}/g.seg.nrrd"], "not found"),
    "auto: missing image": (["auto", "{tmp}/nope.nrrd", "--adapter", str(SHIPPED_ADAPTER), "--out",
                             "{tmp}/o.seg.nrrd"], "image not found"),
    "auto: missing adapter": (["auto", "{tmp}/nope.nrrd", "--adapter", "{tmp}/a.safetensors", "--out",
                               "{tmp}/o.seg.nrrd"], "adapter file"),
    "segment: bad output suffix": (["segment", "{tmp}/nope.nrrd", "--out", "{tmp}/o.png", "--box-ijk", "1", "1", "1",
                                    "4", "4", "1"], "must end in"),
}


# `segmote train` loads LiteMedSAM before it looks for its data folder: that case is in the full tier only.
@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.slow) if case == "train: missing data folder"
                                  else case for case in CASES])
def test_every_command_reports_a_user_error_in_one_line_with_exit_1(tmp_path, capsys, case):
    args, message = CASES[case]
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    code = main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


@pytest.mark.slow  # a fresh process that loads LiteMedSAM
def test_train_reports_its_error_without_a_dependency_warning(tmp_path):
    """In a fresh process, where first imports happen (a dependency that warns on import would show here)."""
    result = subprocess.run([sys.executable, "-m", "segmote_core.cli", "train", "--data", str(tmp_path / "nope"),
                             "--out", str(tmp_path / "run"), "--quiet"], capture_output=True, text=True, cwd=ROOT,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: "), result.stderr
