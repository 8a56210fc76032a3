"""DSPy built-in optimizers on an ImageJudge: per-role call counting, budgets, and no images to a text proposer."""

from __future__ import annotations

import collections
import copy
import io
import threading
from typing import Any

import dspy
import pytest
from PIL import Image as PILImage

from blpo_dspy.modules import ImageJudge
from blpo_dspy.teleprompt.builtins import (
    BUILTIN_OPTIMIZERS,
    IMAGE_PLACEHOLDER,
    LMCallCounter,
    make_optimizer,
    plan_budget,
    share_on_deepcopy,
    strip_images,
)
from blpo_dspy.testing import NUMBER_RULE, CountingWorld, ScriptedCall


def _answer_any_proposer_signature(call: ScriptedCall) -> Any:
    """Answer the built-ins' own proposer signatures (CountingWorld's proposer only knows ``new_instruction``)."""
    if call.role != "proposer" or "new_instruction" in call.output_fields:
        return None
    out: dict[str, Any] = {}
    for name in call.output_fields:
        if name == "module_advice":
            out[name] = {"verbalizer.predict": "Count the circles.", "judge.predict": NUMBER_RULE}
        elif name == "proposed_instruction":
            out[name] = "Count the circles in the image and state the exact number."
        else:
            out[name] = f"scripted {name}"
    return out


def _world() -> tuple[CountingWorld, dspy.LM]:
    world = CountingWorld()
    world.engine.rules.insert(0, _answer_any_proposer_signature)
    return world, world.lm


def _image(value: int) -> dspy.Image:
    buffer = io.BytesIO()
    PILImage.new("RGB", (4, 4), (value, 0, 0)).save(buffer, format="PNG")
    return dspy.Image(buffer.getvalue())


def test_counter_classifies_roles_counts_images_and_tokens() -> None:
    world, lm = _world()
    program = ImageJudge(world.task, judge_sees="both", verbalizer_lm=lm, judge_lm=lm)
    examples = world.examples(3)
    outer, inner = LMCallCounter(), LMCallCounter()
    with outer.active():
        for example in examples:
            program(**example.inputs())
        with inner.active(), dspy.context(lm=lm):
            dspy.Predict("task_description -> new_instruction")(task_description="improve the judge")
    usage = outer.usage()
    for role in ("verbalizer", "judge", "proposer"):
        assert usage[role]["calls"] == world.engine.count(role)
    assert usage["verbalizer"]["calls"] == usage["judge"]["calls"] == 3
    assert usage["proposer"]["calls"] == 1
    # judge_sees="both": the verbalizer and the judge each got the image, the proposer none
    assert usage["verbalizer"]["images"] == usage["judge"]["images"] == 3
    assert usage["proposer"]["images"] == 0
    assert usage["total"]["calls"] == 7 and usage["total"]["images"] == 6
    # tokens: exactly what the LM reported, summed over its history
    assert usage["total"]["prompt_tokens"] == sum(e["usage"]["prompt_tokens"] for e in lm.history) > 0
    assert usage["total"]["completion_tokens"] == sum(e["usage"]["completion_tokens"] for e in lm.history) > 0
    # the nested counter saw only the proposer call, and the outer counter still saw it
    assert inner.calls() == inner.calls("proposer") == 1


def test_counter_classifies_a_registered_lm_by_identity() -> None:
    world = CountingWorld()
    judge_lm, critic_lm = world.lm, world.engine.lm("critic")
    program = ImageJudge(world.task, judge_sees="image", judge_lm=judge_lm)
    counter = LMCallCounter(lms={"proposer": critic_lm})
    example = world.examples(1)[0]
    with counter.active():
        program(**example.inputs())
        program.deepcopy()(**example.inputs())  # a deep-copied judge LM is still classified by its request
        with dspy.context(lm=critic_lm):  # a judge-shaped request made by the registered LM
            program.judge.predict(**example.inputs())
    assert counter.calls("judge") == 2 and counter.calls("proposer") == 1
    assert counter.images("proposer") == 1


