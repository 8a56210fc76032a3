"""Task cards: built-in cards, schema errors, round trips, label parsing, judge/verbalizer signatures, wheel data."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import dspy
import pytest

from blpo_dspy.task import (
    DEFAULT_VERBALIZER_INSTRUCTION,
    LabelError,
    Task,
    TaskCardError,
    builtin_task_names,
)

REPO = Path(__file__).resolve().parents[1]
CARD_DIR = REPO / "signatures"
CARD_FILES = sorted(CARD_DIR.glob("*.toml"))

# What each built-in card declares (read off signatures/*.toml): kind, labels, image fields, text fields,
# positive label, synthetic flag.
DECLARED: dict[str, tuple[str, tuple[Any, ...], tuple[str, ...], tuple[str, ...], Any, bool]] = {
    "alignment": ("binary", ("yes", "no"), ("image",), ("prompt",), "yes", False),
    "compliance": ("binary", ("yes", "no"), ("image",), ("brief",), "yes", True),
    "compliance_ordinal": ("ordinal", (0, 1, 2, 3, 4), ("image",), ("brief",), None, True),
    "naturalness": ("ordinal", (1, 2, 3, 4, 5), ("image",), (), None, False),
    "preference": ("pairwise", ("A", "B"), ("image_a", "image_b"), ("prompt",), None, False),
    "rating": ("ordinal", (1, 2, 3, 4, 5), ("image",), ("prompt",), None, False),
    "safety": ("binary", ("safe", "unsafe"), ("image",), (), "unsafe", False),
}

MINIMAL_CARD = """\
name = "mini"
description = "A minimal binary card."
kind = "binary"
labels = ["yes", "no"]

