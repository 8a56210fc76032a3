"""Reading DSPy adapter prompts (output fields, instructions) and writing replies in the adapter's format."""

from __future__ import annotations

import json
from typing import Any, Literal

import dspy
import pytest

from blpo_dspy.engines import prompt_format
from blpo_dspy.engines.prompt_format import OutputField, build_schema, parse_output_fields
from blpo_dspy.task import Task
from blpo_dspy.testing import ScriptedEngine


def system_prompt(signature: type[dspy.Signature], adapter: dspy.Adapter | None = None, **inputs: Any) -> str:
    engine = ScriptedEngine.answering("")
    lm = dspy.LM("capture/model", engine=engine, cache=False)
    with dspy.context(lm=lm, adapter=adapter or dspy.ChatAdapter()):
        try:
            dspy.Predict(signature)(**inputs)
        except Exception:  # the empty answer does not parse; only the request matters here
            pass
    system = engine.requests[0].system
    assert isinstance(system, str)
    return system


class Typed(dspy.Signature):
    """Rate the thing.

    Be careful: second line of the instructions."""

    thing: str = dspy.InputField()
    verdict: Literal["good", "bad"] = dspy.OutputField(desc="the verdict")
    score: int = dspy.OutputField()
    confidence: float = dspy.OutputField(desc="0 to 1")
    flagged: bool = dspy.OutputField()
    notes: list[str] = dspy.OutputField(desc="short notes")


def test_output_fields_of_the_compliance_judge_are_read_from_the_chat_prompt() -> None:
    task = Task.load("compliance")
    system = system_prompt(task.judge_signature("text"), description="d", brief="b")
    fields = parse_output_fields(system)
    assert [f.name for f in fields] == ["rationale", "label"]
    assert [f.type_name for f in fields] == ["str", "str"]
    assert "one of: yes, no" in fields[1].description
    assert prompt_format.adapter_mode(system) == "chat"
    assert prompt_format.extract_instruction(system) == task.judge_instruction


def test_schema_bounds_strings_and_constrains_labels() -> None:
    binary = Task.load("compliance")
    ordinal = Task.load("compliance_ordinal")
    schema = build_schema(
        parse_output_fields(system_prompt(binary.judge_signature("text"), description="d", brief="b"))
    )
    assert schema is not None
    assert list(schema["properties"]) == ["rationale", "label"]
    assert schema["properties"]["rationale"] == {"type": "string", "maxLength": 300}
    assert schema["properties"]["label"] == {"type": "string", "enum": ["yes", "no"]}
    assert schema["required"] == ["rationale", "label"]
    assert schema["additionalProperties"] is False

    ordinal_fields = parse_output_fields(system_prompt(ordinal.judge_signature("text"), description="d", brief="b"))
    label = build_schema(ordinal_fields)["properties"]["label"]  # type: ignore[index]
    assert label["enum"] == ["0", "1", "2", "3", "4"]

    unconstrained = build_schema(ordinal_fields, constrain_labels=False)
    assert unconstrained["properties"]["label"] == {"type": "string", "maxLength": 400}  # type: ignore[index]


def test_typed_fields_and_multiline_instructions() -> None:
    system = system_prompt(Typed, thing="x")
    fields = parse_output_fields(system)
    assert [f.name for f in fields] == ["verdict", "score", "confidence", "flagged", "notes"]
    schema = build_schema(fields, max_chars={"notes": 80})
    assert schema is not None
    props = schema["properties"]
    assert props["verdict"] == {"enum": ["good", "bad"]}
    assert props["score"] == {"type": "integer"}
    assert props["confidence"] == {"type": "number"}
    assert props["flagged"] == {"type": "boolean"}
    assert props["notes"]["type"] == "array" and props["notes"]["items"]["maxLength"] == 20
    assert (
        prompt_format.extract_instruction(system) == "Rate the thing.\n\nBe careful: second line of the instructions."
    )


def test_unexpressible_type_gives_no_schema() -> None:
    assert build_schema([OutputField("data", "dict[str, Any]")]) is None
    assert build_schema([]) is None


def test_limits_shrink_to_fit_max_tokens_and_keep_ratios() -> None:
    fields = [OutputField("description", "str"), OutputField("rationale", "str")]
    assert prompt_format.field_limits(fields, None) == {"description": 700, "rationale": 300}
    small = prompt_format.field_limits(fields, 100)
    budget = (100 - 8 * 2 - 4) * prompt_format.CHARS_PER_TOKEN
    assert sum(small.values()) <= budget
    assert small["description"] > small["rationale"]
    assert prompt_format.field_limits(fields, 1)["rationale"] == prompt_format.MIN_STRING_CHARS
    custom = prompt_format.field_limits(fields, None, {"rationale": 50})
    assert custom["rationale"] == 50


def test_json_adapter_prompt_is_detected() -> None:
    task = Task.load("compliance")
    system = system_prompt(task.judge_signature("text"), dspy.JSONAdapter(), description="d", brief="b")
    assert prompt_format.adapter_mode(system) == "json"
    assert [f.name for f in parse_output_fields(system)] == ["rationale", "label"]
    assert prompt_format.adapter_mode("You are a helpful assistant.") == "text"


def test_rendered_chat_reply_parses_with_dspy_chat_adapter() -> None:
    signature = Typed
    fields = parse_output_fields(system_prompt(signature, thing="x"))
    values = {"verdict": "good", "score": 3, "confidence": 0.5, "flagged": True, "notes": ["a", "b"]}
    text = prompt_format.render_chat(values, fields)
    assert text.endswith("[[ ## completed ## ]]")
    parsed = dspy.ChatAdapter().parse(signature, text)
    assert parsed == values
    as_json = prompt_format.render_json(values, fields)
    assert dspy.JSONAdapter().parse(signature, as_json) == values


def test_sections_and_demo_conversion() -> None:
    text = "[[ ## rationale ## ]]\nThree circles.\n\n[[ ## label ## ]]\nyes\n\n[[ ## completed ## ]]"
    assert prompt_format.parse_sections(text) == {"rationale": "Three circles.", "label": "yes"}
    fields = [OutputField("rationale", "str"), OutputField("label", "str")]
    assert json.loads(prompt_format.chat_sections_to_json(text, fields) or "") == {
        "rationale": "Three circles.",
        "label": "yes",
    }
    assert prompt_format.chat_sections_to_json("no sections here", fields) is None


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('{"a": "x", "b": "y"}', {"a": "x", "b": "y"}),
        ('{"a": "x", "b": "cut off in the midd', {"a": "x", "b": "cut off in the midd"}),
        ('{"a": "x"', {"a": "x"}),
        ("not json", None),
        ("[1, 2]", None),
    ],
)
def test_json_reply_parsing_repairs_truncation(reply: str, expected: dict[str, str] | None) -> None:
    assert prompt_format.parse_json_reply(reply) == expected
