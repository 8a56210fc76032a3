"""ScriptedEngine, parse_request and CountingWorld: the test doubles every other test relies on."""

from __future__ import annotations

import base64
import copy
import io
import threading
import time
from collections.abc import Sequence
from typing import Any

import dspy
import pytest
from dspy.lm15 import Request, Response
from PIL import Image as PILImage

from blpo_dspy.modules import ImageJudge
from blpo_dspy.task import Task
from blpo_dspy.testing import (
    NUMBER_RULE,
    PROPOSED_VERBALIZER_INSTRUCTIONS,
    SEED_DESCRIPTION,
    VAGUE_RULE,
    CountingWorld,
    ScriptedCall,
    ScriptedEngine,
    chat_answer,
    default_role_of,
    parse_request,
)

PREFERENCE = Task.load("preference")
ALIGNMENT = Task.load("alignment")


def _png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (6, 6), colour).save(buffer, format="PNG")
    return buffer.getvalue()


RED, GREEN = _png((255, 0, 0)), _png((0, 255, 0))


def _image(data: bytes) -> dspy.Image:
    return dspy.Image(f"data:image/png;base64,{base64.b64encode(data).decode('ascii')}")


class CapturingEngine:
    """Keeps the raw lm15 requests and answers through a ScriptedEngine."""

    def __init__(self, inner: ScriptedEngine) -> None:
        self.inner = inner
        self.requests: list[Request] = []

    def __deepcopy__(self, memo: dict[int, Any]) -> CapturingEngine:
        return self  # program copies share the engine, like ScriptedEngine

    def complete(self, request: Request) -> Response:
        self.requests.append(request)
        return self.inner.complete(request)


# --------------------------------------------------------------------------------------------- parse_request
@pytest.mark.parametrize("adapter", ["chat", "json"])
def test_parse_request_extracts_role_instructions_inputs_and_images(adapter: str) -> None:
    capture = CapturingEngine(
        ScriptedEngine(rules=[lambda c: {"rationale": "r", "label": "B"} if c.role == "judge" else None])
    )
    lm = dspy.LM("scripted/capture", engine=capture, cache=False)
    instruction = "Pick the better image.\n\nRules:\n  - look at `prompt`\n    - then compare\nDone."
    program = ImageJudge(PREFERENCE, judge_sees="both", judge_lm=lm, verbalizer_lm=lm).with_instructions(
        judge=instruction
    )
    adapter_obj = dspy.JSONAdapter() if adapter == "json" else dspy.ChatAdapter()
    with dspy.context(adapter=adapter_obj):
        prediction = program(image_a=_image(RED), image_b=_image(GREEN), prompt="two squares\nover two lines")
    assert prediction.label == "B"  # the answer was rendered in the adapter's format and parsed back

    judge_request = capture.requests[-1]
    call = parse_request(judge_request)
    assert call == capture.inner.calls[-1]
    assert call.role == "judge"
    assert call.model == "scripted/capture"
    assert program.instructions["judge"] == instruction  # DSPy keeps this instruction as written
    assert call.instructions == instruction
    assert call.output_fields == ("rationale", "label")
    assert call.images == {"image_a": [RED], "image_b": [GREEN]}
    assert call.all_images == 2
    assert call.has_image
    assert call.inputs["prompt"] == "two squares\nover two lines"
    assert call.inputs["description_a"] == "scripted description"
    assert call.inputs["description_b"] == "scripted description"
    assert call.inputs["image_a"] == ""
    assert "<image>" in call.user_text
    assert instruction.splitlines()[0] in call.system

    verbalizer_calls = capture.inner.calls_for("verbalizer")
    assert [c.images for c in verbalizer_calls] == [{"image": [RED]}, {"image": [GREEN]}]
    assert all(c.output_fields == ("description",) for c in verbalizer_calls)

    custom = parse_request(judge_request, role_of=lambda fields: "+".join(fields))
    assert custom.role == "rationale+label"


