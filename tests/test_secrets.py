"""A sentinel API key in the environment never reaches program.json, state.json, reports or logs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from blpo_dspy.evaluation import evaluate
from blpo_dspy.modules import ImageJudge
from blpo_dspy.report import write_report
from blpo_dspy.teleprompt import BLPO
from blpo_dspy.testing import CountingWorld

SENTINEL = "sk-SENTINEL-4f1c9e2b7a"


def test_sentinel_key_never_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "HF_TOKEN"):
        monkeypatch.setenv(name, SENTINEL)
    world = CountingWorld()
    lm = world.lm
    program = ImageJudge(world.task, judge_sees="text", verbalizer_lm=lm, judge_lm=lm)
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.DEBUG):
        compiled = BLPO(proposer_lm=lm, outer_steps=1, inner_steps=3, error_batch_size=5, run_dir=run_dir).compile(
            program, trainset=world.examples(16, seed=1), valset=world.examples(8, seed=2)
        )
        (run_dir / "evaluations").mkdir()
        report = evaluate(compiled, world.examples(8, seed=3), ci=False)
        (run_dir / "evaluations" / "compiled.json").write_text(json.dumps(report.to_dict()))
        write_report(run_dir, plots=False)
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"state.json", "program.json", "report.md", "report.html", "study.db"}
    for path in files:
        assert SENTINEL.encode() not in path.read_bytes(), path.name
        assert str(tmp_path).encode() not in path.read_bytes() or path.suffix in (".db", ".sqlite"), path.name
    assert SENTINEL not in caplog.text
