"""Loading examples from a manifest: a CSV/TSV or JSONL file with one row per example.

A manifest names the image file(s) of each example relative to an image root (by default the manifest's folder),
the label, the task's text fields (for example the generation prompt) and optionally an id.

Example manifest (``train.csv``) for the ``alignment`` task::

    id,image,prompt,label
    a1,images/cat.png,a cat on a sofa,yes
    a2,images/dog.png,two dogs in the snow,no
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import dspy

from blpo_dspy.data.errors import HEADER_ROW, DataError
from blpo_dspy.data.examples import ID_FIELD, ColumnMap, ImageChecker, examples_from_rows
from blpo_dspy.images import DEFAULT_MAX_PIXELS
from blpo_dspy.task import LABEL_FIELD, Task

logger = logging.getLogger(__name__)

CSV_SUFFIXES = (".csv", ".tsv")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
_BAD_BYTES = re.compile("[\udc80-\udcff]")
_SURROGATES = re.compile("[\ud800-\udfff]")
MAX_JSON_DEPTH = 32
"""Deepest nesting of lists/objects accepted in a JSONL field value (manifest fields are flat)."""


def load_manifest(
    path: str | Path,
    task: Task,
    *,
    image_root: str | Path | None = None,
    image_column: str | Sequence[str] | Mapping[str, str] | None = None,
    label_column: str = LABEL_FIELD,
    text_columns: Mapping[str, str] | None = None,
    id_column: str | None = ID_FIELD,
    label_map: Mapping[Any, Any] | None = None,
    extra_columns: Sequence[str] = (),
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[dspy.Example]:
    """Load a CSV (``.csv``, ``.tsv``) or JSONL (``.jsonl``, ``.ndjson``) manifest as validated examples.

    Every row is checked before anything is returned (images opened and verified, labels validated, text
    fields non-empty, ids unique); images stay on disk as :class:`~blpo_dspy.images.LazyImage`.

    Args:
        path: The manifest file. The format is chosen by suffix; text must be UTF-8.
        task: The judging task; its input fields decide which columns are required.
        image_root: Directory image paths are relative to; default the manifest's folder. Paths must stay
            inside it (no absolute paths, no ``..``, no symlinks pointing outside).
        image_column: Column(s) with image paths: one name for single-image tasks, a sequence or a mapping
            image field -> column for pairwise tasks. Default: the task's image field names.
        label_column: Column with the label.
        text_columns: Task text field -> column; default the field's own name.
        id_column: Column with unique example ids. The default ``"id"`` is optional in the file (row numbers
            are used when it is absent); another name must exist. ``None`` always uses row numbers.
        label_map: Raw label -> label mapping applied before validation (e.g. ``{"0": "no", "1": "yes"}``).
        extra_columns: Columns copied onto each example unchanged (not inputs).
        max_pixels: Refuse images with more pixels than this (decompression-bomb guard).

    Returns:
        The examples in file order.

    Raises:
        DataError: Any bad input; names the file, the row and the column. Problems in several rows are reported
            together (the first few, with the total count).
        FileNotFoundError: The manifest does not exist.
        ValueError: Unknown suffix, or column arguments that do not fit the task.
    """
    path = Path(path)
    display = _printable(path.name)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {display}")
    columns = ColumnMap.for_task(
        task,
        image_column=image_column,
        text_columns=text_columns,
        label_column=label_column,
        id_column=id_column,
        extra_columns=extra_columns,
    )
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        header, rows = read_csv_rows(path, display=display, delimiter="\t" if suffix == ".tsv" else ",")
        missing = [c for c in columns.required() if c not in header]
        if missing:
            raise DataError.collected(
                [
                    DataError(
                        f"column '{c}' is missing (columns present: {', '.join(header)})",
                        file=display,
                        row=HEADER_ROW,
                        field=c,
                    )
                    for c in missing
                ]
            )
        if columns.id is not None and columns.id not in header:
            if columns.id != ID_FIELD:
                raise DataError(
                    f"id column '{columns.id}' is missing (columns present: {', '.join(header)})",
                    file=display,
                    row=HEADER_ROW,
                    field=columns.id,
                )
            logger.info("%s has no '%s' column; using row numbers as ids", display, columns.id)
            columns = ColumnMap(columns.images, columns.texts, columns.label, None, columns.extra)
    elif suffix in JSONL_SUFFIXES:
        rows = read_jsonl_rows(path, display=display)
    else:
        supported = ", ".join(CSV_SUFFIXES + JSONL_SUFFIXES)
        raise ValueError(f"{display}: unsupported manifest type {path.suffix!r} (supported: {supported})")
    root = Path(image_root) if image_root is not None else path.parent
    if not root.is_dir():
        raise FileNotFoundError(f"image root is not a directory: {root.name or root}")
    checker = ImageChecker(root, max_pixels=max_pixels)
    return examples_from_rows(rows, task=task, columns=columns, file=display, images=checker, label_map=label_map)


def read_csv_rows(
    path: Path, *, display: str, delimiter: str = ","
) -> tuple[list[str], Iterator[tuple[int, dict[str, str] | DataError]]]:
    """Read a UTF-8 CSV file: its header, and its data rows numbered from 1 (blank lines skipped).

    Args:
        path: The CSV file.
        display: File name shown in errors.
        delimiter: Cell separator.

    Returns:
        ``(header, rows)``; ``rows`` yields ``(row_number, {column: cell})``, or ``(row_number, DataError)`` for
        a row with the wrong number of cells or bytes that are not UTF-8 (so all bad rows can be reported).

    Raises:
        DataError: Empty file, bytes that are not UTF-8 in the header, or duplicate column names.
    """
    text = _read_text(path, display)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        raw_header = next(reader, None)
    except csv.Error as exc:
        raise DataError(f"not a valid CSV header: {exc}", file=display, row=HEADER_ROW, field=None) from exc
    if raw_header is None:
        raise DataError("file is empty (no header)", file=display, row=HEADER_ROW, field=None)
    header = [name.strip() for name in raw_header]
    for name in header:
        _check_utf8(name, file=display, row=HEADER_ROW, field=name)
    seen: set[str] = set()
    for name in header:
        if name and name in seen:
            raise DataError(f"column '{name}' appears twice in the header", file=display, row=HEADER_ROW, field=name)
        seen.add(name)

    def rows() -> Iterator[tuple[int, dict[str, str] | DataError]]:
        number = 0
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:  # the reader cannot be trusted after this: report and stop
                yield number + 1, DataError(f"not valid CSV: {exc}", file=display, row=number + 1, field=None)
                return
            if not cells or (len(cells) == 1 and not cells[0].strip()):
                continue
            number += 1
            if len(cells) != len(header):
                yield (
                    number,
                    DataError(
                        f"row has {len(cells)} cells but the header has {len(header)} columns",
                        file=display,
                        row=number,
                        field=None,
                    ),
                )
                continue
            row = dict(zip(header, cells, strict=True))
            try:
                for column, cell in row.items():
                    _check_utf8(cell, file=display, row=number, field=column)
            except DataError as exc:
                yield number, exc
                continue
            yield number, row

    return header, rows()


def read_jsonl_rows(path: Path, *, display: str) -> Iterator[tuple[int, dict[str, Any] | DataError]]:
    """Read a UTF-8 JSONL file: one JSON object per line, numbered from 1 (blank lines skipped).

    Lines are separated by ``\\n`` only (``\\r\\n`` works too): a JSON string may hold U+2028, U+0085 and other
    characters that ``str.splitlines`` would break a line at.

    Yields:
        ``(row_number, object)``, or ``(row_number, DataError)`` for a line that is not a JSON object, holds bytes
        that are not UTF-8 or lone surrogates (``"\\ud800"``), or nests values more than
        :data:`MAX_JSON_DEPTH` levels deep.
    """
    text = _read_text(path, display)
    number = 0
    for line in text.split("\n"):
        if not line.strip():
            continue
        number += 1
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            problem = "not valid UTF-8" if _BAD_BYTES.search(line) else f"not valid JSON ({exc.msg})"
            yield number, DataError(problem, file=display, row=number, field=None)
            continue
        except RecursionError:
            yield number, DataError("JSON nested too deeply", file=display, row=number, field=None)
            continue
        except ValueError:  # an integer literal longer than Python converts (4300 digits)
            yield number, DataError("not valid JSON (a number is too long)", file=display, row=number, field=None)
            continue
        if not isinstance(value, dict):
            yield (
                number,
                DataError(
                    f"each line must be a JSON object, got {type(value).__name__}", file=display, row=number, field=None
                ),
            )
            continue
        try:
            for key, item in value.items():
                _check_json_text(key, line, file=display, row=number, field=key)
                _check_json_value(item, line, file=display, row=number, field=key)
        except DataError as exc:
            yield number, exc
            continue
        yield number, value


def _check_json_value(value: Any, line: str, *, file: str, row: int, field: str) -> None:
    """Check every string (and key) inside one field's value, without recursion, and its nesting depth."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_json_text(item, line, file=file, row=row, field=field)
        elif isinstance(item, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise DataError(
                    f"value is nested more than {MAX_JSON_DEPTH} levels deep", file=file, row=row, field=field
                )
            if isinstance(item, dict):
                for key, child in item.items():
                    _check_json_text(key, line, file=file, row=row, field=field)
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)


