"""evaluate(): order, failures, parse failures, threads, settings propagation, report serialisation.

The one-thread path gives the same report as the threaded one and never raises for a hostile program.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import dspy
import pytest
from PIL import Image

from blpo_dspy.evaluation import EvaluationReport, PredictionRecord, evaluate
from blpo_dspy.metrics import METRICS, accuracy
from blpo_dspy.modules import ImageJudge
from blpo_dspy.task import LabelError, Task
from blpo_dspy.testing import ScriptedCall, ScriptedEngine

ALIGNMENT = Task.load("alignment")
RATING = Task.load("rating")


def _image(color: tuple[int, int, int]) -> dspy.Image:
    return dspy.Image(Image.new("RGB", (8, 8), color))


def _examples(golds: list[Any], task: Task = ALIGNMENT) -> list[dspy.Example]:
    return [
        dspy.Example(id=f"ex{i}", image=_image((i * 20 % 256, 0, 0)), prompt=f"p{i}", label=gold).with_inputs(
            *task.input_fields
        )
        for i, gold in enumerate(golds)
    ]


class ScriptedJudge(dspy.Module):
    """Answers by prompt: a label string (parsed like an LM answer), "raise", "nolabel" or "error"."""

    def __init__(self, task: Task, script: dict[str, str], delay: float = 0.0) -> None:
        super().__init__()
        self.task = task
        self.script = script
        self.delay = delay
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def forward(self, image: dspy.Image, prompt: str) -> dspy.Prediction:
        assert isinstance(image, dspy.Image)
        with self._lock:
            self.calls.append(prompt)
        if self.delay:  # earlier examples finish later, so completion order differs from input order
            time.sleep(self.delay * (len(self.script) - int(prompt[1:])))
        answer = self.script[prompt]
        if answer == "raise":
            raise RuntimeError(f"backend down for {prompt}")
        if answer == "nolabel":
            return dspy.Prediction(rationale="forgot the label")
        if answer == "error":
            return dspy.Prediction(label=None, raw_label=None, error="TimeoutError: no answer in 120 s")
        return dspy.Prediction(label=self.task.parse_label(answer), raw_label=answer, rationale=f"looked at {prompt}")


GOLDS = ["yes", "no", "yes", "no", "yes", "no", "yes", "no"]
ANSWERS = ["Yes.", "no", "maybe", "raise", "yes", "nolabel", "error", "yes"]
# right:    y      y     -        -        y      -           -        n  -> 3 of 8 right
# parse failures: "maybe" (1); failed calls: raise, nolabel, error (3)


def _judge(delay: float = 0.0) -> ScriptedJudge:
    return ScriptedJudge(ALIGNMENT, {f"p{i}": answer for i, answer in enumerate(ANSWERS)}, delay=delay)


def test_records_keep_order_and_classify_failures() -> None:
    report = evaluate(_judge(), _examples(GOLDS), n_resamples=200)
    assert isinstance(report, EvaluationReport)
    assert report.n == 8 and report.task_name == "alignment"
    assert [r.id for r in report.predictions] == [f"ex{i}" for i in range(8)]
    assert [r.index for r in report.predictions] == list(range(8))
    assert [r.gold for r in report.predictions] == GOLDS
    assert [r.label for r in report.predictions] == ["yes", "no", None, None, "yes", None, None, "yes"]
    assert [r.correct for r in report.predictions] == [True, True, False, False, True, False, False, False]
    assert report.parse_failure_rate == pytest.approx(1 / 8)
    assert report.error_count == 3 and report.error_rate == pytest.approx(3 / 8)

    raised, nolabel, error = report.predictions[3], report.predictions[5], report.predictions[6]
    assert raised.error == "RuntimeError: backend down for p3"
    assert nolabel.error is not None and "without a 'label' field" in nolabel.error
    assert nolabel.rationale == "forgot the label"
    assert error.error == "TimeoutError: no answer in 120 s"
    unparsed = report.predictions[2]
    assert unparsed.parse_failure and not unparsed.failed and unparsed.raw_label == "maybe"
    assert report.predictions[0].raw_label == "Yes." and report.predictions[0].rationale == "looked at p0"


def test_scores_use_the_task_metrics() -> None:
    report = evaluate(_judge(), _examples(GOLDS), n_resamples=200)
    assert report.primary == "macro_f1"
    assert next(iter(report.scores)) == "macro_f1" and "coverage" in report.scores
    assert report.scores["accuracy"].value == pytest.approx(3 / 8)
    assert report.scores["coverage"].value == pytest.approx(4 / 8)  # 1 unparsed + 3 failed calls
    expected = accuracy(ALIGNMENT, GOLDS, [r.label for r in report.predictions])
    assert report.scores["accuracy"].value == pytest.approx(expected)
    acc = report.scores["accuracy"]
    assert acc.low is not None and acc.high is not None and acc.low <= acc.value <= acc.high
    assert report.primary_score is report.scores["macro_f1"]
    # Unparsed and failed calls all land in the unparsed column.
    assert report.confusion.counts.tolist() == [[2, 0, 2], [1, 1, 2]]


def test_threads_give_the_same_report_as_one_thread() -> None:
    examples = _examples(GOLDS)
    judge = _judge(delay=0.01)
    one = evaluate(judge, examples, n_resamples=100, seed=5)
    four = evaluate(judge, examples, num_threads=4, n_resamples=100, seed=5)
    assert four.to_dict() == one.to_dict()
    assert sorted(judge.calls) == sorted([f"p{i}" for i in range(8)] * 2)  # each example called once per run


def test_worker_threads_see_the_callers_dspy_context() -> None:
    seen: list[Any] = []
    lock = threading.Lock()

    class LmProbe(dspy.Module):
        task = ALIGNMENT

        def forward(self, image: dspy.Image, prompt: str) -> dspy.Prediction:
            with lock:
                seen.append((threading.get_ident(), dspy.settings.lm))
            time.sleep(0.02)
            return dspy.Prediction(label="yes")

    marker = dspy.utils.DummyLM([])
    with dspy.context(lm=marker):
        report = evaluate(LmProbe(), _examples(GOLDS), num_threads=4, ci=False)
    assert report.error_count == 0
    assert len(seen) == 8 and all(lm is marker for _, lm in seen)
    assert len({thread for thread, _ in seen}) > 1  # really ran on several threads


def test_metric_selection_and_table() -> None:
    report = evaluate(_judge(), _examples(GOLDS), metric=["accuracy", "cohen_kappa"], n_resamples=100)
    assert list(report.scores) == ["accuracy", "cohen_kappa"] and report.primary == "accuracy"
    table = report.table()
    lines = table.strip().splitlines()
    assert lines[0] == "| Metric | Value | 95% CI |" and len(lines) == 4
    assert lines[2].startswith("| **Accuracy** (primary) | 0.375 | [")
    assert lines[3].startswith(f"| {METRICS['cohen_kappa'].title} |")

    no_ci = evaluate(_judge(), _examples(GOLDS), metric="accuracy", ci=False, confidence=0.9)
    assert no_ci.scores["accuracy"].low is None
    assert no_ci.table().splitlines()[2] == "| **Accuracy** (primary) | 0.375 | — |"
    assert "90% CI" in no_ci.table()


def test_report_is_json_serialisable() -> None:
    report = evaluate(_judge(), _examples(GOLDS), n_resamples=100)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["n"] == 8 and data["error_count"] == 3 and data["primary"] == "macro_f1"
    assert data["predictions"][3]["error"] == "RuntimeError: backend down for p3"
    assert data["predictions"][0] == {
        "index": 0,
        "id": "ex0",
        "gold": "yes",
        "label": "yes",
        "raw_label": "Yes.",
        "rationale": "looked at p0",
        "error": None,
        "correct": True,
    }
    assert data["confusion_matrix"]["columns"] == ["yes", "no", "unparsed"]
    assert set(data["scores"]["accuracy"]) == {"value", "low", "high"}


def test_undefined_scores_serialise_as_null() -> None:
    judge = ScriptedJudge(ALIGNMENT, {"p0": "yes", "p1": "yes"})
    report = evaluate(judge, _examples(["yes", "yes"]), metric="cohen_kappa", n_resamples=20)
    assert report.to_dict()["scores"]["cohen_kappa"] == {"value": None, "low": None, "high": None}
    assert "| n/a | [n/a, n/a] |" in report.table()


def test_ordinal_task_defaults() -> None:
    golds = [1, 2, 3, 4, 5, 3]
    judge = ScriptedJudge(RATING, {"p0": "1", "p1": "Score: 2", "p2": "4", "p3": "4/5", "p4": "five", "p5": "3"})
    report = evaluate(judge, _examples(golds, RATING), n_resamples=100)
    assert report.primary == "cohen_kappa_quadratic"
    assert {"spearman", "kendall", "coverage"} <= set(report.scores)
    assert [r.label for r in report.predictions] == [1, 2, 4, 4, None, 3]
    assert report.scores["coverage"].value == pytest.approx(5 / 6)
    assert report.parse_failure_rate == pytest.approx(1 / 6) and report.error_count == 0


def test_task_comes_from_the_program_or_the_argument() -> None:
    examples = _examples(["yes", "no"])

    def plain(image: dspy.Image, prompt: str) -> dspy.Prediction:
        return dspy.Prediction(label="yes")

    with pytest.raises(TypeError, match="needs a task"):
        evaluate(plain, examples)
    report = evaluate(plain, examples, task=ALIGNMENT, ci=False)
    assert report.scores["accuracy"].value == pytest.approx(0.5)


def test_bad_input_fails_before_any_call() -> None:
    judge = _judge()
    bad_gold = _examples(["yes", "no", "perhaps"])
    with pytest.raises(LabelError, match=r"example 2 \(id='ex2'\): field 'label'.*perhaps"):
        evaluate(judge, bad_gold)
    no_inputs = [dspy.Example(id="raw", prompt="p0", label="yes")]
    with pytest.raises(ValueError, match=r"example 0 \(id='raw'\).*with_inputs"):
        evaluate(judge, no_inputs)
    missing_label = [dspy.Example(id="m", image=_image((0, 0, 0)), prompt="p0").with_inputs("image", "prompt")]
    with pytest.raises(LabelError, match="field 'label': missing"):
        evaluate(judge, missing_label)
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        evaluate(judge, _examples(GOLDS), metric="f1")
    with pytest.raises(ValueError, match="applies to ordinal"):
        evaluate(judge, _examples(GOLDS), metric="spearman")
    with pytest.raises(ValueError, match="no examples"):
        evaluate(judge, [])
    with pytest.raises(ValueError, match="num_threads"):
        evaluate(judge, _examples(GOLDS), num_threads=0)
    assert judge.calls == []


def test_prediction_record_properties() -> None:
    right = PredictionRecord(0, "a", "yes", "yes")
    unparsed = PredictionRecord(1, "b", "yes", None, raw_label="hmm")
    failed = PredictionRecord(2, None, "no", None, error="ValueError: x")
    assert right.correct and not right.failed and not right.parse_failure
    assert not unparsed.correct and unparsed.parse_failure and not unparsed.failed
    assert failed.failed and not failed.parse_failure and failed.to_dict()["id"] is None


# ---------------------------------------------------------------------------------------------- one thread vs many


def _prompt_judge_engine() -> ScriptedEngine:
    """A judge whose answer is decided by the prompt alone (so call order cannot matter): ``say:<text>`` answers
    ``<text>`` as the label, ``fail`` raises in the LM."""

    def judge(call: ScriptedCall) -> dict[str, str] | Exception | None:
        if call.role != "judge":
            return None
        prompt = call.inputs.get("prompt", "")
        if prompt.startswith("fail"):
            return RuntimeError(f"LM down for {prompt}")
        return {"rationale": f"saw {prompt}", "label": prompt.split(":", 1)[1]}

    return ScriptedEngine(rules=[judge], model="prompt-judge")


def test_image_judge_report_is_identical_for_one_and_many_threads() -> None:
    engine = _prompt_judge_engine()
    lm = engine.lm(num_retries=0)
    program = ImageJudge(ALIGNMENT, judge_sees="image", judge_lm=lm, verbalizer_lm=lm)
    answers = ["say:yes", "say:No.", "fail", "say:maybe", "say:**yes**", "fail-2", "say:no", "say:Yes"] * 3
    golds = ["yes", "no"] * 12
    examples = [
        dspy.Example(id=f"e{i}", image=_image((i * 9, 0, 0)), prompt=answer, label=gold).with_inputs("image", "prompt")
        for i, (answer, gold) in enumerate(zip(answers, golds, strict=True))
    ]

    one = evaluate(program, examples, n_resamples=200, seed=3)
    calls_one = engine.count("judge")
    many = evaluate(program, examples, num_threads=4, n_resamples=200, seed=3)

    assert many.to_dict() == one.to_dict()
    assert calls_one == len(examples) and engine.count("judge") == 2 * len(examples)
    expected = [ALIGNMENT.parse_label(a.split(":", 1)[1]) if ":" in a else None for a in answers]
    assert [r.label for r in one.predictions] == expected
    failed = [r.index for r in one.predictions if r.failed]
    assert failed == [i for i, a in enumerate(answers) if a.startswith("fail") or a == "say:maybe"]
    assert all("LM down" in one.predictions[i].error for i, a in enumerate(answers) if a.startswith("fail"))
    assert one.error_count == len(failed) and one.n == len(examples)


class _UnprintableError(Exception):
    def __str__(self) -> str:
        raise ValueError("no text for you")


class _LabelRaises:
    @property
    def label(self) -> str:
        raise KeyError("label")


class _StrRaises:
    def __str__(self) -> str:
        raise RuntimeError("cannot print")


def test_hostile_program_results_are_scored_failures_with_any_thread_count() -> None:
    behaviours: list[Any] = [
        lambda: dspy.Prediction(label="yes"),
        lambda: (_ for _ in ()).throw(_UnprintableError()),  # raises an exception whose str() raises
        lambda: _LabelRaises(),  # label attribute raising something other than AttributeError
        lambda: dspy.Prediction(label=_StrRaises()),  # a label object whose str() raises
        lambda: dspy.Prediction(label="no", raw_label=_StrRaises()),
        lambda: None,  # no prediction at all
        lambda: {"label": "yes"},  # a dict, not a prediction
        lambda: dspy.Prediction(label="yes", error="partial: timed out after the label"),
        lambda: (_ for _ in ()).throw(TimeoutError("x" * 5000)),
    ]

    def program(image: dspy.Image, prompt: str) -> Any:
        return behaviours[int(prompt[1:])]()

    examples = _examples(["yes"] * len(behaviours))
    one = evaluate(program, examples, task=ALIGNMENT, ci=False)
    many = evaluate(program, examples, task=ALIGNMENT, num_threads=3, ci=False)

    assert many.to_dict() == one.to_dict()
    records = one.predictions
    assert [r.correct for r in records] == [True] + [False] * 6 + [True, False]
    assert not records[0].failed
    assert all(r.failed for r in records[1:])  # every odd result is a failed call, none raised
    assert records[1].error == "_UnprintableError: <unprintable>"
    assert "without a 'label' field" in records[5].error and "NoneType" in records[5].error
    assert "without a 'label' field" in records[6].error and "dict" in records[6].error
    assert records[7].label == "yes" and records[7].error == "partial: timed out after the label"
    assert len(records[8].error) == 500 and records[8].error.startswith("TimeoutError: xxx")
    assert one.error_count == len(behaviours) - 1


def test_one_thread_runs_in_the_callers_thread_and_context() -> None:
    seen: list[tuple[int, Any]] = []

    def program(image: dspy.Image, prompt: str) -> dspy.Prediction:
        seen.append((threading.get_ident(), dspy.settings.lm))
        return dspy.Prediction(label="yes")

    marker = dspy.utils.DummyLM([])
    with dspy.context(lm=marker):
        evaluate(program, _examples(GOLDS), task=ALIGNMENT, ci=False)
    assert seen == [(threading.get_ident(), marker)] * len(GOLDS)


def test_keyboard_interrupt_is_not_swallowed() -> None:
    def program(image: dspy.Image, prompt: str) -> dspy.Prediction:
        if prompt == "p2":
            raise KeyboardInterrupt
        return dspy.Prediction(label="yes")

    with pytest.raises(KeyboardInterrupt):
        evaluate(program, _examples(GOLDS), task=ALIGNMENT, ci=False)


@pytest.mark.parametrize("task_name", ["alignment", "preference", "rating", "safety", "compliance"])
def test_predicted_labels_are_read_exactly_like_task_parse_label(task_name: str) -> None:
    # evaluate() answers canonical labels from a table; every other value must still go through parse_label.
    task = Task.load(task_name)
    values: list[Any] = [*task.labels, *(str(label) for label in task.labels), *(str(x).upper() for x in task.labels)]
    values += [True, False, 1, 0, 2, 1.0, 3.0, 2.5, -1, 10**30, "1", " 2 ", "Score: 4", "B", "Image A", None, ""]
    values += [f"**{task.labels[0]}**", f"{task.labels[-1]}.", "maybe", float("nan"), float("inf")]

    images = [_image((i, 0, 0)) for i in range(len(values))]
    value_of = {id(image): value for image, value in zip(images, values, strict=True)}

    def program(**inputs: Any) -> dspy.Prediction:
        return dspy.Prediction(label=value_of[id(inputs[task.image_fields[0]])])

    examples = [
        dspy.Example(
            **dict.fromkeys(task.image_fields, image), **dict.fromkeys(task.text_fields, "t"), label=task.labels[0]
        ).with_inputs(*task.input_fields)
        for image in images
    ]
    report = evaluate(program, examples, task=task, ci=False)
    assert [r.label for r in report.predictions] == [task.parse_label(v) for v in values]


def test_gold_labels_are_validated_per_value_and_type() -> None:
    report = evaluate(lambda **_: dspy.Prediction(label="yes"), _examples(["yes", "1", "YES", "y"]), task=ALIGNMENT)
    assert [r.gold for r in report.predictions] == ["yes"] * 4
    with pytest.raises(LabelError, match=r"example 3 \(id='ex3'\): field 'label'"):
        evaluate(lambda **_: dspy.Prediction(label="yes"), _examples(["yes", 1, "yes", True]), task=ALIGNMENT)


# --------------------------------------------------------------------------------------------- journal
def _journal_case() -> tuple[ScriptedEngine, ImageJudge, list[dspy.Example]]:
    engine = _prompt_judge_engine()
    lm = engine.lm(num_retries=0)
    program = ImageJudge(ALIGNMENT, judge_sees="image", judge_lm=lm, verbalizer_lm=lm)
    answers = ["say:yes", "fail", "say:maybe", "say:No.", "say:yes", "fail-2"]
    examples = [
        dspy.Example(id=f"e{i}", image=_image((i * 30, 5, 0)), prompt=answer, label=gold).with_inputs("image", "prompt")
        for i, (answer, gold) in enumerate(zip(answers, ["yes", "no"] * 3, strict=True))
    ]
    return engine, program, examples


@pytest.mark.parametrize("threads", [1, 3])
def test_a_journal_replays_answered_examples_and_asks_failed_ones_again(tmp_path: Any, threads: int) -> None:
    from blpo_dspy.cache import CallJournal

    engine, program, examples = _journal_case()
    journal = CallJournal(tmp_path / "cache.sqlite")
    first = evaluate(program, examples, num_threads=threads, ci=False, journal=journal)
    assert first.replayed == 0 and engine.count("judge") == len(examples)
    assert journal.store.count("evaluation") == 4  # the two failed calls are not recorded

    engine.reset()
    again = evaluate(
        program.deepcopy(), examples, num_threads=threads, ci=False, journal=CallJournal(journal.store.path)
    )
    assert again.to_dict() == first.to_dict()  # the same report, byte for byte once serialised
    assert again.replayed == 4
    assert sorted(call.inputs["prompt"] for call in engine.calls) == ["fail", "fail-2"]  # only the failed calls

    baseline = evaluate(program, examples, num_threads=threads, ci=False)  # no journal: every example is asked
    assert baseline.to_dict() == first.to_dict() and baseline.replayed == 0


def test_the_journal_key_is_the_program_and_the_example(tmp_path: Any) -> None:
    from blpo_dspy.cache import CallJournal

    engine, program, examples = _journal_case()
    journal = CallJournal(tmp_path / "cache.sqlite")
    evaluate(program, examples[:3], ci=False, journal=journal)
    engine.reset()
    changed = program.with_instructions(judge="Judge strictly.")
    assert evaluate(changed, examples[:3], ci=False, journal=journal).replayed == 0  # another instruction
    other_lm = ImageJudge(ALIGNMENT, judge_sees="image", judge_lm=_prompt_judge_engine().lm(model="other"))
    assert evaluate(other_lm, examples[:3], ci=False, journal=journal).replayed == 0  # another judge model
    assert engine.count("judge") == 3
    engine.reset()
    report = evaluate(program, examples, ci=False, journal=journal)  # the first 3 again, and 3 new examples
    assert report.replayed == 2 and len(engine.calls) == 4  # "fail" (example 1) was not recorded


def test_a_journal_needs_a_dspy_module(tmp_path: Any) -> None:
    from blpo_dspy.cache import CallJournal

    def program(image: dspy.Image, prompt: str) -> dspy.Prediction:
        return dspy.Prediction(label="yes")

    with pytest.raises(TypeError, match=r"dspy\.Module"):
        evaluate(program, _examples(["yes"]), task=ALIGNMENT, journal=CallJournal(tmp_path / "cache.sqlite"))
