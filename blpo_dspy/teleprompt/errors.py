"""Error-batch and retain-batch sampling policies.

Policies are small objects behind ``typing.Protocol`` so users can swap them (GEPA-style) without subclassing the
teleprompter.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Hashable, Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class BatchSampler(Protocol):
    """Chooses up to ``k`` indices from candidate indices, given a grouping key per index."""

    def sample(self, indices: Sequence[int], keys: Sequence[Hashable], k: int, rng: random.Random) -> list[int]:
        """Return at most ``k`` distinct indices drawn from ``indices`` (``keys[i]`` is the group of ``indices[i]``)."""
        ...


class BalancedSampler:
    """Round-robin over groups (e.g. (gold, predicted) label pairs), each group shuffled by the seeded RNG.

    With errors grouped by (gold, predicted), the batch covers every kind of mistake before repeating one, which
    keeps a frequent confusion from crowding out rarer ones.
    """

    def sample(self, indices: Sequence[int], keys: Sequence[Hashable], k: int, rng: random.Random) -> list[int]:
        """Draw a balanced batch of at most ``k`` indices."""
        groups: dict[str, list[int]] = defaultdict(list)
        for index, key in zip(indices, keys, strict=True):
            groups[repr(key)].append(index)
        order = sorted(groups)
        rng.shuffle(order)
        for name in order:
            rng.shuffle(groups[name])
        batch: list[int] = []
        while len(batch) < k and any(groups[name] for name in order):
            for name in order:
                if groups[name] and len(batch) < k:
                    batch.append(groups[name].pop())
        return batch


class UniformSampler:
    """Uniform random sample without replacement (the paper's plain error sampling)."""

    def sample(self, indices: Sequence[int], keys: Sequence[Hashable], k: int, rng: random.Random) -> list[int]:
        """Draw at most ``k`` indices uniformly."""
        pool = list(indices)
        rng.shuffle(pool)
        return pool[:k]
