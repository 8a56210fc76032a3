"""Judging tasks: declarative task cards (TOML), label spaces, label parsing and DSPy signatures.

A task card describes one judging task: what the judge sees (one image, or two for pairwise tasks, plus text
fields such as the generation prompt), the label space, and the seed instructions for the judge (p) and the
verbalizer (q). Built-in cards live in ``signatures/`` of a source checkout and ship in the wheel as
``blpo_dspy.task_cards``.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import dspy

TaskKind = Literal["binary", "ordinal", "categorical", "pairwise"]
JudgeSees = Literal["image", "text", "both"]
Label = str | int

TASK_KINDS: tuple[str, ...] = ("binary", "ordinal", "categorical", "pairwise")
JUDGE_SEES: tuple[str, ...] = ("image", "text", "both")
DEFAULT_VERBALIZER_INSTRUCTION = "Please describe this image in detail."
DESCRIPTION_FIELD = "description"
LABEL_FIELD = "label"
RATIONALE_FIELD = "rationale"

_ALLOWED_KEYS = {
    "name",
    "description",
    "kind",
    "labels",
    "scale",
    "positive_label",
    "images",
    "aliases",
    "text_inputs",
    "instructions",
    "categories",
    "synthetic",
}
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SOURCE_CARDS = Path(__file__).resolve().parent.parent / "signatures"


class TaskCardError(ValueError):
    """A task card is malformed. The message names the file and the offending key."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        super().__init__(f"{source}: key '{key}': {problem}")


class LabelError(ValueError):
    """A label is outside the task's label space."""


@dataclass(frozen=True)
class TextInput:
    """A text input field of a task (for example the generation prompt).

    Attributes:
        name: Field name; also the column/attribute name on examples.
        description: Shown to the LM as the field description.
    """

    name: str
    description: str = ""


