"""MJ-Bench quality preference pairs for the pairwise ``preference`` task.

Layout (as in ``mjbench_quality_pairs/``)::

    root/
      pairs.csv   subset, caption, image_good, image_bad, edit_region
      images/     <image_good>, <image_bad>

The clean image (``image_good``) is preferred over its copy with inpainted flaws (``image_bad``). The file lists
the good image first, so the loader shows it as image A in a seeded half of the pairs and as image B in the
other half: labels are balanced (A and B differ by at most one) and the same seed gives the same order.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import dspy

from blpo_dspy.data.errors import HEADER_ROW, DataError
from blpo_dspy.data.examples import ID_FIELD, ColumnMap, ImageChecker, examples_from_rows
from blpo_dspy.data.manifest import read_csv_rows
from blpo_dspy.images import DEFAULT_MAX_PIXELS
from blpo_dspy.task import LABEL_FIELD, Task

logger = logging.getLogger(__name__)

_GOOD = "image_good"
_BAD = "image_bad"
_CAPTION = "caption"
_A = "__image_a__"
_B = "__image_b__"
_EXTRA = ("subset", "edit_region")


def load_mjbench_pairs(
    root: str | Path,
    task: Task,
    *,
    seed: int = 0,
    pairs_file: str = "pairs.csv",
    image_dir: str = "images",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[dspy.Example]:
    """Load MJ-Bench good/bad image pairs as pairwise examples with the good image's side shuffled by ``seed``.

    Args:
        root: Folder with the pairs CSV and the image folder.
        task: A pairwise task (e.g. ``preference``); its first label means "the first image is better". Its only
            text field may be ``prompt`` (filled from ``caption``).
        seed: Seed of the A/B shuffle.
        pairs_file: CSV file name in ``root``.
        image_dir: Image folder, relative to ``root``.
        max_pixels: Refuse images with more pixels than this.

    Returns:
        Examples in file order, ``id`` = the good image's file stem, extra fields ``subset``, ``edit_region`` and
        ``good_image`` (the name of the image field that holds the clean image).

    Raises:
        ValueError: The task is not pairwise or needs other text fields.
        FileNotFoundError: No pairs CSV or image folder.
        DataError: Bad rows (missing image, empty caption, ...), reported with the CSV column that holds them.
    """
    root = Path(root)
    if not task.is_pairwise:
        raise ValueError(f"MJ-Bench pairs need a pairwise task, task '{task.name}' is {task.kind}")
    if any(name != "prompt" for name in task.text_fields):
        raise ValueError(f"task '{task.name}' needs text fields MJ-Bench pairs do not have (only the caption/prompt)")
    path = root / pairs_file
    if not path.is_file():
        raise FileNotFoundError(f"MJ-Bench pairs file not found: {pairs_file} (in {root.name or '.'})")
    images_root = root / image_dir
    if not images_root.is_dir():
        raise FileNotFoundError(f"MJ-Bench image folder not found: {image_dir} (in {root.name or '.'})")

    header, raw_rows = read_csv_rows(path, display=pairs_file)
    needed = [_GOOD, _BAD, *([_CAPTION] if task.text_fields else [])]
    missing = [c for c in needed if c not in header]
    if missing:
        raise DataError.collected(
            [DataError(f"column '{c}' is missing", file=pairs_file, row=HEADER_ROW, field=c) for c in missing]
        )
    rows = list(raw_rows)
    flags = [i % 2 == 0 for i in range(len(rows))]  # True: the good image is shown as A
    random.Random(seed).shuffle(flags)
    first, second = task.image_fields
    checker = ImageChecker(images_root, max_pixels=max_pixels)

    prepared: list[tuple[int, dict[str, Any] | DataError]] = []
    for (number, row), good_first in zip(rows, flags, strict=True):
        if isinstance(row, DataError):
            prepared.append((number, row))
            continue
        # Check both images under their own CSV column names, so errors point at image_good / image_bad.
        try:
            for column in (_GOOD, _BAD):
                checker.image(row[column], file=pairs_file, row=number, column=column)
        except DataError as exc:
            prepared.append((number, exc))
            continue
        a, b = (row[_GOOD], row[_BAD]) if good_first else (row[_BAD], row[_GOOD])
        prepared.append(
            (
                number,
                {
                    **row,
                    ID_FIELD: Path(row[_GOOD].replace("\\", "/")).stem,
                    _A: a,
                    _B: b,
                    LABEL_FIELD: task.labels[0] if good_first else task.labels[1],
                    "good_image": first if good_first else second,
                },
            )
        )
    columns = ColumnMap(
        images={first: _A, second: _B},
        texts={name: _CAPTION for name in task.text_fields},
        label=LABEL_FIELD,
        id=ID_FIELD,
        extra=(*(c for c in _EXTRA if c in header), "good_image"),
    )
    examples = examples_from_rows(prepared, task=task, columns=columns, file=pairs_file, images=checker)
    logger.info("MJ-Bench pairs: %d with the good image first, %d second", sum(flags), len(flags) - sum(flags))
    return examples
