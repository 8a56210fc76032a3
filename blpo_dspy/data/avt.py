"""AVT AI-image naturalness: crowd ratings of AI-generated (and a few real) images, for the ``naturalness`` task.

Layout (as in ``avt_ai_images/``)::

    root/
      labels.csv   file, image_key, db, prompt_id, prompt, category, realism_mean, appeal_mean, ...
      images/      <file>

``realism_mean`` (a 1-5 crowd mean) is rounded half up to the nearest level 1..5. ``db`` is the generator
(``craiyon``, ``dall-e``, ``glide``, ``midjourney``, ``stable_diffusion``) or ``own`` for the real photos.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import dspy

from blpo_dspy.data.errors import HEADER_ROW, DataError
from blpo_dspy.data.examples import ID_FIELD, ColumnMap, ImageChecker, canonical_label, examples_from_rows
from blpo_dspy.data.manifest import read_csv_rows
from blpo_dspy.data.scores import round_half_up, to_score
from blpo_dspy.images import DEFAULT_MAX_PIXELS
from blpo_dspy.task import LABEL_FIELD, LabelError, Task

logger = logging.getLogger(__name__)

REAL_PHOTO_DB = "own"
_FILE = "file"
_PROMPT = "prompt"
_EXTRA = ("db", "category")


def load_avt_naturalness(
    root: str | Path,
    task: Task,
    *,
    score_column: str = "realism_mean",
    include_real: bool = True,
    labels_file: str = "labels.csv",
    image_dir: str = "images",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[dspy.Example]:
    """Load the AVT images with a crowd-mean score rounded to an ordinal label.

    Args:
        root: Folder with the labels CSV and the image folder.
        task: An ordinal task whose levels cover the rounded scores (e.g. ``naturalness``, 1..5). Its only text
            field may be ``prompt``.
        score_column: The 1-5 crowd mean to use (``realism_mean``, ``appeal_mean``, ``prompt_matching_mean``).
        include_real: Keep the real photos (``db == "own"``).
        labels_file: CSV file name in ``root``.
        image_dir: Image folder, relative to ``root``.
        max_pixels: Refuse images with more pixels than this.

    Returns:
        Examples with ``id`` = image file name and extra fields ``db``, ``category`` and the score (float).

    Raises:
        ValueError: The task is not ordinal or needs other text fields.
        FileNotFoundError: No labels CSV or image folder.
        DataError: Bad rows (score not a number or outside the task's scale, missing image, ...).
    """
    root = Path(root)
    if task.kind != "ordinal":
        raise ValueError(f"AVT scores need an ordinal task, task '{task.name}' is {task.kind}")
    if task.is_pairwise or any(name != _PROMPT for name in task.text_fields):
        raise ValueError(f"task '{task.name}' needs inputs the AVT images do not have (one image and a prompt only)")
    path = root / labels_file
    if not path.is_file():
        raise FileNotFoundError(f"AVT labels file not found: {labels_file} (in {root.name or '.'})")
    images_root = root / image_dir
    if not images_root.is_dir():
        raise FileNotFoundError(f"AVT image folder not found: {image_dir} (in {root.name or '.'})")

    header, raw_rows = read_csv_rows(path, display=labels_file)
    needed = [_FILE, score_column, *task.text_fields, *(["db"] if not include_real else [])]
    missing = [c for c in needed if c not in header]
    if missing:
        raise DataError.collected(
            [DataError(f"column '{c}' is missing", file=labels_file, row=HEADER_ROW, field=c) for c in missing]
        )
    prepared: list[tuple[int, dict[str, Any] | DataError]] = []
    skipped = 0
    for number, row in raw_rows:
        if isinstance(row, DataError):
            prepared.append((number, row))
            continue
        if not include_real and row.get("db") == REAL_PHOTO_DB:
            skipped += 1
            continue
        score = to_score(row[score_column])
        if score is None:
            prepared.append(
                (
                    number,
                    DataError(
                        f"score {row[score_column]!r} is not a number", file=labels_file, row=number, field=score_column
                    ),
                )
            )
            continue
        try:
            label = canonical_label(task, round_half_up(score))
        except LabelError as exc:
            prepared.append((number, DataError(str(exc), file=labels_file, row=number, field=score_column)))
            continue
        prepared.append((number, {**row, ID_FIELD: row[_FILE], LABEL_FIELD: label, score_column: score}))
    if skipped:
        logger.info("AVT: left out %d real photos", skipped)
    columns = ColumnMap(
        images={task.image_fields[0]: _FILE},
        texts={name: _PROMPT for name in task.text_fields},
        label=LABEL_FIELD,
        id=ID_FIELD,
        extra=(*(c for c in _EXTRA if c in header), score_column),
    )
    checker = ImageChecker(images_root, max_pixels=max_pixels)
    return examples_from_rows(prepared, task=task, columns=columns, file=labels_file, images=checker)
