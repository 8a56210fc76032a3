"""Kill test of ``blpo compile``: SIGKILL at random LM calls, then ``--resume`` finishes the run.

A fully scripted compile (``tests/cli_lms.py``: the ``CountingWorld`` behind ``--*-lm py:cli_lms:world_lm``) runs
once uninterrupted. Each trial then runs the same compile in a fresh run directory, has the process SIGKILL itself
at the start of its k-th LM call (k drawn by a seeded RNG, one draw per slice of the run), and resumes it. The
resumed run must give the uninterrupted run's result and make exactly the LM calls the killed run did not finish:
every result journaled before the kill is replayed, none is asked again. The trials share nothing, so they run side
by side to keep the test short.
"""

from __future__ import annotations

import json
import random
import signal
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cli_lms import (
    DATA_SEED,
    N_EXAMPLES,
    ROLES,
    CompileProcess,
    CompileResult,
    integrity,
    journal_counts,
    run_one,
    run_together,
    write_manifest,
)

from blpo_dspy.testing import CountingWorld

KILL_SEED = 6  # issue #6
TRIAL_THREADS = (1, 1, 1, 3)  # --threads per trial: sequential trials account exactly, one trial runs in parallel


@dataclass(frozen=True)
class Reference:
    """The uninterrupted run and the kill points drawn from it."""

    manifest: Path
    result: CompileResult
    usage: dict[str, dict[str, Any]]
    boundary: int
    kill_points: tuple[int, ...]


def _printed_instructions(result: CompileResult) -> dict[str, str]:
    """The instructions ``blpo compile`` printed (the JSON block after the ``stopped:`` line)."""
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("stopped:")) + 1
    end = next(i for i in range(start, len(lines)) if lines[i] == "}") + 1
    return json.loads("\n".join(lines[start:end]))


