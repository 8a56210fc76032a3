"""Helpers for the data-loader tests: small images made with Pillow, task cards, manifest writers."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from blpo_dspy.data import DataError
from blpo_dspy.task import Task

ImageMaker = Callable[..., Path]


@pytest.fixture
def make_image() -> ImageMaker:
    """``make_image(path, color=(r, g, b), size=(w, h), fmt=None)`` writes a small image and returns its path."""

    def make(
        path: Path,
        color: tuple[int, int, int] = (200, 30, 30),
        size: tuple[int, int] = (12, 10),
        fmt: str | None = None,
    ) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, color).save(path, format=fmt)
        return path

    return make


@pytest.fixture(scope="session")
def alignment() -> Task:
    return Task.load("alignment")


@pytest.fixture(scope="session")
def preference() -> Task:
    return Task.load("preference")


@pytest.fixture(scope="session")
def safety() -> Task:
    return Task.load("safety")


@pytest.fixture(scope="session")
def rating() -> Task:
    return Task.load("rating")


@pytest.fixture(scope="session")
def naturalness() -> Task:
    return Task.load("naturalness")


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]], delimiter: str = ",") -> Path:
    """Write a UTF-8 CSV file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write one JSON object per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _assert_names(err: DataError, *, file: str, row: int, field: str | None) -> None:
    """The error carries and prints the file, the row and the field, and no absolute path."""
    assert (err.file, err.row, err.field) == (file, row, field)
    message = str(err)
    assert file in message
    assert (f"row {row}" in message) if row else ("header" in message)
    if field is not None:
        assert f"field '{field}'" in message
    assert "/tmp/" not in message and "/work/" not in message


@pytest.fixture
def write_csv() -> Callable[..., Path]:
    """``write_csv(path, header, rows, delimiter=",")``."""
    return _write_csv


@pytest.fixture
def write_jsonl() -> Callable[..., Path]:
    """``write_jsonl(path, rows)``."""
    return _write_jsonl


@pytest.fixture
def assert_names() -> Callable[..., None]:
    """``assert_names(err, file=..., row=..., field=...)``: the error names all three and no absolute path."""
    return _assert_names
