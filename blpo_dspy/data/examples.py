"""Building ``dspy.Example``s from dataset rows, shared by every loader.

An example holds the task's input fields (images as :class:`~blpo_dspy.images.LazyImage`, text fields as
``str``) and carries ``id`` (unique str), ``label`` (the task's canonical label) and, for each image field ``f``,
``f_sha256`` (SHA-256 hex of the image bytes). Images are validated when the row is loaded (exists, inside the
image root, not empty, not corrupt or truncated, not a decompression bomb) but their bytes are not kept.
"""

from __future__ import annotations

import logging
import numbers
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import dspy

from blpo_dspy.data.errors import DataError
from blpo_dspy.images import DEFAULT_MAX_PIXELS, ImageFileError, LazyImage, check_image_file
from blpo_dspy.task import LABEL_FIELD, Label, LabelError, Task

logger = logging.getLogger(__name__)

ID_FIELD = "id"
SHA256_SUFFIX = "_sha256"
_INTEGRAL = re.compile(r"^[+-]?\d+(?:\.0*)?$")
_SURROGATE = re.compile("[\ud800-\udfff]")
_SHOWN_CHARS = 80


def shown(value: Any, limit: int = _SHOWN_CHARS) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for error messages (never raises)."""
    try:
        text = repr(value)
    except Exception:  # a repr that raises, an int too long to print, a structure nested too deeply
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def sha256_field(image_field: str) -> str:
    """Name of the example field holding the SHA-256 of ``image_field``'s bytes (``image`` -> ``image_sha256``)."""
    return image_field + SHA256_SUFFIX


@dataclass(frozen=True)
class ColumnMap:
    """Which source column feeds which example field.

    Attributes:
        images: Task image field -> column holding the image path (relative to the image root).
        texts: Task text field -> column holding the text.
        label: Column holding the raw label.
        id: Column holding the example id; when ``None`` (or absent from a row) the row number is used.
        extra: Further columns copied onto the example unchanged (not inputs), e.g. ``generator``.
    """

    images: Mapping[str, str]
    texts: Mapping[str, str] = field(default_factory=dict)
    label: str = LABEL_FIELD
    id: str | None = ID_FIELD
    extra: tuple[str, ...] = ()

    @classmethod
    def for_task(
        cls,
        task: Task,
        *,
        image_column: str | Sequence[str] | Mapping[str, str] | None = None,
        text_columns: Mapping[str, str] | None = None,
        label_column: str = LABEL_FIELD,
        id_column: str | None = ID_FIELD,
        extra_columns: Sequence[str] = (),
    ) -> ColumnMap:
        """The column map for ``task``, defaulting every column to the task's own field name.

        Args:
            task: The judging task.
            image_column: One column name (single-image tasks), a sequence with one column per image field, or a
                mapping image field -> column. Default: the task's image field names.
            text_columns: Task text field -> column; fields not given use their own name.
            label_column: Column with the raw label.
            id_column: Column with the example id (optional in the data).
            extra_columns: Columns copied onto the example unchanged.

        Raises:
            ValueError: The mapping does not fit the task (wrong number of image columns, unknown text field, or
                an extra column that would overwrite an example field).
        """
        fields = task.image_fields
        if image_column is None:
            images = {f: f for f in fields}
        elif isinstance(image_column, str):
            if len(fields) != 1:
                raise ValueError(
                    f"task '{task.name}' has {len(fields)} image fields {fields}; pass image_column as a mapping "
                    "field -> column or a sequence of columns"
                )
            images = {fields[0]: image_column}
        elif isinstance(image_column, Mapping):
            if set(image_column) != set(fields):
                raise ValueError(f"image_column keys {sorted(image_column)} must be the task's image fields {fields}")
            images = {f: image_column[f] for f in fields}
        else:
            columns = list(image_column)
            if len(columns) != len(fields):
                raise ValueError(
                    f"image_column has {len(columns)} columns, task '{task.name}' has image fields {fields}"
                )
            images = dict(zip(fields, columns, strict=True))
        text_columns = dict(text_columns or {})
        unknown = sorted(set(text_columns) - set(task.text_fields))
        if unknown:
            raise ValueError(
                f"text_columns names {unknown}, which are not text fields of task '{task.name}' "
                f"(text fields: {list(task.text_fields)})"
            )
        texts = {name: text_columns.get(name, name) for name in task.text_fields}
        reserved = {ID_FIELD, LABEL_FIELD, *task.input_fields, *(sha256_field(f) for f in fields)}
        clash = sorted(set(extra_columns) & reserved)
        if clash:
            raise ValueError(f"extra columns {clash} would overwrite example fields")
        return cls(images=images, texts=texts, label=label_column, id=id_column, extra=tuple(extra_columns))

    def required(self) -> list[str]:
        """Columns every row must have (images, texts, label), in that order, without duplicates."""
        seen: dict[str, None] = {}
        for column in (*self.images.values(), *self.texts.values(), self.label):
            seen.setdefault(column, None)
        return list(seen)


