"""`segmote demo` (the README's `make demo`): both lungs from boxes, automatic segmentation and one click with the
shipped adapter, scored against the ground truth, with its files written. Run in-process on the session's engines
so that nothing is embedded twice."""

from __future__ import annotations

import logging
import re

import pytest

from segmote_core import demo
from segmote_core.segmentation_io import read_segments

pytestmark = pytest.mark.slow  # LiteMedSAM or real scans throughout: `make test` only (tests/conftest.py)


def test_demo_segments_both_lungs_and_writes_its_files(tmp_path, lite_engine, lung_adapter_engine, caplog):
    with caplog.at_level(logging.INFO, logger="segmote_core.demo"):
        assert demo.run(tmp_path, "cpu", engine=lite_engine, adapter_engine=lung_adapter_engine) == 0
    messages = [record.getMessage() for record in caplog.records]
    text = "\n".join(messages)
    assert "normalisation: window L-300 W1400 (automatic: CT" in text  # no hand-picked window
    scores = {m.split(":")[0]: float(re.search(r"Dice (\d\.\d+)", m).group(1)) for m in messages if "Dice" in m}
    assert len(scores) == 6, text
    for what, score in scores.items():
        floor = 0.90 if "click" in what else 0.93  # measured: boxes 0.947 / 0.944, automatic 0.957 / 0.971,
        assert score >= floor, (what, score)       # one click 0.952 / 0.973
    _, segments = read_segments(tmp_path / "demo.seg.nrrd")
    assert [s.name for s in segments] == ["right lung", "left lung"]
    _, automatic = read_segments(tmp_path / "demo-auto.seg.nrrd")
    assert {s.name for s in automatic} == {"right lung", "left lung"}
    assert (tmp_path / "demo.png").stat().st_size > 10_000
