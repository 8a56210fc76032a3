"""Kill test of ``blpo compare``: SIGKILL in the middle of a run's compile or of its held-out evaluation, then the
same command again finishes the comparison without asking any finished LM call again.

The scripted world of ``tests/cli_lms.py`` answers every role; ``BLPO_TEST_KILL_AT`` kills the process at the start
of its k-th LM call (one thread, so calls 1..k-1 were answered and journaled and call k never was).
"""

from __future__ import annotations

import json
import signal
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cli_lms import DATA_SEED, N_EXAMPLES, SPEC, CompileProcess, CompileResult, integrity, run_one, write_manifest

from blpo_dspy.testing import CountingWorld

CELL = Path("runs") / "blpo" / "seed-0"
COMPARE_OPTIONS = (
    "--optimizers", "no-opt,blpo", "--seeds", "1", "--judge-sees", "text", "--split-sizes", "train=12,val=8,test=4",
    "--outer-steps", "2", "--inner-steps", "3", "--error-batch-size", "4", "--retain-batch-size", "3",
    "--bootstrap-resamples", "50",
)  # fmt: skip


@dataclass
class CompareProcess(CompileProcess):
    """``blpo compare`` (no-opt and BLPO, one seed) of the scripted world in a subprocess; ``run_dir`` is its
    ``--out-dir``."""

    def command(self) -> list[str]:
        """The command line (the same for a first run and a rerun: compare resumes by itself)."""
        command = [sys.executable, "-m", "blpo_dspy.cli", "compare", "alignment", "--data", str(self.manifest)]
        command += ["--verbalizer-lm", SPEC, "--judge-lm", SPEC, "--proposer-lm", SPEC, *COMPARE_OPTIONS]
        return [*command, "--out-dir", str(self.run_dir), "--threads", str(self.threads)]


def _cell(result: CompileResult) -> dict[str, Any]:
    return json.loads((result.run_dir / CELL / "result.json").read_text(encoding="utf-8"))


def _rows(result: CompileResult) -> dict[str, Any]:
    rows = json.loads((result.run_dir / "compare.json").read_text(encoding="utf-8"))["rows"]
    return {row["optimizer"]: {key: row[key] for key in ("ok", "metrics", "calls", "tokens")} for row in rows}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CompileResult]:
    workdir = tmp_path_factory.mktemp("compare")
    manifest = write_manifest(workdir / "data", CountingWorld().examples(N_EXAMPLES, seed=DATA_SEED))
    result = run_one(CompareProcess(workdir, "uninterrupted", manifest))
    assert result.returncode == 0, result.stderr[-3000:]
    cell = _cell(result)
    assert cell["status"] == "ok" and cell["resumed"] is False
    assert cell["replayed"] == {
        "compile": {"verbalizer": 0, "judge": 0, "proposer": 0, "total": 0},
        "compile_tokens": 0,
        "evaluation": 0,
    }
    assert cell["usage"]["total"]["prompt_tokens"] > 0  # the scripted LMs report tokens, so the tables count some
    return manifest, result


def _calls_of_cell(reference: CompileResult) -> tuple[int, int, int]:
    """(calls before the BLPO run, its compile's calls, its held-out evaluation's calls) of the uninterrupted run."""
    cell = _cell(reference)
    compile_calls, evaluation_calls = cell["usage"]["total"]["calls"], cell["evaluation_usage"]["total"]["calls"]
    before = len(reference.calls) - compile_calls - evaluation_calls  # the no-opt run comes first
    assert before > 0 and compile_calls > 20 and evaluation_calls >= 4
    return before, compile_calls, evaluation_calls


@pytest.mark.parametrize("where", ["compile", "evaluation"])
def test_a_killed_compare_resumes_its_unfinished_run_without_asking_finished_calls_again(
    reference: tuple[Path, CompileResult], tmp_path: Path, where: str
) -> None:
    manifest, uninterrupted = reference
    before, compile_calls, evaluation_calls = _calls_of_cell(uninterrupted)
    kill_at = before + (compile_calls // 2 if where == "compile" else compile_calls + evaluation_calls // 2) + 1
    killed = run_one(CompareProcess(tmp_path, "out", manifest, "killed", kill_at=kill_at))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert len(killed.calls) == kill_at - 1
    assert not (tmp_path / "out" / CELL / "result.json").exists()  # killed inside the BLPO run
    assert (tmp_path / "out" / "runs" / "no-opt" / "seed-0" / "result.json").exists()

    resumed = run_one(CompareProcess(tmp_path, "out", manifest, "resumed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # every answered call of the killed process is replayed, none is asked twice, none is missing
    assert Counter(c.request for c in killed.calls) + Counter(c.request for c in resumed.calls) == Counter(
        c.request for c in uninterrupted.calls
    )
    cell, expected = _cell(resumed), _cell(uninterrupted)
    assert cell["resumed"] is True
    for key in ("status", "test", "instructions", "stop_reason"):  # the uninterrupted run's outcome
        assert cell[key] == expected[key], key
    replayed = cell["replayed"]
    if where == "compile":
        assert 0 < replayed["compile"]["total"] < compile_calls and replayed["evaluation"] == 0
        assert 0 < replayed["compile_tokens"]
    else:
        assert replayed["compile"]["total"] == compile_calls and cell["usage"]["total"]["calls"] == 0
        assert 0 < replayed["evaluation"] < cell["test"]["n"]
        total = expected["usage"]["total"]
        assert replayed["compile_tokens"] == total["prompt_tokens"] + total["completion_tokens"]
    # the tables count the calls and tokens of an uninterrupted compile (made now + replayed from the killed attempt)
    assert _rows(resumed) == _rows(uninterrupted)
    assert integrity(tmp_path / "out" / CELL / "evaluation.sqlite") == "ok"