def test_counter_counts_failed_calls() -> None:
    world = CountingWorld(judge_fails_every=2)
    lm = world.lm
    program = ImageJudge(world.task, judge_sees="image", judge_lm=lm)
    counter = LMCallCounter()
    with counter.active():
        for example in world.examples(4):
            program(**example.inputs())
    usage = counter.usage()
    assert usage["judge"]["calls"] == 4
    assert usage["judge"]["failures"] == 2


def test_strip_images_replaces_every_image_and_keeps_the_rest() -> None:
    image = _image(10)
    marker = str(image)  # the custom-type marker string a stringified image becomes
    data = {
        "Inputs": {"image": image, "prompt": "two cats", "pair": [image, "text", (image, 3)]},
        "Generated Outputs": f"before {marker} after",
        "Feedback": "Wrong.",
    }
    out = strip_images(data)
    assert out["Inputs"]["image"] == IMAGE_PLACEHOLDER
    assert out["Inputs"]["prompt"] == "two cats"
    assert out["Inputs"]["pair"] == [IMAGE_PLACEHOLDER, "text", (IMAGE_PLACEHOLDER, 3)]
    assert out["Generated Outputs"] == f"before {IMAGE_PLACEHOLDER} after"
    assert out["Feedback"] == "Wrong."
    assert isinstance(data["Inputs"]["image"], dspy.Image)  # the input is not modified


def test_shared_lm_survives_program_copies_without_its_history() -> None:
    world = CountingWorld()
    lm = world.lm
    shared = share_on_deepcopy(lm)
    assert shared is not lm and share_on_deepcopy(shared) is shared
    program = ImageJudge(world.task, judge_sees="text", verbalizer_lm=shared, judge_lm=shared)
    program(**world.examples(1)[0].inputs())
    assert len(shared.history) == 2 and not lm.history  # the original LM is untouched
    copied = program.deepcopy()
    assert copied.judge_lm is shared and copied.verbalizer_lm is shared
    plain = ImageJudge(world.task, judge_sees="text", verbalizer_lm=lm, judge_lm=lm).deepcopy()
    assert plain.judge_lm is lm  # ImageJudge shares its LMs across deep copies too (no history copies)
    # an lm.copy() of a shared LM (SIMBA's hot rollout models) is its own LM, also kept by deep copies
    hot = shared.copy(temperature=1.0, rollout_id=3)
    assert isinstance(hot, type(lm)) and hot is not shared
    assert copy.deepcopy(hot) is hot and hot.kwargs["temperature"] == 1.0


@pytest.mark.parametrize("name", BUILTIN_OPTIMIZERS)
def test_plans_fit_the_budget_and_grow_with_it(name: str) -> None:
    sizes = {"n_train": 20, "n_val": 12, "per_example": 2}
    budget = 40 if name == "bootstrap" else 400  # bootstrap is bounded by the data (32 examples x 2 calls)
    small = plan_budget(name, budget, **sizes)
    large = plan_budget(name, 4000, **sizes)
    assert small.within_budget and large.within_budget
    assert small.estimated_calls <= budget and large.estimated_calls <= 4000
    assert large.estimated_calls > small.estimated_calls
    tiny = plan_budget(name, 3, **sizes)
    if name != "bootstrap":
        assert not tiny.within_budget  # the smallest meaningful run does not fit 3 calls
    assert small.calls_per_example == 2


def test_plan_and_factory_validate() -> None:
    with pytest.raises(ValueError, match="unknown built-in optimizer"):
        plan_budget("textgrad", 100, n_train=4, n_val=4, per_example=1)
    with pytest.raises(ValueError, match="budget_calls"):
        plan_budget("gepa", 0, n_train=4, n_val=4, per_example=1)
    with pytest.raises(ValueError, match="unknown built-in optimizer"):
        make_optimizer("textgrad", proposer_lm=CountingWorld().lm)
    with pytest.raises(ValueError, match="proposer_lm"):
        make_optimizer("gepa")
    make_optimizer("bootstrap")  # BootstrapFewShot has no proposer


