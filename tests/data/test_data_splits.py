"""Splits: class balance, determinism, seed sensitivity, order independence, clear errors; data fingerprints."""

from __future__ import annotations

import random
from collections import Counter

import dspy
import pytest

from blpo_dspy.data import data_fingerprint, sample_per_label, stratified_split
from blpo_dspy.images import LazyImage


def _examples(counts: dict[object, int]) -> list[dspy.Example]:
    """Examples with text inputs and fake lazy images (no files are read by splits or fingerprints)."""
    out = []
    for label, n in counts.items():
        for i in range(n):
            digest = f"{label}-{i}".encode().hex().ljust(64, "0")[:64]
            out.append(
                dspy.Example(
                    id=f"{label}-{i}",
                    image=LazyImage(f"/nonexistent/{label}-{i}.png", digest),
                    prompt=f"p{i}",
                    label=label,
                ).with_inputs("image", "prompt")
            )
    return out


def _ids(split: dict[str, list[dspy.Example]]) -> dict[str, list[str]]:
    return {name: [e.id for e in examples] for name, examples in split.items()}


def test_counts_are_class_balanced_and_disjoint() -> None:
    examples = _examples({"yes": 70, "no": 40})

    split = stratified_split(examples, sizes={"train": 40, "val": 20, "test": 20}, seed=0)

    assert {name: Counter(e.label for e in part) for name, part in split.items()} == {
        "train": {"yes": 20, "no": 20},
        "val": {"yes": 10, "no": 10},
        "test": {"yes": 10, "no": 10},
    }
    all_ids = [i for ids in _ids(split).values() for i in ids]
    assert len(all_ids) == len(set(all_ids)) == 80
    assert list(split) == ["train", "val", "test"]


def test_uneven_counts_spread_the_extra_examples_over_labels() -> None:
    examples = _examples({1: 10, 2: 10, 3: 10})

    split = stratified_split(examples, sizes={"a": 4, "b": 4, "c": 4}, seed=3)

    per_label = Counter(e.label for part in split.values() for e in part)
    assert [len(part) for part in split.values()] == [4, 4, 4]
    assert sorted(per_label.values()) == [4, 4, 4]  # the three extra examples went to three different labels


def test_same_seed_same_split_other_seed_other_split_any_input_order() -> None:
    examples = _examples({"A": 30, "B": 30})
    shuffled = examples[:]
    random.Random(99).shuffle(shuffled)
    sizes = {"train": 20, "val": 10}

    first = _ids(stratified_split(examples, sizes=sizes, seed=7))

    assert _ids(stratified_split(shuffled, sizes=sizes, seed=7)) == first
    assert _ids(stratified_split(examples, sizes=sizes, seed=8)) != first
    # Labels are interleaved, not grouped.
    train_labels = [e.label for e in stratified_split(examples, sizes=sizes, seed=7)["train"]]
    assert train_labels != sorted(train_labels)


def test_fractions_keep_the_label_distribution() -> None:
    examples = _examples({"yes": 60, "no": 20})

    split = stratified_split(examples, sizes={"train": 0.5, "val": 0.25, "test": 0.25}, seed=0)

    assert {name: Counter(e.label for e in part) for name, part in split.items()} == {
        "train": {"yes": 30, "no": 10},
        "val": {"yes": 15, "no": 5},
        "test": {"yes": 15, "no": 5},
    }


def test_too_few_examples_for_the_balance_names_the_label() -> None:
    examples = _examples({"yes": 50, "no": 12})
    with pytest.raises(ValueError, match=r"label 'no' has 12 examples but needs 15 \(train 10 \+ test 5\)"):
        stratified_split(examples, sizes={"train": 20, "test": 10}, seed=0)


def test_a_task_label_without_examples_is_an_error() -> None:
    examples = _examples({1: 5, 2: 5})
    with pytest.raises(ValueError, match="label 3 has 0 examples"):
        stratified_split(examples, sizes={"train": 6}, seed=0, labels=[1, 2, 3])
    with pytest.raises(ValueError, match="label 7, which is not one of"):
        stratified_split(_examples({7: 2}), sizes={"train": 1}, seed=0, labels=[1, 2])


@pytest.mark.parametrize(
    "sizes",
    [{}, {"train": -1}, {"train": 0.8, "test": 0.3}, {"train": 10, "test": 0.5}, {"train": True}],
)
def test_bad_sizes(sizes: dict) -> None:
    with pytest.raises(ValueError):
        stratified_split(_examples({"a": 5}), sizes=sizes, seed=0)


def test_duplicate_ids_are_refused() -> None:
    examples = _examples({"a": 3})
    with pytest.raises(ValueError, match="duplicate example id 'a-0'"):
        stratified_split([*examples, examples[0]], sizes={"train": 2}, seed=0)


def test_sample_per_label() -> None:
    examples = _examples({1: 25, 2: 30, 3: 20})

    sample = sample_per_label(examples, 20, seed=1)

    assert Counter(e.label for e in sample) == {1: 20, 2: 20, 3: 20}
    assert [e.id for e in sample_per_label(list(reversed(examples)), 20, seed=1)] == [e.id for e in sample]
    assert [e.id for e in sample_per_label(examples, 20, seed=2)] != [e.id for e in sample]
    with pytest.raises(ValueError, match="label 3 has 20"):
        sample_per_label(examples, 21, seed=1)


def test_fingerprint_is_order_independent_unless_asked_and_sees_every_part() -> None:
    examples = _examples({"yes": 4, "no": 4})
    base = data_fingerprint(examples)

    assert base == data_fingerprint(list(reversed(examples)))
    assert len(base) == 64 and int(base, 16) >= 0
    assert data_fingerprint(examples, ordered=True) != data_fingerprint(list(reversed(examples)), ordered=True)

    def changed(**fields: object) -> str:
        modified = [examples[0].copy(**fields), *examples[1:]]
        return data_fingerprint(modified)

    assert changed(label="no") != base
    assert changed(id="other") != base
    assert changed(prompt="different text") != base
    assert changed(image=LazyImage("/nonexistent/x.png", "f" * 64)) != base
    assert changed(generator="not an input") == base  # non-input extras do not count
    assert data_fingerprint(examples[:-1]) != base