[instructions]
judge = "Is it fine?"
"""


def _write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------- built-in cards
def test_builtin_task_names_lists_every_card_file() -> None:
    assert CARD_FILES, "no task cards found in signatures/"
    assert builtin_task_names() == sorted(p.stem for p in CARD_FILES)


def test_every_declared_card_is_tested() -> None:
    assert set(DECLARED) == set(builtin_task_names())


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_builtin_card_loads_as_declared(name: str) -> None:
    kind, labels, images, texts, positive, synthetic = DECLARED[name]
    task = Task.load(name)
    assert task.name == name
    assert task.kind == kind
    assert task.labels == labels
    assert task.image_fields == images
    assert task.text_fields == texts
    assert task.input_fields == images + texts
    assert task.positive_label == positive
    assert task.synthetic is synthetic
    assert task.is_pairwise is (kind == "pairwise")
    assert task.source == f"{name}.toml (built-in)"
    if kind == "ordinal":
        assert all(isinstance(label, int) and not isinstance(label, bool) for label in task.labels)


@pytest.mark.parametrize("path", CARD_FILES, ids=lambda p: p.stem)
def test_builtin_card_matches_its_toml(path: Path) -> None:
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    task = Task.load(path.stem)
    assert task.description == raw["description"].strip()
    assert task.judge_instruction == raw["instructions"]["judge"].strip()
    assert task.verbalizer_instruction == raw["instructions"].get("verbalizer", DEFAULT_VERBALIZER_INSTRUCTION)
    assert task.categories == tuple(raw.get("categories", ()))
    assert {k: list(v) for k, v in task.aliases.items()} == raw.get("aliases", {})
    assert [(t.name, t.description) for t in task.text_inputs] == [
        (t["name"], t.get("description", "").strip()) for t in raw.get("text_inputs", [])
    ]
    if task.kind == "ordinal":
        assert task.labels == tuple(range(raw["scale"]["min"], raw["scale"]["max"] + 1))
    else:
        assert list(task.labels) == raw["labels"]


def test_load_by_path_equals_builtin_and_names_only_the_file(tmp_path: Path) -> None:
    by_path = Task.load(CARD_DIR / "alignment.toml")
    assert by_path.source == "alignment.toml"
    assert replace(by_path, source="x") == replace(Task.load("alignment"), source="x")
    assert Task.load(str(CARD_DIR / "alignment.toml")) == by_path

    custom = Task.load(_write(tmp_path, "mini.toml", MINIMAL_CARD))
    assert custom.name == "mini"
    assert custom.source == "mini.toml"
    assert str(tmp_path) not in custom.source
    assert custom.positive_label == "yes"  # binary default: the first label
    assert custom.verbalizer_instruction == DEFAULT_VERBALIZER_INSTRUCTION
    assert custom.image_fields == ("image",)


def test_unknown_name_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="alignment") as err:
        Task.load("no_such_task")
    assert "no_such_task" in str(err.value)
    with pytest.raises(FileNotFoundError, match=re.escape("missing.toml")):
        Task.load(tmp_path / "missing.toml")


def test_top_level_package_exports() -> None:
    import blpo_dspy

    assert blpo_dspy.Task is Task
    assert blpo_dspy.TaskCardError is TaskCardError
    assert blpo_dspy.builtin_task_names() == builtin_task_names()


# --------------------------------------------------------------------------------------------- schema errors
BAD_CARDS: list[tuple[str, str | bytes, str]] = [
    ("invalid_toml", 'name = "unterminated\nkind = "binary"\n', "<toml>"),
    ("unknown_key", MINIMAL_CARD.replace('kind = "binary"', 'colour = "red"\nkind = "binary"'), "colour"),
    ("missing_judge", MINIMAL_CARD.replace('judge = "Is it fine?"', 'verbalizer = "Describe."'), "instructions.judge"),
    ("missing_instructions", MINIMAL_CARD.split("[instructions]")[0], "instructions"),
    ("unknown_instruction", MINIMAL_CARD + 'critic = "x"\n', "instructions.critic"),
    ("wrong_kind", MINIMAL_CARD.replace('"binary"', '"scalar"'), "kind"),
    (
        "ordinal_without_scale",
        MINIMAL_CARD.replace('"binary"', '"ordinal"').replace('labels = ["yes", "no"]\n', ""),
        "scale",
    ),
    (
        "ordinal_bad_scale",
        MINIMAL_CARD.replace('"binary"', '"ordinal"').replace('labels = ["yes", "no"]', "scale = { min = 5, max = 1 }"),
        "scale",
    ),
    (
        "ordinal_with_labels",
        MINIMAL_CARD.replace('"binary"', '"ordinal"').replace(
            'labels = ["yes", "no"]', 'scale = { min = 1, max = 3 }\nlabels = ["a"]'
        ),
        "labels",
    ),
    (
        "binary_with_scale",
        MINIMAL_CARD.replace('kind = "binary"', 'kind = "binary"\nscale = { min = 1, max = 3 }'),
        "scale",
    ),
    ("binary_three_labels", MINIMAL_CARD.replace('["yes", "no"]', '["yes", "no", "maybe"]'), "labels"),
    (
        "duplicate_labels",
        MINIMAL_CARD.replace('"binary"', '"categorical"').replace('["yes", "no"]', '["cat", "dog", "cat"]'),
        "labels",
    ),
    ("labels_not_strings", MINIMAL_CARD.replace('["yes", "no"]', "[1, 2]"), "labels"),
    ("alias_collides_with_alias", MINIMAL_CARD + '\n[aliases]\nyes = ["y"]\nno = ["Y."]\n', "aliases.no"),
    ("alias_collides_with_label", MINIMAL_CARD + '\n[aliases]\nyes = ["No"]\n', "aliases.yes"),
    ("alias_of_unknown_label", MINIMAL_CARD + '\n[aliases]\nmaybe = ["perhaps"]\n', "aliases.maybe"),
    (
        "positive_not_a_label",
        MINIMAL_CARD.replace('kind = "binary"', 'kind = "binary"\npositive_label = "ok"'),
        "positive_label",
    ),
    (
        "pairwise_one_image",
        MINIMAL_CARD.replace('"binary"', '"pairwise"').replace("kind", 'images = ["image"]\nkind'),
        "images",
    ),
    (
        "text_input_reserved_name",
        MINIMAL_CARD.replace("[instructions]", '[[text_inputs]]\nname = "label"\n\n[instructions]'),
        "text_inputs[0].name",
    ),
    (
        "text_input_not_identifier",
        MINIMAL_CARD.replace("[instructions]", '[[text_inputs]]\nname = "the prompt"\n\n[instructions]'),
        "text_inputs[0].name",
    ),
    (
        "text_input_clashes_with_image",
        MINIMAL_CARD.replace("[instructions]", '[[text_inputs]]\nname = "image"\n\n[instructions]'),
        "text_inputs[0].name",
    ),
    (
        "text_input_duplicate",
        MINIMAL_CARD.replace(
            "[instructions]", '[[text_inputs]]\nname = "p"\n[[text_inputs]]\nname = "p"\n\n[instructions]'
        ),
        "text_inputs[1].name",
    ),
    (
        "text_input_unknown_key",
        MINIMAL_CARD.replace("[instructions]", '[[text_inputs]]\nname = "p"\nhelp = "x"\n\n[instructions]'),
        "text_inputs[0].help",
    ),
    ("name_not_identifier", MINIMAL_CARD.replace('name = "mini"', 'name = "my task"'), "name"),
    ("synthetic_not_bool", MINIMAL_CARD.replace('kind = "binary"', 'kind = "binary"\nsynthetic = "yes"'), "synthetic"),
    (
        "categories_not_strings",
        MINIMAL_CARD.replace('kind = "binary"', 'kind = "binary"\ncategories = [1]'),
        "categories",
    ),
    ("empty_judge", MINIMAL_CARD.replace('"Is it fine?"', '"   "'), "instructions.judge"),
    ("non_utf8", MINIMAL_CARD.replace("A minimal", "Caf\u00e9 minimal").encode("latin-1"), "<file>"),
]


@pytest.mark.parametrize(("case", "text", "key"), BAD_CARDS, ids=[c[0] for c in BAD_CARDS])
def test_schema_error_names_file_and_key(tmp_path: Path, case: str, text: str | bytes, key: str) -> None:
    path = _write(tmp_path, f"{case}.toml", text)
    with pytest.raises(TaskCardError) as err:
        Task.load(path)
    assert err.value.source == f"{case}.toml"
    assert err.value.key == key
    message = str(err.value)
    assert f"{case}.toml" in message
    assert f"'{key}'" in message
    assert str(tmp_path) not in message  # the file's name, never the user's absolute path
    assert isinstance(err.value, ValueError)


def test_from_dict_rejects_non_mapping_and_names_source() -> None:
    with pytest.raises(TaskCardError, match=re.escape("api.json: key '<root>'")):
        Task.from_dict(["not", "a", "table"], source="api.json")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", sorted(DECLARED))
def test_to_dict_from_dict_round_trip(name: str) -> None:
    task = Task.load(name)
    data = task.to_dict()
    assert Task.from_dict(data, source=task.source) == task
    # The card survives JSON too (programs are saved as JSON).
    assert Task.from_dict(json.loads(json.dumps(data)), source=task.source) == task


def test_round_trip_of_a_categorical_card_with_everything() -> None:
    task = Task.from_dict(
        {
            "name": "animals",
            "description": "Which animal?",
            "kind": "categorical",
            "labels": ["cat", "dog", "bird"],
            "positive_label": "dog",
            "aliases": {"cat": ["kitten"], "bird": ["parrot", "sparrow"]},
            "text_inputs": [{"name": "caption", "description": "A caption."}, {"name": "hint"}],
            "categories": ["pets", "wild"],
            "synthetic": True,
            "instructions": {"judge": "Which animal is it?", "verbalizer": "Name the animal."},
        },
        source="animals.toml",
    )
    assert Task.from_dict(task.to_dict(), source="animals.toml") == task
    assert task.text_fields == ("caption", "hint")
    assert task.parse_label("Parrot!") == "bird"


def test_round_trip_keeps_positive_label_of_an_ordinal_card() -> None:
    data = {
        "name": "r",
        "description": "d",
        "kind": "ordinal",
        "scale": {"min": 1, "max": 5},
        "positive_label": 5,
        "instructions": {"judge": "Rate it."},
    }
    task = Task.from_dict(data)
    assert task.positive_label == 5
    assert Task.from_dict(task.to_dict()) == task


# --------------------------------------------------------------------------------------------- labels
ALIGNMENT = Task.load("alignment")
PREFERENCE = Task.load("preference")
RATING = Task.load("rating")
SAFETY = Task.load("safety")
COMPLIANCE_ORDINAL = Task.load("compliance_ordinal")

PARSES: list[tuple[Task, Any, Any]] = [
    (ALIGNMENT, "Yes", "yes"),
    (ALIGNMENT, "yes.", "yes"),
    (ALIGNMENT, "  YES  ", "yes"),
    (ALIGNMENT, "1", "yes"),
    (ALIGNMENT, "**No**", "no"),
    (ALIGNMENT, "`no`", "no"),
    (ALIGNMENT, "0", "no"),
    (ALIGNMENT, "not aligned", "no"),
    (ALIGNMENT, "Yes, it is aligned", "yes"),
    (ALIGNMENT, "Answer: no", "no"),
    (ALIGNMENT, True, "yes"),
    (ALIGNMENT, 0, "no"),
    (PREFERENCE, "A", "A"),
    (PREFERENCE, "a.", "A"),
    (PREFERENCE, "Image B", "B"),
    (PREFERENCE, "image_a", "A"),
    (PREFERENCE, "**B**", "B"),
    (PREFERENCE, "Answer: B", "B"),
    (PREFERENCE, "second", "B"),
    (RATING, "4/5", 4),
    (RATING, "Score: 4", 4),
    (RATING, "4.0", 4),
    (RATING, "**5**", 5),
    (RATING, 3, 3),
    (RATING, 2.0, 2),
    (COMPLIANCE_ORDINAL, "0", 0),
    (SAFETY, "Unsafe.", "unsafe"),
    (SAFETY, "not safe", "unsafe"),
    (SAFETY, "no", "safe"),
]

JUNK: list[tuple[Task, Any]] = [
    (ALIGNMENT, "maybe"),
    (ALIGNMENT, ""),
    (ALIGNMENT, "   "),
    (ALIGNMENT, None),
    (PREFERENCE, "C"),
    (PREFERENCE, "both"),
    (RATING, "6"),
    (RATING, "0"),
    (RATING, "-1"),
    (RATING, "4.5"),
    (RATING, 4.5),
    (RATING, "five"),
    (RATING, ""),
    (RATING, "Rating: 10/10"),
]


@pytest.mark.parametrize(("task", "raw", "expected"), PARSES, ids=[f"{t.name}-{r!r}" for t, r, _ in PARSES])
def test_parse_label_maps_variants_to_canonical(task: Task, raw: Any, expected: Any) -> None:
    parsed = task.parse_label(raw)
    assert parsed == expected
    assert type(parsed) is type(expected)
    assert parsed in task.labels


@pytest.mark.parametrize(("task", "raw"), JUNK, ids=[f"{t.name}-{r!r}" for t, r in JUNK])
def test_parse_label_returns_none_for_junk(task: Task, raw: Any) -> None:
    assert task.parse_label(raw) is None


def test_validate_label_accepts_label_space_and_raises_label_error() -> None:
    assert ALIGNMENT.validate_label("YES") == "yes"
    assert ALIGNMENT.validate_label("misaligned") == "no"
    assert RATING.validate_label(5) == 5
    assert RATING.validate_label("3") == 3
    assert PREFERENCE.validate_label("b") == "B"
    with pytest.raises(LabelError) as err:
        ALIGNMENT.validate_label("maybe")
    assert "'maybe'" in str(err.value)
    assert "alignment" in str(err.value)
    assert "one of: yes, no" in str(err.value)
    with pytest.raises(LabelError, match="an integer from 1 to 5"):
        RATING.validate_label(7)
    with pytest.raises(LabelError):
        RATING.validate_label(4.5)
    assert issubclass(LabelError, ValueError)


@pytest.mark.parametrize(
    ("task", "raw", "wrong"),
    [(ALIGNMENT, "The image is not aligned", "yes"), (SAFETY, "The ad is not safe", "safe")],
)
def test_parse_label_does_not_invert_negated_answers(task: Task, raw: str, wrong: str) -> None:
    assert task.parse_label(raw) != wrong


@pytest.mark.parametrize(
    ("task", "raw"),
    [
        (RATING, "1-5"),
        (RATING, "4/5"),
        (RATING, "Score: 4"),
        (RATING, "4.5"),
        (RATING, "6"),
        (ALIGNMENT, "yes and no"),
        (ALIGNMENT, "maybe yes"),
        (ALIGNMENT, "Yes, it is aligned"),
        (PREFERENCE, "Image A is better"),
        (ALIGNMENT, None),
        (ALIGNMENT, ""),
    ],
)
def test_validate_label_is_strict_for_dataset_labels(task: Task, raw: Any) -> None:
    with pytest.raises(LabelError):
        task.validate_label(raw)


@pytest.mark.parametrize(
    ("task", "raw", "expected"),
    [
        (RATING, "4.0", 4),
        (RATING, 4.0, 4),
        (RATING, " 3 ", 3),
        (ALIGNMENT, "**No**", "no"),
        (PREFERENCE, "image b", "B"),
    ],
)
def test_validate_label_accepts_exact_labels_aliases_and_integral_numbers(task: Task, raw: Any, expected: Any) -> None:
    assert task.validate_label(raw) == expected


def test_labels_equal_after_normalisation_are_rejected() -> None:
    with pytest.raises(TaskCardError) as err:
        Task.from_dict(
            {
                "name": "t",
                "description": "d",
                "kind": "categorical",
                "labels": ["Cat", "cat.", "dog"],
                "instructions": {"judge": "j"},
            },
            source="t.toml",
        )
    assert err.value.key == "labels"


# --------------------------------------------------------------------------------------------- signatures
def _fields(signature: type[dspy.Signature]) -> tuple[list[str], list[str]]:
    return list(signature.input_fields), list(signature.output_fields)


@pytest.mark.parametrize(
    ("judge_sees", "inputs"),
    [
        ("image", ["image", "prompt"]),
        ("text", ["description", "prompt"]),
        ("both", ["image", "description", "prompt"]),
    ],
)
def test_judge_signature_inputs_single_image(judge_sees: str, inputs: list[str]) -> None:
    signature = ALIGNMENT.judge_signature(judge_sees)  # type: ignore[arg-type]
    assert _fields(signature) == (inputs, ["rationale", "label"])
    if "image" in inputs:
        assert signature.input_fields["image"].annotation is dspy.Image
    if "description" in inputs:
        assert signature.input_fields["description"].annotation is str
    assert signature.instructions == ALIGNMENT.judge_instruction


@pytest.mark.parametrize(
    ("judge_sees", "inputs"),
    [
        ("image", ["image_a", "image_b", "prompt"]),
        ("text", ["description_a", "description_b", "prompt"]),
        ("both", ["image_a", "image_b", "description_a", "description_b", "prompt"]),
    ],
)
def test_judge_signature_inputs_pairwise(judge_sees: str, inputs: list[str]) -> None:
    signature = PREFERENCE.judge_signature(judge_sees)  # type: ignore[arg-type]
    assert _fields(signature) == (inputs, ["rationale", "label"])
    assert PREFERENCE.description_fields == ("description_a", "description_b")
    if judge_sees != "text":
        assert "Image A" in signature.input_fields["image_a"].json_schema_extra["desc"]
        assert "Image B" in signature.input_fields["image_b"].json_schema_extra["desc"]
    assert signature.instructions == PREFERENCE.judge_instruction


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_label_space_is_in_the_label_field_not_in_the_instruction(name: str) -> None:
    task = Task.load(name)
    signature = task.judge_signature("both")
    label_desc = signature.output_fields["label"].json_schema_extra["desc"]
    assert task.label_space_text in label_desc
    assert task.label_space_text not in signature.instructions
    assert signature.instructions == task.judge_instruction
    for category in task.categories:
        assert category in label_desc
    if task.kind == "ordinal":
        assert task.label_space_text == f"an integer from {task.labels[0]} to {task.labels[-1]}"
    else:
        assert task.label_space_text == "one of: " + ", ".join(task.labels)


def test_judge_signature_instruction_override_and_bad_judge_sees() -> None:
    signature = ALIGNMENT.judge_signature("image", instruction="Custom rule.")
    assert signature.instructions == "Custom rule."
    assert ALIGNMENT.judge_signature("image").instructions == ALIGNMENT.judge_instruction
    with pytest.raises(ValueError, match="judge_sees"):
        ALIGNMENT.judge_signature("video")  # type: ignore[arg-type]


def test_verbalizer_signature() -> None:
    signature = ALIGNMENT.verbalizer_signature()
    assert _fields(signature) == (["image", "prompt"], ["description"])
    assert signature.instructions == ALIGNMENT.verbalizer_instruction
    assert Task.load("naturalness").verbalizer_signature("Count things.").instructions == "Count things."
    assert _fields(Task.load("naturalness").verbalizer_signature()) == (["image"], ["description"])


# --------------------------------------------------------------------------------------------- packaging
def _python_packages() -> set[str]:
    root = REPO / "blpo_dspy"
    return {
        ".".join(p.parent.relative_to(REPO).parts) for p in root.rglob("__init__.py") if "__pycache__" not in p.parts
    }


def test_pyproject_ships_the_cards_as_blpo_dspy_task_cards() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    assert config.get("package-dir", {}).get("blpo_dspy.task_cards") == "signatures"
    assert "*.toml" in config.get("package-data", {}).get("blpo_dspy.task_cards", [])
    packages = config.get("packages")
    if isinstance(packages, list):  # an explicit list must name every sub-package, or it is missing from the wheel
        assert "blpo_dspy.task_cards" in packages
        missing = _python_packages() - set(packages)
        assert not missing, f"packages missing from [tool.setuptools] packages: {sorted(missing)}"


@pytest.mark.slow  # builds a wheel; pip fetches the build requirements (setuptools, wheel) from the package index
def test_wheel_ships_the_cards_and_loads_them_when_installed(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    shutil.copytree(REPO / "blpo_dspy", source / "blpo_dspy", ignore=ignore)
    shutil.copytree(CARD_DIR, source / "signatures", ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, source / name)
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-w", str(dist), "-q"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    if build.returncode != 0 and "satisfies the requirement" in build.stderr:
        pytest.skip(f"cannot fetch the build requirements from the package index: {build.stderr[-300:]}")
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = dist.glob("blpo_dspy-*.whl")

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    shipped = sorted(n.removeprefix("blpo_dspy/task_cards/") for n in names if n.startswith("blpo_dspy/task_cards/"))
    assert shipped == sorted(p.name for p in CARD_FILES)
    assert not any(n.startswith("signatures/") for n in names)
    for package in _python_packages():
        assert package.replace(".", "/") + "/__init__.py" in names, f"{package} missing from the wheel"

    check = (
        "import json, blpo_dspy, blpo_dspy.task as t\n"
        "task = t.Task.load('alignment')\n"
        "print(json.dumps({'file': blpo_dspy.__file__, 'names': t.builtin_task_names(),"
        " 'labels': list(task.labels), 'source': task.source}))\n"
    )
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tmp_path / "site")
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    result = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=120, cwd=run_dir, env=env
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(seen["file"]).resolve().is_relative_to((tmp_path / "site").resolve())
    assert seen["names"] == builtin_task_names()
    assert seen["labels"] == ["yes", "no"]
    assert seen["source"] == "alignment.toml (built-in)"
