"""Reading DSPy adapter prompts and writing replies in the adapter's format.

DSPy's ChatAdapter and JSONAdapter describe a signature in the system prompt::

    Your output fields are:
    1. `rationale` (str): One or two short sentences explaining the label.
    2. `label` (str): The label: one of: yes, no.
    All interactions will be structured in the following way, ...

The local engines read the output fields (names, types, descriptions) from that text, build a JSON schema that
bounds every string (``maxLength``) so small models cannot ramble until ``max_tokens``, generate constrained
JSON, and render the result back in whichever format the adapter expects (``[[ ## field ## ]]`` sections for
ChatAdapter, a JSON object for JSONAdapter). The rest of a program therefore stays adapter agnostic.
"""

from __future__ import annotations

import ast
import json
import re
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

AdapterMode = Literal["chat", "json", "text"]

DEFAULT_MAX_CHARS: dict[str, int] = {"description": 700, "rationale": 300, "reasoning": 400}
DEFAULT_STRING_MAX_CHARS = 400
MIN_STRING_CHARS = 16
CHARS_PER_TOKEN = 3.0  # conservative for English text with Qwen's tokenizer (about 4 in practice)
_TOKENS_PER_FIELD = 8  # key, quotes, separators
_MAX_LIST_ITEMS = 8

_OUTPUT_BLOCK = re.compile(r"Your output fields are:\n(.*?)(?:\nAll interactions will be structured|\Z)", re.DOTALL)
_FIELD_LINE = re.compile(r"^(\d+)\. `(?P<name>[A-Za-z_][A-Za-z0-9_]*)` \((?P<type>.*?)\)(?::(?P<desc>.*))?$")
_OBJECTIVE = "In adhering to this structure, your objective is: "
_CHAT_MARKER = "[[ ## completed ## ]]"
_JSON_MARKER = "Outputs will be a JSON object"
_SECTION = re.compile(r"\[\[ ## (\w+) ## \]\]")
_RESPOND_CHAT = re.compile(r"Respond with the corresponding output fields, starting with the field .*\Z", re.DOTALL)
_ONE_OF = re.compile(r"\bone of:\s*(?P<labels>[^\n]+?)\.(?:\s|$)", re.IGNORECASE)
_INT_RANGE = re.compile(r"\ban integer from (?P<lo>-?\d+) to (?P<hi>-?\d+)\b", re.IGNORECASE)


@dataclass(frozen=True)
class OutputField:
    """An output field as described in a DSPy system prompt.

    Attributes:
        name: Field name.
        type_name: The annotation as DSPy printed it (``str``, ``int``, ``Literal['yes', 'no']``, ...).
        description: The field description (may be empty).
    """

    name: str
    type_name: str
    description: str = ""


def parse_output_fields(system: str) -> list[OutputField]:
    """Read the output fields from a DSPy ChatAdapter/JSONAdapter system prompt.

    Args:
        system: The system prompt text.

    Returns:
        The output fields in order; empty when the prompt does not describe a signature.
    """
    match = _OUTPUT_BLOCK.search(system)
    if not match:
        return []
    fields: list[OutputField] = []
    current: dict[str, Any] | None = None
    for line in match.group(1).splitlines():
        found = _FIELD_LINE.match(line)
        if found:
            if current is not None:
                fields.append(_field(current))
            current = {"name": found["name"], "type": found["type"], "desc": [(found["desc"] or "").strip()]}
        elif current is not None:
            current["desc"].append(line.strip())
    if current is not None:
        fields.append(_field(current))
    return fields


def _field(raw: Mapping[str, Any]) -> OutputField:
    description = "\n".join(part for part in raw["desc"] if part).strip()
    return OutputField(name=raw["name"], type_name=raw["type"].strip(), description=description)


def adapter_mode(system: str) -> AdapterMode:
    """Which reply format the adapter that built ``system`` expects.

    Returns:
        ``"json"`` for JSONAdapter prompts, ``"chat"`` for ChatAdapter prompts, ``"text"`` for anything else
        (free text: proposers calling the LM directly, unknown adapters).
    """
    if not parse_output_fields(system):
        return "text"
    if _JSON_MARKER in system:
        return "json"
    if _CHAT_MARKER in system:
        return "chat"
    return "text"


