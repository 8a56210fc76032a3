"""End to end on the real embedded stack: the offline demo on a tiny SYNTHETIC split (slow, a few minutes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_stack_available() -> None:
    pytest.importorskip("xllamacpp", reason="xllamacpp is not installed (pip install 'blpo-dspy[local]')")
    pytest.importorskip("rapidocr_onnxruntime", reason="RapidOCR is part of the [local] extra")
    from blpo_dspy.engines.weights import MODELS, ModelWeightsError, ensure_model

    try:
        ensure_model(MODELS["qwen2.5-coder-0.5b"])
    except ModelWeightsError as exc:
        pytest.skip(f"embedded model weights not installed: {exc}")


def test_demo_runs_the_whole_main_job_offline(local_stack_available: None, tmp_path: Path) -> None:
    from blpo_dspy.demo import DemoBudget, run_demo

    budget = DemoBudget(
        n_train=4, n_val=2, n_test=4, outer_steps=1, inner_steps=1, error_batch_size=2, retain_batch_size=0
    )
    result = run_demo(tmp_path / "demo", budget=budget, seed=1)
    run_dir = tmp_path / "demo"
    for name in (
        "state.json",
        "program.json",
        "demo.json",
        "report.md",
        "report.html",
        "evaluations/seed.json",
        "evaluations/compiled.json",
        "data/manifest.csv",
    ):
        assert (run_dir / name).exists(), name
    assert result.seed.n == result.compiled.n == 4
    usage = result.usage
    assert usage["judge"]["calls"] > 0 and usage["verbalizer"]["calls"] > 0 and usage["proposer"]["calls"] > 0
    assert usage["proposer"]["failures"] <= usage["proposer"]["calls"]
    summary = result.summary()
    assert "SYNTHETIC" in summary and "seed program" in summary and "BLPO-compiled" in summary
    assert ("improved" in summary) or ("overlap" in summary) or ("no improvement" in summary)
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] in ("finished", "budget_exhausted")
    assert str(tmp_path) not in (run_dir / "state.json").read_text()

    # the demo resumes its run directory: the search is replayed without new LM calls
    again = run_demo(run_dir, budget=budget, seed=1)
    assert again.usage["total"]["calls"] == 0
    assert again.instructions["compiled"] == result.instructions["compiled"]