def _draw_kill_points(boundary: int, total: int, n: int, seed: int) -> tuple[int, ...]:
    """Kill points: one in each of ``n - 1`` slices of the calls ``2..boundary`` (so early and middle kills both
    happen) and one in ``boundary + 1..total - 1`` (after the first outer step was saved), in a seeded order."""
    rng = random.Random(seed)
    span = boundary - 1
    points = [rng.randint(2 + i * span // (n - 1), 1 + (i + 1) * span // (n - 1)) for i in range(n - 1)]
    points.append(rng.randint(boundary + 1, total - 1))
    rng.shuffle(points)
    return tuple(points)


def _calls_before_first_saved_step(result: CompileResult) -> int:
    """LM calls started before ``state.json`` was seen holding a finished outer step: every later call starts after
    that save (calls are sequential with one thread)."""
    seen = next(when for when, _, rounds in result.state_changes if rounds >= 1)
    return sum(1 for call in result.calls if call.started < seen)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    workdir = tmp_path_factory.mktemp("uninterrupted")
    manifest = write_manifest(workdir / "data", CountingWorld().examples(N_EXAMPLES, seed=DATA_SEED))
    result = run_one(CompileProcess(workdir, "run", manifest))
    assert result.returncode == 0, result.stderr[-3000:]
    usage = result.state()["usage"]
    total = usage["total"]["calls"]
    assert usage["total"]["replayed"] == 0
    assert result.calls_by_role() == {role: usage[role]["calls"] for role in ROLES}  # every LM call was counted
    assert len(result.calls) == total > 50
    outcome = result.outcome()
    assert outcome["status"] == "finished"
    assert outcome["best_score"] > result.program()["blpo"]["diagnostics"]["seed_score_"]  # the search did something
    assert any(len(r.get("trials", [])) > 1 for r in outcome["rounds"])  # ...including an Optuna selection round
    boundary = _calls_before_first_saved_step(result)
    assert 2 < boundary < total - 1
    kill_points = _draw_kill_points(boundary, total, len(TRIAL_THREADS), KILL_SEED)
    return Reference(manifest, result, usage, boundary, kill_points)


def test_kill_points_cover_the_run(reference: Reference, trials: list[Trial]) -> None:
    total = reference.usage["total"]["calls"]
    points = sorted(reference.kill_points)
    assert len(set(points)) == len(TRIAL_THREADS)
    assert all(1 < k < total for k in points)
    assert points[0] <= 1 + (reference.boundary - 1) // (len(points) - 1)  # an early kill
    # kills inside the first outer step and one after it was saved (the resume replays a finished step)
    finished_steps = sorted(len(trial.killed.state()["rounds"]) for trial in trials)
    assert finished_steps[0] == 0 and finished_steps[-1] >= 1


@dataclass(frozen=True)
class Trial:
    """One kill-and-resume trial.

    Attributes:
        threads: ``--threads`` of both attempts.
        kill_at: The LM call (1-based) at whose start the first attempt killed itself.
        killed: The killed attempt.
        finished: Results journaled per role when the process died (read before resuming).
        integrity_after_kill: ``PRAGMA integrity_check`` of the killed run's ``cache.sqlite`` and ``study.db``
            (``"absent"`` for a file not written yet).
        resumed: The ``--resume`` attempt.
    """

    threads: int
    kill_at: int
    killed: CompileResult
    finished: dict[str, int]
    integrity_after_kill: tuple[str, ...]
    resumed: CompileResult


@pytest.fixture(scope="module")
def trials(reference: Reference, tmp_path_factory: pytest.TempPathFactory) -> list[Trial]:
    """Every trial, run side by side (independent run directories): all kills first, then all resumes."""
    workdirs = [tmp_path_factory.mktemp(f"trial{i}") for i in range(len(TRIAL_THREADS))]
    killed = run_together(
        [
            CompileProcess(workdir, "run", reference.manifest, "killed", threads=threads, kill_at=kill_at)
            for workdir, threads, kill_at in zip(workdirs, TRIAL_THREADS, reference.kill_points, strict=True)
        ]
    )
    finished = [journal_counts(workdir / "run") for workdir in workdirs]
    checks = [
        tuple(
            integrity(path) if path.exists() else "absent"
            for path in (w / "run" / "cache.sqlite", w / "run" / "study.db")
        )
        for w in workdirs
    ]
    resumed = run_together(
        [
            CompileProcess(workdir, "run", reference.manifest, "resumed", threads=threads, resume=True)
            for workdir, threads in zip(workdirs, TRIAL_THREADS, strict=True)
        ]
    )
    return [
        Trial(*fields)
        for fields in zip(TRIAL_THREADS, reference.kill_points, killed, finished, checks, resumed, strict=True)
    ]


@pytest.mark.parametrize("index", range(len(TRIAL_THREADS)))
def test_killed_compile_resumes_without_repeating_finished_calls(
    reference: Reference, trials: list[Trial], index: int
) -> None:
    trial = trials[index]
    killed, resumed, finished = trial.killed, trial.resumed, trial.finished
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert killed.state()["status"] == "running"
    assert trial.integrity_after_kill[0] == "ok"
    assert trial.integrity_after_kill[1] in ("ok", "absent")
    done = sum(finished.values())
    answered = killed.calls_by_role()
    if trial.threads == 1:  # one call at a time: each answer was journaled before the next call began
        assert len(killed.calls) == trial.kill_at - 1
        assert finished == answered
    else:  # answers still in flight when the process died were never journaled (nor used)
        assert len(killed.calls) <= trial.kill_at - 1
        assert all(finished[role] <= answered[role] for role in ROLES)

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.outcome() == reference.result.outcome()
    assert _printed_instructions(resumed) == _printed_instructions(reference.result)
    assert killed.state_reads > 1 and resumed.state_reads > 1  # state.json parsed at every poll while running

    usage = resumed.state()["usage"]
    for role in ROLES:
        assert usage[role]["calls"] == reference.usage[role]["calls"] - finished[role], role
        assert usage[role]["replayed"] == finished[role], role
        # the tokens of the replayed calls, journaled when they were made, complete the uninterrupted run's count
        assert _tokens(usage[role]) + usage[role]["replayed_tokens"] == _tokens(reference.usage[role]), role
    assert resumed.calls_by_role() == {role: usage[role]["calls"] for role in ROLES}
    assert len(resumed.calls) == reference.usage["total"]["calls"] - done

    # no finished call is asked again: the resumed run's requests are the uninterrupted run's minus the killed run's
    expected = Counter(c.request for c in reference.result.calls)
    before, after = Counter(c.request for c in killed.calls), Counter(c.request for c in resumed.calls)
    if trial.threads == 1:
        assert before + after == expected
    else:
        assert before <= expected and after <= expected and before + after >= expected
    run_dir = resumed.run_dir
    assert integrity(run_dir / "cache.sqlite") == integrity(run_dir / "study.db") == "ok"


def _tokens(counters: dict[str, Any]) -> int:
    return counters["prompt_tokens"] + counters["completion_tokens"]


HELD_OUT = ("--split-sizes", "train=12,val=8,test=4")  # the same compile, plus a held-out split evaluated after it


def test_a_kill_during_the_held_out_evaluation_resumes_without_asking_finished_examples_again(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "data", CountingWorld().examples(N_EXAMPLES, seed=DATA_SEED))
    for name in ("reference", "trial"):
        (tmp_path / name).mkdir()
    reference = run_one(CompileProcess(tmp_path / "reference", "run", manifest, extra=HELD_OUT))
    assert reference.returncode == 0, reference.stderr[-3000:]
    compile_calls = reference.state()["usage"]["total"]["calls"]
    held_out_calls = len(reference.calls) - compile_calls  # seed and compiled programs on the 4 test examples
    assert held_out_calls >= 8
    kill_at = compile_calls + held_out_calls // 2 + 1  # in the middle of the held-out evaluations

    killed = run_one(CompileProcess(tmp_path / "trial", "run", manifest, "killed", kill_at=kill_at, extra=HELD_OUT))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert killed.state()["status"] == "finished" and len(killed.calls) == kill_at - 1
    resumed = run_one(CompileProcess(tmp_path / "trial", "run", manifest, "resumed", resume=True, extra=HELD_OUT))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    # the compile is replayed, and of the held-out evaluations only what the killed run did not finish is asked
    assert resumed.state()["usage"]["total"]["calls"] == 0
    assert resumed.state()["usage"]["total"]["replayed"] == compile_calls
    reference_tokens = _tokens(reference.state()["usage"]["total"])
    assert resumed.state()["usage"]["total"]["replayed_tokens"] == reference_tokens > 0
    assert Counter(c.request for c in killed.calls) + Counter(c.request for c in resumed.calls) == Counter(
        c.request for c in reference.calls
    )
    assert len(resumed.calls) == len(reference.calls) - len(killed.calls) > 0
    assert "replayed from the run's journal" in resumed.stdout
    for name in ("seed", "compiled"):  # and the reports are the uninterrupted run's
        path = Path("evaluations") / f"{name}.json"
        assert (resumed.run_dir / path).read_text() == (reference.run_dir / path).read_text(), name
    assert integrity(resumed.run_dir / "cache.sqlite") == "ok"
