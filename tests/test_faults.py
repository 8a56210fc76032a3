"""A compile under 20% injected LM faults completes; transient faults are retried, permanent ones are counted."""

from __future__ import annotations

from pathlib import Path

from blpo_dspy.modules import ImageJudge
from blpo_dspy.teleprompt import BLPO
from blpo_dspy.testing import TRANSIENT_FAULTS, CountingWorld, FaultInjectingEngine


def test_compile_completes_under_injected_faults(tmp_path: Path) -> None:
    world = CountingWorld()
    faulty = FaultInjectingEngine(world.engine, rate=0.2, seed=3)
    lm = faulty.lm()
    program = ImageJudge(world.task, judge_sees="text", verbalizer_lm=lm, judge_lm=lm)
    compiled = BLPO(
        proposer_lm=lm,
        outer_steps=2,
        inner_steps=3,
        error_batch_size=5,
        retain_batch_size=4,
        num_threads=4,
        run_dir=tmp_path / "run",
    ).compile(program, trainset=world.examples(20, seed=1), valset=world.examples(12, seed=2))

    transient = sum(faulty.injected[k] for k in TRANSIENT_FAULTS)
    permanent = faulty.injected["empty"] + faulty.injected["malformed"]
    assert transient > 0 and permanent > 0
    # every transient fault was retried by DSPy: the inner engine answered more than the faults alone would allow
    assert faulty.requests == len(world.engine.calls) + transient + permanent
    # empty/malformed answers are either recovered by DSPy's adapter fallback or scored as failures; never a crash
    assert compiled.best_score_ is not None and compiled.seed_score_ is not None
    assert compiled.stop_reason_ in ("outer_steps", "no_errors", "patience")


def test_permanent_faults_are_scored_failures_and_counted() -> None:
    world = CountingWorld()
    broken = FaultInjectingEngine(world.engine, rate=1.0, kinds=("malformed",), seed=0)
    program = ImageJudge(world.task, judge_sees="text", verbalizer_lm=world.lm, judge_lm=broken.lm())
    compiled = BLPO(proposer_lm=world.lm, outer_steps=1, inner_steps=1, error_batch_size=4, num_threads=2).compile(
        program, trainset=world.examples(8, seed=1), valset=world.examples(4, seed=2)
    )
    assert broken.injected["malformed"] > 0
    assert compiled.usage_["judge"]["failures"] == compiled.usage_["judge"]["calls"] > 0
    assert compiled.best_score_ is not None


def test_fault_engine_validates_its_arguments() -> None:
    import pytest

    world = CountingWorld()
    with pytest.raises(ValueError, match="kinds"):
        FaultInjectingEngine(world.engine, kinds=("gremlins",))
    with pytest.raises(ValueError, match="rate"):
        FaultInjectingEngine(world.engine, rate=1.5)
