"""BLPO mechanics on scripted worlds: the optimizer's effect, calls, caching, determinism, resume, budgets."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import dspy
import pytest

from blpo_dspy.evaluation import evaluate
from blpo_dspy.modules import ImageJudge
from blpo_dspy.persistence import load_program
from blpo_dspy.task import Task
from blpo_dspy.teleprompt import BLPO, ResumeError
from blpo_dspy.testing import NUMBER_RULE, CountingWorld, ScriptedEngine

REPO = Path(__file__).resolve().parents[2]


def _splits(world: CountingWorld) -> tuple[list[dspy.Example], list[dspy.Example], list[dspy.Example]]:
    return world.examples(20, seed=1), world.examples(12, seed=2), world.examples(16, seed=3)


def _compile(world: CountingWorld, judge_sees: str = "text", **kwargs: Any) -> dspy.Module:
    train, val, _ = _splits(world)
    program = ImageJudge(world.task, judge_sees=judge_sees, verbalizer_lm=world.lm, judge_lm=world.lm)
    params: dict[str, Any] = {
        "outer_steps": 2,
        "inner_steps": 3,
        "error_batch_size": 5,
        "retain_batch_size": 5,
        "num_threads": 4,
    }
    params.update(kwargs)
    return BLPO(proposer_lm=world.lm, **params).compile(program, trainset=train, valset=val)


def test_blpo_finds_the_cue_that_judge_only_apo_cannot() -> None:
    world = CountingWorld()
    _, _, test = _splits(world)
    seed_program = ImageJudge(world.task, judge_sees="text", verbalizer_lm=world.lm, judge_lm=world.lm)
    seed_f1 = evaluate(seed_program, test, metric="macro_f1", ci=False).scores["macro_f1"].value

    compiled = _compile(world)
    blpo_f1 = evaluate(compiled, test, metric="macro_f1", ci=False).scores["macro_f1"].value

    judge_only = _compile(CountingWorld(), inner_steps=0, outer_steps=3)  # inner loop off = fixed I2T (APO)
    apo_f1 = evaluate(judge_only, test, metric="macro_f1", ci=False).scores["macro_f1"].value

    assert blpo_f1 >= 0.9
    assert apo_f1 <= seed_f1 + 0.1
    assert "count" in compiled.best_instructions_["verbalizer"].lower()
    assert compiled.best_instructions_["judge"] == NUMBER_RULE
    assert compiled.best_score_ >= compiled.seed_score_


def test_student_is_not_mutated_and_result_is_a_new_program() -> None:
    world = CountingWorld()
    train, val, _ = _splits(world)
    student = ImageJudge(world.task, judge_sees="text", verbalizer_lm=world.lm, judge_lm=world.lm)
    before = dict(student.instructions)
    compiled = BLPO(proposer_lm=world.lm, outer_steps=1, inner_steps=3, error_batch_size=5).compile(
        student, trainset=train, valset=val
    )
    assert student.instructions == before
    assert compiled is not student
    assert compiled.instructions == compiled.best_instructions_
    assert not hasattr(student, "history_")


def test_verbalizer_calls_equal_unique_image_instruction_pairs(tmp_path: Path) -> None:
    world = CountingWorld()
    compiled = _compile(world, run_dir=tmp_path / "run")
    calls = world.engine.calls_for("verbalizer")
    pairs = {(hashlib.sha256(c.images["image"][0]).hexdigest(), c.instructions) for c in calls}
    assert len(calls) == len(pairs) > 0
    assert compiled.usage_["verbalizer"]["calls"] == len(calls)

    # a second compile sharing the cache file verbalizes nothing it has seen
    world2 = CountingWorld()
    _compile(world2, cache_path=tmp_path / "run" / "cache.sqlite")
    seen = {
        (hashlib.sha256(c.images["image"][0]).hexdigest(), c.instructions)
        for c in world2.engine.calls_for("verbalizer")
    }
    assert not (seen & pairs)


def test_proposer_never_receives_an_image_in_any_mode() -> None:
    for judge_sees in ("image", "text", "both"):
        world = CountingWorld()
        _compile(world, judge_sees=judge_sees, outer_steps=1)
        assert world.engine.count("proposer") > 0
        assert world.engine.count("proposer", with_images=True) == 0
        judge_calls = world.engine.calls_for("judge")
        assert all(c.has_image == (judge_sees != "text") for c in judge_calls)
        assert all("description" in c.inputs for c in judge_calls) == (judge_sees != "image")


def test_text_mode_learns_the_verbalizer_instruction_into_the_program(tmp_path: Path) -> None:
    world = CountingWorld()
    compiled = _compile(world, run_dir=tmp_path / "run")
    saved = load_program(tmp_path / "run" / "program.json", verbalizer_lm=world.lm, judge_lm=world.lm)
    assert saved.instructions == compiled.best_instructions_
    assert saved.judge_sees == "text"
    assert saved.best_score_ == compiled.best_score_
    text = (tmp_path / "run" / "program.json").read_text()
    assert str(tmp_path) not in text


def test_same_seed_same_history_and_seeds_change_exploration(tmp_path: Path) -> None:
    def run(seed: int, name: str) -> dspy.Module:
        return _compile(CountingWorld(), seed=seed, run_dir=tmp_path / name, outer_steps=1, inner_steps=4)

    a, b = run(0, "a"), run(0, "b")
    assert a.history_ == b.history_
    assert a.rounds_ == b.rounds_

    def explored(program: dspy.Module) -> list[tuple[Any, ...]]:
        return [(t.params.get("candidate"), t.state.name) for t in program.study_.trials]

    assert explored(a) == explored(b)
    others = [run(seed, f"s{seed}") for seed in (1, 2, 3)]
    assert any(explored(o) != explored(a) or o.history_ != a.history_ for o in others)


def test_guarded_selection_uses_optuna_with_pruning_and_persistent_storage(tmp_path: Path) -> None:
    compiled = _compile(CountingWorld(), run_dir=tmp_path / "run", inner_steps=4)
    study = compiled.study_
    assert study is not None
    assert (tmp_path / "run" / "study.db").exists()
    import optuna

    stored = optuna.load_study(study_name=study.study_name, storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    assert len(stored.trials) == len(study.trials)
    states = {t.state for t in study.trials}
    assert optuna.trial.TrialState.COMPLETE in states
    incumbent = study.trials[0]
    assert incumbent.params["candidate"] == "incumbent"
    assert len(incumbent.intermediate_values) >= 2  # multi-fidelity: scores at growing minibatch sizes
    accepted = [h for h in compiled.history_ if h["accepted"]]
    assert len(accepted) == 1
    assert accepted[0]["val_score"] >= compiled.seed_score_


def test_paper_selection_takes_the_best_inner_score() -> None:
    compiled = _compile(CountingWorld(), selection="paper", outer_steps=1)
    scored = [h for h in compiled.history_ if h["inner_score"] is not None]
    best = max(scored, key=lambda h: h["inner_score"])
    assert best["accepted"]
    assert compiled.best_instructions_ == {"verbalizer": best["q"], "judge": best["p_prime"]}
    assert compiled.study_ is None  # no Optuna in the faithful reproduction


def test_budget_stops_cleanly_with_the_best_program_so_far() -> None:
    world = CountingWorld()
    compiled = _compile(world, max_calls=60)
    assert compiled.stop_reason_ == "budget"
    assert compiled.usage_["total"]["calls"] <= 60
    assert len(world.engine.calls) <= 60
    assert compiled.instructions == compiled.best_instructions_

    world = CountingWorld()
    compiled = _compile(world, max_calls={"proposer": 2})
    assert compiled.stop_reason_ == "budget"
    assert world.engine.count("proposer") == 2


def test_failed_calls_are_scored_failures_not_crashes() -> None:
    world = CountingWorld(judge_fails_every=5)
    compiled = _compile(world)
    usage = compiled.usage_["judge"]
    assert usage["failures"] > 0
    assert compiled.best_score_ is not None


def test_run_directory_guards(tmp_path: Path) -> None:
    world = CountingWorld()
    _compile(world, run_dir=tmp_path / "run", outer_steps=1)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["status"] == "finished"
    assert state["identity"]["seed"] == 0
    assert {"incumbent", "history", "usage", "versions", "rng"} <= set(state)
    with pytest.raises(FileExistsError, match="resume=True"):
        _compile(CountingWorld(), run_dir=tmp_path / "run", outer_steps=1)
    with pytest.raises(ResumeError, match="seed"):
        _compile(CountingWorld(), run_dir=tmp_path / "run", outer_steps=1, resume=True, seed=7)
    with pytest.raises(ResumeError, match="nothing to resume"):
        _compile(CountingWorld(), run_dir=tmp_path / "empty", resume=True)


def test_constructor_validates_and_round_trips_params() -> None:
    world = CountingWorld()
    opt = BLPO(proposer_lm=world.lm, outer_steps=3, seed=4, max_calls={"judge": 10})
    clone = BLPO(**opt.get_params())
    assert clone.get_params() == opt.get_params()
    with pytest.raises(ValueError, match="proposer_lm"):
        BLPO()
    with pytest.raises(ValueError, match="selection"):
        BLPO(proposer_lm=world.lm, selection="best")
    with pytest.raises(ValueError, match="outer_steps"):
        BLPO(proposer_lm=world.lm, outer_steps=-1)
    with pytest.raises(ValueError, match="unknown role"):
        BLPO(proposer_lm=world.lm, max_calls={"critic": 3})


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, sys.argv[3])
    from blpo_dspy.testing import CountingWorld
    from blpo_dspy.modules import ImageJudge
    from blpo_dspy.teleprompt import BLPO

    kill_after = int(sys.argv[2])
    world = CountingWorld()
    inner = world.engine.complete
    made = [0]
    def complete(request):
        if made[0] == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        made[0] += 1
        return inner(request)
    world.engine.complete = complete
    program = ImageJudge(world.task, judge_sees="text", verbalizer_lm=world.lm, judge_lm=world.lm)
    BLPO(proposer_lm=world.lm, outer_steps=2, inner_steps=3, error_batch_size=5, retain_batch_size=5,
         num_threads=1, run_dir=sys.argv[1]).compile(
        program, trainset=world.examples(20, seed=1), valset=world.examples(12, seed=2))
    """
)


