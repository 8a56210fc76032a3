"""Verbalizer, Judge and ImageJudge on scripted engines: calls made, label parsing, failures, copies, saving."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dspy
import pytest
from dspy.utils.callback import BaseCallback
from PIL import Image as PILImage

from blpo_dspy.images import LazyImage
from blpo_dspy.modules import ImageJudge, Judge, Verbalizer, named_instruction_predictors
from blpo_dspy.task import Task
from blpo_dspy.testing import Answer, ScriptedCall, ScriptedEngine

ALIGNMENT = Task.load("alignment")
PREFERENCE = Task.load("preference")
RATING = Task.load("rating")


def _png_bytes(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


RED, BLUE = _png_bytes((250, 0, 0)), _png_bytes((0, 0, 250))


def _image(data: bytes) -> dspy.Image:
    return dspy.Image(f"data:image/png;base64,{base64.b64encode(data).decode('ascii')}")


def _colour_of(data: bytes) -> str:
    red, _, blue = PILImage.open(io.BytesIO(data)).convert("RGB").getpixel((0, 0))
    return "red" if red > blue else "blue"


def _describe_colour(call: ScriptedCall) -> Answer:
    if call.role != "verbalizer":
        return None
    return {"description": f"A {_colour_of(call.images['image'][0])} square."}


def _judge_says(label: str) -> Callable[[ScriptedCall], Answer]:
    def rule(call: ScriptedCall) -> Answer:
        return {"rationale": "Because.", "label": label} if call.role == "judge" else None

    return rule


class Engines:
    """One engine for the verbalizer LM and one for the judge LM, so routing is observable."""

    def __init__(self, judge_rule: Callable[[ScriptedCall], Answer] | None = None) -> None:
        self.verbalizer = ScriptedEngine(rules=[_describe_colour], model="vlm")
        self.judge = ScriptedEngine(rules=[judge_rule or _judge_says("Yes.")], model="judge")
        self.verbalizer_lm = self.verbalizer.lm()
        self.judge_lm = self.judge.lm()

    def program(self, task: Task | str = ALIGNMENT, judge_sees: str = "image") -> ImageJudge:
        return ImageJudge(task, judge_sees=judge_sees, verbalizer_lm=self.verbalizer_lm, judge_lm=self.judge_lm)  # type: ignore[arg-type]

    def reset(self) -> None:
        self.verbalizer.reset()
        self.judge.reset()


# --------------------------------------------------------------------------------------------- which calls
def test_image_mode_makes_one_judge_call_with_the_image_and_no_verbalizer_call() -> None:
    engines = Engines()
    prediction = engines.program(judge_sees="image")(image=_image(RED), prompt="a red square")
    assert prediction.label == "yes"
    assert prediction.raw_label == "Yes."
    assert prediction.rationale == "Because."
    assert prediction.error is None
    assert engines.verbalizer.count() == 0
    (call,) = engines.judge.calls
    assert call.role == "judge"
    assert call.images == {"image": [RED]}
    assert call.inputs["prompt"] == "a red square"
    assert "description" not in call.inputs
    assert call.instructions == ALIGNMENT.judge_instruction
    assert call.output_fields == ("rationale", "label")
    assert "description" not in prediction


def test_text_mode_sends_no_image_to_the_judge() -> None:
    engines = Engines()
    prediction = engines.program(judge_sees="text")(image=_image(BLUE), prompt="a blue square")
    (verbal,) = engines.verbalizer.calls
    assert verbal.role == "verbalizer"
    assert verbal.images == {"image": [BLUE]}
    assert verbal.inputs["prompt"] == "a blue square"
    assert verbal.instructions == ALIGNMENT.verbalizer_instruction
    (judge,) = engines.judge.calls
    assert judge.all_images == 0
    assert engines.judge.count("judge", with_images=True) == 0
    assert judge.inputs["description"] == "A blue square."
    assert judge.inputs["prompt"] == "a blue square"
    assert prediction.description == "A blue square."
    assert prediction.label == "yes"


def test_both_mode_sends_image_and_description_to_the_judge() -> None:
    engines = Engines()
    prediction = engines.program(judge_sees="both")(image=_image(RED), prompt="p")
    assert engines.verbalizer.count("verbalizer", with_images=True) == 1
    (judge,) = engines.judge.calls
    assert judge.images == {"image": [RED]}
    assert judge.inputs["description"] == "A red square."
    assert prediction.description == "A red square."


@pytest.mark.parametrize("judge_sees", ["image", "text", "both"])
def test_pairwise_routes_each_image_to_its_own_field(judge_sees: str) -> None:
    engines = Engines(judge_rule=_judge_says("Image B"))
    prediction = engines.program(PREFERENCE, judge_sees)(image_a=_image(RED), image_b=_image(BLUE), prompt="p")
    assert prediction.label == "B"
    (judge,) = engines.judge.calls
    if judge_sees == "image":
        assert engines.verbalizer.count() == 0
    else:
        assert [c.images["image"] for c in engines.verbalizer.calls] == [[RED], [BLUE]]
        assert judge.inputs["description_a"] == "A red square."
        assert judge.inputs["description_b"] == "A blue square."
        assert prediction.description_a == "A red square."
        assert prediction.description_b == "A blue square."
    if judge_sees == "text":
        assert judge.all_images == 0
    else:
        assert judge.images == {"image_a": [RED], "image_b": [BLUE]}


def test_extra_inputs_are_ignored() -> None:
    engines = Engines()
    prediction = engines.program()(image=_image(RED), prompt="p", id="row-7", label="no")
    assert prediction.label == "yes"
    assert "id" not in engines.judge.calls[0].inputs


# --------------------------------------------------------------------------------------------- labels and failures
@pytest.mark.parametrize(
    ("task", "raw", "expected"),
    [(ALIGNMENT, "**No**", "no"), (ALIGNMENT, "1", "yes"), (RATING, "Score: 4", 4), (PREFERENCE, "A.", "A")],
)
def test_labels_are_parsed_to_canonical(task: Task, raw: str, expected: Any) -> None:
    engines = Engines(judge_rule=_judge_says(raw))
    inputs = {name: _image(RED) for name in task.image_fields} | {name: "t" for name in task.text_fields}
    prediction = engines.program(task)(**inputs)
    assert prediction.label == expected
    assert prediction.raw_label == raw
    assert prediction.error is None


def test_unparseable_label_gives_none_and_an_error() -> None:
    engines = Engines(judge_rule=_judge_says("perhaps"))
    prediction = engines.program()(image=_image(RED), prompt="p")
    assert prediction.label is None
    assert prediction.raw_label == "perhaps"
    assert "unparseable label" in prediction.error
    assert "perhaps" in prediction.error


@pytest.mark.parametrize("judge_sees", ["image", "text"])
def test_judge_lm_exception_gives_none_and_an_error(judge_sees: str) -> None:
    engines = Engines(judge_rule=lambda call: RuntimeError("judge exploded"))
    prediction = engines.program(judge_sees=judge_sees)(image=_image(RED), prompt="p")
    assert prediction.label is None
    assert prediction.raw_label is None
    assert "judge exploded" in prediction.error
    assert engines.judge.count() == 1  # one call, no silent retry


def test_verbalizer_exception_gives_none_and_skips_the_judge() -> None:
    engines = Engines()
    engines.verbalizer.rules = [lambda call: ValueError("vision down")]
    prediction = engines.program(judge_sees="text")(image=_image(RED), prompt="p")
    assert prediction.label is None
    assert prediction.error.startswith("verbalizer: ")
    assert "vision down" in prediction.error
    assert engines.judge.count() == 0


def test_image_changed_on_disk_is_a_scored_failure(tmp_path: Path) -> None:
    path = tmp_path / "cat.png"
    path.write_bytes(RED)
    image = LazyImage(path, hashlib.sha256(RED).hexdigest())
    path.write_bytes(BLUE)
    engines = Engines()
    prediction = engines.program()(image=image, prompt="p")
    assert prediction.label is None
    assert "cat.png" in prediction.error
    assert "changed on disk" in prediction.error
    assert engines.judge.count() == 0


def test_bad_judge_sees_and_task_by_name() -> None:
    with pytest.raises(ValueError, match="judge_sees"):
        ImageJudge(ALIGNMENT, judge_sees="video")  # type: ignore[arg-type]
    program = ImageJudge("rating", judge_sees="text")
    assert program.task == RATING
    assert program.verbalizer_lm is None
    assert program.judge_lm is None


def test_without_own_lms_the_configured_lm_is_used() -> None:
    engine = ScriptedEngine(rules=[_describe_colour, _judge_says("no")])
    program = ImageJudge(ALIGNMENT, judge_sees="text")
    with dspy.context(lm=engine.lm()):
        assert program(image=_image(RED), prompt="p").label == "no"
    assert [c.role for c in engine.calls] == ["verbalizer", "judge"]


@pytest.mark.parametrize("judge_sees", ["image", "text"])
def test_own_lms_win_over_the_configured_lm_whether_or_not_it_is_the_judge_lm(judge_sees: str) -> None:
    engines = Engines()
    stranger = ScriptedEngine(rules=[_describe_colour, _judge_says("no")], model="stranger")
    program = engines.program(judge_sees=judge_sees)
    for configured in (stranger.lm(), engines.judge_lm, engines.verbalizer_lm):
        with dspy.context(lm=configured):
            assert program(image=_image(RED), prompt="p").label == "yes"
        assert dspy.settings.lm is None  # nothing leaked out of the call
    assert stranger.count() == 0
    assert engines.judge.count("judge") == 3 and engines.judge.count("verbalizer") == 0
    assert engines.verbalizer.count("judge") == 0
    assert engines.verbalizer.count("verbalizer") == (3 if judge_sees == "text" else 0)


class _ModuleCalls(BaseCallback):
    def __init__(self) -> None:
        self.started: list[Any] = []

    def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self.started.append(instance)


@pytest.mark.parametrize("judge_sees", ["image", "text"])
def test_one_dspy_module_call_per_example_with_usage_and_callbacks_on_the_predictors(judge_sees: str) -> None:
    engines = Engines()
    program = engines.program(judge_sees=judge_sees)
    callback = _ModuleCalls()
    with dspy.context(callbacks=[callback], track_usage=True):
        prediction = program(image=_image(RED), prompt="p")
    assert prediction.label == "yes"
    # ImageJudge is the module call; its predictors are seen as usual; the inner Judge wrapper is not a second call
    expected = (
        [program, program.judge.predict]
        if judge_sees == "image"
        else [program, program.verbalizer, program.verbalizer.predict, program.judge.predict]
    )
    assert callback.started == expected
    usage = prediction.get_lm_usage()
    assert usage["scripted/judge"]["prompt_tokens"] > 0
    assert set(usage) == ({"scripted/judge", "scripted/vlm"} if judge_sees == "text" else {"scripted/judge"})
    assert len(program.judge.predict.history) == 1  # DSPy's per-module histories: the program holds all its calls
    assert len(program.history) == (2 if judge_sees == "text" else 1)
    assert len(program.judge.history) == 0


def test_judge_run_is_the_judge_call_without_the_module_layer() -> None:
    engines = Engines(_judge_says("No!"))
    judge = Judge(ALIGNMENT, "image")
    inputs = {"image": _image(RED), "prompt": "p", "unused": 1}
    with dspy.context(lm=engines.judge_lm):
        by_run, by_call = judge.run(inputs), judge(**inputs)
    assert (
        by_run.toDict()
        == by_call.toDict()
        == {"label": "no", "raw_label": "No!", "rationale": "Because.", "error": None}
    )
    assert [call.inputs.get("unused") for call in engines.judge.calls] == [None, None]
    assert len(judge.history) == 1  # only the module call recorded itself


def test_forward_called_directly_warns_as_dspy_does_and_module_calls_do_not(caplog: pytest.LogCaptureFixture) -> None:
    """Our modules read attributes without DSPy's per-read hook; ``forward`` itself gives DSPy's warning instead."""

    class Plain(dspy.Module):
        def forward(self, **inputs: Any) -> dspy.Prediction:
            return dspy.Prediction(**inputs)

    engines = Engines()
    program = engines.program(judge_sees="text")
    inputs = {"image": _image(RED), "prompt": "p"}
    with caplog.at_level("WARNING"):
        program(**inputs)
        program.judge(**inputs, description="d")
        assert not caplog.records  # module calls, including the verbalizer's inside the program, do not warn
        program.forward(**inputs)
        program.judge.forward(**inputs, description="d")
        with dspy.context(lm=engines.verbalizer_lm):
            program.verbalizer.forward(image=_image(RED), prompt="p")
        Plain().forward(x=1)
    messages = [record.getMessage() for record in caplog.records]
    dspy_message = messages.pop()
    assert messages == [dspy_message.replace("Plain", name) for name in ("ImageJudge", "Judge", "Verbalizer")]


# --------------------------------------------------------------------------------------------- copies
@pytest.mark.parametrize("copier", ["deepcopy", "reset_copy"])
def test_lms_survive_copies_and_stay_routed(copier: str) -> None:
    engines = Engines()
    program = engines.program(judge_sees="text")
    clone = getattr(program, copier)()
    assert clone is not program
    assert all(p.lm is None for _, p in clone.named_predictors())
    assert clone.verbalizer_lm is not None
    assert clone.judge_lm is not None
    assert clone(image=_image(RED), prompt="p").label == "yes"
    assert engines.verbalizer.count("verbalizer") == 1
    assert engines.verbalizer.count("judge") == 0
    assert engines.judge.count("judge") == 1
    assert engines.judge.count("verbalizer") == 0


def test_named_predictors_are_the_verbalizer_and_the_judge() -> None:
    program = ImageJudge(ALIGNMENT)
    assert [name for name, _ in program.named_predictors()] == ["verbalizer.predict", "judge.predict"]
    predictors = named_instruction_predictors(program)
    assert predictors["verbalizer"] is program.verbalizer.predict
    assert predictors["judge"] is program.judge.predict


# --------------------------------------------------------------------------------------------- instructions
def test_with_instructions_returns_a_new_program_and_leaves_the_original() -> None:
    engines = Engines()
    program = engines.program(judge_sees="text")
    seed = dict(program.instructions)
    assert seed == {"verbalizer": ALIGNMENT.verbalizer_instruction, "judge": ALIGNMENT.judge_instruction}

    changed = program.with_instructions(verbalizer="Count the squares.", judge="Compare the counts.")
    assert changed is not program
    assert changed.instructions == {"verbalizer": "Count the squares.", "judge": "Compare the counts."}
    assert program.instructions == seed
    only_judge = program.with_instructions(judge="Only p.")
    assert only_judge.instructions == {"verbalizer": seed["verbalizer"], "judge": "Only p."}

    changed(image=_image(RED), prompt="p")
    program(image=_image(RED), prompt="p")
    assert [c.instructions for c in engines.verbalizer.calls] == ["Count the squares.", seed["verbalizer"]]
    assert [c.instructions for c in engines.judge.calls] == ["Compare the counts.", seed["judge"]]


def test_setting_an_instruction_does_not_leak_into_other_predictors() -> None:
    first, second = Judge(ALIGNMENT), Judge(ALIGNMENT)
    first.set_instruction("Mutated p.")
    assert first.instruction == "Mutated p."
    assert second.instruction == ALIGNMENT.judge_instruction
    assert ALIGNMENT.judge_signature().instructions == ALIGNMENT.judge_instruction

    verbal_a, verbal_b = Verbalizer(ALIGNMENT), Verbalizer(ALIGNMENT)
    verbal_a.set_instruction("Mutated q.")
    assert verbal_b.instruction == ALIGNMENT.verbalizer_instruction

    program = ImageJudge(ALIGNMENT)
    program.with_instructions(verbalizer="q2", judge="p2")
    program.judge.set_instruction("p3")
    fresh = ImageJudge(ALIGNMENT)
    assert fresh.instructions == {"verbalizer": ALIGNMENT.verbalizer_instruction, "judge": ALIGNMENT.judge_instruction}
    copy = fresh.deepcopy()
    copy.judge.set_instruction("p4")
    assert fresh.instructions["judge"] == ALIGNMENT.judge_instruction


def test_instruction_constructor_arguments() -> None:
    assert Verbalizer(ALIGNMENT, instruction="q0").instruction == "q0"
    judge = Judge(PREFERENCE, judge_sees="text", instruction="p0")
    assert judge.instruction == "p0"
    assert list(judge.predict.signature.input_fields) == ["description_a", "description_b", "prompt"]


# --------------------------------------------------------------------------------------------- saving
def test_program_save_and_load_round_trips_both_instructions(tmp_path: Path) -> None:
    engines = Engines()
    program = engines.program(judge_sees="text").with_instructions(verbalizer="Count it.", judge="Check counts.")
    path = tmp_path / "program.json"
    program.save(str(path))
    state = json.loads(path.read_text(encoding="utf-8"))
    assert state["verbalizer.predict"]["signature"]["instructions"] == "Count it."
    assert state["judge.predict"]["signature"]["instructions"] == "Check counts."

    fresh = engines.program(judge_sees="text")
    fresh.load(str(path))
    assert fresh.instructions == {"verbalizer": "Count it.", "judge": "Check counts."}
    assert list(fresh.judge.predict.signature.input_fields) == ["description", "prompt"]
    fresh(image=_image(RED), prompt="p")
    assert engines.verbalizer.calls[-1].instructions == "Count it."
    assert engines.judge.calls[-1].instructions == "Check counts."
    # Loading did not touch other programs of the same task.
    assert ImageJudge(ALIGNMENT).instructions["judge"] == ALIGNMENT.judge_instruction
