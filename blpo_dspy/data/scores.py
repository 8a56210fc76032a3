"""Turning human scores (mean opinion scores, crowd means) into task labels.

Used by the AGIQA-3K, AVT and Hugging Face loaders: a MOS threshold for binary labels (with a dropped middle
band), rounding to the nearest level, and quantile levels (e.g. quintiles -> 1..5) for balanced ordinal labels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def to_score(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` when it is missing, not a number, NaN or infinite."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def round_half_up(value: Any) -> Any:
    """Round a numeric score to the nearest integer, halves up (2.5 -> 3); non-numbers pass through unchanged.

    Python's ``round`` rounds halves to even (``round(2.5) == 2``), which would skew crowd means.
    """
    number = to_score(value)
    if number is None:
        return value
    return math.floor(number + 0.5)


def binary_from_mos(yes_at: float = 3.0, no_at: float = 2.0) -> Callable[[Any], Any]:
    """Label transform for a mean opinion score: ``>= yes_at`` -> ``"yes"``, ``<= no_at`` -> ``"no"``, else ``None``.

    ``None`` means "drop this row" (the ambiguous middle band). Values that are not numbers pass through unchanged
    so that label validation reports them.

    Raises:
        ValueError: ``no_at >= yes_at``.
    """
    if not no_at < yes_at:
        raise ValueError(f"no_at ({no_at}) must be below yes_at ({yes_at})")

    def transform(value: Any) -> Any:
        number = to_score(value)
        if number is None:
            return value
        if number >= yes_at:
            return "yes"
        if number <= no_at:
            return "no"
        return None

    return transform


def quantile_levels(scores: Sequence[float], levels: int) -> list[int]:
    """Assign each score a level ``0..levels-1`` by the quantiles of ``scores`` themselves.

    With ``levels=5`` these are quintiles: about a fifth of the scores per level. A score equal to a cut point
    goes to the upper level.

    Args:
        scores: Finite scores.
        levels: Number of levels (at least 2).

    Returns:
        One level per score, in the same order.
    """
    if levels < 2:
        raise ValueError("levels must be at least 2")
    if not scores:
        return []
    values = np.asarray(scores, dtype=float)
    cuts = np.quantile(values, [i / levels for i in range(1, levels)])
    return [int(level) for level in np.searchsorted(cuts, values, side="right")]
