"""The interactive session (segmote_core.session): one prompt gives the object in 3-D, clicks correct it in 3-D,
undo restores the state before an interaction, and bad input changes nothing. Real LiteMedSAM, real CT."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import bounding_box_ijk
from segmote_core.errors import Cancelled, InputError
from segmote_core.metrics import dice
from segmote_core.volume import Volume

pytestmark = pytest.mark.slow  # LiteMedSAM or real scans throughout: `make test` only (tests/conftest.py)


def middle_box(truth: np.ndarray) -> tuple[list[float], int]:
    """The tight 2-D box (i0, j0, k, i1, j1, k) of a (K, J, I) mask on its middle axial slice."""
    slices = np.flatnonzero(truth.any(axis=(1, 2)))
    k = int((slices[0] + slices[-1]) // 2)
    i0, j0, _, i1, j1, _ = bounding_box_ijk(truth[k][None])
    return [i0, j0, k, i1, j1, k], k


@pytest.fixture(scope="module")
def lung_session(lite_engine, chest_ct, chest_truth):
    """A session holding the left lung from one 2-D box (a fresh copy of the state for each test is not needed:
    tests that change it undo their change)."""
    session = lite_engine.open(chest_ct)
    box, _ = middle_box(chest_truth["left lung"])
    return session, session.add_box(box)


def test_one_2d_box_gives_the_whole_object(lung_session, chest_truth):
    session, update = lung_session
    truth = chest_truth["left lung"]
    assert dice(update.mask, truth) >= 0.90
    present = np.flatnonzero(truth.any(axis=(1, 2)))
    first, last = update.changed
    assert last - first + 1 >= 0.75 * len(present)  # many slices from one prompt, reported as changed
    assert set(update.slice_scores) == set(np.flatnonzero(update.mask.any(axis=(1, 2))).tolist())
    assert update.predicted_iou > 0.75 and not update.low_confidence


def test_a_click_corrects_in_3d_and_undo_restores_the_state(lite_engine, chest_ct, chest_truth):
    """The interactive protocol's first click (a box with the object's slice range, then a click in the middle of
    the slice the result misses most of); undo gives back exactly the state before it."""
    truth = chest_truth["left lung"]
    session = lite_engine.open(chest_ct)
    box, _ = middle_box(truth)
    present = np.flatnonzero(truth.any(axis=(1, 2)))
    before = session.add_box(box, z_range=(present[0], present[-1]))
    # a positive click in the middle of a slice the result misses most of, as the interactive protocol clicks
    error = truth & ~before.mask
    k = int(np.argmax(error.sum(axis=(1, 2))))
    rows, cols = np.nonzero(error[k])
    corrected = session.add_point([cols[len(cols) // 2], rows[len(rows) // 2], k], positive=True)
    assert corrected.mask[k, rows[len(rows) // 2], cols[len(cols) // 2]]  # the click is held
    assert dice(corrected.mask, truth) >= dice(before.mask, truth) - 0.02
    assert session.can_undo()
    restored = session.undo()
    assert np.array_equal(restored.mask, before.mask)
    assert restored.slice_scores == before.slice_scores
    assert restored.changed == corrected.changed


def test_a_negative_click_removes_a_leak_on_every_slice_it_spans(lite_engine):
    """Two touching blocks of different brightness, taken together by a 3-D box; one exclude click on the
    brighter block's middle slice removes it from the neighbouring slices too."""
    array = np.zeros((7, 64, 64), np.float32)
    array[:, 16:48, 12:32] = 600.0  # the object
    array[:, 16:48, 32:52] = 1400.0  # its brighter neighbour, touching it
    volume = Volume(array, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))
    session = lite_engine.open(volume, window=(1000, 2000))
    first = session.add_box([10, 14, 1, 53, 49, 5])
    neighbour = np.zeros(array.shape, bool)
    neighbour[:, 16:48, 32:52] = True
    leaked = (first.mask & neighbour).sum(axis=(1, 2))
    assert (leaked[1:6] > 100).all(), "the box's answer must take the neighbour for this test to mean anything"
    after = session.add_point([42, 32, 3], positive=False)
    left = (after.mask & neighbour).sum(axis=(1, 2))
    assert left[3] == 0
    assert (left[1:6] < 0.2 * leaked[1:6]).sum() >= 3  # carried to the neighbouring slices
    assert after.mask[3, 32, 20]  # the object stays


def test_bad_input_is_one_line_and_changes_nothing(lung_session, lite_engine, chest_ct):
    session, before = lung_session
    undo_depth = len(session._history)
    for call in (lambda: session.add_point([500, 10, 10]),  # outside the volume
                 lambda: session.add_box([10, 10, 5, 50, 50, 5], z_range=(20, 10)),  # z_min > z_max
                 lambda: session.add_box([10, 10, 5, 50, 50, 5], z_range=(10, 20)),  # its slice outside the range
                 lambda: session.add_box([10, 10, 5, 10, 50, 5])):  # no extent in the slice plane
        with pytest.raises(InputError) as raised:
            call()
        assert "\n" not in str(raised.value)
        assert np.array_equal(session.mask, before.mask) and len(session._history) == undo_depth
    fresh = lite_engine.open(chest_ct)
    with pytest.raises(InputError, match="first click"):
        fresh.add_point([60, 60, 20], positive=False)
    with pytest.raises(InputError, match="nothing to undo"):
        fresh.undo()
    assert not fresh.mask.any()


def test_cancel_leaves_the_object_as_it_was(lite_engine, chest_ct, chest_truth):
    session = lite_engine.open(chest_ct)
    box, k = middle_box(chest_truth["right lung"])
    shown = []
    session.on_slice = lambda index, mask: shown.append(index)
    session.cancel = lambda: len(shown) >= 3
    with pytest.raises(Cancelled):
        session.add_box(box)
    assert shown[0] == session.stack.nearest_index(session.stack.ijk_to_stack([[0, 0, k]]))[0, 0]  # box slice first
    assert not session.mask.any() and not session.can_undo()


def test_reset_starts_a_new_object(lung_session, lite_engine, chest_ct, chest_truth):
    session = lite_engine.open(chest_ct)
    box, _ = middle_box(chest_truth["left lung"])
    session.add_box(box, slice_only=True)
    session.reset()
    assert not session.mask.any() and not session.can_undo() and not session.has_object
    with pytest.raises(InputError, match="first click"):
        session.add_point([60, 60, 20], positive=False)  # the previous object's prompts are gone
