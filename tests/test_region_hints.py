"""Region questions' hint: the one class the detector sees in the box, on the frame without it (issue 14)."""
from __future__ import annotations

import numpy as np
import pytest

from rtrt.runtime.detection import check_region, region_detection

NAMES = ["cone", "stone", "bag"]


def _map(gh=4, gw=4):
    return np.zeros((len(NAMES), gh, gw))


def test_the_box_class_wins_over_a_stronger_class_elsewhere():
    sim = _map()
    sim[0, 0, 0] = 0.9  # the image's best class, outside the box
    sim[1, 2:4, 2:4] = 0.5  # inside the box [32, 32, 64, 64] of a 64 x 64 frame (cells of 16 px)
    d = region_detection(sim, (32, 32, 64, 64), (64, 64), NAMES)
    assert (d.name, d.index) == ("stone", 1) and d.score == pytest.approx(0.5)
    assert d.box == (32.0, 32.0, 64.0, 64.0)
    assert 32 <= d.peak[0] <= 64 and 32 <= d.peak[1] <= 64


def test_mean_over_the_box_cells_not_the_max():
    sim = _map()
    sim[0, 2, 2] = 0.8  # one hot cell of four
    sim[2, 2:4, 2:4] = 0.3  # the whole box
    d = region_detection(sim, (32, 32, 64, 64), (64, 64), NAMES)
    assert d.name == "bag" and d.score == pytest.approx(0.3)  # 0.8 / 4 = 0.2 < 0.3


def test_rank_replaces_the_means_and_ties_go_to_the_first_class():
    sim = _map()
    sim[0, 2:4, 2:4] = 0.4
    sim[1, 2:4, 2:4] = 0.3
    assert region_detection(sim, (32, 32, 64, 64), (64, 64), NAMES).name == "cone"
    # Standardised per class (a calibrated detector's z-scores): stone stands out more.
    mean, std = np.array([0.5, 0.1, 0.0]), np.array([0.1, 0.1, 1.0])
    d = region_detection(sim, (32, 32, 64, 64), (64, 64), NAMES, rank=lambda m: (m - mean) / std)
    assert d.name == "stone" and d.score == pytest.approx(0.3)  # the score stays the mean cosine
    assert region_detection(_map(), (0, 0, 64, 64), (64, 64), NAMES).name == "cone"


def test_a_box_smaller_than_a_cell_uses_the_cell_at_its_centre():
    sim = _map()
    sim[2, 1, 2] = 0.7  # cell row 1, column 2: x 32-48, y 16-32
    d = region_detection(sim, (40, 20, 42, 22), (64, 64), NAMES)
    assert d.name == "bag" and d.peak == (40.0, 24.0)


def test_non_square_frames_map_cells_to_pixels():
    sim = np.zeros((3, 2, 4))  # 2 rows, 4 columns over a 128 x 32 frame: cells of 32 x 16 px
    sim[1, 1, 3] = 0.6
    assert region_detection(sim, (96, 16, 128, 32), (128, 32), NAMES).name == "stone"
    assert region_detection(sim, (0, 0, 32, 16), (128, 32), NAMES).name == "cone"


@pytest.mark.parametrize("box, match", [
    ((1, 2, 3), "four"), (("a", 1, 2, 3), "four numbers"), ("1234", "four numbers"), ((1, 2, float("nan"), 4), "finite"),
    ((10, 10, 10, 20), "empty"), ((10, 20, 30, 5), "empty"), ((70, 0, 80, 10), "outside"), ((-9, -9, 0, 5), "outside"),
])
def test_bad_regions_are_refused_with_what_is_wrong(box, match):
    with pytest.raises(ValueError, match=match):
        check_region(box, 64, 64)
    with pytest.raises(ValueError, match=match):
        region_detection(_map(), box, (64, 64), NAMES)


def test_a_similarity_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="not \\[3, gh, gw\\]"):
        region_detection(np.zeros((2, 4, 4)), (0, 0, 10, 10), (64, 64), NAMES)
    with pytest.raises(ValueError, match="not \\[3, gh, gw\\]"):
        region_detection(np.zeros((3, 16)), (0, 0, 10, 10), (64, 64), NAMES)
