"""The llama.cpp engine's request handling, with a fake chat backend in place of the model (no weights needed)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import dspy
import pytest
from dspy.lm15 import ContextLengthError, InvalidRequestError, Message, Request, UnsupportedFeatureError
from dspy.utils.exceptions import AdapterParseError, LMUnsupportedFeatureError
from PIL import Image

from blpo_dspy.engines.llamacpp import LlamaCppEngine, local_lm, machine_threads
from blpo_dspy.task import Task


class FakeBackend:
    """Stands in for ``xllamacpp.Server``: records bodies and replies with scripted content."""

    def __init__(self, *replies: str | dict[str, Any]) -> None:
        self.replies = list(replies)
        self.bodies: list[dict[str, Any]] = []

    def handle_chat_completions(self, body: dict[str, Any]) -> dict[str, Any]:
        self.bodies.append(body)
        reply = self.replies.pop(0) if self.replies else '{"rationale": "fallback", "label": "no"}'
        if isinstance(reply, dict):
            return reply
        return {
            "id": "chatcmpl-test",
            "choices": [{"finish_reason": "stop", "index": 0, "message": {"role": "assistant", "content": reply}}],
            "usage": {
                "prompt_tokens": 120,
                "completion_tokens": 17,
                "total_tokens": 137,
                "prompt_tokens_details": {"cached_tokens": 100},
            },
            "timings": {"prompt_ms": 200.0, "predicted_ms": 850.0},
        }


def _engine(*replies: str | dict[str, Any], **options: Any) -> tuple[LlamaCppEngine, FakeBackend]:
    backend = FakeBackend(*replies)
    return LlamaCppEngine("fake-model", backend=backend, **options), backend


def _lm(engine: LlamaCppEngine, **kwargs: Any) -> dspy.LM:
    return dspy.LM("local/fake-model", engine=engine, cache=False, temperature=0.0, **kwargs)


def test_chat_adapter_call_is_constrained_greedy_json_rendered_back() -> None:
    task = Task.load("compliance")
    engine, backend = _engine('{"rationale": "Only two circles are shown.", "label": "no"}')
    lm = _lm(engine, max_tokens=200)
    with dspy.context(lm=lm):
        prediction = dspy.Predict(task.judge_signature("text"))(description="two red circles", brief="3 red circles")
    assert prediction.label == "no"
    assert prediction.rationale == "Only two circles are shown."

    body = backend.bodies[0]
    assert body["temperature"] == 0.0 and body["top_k"] == 1
    assert body["max_tokens"] == 200
    schema = body["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["label"]["enum"] == ["yes", "no"]
    assert schema["properties"]["rationale"]["maxLength"] <= 300
    # The system prompt (DSPy's, the stable prefix) is first and untouched; the closing request asks for JSON.
    assert body["messages"][0]["role"] == "system"
    assert body["messages"][0]["content"].startswith("Your input fields are:")
    assert "Respond with a JSON object with the keys `rationale`, `label`." in json.dumps(body["messages"][-1])
    assert "[[ ## completed ## ]]" not in json.dumps(body["messages"][-1])

    usage = lm.history[-1]["usage"]
    assert usage["prompt_tokens"] == 120 and usage["completion_tokens"] == 17
    assert engine.stats.calls == 1 and engine.stats.cached_tokens == 100
    assert engine.stats.generation_seconds == pytest.approx(0.85)


def test_json_adapter_gets_json_back() -> None:
    task = Task.load("compliance_ordinal")
    engine, backend = _engine('{"rationale": "All but the logo.", "label": "3"}')
    with dspy.context(lm=_lm(engine), adapter=dspy.JSONAdapter()):
        prediction = dspy.Predict(task.judge_signature("text"))(description="d", brief="b")
    assert prediction.label == "3"
    assert backend.bodies[0]["response_format"]["json_schema"]["schema"]["properties"]["label"]["enum"][-1] == "4"


def test_free_text_requests_are_not_constrained() -> None:
    engine, backend = _engine("A short answer.")
    lm = _lm(engine, max_tokens=50)
    assert lm("Propose a better instruction.") == ["A short answer."]
    assert "response_format" not in backend.bodies[0]
    assert backend.bodies[0]["messages"] == [{"role": "user", "content": "Propose a better instruction."}]


def test_demos_in_chat_format_are_shown_as_json() -> None:
    task = Task.load("compliance")
    engine, backend = _engine('{"rationale": "ok", "label": "yes"}')
    predictor = dspy.Predict(task.judge_signature("text"))
    predictor.demos = [dspy.Example(description="three circles", brief="3 circles", rationale="matches", label="yes")]
    with dspy.context(lm=_lm(engine)):
        predictor(description="d", brief="b")
    assistant = [m for m in backend.bodies[0]["messages"] if m["role"] == "assistant"]
    assert [json.loads(m["content"]) for m in assistant] == [{"rationale": "matches", "label": "yes"}]


def test_text_engine_refuses_images_without_calling_the_model() -> None:
    task = Task.load("compliance")
    engine, backend = _engine()
    image = dspy.Image(Image.new("RGB", (16, 16), "red"))
    with dspy.context(lm=_lm(engine, num_retries=0)), pytest.raises(LMUnsupportedFeatureError) as info:
        dspy.Predict(task.judge_signature("image"))(image=image, brief="b")
    assert isinstance(info.value.__cause__, UnsupportedFeatureError)
    assert "text-only model" in str(info.value) and "fact-sheet verbalizer" in str(info.value)
    assert backend.bodies == []


def test_backend_errors_are_mapped_to_lm15_errors() -> None:
    request = Request(model="local/fake", messages=(Message.user("hi"),))
    too_long = {"error": {"code": 400, "message": "request (5030 tokens) exceeds", "type": "exceed_context_size_error"}}
    engine, _ = _engine(too_long, {"error": {"code": 400, "message": "bad grammar"}})
    with pytest.raises(ContextLengthError, match="n_ctx"):
        engine.complete(request)
    with pytest.raises(InvalidRequestError, match="bad grammar"):
        engine.complete(request)


def test_unparsable_json_is_passed_through_for_the_adapter() -> None:
    engine, _ = _engine("I refuse to answer in JSON", "Still no JSON")
    task = Task.load("compliance")
    lm = _lm(engine)
    with dspy.context(lm=lm), pytest.raises(AdapterParseError):
        dspy.Predict(task.judge_signature("text"))(description="d", brief="b")
    # ChatAdapter failed on the raw text, then DSPy's JSONAdapter fallback got the raw text too.
    assert [entry["outputs"] for entry in lm.history] == [["I refuse to answer in JSON"], ["Still no JSON"]]


def test_deepcopy_shares_the_engine_and_state_has_no_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "user-model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("BLPO_GGUF", str(gguf))
    lm = local_lm(max_tokens=64, n_ctx=1024, max_chars={"description": 500})
    engine = lm.engine
    assert isinstance(engine, LlamaCppEngine)
    assert copy.deepcopy(lm).engine is engine

    state = engine.dump_state()
    assert state["model"] is None and state["gguf_name"] == "user-model.gguf"
    assert str(tmp_path) not in json.dumps(state)
    restored = LlamaCppEngine.load_state(state)  # resolves $BLPO_GGUF; the model loads lazily
    assert restored.model_name == "user-model.gguf"
    assert restored.n_ctx == 1024 and restored.max_chars == {"description": 500} and restored.max_tokens == 64


def test_program_with_local_lm_saves_and_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "user-model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("BLPO_GGUF", str(gguf))
    program = dspy.Predict("question -> answer")
    program.lm = local_lm(n_ctx=2048)
    path = tmp_path / "program.json"
    program.save(str(path))
    assert str(tmp_path) not in path.read_text()
    loaded = dspy.Predict("question -> answer")
    loaded.load(str(path), allow_unsafe_lm_state=True)
    assert isinstance(loaded.lm.engine, LlamaCppEngine) and loaded.lm.engine.n_ctx == 2048


def test_settings_are_validated() -> None:
    assert machine_threads() >= 1
    with pytest.raises(ValueError, match="n_ctx"):
        LlamaCppEngine("fake", backend=FakeBackend(), n_ctx=10)
    with pytest.raises(ValueError, match="max_tokens"):
        LlamaCppEngine("fake", backend=FakeBackend(), max_tokens=0)


def test_unexpressible_output_types_fall_back_to_free_text_in_the_adapter_format() -> None:
    class Open(dspy.Signature):
        """Extract attributes."""

        text: str = dspy.InputField()
        attributes: dict[str, Any] = dspy.OutputField()

    reply = '[[ ## attributes ## ]]\n{"colour": "red"}\n\n[[ ## completed ## ]]'
    engine, backend = _engine(reply)
    with dspy.context(lm=_lm(engine)):
        prediction = dspy.Predict(Open)(text="a red ball")
    assert prediction.attributes == {"colour": "red"}
    assert "response_format" not in backend.bodies[0]
