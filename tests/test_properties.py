"""Property-based tests: hostile task cards and manifests give a clear error of the documented type, never a crash.

Covers the reliability/security properties of the loaders:

1. ``Task.load`` / ``Task.from_dict`` on arbitrary TOML text, non-UTF-8 bytes and arbitrary nested mappings either
   return a :class:`Task` or raise :class:`TaskCardError` naming the file and a key.
2. ``load_manifest`` on random CSV content (path traversal, absolute paths, empty cells, long strings, non-UTF-8
   bytes) over an image root holding good, empty and truncated images and a symlink leading outside either
   returns examples whose images all resolve inside the root, or raises :class:`DataError` naming file, row and
   field.
3. A failing load leaves the files already in a run directory byte-identical.
4. ``load_manifest`` on JSONL manifests (single-image ``alignment`` and pairwise ``preference`` tasks) and on
   pairwise CSV manifests, checked against a model: every value is drawn with its known verdict (wrong types,
   missing keys, huge strings, NUL bytes, lone surrogates, deep nesting, huge numbers, path traversal, absolute
   paths, symlinks out of the root, symlink loops, zero-byte, truncated and decompression-bomb images), and the
   load must return exactly the modelled examples, or raise :class:`DataError` with one error per bad row naming
   that row and a field that really is wrong in it. Lines broken at the byte level (malformed JSON, non-object
   lines, spliced non-UTF-8 and NUL bytes) must still give valid examples or a located ``DataError``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import struct
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from blpo_dspy.data import DataError, load_manifest
from blpo_dspy.data.manifest import MAX_JSON_DEPTH
from blpo_dspy.images import LazyImage
from blpo_dspy.task import _ALLOWED_KEYS, Task, TaskCardError

FIXTURE_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# ---------------------------------------------------------------------------------------------- task cards

_CARD_KEYS = sorted(_ALLOWED_KEYS)  # the schema itself, not a copy of it
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(["yes", "no", "binary", "ordinal", "categorical", "pairwise", "image", "prompt", "x" * 5000]),
)
# Empty keys are left to the explicit regression test below, so the property keeps finding other problems.
_string_keys = st.one_of(
    st.sampled_from([*_CARD_KEYS, "judge", "verbalizer", "min", "max"]), st.text(min_size=1, max_size=8)
)
_values = st.recursive(
    _scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(_string_keys, children, max_size=4)),
    max_leaves=12,
)
_cards = st.dictionaries(_string_keys, _values, max_size=len(_CARD_KEYS))


def _valid_card() -> dict[str, Any]:
    return Task.load("alignment").to_dict()


def _assert_card_error(exc: TaskCardError, source: str) -> None:
    assert exc.source == source
    assert isinstance(exc.key, str) and exc.key
    assert source in str(exc)


@FIXTURE_SETTINGS
@given(card=_cards)
def test_from_dict_on_arbitrary_mappings_returns_task_or_task_card_error(card: dict[str, Any]) -> None:
    try:
        task = Task.from_dict(card, source="fuzz.toml")
    except TaskCardError as exc:
        _assert_card_error(exc, "fuzz.toml")
    else:
        assert isinstance(task, Task) and task.labels


@FIXTURE_SETTINGS
@given(key=st.sampled_from(_CARD_KEYS), value=_values, drop=st.booleans())
def test_from_dict_with_one_corrupted_key_returns_task_or_names_an_error(key: str, value: Any, drop: bool) -> None:
    card = _valid_card()
    if drop:
        card.pop(key, None)
    else:
        card[key] = value
    try:
        task = Task.from_dict(card, source="one.toml")
    except TaskCardError as exc:
        event("TaskCardError")
        _assert_card_error(exc, "one.toml")
    else:
        event("Task")
        assert task.name and task.labels and task.judge_instruction


_toml_lines = st.lists(
    st.one_of(
        st.sampled_from(
            [
                'name = "alignment"',
                "kind = 'binary'",
                'labels = ["yes", "no"]',
                "[instructions]",
                "[[text_inputs]]",
                "scale = { min = 1, max = 5 }",
                'judge = "x"',
                "= broken",
                '"unterminated',
                "[[",
                "name = 1979-05-27T07:32:00Z",
                "a.b.c = 1",
            ]
        ),
        st.text(max_size=40),
    ),
    max_size=12,
)


@FIXTURE_SETTINGS
@given(
    lines=_toml_lines,
    junk=st.binary(max_size=40),
    mode=st.sampled_from(["text", "text+bytes", "bytes"]),
)
def test_load_on_arbitrary_toml_files_returns_task_or_task_card_error(
    tmp_path: Path, lines: list[str], junk: bytes, mode: str
) -> None:
    path = tmp_path / "hostile card.toml"
    text = "\n".join(lines).encode("utf-8", errors="surrogatepass")
    data = {"text": text, "text+bytes": text + b"\n" + junk, "bytes": junk}[mode]
    path.write_bytes(data)
    try:
        task = Task.load(path)
    except TaskCardError as exc:
        _assert_card_error(exc, path.name)
    else:
        assert task.source == path.name


def test_unknown_empty_key_is_named_with_a_non_empty_key(tmp_path: Path) -> None:
    path = tmp_path / "empty key.toml"
    path.write_text('"" = 1\n', encoding="utf-8")

    with pytest.raises(TaskCardError) as info:
        Task.load(path)

    _assert_card_error(info.value, path.name)


def test_from_dict_with_non_string_keys_is_a_task_card_error() -> None:
    with pytest.raises(TaskCardError) as info:
        Task.from_dict({1: "x", "y": 2}, source="keys.toml")

    _assert_card_error(info.value, "keys.toml")


def test_load_names_the_file_for_non_utf8_bytes(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))

    with pytest.raises(TaskCardError) as info:
        Task.load(path)

    _assert_card_error(info.value, "latin1.toml")
    assert info.value.key == "<file>"


# ---------------------------------------------------------------------------------------------- manifests


def _png(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), color).save(path, format="PNG")
    return path


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    """``tmp_path/root``: see :func:`_build_image_root`."""
    return _build_image_root(tmp_path)


@pytest.fixture(scope="module")
def shared_image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One read-only :func:`_build_image_root` for the many parametrized cases."""
    return _build_image_root(tmp_path_factory.mktemp("shared"))


