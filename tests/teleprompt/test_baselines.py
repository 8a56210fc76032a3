"""The paper's baselines: no-opt, fixed I2T, judge-prompt-as-I2T, OPRO, APO-image (scripted worlds only)."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from typing import Any

import dspy
import pytest

from blpo_dspy.cache import VerbalizationCache
from blpo_dspy.evaluation import evaluate
from blpo_dspy.images import LazyImage
from blpo_dspy.modules import ImageJudge
from blpo_dspy.teleprompt import BLPO
from blpo_dspy.teleprompt.baselines import (
    OPRO,
    APOImage,
    FixedI2T,
    JudgePromptAsI2T,
    NoOptimization,
    lm_supports_images,
)
from blpo_dspy.testing import NUMBER_RULE, CountingWorld, ScriptedCall

COUNTING_Q = "Count the circles in the image and state the exact number."
BLPO_KNOBS: dict[str, Any] = {"outer_steps": 2, "inner_steps": 3, "error_batch_size": 5, "retain_batch_size": 5}


def _data(world: CountingWorld) -> tuple[list[dspy.Example], list[dspy.Example], list[dspy.Example]]:
    return world.examples(20, seed=1), world.examples(12, seed=2), world.examples(16, seed=3)


def _f1(program: dspy.Module, examples: list[dspy.Example]) -> float:
    return evaluate(program, examples, metric="macro_f1", ci=False).scores["macro_f1"].value


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_no_optimization_returns_an_unchanged_copy_and_makes_no_call() -> None:
    world = CountingWorld()
    lm = world.lm
    student = ImageJudge(world.task, judge_sees="text", verbalizer_lm=lm, judge_lm=lm)
    train, val, _ = _data(world)
    compiled = NoOptimization().compile(student, trainset=train, valset=val)
    assert compiled is not student
    assert compiled.instructions == student.instructions == compiled.best_instructions_
    assert compiled.usage_["total"]["calls"] == 0 and compiled.history_ == []
    assert not world.engine.calls


def test_fixed_i2t_cannot_find_the_cue_that_blpo_finds() -> None:
    world = CountingWorld()
    lm = world.lm
    train, val, test = _data(world)
    seed_program = ImageJudge(world.task, judge_sees="text", verbalizer_lm=lm, judge_lm=lm)
    seed_f1 = _f1(seed_program, test)

    fixed_world = CountingWorld()
    fixed_lm = fixed_world.lm
    fixed = FixedI2T(proposer_lm=fixed_lm, **BLPO_KNOBS).compile(
        ImageJudge(world.task, judge_sees="text", verbalizer_lm=fixed_lm, judge_lm=fixed_lm),
        trainset=train,
        valset=val,
    )
    verbalized_under = {c.instructions for c in fixed_world.engine.calls_for("verbalizer")}
    assert verbalized_under == {seed_program.verbalizer.instruction}  # q never changed
    assert fixed.best_instructions_["verbalizer"] == seed_program.verbalizer.instruction
    assert _f1(fixed, test) <= seed_f1 + 0.1
    assert fixed.usage_["proposer"]["images"] == 0

    blpo_world = CountingWorld()
    blpo_lm = blpo_world.lm
    blpo = BLPO(proposer_lm=blpo_lm, **BLPO_KNOBS).compile(
        ImageJudge(world.task, judge_sees="text", verbalizer_lm=blpo_lm, judge_lm=blpo_lm), trainset=train, valset=val
    )
    assert _f1(blpo, test) >= 0.9


def test_judge_prompt_as_i2t_verbalizes_under_the_judge_instructions() -> None:
    world = CountingWorld()
    lm = world.lm
    train, val, _ = _data(world)
    student = ImageJudge(world.task, judge_sees="text", verbalizer_lm=lm, judge_lm=lm)
    compiled = JudgePromptAsI2T(proposer_lm=lm, **BLPO_KNOBS).compile(student, trainset=train, valset=val)
    judge_instructions = {student.judge.instruction} | {h["p_prime"] for h in compiled.history_ if h["p_prime"]}
    q_used = {h["q"] for h in compiled.history_}
    assert q_used <= judge_instructions and student.judge.instruction in q_used
    optimization_calls = world.engine.calls_for("verbalizer")
    assert {c.instructions for c in optimization_calls} <= judge_instructions | {student.verbalizer.instruction}
    assert any(c.instructions == student.judge.instruction for c in optimization_calls)
    assert world.engine.count("proposer", with_images=True) == 0


def test_ablations_fix_their_policy_and_round_trip_params() -> None:
    lm = CountingWorld().lm
    with pytest.raises(ValueError, match="i2t_policy='fixed'"):
        FixedI2T(proposer_lm=lm, i2t_policy="optimize")
    opt = JudgePromptAsI2T(proposer_lm=lm, outer_steps=3, selection="paper", max_calls=40)
    clone = JudgePromptAsI2T(**opt.get_params())
    assert clone.get_params() == opt.get_params()
    assert clone.i2t_policy == "judge_prompt" and clone.selection == "paper"


def _opro_proposer(proposals: list[str]) -> Any:
    """A proposer answering OPRO calls with the given instructions in turn."""
    queue = list(proposals)

    def rule(call: ScriptedCall) -> Any:
        if call.role == "proposer" and "scored_instructions" in call.inputs:
            return {"new_instruction": queue.pop(0) if queue else "Look carefully."}
        return None

    return rule


def test_opro_sees_only_scored_instructions_and_keeps_the_best_validated() -> None:
    world = CountingWorld()
    world.engine.rules.insert(0, _opro_proposer(["Judge the colours.", NUMBER_RULE, "Judge the layout."]))
    lm = world.lm
    train, val, test = _data(world)
    student = ImageJudge(world.task, judge_sees="text", verbalizer_lm=lm, judge_lm=lm).with_instructions(
        verbalizer=COUNTING_Q
    )
    compiled = OPRO(proposer_lm=lm, outer_steps=3, proposals_per_step=1, num_threads=4).compile(
        student, trainset=train, valset=val
    )
    calls = world.engine.calls_for("proposer")
    assert len(calls) == 3
    for k, call in enumerate(calls):
        assert set(call.inputs) == {"task_description", "scored_instructions"}
        assert not call.has_image
        assert "gold" not in call.user_text.lower()  # no error examples
        assert len(re.findall(r"^- score \d\.\d\d: ", call.inputs["scored_instructions"], re.M)) == k + 1
    assert "Judge the colours." in calls[1].inputs["scored_instructions"]
    assert compiled.best_instructions_ == {"verbalizer": COUNTING_Q, "judge": NUMBER_RULE}
    assert compiled.instructions == compiled.best_instructions_
    assert compiled.best_score_ == 1.0 > compiled.seed_score_
    by_text = {h["instruction"]: h for h in compiled.history_}
    # a tie with the incumbent is accepted (the validation metric did not drop), a worse train score is not validated
    assert [h["instruction"] for h in compiled.history_ if h["accepted"]] == ["Judge the colours.", NUMBER_RULE]
    assert by_text["Judge the layout."]["train_score"] < 1.0
    assert by_text["Judge the layout."]["val_score"] is None and not by_text["Judge the layout."]["accepted"]
    assert _f1(compiled, test) == 1.0
    assert compiled.usage_["proposer"]["calls"] == 3 and compiled.usage_["proposer"]["images"] == 0


def _apo(lm: dspy.LM, **kwargs: Any) -> APOImage:
    return APOImage(proposer_lm=lm, proposer_supports_images=True, outer_steps=2, num_threads=4, **kwargs)


@pytest.mark.parametrize(
    "make",
    [
        lambda lm, cap: OPRO(proposer_lm=lm, outer_steps=4, max_calls=cap, num_threads=4),
        lambda lm, cap: _apo(lm, max_calls=cap),
        lambda lm, cap: FixedI2T(proposer_lm=lm, max_calls=cap, num_threads=4, **BLPO_KNOBS),
        lambda lm, cap: JudgePromptAsI2T(proposer_lm=lm, max_calls=cap, num_threads=4, **BLPO_KNOBS),
    ],
    ids=["opro", "apo-image", "fixed-i2t", "judge-prompt-i2t"],
)
def test_baselines_respect_max_calls(make: Any) -> None:
    world = CountingWorld()
    lm = world.lm
    train, val, _ = _data(world)
    student = ImageJudge(world.task, judge_sees="text", verbalizer_lm=lm, judge_lm=lm)
    compiled = make(lm, 90).compile(student, trainset=train, valset=val)
    assert compiled.stop_reason_ == "budget"
    assert len(world.engine.calls) <= 90
    assert compiled.usage_["total"]["calls"] <= 90
    assert compiled.instructions == compiled.best_instructions_


def test_a_per_role_cap_stops_opro_at_its_proposer_budget() -> None:
    world = CountingWorld()
    lm = world.lm
    train, val, _ = _data(world)
    student = ImageJudge(world.task, judge_sees="image", judge_lm=lm)
    compiled = OPRO(proposer_lm=lm, outer_steps=5, max_calls={"proposer": 2}).compile(
        student, trainset=train, valset=val
    )
    assert world.engine.count("proposer") == 2
    assert compiled.stop_reason_ == "budget"


class _VisionEngine:
    supports_vision = True

    def complete(self, request: Any) -> Any:  # never called
        raise AssertionError("no call expected")


def test_apo_image_refuses_a_text_only_or_unknown_proposer() -> None:
    world = CountingWorld()
    with pytest.raises(ValueError, match="proposer_supports_images=True"):
        APOImage(proposer_lm=world.lm)  # a custom engine that declares nothing: unknown
    with pytest.raises(ValueError, match="proposer_supports_images=False"):
        APOImage(proposer_lm=world.lm, proposer_supports_images=False)
    text_only = dspy.LM("openai/gpt-3.5-turbo")
    assert lm_supports_images(text_only) is not True
    with pytest.raises(ValueError, match=re.escape("gpt-3.5-turbo")):
        APOImage(proposer_lm=text_only)
    vision = dspy.LM("openai/gpt-4o")
    assert lm_supports_images(vision) is True  # from DSPy's bundled model metadata, no network
    APOImage(proposer_lm=vision)
    declared = dspy.LM("custom/vision", engine=_VisionEngine())
    assert lm_supports_images(declared) is True
    APOImage(proposer_lm=declared)


def test_apo_image_shows_the_error_images_and_blpo_never_does() -> None:
    world = CountingWorld()
    lm = world.lm
    train, val, _ = _data(world)
    student = ImageJudge(world.task, judge_sees="image", judge_lm=lm)
    compiled = _apo(lm, error_batch_size=4).compile(student, trainset=train, valset=val)
    calls = world.engine.calls_for("proposer")
    assert calls and all(call.has_image for call in calls)
    shown = [entry["images_shown"] for entry in compiled.history_ if entry["instruction"] is not None]
    assert [len(call.images["error_images"]) for call in calls] == shown == [4] * len(calls)
    # every image shown is a train image the seed judge got wrong (the scripted judge answers "yes" to all)
    wrong = {_sha(_png_bytes(ex.image)) for ex in train if ex.label == "no"}
    for call in calls:
        assert {_sha(data) for data in call.images["error_images"]} <= wrong
        assert call.inputs["errors"].count("gold label: no") == 4
        assert call.inputs["errors"].count("judge's label: yes") == 4
    assert compiled.usage_["proposer"]["images"] == sum(len(c.images["error_images"]) for c in calls)

    blpo_world = CountingWorld()
    blpo_lm = blpo_world.lm
    program = ImageJudge(world.task, judge_sees="image", verbalizer_lm=blpo_lm, judge_lm=blpo_lm)
    BLPO(proposer_lm=blpo_lm, selection="paper", **BLPO_KNOBS).compile(program, trainset=train, valset=val)
    assert blpo_world.engine.count("proposer") > 0
    assert blpo_world.engine.count("proposer", with_images=True) == 0


def _png_bytes(image: dspy.Image) -> bytes:
    return base64.b64decode(image.url.split(",", 1)[1])


# ---------------------------------------------------------------------------------------------- the call layer
def _call_key(call: ScriptedCall) -> tuple[Any, ...]:
    """Everything a judge or verbalizer call depends on: instruction, text inputs and image bytes."""
    images = tuple(sorted((name, tuple(_sha(data) for data in parts)) for name, parts in call.images.items()))
    return call.instructions, tuple(sorted(call.inputs.items())), images


def test_opro_never_repeats_a_judge_or_verbalizer_call() -> None:
    world = CountingWorld()
    # the third proposal repeats an instruction already scored; no valset: validation reuses the train judgments
    world.engine.rules.insert(0, _opro_proposer(["Judge the colours.", NUMBER_RULE, "Judge the colours."]))
    lm = world.lm
    train, _, _ = _data(world)
    # the judge sees image and description, so a call's content identifies its example
    student = ImageJudge(world.task, judge_sees="both", verbalizer_lm=lm, judge_lm=lm).with_instructions(
        verbalizer=COUNTING_Q
    )
    compiled = OPRO(proposer_lm=lm, outer_steps=3, proposals_per_step=1, num_threads=4).compile(student, trainset=train)
    judge_keys = [_call_key(call) for call in world.engine.calls_for("judge")]
    verbalizer_keys = [_call_key(call) for call in world.engine.calls_for("verbalizer")]
    assert len(judge_keys) == len(set(judge_keys))
    assert len(verbalizer_keys) == len(set(verbalizer_keys)) == len(train)  # each image once, under the seed q
    assert {call.instructions for call in world.engine.calls_for("verbalizer")} == {COUNTING_Q}
    # seed, "Judge the colours." and the number rule are each judged once on train; the duplicate is not judged
    assert len(judge_keys) == 3 * len(train)
    assert [h["duplicate"] for h in compiled.history_] == [False, False, True]
    assert compiled.charged_calls_ == len(world.engine.calls) == compiled.usage_["total"]["calls"]


def test_opro_compiles_sharing_a_cache_path_share_verbalizations(tmp_path: Path) -> None:
    cache = tmp_path / "verbalizations.sqlite"
    results = []
    for _ in range(2):
        world = CountingWorld()
        world.engine.rules.insert(0, _opro_proposer(["Judge the colours.", NUMBER_RULE]))
        lm = world.lm
        train, val, _ = _data(world)
        student = ImageJudge(world.task, judge_sees="text", verbalizer_lm=lm, judge_lm=lm).with_instructions(
            verbalizer=COUNTING_Q
        )
        opt = OPRO(proposer_lm=lm, outer_steps=2, proposals_per_step=1, num_threads=4, cache_path=cache)
        results.append((world, opt.compile(student, trainset=train, valset=val)))
    (first_world, first), (second_world, second) = results
    assert first_world.engine.count("verbalizer") == len(train) + len(val) == len(VerbalizationCache(cache))
    assert second_world.engine.count("verbalizer") == 0 and second.usage_["verbalizer"]["calls"] == 0
    assert second_world.engine.count("judge") == first_world.engine.count("judge")
    assert second.best_instructions_ == first.best_instructions_ == {"verbalizer": COUNTING_Q, "judge": NUMBER_RULE}
    assert [h["train_score"] for h in second.history_] == [h["train_score"] for h in first.history_]


def test_apo_image_judges_each_split_once_per_instruction_and_scores_failed_calls() -> None:
    world = CountingWorld(judge_fails_every=4)
    lm = world.lm
    train, val, _ = _data(world)
    student = ImageJudge(world.task, judge_sees="image", judge_lm=lm)
    opt = APOImage(proposer_lm=lm, proposer_supports_images=True, outer_steps=2, error_batch_size=3, num_threads=1)
    compiled = opt.compile(student, trainset=train, valset=val)
    scored = [h for h in compiled.history_ if h["train_score"] is not None and not h["duplicate"]]
    validated = [h for h in compiled.history_ if h["val_score"] is not None]
    assert scored and compiled.stop_reason_ == "outer_steps"
    # error sampling reuses the incumbent's train judgments (failed calls included): no judge call is repeated
    expected = (1 + len(scored)) * len(train) + (1 + len(validated)) * len(val)
    assert world.engine.count("judge") == expected == compiled.usage_["judge"]["calls"]
    assert compiled.usage_["judge"]["failures"] == expected // 4  # every 4th call raised: scored, never fatal
    assert compiled.seed_score_ is not None and compiled.seed_score_ < 1.0


def test_apo_image_a_vanished_error_image_fails_the_proposal_not_the_search(tmp_path: Path) -> None:
    world = CountingWorld()
    lm = world.lm

    def on_disk(examples: list[dspy.Example]) -> list[dspy.Example]:
        out = []
        for example in examples:
            data = _png_bytes(example.image)
            path = tmp_path / f"{example.id}.png"
            path.write_bytes(data)
            out.append(example.copy(image=LazyImage(path, _sha(data))))
        return out

    train, val, _ = (on_disk(split) for split in _data(world))
    for example in train:
        if example.label == "no":  # the seed judge answers "yes": these are exactly its errors
            example.image.path.unlink()
    student = ImageJudge(world.task, judge_sees="image", judge_lm=lm)
    opt = APOImage(proposer_lm=lm, proposer_supports_images=True, outer_steps=1, error_batch_size=3, num_threads=2)
    compiled = opt.compile(student, trainset=train, valset=val)
    assert compiled.stop_reason_ == "outer_steps"
    assert [h["error"] for h in compiled.history_] == ["proposal failed", "proposal failed"]
    assert world.engine.count("proposer") == 0 and compiled.usage_["proposer"]["calls"] == 0
    assert compiled.best_instructions_["judge"] == student.judge.instruction
    assert compiled.charged_calls_ == len(train) + len(val) + 2  # the seed's judge calls and both failed attempts