def test_parse_request_reads_only_the_last_user_message_but_counts_demo_images() -> None:
    engine = ScriptedEngine(rules=[lambda c: {"description": "d"}])
    predict = dspy.Predict(ALIGNMENT.verbalizer_signature())
    predict.demos = [dspy.Example(image=_image(RED), prompt="demo prompt", description="a red square")]
    with dspy.context(lm=engine.lm()):
        predict(image=_image(GREEN), prompt="the real prompt")
    (call,) = engine.calls
    assert call.all_images == 2
    assert call.images == {"image": [GREEN]}
    assert call.inputs["prompt"] == "the real prompt"


def test_default_role_of() -> None:
    assert default_role_of(["description"]) == "verbalizer"
    assert default_role_of(["rationale", "label"]) == "judge"
    assert default_role_of(["new_instruction"]) == "proposer"
    assert default_role_of([]) == "proposer"


# --------------------------------------------------------------------------------------------- answers
def test_rules_are_tried_in_order_then_default_then_filler() -> None:
    seen: list[str] = []

    def first(call: ScriptedCall) -> Any:
        seen.append("first")
        return None

    def second(call: ScriptedCall) -> Any:
        seen.append("second")
        return {"answer": "from second"} if call.inputs["question"] == "q2" else None

    engine = ScriptedEngine(
        rules=[first, second], default=lambda c: {"answer": "default"} if c.inputs["question"] == "q3" else None
    )
    predict = dspy.Predict("question -> answer")
    with dspy.context(lm=engine.lm()):
        answers = [predict(question=q).answer for q in ("q2", "q3", "q4")]
    assert answers == ["from second", "default", "scripted answer"]
    assert seen == ["first", "second"] * 3


def test_a_raw_string_answer_is_returned_verbatim() -> None:
    engine = ScriptedEngine(rules=[lambda c: chat_answer(rationale="raw", label="no")])
    assert chat_answer(a=1, b="x") == "[[ ## a ## ]]\n1\n\n[[ ## b ## ]]\nx\n\n[[ ## completed ## ]]"
    prediction = ImageJudge(ALIGNMENT, judge_lm=engine.lm())(image=_image(RED), prompt="p")
    assert (prediction.label, prediction.rationale) == ("no", "raw")


def test_an_exception_answer_raises_and_is_recorded() -> None:
    engine = ScriptedEngine(rules=[lambda c: RuntimeError("scripted boom")])
    predict = dspy.Predict("question -> answer")
    with dspy.context(lm=engine.lm()), pytest.raises(Exception, match="scripted boom"):
        predict(question="q")
    assert engine.count() == 1
    assert engine.calls[0].inputs == {"question": "q"}


def test_an_answering_engine_returns_its_text_to_every_request_and_keeps_the_raw_requests() -> None:
    engine = ScriptedEngine.answering(chat_answer(answer="42"), model="fixed")
    with dspy.context(lm=engine.lm()):
        assert dspy.Predict("question -> answer")(question="q1").answer == "42"
        assert dspy.Predict("text -> answer")(text="t").answer == "42"
    assert [c.inputs for c in engine.calls] == [{"question": "q1"}, {"text": "t"}]
    assert [type(r) for r in engine.requests] == [Request, Request]
    assert [r.model for r in engine.requests] == ["scripted/fixed", "scripted/fixed"]
    assert "q1" in str(engine.requests[0].messages[-1]) and "q1" not in str(engine.requests[1].messages[-1])
    engine.reset()
    assert engine.requests == [] and engine.calls == []


# --------------------------------------------------------------------------------------------- bookkeeping
def test_count_calls_for_and_reset() -> None:
    engine = ScriptedEngine()
    lm = engine.lm()
    with dspy.context(lm=lm):
        ImageJudge(ALIGNMENT, judge_sees="text")(image=_image(RED), prompt="p")
        ImageJudge(ALIGNMENT, judge_sees="image")(image=_image(RED), prompt="p")
        dspy.Predict("errors -> new_instruction")(errors="none")
    assert engine.count() == 4
    assert engine.count("verbalizer") == 1
    assert engine.count("judge") == 2
    assert engine.count("judge", with_images=True) == 1
    assert engine.count("judge", with_images=False) == 1
    assert engine.count("proposer") == 1
    assert engine.count(with_images=True) == 2
    assert [c.role for c in engine.calls_for("judge")] == ["judge", "judge"]
    engine.reset()
    assert engine.count() == 0
    assert engine.calls_for("judge") == []


