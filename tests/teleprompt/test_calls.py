"""ProgramCalls' thread pool: order, scored failures, context propagation, bounded concurrency, queued batches."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import dspy
import pytest

from blpo_dspy.budget import BudgetExhaustedError, UsageLedger
from blpo_dspy.cache import CallJournal, VerbalizationCache
from blpo_dspy.teleprompt.calls import ProgramCalls, program_setup
from blpo_dspy.testing import CountingWorld


def _calls(tmp_path: Path, num_threads: int = 3, max_calls: int | None = None) -> ProgramCalls:
    world = CountingWorld()
    return ProgramCalls(
        task=world.task,
        judge_sees="text",
        verbalizer_lm=world.lm,
        judge_lm=world.lm,
        proposer_lm=world.lm,
        ledger=UsageLedger(max_calls),
        journal=CallJournal(tmp_path / "cache.sqlite"),
        vcache=VerbalizationCache(tmp_path / "cache.sqlite"),
        num_threads=num_threads,
    )


def test_batch_keeps_order_scores_failures_and_bounds_concurrency(tmp_path: Path) -> None:
    calls = _calls(tmp_path, num_threads=3)
    running, peak, lock = 0, 0, threading.Lock()

    def work(i: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.01)
        with lock:
            running -= 1
        if i == 4:
            raise RuntimeError("boom")
        return i * i

    try:
        assert calls.parallel(work, range(10)) == [0, 1, 4, 9, None, 25, 36, 49, 64, 81]
        assert peak == 3
    finally:
        calls.close()


def test_items_see_the_callers_dspy_context(tmp_path: Path) -> None:
    calls = _calls(tmp_path)
    adapter = dspy.JSONAdapter()
    try:
        with dspy.context(adapter=adapter):
            seen = calls.parallel(lambda _: dspy.settings.adapter, range(6))
        assert all(a is adapter for a in seen)
        assert calls.parallel(lambda _: dspy.settings.adapter, range(2)) != [adapter, adapter]
    finally:
        calls.close()


def test_a_queued_batch_runs_behind_the_current_one(tmp_path: Path) -> None:
    calls = _calls(tmp_path, num_threads=2)
    order: list[str] = []
    lock = threading.Lock()

    def record(tag: str) -> str:
        time.sleep(0.01)
        with lock:
            order.append(tag)
        return tag

    try:
        first = calls.submit(record, ["a1", "a2", "a3"])
        second = calls.submit(record, ["b1", "b2"])
        assert first() == ["a1", "a2", "a3"] and second() == ["b1", "b2"]
        assert order.index("a1") < order.index("b2") and order.index("a2") < order.index("b2")
    finally:
        calls.close()
    calls.close()  # idempotent
    assert calls.parallel(lambda i: i + 1, [1, 2]) == [2, 3]  # a closed layer starts a new pool
    calls.close()


def test_budget_exhaustion_surfaces_after_the_batch(tmp_path: Path) -> None:
    calls = _calls(tmp_path, max_calls=1)

    def spend(_: int) -> bool:
        return calls.ledger.acquire("judge")

    try:
        with pytest.raises(BudgetExhaustedError):
            calls.parallel(spend, range(3))
    finally:
        calls.close()


def test_program_setup_takes_each_lm_from_the_argument_the_program_or_the_configured_lm(tmp_path: Path) -> None:
    from blpo_dspy.modules import ImageJudge

    world = CountingWorld()
    own, given, configured = world.engine.lm("own"), world.engine.lm("given"), world.engine.lm("configured")
    program = ImageJudge(world.task, judge_sees="text", judge_lm=own, verbalizer_lm=own)
    setup = program_setup(program, tmp_path, verbalizer_lm=given)
    assert (setup["judge_lm"], setup["verbalizer_lm"]) == (own, given)
    assert (setup["task"], setup["judge_sees"]) == (world.task, "text")
    assert setup["journal"].store.path == setup["vcache"].store.path == tmp_path / "cache.sqlite"
    shared = program_setup(program, tmp_path, cache_path=tmp_path / "shared.sqlite")
    assert (shared["verbalizer_lm"], shared["vcache"].store.path) == (own, tmp_path / "shared.sqlite")

    bare = ImageJudge(world.task, judge_sees="image")
    with dspy.context(lm=configured):
        assert program_setup(bare, tmp_path)["judge_lm"] is configured
    with pytest.raises(ValueError, match="no LM for the judge"):
        program_setup(bare, tmp_path)
    with dspy.context(lm=None), pytest.raises(ValueError, match="no LM for the verbalizer"):
        program_setup(ImageJudge(world.task, judge_sees="image", judge_lm=own), tmp_path)
    assert program_setup(ImageJudge(world.task, judge_lm=own), tmp_path, need_verbalizer=False)["verbalizer_lm"] is None
