"""CSV / JSONL manifests: example shape, column options, and every kind of bad input named by file, row, field."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import dspy
import pytest
from PIL import Image

from blpo_dspy.data import DataError, canonical_label, load_manifest
from blpo_dspy.data.manifest import MAX_JSON_DEPTH
from blpo_dspy.images import LazyImage
from blpo_dspy.task import LabelError


@pytest.fixture
def images(tmp_path: Path, make_image) -> Path:
    """``tmp_path/data/images`` with red.png, blue.png, green.jpg."""
    root = tmp_path / "data" / "images"
    make_image(root / "red.png", (255, 0, 0))
    make_image(root / "blue.png", (0, 0, 255))
    make_image(root / "green.jpg", (0, 255, 0))
    return root


def _good_rows() -> list[list[str]]:
    return [
        ["a1", "images/red.png", "a red square", "yes"],
        ["a2", "images/blue.png", "a green square", "no"],
        ["a3", "images/green.jpg", "a green square", "YES"],
    ]


# ---------------------------------------------------------------------------------------------- happy paths


def test_csv_manifest_builds_lazy_examples_with_digests(images: Path, alignment, write_csv) -> None:
    manifest = write_csv(images.parent / "train.csv", ["id", "image", "prompt", "label"], _good_rows())

    examples = load_manifest(manifest, alignment)

    assert [e.id for e in examples] == ["a1", "a2", "a3"]
    assert [e.label for e in examples] == ["yes", "no", "yes"]  # "YES" is canonicalised
    first = examples[0]
    assert isinstance(first, dspy.Example)
    assert set(first.inputs().keys()) == {"image", "prompt"}
    assert set(first.labels().keys()) == {"id", "label", "image_sha256"}
    assert isinstance(first.image, LazyImage)
    assert first.prompt == "a red square"
    expected = hashlib.sha256((images / "red.png").read_bytes()).hexdigest()
    assert first.image_sha256 == expected == first.image.sha256
    assert first.image.read_bytes() == (images / "red.png").read_bytes()


def test_jsonl_manifest_with_custom_columns_and_label_map(images: Path, alignment, write_jsonl) -> None:
    rows = [
        {"key": "x", "path": "red.png", "caption": "red", "verdict": 1},
        {"key": "y", "path": "blue.png", "caption": "blue", "verdict": 0},
    ]
    manifest = write_jsonl(images.parent / "meta" / "set.jsonl", rows)

    examples = load_manifest(
        manifest,
        alignment,
        image_root=images,
        image_column="path",
        text_columns={"prompt": "caption"},
        label_column="verdict",
        id_column="key",
        label_map={1: "yes", 0: "no"},
    )

    assert [(e.id, e.prompt, e.label) for e in examples] == [("x", "red", "yes"), ("y", "blue", "no")]
    assert examples[1].image.path.name == "blue.png"


def test_tsv_with_bom_and_no_id_column_uses_row_numbers(images: Path, safety, write_csv) -> None:
    manifest = images.parent / "set.tsv"
    write_csv(manifest, ["image", "label"], [["images/red.png", "unsafe"], ["images/blue.png", "safe"]], "\t")
    manifest.write_bytes(b"\xef\xbb\xbf" + manifest.read_bytes())

    examples = load_manifest(manifest, safety)

    assert [(e.id, e.label) for e in examples] == [("1", "unsafe"), ("2", "safe")]
    assert set(examples[0].inputs().keys()) == {"image"}


def test_pairwise_manifest(images: Path, preference, write_csv) -> None:
    manifest = write_csv(
        images.parent / "pairs.csv",
        ["left", "right", "prompt", "label"],
        [["images/red.png", "images/blue.png", "a red square", "A"], ["images/blue.png", "images/red.png", "p", "b"]],
    )

    examples = load_manifest(manifest, preference, image_column=["left", "right"])

    assert [e.label for e in examples] == ["A", "B"]
    assert examples[0].image_a.path.name == "red.png" and examples[0].image_b.path.name == "blue.png"
    assert examples[1].image_a_sha256 == examples[0].image_b_sha256
    assert set(examples[0].inputs().keys()) == {"image_a", "image_b", "prompt"}


def test_extra_columns_are_copied_but_not_inputs(images: Path, alignment, write_csv) -> None:
    manifest = write_csv(
        images.parent / "m.csv", ["image", "prompt", "label", "generator"], [["images/red.png", "p", "yes", "sd"]]
    )

    (example,) = load_manifest(manifest, alignment, extra_columns=["generator"])

    assert example.generator == "sd"
    assert "generator" not in example.inputs().keys()


def test_ordinal_labels_accept_integral_numbers_only(images: Path, naturalness, write_csv) -> None:
    manifest = write_csv(
        images.parent / "n.csv", ["image", "label"], [["images/red.png", "4.0"], ["images/blue.png", "2"]]
    )
    assert [e.label for e in load_manifest(manifest, naturalness)] == [4, 2]
    with pytest.raises(LabelError):
        canonical_label(naturalness, "4/5")
    with pytest.raises(LabelError):
        canonical_label(naturalness, "3.5")


def test_free_text_labels_are_refused_although_the_lm_parser_would_accept_them(alignment) -> None:
    assert alignment.parse_label("maybe yes") == "yes"  # lenient parser for LM outputs
    with pytest.raises(LabelError, match="outside the label space"):
        canonical_label(alignment, "maybe yes")
    assert canonical_label(alignment, "aligned") == "yes"  # an alias
    assert canonical_label(alignment, 0) == "no"


# ---------------------------------------------------------------------------------------------- bad input


def _manifest_with(
    images: Path, write_csv, image: str, *, prompt: str = "p", label: str = "yes", good_label: str = "yes"
) -> Path:
    rows = [["ok", "images/red.png", "p", good_label], ["bad", image, prompt, label]]
    return write_csv(images.parent / "train.csv", ["id", "image", "prompt", "label"], rows)


def _load_error(manifest: Path, task, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        load_manifest(manifest, task, **kwargs)
    return info.value


def test_missing_image(images: Path, alignment, write_csv, assert_names) -> None:
    err = _load_error(_manifest_with(images, write_csv, "images/nope.png"), alignment)
    assert_names(err, file="train.csv", row=2, field="image")
    assert "does not exist" in str(err) and "images/nope.png" in str(err)


def test_image_path_that_is_a_directory(images: Path, alignment, write_csv, assert_names) -> None:
    (images / "folder.png").mkdir()
    err = _load_error(_manifest_with(images, write_csv, "images/folder.png"), alignment)
    assert_names(err, file="train.csv", row=2, field="image")
    assert "not a regular file" in str(err)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read files without permission")
def test_unreadable_image(images: Path, alignment, write_csv, assert_names) -> None:
    locked = images / "locked.png"
    locked.write_bytes((images / "red.png").read_bytes())
    locked.chmod(0)
    try:
        err = _load_error(_manifest_with(images, write_csv, "images/locked.png"), alignment)
    finally:
        locked.chmod(0o644)
    assert_names(err, file="train.csv", row=2, field="image")
    assert "cannot read" in str(err)


def test_corrupt_image(images: Path, alignment, write_csv, assert_names) -> None:
    (images / "corrupt.png").write_bytes(b"this is not an image at all")
    err = _load_error(_manifest_with(images, write_csv, "images/corrupt.png"), alignment)
    assert_names(err, file="train.csv", row=2, field="image")
    assert "not a readable image" in str(err)


def test_zero_byte_image(images: Path, alignment, write_csv, assert_names) -> None:
    (images / "empty.png").write_bytes(b"")
    err = _load_error(_manifest_with(images, write_csv, "images/empty.png"), alignment)
    assert_names(err, file="train.csv", row=2, field="image")
    assert "0 bytes" in str(err)


def test_truncated_image(images: Path, alignment, write_csv, assert_names) -> None:
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buffer, format="JPEG")
    data = buffer.getvalue()
    (images / "cut.jpg").write_bytes(data[: len(data) // 2])
    err = _load_error(_manifest_with(images, write_csv, "images/cut.jpg"), alignment)
    assert_names(err, file="train.csv", row=2, field="image")
    assert "not a readable image" in str(err)


def test_decompression_bomb(images: Path, alignment, write_csv, make_image, assert_names) -> None:
    make_image(images / "big.png", size=(100, 100))
    err = _load_error(_manifest_with(images, write_csv, "images/big.png"), alignment, max_pixels=5_000)
    assert_names(err, file="train.csv", row=2, field="image")
    assert "10,000 pixels exceeds the limit of 5,000" in str(err)


def test_label_outside_the_task_space(images: Path, alignment, write_csv, assert_names) -> None:
    err = _load_error(_manifest_with(images, write_csv, "images/blue.png", label="maybe"), alignment)
    assert_names(err, file="train.csv", row=2, field="label")
    assert "'maybe'" in str(err) and "yes, no" in str(err)


def test_empty_label(images: Path, alignment, write_csv, assert_names) -> None:
    err = _load_error(_manifest_with(images, write_csv, "images/blue.png", label=" "), alignment)
    assert_names(err, file="train.csv", row=2, field="label")
    assert "label is empty" in str(err)


def test_ordinal_label_out_of_range(images: Path, rating, write_csv, assert_names) -> None:
    err = _load_error(_manifest_with(images, write_csv, "images/blue.png", label="7", good_label="3"), rating)
    assert_names(err, file="train.csv", row=2, field="label")
    assert "1 to 5" in str(err)


def test_missing_column_in_csv_header(images: Path, alignment, write_csv, assert_names) -> None:
    manifest = write_csv(images.parent / "train.csv", ["id", "image", "label"], [["a", "images/red.png", "yes"]])
    err = _load_error(manifest, alignment)
    assert_names(err, file="train.csv", row=0, field="prompt")
    assert "column 'prompt' is missing" in str(err) and "id, image, label" in str(err)


def test_missing_key_in_a_jsonl_row(images: Path, alignment, write_jsonl, assert_names) -> None:
    rows = [{"image": "red.png", "prompt": "p", "label": "yes"}, {"image": "blue.png", "label": "no"}]
    manifest = write_jsonl(images / "set.jsonl", rows)
    err = _load_error(manifest, alignment)
    assert_names(err, file="set.jsonl", row=2, field="prompt")
    assert "missing" in str(err)


def test_duplicate_ids(images: Path, alignment, write_csv, assert_names) -> None:
    rows = [
        ["a", "images/red.png", "p", "yes"],
        ["b", "images/blue.png", "p", "no"],
        ["a", "images/green.jpg", "p", "no"],
    ]
    manifest = write_csv(images.parent / "train.csv", ["id", "image", "prompt", "label"], rows)
    err = _load_error(manifest, alignment)
    assert_names(err, file="train.csv", row=3, field="id")
    assert "duplicate id 'a' (first used in row 1)" in str(err)


@pytest.mark.parametrize("path", ["../outside.png", "images/../../outside.png", "images/..\\..\\outside.png"])
def test_path_with_dotdot_is_refused(images: Path, alignment, write_csv, make_image, assert_names, path: str) -> None:
    make_image(images.parent.parent / "outside.png")
    err = _load_error(_manifest_with(images, write_csv, path), alignment)
    assert_names(err, file="train.csv", row=2, field="image")
    assert "'..'" in str(err)


@pytest.mark.parametrize("path", ["/etc/passwd", "C:\\images\\x.png", "\\\\server\\share\\x.png"])
def test_absolute_path_is_refused(images: Path, alignment, write_csv, assert_names, path: str) -> None:
    err = _load_error(_manifest_with(images, write_csv, path), alignment)
    assert_names(err, file="train.csv", row=2, field="image")
    assert "absolute" in str(err)


def test_symlink_resolving_outside_the_root_is_refused(
    tmp_path: Path, images: Path, alignment, write_csv, make_image, assert_names
) -> None:
    secret = make_image(tmp_path / "elsewhere" / "secret.png")
    (images / "link.png").symlink_to(secret)
    (images / "linkdir").symlink_to(secret.parent, target_is_directory=True)
    manifest = write_csv(
        images.parent / "train.csv",
        ["id", "image", "prompt", "label"],
        [["a", "images/link.png", "p", "yes"], ["b", "images/linkdir/secret.png", "p", "no"]],
    )
    err = _load_error(manifest, alignment)
    assert [(e.row, e.field) for e in err.errors] == [(1, "image"), (2, "image")]
    assert_names(err.errors[1], file="train.csv", row=2, field="image")
    assert "outside the image root" in str(err)


def test_symlink_inside_the_root_is_fine(images: Path, alignment, write_csv) -> None:
    (images / "alias.png").symlink_to(images / "red.png")
    manifest = write_csv(images.parent / "t.csv", ["image", "prompt", "label"], [["images/alias.png", "p", "yes"]])
    (example,) = load_manifest(manifest, alignment)
    assert example.image_sha256 == hashlib.sha256((images / "red.png").read_bytes()).hexdigest()


def test_empty_text_field(images: Path, alignment, write_csv, assert_names) -> None:
    err = _load_error(_manifest_with(images, write_csv, "images/blue.png", prompt="   "), alignment)
    assert_names(err, file="train.csv", row=2, field="prompt")
    assert "text field 'prompt' is empty" in str(err)


def test_empty_text_in_a_mapped_column_names_the_column(images: Path, alignment, write_jsonl, assert_names) -> None:
    manifest = write_jsonl(images / "s.jsonl", [{"image": "red.png", "caption": None, "label": "yes"}])
    err = _load_error(manifest, alignment, text_columns={"prompt": "caption"})
    assert_names(err, file="s.jsonl", row=1, field="caption")


def test_non_utf8_csv_names_the_cell(images: Path, alignment, assert_names) -> None:
    manifest = images.parent / "latin1.csv"
    text = "id,image,prompt,label\na,images/red.png,caf\xe9 au lait,yes\nb,images/blue.png,na\xefve,no\n"
    manifest.write_bytes(text.encode("latin-1"))
    err = _load_error(manifest, alignment)
    assert_names(err, file="latin1.csv", row=1, field="prompt")
    assert "not UTF-8 (byte 0xE9)" in str(err) and "2 problems" in str(err)


def test_non_utf8_jsonl(images: Path, alignment, assert_names) -> None:
    manifest = images / "bad.jsonl"
    manifest.write_bytes(b'{"image": "red.png", "prompt": "caf\xe9", "label": "yes"}\n')
    err = _load_error(manifest, alignment)
    assert_names(err, file="bad.jsonl", row=1, field="prompt")
    assert "not UTF-8" in str(err)


def test_row_with_wrong_number_of_cells(images: Path, alignment, assert_names) -> None:
    manifest = images.parent / "short.csv"
    manifest.write_text("image,prompt,label\nimages/red.png,p,yes\nimages/blue.png,p\n", encoding="utf-8")
    err = _load_error(manifest, alignment)
    assert_names(err, file="short.csv", row=2, field=None)
    assert "2 cells but the header has 3 columns" in str(err)


def test_invalid_json_line(images: Path, alignment, assert_names) -> None:
    manifest = images / "broken.jsonl"
    manifest.write_text('{"image": "red.png", "prompt": "p", "label": "yes"}\n\n{"image": \n', encoding="utf-8")
    err = _load_error(manifest, alignment)
    assert_names(err, file="broken.jsonl", row=2, field=None)
    assert "not valid JSON" in str(err)


def test_duplicate_header_and_empty_file(images: Path, alignment, assert_names) -> None:
    dup = images.parent / "dup.csv"
    dup.write_text("image,prompt,image,label\n", encoding="utf-8")
    assert_names(_load_error(dup, alignment), file="dup.csv", row=0, field="image")
    empty = images.parent / "empty.csv"
    empty.write_text("", encoding="utf-8")
    assert "file is empty" in str(_load_error(empty, alignment))
    header_only = images.parent / "header.csv"
    header_only.write_text("image,prompt,label\n", encoding="utf-8")
    assert "no data rows" in str(_load_error(header_only, alignment))


def test_all_bad_rows_are_collected_in_one_error(images: Path, alignment, write_csv) -> None:
    rows = [["images/red.png", "p", "yes"]] + [[f"images/missing{i}.png", "p", "yes"] for i in range(14)]
    rows.append(["images/blue.png", "", "no"])
    manifest = write_csv(images.parent / "many.csv", ["image", "prompt", "label"], rows)
    err = _load_error(manifest, alignment)
    assert len(err.errors) == 15
    assert (err.file, err.row, err.field) == ("many.csv", 2, "image")  # the first problem
    message = str(err)
    assert message.startswith("15 problems in many.csv of 16 rows (showing the first 10):")
    assert "many.csv, row 2, field 'image'" in message and "... and 5 more" in message
    assert err.errors[-1].row == 16 and err.errors[-1].field == "prompt"


def test_error_messages_never_show_absolute_paths(tmp_path: Path, images: Path, alignment, write_csv) -> None:
    err = _load_error(_manifest_with(images, write_csv, "images/nope.png"), alignment)
    assert str(tmp_path) not in str(err)
    missing = tmp_path / "nowhere" / "x.csv"
    with pytest.raises(FileNotFoundError) as info:
        load_manifest(missing, alignment)
    assert str(tmp_path) not in str(info.value)


def test_unsupported_suffix_and_bad_column_arguments(images: Path, alignment, preference) -> None:
    other = images.parent / "m.xlsx"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported manifest type"):
        load_manifest(other, alignment)
    manifest = images.parent / "m.csv"
    manifest.write_text("image,prompt,label\n", encoding="utf-8")
    with pytest.raises(ValueError, match="image fields"):
        load_manifest(manifest, preference, image_column="image")
    with pytest.raises(ValueError, match="not text fields"):
        load_manifest(manifest, alignment, text_columns={"caption": "c"})


def test_label_map_with_int_keys_maps_csv_strings(images: Path, alignment, write_csv) -> None:
    manifest = write_csv(images.parent / "m.csv", ["image", "prompt", "label"], [["images/red.png", "p", "0"]])
    (example,) = load_manifest(manifest, alignment, label_map={0: "no", 1: "yes"})
    assert example.label == "no"
    (example,) = load_manifest(manifest, alignment, label_map={"0": "yes"})
    assert example.label == "yes"


def test_an_explicitly_named_id_column_must_exist(images: Path, alignment, write_csv, assert_names) -> None:
    manifest = write_csv(images.parent / "m.csv", ["image", "prompt", "label"], [["images/red.png", "p", "yes"]])
    err = _load_error(manifest, alignment, id_column="uid")
    assert_names(err, file="m.csv", row=0, field="uid")
    assert [e.id for e in load_manifest(manifest, alignment, id_column=None)] == ["1"]


# ---------------------------------------------------------------------------------------------- regressions (fuzzing)


def _jsonl_bytes(*lines: str) -> bytes:
    return "\n".join(lines).encode("utf-8", errors="surrogatepass")


def test_jsonl_strings_may_hold_unicode_line_separators(images: Path, alignment) -> None:
    # str.splitlines() used to cut these lines at U+2028 / U+0085 / VT inside the JSON strings.
    prompt = "two\u2028lines\u0085and\x0ba\x1cfile separator"
    row = json.dumps({"image": "red.png", "prompt": prompt, "label": "yes"}, ensure_ascii=False)
    manifest = images / "seps.jsonl"
    manifest.write_bytes(_jsonl_bytes(row, row.replace("red.png", "blue.png")) + b"\r\n")

    examples = load_manifest(manifest, alignment)

    assert [e.prompt for e in examples] == [prompt, prompt] and [e.id for e in examples] == ["1", "2"]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"image": "red.png", "prompt": "p", "label": ' + "1" * 5000 + "}", "a number is too long"),
        ('{"a": ' * 3000 + "1" + "}" * 3000, "nested too deeply"),
    ],
    ids=["int-over-4300-digits", "nesting-beyond-recursion-limit"],
)
def test_jsonl_lines_python_cannot_parse_are_row_errors(images: Path, alignment, assert_names, line, problem) -> None:
    # json.loads raised ValueError / RecursionError here, escaping as a crash instead of a DataError.
    good = json.dumps({"image": "red.png", "prompt": "p", "label": "yes"})
    manifest = images / "huge.jsonl"
    manifest.write_bytes(_jsonl_bytes(good, line))
    err = _load_error(manifest, alignment)
    assert_names(err, file="huge.jsonl", row=2, field=None)
    assert problem in str(err) and len(str(err)) < 200


def test_jsonl_values_nested_too_deeply_name_the_key(images: Path, alignment, assert_names) -> None:
    deep: list = []
    for _ in range(MAX_JSON_DEPTH):
        deep = [deep]  # MAX_JSON_DEPTH + 1 levels
    manifest = images / "deep.jsonl"
    manifest.write_text(json.dumps({"image": "red.png", "prompt": "p", "label": "yes", "meta": deep}) + "\n")
    err = _load_error(manifest, alignment)
    assert_names(err, file="deep.jsonl", row=1, field="meta")
    assert f"nested more than {MAX_JSON_DEPTH} levels" in str(err)
    manifest.write_text(json.dumps({"image": "red.png", "prompt": "p", "label": "yes", "meta": deep[0]}) + "\n")
    assert len(load_manifest(manifest, alignment)) == 1  # exactly the limit is fine


@pytest.mark.parametrize("field", ["image", "prompt", "label", "id", "meta"])
def test_jsonl_lone_surrogate_escapes_are_refused_naming_the_key(images: Path, alignment, assert_names, field) -> None:
    # "\ud800" is valid JSON but no valid text: it crashed os.stat (image) or would crash the LM request (prompt).
    row = {"id": "a", "image": "red.png", "prompt": "p", "label": "yes", field: "x\ud800.png"}
    manifest = images / "surrogate.jsonl"
    manifest.write_text(json.dumps(row) + "\n", encoding="utf-8")  # ensure_ascii: written as the escape \ud800
    err = _load_error(manifest, alignment)
    assert_names(err, file="surrogate.jsonl", row=1, field=field)
    assert "lone surrogate" in str(err)
    str(err).encode("utf-8")


def test_non_utf8_bytes_nested_in_a_jsonl_value_name_the_key(images: Path, alignment, assert_names) -> None:
    manifest = images / "nested.jsonl"
    manifest.write_bytes(b'{"image": "red.png", "prompt": "p", "label": "yes", "tags": ["ok", {"k": "caf\xe9"}]}\n')
    err = _load_error(manifest, alignment)
    assert_names(err, file="nested.jsonl", row=1, field="tags")
    assert "not UTF-8 (byte 0xE9)" in str(err)


@pytest.mark.parametrize("value", [[1, 2], {"id": 1}, True])
def test_jsonl_id_must_be_a_string_or_a_number(images: Path, alignment, assert_names, value) -> None:
    # A list used to become the id "[1, 2]".
    manifest = images / "ids.jsonl"
    manifest.write_text(json.dumps({"id": value, "image": "red.png", "prompt": "p", "label": "yes"}) + "\n")
    err = _load_error(manifest, alignment)
    assert_names(err, file="ids.jsonl", row=1, field="id")
    assert f"got {type(value).__name__}" in str(err)
    manifest.write_text(json.dumps({"id": 7, "image": "red.png", "prompt": "p", "label": "yes"}) + "\n")
    assert [e.id for e in load_manifest(manifest, alignment)] == ["7"]


def test_ordinal_label_too_large_for_a_float_is_a_label_error(images: Path, rating, assert_names) -> None:
    # float(10**400) raised OverflowError inside Task.validate_label.
    manifest = images / "big.jsonl"
    manifest.write_text(json.dumps({"image": "red.png", "prompt": "p", "label": 10**400}) + "\n")
    err = _load_error(manifest, rating)
    assert_names(err, file="big.jsonl", row=1, field="label")
    assert "outside the label space" in str(err) and len(str(err)) < 250
    with pytest.raises(LabelError, match="outside the label space"):
        canonical_label(rating, -(10**400))


def test_label_too_long_to_print_is_a_label_error(alignment, rating) -> None:
    huge = 10**5000  # str() refuses ints over 4300 digits (possible from in-memory rows such as HF datasets)
    for task in (alignment, rating):
        with pytest.raises(LabelError) as info:
            canonical_label(task, huge)
        assert "<int>" in str(info.value)


def test_error_messages_cut_long_values(images: Path, alignment, write_csv) -> None:
    err = _load_error(_manifest_with(images, write_csv, "images/red.png", label="n" * 5000), alignment)
    assert "nnnn" in str(err) and len(str(err)) < 300


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_symlink_loop_is_a_data_error(images: Path, alignment, assert_names, suffix) -> None:
    # Path.resolve() raised RuntimeError("Symlink loop") on Python < 3.13.
    (images / "loop.png").symlink_to(images / "loop.png")
    (images / "ping.png").symlink_to(images / "pong.png")
    (images / "pong.png").symlink_to(images / "ping.png")
    manifest = images / f"loops.{suffix}"
    rows = [("red.png", "yes"), ("loop.png", "yes"), ("ping.png", "no")]
    if suffix == "csv":
        manifest.write_text("image,prompt,label\n" + "".join(f"{i},p,{lab}\n" for i, lab in rows), encoding="utf-8")
    else:
        manifest.write_text("".join(json.dumps({"image": i, "prompt": "p", "label": lab}) + "\n" for i, lab in rows))
    err = _load_error(manifest, alignment)
    assert [(e.row, e.field) for e in err.errors] == [(2, "image"), (3, "image")]
    assert_names(err.errors[0], file=f"loops.{suffix}", row=2, field="image")
    assert "symlink loop" in str(err)


def test_manifest_name_with_undecodable_bytes_is_printable(tmp_path: Path, make_image, alignment) -> None:
    make_image(tmp_path / "red.png")
    manifest = tmp_path / os.fsdecode(b"caf\xe9.csv")
    manifest.write_text("image,prompt,label\nred.png,p,maybe\n", encoding="utf-8")
    err = _load_error(manifest, alignment)
    assert err.file == "caf\ufffd.csv"
    str(err).encode("utf-8")


@pytest.mark.parametrize("raw", [False, True], ids=["escaped", "raw-bytes"])
def test_jsonl_key_that_is_no_valid_text_is_named_printably(images: Path, alignment, raw: bool) -> None:
    # _printable() raised UnicodeEncodeError for a "\ud800" key (only U+DC80..U+DCFF survive surrogateescape).
    row = json.dumps({"image": "red.png", "prompt": "p", "label": "yes", "\ud800k": 1}, ensure_ascii=not raw)
    manifest = images / "key.jsonl"
    manifest.write_bytes(row.encode("utf-8", errors="surrogatepass") + b"\n")
    err = _load_error(manifest, alignment)
    assert (err.row, err.field is not None) == (1, True)
    assert err.field.strip("\ufffd") == "k" and "\ufffd" in err.field
    str(err).encode("utf-8")