@pytest.mark.parametrize("kill_after", [25, 90])
def test_kill_and_resume_repeats_no_finished_call(tmp_path: Path, kill_after: int) -> None:
    reference_world = CountingWorld()
    reference = _compile(reference_world, num_threads=1, run_dir=tmp_path / "reference")
    total = len(reference_world.engine.calls)
    assert total > kill_after

    run_dir = tmp_path / "killed"
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT, str(run_dir), str(kill_after), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert json.loads((run_dir / "state.json").read_text())["status"] == "running"

    world = CountingWorld()
    resumed = _compile(world, num_threads=1, run_dir=run_dir, resume=True)
    assert len(world.engine.calls) == total - kill_after  # zero repeated calls
    assert resumed.usage_["total"]["replayed"] == kill_after
    assert resumed.best_instructions_ == reference.best_instructions_
    assert resumed.best_score_ == reference.best_score_
    assert resumed.history_ == reference.history_
    assert json.loads((run_dir / "state.json").read_text())["status"] == "finished"


def _simple_rules(task: Task, answer: str) -> ScriptedEngine:
    def judge(call: Any) -> Any:
        return {"rationale": "scripted", "label": answer} if call.role == "judge" else None

    def verbalizer(call: Any) -> Any:
        return {"description": f"{len(call.images)} image(s) described"} if call.role == "verbalizer" else None

    def proposer(call: Any) -> Any:
        if call.role != "proposer":
            return None
        return {"new_instruction": f"Instruction {len(call.user_text) % 97}"}

    return ScriptedEngine(rules=[judge, verbalizer, proposer])