@dataclass
class ImageChecker:
    """Resolves image paths safely under one root and validates each file once per load.

    Attributes:
        root: Directory image paths are relative to.
        max_pixels: Decompression-bomb limit passed to :func:`~blpo_dspy.images.check_image_file`.
    """

    root: Path
    max_pixels: int = DEFAULT_MAX_PIXELS
    _root_resolved: Path | None = field(default=None, init=False, repr=False)
    _checked: dict[str, LazyImage] = field(default_factory=dict, init=False, repr=False)
    _by_raw: dict[str, LazyImage] = field(default_factory=dict, init=False, repr=False)

    def image(self, raw: Any, *, file: str, row: int, column: str) -> LazyImage:
        """Validate the image at ``raw`` (relative to the root) and return it as a lazy image.

        Raises:
            DataError: Empty path, absolute path, ``..``, a symlink resolving outside the root, or any image
                problem from :func:`~blpo_dspy.images.check_image_file` (missing, unreadable, empty, corrupt,
                truncated, too many pixels).
        """
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            raise DataError("image path is empty", file=file, row=row, field=column)
        if not isinstance(raw, str):
            raise DataError(f"image path must be a string, got {type(raw).__name__}", file=file, row=row, field=column)
        if "\x00" in raw:
            raise DataError("image path contains a NUL byte", file=file, row=row, field=column)
        known = self._by_raw.get(raw)
        if known is not None:  # the same path string in another row (e.g. pairs sharing an image)
            return known
        text = raw.strip().replace("\\", "/")
        try:
            os.fsencode(text)
        except UnicodeError:  # a lone surrogate that is no undecodable file-name byte (e.g. a JSON "\ud800")
            raise DataError(
                f"image path {shown(raw)} is not valid Unicode text (lone surrogate)", file=file, row=row, field=column
            ) from None
        if PurePosixPath(text).is_absolute() or PureWindowsPath(raw.strip()).drive:
            raise DataError(
                f"image path {shown(raw)} is absolute; give it relative to the image root",
                file=file,
                row=row,
                field=column,
            )
        if ".." in PurePosixPath(text).parts:
            raise DataError(
                f"image path {shown(raw)} contains '..'; image paths must stay inside the image root",
                file=file,
                row=row,
                field=column,
            )
        if self._root_resolved is None:
            self._root_resolved = self.root.resolve()
        try:
            resolved = (self._root_resolved / text).resolve()
        except (OSError, RuntimeError, ValueError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
            reason = "a symlink loop" if isinstance(exc, RuntimeError) else getattr(exc, "strerror", None) or "error"
            raise DataError(
                f"image path {shown(raw)} cannot be resolved ({reason})", file=file, row=row, field=column
            ) from None
        if not resolved.is_relative_to(self._root_resolved):
            raise DataError(
                f"image path {shown(raw)} resolves (through a symlink) to a file outside the image root",
                file=file,
                row=row,
                field=column,
            )
        key = str(resolved)
        cached = self._checked.get(key)
        if cached is not None:
            self._by_raw[raw] = cached
            return cached
        try:
            digest, _size = check_image_file(resolved, max_pixels=self.max_pixels)
        except ImageFileError as exc:
            message = str(exc).removeprefix(f"{resolved.name}: ")
            raise DataError(f"image {shown(text)}: {message}", file=file, row=row, field=column) from exc
        image = LazyImage(resolved, digest)
        self._checked[key] = image
        self._by_raw[raw] = image
        return image


def canonical_label(task: Task, value: Any, *, label_map: Mapping[Any, Any] | None = None) -> Label:
    """Map a dataset's raw label to the task's canonical label, strictly.

    The raw value is first looked up in ``label_map`` (by value, then by string form on both sides, so
    ``{0: "no"}`` also maps the CSV cell ``"0"``). Then it must be
    exactly a label or alias of the task (case-insensitive, surrounding spaces ignored), or for ordinal tasks an
    integral number in range ("4", "4.0", 4). Free text that merely contains a label ("maybe yes") is refused,
    unlike the lenient :meth:`Task.parse_label` used for LM outputs.

    Raises:
        LabelError: The value is missing, outside the task's label space, or of a type no label can have (the
            message shows the value cut to a short length).
    """
    try:
        return _canonical_label(task, value, label_map)
    except LabelError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # e.g. an int too long for str()
        raise LabelError(
            f"label {shown(value)} cannot be read as a label of task '{task.name}' ({type(exc).__name__}; "
            f"expected {task.label_space_text})"
        ) from exc


def _canonical_label(task: Task, value: Any, label_map: Mapping[Any, Any] | None) -> Label:
    if label_map is not None:
        if _hashable(value) and value in label_map:
            value = label_map[value]
        else:
            by_text = {str(key): mapped for key, mapped in label_map.items()}
            value = by_text.get(str(value), value)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise LabelError(f"label is empty (task '{task.name}' expects {task.label_space_text})")
    if isinstance(value, float) and value != value:  # NaN
        raise LabelError(f"label is missing (NaN) (task '{task.name}' expects {task.label_space_text})")
    if task.kind == "ordinal":
        if isinstance(value, str) and not _INTEGRAL.match(value.strip()):
            raise LabelError(f"label {shown(value)} is not an integer ({task.label_space_text})")
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            low, high = min(task.labels), max(task.labels)  # type: ignore[type-var]
            if not low <= value <= high:  # before validate_label: float() of a huge int overflows
                raise LabelError(
                    f"label {shown(value)} is outside the label space of task '{task.name}' ({task.label_space_text})"
                )
    elif not isinstance(value, bool | int | float):
        spellings = {str(label).lower() for label in task.labels}
        for aliases in task.aliases.values():
            spellings.update(alias.lower() for alias in aliases)
        if str(value).strip().lower() not in spellings:
            raise LabelError(
                f"label {shown(value)} is outside the label space of task '{task.name}' ({task.label_space_text})"
            )
    return task.validate_label(value)


def example_from_row(
    row: Mapping[str, Any],
    row_number: int,
    *,
    task: Task,
    columns: ColumnMap,
    file: str,
    images: ImageChecker,
    label_map: Mapping[Any, Any] | None = None,
    label_cache: dict[Any, Label] | None = None,
) -> dspy.Example:
    """Build one validated example from a row of a table (CSV, JSONL, a folder listing, a HF dataset).

    Every loader goes through this function, so all examples have the same shape and all bad input is
    reported the same way.

    Args:
        row: Column name -> raw value. Image columns hold paths relative to ``images.root``.
        row_number: 1-based row number, used for the default id and in errors.
        task: The judging task.
        columns: Which column feeds which field.
        file: Name of the source file as shown in errors (relative to where the user pointed).
        images: Resolves and validates image paths (and remembers files already checked in this load).
        label_map: Optional raw label -> label mapping applied before validation.
        label_cache: Raw label -> label results shared by the rows of one load (saves re-validating).

    Returns:
        ``dspy.Example`` with inputs ``task.input_fields`` and fields ``id``, ``label``, ``<image>_sha256``
        (plus ``columns.extra``).

    Raises:
        DataError: Naming ``file``, ``row_number`` and the column of the first problem found in this row.
    """
    for column in columns.required():
        if column not in row:
            raise DataError(f"column '{column}' is missing", file=file, row=row_number, field=column)

    if columns.id is not None and columns.id in row:
        raw_id = row[columns.id]
        if raw_id is not None and (isinstance(raw_id, bool) or not isinstance(raw_id, str | numbers.Number)):
            raise DataError(
                f"id must be a string or a number, got {type(raw_id).__name__}",
                file=file,
                row=row_number,
                field=columns.id,
            )
        try:
            example_id = "" if raw_id is None else str(raw_id).strip()
        except ValueError:  # an int too long to convert to text
            raise DataError("id is too long a number", file=file, row=row_number, field=columns.id) from None
        if not example_id:
            raise DataError("id is empty", file=file, row=row_number, field=columns.id)
        if _SURROGATE.search(example_id):
            raise DataError(
                "id is not valid Unicode text (lone surrogate)", file=file, row=row_number, field=columns.id
            )
    else:
        example_id = str(row_number)

    raw_label = row[columns.label]
    cache_key = (type(raw_label), raw_label) if _hashable(raw_label) else None
    if label_cache is not None and cache_key in label_cache:
        label = label_cache[cache_key]
    else:
        try:
            label = canonical_label(task, raw_label, label_map=label_map)
        except LabelError as exc:
            raise DataError(str(exc), file=file, row=row_number, field=columns.label) from exc
        if label_cache is not None and cache_key is not None:
            label_cache[cache_key] = label

    fields: dict[str, Any] = {ID_FIELD: example_id}
    for name, column in columns.images.items():
        image = images.image(row[column], file=file, row=row_number, column=column)
        fields[name] = image
        fields[sha256_field(name)] = image.sha256
    for name, column in columns.texts.items():
        value = row[column]
        if value is None or (isinstance(value, float) and value != value):
            value = ""
        if not isinstance(value, str):
            if not isinstance(value, bool | int | float):
                raise DataError(
                    f"text must be a string, got {type(value).__name__}", file=file, row=row_number, field=column
                )
            try:
                value = str(value)
            except ValueError:  # an int too long to convert to text
                raise DataError("text is too long a number", file=file, row=row_number, field=column) from None
        if not value.strip():
            raise DataError(
                f"text field '{name}' is empty but task '{task.name}' needs it",
                file=file,
                row=row_number,
                field=column,
            )
        surrogate = _SURROGATE.search(value)
        if surrogate:  # would fail when the request is encoded for the LM
            raise DataError(
                f"text is not valid Unicode (lone surrogate U+{ord(surrogate.group()):04X})",
                file=file,
                row=row_number,
                field=column,
            )
        fields[name] = value
    fields[LABEL_FIELD] = label
    for column in columns.extra:
        if column in row:
            fields[column] = row[column]
    return dspy.Example(**fields).with_inputs(*task.input_fields)


def examples_from_rows(
    rows: Iterable[tuple[int, Mapping[str, Any] | DataError]],
    *,
    task: Task,
    columns: ColumnMap,
    file: str,
    images: ImageChecker,
    label_map: Mapping[Any, Any] | None = None,
) -> list[dspy.Example]:
    """Build examples from numbered rows, checking every row and the uniqueness of ids.

    All rows are checked before anything is returned; problems are collected and raised together.

    Args:
        rows: ``(row_number, row)`` pairs in file order; a reader may put a ``DataError`` in place of a row it
            could not parse, which is collected with the others.
        task: The judging task.
        columns: Which column feeds which field.
        file: Source name shown in errors.
        images: Image path resolver and validator.
        label_map: Optional raw label -> label mapping.

    Returns:
        The examples, in row order.

    Raises:
        DataError: One error listing the first problems (file, row and field each) and their count; also for
            duplicate ids and for a source without rows.
    """
    examples: list[dspy.Example] = []
    errors: list[DataError] = []
    first_row_of_id: dict[str, int] = {}
    label_cache: dict[Any, Label] = {}
    count = 0
    for row_number, row in rows:
        count += 1
        if isinstance(row, DataError):
            errors.append(row)
            continue
        try:
            example = example_from_row(
                row,
                row_number,
                task=task,
                columns=columns,
                file=file,
                images=images,
                label_map=label_map,
                label_cache=label_cache,
            )
        except DataError as exc:
            errors.append(exc)
            continue
        previous = first_row_of_id.setdefault(example.id, row_number)
        if previous != row_number:
            errors.append(
                DataError(
                    f"duplicate id {shown(example.id)} (first used in row {previous})",
                    file=file,
                    row=row_number,
                    field=columns.id if columns.id is not None else ID_FIELD,
                )
            )
            continue
        examples.append(example)
    if errors:
        raise DataError.collected(errors, total_rows=count)
    if not examples:
        raise DataError("no data rows", file=file, row=0, field=None)
    logger.info("loaded %d examples for task '%s' from %s", len(examples), task.name, file)
    return examples


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True
