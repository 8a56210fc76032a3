"""Selection workers: two worker processes and the compile share each round's Optuna study through its storage."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import dspy
import optuna
import pytest
from together import run_together

from blpo_dspy.modules import ImageJudge
from blpo_dspy.teleprompt import BLPO
from blpo_dspy.teleprompt.selection import INCUMBENT_ID, ROUND_ATTR
from blpo_dspy.teleprompt.workers import SelectionWorker, WorkerError
from blpo_dspy.testing import CountingWorld

LATENCY_S = 0.03
PARAMS: dict[str, Any] = {"outer_steps": 2, "inner_steps": 3, "error_batch_size": 4, "retain_batch_size": 2}

WORKER_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import optuna
    from blpo_dspy.modules import ImageJudge
    from blpo_dspy.teleprompt.workers import SelectionWorker
    from blpo_dspy.testing import CountingWorld

    run_dir, name = sys.argv[1], sys.argv[2]
    world = CountingWorld()
    inner = world.engine.complete

    def slow(request):
        time.sleep(float(sys.argv[3]))
        return inner(request)

    world.engine.complete = slow
    program = ImageJudge(world.task, judge_sees="text", verbalizer_lm=world.lm, judge_lm=world.lm)
    worker = SelectionWorker(
        run_dir, program, world.examples(12, seed=2), num_threads=2, pruner=lambda first: optuna.pruners.NopPruner(),
        poll_interval=0.05, idle_timeout=120, name=name,
    )
    print("ready", flush=True)
    report = worker.serve()
    print(json.dumps({"trials": report.trials, "stop": report.stop_reason, "usage": report.usage}), flush=True)
    """
)


def _compile(run_dir: Path | None, **kwargs: Any) -> dspy.Module:
    world = CountingWorld(latency=LATENCY_S)
    program = ImageJudge(world.task, judge_sees="text", verbalizer_lm=world.lm, judge_lm=world.lm)
    optimizer = BLPO(
        proposer_lm=world.lm,
        num_threads=2,
        run_dir=run_dir,
        pruner=lambda first: optuna.pruners.NopPruner(),
        **PARAMS,
        **kwargs,
    )
    return optimizer.compile(program, trainset=world.examples(16, seed=1), valset=world.examples(12, seed=2))


