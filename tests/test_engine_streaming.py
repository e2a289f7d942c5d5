"""A 3-D box streams: the central slice's mask arrives first (one embedding), the rest slice by slice; cancelling
keeps what was streamed with the caller."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import LUNG_WINDOW, bounding_box_ijk
from segmote_core.errors import Cancelled

pytestmark = pytest.mark.slow  # LiteMedSAM or real scans throughout: `make test` only (tests/conftest.py)


def five_slice_lung_box(truth: np.ndarray) -> list[int]:
    """A 3-D box around the lung, five slices deep (k), centred on its middle slice."""
    box = bounding_box_ijk(truth)
    middle = int(np.median(np.nonzero(truth)[0]))
    box[2], box[5] = middle - 2, middle + 2
    return box


def test_central_slice_first_then_one_slice_at_a_time(lite_engine, chest_ct, chest_truth):
    box = five_slice_lung_box(chest_truth["right lung"])
    embedded_before = lite_engine.cache.misses
    seen = []

    def on_slice(index, mask):
        seen.append((index, mask.copy(), lite_engine.cache.misses - embedded_before))

    streamed = lite_engine.segment(chest_ct, box_ijk=box, window=LUNG_WINDOW, on_slice=on_slice)
    _, first_mask, embedded = seen[0]
    assert embedded <= 1  # only the central slice was embedded before its mask was shown
    assert np.flatnonzero(first_mask.any(axis=(1, 2))).tolist() == [box[2] + 2]  # the box's central slice (k)
    for (_, before, _), (_, after, _) in zip(seen, seen[1:]):
        added = np.flatnonzero((after & ~before).any(axis=(1, 2)))
        assert added.size == 1 and (before <= after).all()  # one new slice per call, nothing taken back
    assert np.array_equal(seen[-1][1], streamed) and len(seen) == 5
    # streaming changes nothing in the answer
    assert np.array_equal(streamed, lite_engine.segment(chest_ct, box_ijk=box, window=LUNG_WINDOW))


def test_cancel_keeps_what_was_streamed(lite_engine, chest_ct, chest_truth):
    box = five_slice_lung_box(chest_truth["left lung"])
    snapshots = []
    with pytest.raises(Cancelled):
        lite_engine.segment(chest_ct, box_ijk=box, window=LUNG_WINDOW, cancel=lambda: len(snapshots) >= 2,
                            on_slice=lambda index, mask: snapshots.append(mask.copy()))
    assert len(snapshots) == 2
    assert np.flatnonzero(snapshots[-1].any(axis=(1, 2))).size == 2
