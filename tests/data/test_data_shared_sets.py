"""AGIQA-3K, MJ-Bench pairs and AVT loaders: on the real shared folders (skipped when absent) and on tiny copies."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest

from blpo_dspy.data import (
    DataError,
    data_fingerprint,
    load_agiqa3k_csv,
    load_avt_naturalness,
    load_mjbench_pairs,
)
from blpo_dspy.images import LazyImage


def _folder(shared_data: Path, name: str) -> Path:
    path = shared_data / name
    if not path.is_dir():
        pytest.skip(f"{name} not found in the shared data folder")
    return path


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------------------------------- AGIQA-3K


def test_agiqa_alignment_on_the_real_sample(shared_data: Path, alignment) -> None:
    root = _folder(shared_data, "agiqa3k_sample300")
    rows = _csv_rows(root / "labels.csv")
    expected = {
        r["name"]: ("yes" if float(r["mos_align"]) >= 3.0 else "no")
        for r in rows
        if float(r["mos_align"]) >= 3.0 or float(r["mos_align"]) <= 2.0
    }

    examples = load_agiqa3k_csv(root, alignment)

    assert {e.id: e.label for e in examples} == expected
    assert 0 < len(examples) < len(rows)  # the middle band is dropped
    by_name = {r["name"]: r for r in rows}
    first = examples[0]
    assert first.prompt == by_name[first.id]["prompt"]
    assert first.generator == by_name[first.id]["generator"]
    assert isinstance(first.image, LazyImage) and first.image.path.name == first.id
    assert set(first.inputs().keys()) == {"image", "prompt"}


@pytest.mark.parametrize("framing", ["rating_align", "rating_quality"])
def test_agiqa_rating_quintiles_on_the_real_sample(shared_data: Path, rating, framing: str) -> None:
    root = _folder(shared_data, "agiqa3k_sample300")
    column = "mos_align" if framing == "rating_align" else "mos_quality"

    examples = load_agiqa3k_csv(root, rating, framing=framing)

    assert len(examples) == 300
    counts = Counter(e.label for e in examples)
    assert sorted(counts) == [1, 2, 3, 4, 5]
    assert all(55 <= n <= 65 for n in counts.values())  # quintiles: about 60 each
    # Levels are monotone in the score: every level-k score is below every level-(k+1) score.
    top = {level: max(getattr(e, column) for e in examples if e.label == level) for level in range(1, 6)}
    bottom = {level: min(getattr(e, column) for e in examples if e.label == level) for level in range(1, 6)}
    assert all(top[k] <= bottom[k + 1] for k in range(1, 5))


def test_agiqa_on_a_tiny_copy_with_bad_rows(tmp_path: Path, make_image, write_csv, alignment, rating) -> None:
    root = tmp_path / "agiqa"
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        make_image(root / "images" / name, fmt="JPEG")
    header = ["name", "prompt", "mos_quality", "mos_align"]
    write_csv(root / "data.csv", header, [["a.jpg", "a cat", "1.0", "3.5"], ["b.jpg", "a dog", "2", "2.5"]])
    assert [(e.id, e.label) for e in load_agiqa3k_csv(root, alignment)] == [("a.jpg", "yes")]  # data.csv fallback

    write_csv(root / "labels.csv", header, [["a.jpg", "p", "1.0", "high"], ["missing.jpg", "p", "1", "1.0"]])
    with pytest.raises(DataError) as info:
        load_agiqa3k_csv(root, alignment)
    first, second = info.value.errors
    assert (first.file, first.row, first.field) == ("labels.csv", 1, "mos_align")
    assert "'high' is not a number" in str(first)
    assert (second.file, second.row, second.field) == ("labels.csv", 2, "name")
    assert "does not exist" in str(second)

    with pytest.raises(ValueError, match="5-level ordinal"):
        load_agiqa3k_csv(root, alignment, framing="rating_align")
    with pytest.raises(ValueError, match="binary task"):
        load_agiqa3k_csv(root, rating, framing="alignment")


# ---------------------------------------------------------------------------------------------- MJ-Bench pairs


def test_mjbench_pairs_on_the_real_folder(shared_data: Path, preference) -> None:
    root = _folder(shared_data, "mjbench_quality_pairs")
    rows = _csv_rows(root / "pairs.csv")

    examples = load_mjbench_pairs(root, preference, seed=0)
    other_seed = load_mjbench_pairs(root, preference, seed=1)

    assert len(examples) == len(rows)
    counts = Counter(e.label for e in examples)
    assert abs(counts["A"] - counts["B"]) <= 1
    for example, row in zip(examples, rows, strict=True):
        good, bad = (example.image_a, example.image_b) if example.label == "A" else (example.image_b, example.image_a)
        assert (good.path.name, bad.path.name) == (row["image_good"], row["image_bad"])
        assert example.good_image == ("image_a" if example.label == "A" else "image_b")
        assert example.prompt == row["caption"] and example.subset == row["subset"]
    assert [e.label for e in load_mjbench_pairs(root, preference, seed=0)] == [e.label for e in examples]
    assert [e.label for e in other_seed] != [e.label for e in examples]
    assert data_fingerprint(other_seed) != data_fingerprint(examples)  # the A/B order is part of the data


def test_mjbench_errors_name_the_csv_column(tmp_path: Path, make_image, write_csv, preference, alignment) -> None:
    root = tmp_path / "mj"
    make_image(root / "images" / "g1.jpg", fmt="JPEG")
    make_image(root / "images" / "b1.jpg", fmt="JPEG")
    make_image(root / "images" / "g2.jpg", fmt="JPEG")
    write_csv(
        root / "pairs.csv",
        ["subset", "caption", "image_good", "image_bad", "edit_region"],
        [["human", "a man", "g1.jpg", "b1.jpg", "face"], ["human", "a man", "g2.jpg", "gone.jpg", "hand"]],
    )
    with pytest.raises(DataError) as info:
        load_mjbench_pairs(root, preference)
    assert (info.value.file, info.value.row, info.value.field) == ("pairs.csv", 2, "image_bad")
    with pytest.raises(ValueError, match="pairwise task"):
        load_mjbench_pairs(root, alignment)


# ---------------------------------------------------------------------------------------------- AVT naturalness


def test_avt_naturalness_on_the_real_folder(shared_data: Path, naturalness) -> None:
    root = _folder(shared_data, "avt_ai_images")
    rows = _csv_rows(root / "labels.csv")

    examples = load_avt_naturalness(root, naturalness)
    without_real = load_avt_naturalness(root, naturalness, include_real=False)

    assert len(examples) == len(rows)
    by_file = {r["file"]: r for r in rows}
    for example in examples:
        score = float(by_file[example.id]["realism_mean"])
        assert abs(example.label - score) <= 0.5 and example.realism_mean == score
    assert len(without_real) == sum(r["db"] != "own" for r in rows)
    assert {e.db for e in without_real} == {r["db"] for r in rows} - {"own"}
    assert set(examples[0].inputs().keys()) == {"image"}


def test_avt_rounds_halves_up_and_reports_bad_scores(tmp_path: Path, make_image, write_csv, naturalness) -> None:
    root = tmp_path / "avt"
    for name in ("x.jpg", "y.jpg", "z.jpg"):
        make_image(root / "images" / name, fmt="JPEG")
    header = ["file", "db", "prompt", "realism_mean"]
    write_csv(root / "labels.csv", header, [["x.jpg", "glide", "p", "2.5"], ["y.jpg", "own", "p", "4.49"]])
    assert [e.label for e in load_avt_naturalness(root, naturalness)] == [3, 4]

    write_csv(root / "labels.csv", header, [["x.jpg", "glide", "p", "n/a"], ["z.jpg", "glide", "p", "6.2"]])
    with pytest.raises(DataError) as info:
        load_avt_naturalness(root, naturalness)
    first, second = info.value.errors
    assert (first.row, first.field) == (1, "realism_mean") and "not a number" in str(first)
    assert (second.row, second.field) == (2, "realism_mean") and "outside the label space" in str(second)