def test_two_worker_processes_share_the_round_studies_without_losing_a_result(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT)
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    workers = [
        subprocess.Popen(
            [sys.executable, str(script), str(run_dir), f"w{i}", str(LATENCY_S)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in (1, 2)
    ]
    try:
        for worker in workers:
            assert worker.stdout is not None and worker.stderr is not None
            line = worker.stdout.readline().strip()
            if line != "ready":  # the worker died before serving: show why
                worker.kill()
                pytest.fail(f"worker printed {line!r} instead of 'ready':\n{worker.stderr.read()[-4000:]}")
        shared = _compile(run_dir, allow_workers=True)
        outputs = [worker.communicate(timeout=120) for worker in workers]
    finally:
        for worker in workers:
            worker.kill() if worker.poll() is None else None
    reports = []
    for worker, (out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err[-2000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["stop"] == "run_finished" for r in reports)

    # the same compile in one process, with the deterministic in-step selection, decides the same
    solo = _compile(tmp_path / "solo")
    assert shared.best_instructions_ == solo.best_instructions_
    assert shared.best_score_ == solo.best_score_
    assert [r["accepted"] for r in shared.rounds_] == [r["accepted"] for r in solo.rounds_]
    assert [h["val_score"] for h in shared.history_] == [h["val_score"] for h in solo.history_]

    # every candidate of every round finished exactly once; nothing is left waiting or running
    storage = f"sqlite:///{run_dir / 'study.db'}"
    claimed_by: dict[str, int] = {}
    names = sorted(optuna.get_all_study_names(storage))
    assert names == [f"blpo-round-{t}" for t in range(len(shared.rounds_))]
    for name in names:
        study = optuna.load_study(study_name=name, storage=storage)
        assert study.user_attrs[ROUND_ATTR]["open"] is False
        states = [t.state for t in study.trials]
        assert optuna.trial.TrialState.WAITING not in states and optuna.trial.TrialState.RUNNING not in states
        completed = [t.user_attrs["candidate"] for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert len(completed) == len(set(completed))
        candidates = {t.user_attrs["candidate"] for t in study.trials} - {INCUMBENT_ID}
        assert set(completed) - {INCUMBENT_ID} == candidates
        for t in study.trials:
            if t.user_attrs["candidate"] != INCUMBENT_ID:
                claimed_by[t.user_attrs["worker"]] = claimed_by.get(t.user_attrs["worker"], 0) + 1
    assert claimed_by.get("w1", 0) + claimed_by.get("w2", 0) >= 1, claimed_by
    assert sum(len(r["trials"]) for r in reports) == claimed_by.get("w1", 0) + claimed_by.get("w2", 0)

    # the compile replayed the workers' calls from the shared journal instead of paying for them again
    worker_calls = sum(r["usage"]["total"]["calls"] for r in reports)
    assert worker_calls > 0
    assert shared.usage_["total"]["calls"] + worker_calls == solo.usage_["total"]["calls"]
    for db in ("study.db", "cache.sqlite"):
        with sqlite3.connect(run_dir / db) as connection:
            assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_worker_refuses_a_run_of_another_task_or_model(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _compile(run_dir, allow_workers=True)
    world = CountingWorld()
    program = ImageJudge(world.task, judge_sees="image", verbalizer_lm=world.lm, judge_lm=world.lm)
    worker = SelectionWorker(run_dir, program, world.examples(12, seed=2), idle_timeout=1)
    with pytest.raises(WorkerError, match="judge_sees"):
        worker.serve()


def test_worker_with_nothing_to_do_stops_when_idle(tmp_path: Path) -> None:
    world = CountingWorld()
    program = ImageJudge(world.task, judge_sees="text", verbalizer_lm=world.lm, judge_lm=world.lm)
    report = SelectionWorker(tmp_path, program, [], poll_interval=0.01, idle_timeout=0.1).serve()
    assert report.stop_reason == "idle" and report.trials == []


def test_allow_workers_validation(tmp_path: Path) -> None:
    lm = CountingWorld().lm
    with pytest.raises(ValueError, match="named metric"):
        BLPO(metric=lambda example, pred, trace=None: 1.0, proposer_lm=lm, run_dir=tmp_path, allow_workers=True)
    with pytest.raises(ValueError, match="run_dir"):
        BLPO(proposer_lm=lm, allow_workers=True)
    with pytest.raises(ValueError, match="worker_timeout"):
        BLPO(proposer_lm=lm, worker_timeout=0)
    state = _compile(tmp_path / "run", allow_workers=True, study_storage=f"sqlite:///{tmp_path / 'shared.db'}")
    saved = json.loads((tmp_path / "run" / "state.json").read_text())
    assert saved["params"]["study_storage"] == "sqlite:..."  # a server URL may carry credentials: never stored
    assert str(tmp_path) not in json.dumps(saved)
    assert state.study_.study_name in optuna.get_all_study_names(f"sqlite:///{tmp_path / 'shared.db'}")


def test_open_storage_reuses_one_object_per_url_and_keeps_a_bounded_number(tmp_path: Path) -> None:
    from blpo_dspy.teleprompt import selection

    urls = [f"sqlite:///{tmp_path / f'study{i}.db'}" for i in range(selection.MAX_OPEN_STORAGES + 3)]
    first = selection.open_storage(urls[0])
    assert selection.open_storage(urls[0]) is first
    for url in urls[1:]:
        selection.open_storage(url)
    assert urls[0] not in selection._STORAGES and len(selection._STORAGES) <= selection.MAX_OPEN_STORAGES
    # a storage pushed out still works (its pool reconnects) and a new one is built for its URL on demand
    assert optuna.get_all_study_names(first) == []
    assert selection.open_storage(urls[0]) is not first


def test_open_storage_opens_a_new_storage_for_a_sqlite_file_deleted_since(tmp_path: Path) -> None:
    """A run directory removed and made again in the same process: the cached storage's pooled connections still
    hold the deleted file, so its URL gets a new storage that writes to the new file."""
    from blpo_dspy.teleprompt import selection

    path = tmp_path / "run" / "study.db"
    path.parent.mkdir()
    url = f"sqlite:///{path}"
    first = selection.open_storage(url)
    optuna.create_study(storage=first, study_name="before")
    assert selection.open_storage(url) is first  # unchanged file: the same object
    path.unlink()
    second = selection.open_storage(url)
    assert second is not first
    optuna.create_study(storage=second, study_name="after")
    assert optuna.get_all_study_names(f"sqlite:///{path}") == ["after"]
    assert selection.open_storage(url) is second
    memory = selection.open_storage("sqlite:///:memory:")  # no file to watch: cached as before
    assert selection.open_storage("sqlite:///:memory:") is memory


def _open_new_storages_together(directory: str, worker: int, rounds: int, barrier: Any) -> None:
    from blpo_dspy.teleprompt.selection import open_storage

    for r in range(rounds):
        barrier.wait(timeout=60)  # every process opens the same new database at the same moment
        storage = open_storage(f"sqlite:///{Path(directory) / f'round-{r}' / 'study.db'}")
        optuna.create_study(storage=storage, study_name=f"worker-{worker}")


def test_processes_opening_one_new_study_storage_at_once_all_open_it(tmp_path: Path) -> None:
    """Optuna creates a new database's tables and stamps their version without a guard: processes opening one new
    SQLite storage together failed with 'table ... already exists' or a UNIQUE constraint before the schema lock."""
    n, rounds = 3, 4
    for r in range(rounds):
        (tmp_path / f"round-{r}").mkdir()
    assert run_together(_open_new_storages_together, tmp_path, n, rounds) == [0] * n
    for r in range(rounds):
        url = f"sqlite:///{tmp_path / f'round-{r}' / 'study.db'}"
        assert sorted(optuna.get_all_study_names(url)) == [f"worker-{w}" for w in range(n)]
