"""benchmarks/heap_trim_cost.py: the paired step-time difference of alternating trimmed/untrimmed steps."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from heap_trim_cost import paired_difference  # noqa: E402


def test_paired_difference_pairs_adjacent_steps_whichever_comes_first():
    seconds = [1.0, 1.3, 1.5, 1.1, 2.0, 2.4]
    trimmed = [False, True, True, False, False, True]
    got = paired_difference(seconds, trimmed)
    assert got["pairs"] == 3
    assert got["diffs"] == pytest.approx([0.3, 0.4, 0.4])
    assert got["mean"] == pytest.approx(1.1 / 3)
    assert got["median"] == pytest.approx(0.4)
    assert got["stderr"] == pytest.approx(0.1 / 3)  # stdev(0.3, 0.4, 0.4) = 0.1/√3, ÷ √3 pairs
    assert got["median_trimmed"] == pytest.approx(1.5)
    assert got["median_untrimmed"] == pytest.approx(1.1)


def test_paired_difference_drops_an_unpaired_last_step():
    got = paired_difference([1.0, 1.2, 1.0, 1.3, 9.0], [False, True, False, True, False])
    assert got["pairs"] == 2 and got["diffs"] == pytest.approx([0.2, 0.3])


@pytest.mark.parametrize("seconds, trimmed, message", [
    ([1.0, 1.1, 1.2, 1.3], [True, True, False, True], "steps 0 and 1 are both trimmed"),
    ([1.0, 1.1, 1.2], [True, False], "3 step times for 2 trimming flags"),
    ([1.0, 1.1], [True, False], "at least two pairs"),
])
def test_paired_difference_refuses_steps_that_do_not_alternate(seconds, trimmed, message):
    with pytest.raises(ValueError, match=message):
        paired_difference(seconds, trimmed)
