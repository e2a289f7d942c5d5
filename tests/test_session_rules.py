"""The session's intensity rules on small arrays, and one of them through LiteMedSAM on a synthetic column."""

from __future__ import annotations

import numpy as np

from segmote_core.session import Session, complete_in_box, object_levels, peeled_spot
from segmote_core.volume import Volume


def vertebra_slice():
    """A bright body with a slightly darker arch joined to it, a separate bright spot, dark surroundings."""
    image = np.full((40, 40), 0.2)
    image[10:20, 10:22] = 0.8  # the body: what the model outlined
    image[20:28, 14:18] = 0.7  # the arch, joined to the body
    image[30:34, 30:34] = 0.8  # a bright spot that does not touch the object
    answer = np.zeros(image.shape, bool)
    answer[10:20, 10:22] = True
    return image, answer


def test_a_box_answer_is_completed_with_the_connected_pixels_of_its_level():
    image, answer = vertebra_slice()
    box = np.array([8, 8, 36, 36], float)
    inside = np.zeros(image.shape, bool)
    inside[8:37, 8:37] = True
    completed = complete_in_box(answer, box, image, inside)
    assert completed[answer].all()
    assert completed[20:28, 14:18].all(), "the arch joined to the body belongs to the object"
    assert not completed[30:34, 30:34].any(), "a bright spot that does not touch the object does not"
    assert not (completed & (image == 0.2)).any()


def test_completion_stays_within_its_reach_and_needs_a_level_gap():
    image, answer = vertebra_slice()
    box = np.array([8, 8, 36, 36], float)
    reach = np.zeros(image.shape, bool)
    reach[8:24, 8:37] = True  # the arch's far end lies outside
    completed = complete_in_box(answer, box, image, reach)
    assert completed[20:24, 14:18].all() and not completed[24:28].any()
    flat = np.where(image > 0.5, 0.5, 0.48)  # object and surroundings closer than the level gap
    assert object_levels(answer, box, flat) is None
    assert np.array_equal(complete_in_box(answer, box, flat, reach), answer)


def test_an_exclude_click_marks_another_tissue_only_where_its_intensity_differs():
    image, _ = vertebra_slice()
    mask = np.zeros(image.shape, bool)
    mask[10:20, 10:26] = True  # the body and a strip of its dark surroundings
    taken = Session._other_tissue(image, mask, 15, 24)  # a click on the dark part inside the mask
    assert taken.any() and not (taken & (image > 0.5)).any()
    assert not Session._other_tissue(image, mask, 14, 14).any(), "a click on the object's own intensity"


def test_an_exclude_click_on_the_rim_peels_the_rim():
    mask = np.zeros((30, 30), bool)
    mask[5:25, 5:25] = True
    rim = peeled_spot(mask, 5, 15)  # on the top edge
    assert rim.any() and rim[5].sum() == rim.sum(), "only the edge row"
    deep = peeled_spot(mask, 15, 15)
    assert deep.sum() == 25, "deep inside: the whole 5x5 spot"


def test_an_exclude_click_on_the_last_slice_ends_the_object_before_it(lite_engine):
    """A column followed one slice past where the user wants it to end: one exclude click deep in that slice empties
    it, and no other slice changes (the user's box lies the other way)."""
    array = np.zeros((9, 64, 64), np.float32)
    array[:, 20:44, 22:42] = 900.0
    volume = Volume(array, (1.0, 1.0, 3.0), (0.0, 0.0, 0.0), np.eye(3))
    session = lite_engine.open(volume, window=(400, 1000))
    first = session.add_box([18, 16, 4, 45, 47, 4], z_range=(1, 7))
    assert first.mask[1:8].any(axis=(1, 2)).all()
    after = session.add_point([32, 32, 7], positive=False)
    assert not after.mask[7].any()
    assert np.array_equal(after.mask[:7], first.mask[:7])
    undone = session.undo()
    assert np.array_equal(undone.mask, first.mask)
