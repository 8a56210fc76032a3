"""DSPy's ``Example`` and ``Prediction`` on the per-example path, made and read without per-attribute Python calls.

Both keep their fields in a ``_store`` dict (and an ``Example`` its input names in ``_input_keys``), but every
attribute they set and every field read through their methods is a Python call (``Example.__setattr__``,
``Example.get``, ``Example.inputs``, which builds a new ``Example``). The judge makes one prediction per example
and ``evaluate()`` reads an example's inputs and four fields of a prediction, so these go to the dicts directly.

That layout is DSPy's, not a public contract: it is checked once, on real objects, when this module is imported,
and with any other layout every function here falls back to DSPy's own constructor and methods.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

import dspy


def _prediction_layout_is_known() -> bool:
    probe = dspy.Prediction(field=1)
    layout = {"_store": {"field": 1}, "_completions": None, "_lm_usage": None}
    return vars(probe) == layout and probe.get("field") == 1 and probe.field == 1


def _example_layout_is_known() -> bool:
    probe = dspy.Example(a=1, b=2, dspy_uuid="u").with_inputs("a", "dspy_uuid")
    state = vars(probe)
    return (
        state.get("_store") == {"a": 1, "b": 2, "dspy_uuid": "u"}
        and state.get("_input_keys") == {"a", "dspy_uuid"}
        and _fast_inputs(probe) == dict(probe.inputs().items()) == {"a": 1}
        and dspy.Example(a=1).__dict__.get("_input_keys", ()) is None
    )


def _maker(known: bool) -> Callable[[dict[str, Any]], dspy.Prediction]:
    if not known:
        return lambda fields: dspy.Prediction(**fields)
    new = object.__new__
    prediction_type = dspy.Prediction

    def make(fields: dict[str, Any]) -> dspy.Prediction:
        prediction = new(prediction_type)
        prediction.__dict__.update(_store=fields, _completions=None, _lm_usage=None)
        return prediction

    return make


def _reader(known: bool) -> Callable[[dspy.Prediction], Mapping[str, Any]]:
    if not known:
        return lambda prediction: prediction.toDict()
    return operator.attrgetter("_store")  # a C call: no Python frame per read


def _slow_inputs(example: dspy.Example) -> dict[str, Any]:
    return dict(example.inputs().items())


def _fast_inputs(example: dspy.Example) -> dict[str, Any]:
    keys = example.__dict__["_input_keys"] if type(example) is dspy.Example else None
    if keys is None:  # no inputs (DSPy's inputs() raises its own error) or a subclass, which may read them its way
        return _slow_inputs(example)
    return {k: v for k, v in example.__dict__["_store"].items() if k in keys and not k.startswith("dspy_")}


def example_fields(example: dspy.Example) -> Mapping[str, Any]:
    """All fields of a ``dspy.Example`` (its store, read-only; DSPy's ``toDict()`` for a subclass or another
    layout)."""
    if EXAMPLE_LAYOUT_KNOWN and type(example) is dspy.Example:
        return example.__dict__["_store"]
    return example.toDict()


def check_inputs(example: dspy.Example) -> None:
    """Raise DSPy's ``ValueError`` if no inputs were set on the example (for a plain ``dspy.Example`` of a known
    layout without building them)."""
    if not (EXAMPLE_LAYOUT_KNOWN and type(example) is dspy.Example and example.__dict__["_input_keys"] is not None):
        example.inputs()


PREDICTION_LAYOUT_KNOWN = _prediction_layout_is_known()
EXAMPLE_LAYOUT_KNOWN = _example_layout_is_known()

make_prediction: Callable[[dict[str, Any]], dspy.Prediction] = _maker(PREDICTION_LAYOUT_KNOWN)
"""``dspy.Prediction(**fields)`` for a fresh ``fields`` dict (which the prediction then owns)."""

prediction_fields: Callable[[dspy.Prediction], Mapping[str, Any]] = _reader(PREDICTION_LAYOUT_KNOWN)
"""The fields of a ``dspy.Prediction`` (exactly that type) as a read-only mapping."""

example_inputs: Callable[[dspy.Example], dict[str, Any]] = _fast_inputs if EXAMPLE_LAYOUT_KNOWN else _slow_inputs
"""The keyword arguments of ``program(**example.inputs())`` as a new dict (read from the store for a plain
``dspy.Example``, through ``inputs()`` for a subclass); raises DSPy's ``ValueError`` when no inputs were set."""