@dataclass(frozen=True)
class Task:
    """A judging task loaded from a task card.

    Attributes:
        name: Short identifier, e.g. ``"alignment"``.
        description: What is being judged, in one or two sentences.
        kind: ``binary``, ``ordinal``, ``categorical`` or ``pairwise``.
        labels: Canonical labels in order (strings; ints for ordinal tasks).
        image_fields: Names of the image inputs (``("image",)``, or ``("image_a", "image_b")`` for pairwise).
        text_inputs: Text input fields.
        judge_instruction: Seed judge instruction p0.
        verbalizer_instruction: Seed image-to-text instruction q0.
        positive_label: Positive class for binary tasks (used by F1 on binary tasks).
        aliases: Extra spellings per canonical label, lower-cased.
        categories: Optional category list (e.g. unsafe categories), shown in the judge's field description.
        synthetic: Whether the task is a synthetic benchmark.
        source: Where the card was loaded from (a built-in name or a file name; never an absolute path).
    """

    name: str
    description: str
    kind: TaskKind
    labels: tuple[Label, ...]
    image_fields: tuple[str, ...]
    text_inputs: tuple[TextInput, ...]
    judge_instruction: str
    verbalizer_instruction: str = DEFAULT_VERBALIZER_INSTRUCTION
    positive_label: Label | None = None
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    categories: tuple[str, ...] = ()
    synthetic: bool = False
    source: str = "<memory>"

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, name_or_path: str | Path) -> Task:
        """Load a task card by built-in name (``"alignment"``) or by path to a TOML file.

        Args:
            name_or_path: A built-in task name or a path to a ``.toml`` task card.

        Returns:
            The parsed task.

        Raises:
            TaskCardError: The card is malformed; the message names the file and key.
            FileNotFoundError: No built-in card and no file of that name.
        """
        text, source = _read_card(name_or_path)
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise TaskCardError(source, "<toml>", f"not valid TOML: {exc}") from exc
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<memory>") -> Task:
        """Build a task from the parsed contents of a card, validating every key.

        Args:
            data: The card as a mapping (as parsed from TOML).
            source: Name used in error messages.

        Returns:
            The validated task.

        Raises:
            TaskCardError: On any schema error.
        """
        if not isinstance(data, Mapping):
            raise TaskCardError(source, "<root>", "a task card must be a table")
        for key in data:
            if not isinstance(key, str):
                raise TaskCardError(source, repr(key), "keys must be strings")
        unknown = sorted(set(data) - _ALLOWED_KEYS)
        if unknown:
            raise TaskCardError(
                source, unknown[0] or '""', f"unknown key (allowed: {', '.join(sorted(_ALLOWED_KEYS))})"
            )

        name = _require_str(data, "name", source)
        if not _IDENTIFIER.match(name):
            raise TaskCardError(source, "name", f"must be an identifier, got {name!r}")
        description = _require_str(data, "description", source)
        kind = _require_str(data, "kind", source)
        if kind not in TASK_KINDS:
            raise TaskCardError(source, "kind", f"must be one of {', '.join(TASK_KINDS)}, got {kind!r}")

        labels = _parse_labels(data, kind, source)
        images = _parse_images(data, kind, source)
        text_inputs = _parse_text_inputs(data, source, reserved=set(images))
        aliases = _parse_aliases(data, labels, source)

        positive: Label | None = None
        if "positive_label" in data:
            positive = data["positive_label"]
            if positive not in labels:
                raise TaskCardError(source, "positive_label", f"{positive!r} is not one of the labels {list(labels)}")
        elif kind == "binary":
            positive = labels[0]

        instructions = data.get("instructions")
        if not isinstance(instructions, Mapping):
            raise TaskCardError(source, "instructions", "missing table with 'judge' and 'verbalizer' strings")
        bad = sorted((str(k) for k in set(instructions) - {"judge", "verbalizer"}), key=str)
        if bad:
            raise TaskCardError(source, f"instructions.{bad[0]}", "unknown key (allowed: judge, verbalizer)")
        judge = _require_str(instructions, "judge", source, prefix="instructions.")
        verbalizer = instructions.get("verbalizer", DEFAULT_VERBALIZER_INSTRUCTION)
        if not isinstance(verbalizer, str) or not verbalizer.strip():
            raise TaskCardError(source, "instructions.verbalizer", "must be a non-empty string")

        categories = data.get("categories", [])
        if not isinstance(categories, list) or not all(isinstance(c, str) and c.strip() for c in categories):
            raise TaskCardError(source, "categories", "must be a list of non-empty strings")
        synthetic = data.get("synthetic", False)
        if not isinstance(synthetic, bool):
            raise TaskCardError(source, "synthetic", f"must be true or false, got {synthetic!r}")

        return cls(
            name=name,
            description=description.strip(),
            kind=kind,  # type: ignore[arg-type]
            labels=labels,
            image_fields=images,
            text_inputs=text_inputs,
            judge_instruction=judge.strip(),
            verbalizer_instruction=verbalizer.strip(),
            positive_label=positive,
            aliases=aliases,
            categories=tuple(categories),
            synthetic=synthetic,
            source=source,
        )

    def to_dict(self) -> dict[str, Any]:
        """The task as a card mapping (``Task.from_dict(task.to_dict())`` round-trips)."""
        data: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "kind": self.kind,
            "images": list(self.image_fields),
            "text_inputs": [{"name": t.name, "description": t.description} for t in self.text_inputs],
            "instructions": {"judge": self.judge_instruction, "verbalizer": self.verbalizer_instruction},
        }
        if self.kind == "ordinal":
            data["scale"] = {"min": int(self.labels[0]), "max": int(self.labels[-1])}
        else:
            data["labels"] = list(self.labels)
        if self.positive_label is not None:
            data["positive_label"] = self.positive_label
        if self.aliases:
            data["aliases"] = {k: list(v) for k, v in self.aliases.items()}
        if self.categories:
            data["categories"] = list(self.categories)
        if self.synthetic:
            data["synthetic"] = True
        return data

    # ------------------------------------------------------------------ properties
    @property
    def text_fields(self) -> tuple[str, ...]:
        """Names of the text input fields."""
        return tuple(t.name for t in self.text_inputs)

    @property
    def input_fields(self) -> tuple[str, ...]:
        """All input field names of an example: images first, then text fields."""
        return self.image_fields + self.text_fields

    @property
    def is_pairwise(self) -> bool:
        """Whether the judge compares two images."""
        return self.kind == "pairwise"

    @property
    def description_fields(self) -> tuple[str, ...]:
        """Names of the judge's verbalization inputs, one per image field."""
        if len(self.image_fields) == 1:
            return (DESCRIPTION_FIELD,)
        return tuple(f"{DESCRIPTION_FIELD}_{name.removeprefix('image_')}" for name in self.image_fields)

    @property
    def label_space_text(self) -> str:
        """Human-readable label space, used in field descriptions and proposer prompts."""
        if self.kind == "ordinal":
            return f"an integer from {self.labels[0]} to {self.labels[-1]}"
        return "one of: " + ", ".join(str(label) for label in self.labels)

    # ------------------------------------------------------------------ labels
    def validate_label(self, value: Any) -> Label:
        """Map a human label from a dataset to the canonical label, strictly.

        Accepts the canonical label or one of its aliases (case and surrounding punctuation ignored), and for
        ordinal tasks an integer (or integral float/string) in range. Unlike ``parse_label`` it does not search
        free text, so "maybe yes" is refused.

        Raises:
            LabelError: The value is not in the task's label space.
        """
        parsed: Label | None = None
        if self.kind == "ordinal":
            if isinstance(value, int | float) and not isinstance(value, bool):
                parsed = self._parse_ordinal(value)
            elif isinstance(value, str) and re.fullmatch(r"\s*-?\d+(?:\.0+)?\s*", value):
                parsed = self._parse_ordinal(value)
        elif value is not None and not isinstance(value, bool):
            parsed = self._lookup.get(_normalise(str(value)))
        if parsed is None:
            raise LabelError(
                f"label {value!r} is outside the label space of task '{self.name}' ({self.label_space_text})"
            )
        return parsed

    def parse_label(self, value: Any) -> Label | None:
        """Parse an LM's or a dataset's label leniently; return ``None`` when it cannot be parsed.

        Accepts the usual variants: case and surrounding punctuation ("Yes.", "**yes**"), "1"/"0" for binary
        tasks, "A"/"Image A" for pairwise tasks, "4/5" or "Score: 4" for ordinal tasks.
        """
        if value is None:
            return None
        if isinstance(value, bool):
            value = int(value)
        if self.kind == "ordinal":
            return self._parse_ordinal(value)
        text = _normalise(str(value))
        if not text:
            return None
        table = self._lookup
        if text in table:
            return table[text]
        # A multi-word label or alias inside the answer wins, longest first ("not aligned" beats "aligned").
        for phrase in sorted((p for p in table if " " in p), key=len, reverse=True):
            if re.search(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", text):
                return table[phrase]
        # "Yes, it is aligned" / "Answer: B" -> first or last token that is a known label.
        tokens = [t for t in re.split(r"[\s,;:()\[\]\"'*]+", text) if t]
        for candidate in (tokens[:1], tokens[-1:]):
            if candidate and candidate[0].strip(".!") in table:
                return table[candidate[0].strip(".!")]
        return None

    def _parse_ordinal(self, value: Any) -> int | None:
        lo, hi = int(self.labels[0]), int(self.labels[-1])
        if isinstance(value, int | float):
            number = float(value)
        else:
            text = _normalise(str(value))
            match = re.search(r"-?\d+(?:\.\d+)?", text)
            if not match:
                return None
            number = float(match.group())
        if not number.is_integer():
            return None
        result = int(number)
        return result if lo <= result <= hi else None

    @functools.cached_property
    def _lookup(self) -> dict[str, Label]:
        table: dict[str, Label] = {}
        for label in self.labels:
            table[_normalise(str(label))] = label
            for alias in self.aliases.get(str(label), ()):
                table[_normalise(alias)] = label
        return table

    # ------------------------------------------------------------------ signatures
    def verbalizer_signature(self, instruction: str | None = None) -> type[dspy.Signature]:
        """The verbalizer's signature: one image + the task's text fields -> ``description``.

        Args:
            instruction: The I2T instruction q; defaults to the card's seed instruction.
        """
        fields: dict[str, Any] = {
            "image": (dspy.Image, dspy.InputField(desc="The image to describe.")),
        }
        for text in self.text_inputs:
            fields[text.name] = (str, dspy.InputField(desc=text.description or text.name))
        fields[DESCRIPTION_FIELD] = (
            str,
            dspy.OutputField(desc="A text description of the image, following the instruction."),
        )
        return dspy.Signature(fields, instruction or self.verbalizer_instruction)

    def judge_signature(self, judge_sees: JudgeSees = "image", instruction: str | None = None) -> type[dspy.Signature]:
        """The judge's signature: image(s) and/or verbalization(s) + text fields -> rationale + label.

        The output format (label space) lives in the label field's description, never in the instruction.

        Args:
            judge_sees: ``"image"``, ``"text"`` (verbalizations only) or ``"both"``.
            instruction: The judge instruction p; defaults to the card's seed instruction.
        """
        if judge_sees not in JUDGE_SEES:
            raise ValueError(f"judge_sees must be one of {JUDGE_SEES}, got {judge_sees!r}")
        fields: dict[str, Any] = {}
        pair_names = ("A", "B")
        if judge_sees in ("image", "both"):
            for i, name in enumerate(self.image_fields):
                desc = f"Image {pair_names[i]}." if self.is_pairwise else "The image to judge."
                fields[name] = (dspy.Image, dspy.InputField(desc=desc))
        if judge_sees in ("text", "both"):
            for i, name in enumerate(self.description_fields):
                desc = (
                    f"A text description of image {pair_names[i]}."
                    if self.is_pairwise
                    else "A text description of the image."
                )
                fields[name] = (str, dspy.InputField(desc=desc))
        for text in self.text_inputs:
            fields[text.name] = (str, dspy.InputField(desc=text.description or text.name))
        fields[RATIONALE_FIELD] = (str, dspy.OutputField(desc="One or two short sentences explaining the label."))
        label_desc = f"The label: {self.label_space_text}."
        if self.categories:
            label_desc += " Categories considered: " + "; ".join(self.categories) + "."
        fields[LABEL_FIELD] = (str, dspy.OutputField(desc=label_desc))
        return dspy.Signature(fields, instruction or self.judge_instruction)


def builtin_task_names() -> list[str]:
    """Names of the built-in task cards, sorted."""
    names = {p.stem for p in _card_dir_files()}
    return sorted(names)


def _card_dir_files() -> list[Path]:
    if _SOURCE_CARDS.is_dir():
        return sorted(_SOURCE_CARDS.glob("*.toml"))
    try:
        root = importlib.resources.files("blpo_dspy.task_cards")
    except ModuleNotFoundError:
        return []
    return sorted(Path(str(p)) for p in root.iterdir() if p.name.endswith(".toml"))


def _read_card(name_or_path: str | Path) -> tuple[str, str]:
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"task card not found: {path}")
        try:
            return path.read_text(encoding="utf-8"), path.name
        except UnicodeDecodeError as exc:
            raise TaskCardError(path.name, "<file>", f"not UTF-8 text: {exc}") from exc
    name = str(name_or_path)
    for candidate in _card_dir_files():
        if candidate.stem == name:
            return candidate.read_text(encoding="utf-8"), f"{name}.toml (built-in)"
    raise FileNotFoundError(
        f"no built-in task named {name!r} and no such file; built-in tasks: {', '.join(builtin_task_names())}"
    )


