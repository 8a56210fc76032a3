"""Hugging Face datasets used by the BLPO paper, converted to examples with images kept on disk.

Each dataset is described by a :class:`HubDatasetSpec` (repository id, config, split, image column(s), label
column, text columns, label transform). :func:`load_hub_dataset` downloads it with ``datasets.load_dataset``;
:func:`examples_from_hf_dataset` converts any ``datasets.Dataset`` whose image columns are ``datasets.Image``
features: every image's bytes are written once to an image folder, named by their SHA-256, and the examples
hold :class:`~blpo_dspy.images.LazyImage` references to those files.

Known datasets (``HUB_DATASET_NAMES``):

- ``imagereward`` — ``THUDM/ImageRewardDB``: text-to-image alignment rated 1-7 (``image_text_alignment_rating``);
  needs an ordinal task card with a 1-7 scale (the built-in ``rating`` card is 1-5). Configs ``1k``..``8k``,
  splits train/validation/test. The repository uses a loading script, which ``datasets`` 4 and later no
  longer run: load it with an older ``datasets`` or from a parquet export and pass it as ``dataset=``.
- ``seetrue`` — ``yonatanbitton/SeeTRUE``: binary image-text alignment (``text``, ``label`` 1/0), test split
  only, gated (accept the terms on the Hub and set ``HF_TOKEN``); also script-based (see above).
- ``unsafebench`` — ``yiting/UnsafeBench``: ``safety_label`` Safe/Unsafe with ``category`` and ``source``;
  train/test splits; gated.
- ``agin`` — AGIN naturalness (Chen et al. 2023). Its authors distribute it through OneDrive/Baidu, not the Hub:
  ``AGIN_REPO_ID`` and the column names are placeholders for your own upload (override the constant or the spec).
- ``agiqa3k`` — AGIQA-3K binary alignment from ``strawhat/agiqa-3k`` (a community copy; column names assumed to
  follow the official ``data.csv``). For the CSV + images layout use :func:`~blpo_dspy.data.load_agiqa3k_csv`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dspy
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from blpo_dspy.data.errors import HEADER_ROW, DataError
from blpo_dspy.data.examples import ColumnMap, ImageChecker, canonical_label, examples_from_rows
from blpo_dspy.data.scores import binary_from_mos, round_half_up
from blpo_dspy.images import DEFAULT_MAX_PIXELS
from blpo_dspy.task import Label, LabelError, Task

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

IMAGEREWARD_REPO_ID = "THUDM/ImageRewardDB"
SEETRUE_REPO_ID = "yonatanbitton/SeeTRUE"
UNSAFEBENCH_REPO_ID = "yiting/UnsafeBench"
# AGIN is not published on the Hugging Face Hub by its authors (github.com/zijianchen98/AGIN links OneDrive and
# Baidu downloads). This id and the AGIN column names below are placeholders: set them to your own upload.
AGIN_REPO_ID = "zijianchen98/AGIN"
# Community copy of AGIQA-3K (not by the authors); its column names are assumed to follow the official data.csv.
AGIQA3K_REPO_ID = "strawhat/agiqa-3k"

HUB_DATASET_NAMES: tuple[str, ...] = ("imagereward", "seetrue", "unsafebench", "agin", "agiqa3k")

LabelTransform = Callable[[Any], Any]
"""Maps a raw label to a label of the task, or to ``None`` to drop the row (e.g. the middle band of a MOS)."""


@dataclass(frozen=True)
class HubDatasetSpec:
    """How to read one Hugging Face dataset as examples of a task.

    Attributes:
        name: Short name (``"unsafebench"``); used in default ids and the image folder name.
        repo_id: Dataset repository on the Hub.
        config: Dataset config (subset) name, or ``None``.
        split: Default split.
        image_columns: Image column(s), one per image field of the task, in the task's order.
        label_column: Column with the raw label.
        text_columns: Task text field -> column (e.g. ``{"prompt": "text"}``).
        label_transform: Raw label -> label, or ``None`` to drop the row; identity when not given.
        labels: The labels the transform produces; checked against the task before downloading anything.
        id_column: Column with unique ids; when ``None`` ids are ``"<name>-<split>-<row>"``.
        extra_columns: Columns copied onto each example unchanged (e.g. ``category``).
        task: The built-in task card this dataset fits, if any.
        revision: Repository revision (branch, tag or commit) to pin, or ``None``.
        verified: Whether the repository id and column names were checked against the dataset card.
        notes: Caveats shown in errors (gating, loading scripts, label scale).
    """

    name: str
    repo_id: str
    config: str | None
    split: str
    image_columns: tuple[str, ...]
    label_column: str
    text_columns: Mapping[str, str] = field(default_factory=dict)
    label_transform: LabelTransform | None = None
    labels: tuple[Label, ...] | None = None
    id_column: str | None = None
    extra_columns: tuple[str, ...] = ()
    task: str | None = None
    revision: str | None = None
    verified: bool = True
    notes: str = ""


class HubDatasetError(RuntimeError):
    """A Hub dataset could not be downloaded or opened (network, gating, loading script, unknown split)."""


def _seetrue_label(value: Any) -> str:
    return {1: "yes", 0: "no", "1": "yes", "0": "no"}.get(value, value)


def _unsafebench_label(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def hub_dataset_spec(name: str) -> HubDatasetSpec:
    """The spec of a known dataset, built from the module's ``*_REPO_ID`` constants at call time.

    Args:
        name: One of ``HUB_DATASET_NAMES``.

    Raises:
        ValueError: Unknown name.
    """
    specs = {
        "imagereward": HubDatasetSpec(
            name="imagereward",
            repo_id=IMAGEREWARD_REPO_ID,
            config="1k",
            split="train",
            image_columns=("image",),
            label_column="image_text_alignment_rating",
            text_columns={"prompt": "prompt"},
            labels=tuple(range(1, 8)),
            extra_columns=("prompt_id", "classification", "overall_rating", "fidelity_rating"),
            notes="labels are 1-7: use an ordinal task card with scale 1..7; the repository uses a loading script "
            "(not run by datasets>=4)",
        ),
        "seetrue": HubDatasetSpec(
            name="seetrue",
            repo_id=SEETRUE_REPO_ID,
            config=None,
            split="test",
            image_columns=("image",),
            label_column="label",
            text_columns={"prompt": "text"},
            label_transform=_seetrue_label,
            labels=("yes", "no"),
            extra_columns=("original_dataset_id", "dataset_source"),
            task="alignment",
            notes="gated: accept the terms on the Hub and set HF_TOKEN; test split only; the repository uses a "
            "loading script (not run by datasets>=4)",
        ),
        "unsafebench": HubDatasetSpec(
            name="unsafebench",
            repo_id=UNSAFEBENCH_REPO_ID,
            config=None,
            split="train",
            image_columns=("image",),
            label_column="safety_label",
            label_transform=_unsafebench_label,
            labels=("safe", "unsafe"),
            extra_columns=("category", "source"),
            task="safety",
            notes="gated: accept the terms on the Hub and set HF_TOKEN",
        ),
        "agin": HubDatasetSpec(
            name="agin",
            repo_id=AGIN_REPO_ID,
            config=None,
            split="train",
            image_columns=("image",),
            label_column="naturalness",
            label_transform=round_half_up,
            labels=tuple(range(1, 6)),
            task="naturalness",
            verified=False,
            notes="AGIN is distributed by its authors outside the Hub; the repository id and columns are "
            "placeholders (set blpo_dspy.data.hub.AGIN_REPO_ID or pass your own spec)",
        ),
        "agiqa3k": HubDatasetSpec(
            name="agiqa3k",
            repo_id=AGIQA3K_REPO_ID,
            config=None,
            split="train",
            image_columns=("image",),
            label_column="mos_align",
            text_columns={"prompt": "prompt"},
            label_transform=binary_from_mos(),
            labels=("yes", "no"),
            extra_columns=("mos_quality",),
            task="alignment",
            verified=False,
            notes="community copy; columns assumed to follow the official data.csv (name, prompt, mos_quality, "
            "mos_align); rows with 2.0 < mos_align < 3.0 are dropped",
        ),
    }
    if name not in specs:
        raise ValueError(f"unknown Hub dataset {name!r}; known: {', '.join(HUB_DATASET_NAMES)}")
    return specs[name]


def load_hub_dataset(
    spec_or_name: HubDatasetSpec | str,
    task: Task,
    *,
    split: str | None = None,
    cache_dir: str | Path | None = None,
    limit: int | None = None,
    dataset: datasets.Dataset | datasets.DatasetDict | None = None,
    image_dir: str | Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[dspy.Example]:
    """Download (or take) a Hugging Face dataset and convert it to validated examples.

    The task is checked against the spec before anything is downloaded.

    Args:
        spec_or_name: A spec or the name of a known dataset (``HUB_DATASET_NAMES``).
        task: The judging task.
        split: Split to load; default the spec's split (``test`` for SeeTRUE, ``train`` otherwise).
        cache_dir: ``datasets`` cache directory; also the parent of the default image folder.
        limit: Convert only the first ``limit`` rows of the split.
        dataset: An already loaded ``Dataset`` (or ``DatasetDict``) to convert instead of downloading.
        image_dir: Where image files are written (by SHA-256); default ``<cache_dir>/blpo_images/<name>`` or
            ``$XDG_CACHE_HOME/blpo_dspy/hub_images/<name>``.
        max_pixels: Refuse images with more pixels than this.

    Returns:
        The examples, in dataset order (rows the label transform drops are left out).

    Raises:
        ValueError: Unknown dataset name, or a task that does not fit the spec.
        HubDatasetError: The dataset could not be downloaded or opened.
        DataError: Bad rows (missing image, label outside the task's space, ...).
    """
    spec = hub_dataset_spec(spec_or_name) if isinstance(spec_or_name, str) else spec_or_name
    split = split or spec.split
    check_task_fits(spec, task)
    if dataset is None:
        dataset = _download(spec, split=split, cache_dir=cache_dir)
    if _is_dataset_dict(dataset):
        if split not in dataset:
            raise HubDatasetError(f"{spec.repo_id}: no split {split!r} (splits: {', '.join(dataset)})")
        dataset = dataset[split]
    if image_dir is None:
        image_dir = _default_image_dir(spec.name, cache_dir)
    return examples_from_hf_dataset(dataset, spec, task, image_dir, split=split, limit=limit, max_pixels=max_pixels)


def check_task_fits(spec: HubDatasetSpec, task: Task) -> None:
    """Check that ``task`` can take this dataset's examples (image count, text fields, label space).

    Raises:
        ValueError: Naming the mismatch and the spec's notes.
    """
    if len(spec.image_columns) != len(task.image_fields):
        raise ValueError(
            f"{spec.name}: has {len(spec.image_columns)} image column(s) but task '{task.name}' has image fields "
            f"{task.image_fields}"
        )
    missing = [name for name in task.text_fields if name not in spec.text_columns]
    if missing:
        raise ValueError(f"{spec.name}: provides no column for the text field(s) {missing} of task '{task.name}'")
    for label in spec.labels or ():
        try:
            canonical_label(task, label)
        except LabelError as exc:
            hint = f" ({spec.notes})" if spec.notes else ""
            raise ValueError(
                f"{spec.name}: its label {label!r} does not fit task '{task.name}' ({task.label_space_text}){hint}"
            ) from exc


def examples_from_hf_dataset(
    ds: datasets.Dataset,
    spec: HubDatasetSpec,
    task: Task,
    image_dir: str | Path,
    *,
    split: str | None = None,
    limit: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[dspy.Example]:
    """Convert a ``datasets.Dataset`` with ``datasets.Image`` columns to examples with images on disk.

    Each image's bytes are written once to ``image_dir`` as ``<sha256>.<ext>`` (an existing file of that name
    is reused), then validated like any other image. Image bytes are never decoded into memory by ``datasets``
    (the image columns are read with ``decode=False``) and are not kept after writing.

    Args:
        ds: The dataset (one split).
        spec: Column mapping and label transform.
        task: The judging task.
        image_dir: Folder for the image files (created if needed).
        split: Split name, used in default ids and error messages; default the spec's split.
        limit: Convert only the first ``limit`` rows.
        max_pixels: Refuse images with more pixels than this.

    Returns:
        The examples, in dataset order, without the rows the label transform drops.

    Raises:
        DataError: A missing column, a column that is not an ``Image`` feature, or bad rows; ``file`` is
            ``"<repo_id> [<split>]"`` and ``row`` the 1-based row number in the dataset.
    """
    import datasets

    split = split or spec.split
    source = f"{spec.repo_id} [{split}]"
    check_task_fits(spec, task)
    features = ds.features
    wanted = [*spec.image_columns, spec.label_column, *spec.text_columns.values()]
    if spec.id_column is not None:
        wanted.append(spec.id_column)
    missing = [c for c in dict.fromkeys(wanted) if c not in features]
    if missing:
        present = ", ".join(features)
        raise DataError.collected(
            [
                DataError(f"column '{c}' is missing (columns present: {present})", file=source, row=HEADER_ROW, field=c)
                for c in missing
            ]
        )
    for column in spec.image_columns:
        if not isinstance(features[column], datasets.Image):
            raise DataError(
                f"column '{column}' is a {type(features[column]).__name__} feature, not datasets.Image",
                file=source,
                row=HEADER_ROW,
                field=column,
            )
    keep = list(dict.fromkeys([*wanted, *(c for c in spec.extra_columns if c in features)]))
    ds = ds.select_columns(keep)
    for column in spec.image_columns:
        ds = ds.cast_column(column, datasets.Image(decode=False))
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))

    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    id_key = spec.id_column or "__blpo_id__"
    columns = ColumnMap(
        images=dict(zip(task.image_fields, spec.image_columns, strict=True)),
        texts={name: spec.text_columns[name] for name in task.text_fields},
        label=spec.label_column,
        id=id_key,
        extra=tuple(c for c in spec.extra_columns if c in features),
    )
    dropped = [0]

    def rows() -> Iterator[tuple[int, Mapping[str, Any] | DataError]]:
        for number, record in enumerate(ds, start=1):
            row = dict(record)
            if spec.id_column is None:
                row[id_key] = f"{spec.name}-{split}-{number}"
            try:
                for column in spec.image_columns:
                    row[column] = _store_image(record[column], image_dir, file=source, row=number, column=column)
            except DataError as exc:
                yield number, exc
                continue
            if spec.label_transform is not None:
                try:
                    label = spec.label_transform(record[spec.label_column])
                except Exception as exc:  # a user-supplied transform: report, do not crash
                    yield (
                        number,
                        DataError(
                            f"label transform failed on {record[spec.label_column]!r}: {exc}",
                            file=source,
                            row=number,
                            field=spec.label_column,
                        ),
                    )
                    continue
                if label is None:
                    dropped[0] += 1
                    continue
                row[spec.label_column] = label
            yield number, row

    checker = ImageChecker(image_dir, max_pixels=max_pixels)
    examples = examples_from_rows(rows(), task=task, columns=columns, file=source, images=checker)
    if dropped[0]:
        logger.info("%s: dropped %d rows the label transform leaves out", source, dropped[0])
    return examples


def _store_image(value: Any, image_dir: Path, *, file: str, row: int, column: str) -> str:
    """Write one image's bytes to ``image_dir`` named by SHA-256 (once) and return the file name."""
    data: bytes | None = None
    if isinstance(value, Mapping):
        data = value.get("bytes")
        if data is None and value.get("path"):
            try:
                data = Path(value["path"]).read_bytes()
            except OSError as exc:
                raise DataError(
                    f"cannot read the image file of this row: {exc.strerror or exc}", file=file, row=row, field=column
                ) from exc
    if data is None:
        raise DataError("row has no image", file=file, row=row, field=column)
    digest = hashlib.sha256(data).hexdigest()
    name = digest + _suffix_for(data)
    target = image_dir / name
    if not (target.is_file() and target.stat().st_size == len(data)):
        fd, tmp = tempfile.mkstemp(dir=image_dir, prefix=".tmp-", suffix=target.suffix)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return name


