"""Run a judge program over labelled examples and score its agreement with the human labels.

:func:`evaluate` calls ``program(**example.inputs())`` for every example (one after another in the caller's thread,
or on worker threads that inherit the caller's ``dspy.context``), never raises because of one example, and returns
an :class:`EvaluationReport` with one record per example and corpus metrics with bootstrap confidence intervals.

The program contract: it returns a ``dspy.Prediction`` whose ``label`` is a canonical label of the task, or
``None`` when the LM answer could not be parsed; optionally ``raw_label`` (the LM's answer as text), ``rationale``
and ``error`` (a string, when the call failed). A raised exception, a missing ``label`` field or a non-empty
``error`` makes the example a *failed call*; a ``None`` label with no error is a *parse failure*. Both count as
wrong answers in every metric (see :mod:`blpo_dspy.metrics`). A label returned together with an ``error`` is
still scored (the call is counted as failed all the same).

With a ``journal`` (a run directory's :class:`~blpo_dspy.cache.CallJournal`), every answered example is recorded
under the content of the program (its saved state and LMs) and of the example's inputs, and an evaluation run again
over the same journal replays those records instead of calling the program: a killed ``blpo compile`` or
``blpo demo`` resumed with ``--resume`` does not ask its held-out examples again.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import dspy
from dspy.utils.parallelizer import ParallelExecutor

from blpo_dspy.cache import CallJournal, content_key, lm_identity
from blpo_dspy.dspy_objects import check_inputs, example_fields, example_inputs, prediction_fields
from blpo_dspy.metrics import (
    METRICS,
    ConfusionMatrix,
    Score,
    primary_metric,
    resolve_metric_names,
    scores_and_confusion,
)
from blpo_dspy.task import LABEL_FIELD, RATIONALE_FIELD, Label, LabelError, Task

logger = logging.getLogger(__name__)

_MAX_ERROR_TEXT = 500
_MEMO_TYPES = (str, int, float)  # label value types whose equal values always validate/parse alike
_MISSING = object()
_ABSENT = object()  # a prediction without the field


@dataclass(frozen=True, slots=True)
class PredictionRecord:
    """What the program answered for one example.

    Attributes:
        index: Position of the example in the evaluated sequence.
        id: The example's ``id`` field, or ``None`` if it has none.
        gold: The human label (canonical).
        label: The predicted canonical label, or ``None`` (parse failure or failed call).
        raw_label: The LM's answer as text (``raw_label`` of the prediction, else its ``label``), if any.
        rationale: The judge's rationale, if the program returned one.
        error: Why the call failed (exception type and message, or the program's ``error``), else ``None``.
    """

    index: int
    id: str | int | None
    gold: Label
    label: Label | None
    raw_label: str | None = None
    rationale: str | None = None
    error: str | None = None

    @property
    def correct(self) -> bool:
        """Whether the predicted label equals the human label."""
        return self.label is not None and self.label == self.gold

    @property
    def failed(self) -> bool:
        """Whether the call failed (as opposed to answering, parsable or not)."""
        return self.error is not None

    @property
    def parse_failure(self) -> bool:
        """Whether the program answered but its answer did not parse to a label."""
        return self.label is None and self.error is None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "index": self.index,
            "id": self.id,
            "gold": self.gold,
            "label": self.label,
            "raw_label": self.raw_label,
            "rationale": self.rationale,
            "error": self.error,
            "correct": self.correct,
        }


@dataclass
class EvaluationReport:
    """The outcome of :func:`evaluate`.

    Attributes:
        task_name: Name of the task.
        predictions: One record per example, in input order.
        scores: Corpus metrics by name, with confidence intervals when requested.
        primary: Name of the primary metric (a key of ``scores``).
        parse_failure_rate: Fraction of examples where the program answered but the answer did not parse.
        error_count: Number of failed calls (exception, missing ``label``, or ``error`` set by the program).
        n: Number of examples.
        confusion: Confusion matrix (task label order, plus an ``unparsed`` column for both failure kinds).
        confidence: Coverage of the confidence intervals.
        replayed: Records read from the journal instead of calling the program (not part of :meth:`to_dict`: a
            resumed evaluation writes the same report as an uninterrupted one).
    """

    task_name: str
    predictions: list[PredictionRecord]
    scores: dict[str, Score]
    primary: str
    parse_failure_rate: float
    error_count: int
    n: int
    confusion: ConfusionMatrix
    confidence: float = 0.95
    replayed: int = 0

    @property
    def primary_score(self) -> Score:
        """The :class:`Score` of the primary metric."""
        return self.scores[self.primary]

    @property
    def error_rate(self) -> float:
        """Fraction of examples whose call failed."""
        return self.error_count / self.n if self.n else math.nan

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (``nan`` becomes ``None``)."""
        return {
            "task": self.task_name,
            "n": self.n,
            "primary": self.primary,
            "confidence": self.confidence,
            "scores": {name: score.to_dict() for name, score in self.scores.items()},
            "parse_failure_rate": self.parse_failure_rate,
            "error_count": self.error_count,
            "confusion_matrix": self.confusion.to_dict(),
            "predictions": [record.to_dict() for record in self.predictions],
        }

    def table(self, digits: int = 3) -> str:
        """The scores as a Markdown table (metric, value, confidence interval); the primary metric first, in bold.

        Args:
            digits: Decimal places.
        """
        ci_header = f"{round(self.confidence * 100, 1):g}% CI"
        lines = [f"| Metric | Value | {ci_header} |", "|---|---|---|"]
        names = [self.primary, *[name for name in self.scores if name != self.primary]]
        for name in names:
            score = self.scores[name]
            title = METRICS[name].title if name in METRICS else name
            if name == self.primary:
                title = f"**{title}** (primary)"
            value = _fmt(score.value, digits)
            if score.low is None or score.high is None:
                interval = "—"
            else:
                interval = f"[{_fmt(score.low, digits)}, {_fmt(score.high, digits)}]"
            lines.append(f"| {title} | {value} | {interval} |")
        return "\n".join(lines) + "\n"


def _fmt(value: float, digits: int) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


def _example_id(value: Any) -> str | int | None:
    """An example's ``id`` field as recorded: ``None``, a str or an int kept as is, anything else as text."""
    if value is None or isinstance(value, str | int):
        return value
    return str(value)


def _where(index: int, ident: str | int | None) -> str:
    return f"example {index}" + (f" (id={ident!r})" if ident is not None else "")


class _Job(NamedTuple):
    """One checked example: its position, id, gold label and the example (its inputs are read at call time, so
    they are not all held at once)."""

    index: int
    id: str | int | None
    gold: Label
    example: dspy.Example


def _check_examples(task: Task, examples: Sequence[Any]) -> list[_Job]:
    """Validate gold labels and inputs before any call; return one :class:`_Job` per example.

    Gold labels of plain types are validated once per distinct ``(type, value)`` (``Task.validate_label`` is pure),
    so a large split with few label values costs one validation per value.
    """
    jobs: list[_Job] = []
    validated: dict[tuple[type, Any], Label] = {}
    for index, example in enumerate(examples):
        if not isinstance(example, dspy.Example):
            ident = _example_id(example.get("id") if hasattr(example, "get") else getattr(example, "id", None))
            raise TypeError(f"{_where(index, ident)}: expected a dspy.Example, got {type(example).__name__}")
        fields = example_fields(example)
        ident = _example_id(fields.get("id"))
        try:
            check_inputs(example)
        except ValueError as exc:
            raise ValueError(
                f"{_where(index, ident)}: no input fields; build it with .with_inputs(...) ({exc})"
            ) from exc
        raw = fields.get(LABEL_FIELD, _MISSING)
        if raw is _MISSING:
            raise LabelError(f"{_where(index, ident)}: field 'label': missing")
        key = (type(raw), raw) if type(raw) in _MEMO_TYPES else None
        gold = validated.get(key) if key is not None else None
        if gold is None:
            try:
                gold = task.validate_label(raw)
            except LabelError as exc:
                raise LabelError(f"{_where(index, ident)}: field 'label': {exc}") from exc
            if key is not None:
                validated[key] = gold
        jobs.append(_Job(index, ident, gold, example))
    return jobs


class _LabelReader:
    """``task.parse_label`` with the canonical labels answered from a table (the common case: programs such as
    ``ImageJudge`` return labels already parsed): :func:`_run_one` looks a value of an exact type in ``_MEMO_TYPES``
    (no bool or str subclass equal to a label sneaks through) up in ``known`` and parses any other with ``parse``,
    which gives the same result as ``task.parse_label`` for every value at one dict lookup per example."""

    def __init__(self, task: Task) -> None:
        self.parse = task.parse_label
        self.known: dict[tuple[type, Any], Label | None] = {}
        for label in task.labels:
            if type(label) in _MEMO_TYPES:
                self.known[(type(label), label)] = task.parse_label(label)


def _field(prediction: Any, name: str) -> Any:
    """``prediction.<name>``, or :data:`_ABSENT` when it has no such attribute (for results other than a plain
    ``dspy.Prediction``, which :func:`_run_one` reads from its store)."""
    try:
        return getattr(prediction, name)
    except AttributeError:
        return _ABSENT


def _text(value: Any) -> str | None:
    """An optional field as text: ``None`` when absent or ``None``."""
    if value is None or value is _ABSENT:
        return None
    return value if type(value) is str else str(value)


class _Replay:
    """An evaluation's records in a call journal, keyed by (program, example inputs) content.

    Only answered examples are recorded (the LM gave a label, parsed or not); a failed call is asked again.
    """

    namespace = "evaluation"

    def __init__(self, journal: CallJournal, program: Any) -> None:
        if not isinstance(program, dspy.Module):
            raise TypeError(
                "evaluate(journal=...) needs a dspy.Module (its saved state identifies it), "
                f"got {type(program).__name__}"
            )
        lms = {name: lm_identity(value) for name, value in vars(program).items() if isinstance(value, dspy.BaseLM)}
        lms.update({f"{name}.lm": lm_identity(p.lm) for name, p in program.named_predictors() if p.lm is not None})
        kind = f"{type(program).__module__}.{type(program).__qualname__}"
        self.program = content_key(kind, program.dump_state(), lms, lm_identity(dspy.settings.lm))
        self.journal = journal
        self.replayed = 0
        self._lock = threading.Lock()

    def key(self, job: _Job) -> str:
        """The journal key of one example under this program."""
        return content_key(self.namespace, self.program, example_inputs(job.example))

    def get(self, key: str, job: _Job) -> PredictionRecord | None:
        """The recorded outcome of the example, or ``None``."""
        stored = self.journal.get(self.namespace, key)
        if stored is None:
            return None
        with self._lock:
            self.replayed += 1
        return PredictionRecord(
            job.index, job.id, job.gold, stored["label"], stored["raw_label"], stored["rationale"], stored["error"]
        )

    def put(self, key: str, record: PredictionRecord) -> None:
        """Record an answered example (a failed call, or a label that does not survive JSON, is not recorded)."""
        if record.raw_label is None or type(record.label) not in (str, int, type(None)):
            return
        fields = {"label": record.label, "raw_label": record.raw_label, "rationale": record.rationale}
        self.journal.put(self.namespace, key, {**fields, "error": record.error})


def _run_journaled(program: Any, read_label: _LabelReader, job: _Job, replay: _Replay | None) -> PredictionRecord:
    """:func:`_run_one`, replayed from the journal when it holds the example, recorded there when answered."""
    if replay is None:
        return _run_one(program, read_label, job)
    key = replay.key(job)
    record = replay.get(key, job)
    if record is None:
        record = _run_one(program, read_label, job)
        replay.put(key, record)
    return record


def _run_one(program: Any, read_label: _LabelReader, job: _Job) -> PredictionRecord:
    """Call the program on one example; never raises (except ``BaseException``s such as ``KeyboardInterrupt``)."""
    index, ident, gold = job.index, job.id, job.gold
    try:
        prediction = program(**example_inputs(job.example))  # program(**example.inputs())
    except Exception as exc:
        logger.debug("%s: program raised", _where(index, ident), exc_info=True)
        return PredictionRecord(index, ident, gold, None, error=_error_text(exc))
    try:
        if type(prediction) is dspy.Prediction:  # its fields: what getattr returns, without failed attribute lookups
            get = prediction_fields(prediction).get
            value, raw = get(LABEL_FIELD, _ABSENT), get("raw_label")
            rationale, error = get(RATIONALE_FIELD), get("error")
        else:
            value = _field(prediction, LABEL_FIELD)
            raw, rationale, error = (_field(prediction, name) for name in ("raw_label", RATIONALE_FIELD, "error"))
        # Optional text fields: None when absent or None, str() of anything else but a str.
        if raw is not None and type(raw) is not str:
            raw = _text(raw)
        if rationale is not None and type(rationale) is not str:
            rationale = _text(rationale)
        if error is not None and type(error) is not str:
            error = _text(error)
        if value is _ABSENT:
            return PredictionRecord(
                index,
                ident,
                gold,
                None,
                raw_label=raw,
                rationale=rationale,
                error=f"the program returned {type(prediction).__name__} without a '{LABEL_FIELD}' field",
            )
        kind = type(value)
        label = read_label.known.get((kind, value), _MISSING) if kind in _MEMO_TYPES else _MISSING
        if label is _MISSING:
            label = read_label.parse(value)
        if raw is None and value is not None:
            raw = str(value)
    except Exception as exc:  # a property raising, a custom label object whose str() raises, ...
        return PredictionRecord(index, ident, gold, None, error=_error_text(exc))
    return PredictionRecord(index, ident, gold, label, raw_label=raw, rationale=rationale, error=error or None)


def _run_threaded(
    program: Any, read_label: _LabelReader, jobs: list[_Job], num_threads: int, replay: _Replay | None
) -> list[PredictionRecord]:
    """Run the jobs on ``num_threads`` threads with DSPy's ``ParallelExecutor`` (workers inherit the caller's
    ``dspy.context``); results in input order."""
    executor = ParallelExecutor(
        num_threads=num_threads,
        max_errors=len(jobs) + 1,  # _run_one catches errors itself; never cancel the run
        disable_progress_bar=True,
        provide_traceback=False,
        timeout=0,  # no straggler re-submission: a slow LM call must not be paid twice
    )
    results = executor.execute(lambda job: _run_journaled(program, read_label, job, replay), jobs)
    records: list[PredictionRecord] = []
    for job, result in zip(jobs, results, strict=True):
        if not isinstance(result, PredictionRecord):  # only if the executor itself failed on this item
            result = PredictionRecord(job.index, job.id, job.gold, None, error=f"not run: {result!r}")
        records.append(result)
    return records


def _error_text(exc: BaseException) -> str:
    try:
        text = f"{type(exc).__name__}: {exc}"
    except Exception:  # an exception whose __str__ raises
        text = f"{type(exc).__name__}: <unprintable>"
    return text if len(text) <= _MAX_ERROR_TEXT else text[: _MAX_ERROR_TEXT - 1] + "…"


def evaluate(
    program: Any,
    examples: Sequence[dspy.Example],
    *,
    task: Task | None = None,
    metric: str | Sequence[str] | None = None,
    num_threads: int = 1,
    ci: bool = True,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    journal: CallJournal | None = None,
) -> EvaluationReport:
    """Run a judge program on labelled examples and score it against the human labels.

    Each example runs as ``program(**example.inputs())``: with ``num_threads=1`` one after another in the caller's
    thread and ``dspy.context``; otherwise on a pool of ``num_threads`` threads (DSPy's ``ParallelExecutor``, which
    copies the caller's ``dspy.context`` settings into every worker). Results keep the input order and do not
    depend on ``num_threads`` (for a program whose answers do not depend on call order). An exception, a missing
    ``label`` or an ``error`` on the prediction becomes a failed prediction (label ``None``, error text recorded) —
    one bad example never aborts the run. Gold labels and example inputs are checked before the first call.

    Args:
        program: A callable (normally a ``dspy.Module``) returning a ``dspy.Prediction`` with ``label``.
        examples: ``dspy.Example`` objects with inputs set and a gold ``label`` (optionally an ``id``).
        task: The judging task; defaults to ``program.task``.
        metric: A metric name or list of names from :data:`blpo_dspy.metrics.METRICS`; ``None`` for the task's
            default metrics. The primary metric is the first name given, or the task's primary metric.
        num_threads: Worker threads.
        ci: Whether to compute bootstrap confidence intervals.
        n_resamples: Bootstrap resamples.
        seed: Bootstrap seed.
        confidence: Interval coverage.
        journal: Record each answered example here and replay the examples already recorded for the same program
            (see the module docstring). Needs a ``dspy.Module`` program.

    Returns:
        The :class:`EvaluationReport`.

    Raises:
        TypeError: No task given and the program has none, an item is not a ``dspy.Example``, or a journal is given
            for a program that is not a ``dspy.Module``.
        ValueError: No examples, an example without inputs, unknown metric names, bad ``num_threads``.
        LabelError: A gold label is missing or outside the label space (the message names the example).
    """
    if task is None:
        task = getattr(program, "task", None)
        if not isinstance(task, Task):
            raise TypeError("evaluate() needs a task: pass task=... or give the program a 'task' attribute")
    if not isinstance(num_threads, int) or isinstance(num_threads, bool) or num_threads < 1:
        raise ValueError(f"num_threads must be a positive integer, got {num_threads!r}")
    examples = list(examples)
    if not examples:
        raise ValueError("evaluate() got no examples")
    names = resolve_metric_names(task, metric)
    primary = names[0] if metric is not None else primary_metric(task)
    jobs = _check_examples(task, examples)

    read_label = _LabelReader(task)
    replay = _Replay(journal, program) if journal is not None else None
    if num_threads == 1:
        # In the caller's thread and context, as DSPy's ParallelExecutor does at one thread, minus its per-item
        # progress bookkeeping (quadratic in the number of examples) and wrappers.
        if replay is None:
            records = [_run_one(program, read_label, job) for job in jobs]
        else:
            records = [_run_journaled(program, read_label, job, replay) for job in jobs]
    else:
        records = _run_threaded(program, read_label, jobs, num_threads, replay)
    if replay is not None and replay.replayed:
        logger.info("%d of %d examples replayed from the journal", replay.replayed, len(records))

    errors = [r for r in records if r.error is not None]  # r.failed, without a property call per record
    if errors:
        first = errors[0]
        logger.warning(
            "%d of %d examples failed; first: %s: %s",
            len(errors),
            len(records),
            _where(first.index, first.id),
            first.error,
        )
    y_true = [r.gold for r in records]
    y_pred = [r.label for r in records]
    scores, confusion = scores_and_confusion(
        task, y_true, y_pred, metrics=names, ci=ci, n_resamples=n_resamples, seed=seed, confidence=confidence
    )
    return EvaluationReport(
        task_name=task.name,
        predictions=records,
        scores=scores,
        primary=primary,
        parse_failure_rate=sum(r.label is None for r in records if r.error is None) / len(records),
        error_count=len(errors),
        n=len(records),
        confusion=confusion,
        confidence=confidence,
        replayed=replay.replayed if replay is not None else 0,
    )