def extract_instruction(system: str) -> str:
    """The signature's instructions from a DSPy system prompt (dedented); the whole text if not found."""
    index = system.rfind(_OBJECTIVE)
    if index < 0:
        return system.strip()
    return textwrap.dedent(system[index + len(_OBJECTIVE) :].lstrip("\n")).strip()


def parse_sections(text: str) -> dict[str, str]:
    """Split ``[[ ## name ## ]]`` sections (as in ChatAdapter messages) into ``{name: value}``.

    The ``completed`` marker is dropped; the first occurrence of a name wins.
    """
    result: dict[str, str] = {}
    matches = list(_SECTION.finditer(text))
    for i, match in enumerate(matches):
        name = match.group(1)
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        if name != "completed" and name not in result:
            result[name] = text[match.end() : end].strip()
    return result


def replace_chat_reply_request(text: str, fields: list[OutputField]) -> str:
    """Replace ChatAdapter's closing "Respond with the corresponding output fields ..." by a JSON request."""
    keys = ", ".join(f"`{f.name}`" for f in fields)
    return _RESPOND_CHAT.sub(f"Respond with a JSON object with the keys {keys}.", text)


# ---------------------------------------------------------------------------------------------------- schema
def field_schema(field: OutputField, max_chars: int, *, constrain_labels: bool = True) -> dict[str, Any] | None:
    """JSON schema for one output field, or ``None`` when its type cannot be expressed.

    ``str`` fields get ``maxLength``; with ``constrain_labels`` a ``str`` field whose description says
    "one of: a, b, c." or "an integer from X to Y" is restricted to those values. ``Literal[...]`` becomes an
    ``enum``; ``int``/``float``/``bool`` their JSON types; ``list[str]`` a bounded array of bounded strings.
    """
    type_name = field.type_name.replace(" ", "")
    if type_name == "str":
        if constrain_labels:
            enum = _label_enum(field.description)
            if enum:
                return {"type": "string", "enum": enum}
        return {"type": "string", "maxLength": max_chars}
    if type_name == "int":
        return {"type": "integer"}
    if type_name == "float":
        return {"type": "number"}
    if type_name == "bool":
        return {"type": "boolean"}
    if type_name == "list[str]":
        return {
            "type": "array",
            "items": {"type": "string", "maxLength": max(MIN_STRING_CHARS, max_chars // 4)},
            "maxItems": _MAX_LIST_ITEMS,
        }
    if field.type_name.startswith("Literal[") and field.type_name.endswith("]"):
        try:
            values = ast.literal_eval("[" + field.type_name[len("Literal[") : -1] + "]")
        except (SyntaxError, ValueError):
            return None
        if values and all(isinstance(v, str | int | float | bool) for v in values):
            return {"enum": list(values)}
    return None


def _label_enum(description: str) -> list[str] | None:
    found = _ONE_OF.search(description)
    if found:
        labels = [label.strip() for label in found["labels"].split(",")]
        if labels and all(labels) and len(labels) <= 50:
            return labels
    found = _INT_RANGE.search(description)
    if found:
        lo, hi = int(found["lo"]), int(found["hi"])
        if lo <= hi and hi - lo <= 100:
            return [str(v) for v in range(lo, hi + 1)]
    return None


def field_limits(
    fields: list[OutputField],
    max_tokens: int | None,
    max_chars: Mapping[str, int] | None = None,
    default_max_chars: int = DEFAULT_STRING_MAX_CHARS,
) -> dict[str, int]:
    """Per-field character limits, scaled down together so the whole JSON reply fits in ``max_tokens``.

    Args:
        fields: The output fields.
        max_tokens: The generation budget (``None``: no scaling).
        max_chars: Per-field limits; unspecified fields use :data:`DEFAULT_MAX_CHARS` or ``default_max_chars``.
        default_max_chars: Limit for fields not named anywhere.
    """
    table = {**DEFAULT_MAX_CHARS, **(max_chars or {})}
    limits = {f.name: int(table.get(f.name, default_max_chars)) for f in fields}
    if max_tokens is None or not limits:
        return limits
    available = (max_tokens - _TOKENS_PER_FIELD * len(fields) - 4) * CHARS_PER_TOKEN
    wanted = sum(limits.values())
    if wanted > available:
        scale = max(available, 0) / wanted
        limits = {name: max(MIN_STRING_CHARS, int(value * scale)) for name, value in limits.items()}
    return limits


def build_schema(
    fields: list[OutputField],
    *,
    max_tokens: int | None = None,
    max_chars: Mapping[str, int] | None = None,
    default_max_chars: int = DEFAULT_STRING_MAX_CHARS,
    constrain_labels: bool = True,
) -> dict[str, Any] | None:
    """A JSON object schema for the output fields (in order), or ``None`` if some type is not expressible.

    Args:
        fields: Output fields, e.g. from :func:`parse_output_fields`.
        max_tokens: Generation budget; string limits are scaled down to fit it.
        max_chars: Per-field string limits (characters).
        default_max_chars: Limit for string fields not listed in ``max_chars`` or the defaults.
        constrain_labels: Restrict label-like ``str`` fields to the values their description lists.
    """
    if not fields:
        return None
    limits = field_limits(fields, max_tokens, max_chars, default_max_chars)
    properties: dict[str, Any] = {}
    for field in fields:
        schema = field_schema(field, limits[field.name], constrain_labels=constrain_labels)
        if schema is None:
            return None
        properties[field.name] = schema
    return {
        "type": "object",
        "properties": properties,
        "required": [f.name for f in fields],
        "additionalProperties": False,
    }


# ---------------------------------------------------------------------------------------------------- rendering
def render_chat(values: Mapping[str, Any], fields: list[OutputField] | None = None) -> str:
    """Render output values as ChatAdapter expects: ``[[ ## name ## ]]`` sections then ``[[ ## completed ## ]]``."""
    names = [f.name for f in fields] if fields else list(values)
    parts = [f"[[ ## {name} ## ]]\n{_chat_value(values.get(name, ''))}" for name in names]
    return "\n\n".join([*parts, _CHAT_MARKER])


def _chat_value(value: Any) -> str:
    if isinstance(value, str):
        return value.strip()
    return json.dumps(value, ensure_ascii=False)


def render_json(values: Mapping[str, Any], fields: list[OutputField] | None = None) -> str:
    """Render output values as one JSON object (JSONAdapter), keys in field order."""
    names = [f.name for f in fields] if fields else list(values)
    return json.dumps({name: values.get(name, "") for name in names}, ensure_ascii=False)


def render(values: Mapping[str, Any], mode: AdapterMode, fields: list[OutputField] | None = None) -> str:
    """Render values for ``mode``; in ``"text"`` mode a single value is returned as-is, several as JSON."""
    if mode == "chat":
        return render_chat(values, fields)
    if mode == "json" or len(values) != 1:
        return render_json(values, fields)
    return str(next(iter(values.values())))


def chat_sections_to_json(text: str, fields: list[OutputField]) -> str | None:
    """Convert an assistant turn written in ChatAdapter sections (a demo) to the JSON the model will produce."""
    sections = parse_sections(text)
    if not sections or not all(f.name in sections for f in fields):
        return None
    return render_json({f.name: sections[f.name] for f in fields}, fields)


def parse_json_reply(text: str) -> dict[str, Any] | None:
    """Parse a JSON object reply; repair a reply cut off inside a string (``max_tokens`` reached).

    Returns:
        The object, or ``None`` when it cannot be parsed.
    """
    text = text.strip()
    try:
        value = json.loads(text)
    except ValueError:
        value = _repair_truncated(text)
    return value if isinstance(value, dict) else None


def _repair_truncated(text: str) -> Any:
    if not text.startswith("{"):
        return None
    for suffix in ('"}', "}", '""}', ': ""}'):
        try:
            return json.loads(text + suffix)
        except ValueError:
            continue
    return None