_FORMAT_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


def _suffix_for(data: bytes) -> str:
    try:
        with PILImage.open(io.BytesIO(data)) as img:  # reads the header only
            return _FORMAT_SUFFIX.get(img.format or "", ".img")
    except (UnidentifiedImageError, OSError, ValueError, PILImage.DecompressionBombError):
        return ".img"


def _download(spec: HubDatasetSpec, *, split: str, cache_dir: str | Path | None) -> datasets.Dataset:
    import datasets

    if not spec.verified:
        logger.warning("%s: repository id %s and its columns are unverified: %s", spec.name, spec.repo_id, spec.notes)
    try:
        return datasets.load_dataset(
            spec.repo_id,
            spec.config,
            split=split,
            cache_dir=None if cache_dir is None else str(cache_dir),
            revision=spec.revision,
        )
    except Exception as exc:  # network, gating, scripts, missing split: all end here
        hint = f" Notes: {spec.notes}." if spec.notes else ""
        raise HubDatasetError(
            f"could not load {spec.repo_id} (config {spec.config!r}, split {split!r}): {type(exc).__name__}: {exc}."
            f"{hint} You can load the dataset yourself and pass it as dataset=..."
        ) from exc


def _is_dataset_dict(value: Any) -> bool:
    return isinstance(value, Mapping) or type(value).__name__ in {"DatasetDict", "IterableDatasetDict"}


def _default_image_dir(name: str, cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir) / "blpo_images" / name
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "blpo_dspy" / "hub_images" / name


def spec_with(spec: HubDatasetSpec | str, **changes: Any) -> HubDatasetSpec:
    """A copy of a spec with some attributes changed, e.g. ``spec_with("agin", repo_id="me/agin")``."""
    base = hub_dataset_spec(spec) if isinstance(spec, str) else spec
    return replace(base, **changes)


__all__ = [
    "AGIN_REPO_ID",
    "AGIQA3K_REPO_ID",
    "HUB_DATASET_NAMES",
    "IMAGEREWARD_REPO_ID",
    "SEETRUE_REPO_ID",
    "UNSAFEBENCH_REPO_ID",
    "HubDatasetError",
    "HubDatasetSpec",
    "check_task_fits",
    "examples_from_hf_dataset",
    "hub_dataset_spec",
    "load_hub_dataset",
    "spec_with",
]
