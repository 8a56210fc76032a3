"""Datasets as validated ``dspy.Example``s with lazily loaded images, and seeded class-balanced splits.

Loaders (all take a :class:`~blpo_dspy.task.Task` and check every row before returning):

- :func:`load_manifest` — a CSV/TSV or JSONL file naming image paths, labels and text fields.
- :func:`load_folder` — class subfolders ``root/<label>/*.png``.
- :func:`load_hub_dataset` / :func:`examples_from_hf_dataset` — Hugging Face datasets (ImageReward, SeeTRUE,
  UnsafeBench, AGIN, AGIQA-3K specs in :mod:`blpo_dspy.data.hub`).
- :func:`load_agiqa3k_csv`, :func:`load_mjbench_pairs`, :func:`load_avt_naturalness` — the folder formats of the
  AGIQA-3K sample, the MJ-Bench quality pairs and the AVT AI images.

Bad input raises :class:`DataError` naming the file, the row and the field.
"""

from blpo_dspy.data.agiqa import AGIQA_FRAMINGS, load_agiqa3k_csv
from blpo_dspy.data.avt import load_avt_naturalness
from blpo_dspy.data.errors import DataError
from blpo_dspy.data.examples import (
    ColumnMap,
    ImageChecker,
    canonical_label,
    example_from_row,
    examples_from_rows,
    sha256_field,
)
from blpo_dspy.data.folder import IMAGE_SUFFIXES, load_folder
from blpo_dspy.data.hub import (
    HUB_DATASET_NAMES,
    HubDatasetError,
    HubDatasetSpec,
    examples_from_hf_dataset,
    hub_dataset_spec,
    load_hub_dataset,
    spec_with,
)
from blpo_dspy.data.manifest import load_manifest
from blpo_dspy.data.mjbench import load_mjbench_pairs
from blpo_dspy.data.scores import binary_from_mos, quantile_levels, round_half_up
from blpo_dspy.data.splits import data_fingerprint, sample_per_label, stratified_split

__all__ = [
    "AGIQA_FRAMINGS",
    "HUB_DATASET_NAMES",
    "IMAGE_SUFFIXES",
    "ColumnMap",
    "DataError",
    "HubDatasetError",
    "HubDatasetSpec",
    "ImageChecker",
    "binary_from_mos",
    "canonical_label",
    "data_fingerprint",
    "example_from_row",
    "examples_from_hf_dataset",
    "examples_from_rows",
    "hub_dataset_spec",
    "load_agiqa3k_csv",
    "load_avt_naturalness",
    "load_folder",
    "load_hub_dataset",
    "load_manifest",
    "load_mjbench_pairs",
    "quantile_levels",
    "round_half_up",
    "sample_per_label",
    "sha256_field",
    "spec_with",
    "stratified_split",
]
