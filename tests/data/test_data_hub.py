"""Hugging Face conversion on small local ``datasets.Dataset``s with ``Image`` features (never the Hub)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import datasets
import pytest
from PIL import Image

import blpo_dspy.data.hub as hub
from blpo_dspy.data import (
    HUB_DATASET_NAMES,
    DataError,
    HubDatasetError,
    HubDatasetSpec,
    examples_from_hf_dataset,
    hub_dataset_spec,
    load_hub_dataset,
    spec_with,
)
from blpo_dspy.images import LazyImage


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _image_bytes(color: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (10, 8), color).save(buffer, format=fmt)
    return buffer.getvalue()


RED, BLUE = _image_bytes((255, 0, 0)), _image_bytes((0, 0, 255), "JPEG")


def _unsafebench_like(tmp_path: Path) -> datasets.Dataset:
    """A tiny dataset shaped like yiting/UnsafeBench, saved and reloaded from disk."""
    ds = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": RED, "path": None}, {"bytes": BLUE, "path": None}, {"bytes": RED, "path": None}],
            "safety_label": ["Safe", "Unsafe", "Unsafe"],
            "category": ["Hate", "Violence", "Spam"],
            "source": ["Laion5B", "Lexica", "Lexica"],
            "text": ["", "", ""],
        }
    ).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    return datasets.load_from_disk(str(tmp_path / "saved"))


def test_conversion_writes_each_image_once_by_digest(tmp_path: Path, safety) -> None:
    ds = _unsafebench_like(tmp_path)
    image_dir = tmp_path / "images"

    examples = examples_from_hf_dataset(ds, hub_dataset_spec("unsafebench"), safety, image_dir)

    red, blue = hashlib.sha256(RED).hexdigest(), hashlib.sha256(BLUE).hexdigest()
    assert sorted(p.name for p in image_dir.iterdir()) == sorted([f"{red}.png", f"{blue}.jpg"])
    assert [(e.id, e.label, e.image_sha256) for e in examples] == [
        ("unsafebench-train-1", "safe", red),
        ("unsafebench-train-2", "unsafe", blue),
        ("unsafebench-train-3", "unsafe", red),
    ]
    assert [e.category for e in examples] == ["Hate", "Violence", "Spam"]
    assert all(isinstance(e.image, LazyImage) for e in examples)
    assert examples[1].image.read_bytes() == BLUE
    assert examples[1].image.data_uri().startswith("data:image/jpeg;base64,")
    assert set(examples[0].inputs().keys()) == {"image"}
    # A second conversion reuses the files (same names, same content).
    again = examples_from_hf_dataset(ds, hub_dataset_spec("unsafebench"), safety, image_dir)
    assert [e.image_sha256 for e in again] == [e.image_sha256 for e in examples]
    assert len(list(image_dir.iterdir())) == 2


def test_load_hub_dataset_with_a_given_dataset_dict_split_and_limit(tmp_path: Path, safety) -> None:
    ds = _unsafebench_like(tmp_path)
    both = datasets.DatasetDict({"train": ds, "test": ds.select([1])})

    test = load_hub_dataset("unsafebench", safety, split="test", dataset=both, image_dir=tmp_path / "img")
    first_two = load_hub_dataset("unsafebench", safety, dataset=both, limit=2, image_dir=tmp_path / "img")

    assert [(e.id, e.label) for e in test] == [("unsafebench-test-1", "unsafe")]
    assert [e.label for e in first_two] == ["safe", "unsafe"]
    with pytest.raises(HubDatasetError, match="no split 'validation'"):
        load_hub_dataset("unsafebench", safety, split="validation", dataset=both, image_dir=tmp_path / "img")


def test_load_hub_dataset_calls_load_dataset_with_the_spec(
    tmp_path: Path, safety, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = _unsafebench_like(tmp_path)
    calls: list[tuple[Any, ...]] = []

    def fake_load_dataset(repo_id: str, config: str | None = None, **kwargs: Any) -> datasets.Dataset:
        calls.append((repo_id, config, kwargs["split"], kwargs["cache_dir"], kwargs["revision"]))
        return ds

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    examples = load_hub_dataset("unsafebench", safety, split="test", cache_dir=tmp_path / "cache")

    assert calls == [("yiting/UnsafeBench", None, "test", str(tmp_path / "cache"), None)]
    assert len(examples) == 3
    assert (tmp_path / "cache" / "blpo_images" / "unsafebench").is_dir()


def test_download_failures_become_a_hub_error_with_the_notes(
    tmp_path: Path, alignment, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(HubDatasetError) as info:
        load_hub_dataset("seetrue", alignment, cache_dir=tmp_path)
    message = str(info.value)
    assert "yonatanbitton/SeeTRUE" in message and "split 'test'" in message and "gated" in message
    assert "dataset=" in message


def test_task_mismatch_is_refused_before_downloading(tmp_path: Path, rating, monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_download(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("downloaded although the task does not fit")

    monkeypatch.setattr(datasets, "load_dataset", must_not_download)
    with pytest.raises(ValueError, match=r"label 6 does not fit task 'rating'.*1-7"):
        load_hub_dataset("imagereward", rating, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="no column for the text field"):
        load_hub_dataset("unsafebench", rating, cache_dir=tmp_path)


def test_pairwise_spec_with_text_column_and_image_paths(tmp_path: Path, preference, make_image) -> None:
    a = make_image(tmp_path / "src" / "a.png", (10, 10, 10))
    b = make_image(tmp_path / "src" / "b.png", (240, 240, 240))
    ds = datasets.Dataset.from_dict(
        {"left": [str(a)], "right": [str(b)], "caption": ["two squares"], "winner": [1], "uid": ["p-1"]}
    )
    ds = ds.cast_column("left", datasets.Image()).cast_column("right", datasets.Image())
    spec = HubDatasetSpec(
        name="pairs",
        repo_id="local/pairs",
        config=None,
        split="train",
        image_columns=("left", "right"),
        label_column="winner",
        text_columns={"prompt": "caption"},
        label_transform=lambda v: "A" if v == 1 else "B",
        id_column="uid",
    )

    (example,) = examples_from_hf_dataset(ds, spec, preference, tmp_path / "img")

    assert (example.id, example.label, example.prompt) == ("p-1", "A", "two squares")
    assert example.image_a.read_bytes() == a.read_bytes() and example.image_b.read_bytes() == b.read_bytes()
    assert example.image_a.path.parent == tmp_path / "img"


def test_label_transform_can_drop_rows(tmp_path: Path, alignment) -> None:
    ds = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": RED, "path": None}] * 3,
            "prompt": ["a", "b", "c"],
            "mos_align": [3.4, 2.5, 1.0],
            "mos_quality": [1.0, 2.0, 3.0],
        }
    ).cast_column("image", datasets.Image())

    examples = examples_from_hf_dataset(ds, hub_dataset_spec("agiqa3k"), alignment, tmp_path / "img")

    assert [(e.id, e.prompt, e.label) for e in examples] == [
        ("agiqa3k-train-1", "a", "yes"),
        ("agiqa3k-train-3", "c", "no"),
    ]


def _one_row(image: Any, label: str = "Safe") -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"image": [{"bytes": RED, "path": None}, image], "safety_label": ["Safe", label]}
    ).cast_column("image", datasets.Image())


def test_bad_rows_are_named_by_repo_split_row_and_column(tmp_path: Path, safety, assert_names) -> None:
    spec = hub_dataset_spec("unsafebench")
    source = "yiting/UnsafeBench [train]"
    cases = [
        (_one_row(None), "image", "row has no image"),
        (_one_row({"bytes": b"garbage", "path": None}), "image", "not a readable image"),
        (_one_row({"bytes": b"", "path": None}), "image", "0 bytes"),
        (_one_row({"bytes": BLUE, "path": None}, label="Harmful"), "safety_label", "'harmful'"),
    ]
    for ds, field, problem in cases:
        with pytest.raises(DataError) as info:
            examples_from_hf_dataset(ds, spec, safety, tmp_path / "img")
        assert_names(info.value, file=source, row=2, field=field)
        assert problem in str(info.value)


def test_missing_column_and_non_image_column(tmp_path: Path, safety, assert_names) -> None:
    spec = hub_dataset_spec("unsafebench")
    no_label = datasets.Dataset.from_dict({"image": [{"bytes": RED, "path": None}]}).cast_column(
        "image", datasets.Image()
    )
    with pytest.raises(DataError) as info:
        examples_from_hf_dataset(no_label, spec, safety, tmp_path / "img")
    assert_names(info.value, file="yiting/UnsafeBench [train]", row=0, field="safety_label")

    strings = datasets.Dataset.from_dict({"image": ["x.png"], "safety_label": ["Safe"]})
    with pytest.raises(DataError) as info:
        examples_from_hf_dataset(strings, spec, safety, tmp_path / "img")
    assert_names(info.value, file="yiting/UnsafeBench [train]", row=0, field="image")
    assert "not datasets.Image" in str(info.value)


def test_known_specs_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(HUB_DATASET_NAMES) == {"imagereward", "seetrue", "unsafebench", "agin", "agiqa3k"}
    repos = {name: hub_dataset_spec(name).repo_id for name in HUB_DATASET_NAMES}
    assert repos["imagereward"] == "THUDM/ImageRewardDB"
    assert repos["seetrue"] == "yonatanbitton/SeeTRUE"
    assert repos["unsafebench"] == "yiting/UnsafeBench"
    assert not hub_dataset_spec("agin").verified
    monkeypatch.setattr(hub, "AGIN_REPO_ID", "me/agin-copy")
    assert hub_dataset_spec("agin").repo_id == "me/agin-copy"
    assert spec_with("agin", label_column="mos").label_column == "mos"
    with pytest.raises(ValueError, match="unknown Hub dataset"):
        hub_dataset_spec("coco")
