"""Class-subfolder datasets: labels from folder names, ids from relative paths, bad input named."""

from __future__ import annotations

from pathlib import Path

import pytest

from blpo_dspy.data import DataError, load_folder
from blpo_dspy.images import LazyImage


def test_folder_labels_from_subfolders(tmp_path: Path, make_image, safety) -> None:
    root = tmp_path / "ads"
    make_image(root / "safe" / "b.png", (0, 200, 0))
    make_image(root / "safe" / "a.jpg", (0, 100, 0), fmt="JPEG")
    make_image(root / "unsafe" / "nested" / "c.webp", (200, 0, 0), fmt="WEBP")
    (root / "README.txt").write_text("not an image", encoding="utf-8")
    make_image(root / "safe" / ".hidden.png")

    examples = load_folder(root, safety)

    assert [(e.id, e.label) for e in examples] == [
        ("safe/a.jpg", "safe"),
        ("safe/b.png", "safe"),
        ("unsafe/nested/c.webp", "unsafe"),
    ]
    assert all(isinstance(e.image, LazyImage) and len(e.image_sha256) == 64 for e in examples)
    assert set(examples[0].inputs().keys()) == {"image"}


def test_folder_ordinal_levels_and_label_map(tmp_path: Path, make_image, naturalness) -> None:
    root = tmp_path / "levels"
    make_image(root / "1" / "x.png")
    make_image(root / "great" / "y.png")

    examples = load_folder(root, naturalness, label_map={"great": 5})

    assert [e.label for e in examples] == [1, 5]


def test_folder_that_is_not_a_label(tmp_path: Path, make_image, safety, assert_names) -> None:
    root = tmp_path / "ads"
    make_image(root / "safe" / "a.png")
    make_image(root / "maybe" / "b.png")
    with pytest.raises(DataError) as info:
        load_folder(root, safety)
    assert_names(info.value, file="maybe/b.png", row=1, field="label")
    assert "'maybe'" in str(info.value)


def test_image_outside_any_class_folder(tmp_path: Path, make_image, safety, assert_names) -> None:
    root = tmp_path / "ads"
    make_image(root / "safe" / "a.png")
    make_image(root / "stray.png")
    with pytest.raises(DataError) as info:
        load_folder(root, safety)
    assert_names(info.value, file="stray.png", row=2, field="label")
    assert "not inside a class subfolder" in str(info.value)


def test_broken_images_and_escaping_symlinks_in_a_folder(tmp_path: Path, make_image, safety, assert_names) -> None:
    root = tmp_path / "ads"
    make_image(root / "safe" / "a.png")
    (root / "safe" / "b.png").write_bytes(b"")
    (root / "unsafe").mkdir()
    (root / "unsafe" / "c.png").symlink_to(make_image(tmp_path / "private" / "c.png"))
    with pytest.raises(DataError) as info:
        load_folder(root, safety)
    errors = info.value.errors
    assert len(errors) == 2
    assert_names(errors[0], file="safe/b.png", row=2, field="image")
    assert "0 bytes" in str(errors[0])
    assert_names(errors[1], file="unsafe/c.png", row=3, field="image")
    assert "outside the image root" in str(errors[1])


def test_folder_refuses_tasks_it_cannot_serve(tmp_path: Path, make_image, alignment, preference, safety) -> None:
    make_image(tmp_path / "yes" / "a.png")
    with pytest.raises(ValueError, match="text fields"):
        load_folder(tmp_path, alignment)
    with pytest.raises(ValueError, match="two images"):
        load_folder(tmp_path, preference)
    empty = tmp_path / "empty"
    (empty / "safe").mkdir(parents=True)
    with pytest.raises(DataError, match="no image files"):
        load_folder(empty, safety)