def _check_json_text(text: str, line: str, *, file: str, row: int, field: str) -> None:
    """Refuse undecodable bytes (kept as U+DC80..U+DCFF by the reader) and lone-surrogate escapes such as
    ``"\\ud800"``, which Python accepts in JSON but no file name, LM request or log line can encode."""
    match = _SURROGATES.search(text)
    if match is None:
        return
    if _BAD_BYTES.fullmatch(match.group()) and match.group() in line:  # a raw byte, not an escape
        _check_utf8(text, file=file, row=row, field=field)  # raises, naming the byte
    raise DataError(
        f"text holds a lone surrogate (U+{ord(match.group()):04X}, e.g. a \\u{ord(match.group()):04x} escape), "
        "which is not valid Unicode",
        file=file,
        row=row,
        field=_printable(field),
    )


def _read_text(path: Path, display: str) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read file: {exc.strerror or exc}", file=display, row=HEADER_ROW, field=None) from exc
    # surrogateescape keeps undecodable bytes as lone surrogates so the bad cell can be named later.
    return data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")


def _check_utf8(text: str, *, file: str, row: int, field: str | None) -> None:
    match = _BAD_BYTES.search(text)
    if match:
        byte = ord(match.group()) - 0xDC00
        shown = None if field is None else _printable(field)
        raise DataError(
            f"text is not UTF-8 (byte 0x{byte:02X}); save the file as UTF-8", file=file, row=row, field=shown
        )


def _printable(text: str) -> str:
    """``text`` with undecodable bytes and lone surrogates shown as U+FFFD, so it can be printed and logged."""
    try:
        return text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")
    except UnicodeEncodeError:  # a lone surrogate outside U+DC80..U+DCFF (a JSON "\ud800" escape, say)
        return _SURROGATES.sub("\ufffd", text)