def _build_image_root(tmp_path: Path) -> Path:
    """``tmp_path/root`` with valid, zero-byte, truncated, non-image and decompression-bomb PNGs, symlinks to a
    valid PNG and a folder outside the root, and a symlink loop."""
    root = tmp_path / "root"
    _png(root / "good.png")
    _png(root / "sub" / "blue.png", (0, 0, 255))
    (root / "zero.png").write_bytes(b"")
    full = _png(tmp_path / "full.png").read_bytes()
    (root / "trunc.png").write_bytes(full[: len(full) // 2])
    (root / "notimage.png").write_bytes(b"hello, not an image")
    outside = _png(tmp_path / "outside" / "secret.png", (0, 255, 0))
    (root / "escape.png").symlink_to(outside)
    (root / "escdir").symlink_to(outside.parent, target_is_directory=True)
    (root / "loop.png").symlink_to(root / "loop.png")  # a symlink loop
    (root / "bomb.png").write_bytes(_bomb_png(10_000, 10_000, full=True))  # 12 KB, 10^8 pixels when decoded
    (root / "bomb_header.png").write_bytes(_bomb_png(50_000, 50_000, full=False))  # over Pillow's own hard limit
    return root


@cache
def _bomb_png(width: int, height: int, *, full: bool) -> bytes:
    """A 1-bit PNG of ``width`` x ``height`` black pixels: all rows compressed (``full``) or only the first."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height if full else 1)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


_IMAGE_CELLS = [
    "good.png",
    "sub/blue.png",
    "./good.png",
    "sub/../good.png",
    "../outside/secret.png",
    "../../etc/passwd",
    "/etc/passwd",
    "C:\\Windows\\x.png",
    "..\\outside\\secret.png",
    "escape.png",
    "escdir/secret.png",
    "zero.png",
    "trunc.png",
    "notimage.png",
    "missing.png",
    "sub",
    "",
    " ",
    "x" * 200,  # long but below NAME_MAX; over-long names are the explicit regression test below
    "loop.png",
    "bomb.png",
    "bomb_header.png",
]
_LABEL_CELLS = ["yes", "no", "YES", "maybe", "", "1", "0", "n" * 3000]
# Valid choices drawn half of the time, so the "returns examples" branch is exercised too.
_image_cells = st.one_of(st.sampled_from(["good.png", "sub/blue.png", "./good.png"]), st.sampled_from(_IMAGE_CELLS))
_label_cells = st.one_of(st.sampled_from(["yes", "no", "YES"]), st.sampled_from(_LABEL_CELLS))
# NUL bytes are left to the explicit regression test below, so the property keeps finding other problems.
_no_nul_text = st.text(alphabet=st.characters(blacklist_characters="\x00"), max_size=30)
_no_nul_bytes = st.binary(min_size=1, max_size=8).map(lambda b: b.replace(b"\x00", b"\xff"))
_cells = st.one_of(st.sampled_from(_IMAGE_CELLS + _LABEL_CELLS), _no_nul_text)
_columns = st.lists(
    st.one_of(st.sampled_from(["id", "image", "prompt", "label", "extra"]), _no_nul_text),
    min_size=1,
    max_size=6,
)


def _csv_bytes(header: list[str], rows: list[list[str]]) -> bytes:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8", errors="surrogatepass")


def _assert_data_error_names_location(err: DataError, file: str) -> None:
    message = str(err)
    assert err.file == file
    assert file in message
    assert "row" in message
    assert "field" in message
    message.encode("utf-8")  # printable and loggable: no lone surrogates from undecodable bytes
    for single in err.errors:
        assert isinstance(single, DataError)
        assert single.file == file
        assert single.row >= 0
        assert single.location() in str(single)
        assert single.field is None or isinstance(single.field, str)


@st.composite
def _manifests(draw: st.DrawFn) -> bytes:
    structured = draw(st.booleans())
    if structured:
        header = ["id", "image", "prompt", "label", *draw(st.lists(st.sampled_from(["extra", "id", ""]), max_size=2))]
    else:
        header = draw(_columns)
    n_rows = draw(st.integers(min_value=0, max_value=4))
    by_column = {"image": _image_cells, "label": _label_cells} if structured else {}
    rows = [[draw(by_column.get(column, _cells)) for column in header] for _ in range(n_rows)]
    data = _csv_bytes(header, rows)
    if draw(st.integers(0, 2)) == 0:  # splice raw (possibly non-UTF-8) bytes somewhere
        junk = draw(_no_nul_bytes)
        at = draw(st.integers(min_value=0, max_value=len(data)))
        data = data[:at] + junk + data[at:]
    return data


@FIXTURE_SETTINGS
@given(data=_manifests())
def test_manifest_on_hostile_csv_returns_safe_examples_or_data_error(image_root: Path, data: bytes) -> None:
    task = Task.load("alignment")
    manifest = image_root.parent / "hostile.csv"
    manifest.write_bytes(data)
    try:
        examples = load_manifest(manifest, task, image_root=image_root)
    except DataError as exc:
        event("DataError")
        _assert_data_error_names_location(exc, "hostile.csv")
    else:
        event(f"loaded {min(len(examples), 2)}+ examples")
        _assert_valid_examples(examples, task, image_root)


@FIXTURE_SETTINGS
@given(
    rows=st.lists(
        st.tuples(_image_cells, _label_cells, _no_nul_text.filter(str.strip)),
        min_size=1,
        max_size=4,
    )
)
def test_manifest_rows_with_hostile_paths_never_escape_the_root(
    image_root: Path, rows: list[tuple[str, str, str]]
) -> None:
    task = Task.load("alignment")
    manifest = image_root.parent / "paths.csv"
    manifest.write_bytes(_csv_bytes(["image", "label", "prompt"], [list(r) for r in rows]))
    bad_image = {
        *("../outside/secret.png", "escape.png", "escdir/secret.png", "/etc/passwd", "zero.png", "trunc.png"),
        *("loop.png", "bomb.png", "bomb_header.png"),
    }
    try:
        examples = load_manifest(manifest, task, image_root=image_root)
    except DataError as exc:
        event("DataError")
        _assert_data_error_names_location(exc, "paths.csv")
    else:
        event("loaded")
        _assert_valid_examples(examples, task, image_root)
        assert not bad_image & {r[0] for r in rows}, "a path leaving the root or a broken image was accepted"
        assert len(examples) == len(rows)


@pytest.mark.parametrize("cell", ["../outside/secret.png", "escape.png", "escdir/secret.png", "/etc/passwd"])
def test_each_escaping_path_is_refused_with_its_row_and_field(image_root: Path, cell: str) -> None:
    manifest = image_root.parent / "one.csv"
    manifest.write_bytes(_csv_bytes(["image", "prompt", "label"], [["good.png", "p", "yes"], [cell, "p", "no"]]))

    with pytest.raises(DataError) as info:
        load_manifest(manifest, Task.load("alignment"), image_root=image_root)

    assert (info.value.file, info.value.row, info.value.field) == ("one.csv", 2, "image")
    assert "one.csv, row 2, field 'image'" in str(info.value)
    assert str(image_root.parent) not in str(info.value)


def test_over_long_image_path_is_a_data_error(image_root: Path) -> None:
    manifest = image_root.parent / "long.csv"
    manifest.write_bytes(_csv_bytes(["image", "prompt", "label"], [["x" * 5000, "p", "yes"]]))

    with pytest.raises(DataError) as info:
        load_manifest(manifest, Task.load("alignment"), image_root=image_root)

    assert (info.value.file, info.value.row, info.value.field) == ("long.csv", 1, "image")


def test_nul_byte_in_image_path_is_a_data_error(image_root: Path) -> None:
    manifest = image_root.parent / "nul.csv"
    manifest.write_bytes(_csv_bytes(["image", "prompt", "label"], [["good.png\x00", "p", "yes"]]))

    with pytest.raises(DataError) as info:
        load_manifest(manifest, Task.load("alignment"), image_root=image_root)

    assert (info.value.file, info.value.row, info.value.field) == ("nul.csv", 1, "image")


# ---------------------------------------------------------------------------------------------- run directory


def _snapshot(root: Path, skip: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink() and p != skip
    }


@FIXTURE_SETTINGS
@given(data=_manifests(), bad=st.sampled_from(["../x.png", "/abs.png", "state.json", "zero.png", "escape.png"]))
def test_failing_manifest_load_leaves_the_run_directory_byte_identical(tmp_path: Path, data: bytes, bad: str) -> None:
    run = tmp_path / "run"
    if not run.exists():
        run.mkdir()
        (run / "state.json").write_text(json.dumps({"step": 3, "best": {"p": "judge", "q": "describe"}}))
        (run / "candidates.jsonl").write_text('{"id": 1, "score": 0.5}\n')
        (run / "zero.png").write_bytes(b"")
        _png(run / "images" / "good.png")
        outside = _png(tmp_path / "elsewhere" / "x.png")
        (run / "escape.png").symlink_to(outside)
    before = _snapshot(tmp_path, skip=run / "manifest.csv")
    manifest = run / "manifest.csv"
    # A guaranteed-bad row up front, then the random (possibly broken) rest.
    manifest.write_bytes(_csv_bytes(["image", "prompt", "label"], [[bad, "p", "yes"]]) + data)

    with pytest.raises(DataError) as info:
        load_manifest(manifest, Task.load("alignment"), image_root=run)

    _assert_data_error_names_location(info.value, "manifest.csv")
    assert _snapshot(tmp_path, skip=manifest) == before


# ---------------------------------------------------------------------------------------------- JSONL and pairwise


@dataclass(frozen=True)
class Cell:
    """A value for one manifest field and the loader's required verdict on it.

    Attributes:
        value: What goes in the file.
        ok: Whether the loader must accept it.
        expected: When ``ok``: the example field it must produce (canonical label, text, id, or the image file
            relative to the root).
    """

    value: Any
    ok: bool
    expected: Any = None


def _nest(depth: int) -> list[Any]:
    """``depth`` lists inside each other: ``_nest(1) == []``, ``_nest(2) == [[]]``."""
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


# Value pools with their verdicts. "_JSON_" pools hold values only JSON can carry (numbers, null, lists, objects).
_GOOD_IMAGES = {
    "good.png": "good.png",
    "./good.png": "good.png",
    " good.png ": "good.png",
    "sub/blue.png": "sub/blue.png",
    "sub\\blue.png": "sub/blue.png",
}
_BAD_IMAGES = [
    *("../outside/secret.png", "../../etc/passwd", "/etc/passwd", "C:\\Windows\\x.png", "..\\outside\\secret.png"),
    *("escape.png", "escdir/secret.png", "loop.png", "sub/../good.png"),
    *("zero.png", "trunc.png", "notimage.png", "bomb.png", "bomb_header.png", "missing.png", "sub", "", " "),
    *("x" * 5000, "good.png\x00", "\ud800.png", "\udcff.png"),
]
_BAD_JSON_IMAGES = [None, [], ["good.png"], {"path": "good.png"}, 3, 2.5, True]

_GOOD_LABELS: dict[str, dict[Any, Any]] = {
    "alignment": {"yes": "yes", "no": "no", "YES": "yes", " no ": "no", "y": "yes", "aligned": "yes"},
    "preference": {"A": "A", "B": "B", "b": "B", "first": "A", "Image A": "A", "image_b": "B"},
}
_GOOD_JSON_LABELS: dict[str, dict[Any, Any]] = {"alignment": {1: "yes", 0: "no"}, "preference": {1: "A", 2: "B"}}
_BAD_LABELS: dict[str, list[Any]] = {
    "alignment": ["maybe", "", "  ", "Yes.", "1.0", "n" * 3000, "yes\x00", "\ud800"],
    "preference": ["C", "both", "", "A.", "a\x00", "n" * 3000, "\udcff"],
}
_BAD_JSON_LABELS = [None, [], ["yes"], {"label": "A"}, 1.5, 10**30, math.nan, math.inf, True, 7]

_GOOD_TEXT = {s: s for s in ("a cat", "x" * 100_000, " padded ", "tab\tand\u2028line\u0085sep\x0bend", "nul\x00in")}
_GOOD_JSON_TEXT = {3: "3", 2.5: "2.5", True: "True", 10**30: str(10**30), math.inf: "inf"}
_BAD_TEXT = ["", "   ", "\ud800 lone", "\udcff"]
_BAD_JSON_TEXT = [None, [], {"a": 1}, math.nan]

_GOOD_IDS = {"a": "a", "b": "b", "1": "1", " 2 ": "2", "x" * 1000: "x" * 1000}
_GOOD_JSON_IDS = {1: "1", 3.5: "3.5"}
_BAD_IDS = ["", " ", "\udfff"]
_BAD_JSON_IDS = [None, [], {"id": 1}, True]

_GOOD_META = {value: None for value in ("{}", "x" * 1000, "", "line\u2028sep")}
_GOOD_JSON_META = [None, 10**30, math.nan, _nest(MAX_JSON_DEPTH), {"a": {"b": [1, "two"]}}]
_BAD_META = ["\udcff"]
_BAD_JSON_META = [_nest(MAX_JSON_DEPTH + 1), _nest(300), ["\ud800"], {"k": "\udcff"}, {"\ud800": 1}]

_OPTIONAL = ("id", "meta")


def _required(task: Task) -> list[str]:
    return [*task.image_fields, *task.text_fields, "label"]


def _cell_table(task: Task, *, json_values: bool) -> dict[str, tuple[list[Cell], list[Cell]]]:
    """``field -> (acceptable cells, refused cells)`` for every column a manifest of ``task`` can have."""

    def pools(
        good: dict[Any, Any], bad: list[Any], json_good: dict[Any, Any] | list[Any], json_bad: list[Any]
    ) -> tuple[list[Cell], list[Cell]]:
        accepted = [Cell(value, True, expected) for value, expected in good.items()]
        refused = [Cell(value, False) for value in bad]
        if json_values:
            pairs = json_good.items() if isinstance(json_good, dict) else ((value, None) for value in json_good)
            accepted += [Cell(value, True, expected) for value, expected in pairs]
            refused += [Cell(value, False) for value in json_bad]
        return accepted, refused

    table = {name: pools(_GOOD_IMAGES, _BAD_IMAGES, {}, _BAD_JSON_IMAGES) for name in task.image_fields}
    table |= {name: pools(_GOOD_TEXT, _BAD_TEXT, _GOOD_JSON_TEXT, _BAD_JSON_TEXT) for name in task.text_fields}
    table["label"] = pools(
        _GOOD_LABELS[task.name], _BAD_LABELS[task.name], _GOOD_JSON_LABELS[task.name], _BAD_JSON_LABELS
    )
    table["id"] = pools(_GOOD_IDS, _BAD_IDS, _GOOD_JSON_IDS, _BAD_JSON_IDS)
    table["meta"] = pools(_GOOD_META, _BAD_META, _GOOD_JSON_META, _BAD_JSON_META)
    return table


@st.composite
def _row_cells(draw: st.DrawFn, task: Task, columns: list[str], *, json_values: bool, clean: bool) -> dict[str, Cell]:
    """Cells for ``columns``: all acceptable when ``clean``, else one or two fields spoiled (a refused value, or for
    JSONL sometimes a missing key), so that each refused value is usually the only problem of its row."""
    table = _cell_table(task, json_values=json_values)
    spoiled = set() if clean or not columns else draw(st.sets(st.sampled_from(columns), min_size=1, max_size=2))
    cells: dict[str, Cell] = {}
    for name in columns:
        good, bad = table[name]
        if name not in spoiled:
            cells[name] = draw(st.sampled_from(good))
        elif not (json_values and draw(st.integers(0, 7)) == 0):  # JSONL: a spoiled key is sometimes missing
            cells[name] = draw(st.sampled_from(bad))
    return cells


@dataclass(frozen=True)
class Line:
    """One line of a generated JSONL manifest: ``kind`` is ``object`` (with its cells), ``blank``, or a whole-line
    problem (``malformed``, ``non_object``, ``bigint``, ``deep``)."""

    kind: str
    text: str
    cells: dict[str, Cell] | None = None


_RESERVED_KEYS = frozenset({"image", "image_a", "image_b", "prompt", "label", *_OPTIONAL})
_JUNK_KEYS = st.text(min_size=1, max_size=6).filter(lambda key: key not in _RESERVED_KEYS)
_JUNK_VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8))
_BAD_KEYS = ["\ud800k", "\udcffk", "k\udfff"]


def _key_form(field: str | None) -> str | None:
    """A field name with each run of lone surrogates or U+FFFD (how errors print undecodable text) as ``?``."""
    return None if field is None else re.sub("[\ufffd\ud800-\udfff]+", "?", field)


@st.composite
def _json_object(draw: st.DrawFn, task: Task, clean: bool) -> Line:
    columns = _required(task) + [name for name in _OPTIONAL if draw(st.booleans())]
    cells = draw(_row_cells(task, columns, json_values=True, clean=clean))
    junk = draw(st.dictionaries(_JUNK_KEYS, _JUNK_VALUES, max_size=2))
    cells.update({key: Cell(value, True) for key, value in junk.items()})
    if not clean and draw(st.integers(0, 5)) == 0:  # a key that is no valid text (escaped, or raw invalid UTF-8)
        cells[draw(st.sampled_from(_BAD_KEYS))] = Cell(1, False)
    order = draw(st.permutations(list(cells)))
    cells = {key: cells[key] for key in order}
    # ensure_ascii=False writes lone surrogates raw (as invalid UTF-8) and U+2028/U+0085 unescaped.
    text = json.dumps({key: cell.value for key, cell in cells.items()}, ensure_ascii=draw(st.booleans()))
    return Line("object", text, cells)


def _json_lines(task: Task, *, clean: bool = False) -> st.SearchStrategy[Line]:
    """Lines of a JSONL manifest; ``clean``: acceptable objects and blank lines only."""
    if clean:
        return st.one_of(_json_object(task, True), _json_object(task, True), st.just(Line("blank", " ")))
    objects = st.one_of(_json_object(task, True), _json_object(task, False), _json_object(task, False))
    malformed = st.tuples(objects, st.floats(0.05, 0.95)).map(
        lambda pair: Line("malformed", pair[0].text[: max(1, int(len(pair[0].text) * pair[1]))])
    )
    non_object = st.one_of(
        st.lists(st.integers(), max_size=3), st.integers(), st.text(max_size=5), st.none(), st.floats()
    ).map(lambda value: Line("non_object", json.dumps(value)))
    return st.one_of(objects, objects, objects, malformed, non_object, st.sampled_from(_SPECIAL_LINES))


_SPECIAL_LINES = [
    Line("bigint", '{"label": ' + "1" * 5000 + "}"),  # beyond Python's int-from-text limit
    Line("deep", '{"a": ' * 3000 + "1" + "}" * 3000),  # beyond the JSON parser's recursion limit
    Line("blank", ""),
    Line("blank", "   "),
]


def _render(lines: list[Line], newline: str) -> bytes:
    return newline.join(line.text for line in lines).encode("utf-8", errors="surrogatepass")


@dataclass
class Expected:
    """What the loader must do with a manifest: the bad rows with the fields an error may name, and the good rows
    (row number, cells, id) in order."""

    bad: dict[int, set[str | None]]
    good: list[tuple[int, dict[str, Cell], str]]
    header_missing: set[str]


def _model(
    task: Task, rows: list[dict[str, Cell] | None], header_missing: set[str] | frozenset[str] = frozenset()
) -> Expected:
    """The verdict on numbered rows (``None``: a line that is not a JSON object at all)."""
    bad: dict[int, set[str | None]] = {}
    good: list[tuple[int, dict[str, Cell], str]] = []
    first_row_of_id: dict[str, int] = {}
    for number, cells in enumerate(rows, start=1):
        if cells is None:
            bad[number] = {None}
            continue
        wrong = {key for key, cell in cells.items() if not cell.ok}
        missing = {name for name in _required(task) if name not in cells}
        if wrong or missing:
            bad[number] = wrong | missing
            continue
        ident = cells["id"].expected if "id" in cells else str(number)
        if ident in first_row_of_id:
            bad[number] = {"id"}
            continue
        first_row_of_id[ident] = number
        good.append((number, cells, ident))
    return Expected(bad, good, set(header_missing))


def _assert_valid_examples(examples: list[Any], task: Task, root: Path) -> None:
    """Whatever a load returns is usable: unique ids, canonical labels, readable images inside the root whose
    digest matches the file, non-empty encodable text, and exactly the task's inputs."""
    resolved_root = root.resolve()
    ids = [example.id for example in examples]
    assert len(set(ids)) == len(ids)
    for example in examples:
        assert isinstance(example.id, str) and example.id.strip()
        example.id.encode("utf-8")
        assert example.label in task.labels
        assert set(example.inputs().keys()) == set(task.input_fields)
        for name in task.image_fields:
            image = example[name]
            assert isinstance(image, LazyImage)
            assert image.path.resolve().is_relative_to(resolved_root)
            data = image.path.read_bytes()
            assert data and image.sha256 == hashlib.sha256(data).hexdigest() == example[f"{name}_sha256"]
        for name in task.text_fields:
            assert isinstance(example[name], str) and example[name].strip()
            example[name].encode("utf-8")


def _check_against_model(task: Task, manifest: Path, root: Path, expected: Expected) -> None:
    try:
        examples = load_manifest(manifest, task, image_root=root)
    except DataError as exc:
        _assert_data_error_names_location(exc, manifest.name)
        if expected.header_missing:
            event("DataError: header")
            assert {(e.row, e.field) for e in exc.errors} == {(0, name) for name in expected.header_missing}
        elif not expected.bad:
            assert not expected.good, f"a good manifest was refused: {exc}"
            assert (exc.row, exc.field) == (0, None) and "no data rows" in str(exc)
        else:
            event(f"DataError: {min(len(expected.bad), 3)}+ bad rows")
            assert sorted(e.row for e in exc.errors) == sorted(expected.bad), str(exc)
            for error in exc.errors:
                assert _key_form(error.field) in {_key_form(f) for f in expected.bad[error.row]}, f"{error}"
        return
    event(f"loaded {min(len(examples), 3)}+ examples")
    assert not expected.header_missing and not expected.bad, f"bad rows {sorted(expected.bad)} were accepted"
    assert len(examples) == len(expected.good) > 0
    _assert_valid_examples(examples, task, root)
    for example, (_number, cells, ident) in zip(examples, expected.good, strict=True):
        assert example.id == ident
        assert example.label == cells["label"].expected
        for name in task.text_fields:
            assert example[name] == cells[name].expected
        for name in task.image_fields:
            assert example[name].path.resolve() == (root / cells[name].expected).resolve()


MODEL_SETTINGS = settings(FIXTURE_SETTINGS, max_examples=100)


@MODEL_SETTINGS
@given(
    task_name=st.sampled_from(["alignment", "preference"]),
    data=st.data(),
    newline=st.sampled_from(["\n", "\r\n"]),
)
def test_jsonl_manifest_matches_the_model(image_root: Path, task_name: str, data: st.DataObject, newline: str) -> None:
    task = Task.load(task_name)
    clean = data.draw(st.integers(0, 2), label="clean") == 0  # a third of the files only hold acceptable values
    lines = data.draw(st.lists(_json_lines(task, clean=clean), max_size=5), label="lines")
    manifest = image_root.parent / "hostile.jsonl"
    manifest.write_bytes(_render(lines, newline))
    rows = [line.cells for line in lines if line.kind != "blank"]
    _check_against_model(task, manifest, image_root, _model(task, rows))


@st.composite
def _csv_table(draw: st.DrawFn, task: Task) -> tuple[list[str], list[dict[str, Cell]], set[str]]:
    clean = draw(st.integers(0, 2)) == 0  # a third of the tables only hold acceptable values
    required = _required(task)
    header = [name for name in required if clean or draw(st.integers(0, 29))]  # one column in thirty is missing
    header += [name for name in _OPTIONAL if draw(st.booleans())]
    header = draw(st.permutations(header))
    n_rows = draw(st.integers(0, 4))
    rows = [
        draw(_row_cells(task, header, json_values=False, clean=clean or draw(st.booleans()))) for _ in range(n_rows)
    ]
    return header, rows, set(required) - set(header)


@MODEL_SETTINGS
@given(data=st.data())
def test_pairwise_csv_manifest_matches_the_model(image_root: Path, data: st.DataObject) -> None:
    task = Task.load("preference")
    header, rows, missing = data.draw(_csv_table(task), label="table")
    manifest = image_root.parent / "pairs.csv"
    manifest.write_bytes(_csv_bytes(header, [[row[name].value for name in header] for row in rows]))
    _check_against_model(task, manifest, image_root, _model(task, list(rows), missing))


def _isolated_cases() -> list[Any]:
    """Every value of every pool, alone in the middle row of an otherwise acceptable three-row manifest; JSONL
    values with non-ASCII text both escaped (``\\ud800``, ``\\u2028``) and written raw (invalid UTF-8 for lone
    surrogates)."""
    cases = []
    for fmt in ("jsonl", "csv"):
        for task_name in ("alignment", "preference"):
            table = _cell_table(Task.load(task_name), json_values=fmt == "jsonl")
            for field_name, (good, bad) in table.items():
                for i, cell in enumerate(good + bad):
                    raws = [False]
                    if fmt == "jsonl" and json.dumps(cell.value) != json.dumps(cell.value, ensure_ascii=False):
                        raws.append(True)
                    for raw in raws:
                        name = f"{fmt}{'-raw' if raw else ''}-{task_name}-{field_name}-{'ok' if cell.ok else 'bad'}-{i}"
                        cases.append(pytest.param(fmt, raw, task_name, field_name, cell, id=name))
    return cases


@pytest.mark.parametrize(("fmt", "raw", "task_name", "field_name", "cell"), _isolated_cases())
def test_each_value_alone_is_accepted_or_refused_naming_its_row_and_field(
    shared_image_root: Path, tmp_path: Path, fmt: str, raw: bool, task_name: str, field_name: str, cell: Cell
) -> None:
    image_root = shared_image_root
    task = Task.load(task_name)
    base: dict[str, Any] = {name: "good.png" for name in task.image_fields}
    base |= {"prompt": "a cat", "label": task.labels[0]}
    rows = [{**base, "id": f"r{i}"} for i in (1, 2, 3)]
    rows[1][field_name] = cell.value
    manifest = tmp_path / f"one.{fmt}"
    if fmt == "jsonl":
        manifest.write_bytes(_render([Line("object", json.dumps(row, ensure_ascii=not raw)) for row in rows], "\n"))
    else:
        header = list(rows[1])
        manifest.write_bytes(_csv_bytes(header, [[row.get(name, "") for name in header] for row in rows]))

    if not cell.ok:
        with pytest.raises(DataError) as info:
            load_manifest(manifest, task, image_root=image_root)
        _assert_data_error_names_location(info.value, manifest.name)
        assert [(e.row, e.field) for e in info.value.errors] == [(2, field_name)], str(info.value)
        return
    examples = load_manifest(manifest, task, image_root=image_root)
    _assert_valid_examples(examples, task, image_root)
    assert len(examples) == 3
    middle = examples[1]
    if field_name in task.image_fields:
        assert middle[field_name].path.resolve() == (image_root / cell.expected).resolve()
    elif field_name == "label":
        assert middle.label == cell.expected
    elif field_name == "id":
        assert middle.id == cell.expected
    elif field_name in task.text_fields:
        assert middle[field_name] == cell.expected
    else:  # an unknown column is ignored
        assert field_name not in middle


@pytest.mark.parametrize("line", [line for line in _SPECIAL_LINES if line.kind != "blank"], ids=lambda line: line.kind)
def test_each_unparsable_jsonl_line_is_a_whole_row_error(image_root: Path, line: Line) -> None:
    good = json.dumps({"image": "good.png", "prompt": "a cat", "label": "yes"})
    manifest = image_root.parent / "lines.jsonl"
    manifest.write_bytes(_render([Line("object", good), line, Line("blank", ""), Line("object", good)], "\n"))

    with pytest.raises(DataError) as info:
        load_manifest(manifest, Task.load("alignment"), image_root=image_root)

    assert [(e.row, e.field) for e in info.value.errors] == [(2, None)]
    assert len(str(info.value)) < 300  # the line itself is not echoed


def _splice(data: bytes, draw: st.DrawFn) -> bytes:
    """``data`` with up to three runs of hostile bytes (NUL, invalid UTF-8, quotes, braces, newlines) spliced in."""
    junk = st.one_of(
        st.binary(min_size=1, max_size=6),
        st.sampled_from([b"\x00", b"\xff\xfe", b"\xc3", b"\xed\xa0\x80", b'"', b"{", b"}", b"\n", b"\r", b","]),
    )
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(min_value=0, max_value=len(data)))
        data = data[:at] + draw(junk) + data[at:]
    return data


@FIXTURE_SETTINGS
@given(task_name=st.sampled_from(["alignment", "preference"]), fmt=st.sampled_from(["jsonl", "csv"]), data=st.data())
def test_byte_level_corruption_gives_valid_examples_or_a_located_data_error(
    image_root: Path, task_name: str, fmt: str, data: st.DataObject
) -> None:
    task = Task.load(task_name)
    if fmt == "jsonl":
        lines = data.draw(st.lists(_json_lines(task), min_size=1, max_size=4), label="lines")
        raw = _render(lines, "\n")
    else:
        header, rows, _missing = data.draw(_csv_table(task), label="table")
        raw = _csv_bytes(header, [[row[name].value for name in header] for row in rows])
    raw = _splice(raw, data.draw)
    manifest = image_root.parent / f"corrupt.{fmt}"
    manifest.write_bytes(raw)
    try:
        examples = load_manifest(manifest, task, image_root=image_root)
    except DataError as exc:
        event("DataError")
        _assert_data_error_names_location(exc, manifest.name)
    else:
        event("loaded")
        _assert_valid_examples(examples, task, image_root)
