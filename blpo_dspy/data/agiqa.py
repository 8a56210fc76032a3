"""AGIQA-3K in its folder format: a labels CSV plus an image folder.

Layout (as in the official release's ``data.csv`` or the 300-image sample ``agiqa3k_sample300/``)::

    root/
      labels.csv   name, prompt, [generator, prompt_idx,] ..., mos_quality, std_quality, mos_align, std_align
      images/      <name> (512x512 JPEG)

Framings (MOS values are on a roughly 0-5 scale):

- ``"alignment"`` (binary task): ``mos_align >= 3.0`` -> ``yes``, ``<= 2.0`` -> ``no``; the middle band is dropped.
- ``"rating_align"`` / ``"rating_quality"`` (5-level ordinal task such as ``rating``): quintiles of ``mos_align``
  / ``mos_quality`` over the rows of the file -> levels 1..5 (balanced by construction).

The same ``prompt_idx`` means the same prompt across generators; keep that in mind when splitting.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import dspy

from blpo_dspy.data.errors import HEADER_ROW, DataError
from blpo_dspy.data.examples import ID_FIELD, ColumnMap, ImageChecker, canonical_label, examples_from_rows
from blpo_dspy.data.manifest import read_csv_rows
from blpo_dspy.data.scores import binary_from_mos, quantile_levels, to_score
from blpo_dspy.images import DEFAULT_MAX_PIXELS
from blpo_dspy.task import LABEL_FIELD, LabelError, Task

logger = logging.getLogger(__name__)

AgiqaFraming = Literal["alignment", "rating_align", "rating_quality"]
AGIQA_FRAMINGS: tuple[str, ...] = ("alignment", "rating_align", "rating_quality")
_SCORE_COLUMN = {"alignment": "mos_align", "rating_align": "mos_align", "rating_quality": "mos_quality"}
_NAME = "name"
_PROMPT = "prompt"
_EXTRA = ("generator", "prompt_idx")


def load_agiqa3k_csv(
    root: str | Path,
    task: Task,
    *,
    framing: AgiqaFraming = "alignment",
    labels_file: str | None = None,
    image_dir: str = "images",
    yes_at: float = 3.0,
    no_at: float = 2.0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[dspy.Example]:
    """Load AGIQA-3K (or a sample of it) from a labels CSV and an image folder.

    Args:
        root: Folder with the labels CSV and the image folder.
        task: A binary task with labels/aliases ``yes``/``no`` for ``"alignment"``; a 5-level ordinal task for
            the rating framings. Its only text field may be ``prompt``.
        framing: ``"alignment"``, ``"rating_align"`` or ``"rating_quality"`` (see the module docstring).
        labels_file: CSV file name in ``root``; default ``labels.csv``, else the official ``data.csv``.
        image_dir: Image folder, relative to ``root``.
        yes_at: Binary framing: MOS at or above this is ``yes``.
        no_at: Binary framing: MOS at or below this is ``no``.
        max_pixels: Refuse images with more pixels than this.

    Returns:
        Examples with ``id`` = image name and extra fields ``generator``/``prompt_idx`` (when present) and the
        MOS used (``mos_align`` or ``mos_quality``, as float).

    Raises:
        ValueError: Unknown framing, or a task that does not fit it.
        FileNotFoundError: No labels CSV or image folder.
        DataError: Bad rows (missing image, a MOS that is not a number, ...), all reported together.
    """
    if framing not in AGIQA_FRAMINGS:
        raise ValueError(f"framing must be one of {AGIQA_FRAMINGS}, got {framing!r}")
    root = Path(root)
    extra_text = [name for name in task.text_fields if name != _PROMPT]
    if extra_text or task.is_pairwise:
        raise ValueError(f"task '{task.name}' needs inputs AGIQA-3K does not have (one image and a prompt only)")
    if labels_file is None:
        labels_file = "labels.csv" if (root / "labels.csv").is_file() else "data.csv"
    path = root / labels_file
    if not path.is_file():
        raise FileNotFoundError(f"AGIQA-3K labels file not found: {labels_file} (in {root.name or '.'})")
    images_root = root / image_dir
    if not images_root.is_dir():
        raise FileNotFoundError(f"AGIQA-3K image folder not found: {image_dir} (in {root.name or '.'})")

    score_column = _SCORE_COLUMN[framing]
    header, raw_rows = read_csv_rows(path, display=labels_file)
    needed = [_NAME, score_column, *task.text_fields]
    missing = [c for c in needed if c not in header]
    if missing:
        raise DataError.collected(
            [DataError(f"column '{c}' is missing", file=labels_file, row=HEADER_ROW, field=c) for c in missing]
        )

    parsed: list[tuple[int, dict[str, Any] | DataError]] = []
    for number, row in raw_rows:
        if isinstance(row, DataError):
            parsed.append((number, row))
            continue
        score = to_score(row[score_column])
        if score is None:
            parsed.append(
                (
                    number,
                    DataError(
                        f"MOS {row[score_column]!r} is not a number", file=labels_file, row=number, field=score_column
                    ),
                )
            )
            continue
        parsed.append((number, {**row, score_column: score}))

    labelled = _label_rows(parsed, task, framing=framing, score_column=score_column, yes_at=yes_at, no_at=no_at)
    columns = ColumnMap(
        images={task.image_fields[0]: _NAME},
        texts={name: _PROMPT for name in task.text_fields},
        label=LABEL_FIELD,
        id=ID_FIELD,
        extra=(*(c for c in _EXTRA if c in header), score_column),
    )
    checker = ImageChecker(images_root, max_pixels=max_pixels)
    return examples_from_rows(labelled, task=task, columns=columns, file=labels_file, images=checker)


def _label_rows(
    rows: list[tuple[int, dict[str, Any] | DataError]],
    task: Task,
    *,
    framing: str,
    score_column: str,
    yes_at: float,
    no_at: float,
) -> Iterator[tuple[int, Mapping[str, Any] | DataError]]:
    good = [(number, row) for number, row in rows if not isinstance(row, DataError)]
    if framing == "alignment":
        if task.kind != "binary":
            raise ValueError(f"the 'alignment' framing needs a binary task, task '{task.name}' is {task.kind}")
        try:
            labels = {"yes": canonical_label(task, "yes"), "no": canonical_label(task, "no")}
        except LabelError as exc:
            raise ValueError(f"task '{task.name}' has no labels 'yes'/'no' for the 'alignment' framing") from exc
        transform = binary_from_mos(yes_at=yes_at, no_at=no_at)
        assigned = {number: transform(row[score_column]) for number, row in good}
        dropped = sum(1 for value in assigned.values() if value is None)
        logger.info("AGIQA-3K alignment: dropped %d rows with %s < %s < %s", dropped, no_at, score_column, yes_at)
        mapped = {number: (None if value is None else labels[value]) for number, value in assigned.items()}
    else:
        if task.kind != "ordinal" or len(task.labels) != 5:
            raise ValueError(
                f"the '{framing}' framing needs a 5-level ordinal task, task '{task.name}' has {task.label_space_text}"
            )
        levels = quantile_levels([row[score_column] for _, row in good], 5)
        mapped = {number: task.labels[level] for (number, _), level in zip(good, levels, strict=True)}
    for number, row in rows:
        if isinstance(row, DataError):
            yield number, row
            continue
        label = mapped[number]
        if label is None:
            continue
        yield number, {**row, ID_FIELD: row[_NAME], LABEL_FIELD: label}
