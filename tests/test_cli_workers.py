"""`blpo compile --allow-workers` with two `blpo worker` processes sharing the round studies through SQLite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from cli_lms import DATA_SEED, N_EXAMPLES, SPEC, CompileProcess, integrity, run_one, write_manifest

from blpo_dspy.teleprompt.selection import INCUMBENT_ID
from blpo_dspy.testing import CountingWorld

LATENCY = 0.05


def test_compile_with_two_worker_processes_over_the_cli(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "data", CountingWorld().examples(N_EXAMPLES, seed=DATA_SEED))
    leader = CompileProcess(tmp_path, "run", manifest, threads=1, latency=LATENCY, extra=("--allow-workers",))
    env = leader.environment()
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "blpo_dspy.cli", "worker", str(leader.run_dir), "--data", str(manifest),
             "--verbalizer-lm", SPEC, "--judge-lm", SPEC, "--threads", "1", "--idle-timeout", "120"],
            cwd=tmp_path, env={**env, "BLPO_TEST_CALL_LOG": str(tmp_path / f"worker{i}.calls.jsonl")},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in (1, 2)
    ]  # fmt: skip
    try:
        result = run_one(leader)
        outputs = [worker.communicate(timeout=120) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    assert result.returncode == 0, result.stderr[-3000:]
    for worker, (out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err[-3000:]
        assert "worker stopped (run_finished)" in out
    assert result.state()["status"] == "finished"

    storage = f"sqlite:///{leader.run_dir / 'study.db'}"
    names = sorted(optuna.get_all_study_names(storage))
    assert names and len(names) == len(result.state()["rounds"])
    claimed: dict[str, int] = {}
    for name in names:
        study = optuna.load_study(study_name=name, storage=storage)
        finished = [t for t in study.trials if t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL]
        assert len(finished) == len(study.trials)  # nothing left waiting or running, nothing failed
        candidates = [t.user_attrs["candidate"] for t in finished if t.user_attrs["candidate"] != INCUMBENT_ID]
        assert len(candidates) == len(set(candidates))  # every candidate evaluated exactly once
        for trial in finished:
            if trial.user_attrs["candidate"] != INCUMBENT_ID:
                claimed[trial.user_attrs["worker"]] = claimed.get(trial.user_attrs["worker"], 0) + 1
        # the round's decision in state.json matches what the study holds
        round_state = result.state()["rounds"][int(name.rsplit("-", 1)[1])]
        completed = {t.user_attrs["candidate"]: t.value for t in study.trials if t.state.name == "COMPLETE"}
        if round_state["accepted"] is not None:
            assert completed[round_state["accepted"]] == round_state["val_score"]
    reported = sum(int(out.split("): ", 1)[1].split(" ", 1)[0]) for out, _ in outputs)
    assert reported == sum(n for worker, n in claimed.items() if worker != "leader") >= 1, claimed
    for db in ("study.db", "cache.sqlite"):
        assert integrity(leader.run_dir / db) == "ok"


def test_worker_names_the_state_file_and_its_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from blpo_dspy.cli import main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "state.json").write_text('{"status": "running"}')
    manifest = write_manifest(tmp_path / "data", CountingWorld().examples(4, seed=DATA_SEED))
    code = main(["worker", str(run_dir), "--data", str(manifest), "--verbalizer-lm", SPEC, "--judge-lm", SPEC])
    err = capsys.readouterr().err
    assert code == 2
    assert "run/state.json" in err and "identity.task" in err
