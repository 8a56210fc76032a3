"""The SYNTHETIC compliance dataset: balance, determinism, truth columns, and loading with the task cards."""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from blpo_dspy.data.synthetic import (
    CANVAS,
    COLOURS,
    MANIFEST_COLUMNS,
    REQUIREMENTS,
    generate_specs,
    make_compliance_dataset,
    misspell,
    render_banner,
)
from blpo_dspy.task import Task


def _rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_binary_dataset_is_balanced_and_labels_follow_the_requirements(tmp_path: Path) -> None:
    manifest = make_compliance_dataset(tmp_path / "binary", 20, variant="binary", seed=3)
    rows = _rows(manifest)
    assert tuple(rows[0]) == MANIFEST_COLUMNS
    assert Counter(r["label"] for r in rows) == {"yes": 10, "no": 10}
    for row in rows:
        met = [int(row[r]) for r in REQUIREMENTS]
        assert int(row["requirements_met"]) == sum(met)
        assert row["label"] == ("yes" if all(met) else "no")
        image = Image.open(manifest.parent / row["image"])
        assert image.size == CANVAS
        assert row["brief"].startswith("Background: ") and "Headline: '" in row["brief"]
    # Every requirement is broken somewhere, so each one matters for the label.
    assert all(any(r[req] == "0" for r in rows) for req in REQUIREMENTS)


def test_ordinal_dataset_covers_every_level_equally(tmp_path: Path) -> None:
    rows = _rows(make_compliance_dataset(tmp_path, 25, variant="ordinal", seed=1))
    assert Counter(int(r["label"]) for r in rows) == {0: 5, 1: 5, 2: 5, 3: 5, 4: 5}
    assert all(int(r["label"]) == int(r["requirements_met"]) for r in rows)


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    first = make_compliance_dataset(tmp_path / "a", 8, seed=7).parent
    second = make_compliance_dataset(tmp_path / "b", 8, seed=7).parent
    other = make_compliance_dataset(tmp_path / "c", 8, seed=8).parent
    assert _digests(first) == _digests(second)
    assert _digests(first) != _digests(other)


def test_specs_describe_what_was_drawn(tmp_path: Path) -> None:
    manifest = make_compliance_dataset(tmp_path, 10, variant="ordinal", seed=2)
    specs = [json.loads(line) for line in (manifest.parent / "specs.jsonl").read_text().splitlines()]
    rows = _rows(manifest)
    assert [s["id"] for s in specs] == [r["id"] for r in rows]
    for spec, row in zip(specs, rows, strict=True):
        assert len(spec["shape_boxes"]) == spec["drawn_count"]
        assert int(row["req_count"]) == (spec["drawn_count"] == spec["count"])
        assert int(row["req_headline"]) == (spec["drawn_headline"] == spec["headline"])
        assert f"exactly {spec['count']} {spec['shape_colour']}" in row["brief"]


def test_rendering_puts_the_logo_in_the_drawn_corner() -> None:
    for spec in generate_specs(12, seed=4):
        image = render_banner(spec)
        x = 15 if spec.drawn_logo_corner.endswith("left") else CANVAS[0] - 15
        y = 15 if spec.drawn_logo_corner.startswith("top") else CANVAS[1] - 15
        assert image.getpixel((x, y)) == COLOURS[spec.logo_colour]


@pytest.mark.parametrize("word", ["SUMMER SALE", "BIG DEALS", "TOP PICKS", "AA", "X"])
def test_misspelling_is_one_edit_away(word: str) -> None:
    for seed in range(10):
        wrong = misspell(word, random.Random(seed))
        assert wrong != word
        assert len(wrong) == len(word)
        differences = sum(a != b for a, b in zip(word, wrong, strict=True))
        assert differences in (1, 2)  # one letter replaced, or two adjacent letters swapped
        assert sorted(wrong.replace(" ", "")) == sorted(word.replace(" ", "")) or differences == 1


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="variant"):
        make_compliance_dataset(tmp_path, 4, variant="pairwise")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        generate_specs(0)


@pytest.mark.parametrize(("variant", "task_name"), [("binary", "compliance"), ("ordinal", "compliance_ordinal")])
def test_loads_with_the_manifest_loader_and_task_cards(tmp_path: Path, variant: str, task_name: str) -> None:
    load_manifest = pytest.importorskip("blpo_dspy.data.manifest").load_manifest
    task = Task.load(task_name)
    manifest = make_compliance_dataset(tmp_path, 10, variant=variant, seed=0)  # type: ignore[arg-type]
    examples = load_manifest(manifest, task)
    rows = _rows(manifest)
    assert len(examples) == 10
    assert [str(e.label) for e in examples] == [r["label"] for r in rows]
    assert examples[0].brief == rows[0]["brief"]
    assert task.synthetic
