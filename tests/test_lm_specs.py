"""LM spec strings: the ``py:package.module:attribute`` form for LMs built by the user's own code."""

from __future__ import annotations

import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import dspy
import pytest

from blpo_dspy.lm_specs import build_lm, python_lm

MODULE = """
import dspy
from blpo_dspy.testing import ScriptedEngine

ENGINE = ScriptedEngine()
shared = ENGINE.lm("shared")
calls = []


def per_role(role):
    calls.append(role)
    return ENGINE.lm(f"for-{role}", temperature=0.0)


def keyword_only(*, role, extra=1):
    return ENGINE.lm(role)


class Holder:
    lm = ENGINE.lm("nested")

    @staticmethod
    def make(role):
        return ENGINE.lm(f"nested-{role}")


def no_role():
    return ENGINE.lm("x")


def wrong_type(role):
    return f"not an LM for {role}"


not_callable = 42
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A uniquely named module on ``sys.path`` holding LMs, factories and wrong attributes."""
    name = f"user_lms_{tmp_path.name.replace('-', '_')}"
    package = tmp_path / "pkg_lms"
    package.mkdir()
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / f"{name}.py").write_text(textwrap.dedent(MODULE), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield f"pkg_lms.{name}"
    for key in [k for k in sys.modules if k == "pkg_lms" or k.startswith("pkg_lms.")]:
        del sys.modules[key]


def test_an_lm_attribute_is_used_as_is_for_every_role(user_module: str) -> None:
    lms = [build_lm(f"py:{user_module}:shared", role=role) for role in ("verbalizer", "judge", "proposer")]
    shared = sys.modules[user_module].shared
    assert all(lm is shared for lm in lms)
    assert shared.model == "scripted/shared"


def test_a_factory_is_called_with_the_role(user_module: str) -> None:
    lms = {role: build_lm(f"  py:{user_module}:per_role ", role=role) for role in ("judge", "proposer")}
    module = sys.modules[user_module]
    assert module.calls == ["judge", "proposer"]
    assert {role: lm.model for role, lm in lms.items()} == {
        "judge": "scripted/for-judge",
        "proposer": "scripted/for-proposer",
    }
    assert isinstance(lms["judge"], dspy.LM)
    assert build_lm(f"py:{user_module}:keyword_only", role="judge").model == "scripted/judge"


def test_dotted_attributes_reach_into_classes(user_module: str) -> None:
    assert build_lm(f"py:{user_module}:Holder.lm", role="judge").model == "scripted/nested"
    assert python_lm(f"py:{user_module}:Holder.make", role="verbalizer").model == "scripted/nested-verbalizer"


def test_the_lm_answers_through_the_users_engine(user_module: str) -> None:
    lm = build_lm(f"py:{user_module}:per_role", role="judge")
    with dspy.context(lm=lm):
        answer = dspy.Predict("question -> answer")(question="2 + 2?").answer
    assert answer == "scripted answer"
    assert sys.modules[user_module].ENGINE.count() == 1


@pytest.mark.parametrize(
    "spec",
    ["py:", "py:module_only", "py:mod:", "py::attr", "py:mod:attr:extra", "py:my-mod:attr", "py:mod:at tr", "py:.m:a"],
)
def test_malformed_specs_are_refused_naming_the_spec(spec: str) -> None:
    with pytest.raises(ValueError, match=re.escape("expected 'py:package.module:attribute'")) as info:
        build_lm(spec, role="judge")
    assert repr(spec) in str(info.value)
    assert "judge" in str(info.value)


def test_a_missing_module_is_refused_with_a_hint() -> None:
    spec = "py:surely_no_such_module_blpo:lm"
    with pytest.raises(ValueError, match="cannot import module 'surely_no_such_module_blpo'") as info:
        build_lm(spec, role="verbalizer")
    assert repr(spec) in str(info.value)
    assert "PYTHONPATH" in str(info.value)


@pytest.mark.parametrize(
    ("attribute", "message"),
    [
        ("missing", "has no attribute 'missing'"),
        ("Holder.missing", "has no attribute 'Holder.missing'"),
        ("not_callable", "is of type int, neither a dspy.LM nor a callable"),
        ("no_role", "must accept a 'role' keyword"),
        ("wrong_type", "'wrong_type'(role='proposer') returned an object of type str, not a dspy.LM"),
    ],
)
def test_wrong_attributes_are_refused_naming_the_spec(user_module: str, attribute: str, message: str) -> None:
    spec = f"py:{user_module}:{attribute}"
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        build_lm(spec, role="proposer")
    assert repr(spec) in str(info.value)


def test_other_specs_are_unchanged() -> None:
    lm = build_lm("openai/gpt-4o-mini", role="judge", max_tokens=50)
    assert lm.model == "openai/gpt-4o-mini"
    assert lm.kwargs["max_tokens"] == 50
    with pytest.raises(ValueError, match="empty LM spec for the judge"):
        build_lm("   ", role="judge")