_LEADING_NOISE = re.compile(r"^[\s\"'`*_\[\(]+")
_TRAILING_NOISE_REVERSED = re.compile(r"^[\s\"'`*_\]\).!?:;,]+")  # applied to the reversed text: linear time


def _normalise(text: str) -> str:
    text = _LEADING_NOISE.sub("", text.strip().lower())
    text = _TRAILING_NOISE_REVERSED.sub("", text[::-1])[::-1]
    return re.sub(r"\s+", " ", text)


def _require_str(data: Mapping[str, Any], key: str, source: str, prefix: str = "") -> str:
    if key not in data:
        raise TaskCardError(source, prefix + key, "missing")
    value = data[key]
    if not isinstance(value, str) or not value.strip():
        raise TaskCardError(source, prefix + key, f"must be a non-empty string, got {type(value).__name__}")
    return value


def _parse_labels(data: Mapping[str, Any], kind: str, source: str) -> tuple[Label, ...]:
    if kind == "ordinal":
        scale = data.get("scale")
        if not isinstance(scale, Mapping) or set(scale) != {"min", "max"}:
            raise TaskCardError(source, "scale", "ordinal tasks need scale = { min = INT, max = INT }")
        lo, hi = scale["min"], scale["max"]
        if not (isinstance(lo, int) and isinstance(hi, int)) or isinstance(lo, bool) or lo >= hi:
            raise TaskCardError(source, "scale", f"min and max must be integers with min < max, got {lo!r}, {hi!r}")
        if hi - lo > 100:
            raise TaskCardError(source, "scale", "at most 101 levels")
        if "labels" in data:
            raise TaskCardError(source, "labels", "ordinal tasks take 'scale', not 'labels'")
        return tuple(range(lo, hi + 1))
    labels = data.get("labels")
    if not isinstance(labels, list) or not all(isinstance(x, str) and x.strip() for x in labels):
        raise TaskCardError(source, "labels", "must be a list of non-empty strings")
    if len({_normalise(x) for x in labels}) != len(labels):
        raise TaskCardError(source, "labels", "labels must be unique (ignoring case and surrounding punctuation)")
    if kind in ("binary", "pairwise") and len(labels) != 2:
        raise TaskCardError(source, "labels", f"{kind} tasks need exactly 2 labels, got {len(labels)}")
    if kind == "categorical" and len(labels) < 2:
        raise TaskCardError(source, "labels", "categorical tasks need at least 2 labels")
    if "scale" in data:
        raise TaskCardError(source, "scale", f"only ordinal tasks take 'scale', this task is {kind}")
    return tuple(labels)