def test_deepcopy_returns_the_engine_itself() -> None:
    engine = ScriptedEngine()
    assert copy.deepcopy(engine) is engine
    lm_copy = copy.deepcopy(engine.lm())
    with dspy.context(lm=lm_copy):
        dspy.Predict("question -> answer")(question="q")
    assert engine.count() == 1


def test_lm_model_name_and_state() -> None:
    engine = ScriptedEngine(model="world")
    assert engine.lm().model == "scripted/world"
    assert engine.lm("other").model == "scripted/other"
    assert ScriptedEngine.load_state(engine.dump_state()).model == "world"


def test_records_every_call_under_dspy_parallel() -> None:
    engine = ScriptedEngine(rules=[lambda c: {"answer": c.inputs["question"].upper()}])
    predict = dspy.Predict("question -> answer")
    questions = [f"q{i}" for i in range(40)]
    with dspy.context(lm=engine.lm()):
        results = dspy.Parallel(num_threads=8, disable_progress_bar=True)(
            [(predict, {"question": q}) for q in questions]
        )
    assert [r.answer for r in results] == [q.upper() for q in questions]
    assert engine.count() == 40
    assert sorted(c.inputs["question"] for c in engine.calls) == sorted(questions)


def test_records_every_call_from_raw_threads() -> None:
    engine = ScriptedEngine()
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            barrier.wait()
            for i in range(25):
                engine.complete(_request(f"w{worker}-{i}"))
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert engine.count() == 200
    assert len({c.inputs["question"] for c in engine.calls}) == 200


def _request(question: str) -> Request:
    """A request as DSPy's ChatAdapter would build it for ``question -> answer``."""
    capture = CapturingEngine(ScriptedEngine())
    with dspy.context(lm=dspy.LM("scripted/x", engine=capture, cache=False)):
        dspy.Predict("question -> answer")(question=question)
    return capture.requests[0]


def test_usage_tokens_reach_track_usage() -> None:
    engine = ScriptedEngine(rules=[lambda c: {"rationale": "r", "label": "yes"}])
    lm = engine.lm()
    text_program = ImageJudge(ALIGNMENT, judge_sees="image", judge_lm=lm)

    def usage(run: Sequence[dict[str, Any]]) -> dict[str, int]:
        with dspy.track_usage() as tracker:
            for inputs in run:
                text_program(**inputs)
        totals = tracker.get_total_tokens()
        assert list(totals) == ["scripted/scripted"]
        return totals["scripted/scripted"]

    once = usage([{"image": _image(RED), "prompt": "p"}])
    twice = usage([{"image": _image(RED), "prompt": "p"}] * 2)
    assert once["prompt_tokens"] > 0
    assert once["completion_tokens"] > 0
    assert once["total_tokens"] == once["prompt_tokens"] + once["completion_tokens"]
    assert twice["prompt_tokens"] == 2 * once["prompt_tokens"]
    assert twice["completion_tokens"] == 2 * once["completion_tokens"]

    text_only = ImageJudge(ALIGNMENT, judge_sees="text", judge_lm=lm, verbalizer_lm=ScriptedEngine().lm("vlm"))
    with dspy.track_usage() as tracker:
        text_only(image=_image(RED), prompt="p")
    judge_usage = tracker.get_total_tokens()["scripted/scripted"]
    assert judge_usage["prompt_tokens"] < once["prompt_tokens"]  # no image part, so fewer prompt tokens


# --------------------------------------------------------------------------------------------- CountingWorld
def test_counting_world_examples_are_balanced_and_deterministic() -> None:
    world = CountingWorld()
    first, again, other = world.examples(10, seed=3), world.examples(10, seed=3), world.examples(10, seed=4)
    assert [e.label for e in first] == ["yes", "no"] * 5
    assert [(e.id, e.prompt, e.image.url) for e in first] == [(e.id, e.prompt, e.image.url) for e in again]
    assert [e.image.url for e in first] != [e.image.url for e in other]
    assert len({e.image.url for e in first}) == 10
    assert all(set(e.inputs()) == {"image", "prompt"} for e in first)
    assert world.task.name == "circle_count"


