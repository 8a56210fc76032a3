"""blpo_dspy.dspy_objects: predictions made and read, example inputs read, without DSPy's per-attribute calls."""

from __future__ import annotations

import copy
from typing import Any

import dspy
import pytest

from blpo_dspy import dspy_objects
from blpo_dspy.dspy_objects import (
    check_inputs,
    example_fields,
    example_inputs,
    make_prediction,
    prediction_fields,
)

FIELDS: dict[str, Any] = {"label": "yes", "raw_label": "Yes.", "rationale": "r", "error": None}


def test_dspy_layouts_are_recognised() -> None:
    # If DSPy changes a layout, the fallbacks tested below take over (and this test says so).
    assert dspy_objects.PREDICTION_LAYOUT_KNOWN and dspy_objects.EXAMPLE_LAYOUT_KNOWN


@pytest.mark.parametrize("known", [True, False])
def test_made_prediction_is_indistinguishable_from_dspy_s(known: bool) -> None:
    make = dspy_objects._maker(known)
    ours, theirs = make(dict(FIELDS)), dspy.Prediction(**FIELDS)
    assert type(ours) is dspy.Prediction
    assert vars(ours) == vars(theirs)
    assert ours == theirs and repr(ours) == repr(theirs) and ours.toDict() == theirs.toDict()
    assert (ours.label, ours.get("error", "x"), ours.get("missing", 7), "rationale" in ours) == ("yes", None, 7, True)
    assert ours.get_lm_usage() is None and ours.completions is theirs.completions is None
    with pytest.raises(AttributeError):
        ours.missing  # noqa: B018
    ours.set_lm_usage({"m": {"prompt_tokens": 1}})
    ours.extra = 1
    assert ours.toDict() == {**FIELDS, "extra": 1} and ours.get_lm_usage() == {"m": {"prompt_tokens": 1}}
    assert copy.deepcopy(ours) == ours


@pytest.mark.parametrize("known", [True, False])
def test_fields_are_the_prediction_s_fields(known: bool) -> None:
    read = dspy_objects._reader(known)
    prediction = dspy.Prediction(**FIELDS)
    assert dict(read(prediction)) == prediction.toDict() == FIELDS
    assert prediction_fields(make_prediction(dict(FIELDS))) == FIELDS


class _OwnInputs(dspy.Example):
    def inputs(self) -> dspy.Example:
        return dspy.Example(image="from the subclass").with_inputs("image")


@pytest.mark.parametrize("reader", [example_inputs, dspy_objects._slow_inputs])
def test_example_inputs_are_the_keyword_arguments_of_inputs(reader: Any) -> None:
    example = dspy.Example(image="i", prompt="p", label="yes", dspy_uuid="u", id=3).with_inputs("image", "prompt")
    inputs = reader(example)
    assert inputs == dict(**example.inputs()) == {"image": "i", "prompt": "p"}
    inputs["image"] = "changed"  # a new dict: the example is untouched
    assert example.image == "i"
    marked = dspy.Example(image="i", dspy_split="train").with_inputs("image", "dspy_split")
    assert reader(marked) == dict(**marked.inputs()) == {"image": "i"}  # dspy_ fields are never arguments
    own = _OwnInputs(image="i").with_inputs("image")
    assert reader(own) == {"image": "from the subclass"}  # a subclass's own inputs() is respected
    with pytest.raises(ValueError, match="with_inputs"):
        reader(dspy.Example(image="i"))  # DSPy's own error


def test_check_inputs_raises_dspy_s_error_only_without_inputs() -> None:
    check_inputs(dspy.Example(image="i", label="yes").with_inputs("image"))
    with pytest.raises(ValueError, match="with_inputs"):
        check_inputs(dspy.Example(image="i", label="yes"))
    check_inputs(_OwnInputs(image="i"))  # a subclass is asked through its own inputs(), which answers here


def test_example_fields_are_all_fields() -> None:
    example = dspy.Example(image="i", label="yes", id=3, dspy_uuid="u").with_inputs("image")
    expected = {"image": "i", "label": "yes", "id": 3, "dspy_uuid": "u"}
    assert dict(example_fields(example)) == example.toDict() == expected
    own = _OwnInputs(image="i", label="no")
    assert dict(example_fields(own)) == own.toDict()