BUDGETS = {"mipro": 300, "copro": 300, "gepa": 300, "simba": 250, "bootstrap": 300}


def _alternating_judge() -> Any:
    """A judge rule answering yes/no in turn per example, so SIMBA's rollouts of one example differ and it writes rules.

    The turn is counted per request text, not globally: under threads, a global counter can hand all the rollouts
    of one example the same parity, and SIMBA then (rightly) skips rule generation.
    """
    turns: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def rule(call: ScriptedCall) -> Any:
        if call.role != "judge":
            return None
        with lock:
            turn = turns[call.user_text]
            turns[call.user_text] += 1
        return {"rationale": "Alternating.", "label": "yes" if turn % 2 else "no"}

    return rule


@pytest.mark.parametrize("name", BUILTIN_OPTIMIZERS)
def test_builtin_completes_and_a_text_only_proposer_never_gets_an_image(name: str) -> None:
    world, lm = _world()
    if name == "simba":
        world.engine.rules.insert(0, _alternating_judge())
    student = ImageJudge(world.task, judge_sees="text", verbalizer_lm=lm, judge_lm=lm)
    train, val = world.examples(12, seed=1), world.examples(8, seed=2)
    optimizer = make_optimizer(name, proposer_lm=lm, budget_calls=BUDGETS[name], seed=0, num_threads=2)
    compiled = optimizer.compile(student, trainset=train, valset=val)

    assert compiled is not student and compiled.optimizer_name_ == name
    assert compiled.best_instructions_ == compiled.instructions
    usage = compiled.usage_
    for role in ("verbalizer", "judge", "proposer"):
        # the callback saw every call; a call asking for n completions (COPRO) reaches the engine n times
        assert usage[role]["completions"] == world.engine.count(role)
        assert usage[role]["calls"] <= usage[role]["completions"]
    assert world.engine.count("verbalizer") > 0 and world.engine.count("judge") > 0
    assert world.engine.count("proposer", with_images=True) == 0
    assert usage["proposer"]["images"] == 0
    if name != "bootstrap":
        assert usage["proposer"]["calls"] > 0
    plan = compiled.budget_plan_
    assert plan["within_budget"]
    assert usage["total"]["calls"] <= BUDGETS[name] + (len(val) * 2 if name == "gepa" else 0)
    assert not hasattr(compiled, "candidate_programs")  # heavy diagnostics become the JSON history_
    assert isinstance(compiled.history_, list)
    assert compiled.verbalizer.cache is None  # the compile-time verbalization cache is detached


@pytest.mark.parametrize("name", ["gepa", "mipro"])
def test_an_image_capable_proposer_is_shown_images(name: str) -> None:
    # the contrast that makes the text-only test meaningful: left alone, GEPA's reflection proposer and MIPROv2's
    # demo-aware proposer send the verbalizer's images
    world, lm = _world()
    student = ImageJudge(world.task, judge_sees="text", verbalizer_lm=lm, judge_lm=lm)
    optimizer = make_optimizer(name, proposer_lm=lm, budget_calls=300, num_threads=2, proposer_supports_images=True)
    compiled = optimizer.compile(student, trainset=world.examples(12, seed=1), valset=world.examples(8, seed=2))
    assert world.engine.count("proposer", with_images=True) > 0
    assert compiled.usage_["proposer"]["images"] > 0


def test_simba_refuses_different_lms_for_a_text_judge() -> None:
    world, lm = _world()
    other = CountingWorld().engine.lm("another-model")
    student = ImageJudge(world.task, judge_sees="text", verbalizer_lm=other, judge_lm=lm)
    optimizer = make_optimizer("simba", proposer_lm=lm, budget_calls=200)
    with pytest.raises(ValueError, match="same LM for the verbalizer and the judge"):
        optimizer.compile(student, trainset=world.examples(12, seed=1), valset=world.examples(8, seed=2))
    assert not world.engine.calls