def test_counting_world_seed_instructions_are_wrong_on_mismatches() -> None:
    world = CountingWorld()
    program = ImageJudge(world.task, judge_sees="text", verbalizer_lm=world.lm, judge_lm=world.lm)
    examples = world.examples(12, seed=5)
    labels = [program(**e.inputs()).label for e in examples]
    assert labels == ["yes"] * 12
    wrong = [e.id for e, label in zip(examples, labels, strict=True) if label != e.label]
    assert wrong == [e.id for e in examples if e.label == "no"]
    assert {c.inputs["description"] for c in world.engine.calls_for("judge")} == {SEED_DESCRIPTION}


def test_counting_world_count_instruction_and_number_rule_get_everything_right() -> None:
    world = CountingWorld()
    seed = ImageJudge(world.task, judge_sees="text", verbalizer_lm=world.lm, judge_lm=world.lm)
    program = seed.with_instructions(verbalizer=PROPOSED_VERBALIZER_INSTRUCTIONS[2], judge=NUMBER_RULE)
    examples = world.examples(12, seed=6)
    assert [program(**e.inputs()).label for e in examples] == [e.label for e in examples]
    # Either half alone is not enough.
    only_q = seed.with_instructions(verbalizer=PROPOSED_VERBALIZER_INSTRUCTIONS[2])
    only_p = seed.with_instructions(judge=NUMBER_RULE)
    assert [only_q(**e.inputs()).label for e in examples] == ["yes"] * 12
    assert [only_p(**e.inputs()).label for e in examples] == ["yes"] * 12
    # A judge that reads the image (no verbalization) cannot use the rule.
    image_judge = ImageJudge(world.task, judge_sees="image", judge_lm=world.lm).with_instructions(judge=NUMBER_RULE)
    assert [image_judge(**e.inputs()).label for e in examples] == ["yes"] * 12


def test_counting_world_fault_injection() -> None:
    world = CountingWorld(judge_fails_every=3)
    program = ImageJudge(world.task, judge_sees="image", judge_lm=world.lm)
    predictions = [program(**e.inputs()) for e in world.examples(6, seed=0)]
    assert [p.label is None for p in predictions] == [False, False, True, False, False, True]
    assert all("scripted judge failure" in p.error for p in predictions if p.label is None)


def test_counting_world_proposer() -> None:
    world = CountingWorld()
    update_q = dspy.Predict("history -> new_instruction")
    update_p = dspy.Predict("errors, tried_instructions -> new_instruction")
    with dspy.context(lm=world.lm):
        assert update_q(history="").new_instruction == PROPOSED_VERBALIZER_INSTRUCTIONS[0]
        tried = "\n".join(PROPOSED_VERBALIZER_INSTRUCTIONS[:2])
        assert update_q(history=tried).new_instruction == PROPOSED_VERBALIZER_INSTRUCTIONS[2]
        counted = "gold no, predicted yes: The image shows 3 red circles."
        assert update_p(errors=counted, tried_instructions="").new_instruction == NUMBER_RULE
        assert update_p(errors=SEED_DESCRIPTION, tried_instructions="").new_instruction == VAGUE_RULE
        again = update_p(errors=counted, tried_instructions=NUMBER_RULE).new_instruction
    assert again.startswith(NUMBER_RULE)
    assert again != NUMBER_RULE
    assert world.engine.count("proposer", with_images=True) == 0


def test_latency_makes_every_call_sleep_first() -> None:
    with pytest.raises(ValueError, match="latency"):
        ScriptedEngine(latency=-1)
    assert CountingWorld(latency=0.2).engine.latency == 0.2 and CountingWorld().engine.latency == 0.0
    engine = ScriptedEngine(latency=0.2)
    with dspy.context(lm=engine.lm()):
        began = time.perf_counter()
        assert dspy.Predict("question -> answer")(question="q").answer == "scripted answer"
        elapsed = time.perf_counter() - began
    assert elapsed >= 0.2 and engine.count() == 1  # a lower bound: sleep never returns early