def _parse_images(data: Mapping[str, Any], kind: str, source: str) -> tuple[str, ...]:
    default = ["image_a", "image_b"] if kind == "pairwise" else ["image"]
    images = data.get("images", default)
    if not isinstance(images, list) or not all(isinstance(x, str) and _IDENTIFIER.match(x) for x in images):
        raise TaskCardError(source, "images", "must be a list of identifiers")
    expected = 2 if kind == "pairwise" else 1
    if len(images) != expected:
        raise TaskCardError(source, "images", f"{kind} tasks take {expected} image field(s), got {len(images)}")
    return tuple(images)


def _parse_text_inputs(data: Mapping[str, Any], source: str, reserved: set[str]) -> tuple[TextInput, ...]:
    raw = data.get("text_inputs", [])
    if not isinstance(raw, list):
        raise TaskCardError(source, "text_inputs", "must be an array of tables [[text_inputs]]")
    result: list[TextInput] = []
    seen: set[str] = set()
    forbidden = reserved | {LABEL_FIELD, RATIONALE_FIELD, DESCRIPTION_FIELD, "id"}
    for i, item in enumerate(raw):
        key = f"text_inputs[{i}]"
        if not isinstance(item, Mapping):
            raise TaskCardError(source, key, "must be a table with 'name' and 'description'")
        extra = sorted(set(item) - {"name", "description"})
        if extra:
            raise TaskCardError(source, f"{key}.{extra[0]}", "unknown key (allowed: name, description)")
        name = _require_str(item, "name", source, prefix=f"{key}.")
        if not _IDENTIFIER.match(name) or name in forbidden or name.startswith(DESCRIPTION_FIELD):
            raise TaskCardError(source, f"{key}.name", f"{name!r} is not a usable field name")
        if name in seen:
            raise TaskCardError(source, f"{key}.name", f"duplicate text input {name!r}")
        seen.add(name)
        desc = item.get("description", "")
        if not isinstance(desc, str):
            raise TaskCardError(source, f"{key}.description", "must be a string")
        result.append(TextInput(name=name, description=desc.strip()))
    return tuple(result)


def _parse_aliases(data: Mapping[str, Any], labels: Sequence[Label], source: str) -> dict[str, tuple[str, ...]]:
    raw = data.get("aliases", {})
    if not isinstance(raw, Mapping):
        raise TaskCardError(source, "aliases", "must be a table of label = [alias, ...]")
    names = {str(label) for label in labels}
    seen: dict[str, str] = {_normalise(n): n for n in names}
    result: dict[str, tuple[str, ...]] = {}
    for label, values in raw.items():
        key = f"aliases.{label}"
        if label not in names:
            raise TaskCardError(source, key, f"{label!r} is not one of the labels {sorted(names)}")
        if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
            raise TaskCardError(source, key, "must be a list of non-empty strings")
        for value in values:
            norm = _normalise(value)
            if norm in seen and seen[norm] != label:
                raise TaskCardError(source, key, f"alias {value!r} is already used by label {seen[norm]!r}")
            seen[norm] = label
        result[label] = tuple(values)
    return result
