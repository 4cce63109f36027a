"""The admin views' pure parts: the pool map's aggregation, rendering, and percentiles."""
import pytest

from pagedserve.common import pool_view
from pagedserve.common.pool_view import aggregate, render_map
from pagedserve.scheduler_svc.metrics import percentile, summary


def test_small_pools_get_one_cell_per_block():
    assert aggregate("..uusc", 10) == ("..uusc", 1)


def test_large_pools_fold_runs_of_blocks_into_their_majority_state():
    states = "u" * 7 + "." * 3 + "." * 6 + "s" * 4 + "c" * 2
    assert aggregate(states, 3) == ("u.s", 8)  # ceil(22 / 3) = 8 blocks a cell


def test_a_tie_shows_the_busier_state():
    assert aggregate("..uu" + "ccss" + ".w", 3) == ("usw", 4)


def test_ten_thousand_blocks_fit_the_map():
    cells, per_cell = aggregate("u" * 5000 + "." * 5000, 768)
    assert per_cell == 14 and len(cells) <= 768
    assert cells.count("u") == 5000 // 14 + 1 - (5000 % 14 < 7)


def test_aggregate_refuses_an_empty_map():
    with pytest.raises(ValueError, match="max_cells=0"):
        aggregate("...", 0)


def test_map_lines_are_as_wide_as_asked_and_say_their_scale():
    lines = render_map("u" * 30 + "." * 10, width=8, rows=2, color=False)
    assert lines[:2] == ["########", "##...."] and lines[-1].startswith("1 cell = 3 blocks")
    assert render_map("us.", width=8, rows=2, color=False) == ["#@.", "1 cell = 1 block"]


def test_colour_only_when_asked():
    assert "\x1b[" in render_map("u", 4, 1, color=True)[0]
    assert "\x1b[" not in pool_view.legend(color=False)


@pytest.mark.parametrize("q, want", [(0, 1.0), (50, 2.5), (90, 3.7), (99, 3.97), (100, 4.0)])
def test_percentiles_interpolate_between_ranks_like_numpy(q, want):
    assert percentile([4.0, 1.0, 3.0, 2.0], q) == pytest.approx(want)


def test_percentiles_of_nothing_are_none_and_q_is_checked():
    assert summary([]) == {"count": 0, "p50": None, "p90": None, "p99": None}
    assert percentile([5.0], 99) == 5.0
    with pytest.raises(ValueError, match="got 101"):
        percentile([1.0], 101)
