"""Loading examples from class subfolders: ``root/<label>/<image>`` for single-image tasks without text fields.

Example layout for the ``safety`` task::

    root/
      safe/    a.png  b.jpg
      unsafe/  c.webp sub/d.png

Each subfolder name is a label (or an alias of one) of the task; images may sit in nested folders below it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import dspy

from blpo_dspy.data.errors import DataError
from blpo_dspy.data.examples import ID_FIELD, ColumnMap, ImageChecker, example_from_row
from blpo_dspy.images import DEFAULT_MAX_PIXELS
from blpo_dspy.task import LABEL_FIELD, Task

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def load_folder(
    root: str | Path,
    task: Task,
    *,
    label_map: Mapping[Any, Any] | None = None,
    suffixes: Sequence[str] = IMAGE_SUFFIXES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[dspy.Example]:
    """Load images from class subfolders; the subfolder name is the label, the relative path the id.

    Hidden files and folders (starting with ``.``) and files with other suffixes are skipped. Images are
    listed in sorted order, so ids and row numbers are stable.

    Args:
        root: The folder holding one subfolder per label.
        task: A single-image task without text fields (e.g. ``safety`` or ``naturalness``).
        label_map: Folder name -> label mapping applied before validation (e.g. ``{"good": 5}``).
        suffixes: Image file suffixes to pick up (lower case).
        max_pixels: Refuse images with more pixels than this (decompression-bomb guard).

    Returns:
        The examples, sorted by relative path.

    Raises:
        DataError: A subfolder that is not a label, an image directly in ``root``, a bad image, or no images at
            all. ``file`` is the image's path relative to ``root``, ``row`` its position in the sorted listing.
        ValueError: The task is pairwise or needs text fields (use :func:`~blpo_dspy.data.load_manifest`).
        FileNotFoundError: ``root`` is not a directory.
    """
    root = Path(root)
    if task.is_pairwise or task.text_fields:
        needs = "two images" if task.is_pairwise else f"text fields {list(task.text_fields)}"
        raise ValueError(
            f"task '{task.name}' needs {needs}, which a folder of images cannot provide; use load_manifest"
        )
    if not root.is_dir():
        raise FileNotFoundError(f"not a directory: {root.name or root}")
    wanted = tuple(s.lower() for s in suffixes)
    files = sorted(_image_files(root, wanted), key=lambda p: p.relative_to(root).as_posix())
    display = root.name or "."
    if not files:
        raise DataError(
            f"no image files ({', '.join(wanted)}) in class subfolders", file=display + "/", row=0, field=None
        )
    image_field = task.image_fields[0]
    columns = ColumnMap(images={image_field: image_field}, texts={}, label=LABEL_FIELD, id=ID_FIELD)
    checker = ImageChecker(root, max_pixels=max_pixels)
    examples: list[dspy.Example] = []
    errors: list[DataError] = []
    for number, path in enumerate(files, start=1):
        relative = path.relative_to(root).as_posix()
        if "/" not in relative:
            errors.append(
                DataError(
                    "image is not inside a class subfolder, so it has no label",
                    file=relative,
                    row=number,
                    field=LABEL_FIELD,
                )
            )
            continue
        row = {ID_FIELD: relative, image_field: relative, LABEL_FIELD: relative.split("/", 1)[0]}
        # There is no table: the image file itself is the "file" named in errors.
        try:
            examples.append(
                example_from_row(
                    row, number, task=task, columns=columns, file=relative, images=checker, label_map=label_map
                )
            )
        except DataError as exc:
            errors.append(exc)
    if errors:
        raise DataError.collected(errors, total_rows=len(files))
    logger.info("loaded %d examples for task '%s' from folder %s", len(examples), task.name, display)
    return examples


def _image_files(root: Path, suffixes: tuple[str, ...]) -> Iterator[Path]:
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.suffix.lower() in suffixes and (path.is_file() or path.is_symlink()):
            yield path
