"""Score -> label helpers: rounding halves up, MOS thresholds with a dropped middle band, quantile levels."""

from __future__ import annotations

import pytest

from blpo_dspy.data import binary_from_mos, quantile_levels, round_half_up


def test_round_half_up_differs_from_bankers_rounding() -> None:
    assert [round_half_up(x) for x in (2.5, 3.5, 2.49, "4.5", 1)] == [3, 4, 2, 5, 1]
    assert round(2.5) == 2  # what Python's round would have given
    assert round_half_up("n/a") == "n/a"  # left for label validation to report


def test_binary_from_mos_drops_the_middle_band() -> None:
    transform = binary_from_mos(yes_at=3.0, no_at=2.0)
    assert [transform(x) for x in (3.0, 4.2, 2.0, 0.1, 2.5, "2.9")] == ["yes", "yes", "no", "no", None, None]
    assert transform("bad") == "bad"
    with pytest.raises(ValueError, match="below"):
        binary_from_mos(yes_at=2.0, no_at=3.0)


def test_quantile_levels_balance_and_order() -> None:
    scores = [float(x) for x in range(100, 0, -1)]
    levels = quantile_levels(scores, 5)
    assert [levels.count(k) for k in range(5)] == [20, 20, 20, 20, 20]
    assert levels == sorted(levels, reverse=True)  # descending scores -> descending levels
    assert quantile_levels([], 5) == []
    with pytest.raises(ValueError):
        quantile_levels([1.0], 1)
