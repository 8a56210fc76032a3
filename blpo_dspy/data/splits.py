"""Seeded, class-balanced splits and per-label samples of examples, and a fingerprint of a set of examples.

All functions are deterministic for a seed and do not depend on the order of the input: examples are grouped
by label and sorted by id before the seeded shuffle, so reloading the same data in another order gives the
same splits. Pairwise tasks are stratified on their label (``A``/``B``) like any other task.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from typing import Any

import dspy

from blpo_dspy.images import image_sha256
from blpo_dspy.task import LABEL_FIELD, Label

Sizes = Mapping[str, int] | Mapping[str, float]


def stratified_split(
    examples: Sequence[dspy.Example],
    *,
    sizes: Sizes,
    seed: int,
    labels: Sequence[Label] | None = None,
) -> dict[str, list[dspy.Example]]:
    """Split examples into named, disjoint, label-stratified splits.

    Two modes, chosen by the type of the sizes:

    - **Counts** (``{"train": 100, "val": 50, "test": 100}``): exact split sizes, *class-balanced*: each label
      gets an equal share of every split (when a size is not divisible by the number of labels, the extra
      examples go to different labels in turn, seeded). Examples not needed are left out. This is the paper's
      setting (e.g. 100/100 balanced splits).
    - **Fractions** (``{"train": 0.5, "val": 0.25, "test": 0.25}``, sum at most 1): every label's examples are
      cut in these proportions, so each split keeps the label distribution of the data (sizes are exact to
      within one example per label).

    Args:
        examples: Examples with unique ``id`` and a ``label``.
        sizes: Split name -> count, or split name -> fraction.
        seed: Random seed; the same seed gives the same splits, another seed different ones.
        labels: The labels to balance over (e.g. ``task.labels``); every one must have enough examples. Default:
            the labels present in ``examples``.

    Returns:
        Split name -> examples, in the order of ``sizes``; each split is shuffled (labels interleaved).

    Raises:
        ValueError: Bad sizes, duplicate or missing ids/labels, an example whose label is not in ``labels``, or a
            label with too few examples for the requested sizes (the message names the label and the counts).
    """
    mode = _check_sizes(sizes)
    groups = _groups(examples, labels, seed)
    classes = list(groups)
    plan: dict[str, dict[Label, int]] = {name: {} for name in sizes}
    if mode == "counts":
        order = classes[:]
        random.Random(f"{seed}|order").shuffle(order)
        offset = 0
        for name, size in sizes.items():
            base, extra = divmod(int(size), len(classes))
            for i, label in enumerate(order):
                plan[name][label] = base + (1 if (i - offset) % len(classes) < extra else 0)
            offset = (offset + extra) % len(classes)
        short = []
        for label in classes:
            need = sum(plan[name][label] for name in sizes)
            if need > len(groups[label]):
                parts = " + ".join(f"{name} {plan[name][label]}" for name in sizes)
                short.append(f"label {label!r} has {len(groups[label])} examples but needs {need} ({parts})")
        if short:
            raise ValueError(
                "not enough examples for class-balanced splits of sizes "
                + ", ".join(f"{n}={s}" for n, s in sizes.items())
                + ": "
                + "; ".join(short)
            )
    else:
        for label in classes:
            for name, count in zip(sizes, _apportion(len(groups[label]), list(sizes.values())), strict=True):
                plan[name][label] = count

    result: dict[str, list[dspy.Example]] = {}
    taken = {label: 0 for label in classes}
    for name in sizes:
        chosen: list[dspy.Example] = []
        for label in classes:
            count = plan[name][label]
            chosen += groups[label][taken[label] : taken[label] + count]
            taken[label] += count
        random.Random(f"{seed}|split|{name}").shuffle(chosen)
        result[name] = chosen
    return result


def sample_per_label(
    examples: Sequence[dspy.Example],
    n_per_label: int,
    seed: int,
    *,
    labels: Sequence[Label] | None = None,
) -> list[dspy.Example]:
    """Draw ``n_per_label`` examples of every label (e.g. 20 per rating level), seeded.

    Args:
        examples: Examples with unique ``id`` and a ``label``.
        n_per_label: How many examples of each label.
        seed: Random seed.
        labels: The labels to sample (e.g. ``task.labels``); default the labels present in ``examples``.

    Returns:
        ``n_per_label * len(labels)`` examples, shuffled.

    Raises:
        ValueError: A label with fewer than ``n_per_label`` examples (named in the message), or bad input.
    """
    if isinstance(n_per_label, bool) or not isinstance(n_per_label, int) or n_per_label < 1:
        raise ValueError(f"n_per_label must be a positive integer, got {n_per_label!r}")
    groups = _groups(examples, labels, seed)
    short = [f"label {label!r} has {len(group)}" for label, group in groups.items() if len(group) < n_per_label]
    if short:
        raise ValueError(f"not enough examples to sample {n_per_label} per label: " + "; ".join(short))
    chosen = [example for group in groups.values() for example in group[:n_per_label]]
    random.Random(f"{seed}|sample").shuffle(chosen)
    return chosen


def data_fingerprint(examples: Sequence[dspy.Example], *, ordered: bool = False) -> str:
    """SHA-256 (hex) identifying a set of examples: ids, labels, image digests and text inputs.

    Each example contributes its ``id``, its ``label`` and every input field (images by the SHA-256 of their
    bytes, text by its value). By default the fingerprint is **order-independent** (the per-example digests are
    sorted), so reloading the same data in another order gives the same fingerprint; the split functions are
    order-independent too. Pass ``ordered=True`` to also detect a change of order. Extra fields that are not
    inputs (e.g. ``generator``) do not count.

    Args:
        examples: The examples.
        ordered: Whether the order of the examples is part of the fingerprint.

    Returns:
        64 hex characters.
    """
    digests = [hashlib.sha256(_canonical_record(example).encode("utf-8")).hexdigest() for example in examples]
    if not ordered:
        digests.sort()
    outer = hashlib.sha256(f"blpo-data-v1|{'ordered' if ordered else 'set'}|{len(digests)}\n".encode())
    for digest in digests:
        outer.update(digest.encode("ascii") + b"\n")
    return outer.hexdigest()


def _canonical_record(example: dspy.Example) -> str:
    inputs: dict[str, Any] = {}
    for key in sorted(example.inputs().keys()):
        value = example[key]
        if isinstance(value, dspy.Image):
            inputs[key] = "sha256:" + image_sha256(value)
        elif isinstance(value, str | int | float | bool) or value is None:
            inputs[key] = value
        else:
            inputs[key] = repr(value)
    record = {"id": example.get("id"), "label": example.get(LABEL_FIELD), "inputs": inputs}
    return json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)


def _check_sizes(sizes: Sizes) -> str:
    if not sizes:
        raise ValueError("sizes must name at least one split")
    values = list(sizes.values())
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        if any(v < 0 for v in values):
            raise ValueError(f"split sizes must not be negative: {dict(sizes)}")
        return "counts"
    if all(isinstance(v, float) for v in values):
        if any(not 0.0 <= v <= 1.0 for v in values) or sum(values) > 1.0 + 1e-9:
            raise ValueError(f"split fractions must be in [0, 1] and sum to at most 1: {dict(sizes)}")
        return "fractions"
    raise ValueError(f"sizes must be all integers (counts) or all floats (fractions), got {dict(sizes)}")


def _groups(
    examples: Sequence[dspy.Example], labels: Sequence[Label] | None, seed: int
) -> dict[Label, list[dspy.Example]]:
    """Examples by label (in ``labels`` order, else sorted), each group sorted by id and then shuffled by seed."""
    groups: dict[Label, list[dspy.Example]] = {label: [] for label in labels} if labels is not None else {}
    seen: set[str] = set()
    for example in examples:
        example_id = example.get("id")
        if example_id is None:
            raise ValueError("every example needs an 'id' to be split reproducibly")
        if example_id in seen:
            raise ValueError(f"duplicate example id {example_id!r}")
        seen.add(example_id)
        label = example.get(LABEL_FIELD)
        if label is None:
            raise ValueError(f"example {example_id!r} has no label")
        if labels is not None and label not in groups:
            raise ValueError(f"example {example_id!r} has label {label!r}, which is not one of {list(labels)}")
        groups.setdefault(label, []).append(example)
    if not groups:
        raise ValueError("no examples to split")
    if labels is None:
        groups = {label: groups[label] for label in sorted(groups, key=lambda x: (str(type(x)), x))}
    for label, group in groups.items():
        group.sort(key=lambda e: str(e.get("id")))
        random.Random(f"{seed}|label|{label!r}").shuffle(group)
    return groups


def _apportion(total: int, fractions: list[float]) -> list[int]:
    """Largest-remainder rounding of ``total * fraction`` per split, never exceeding ``total``."""
    exact = [total * f for f in fractions]
    counts = [int(x) for x in exact]
    target = min(total, round(sum(exact)))
    remainders = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in remainders[: max(0, target - sum(counts))]:
        counts[i] += 1
    return counts