@pytest.mark.parametrize(("task_name", "answer"), [("rating", "4/5"), ("preference", "Image A"), ("safety", "safe")])
@pytest.mark.parametrize("judge_sees", ["image", "both"])
def test_runs_on_ordinal_pairwise_and_binary_tasks(task_name: str, answer: str, judge_sees: str) -> None:
    from PIL import Image as PILImage

    task = Task.load(task_name)
    engine = _simple_rules(task, answer)
    lm = engine.lm()
    examples = []
    for i in range(12):
        inputs: dict[str, Any] = {
            f: dspy.Image(PILImage.new("RGB", (4, 4), (i * 20, 10, 10))) for f in task.image_fields
        }
        inputs.update({t: f"prompt {i}" for t in task.text_fields})
        examples.append(
            dspy.Example(id=str(i), label=task.labels[i % len(task.labels)], **inputs).with_inputs(*task.input_fields)
        )
    program = ImageJudge(task, judge_sees=judge_sees, verbalizer_lm=lm, judge_lm=lm)
    compiled = BLPO(
        proposer_lm=lm, outer_steps=1, inner_steps=2, error_batch_size=4, retain_batch_size=2, num_threads=2
    ).compile(program, trainset=examples[:8], valset=examples[8:])
    assert compiled.history_ and compiled.history_[0]["inner_score"] is not None
    verbal = engine.calls_for("verbalizer")
    assert verbal and all(len(c.images) == 1 for c in verbal)  # pairwise: each image verbalized on its own
    judge_images = {c.all_images for c in engine.calls_for("judge")}
    assert judge_images == {len(task.image_fields)}
    assert engine.count("proposer", with_images=True) == 0
    assert compiled.usage_["judge"]["failures"] == 0  # "4/5", "Image A" parsed to canonical labels


def test_compiled_judge_works_as_metric_and_best_of_n_selector() -> None:
    world = CountingWorld()
    compiled = _compile(world)
    candidates = world.examples(6, seed=9)

    class BestOfN(dspy.Module):
        """Pick, among candidate images, the first one the compiled judge accepts for the prompt."""

        def __init__(self, judge: dspy.Module) -> None:
            super().__init__()
            self.judge = judge

        def forward(self, prompt: str, images: list[dspy.Image]) -> dspy.Prediction:
            for index, image in enumerate(images):
                if self.judge(image=image, prompt=prompt).label == "yes":
                    return dspy.Prediction(index=index)
            return dspy.Prediction(index=-1)

    target = candidates[0].prompt  # label "yes" for image 0 by construction
    shuffled = [c.image for c in candidates[1:]] + [candidates[0].image]
    picked = BestOfN(compiled)(prompt=target, images=shuffled)
    assert picked.index >= 0
    assert compiled(image=shuffled[picked.index], prompt=target).label == "yes"

    def judge_metric(example: dspy.Example, pred: dspy.Prediction, trace: Any = None) -> float:
        return float(compiled(image=pred.image, prompt=example.prompt).label == example.label)

    class Echo(dspy.Module):
        def forward(self, image: dspy.Image, prompt: str) -> dspy.Prediction:
            return dspy.Prediction(image=image)

    result = dspy.Evaluate(devset=candidates, metric=judge_metric, num_threads=2)(Echo())
    assert result.score == 100.0
