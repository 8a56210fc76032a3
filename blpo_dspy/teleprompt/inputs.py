"""The checks every teleprompter of this package makes on ``compile(student, *, trainset, teacher, valset)``."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import dspy

logger = logging.getLogger(__name__)

PROGRAM_PARTS = ("task", "verbalizer", "judge")


def check_compile_inputs(
    optimizer: str,
    student: dspy.Module,
    trainset: Sequence[dspy.Example],
    teacher: dspy.Module | None,
    valset: Sequence[dspy.Example] | None,
    extra: Mapping[str, Any],
) -> tuple[list[dspy.Example], list[dspy.Example]]:
    """Validate the arguments of a ``compile`` call and return ``(trainset, valset)`` as lists.

    Args:
        optimizer: The optimizer's name, for the messages.
        student: The program; it must look like an ``ImageJudge`` (``task``, ``verbalizer`` and ``judge``).
        trainset: The optimisation split; must not be empty.
        teacher: Must be ``None`` (no optimizer here uses a teacher program).
        valset: The selection split; an empty or missing one falls back to the trainset, with a warning.
        extra: Unexpected keyword arguments of the call (must be empty).

    Raises:
        ValueError: A teacher program or an empty trainset.
        TypeError: Unexpected arguments, or a student that is not ImageJudge-like.
    """
    if teacher is not None:
        raise ValueError(f"{optimizer} does not use a teacher program")
    if extra:
        raise TypeError(f"unexpected arguments: {', '.join(sorted(extra))}")
    for part in PROGRAM_PARTS:
        if not hasattr(student, part):
            raise TypeError(f"{optimizer} compiles an ImageJudge-like program; the student has no '{part}'")
    if not trainset:
        raise ValueError("trainset is empty")
    train = list(trainset)
    if not valset:
        logger.warning("%s: no valset given; selection uses the trainset (scores will be optimistic)", optimizer)
        return train, train
    return train, list(valset)
