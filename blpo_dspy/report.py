"""Reports of a compile: Markdown and a self-contained HTML page, with PNG plots, written into the run directory.

:func:`write_report` reads what a compile and its evaluations left in a run directory:

- ``state.json`` (BLPO's resumable state: identity with the seed task card, parameters, rounds, history, usage),
- ``program.json`` (the compiled program; its ``blpo`` key holds the final instructions and the diagnostics),
- ``evaluations/seed.json`` and ``evaluations/compiled.json`` (``EvaluationReport.to_dict()`` of the seed and the
  compiled program on the held-out split),
- ``compare.json`` and ``runs/<optimizer>/seed-<s>/result.json`` (a comparison of optimizers written by
  :func:`blpo_dspy.compare.run_compare`; any other ``compare.json`` is rendered generically as tables),

any of which may be missing, and writes ``report.md``, ``report.html`` (inline CSS, plots embedded as base64 data
URIs, no external asset or link) and the plots as PNG files. For a comparison, the table and the three plots
(held-out primary metric per optimizer, quality vs LM calls, pooled confusion matrices) are computed from the
per-run ``result.json`` files alone; ``compare.json`` only adds the settings and the optimizer order.

Every number is formatted once, into a :class:`ReportDocument`; :func:`render_markdown` and :func:`render_html` only
lay that document out, so the Markdown and the HTML always show the same numbers. The output depends only on the
input files (no timestamp, no absolute path), so the same run directory always gives byte-identical reports.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import re
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
STATE_FILE = "state.json"
PROGRAM_FILE = "program.json"
COMPARE_FILE = "compare.json"
EVALUATIONS_DIR = "evaluations"
EVALUATION_NAMES: tuple[str, ...] = ("seed", "compiled")
HISTORY_PNG = "report_history.png"
CONFUSION_PNG = "report_confusion_{name}.png"
RESULTS_GLOB = "runs/*/seed-*/result.json"
COMPARE_SCORES_PNG = "report_compare_scores.png"
COMPARE_COST_PNG = "report_compare_cost.png"
COMPARE_CONFUSION_PNG = "report_compare_confusion.png"
COMPARE_PNGS: tuple[str, ...] = (COMPARE_SCORES_PNG, COMPARE_COST_PNG, COMPARE_CONFUSION_PNG)
USAGE_ROLES: tuple[str, ...] = ("verbalizer", "judge", "proposer", "total")
USAGE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("calls", "Calls"),
    ("replayed", "Replayed"),
    ("cache_hits", "Cache hits"),
    ("failures", "Failures"),
    ("prompt_tokens", "Prompt tokens"),
    ("completion_tokens", "Completion tokens"),
    ("replayed_tokens", "Replayed tokens"),
    ("seconds", "Seconds"),
)
UNPARSED = "unparsed"
_NA = "n/a"
_MISSING = "—"
_SNIPPET = 60
_REPORT_PARAMS: tuple[str, ...] = (
    "metric",
    "selection",
    "i2t_policy",
    "outer_steps",
    "inner_steps",
    "error_batch_size",
    "retain_batch_size",
    "n_rungs",
    "patience",
    "max_calls",
    "seed",
)


class ReportError(ValueError):
    """An input file of a report is malformed; the message names the file and the field."""


# ---------------------------------------------------------------------------------------------------- document model
@dataclass(frozen=True)
class Paragraph:
    """A paragraph of plain text."""

    text: str


@dataclass(frozen=True)
class KeyValues:
    """A list of ``key: value`` items."""

    items: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Table:
    """A table of preformatted cells.

    Attributes:
        header: Column titles.
        rows: Rows of cells (strings, already formatted).
        numeric: Per column, whether to right-align it.
        wrap: Whether cells hold long text (shown with line breaks kept).
    """

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    numeric: tuple[bool, ...] = ()
    wrap: bool = False


@dataclass(frozen=True)
class Plot:
    """A PNG plot, by file name inside the run directory."""

    file: str
    caption: str


Block = Paragraph | KeyValues | Table | Plot


@dataclass(frozen=True)
class Section:
    """A titled section; ``level`` 2 or 3."""

    title: str
    blocks: tuple[Block, ...]
    level: int = 2


@dataclass(frozen=True)
class ReportDocument:
    """A report ready to be laid out as Markdown or HTML.

    Attributes:
        title: The page title.
        sections: The sections, in order.
        footer: One line naming the generator and the input files.
    """

    title: str
    sections: tuple[Section, ...]
    footer: str

    @property
    def images(self) -> tuple[str, ...]:
        """File names of the plots the document shows."""
        return tuple(b.file for s in self.sections for b in s.blocks if isinstance(b, Plot))


@dataclass(frozen=True)
class ReportPaths:
    """What :func:`write_report` wrote.

    Attributes:
        md: The Markdown report.
        html: The self-contained HTML report.
        images: The PNG plots (also embedded in the HTML).
    """

    md: Path
    html: Path
    images: tuple[Path, ...] = ()


# ---------------------------------------------------------------------------------------------------- inputs
@dataclass
class RunData:
    """The inputs of a report, as read from a run directory.

    Attributes:
        name: Name of the run directory (never its absolute path).
        state: ``state.json``, or ``None``.
        program: The ``blpo`` part of ``program.json``, or ``None``.
        evaluations: ``"seed"`` / ``"compiled"`` -> ``EvaluationReport.to_dict()``, for the files present.
        compare: ``compare.json``, or ``None``.
        results: The comparison's per-run ``result.json`` contents, ordered by optimizer (``compare.json``'s order,
            then by name) and seed; empty when the directory holds no comparison runs.
        sources: Input files read, relative to the run directory.
    """

    name: str
    state: dict[str, Any] | None = None
    program: dict[str, Any] | None = None
    evaluations: dict[str, dict[str, Any]] = field(default_factory=dict)
    compare: Any = None
    results: list[dict[str, Any]] = field(default_factory=list)
    sources: tuple[str, ...] = ()

    @property
    def result_optimizers(self) -> list[str]:
        """Optimizer names of the comparison runs, in table order."""
        return list(dict.fromkeys(r["optimizer"] for r in self.results))

    @property
    def task(self) -> dict[str, Any] | None:
        """The task card (from ``state.json``, else ``program.json``)."""
        if self.state is not None and isinstance(self.state.get("identity", {}).get("task"), dict):
            return self.state["identity"]["task"]
        if self.program is not None and isinstance(self.program.get("task"), dict):
            return self.program["task"]
        return None

    @property
    def diagnostics(self) -> dict[str, Any]:
        """The compile's diagnostics saved with the program (``best_score_``, ``usage_``, ...)."""
        if self.program is None:
            return {}
        diagnostics = self.program.get("diagnostics")
        return diagnostics if isinstance(diagnostics, dict) else {}

    @property
    def seed_instructions(self) -> dict[str, str] | None:
        """The seed instructions ``{"verbalizer": q0, "judge": p0}`` of the task card."""
        task = self.task
        instructions = task.get("instructions") if task else None
        return dict(instructions) if isinstance(instructions, dict) else None

    @property
    def final_instructions(self) -> dict[str, str] | None:
        """The instructions of the compiled program (``program.json``, else the incumbent in ``state.json``)."""
        if self.program is not None and isinstance(self.program.get("instructions"), dict):
            return dict(self.program["instructions"])
        best = self.diagnostics.get("best_instructions_")
        if isinstance(best, dict):
            return dict(best)
        if self.state is not None and isinstance(self.state.get("incumbent"), dict):
            incumbent = self.state["incumbent"]
            return {"verbalizer": incumbent.get("verbalizer", ""), "judge": incumbent.get("judge", "")}
        return None

    @property
    def usage(self) -> dict[str, Any]:
        """Usage per role (the final one saved with the program, else the last saved state)."""
        usage = self.diagnostics.get("usage_")
        if isinstance(usage, dict):
            return usage
        if self.state is not None and isinstance(self.state.get("usage"), dict):
            return self.state["usage"]
        return {}

    @property
    def history(self) -> list[dict[str, Any]]:
        """Inner-step records of the compile."""
        return list(self.state.get("history", [])) if self.state else []

    @property
    def rounds(self) -> list[dict[str, Any]]:
        """One record per finished outer step."""
        return list(self.state.get("rounds", [])) if self.state else []

    @property
    def metric_name(self) -> str | None:
        """Name of the selection metric."""
        name = self.diagnostics.get("metric_name_")
        if name is None and self.state is not None:
            name = self.state.get("params", {}).get("metric")
        return None if name is None else str(name)


def _read_json(run_dir: Path, relative: str) -> Any:
    path = run_dir / relative
    display = f"{run_dir.name}/{relative}"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ReportError(f"{display}: not valid JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ReportError(f"{display}: not UTF-8 text: {exc}") from exc


def _require(condition: bool, display: str, key: str, problem: str) -> None:
    if not condition:
        raise ReportError(f"{display}: field '{key}': {problem}")


def _check_score(display: str, key: str, score: Any) -> None:
    _require(isinstance(score, Mapping), display, key, "expected an object with value, low, high")
    for part in ("value", "low", "high"):
        value = score.get(part)
        ok = value is None or (isinstance(value, int | float) and not isinstance(value, bool))
        _require(ok, display, f"{key}.{part}", f"expected a number or null, got {value!r}")


def _check_evaluation(data: Any, display: str) -> dict[str, Any]:
    _require(isinstance(data, dict), display, "<root>", "expected an object (EvaluationReport.to_dict())")
    scores = data.get("scores")
    _require(isinstance(scores, dict), display, "scores", "missing or not an object of metric -> score")
    for name, score in scores.items():
        _check_score(display, f"scores.{name}", score)
    for key in ("n", "error_count"):
        value = data.get(key)
        _require(value is None or (isinstance(value, int) and value >= 0), display, key, f"bad count {value!r}")
    rate = data.get("parse_failure_rate")
    _require(rate is None or isinstance(rate, int | float), display, "parse_failure_rate", f"bad rate {rate!r}")
    cm = data.get("confusion_matrix")
    if cm is not None:
        _check_confusion(cm, display, "confusion_matrix")
    return data


def _check_confusion(cm: Any, display: str, key: str) -> None:
    _require(isinstance(cm, dict), display, key, "expected an object with labels, columns, counts")
    labels, columns, counts = cm.get("labels"), cm.get("columns"), cm.get("counts")
    _require(isinstance(labels, list) and labels, display, f"{key}.labels", "expected a list")
    _require(isinstance(columns, list) and columns, display, f"{key}.columns", "expected a list")
    _require(
        isinstance(counts, list) and len(counts) == len(labels),
        display,
        f"{key}.counts",
        f"expected {len(labels)} rows (one per label)",
    )
    for i, row in enumerate(counts):
        _require(
            isinstance(row, list)
            and len(row) == len(columns)
            and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in row),
            display,
            f"{key}.counts[{i}]",
            f"expected {len(columns)} non-negative integers, got {row!r}",
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_result(data: Any, display: str) -> dict[str, Any]:
    """Check the fields of a comparison run's ``result.json`` that the report reads."""
    _require(isinstance(data, dict), display, "<root>", "expected an object (a compare run's result.json)")
    _require(isinstance(data.get("optimizer"), str) and data["optimizer"], display, "optimizer", "expected a name")
    seed = data.get("seed")
    _require(isinstance(seed, int) and not isinstance(seed, bool), display, "seed", f"expected an int, got {seed!r}")
    status = data.get("status")
    _require(status in ("ok", "failed"), display, "status", f"expected 'ok' or 'failed', got {status!r}")
    error = data.get("error")
    _require(error is None or isinstance(error, str), display, "error", "expected text or null")
    usage = data.get("usage")
    if status == "ok" or usage is not None:
        _require(isinstance(usage, dict), display, "usage", "expected an object of role -> counters")
        for role in USAGE_ROLES:
            counters = usage.get(role)
            _require(isinstance(counters, dict), display, f"usage.{role}", "missing or not an object")
            for key in ("calls", "prompt_tokens", "completion_tokens", "images"):
                value = counters.get(key)
                _require(_is_number(value) and value >= 0, display, f"usage.{role}.{key}", f"bad count {value!r}")
    replayed = data.get("replayed")
    if replayed is not None:  # written since resumable compare runs; calls and examples an earlier attempt finished
        _require(isinstance(replayed, dict), display, "replayed", "expected an object with compile, evaluation")
        calls = replayed.get("compile")
        _require(isinstance(calls, dict), display, "replayed.compile", "expected an object of role -> calls")
        for role in USAGE_ROLES:
            value = calls.get(role, 0)
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            _require(ok, display, f"replayed.compile.{role}", f"bad count {value!r}")
        for key in ("compile_tokens", "evaluation"):
            value = replayed.get(key, 0)
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            _require(ok, display, f"replayed.{key}", f"bad count {value!r}")
    wall = data.get("wall_seconds")
    _require(isinstance(wall, dict), display, "wall_seconds", "expected an object with compile, evaluate")
    for key in ("compile", "evaluate"):
        value = wall.get(key)
        required = status == "ok" and key == "compile"  # the table's compile time is a mean over the ok runs
        ok = (_is_number(value) and value >= 0) or (value is None and not required)
        _require(ok, display, f"wall_seconds.{key}", f"bad duration {value!r}")
    if status != "ok":
        return data
    test = data.get("test")
    _require(isinstance(test, dict), display, "test", "expected the held-out evaluation of an ok run")
    scores = test.get("scores")
    _require(isinstance(scores, dict) and scores, display, "test.scores", "missing or not an object of metric -> score")
    for name, score in scores.items():
        _check_score(display, f"test.scores.{name}", score)
    primary = test.get("primary")
    _require(primary in scores, display, "test.primary", f"expected a metric of test.scores, got {primary!r}")
    n = test.get("n")
    _require(isinstance(n, int) and not isinstance(n, bool) and n >= 0, display, "test.n", f"bad count {n!r}")
    rate = test.get("parse_failure_rate")
    _require(rate is None or _is_number(rate), display, "test.parse_failure_rate", f"bad rate {rate!r}")
    confidence = test.get("confidence", 0.95)
    ok = _is_number(confidence) and 0 < confidence < 1
    _require(ok, display, "test.confidence", f"expected a coverage in (0, 1), got {confidence!r}")
    if test.get("confusion_matrix") is not None:
        _check_confusion(test["confusion_matrix"], display, "test.confusion_matrix")
    return data


def _check_state(data: Any, display: str) -> dict[str, Any]:
    _require(isinstance(data, dict), display, "<root>", "expected an object (BLPO state)")
    for key in ("history", "rounds"):
        items = data.get(key, [])
        _require(isinstance(items, list), display, key, "expected a list")
        for i, item in enumerate(items):
            _require(isinstance(item, dict), display, f"{key}[{i}]", "expected an object")
            step = item.get("outer_step")
            _require(isinstance(step, int) and step >= 0, display, f"{key}[{i}].outer_step", f"bad step {step!r}")
    return data


def load_run(run_dir: str | Path) -> RunData:
    """Read the inputs of a report from a run (or comparison) directory.

    Args:
        run_dir: The directory.

    Returns:
        The :class:`RunData`; absent files are ``None`` / left out.

    Raises:
        FileNotFoundError: The directory does not exist or holds none of the report's inputs.
        ReportError: An input file is not valid JSON or misses a field the report needs (the message names the file
            and the field).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory '{run_dir.name}' not found")
    data = RunData(name=run_dir.name)
    sources: list[str] = []
    if (run_dir / STATE_FILE).is_file():
        data.state = _check_state(_read_json(run_dir, STATE_FILE), f"{run_dir.name}/{STATE_FILE}")
        sources.append(STATE_FILE)
    if (run_dir / PROGRAM_FILE).is_file():
        program = _read_json(run_dir, PROGRAM_FILE)
        display = f"{run_dir.name}/{PROGRAM_FILE}"
        _require(isinstance(program, dict), display, "<root>", "expected an object")
        meta = program.get("blpo")
        _require(isinstance(meta, dict), display, "blpo", "missing: not a program saved by blpo-dspy")
        data.program = meta
        sources.append(PROGRAM_FILE)
    for name in EVALUATION_NAMES:
        relative = f"{EVALUATIONS_DIR}/{name}.json"
        if (run_dir / relative).is_file():
            data.evaluations[name] = _check_evaluation(_read_json(run_dir, relative), f"{run_dir.name}/{relative}")
            sources.append(relative)
    if (run_dir / COMPARE_FILE).is_file():
        data.compare = _read_json(run_dir, COMPARE_FILE)
        sources.append(COMPARE_FILE)
    data.results = _load_results(run_dir, data.compare)
    if data.results:
        sources.append(f"{RESULTS_GLOB} ({len(data.results)} files)")
    if not sources:
        raise FileNotFoundError(
            f"run directory '{run_dir.name}' holds none of {STATE_FILE}, {PROGRAM_FILE}, "
            f"{EVALUATIONS_DIR}/{{seed,compiled}}.json, {COMPARE_FILE}, {RESULTS_GLOB}: nothing to report"
        )
    data.sources = tuple(sources)
    return data


def _load_results(run_dir: Path, compare: Any) -> list[dict[str, Any]]:
    """The comparison runs' ``result.json`` files, checked, selected and ordered as ``compare.json`` lists them.

    When ``compare.json`` names its ``optimizers`` and ``seeds``, only those runs are kept (a directory reused by a
    later, smaller comparison keeps older runs on disk); optimizers it does not list come after, by name.
    """
    loaded: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(run_dir.glob(RESULTS_GLOB)):
        relative = path.relative_to(run_dir).as_posix()
        display = f"{run_dir.name}/{relative}"
        loaded.append((display, _check_result(_read_json(run_dir, relative), display)))
    order: list[str] = []
    if isinstance(compare, Mapping):
        names, seeds = compare.get("optimizers"), compare.get("seeds")
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            order = list(names)
            loaded = [(d, r) for d, r in loaded if r["optimizer"] in order]
        if isinstance(seeds, list) and all(isinstance(s, int) for s in seeds):
            loaded = [(d, r) for d, r in loaded if r["seed"] in seeds]
    rank = {name: i for i, name in enumerate(order)}
    loaded.sort(key=lambda item: (rank.get(item[1]["optimizer"], len(rank)), item[1]["optimizer"], item[1]["seed"]))
    reference: tuple[str, Any] | None = None
    for display, result in loaded:  # pooled confusion matrices need the same rows and columns everywhere
        cm = (result.get("test") or {}).get("confusion_matrix") if result["status"] == "ok" else None
        if cm is None:
            continue
        if reference is None:
            reference = (display, cm)
        elif (cm["labels"], cm["columns"]) != (reference[1]["labels"], reference[1]["columns"]):
            raise ReportError(
                f"{display}: field 'test.confusion_matrix': labels/columns differ from {reference[0]} "
                "(runs of one comparison judge the same task)"
            )
    return [result for _, result in loaded]


# ---------------------------------------------------------------------------------------------------- numbers
def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def format_number(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals; ``"n/a"`` for ``None``, ``nan`` and non-numbers."""
    number = _finite(value)
    return _NA if number is None else f"{number:.{digits}f}"


def _fmt_signed(value: float | None, digits: int) -> str:
    return _NA if value is None else f"{value:+.{digits}f}"


def _fmt_int(value: Any) -> str:
    return str(int(value)) if isinstance(value, int | float) and not isinstance(value, bool) else _MISSING


def _fmt_interval(score: Mapping[str, Any], digits: int) -> str:
    if score.get("low") is None and score.get("high") is None:
        return _MISSING
    return f"[{format_number(score.get('low'), digits)}, {format_number(score.get('high'), digits)}]"


def _fmt_cell(value: Any, digits: int) -> str:
    if value is None:
        return _MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format_number(value, digits)
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(", ", ": "), default=str)


def _snippet(text: Any, limit: int = _SNIPPET) -> str:
    if not isinstance(text, str) or not text:
        return _MISSING
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


@dataclass(frozen=True)
class ClassMetrics:
    """Precision, recall and F1 of one label, from a confusion matrix.

    Attributes:
        label: The label.
        support: Examples whose human label is this label.
        predicted: Examples the judge gave this label.
        unparsed: Examples of this human label whose prediction failed or did not parse.
        precision: ``tp / predicted`` (``None`` when the judge never gave this label).
        recall: ``tp / support`` (``None`` when no example has this label).
        f1: ``2 tp / (support + predicted)`` (``None`` when both are zero).
    """

    label: Any
    support: int
    predicted: int
    unparsed: int
    precision: float | None
    recall: float | None
    f1: float | None


def per_class_metrics(confusion: Mapping[str, Any]) -> list[ClassMetrics]:
    """Per-label precision, recall and F1 from a confusion matrix (``ConfusionMatrix.to_dict()``).

    Rows are human labels, columns the judge's labels plus ``"unparsed"``: an unparsed prediction is a false negative
    of the gold label and a false positive of no label (as in :mod:`blpo_dspy.metrics`).

    Args:
        confusion: ``{"labels": [...], "columns": [...], "counts": [[...], ...]}``.

    Returns:
        One :class:`ClassMetrics` per label, in label order.
    """
    labels = list(confusion["labels"])
    columns = list(confusion["columns"])
    counts = [list(row) for row in confusion["counts"]]
    out = []
    for i, label in enumerate(labels):
        j = columns.index(label) if label in columns else None
        tp = counts[i][j] if j is not None else 0
        support = sum(counts[i])
        predicted = sum(row[j] for row in counts) if j is not None else 0
        unparsed = counts[i][columns.index(UNPARSED)] if UNPARSED in columns else 0
        out.append(
            ClassMetrics(
                label=label,
                support=support,
                predicted=predicted,
                unparsed=unparsed,
                precision=tp / predicted if predicted else None,
                recall=tp / support if support else None,
                f1=2 * tp / (support + predicted) if support + predicted else None,
            )
        )
    return out


# ---------------------------------------------------------------------------------------------------- comparison
def comparison_metrics(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """Metric names of a comparison's ok runs: the primary metric first, then the others in ``result.json`` order.

    Args:
        results: ``result.json`` contents of the runs.

    Returns:
        The names (empty when no run is ok).
    """
    metrics: list[str] = []
    primary = None
    for result in results:
        if result["status"] != "ok":
            continue
        primary = primary or result["test"]["primary"]
        metrics += [name for name in result["test"]["scores"] if name not in metrics]
    if primary is not None:
        metrics.remove(primary)
        metrics.insert(0, primary)
    return metrics


def _run_score(result: Mapping[str, Any], metric: str) -> tuple[float, float | None, float | None] | None:
    """``(value, low, high)`` of one held-out score of an ok run, ``None`` when missing or not finite."""
    if result["status"] != "ok":
        return None
    score = result["test"]["scores"].get(metric)
    value = _finite(score.get("value")) if score else None
    if value is None:
        return None
    return value, _finite(score.get("low")), _finite(score.get("high"))


def pool_confusion(matrices: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The element-wise sum of confusion matrices (``ConfusionMatrix.to_dict()``) with the same labels and columns.

    Args:
        matrices: The matrices, e.g. one per seed of an optimizer.

    Returns:
        ``{"labels", "columns", "counts"}``, or ``None`` for no matrix.

    Raises:
        ValueError: The matrices have different labels or columns.
    """
    if not matrices:
        return None
    labels, columns = list(matrices[0]["labels"]), list(matrices[0]["columns"])
    counts = [[0] * len(columns) for _ in labels]
    for cm in matrices:
        if list(cm["labels"]) != labels or list(cm["columns"]) != columns:
            raise ValueError(f"confusion matrices differ: {cm['labels']}/{cm['columns']} vs {labels}/{columns}")
        for i, row in enumerate(cm["counts"]):
            for j, value in enumerate(row):
                counts[i][j] += int(value)
    return {"labels": labels, "columns": columns, "counts": counts}


@dataclass(frozen=True)
class _OptimizerRuns:
    """The runs of one optimizer in a comparison."""

    name: str
    runs: tuple[dict[str, Any], ...]

    @property
    def ok(self) -> list[dict[str, Any]]:
        return [r for r in self.runs if r["status"] == "ok"]

    @property
    def failed(self) -> int:
        return len(self.runs) - len(self.ok)

    @property
    def pooled_confusion(self) -> tuple[dict[str, Any] | None, int]:
        """The confusion matrix pooled over the ok runs that recorded one, and how many did."""
        matrices = [r["test"]["confusion_matrix"] for r in self.ok if r["test"].get("confusion_matrix") is not None]
        return pool_confusion(matrices), len(matrices)

    @property
    def tick(self) -> str:
        """The optimizer's axis label (with its failed runs, if any)."""
        return self.name if not self.failed else f"{self.name}\n({self.failed}/{len(self.runs)} failed)"

    @property
    def missing_reason(self) -> str:
        """Why the optimizer has no score: all runs failed, or no ok run has the metric."""
        return "failed" if not self.ok else "no score"


def _by_optimizer(data: RunData) -> list[_OptimizerRuns]:
    return [
        _OptimizerRuns(name, tuple(r for r in data.results if r["optimizer"] == name))
        for name in data.result_optimizers
    ]


# ---------------------------------------------------------------------------------------------------- sections
_EVAL_TITLES = {"seed": "Seed", "compiled": "Compiled"}


def _metric_title(name: str) -> str:
    from blpo_dspy.metrics import METRICS

    return METRICS[name].title if name in METRICS else name


def _ci_header(evaluations: Mapping[str, Mapping[str, Any]]) -> str:
    confidences = {float(e.get("confidence", 0.95)) for e in evaluations.values()}
    if len(confidences) == 1:
        return f"{round(confidences.pop() * 100, 1):g}% CI"
    return "CI"


def _scores_table(evaluations: Mapping[str, Mapping[str, Any]], digits: int) -> Table:
    names = list(evaluations)
    primary = None
    for name in reversed(names):  # the compiled program's primary metric wins
        primary = evaluations[name].get("primary") or primary
    metrics: list[str] = []
    for evaluation in evaluations.values():
        for metric in evaluation["scores"]:
            if metric not in metrics:
                metrics.append(metric)
    if primary in metrics:
        metrics.remove(primary)
        metrics.insert(0, primary)
    ci = _ci_header(evaluations)
    header = ["Metric"]
    for name in names:
        header += [_EVAL_TITLES[name], f"{_EVAL_TITLES[name]} {ci}"]
    both = len(names) == 2
    if both:
        header.append("Δ (compiled − seed)")
    rows = []
    for metric in metrics:
        title = _metric_title(metric) + (" (primary)" if metric == primary else "")
        row = [title]
        values = []
        for name in names:
            score = evaluations[name]["scores"].get(metric)
            if score is None:
                row += [_MISSING, _MISSING]
                values.append(None)
            else:
                row += [format_number(score.get("value"), digits), _fmt_interval(score, digits)]
                values.append(_finite(score.get("value")))
        if both:
            delta = None if None in values else values[1] - values[0]  # type: ignore[operator]
            row.append(_fmt_signed(delta, digits))
        rows.append(tuple(row))
    numeric = (False, *([True] * (len(header) - 1)))
    return Table(tuple(header), tuple(rows), numeric)


def _answers_table(evaluations: Mapping[str, Mapping[str, Any]], digits: int) -> Table:
    names = list(evaluations)
    rows = [
        ("Examples", *(_fmt_int(evaluations[n].get("n")) for n in names)),
        ("Parse-failure rate", *(format_number(evaluations[n].get("parse_failure_rate"), digits) for n in names)),
        ("Failed calls", *(_fmt_int(evaluations[n].get("error_count")) for n in names)),
    ]
    header = ("", *(_EVAL_TITLES[n] for n in names))
    return Table(header, tuple(rows), (False, *([True] * len(names))))


def _confusion_table(cm: Mapping[str, Any]) -> Table:
    header = ("Human ↓ / judge →", *(str(c) for c in cm["columns"]))
    rows = tuple((str(label), *(str(c) for c in row)) for label, row in zip(cm["labels"], cm["counts"], strict=True))
    return Table(header, rows, (False, *([True] * len(cm["columns"]))))


def _per_class_table(cm: Mapping[str, Any], digits: int) -> Table:
    rows = tuple(
        (
            str(m.label),
            format_number(m.precision, digits),
            format_number(m.recall, digits),
            format_number(m.f1, digits),
            str(m.support),
            str(m.predicted),
            str(m.unparsed),
        )
        for m in per_class_metrics(cm)
    )
    header = ("Label", "Precision", "Recall", "F1", "Support", "Predicted", "Unparsed")
    return Table(header, rows, (False, *([True] * 6)))


def _summary_section(data: RunData, digits: int) -> Section | None:
    items: list[tuple[str, str]] = []
    task = data.task
    if task:
        items.append(("Task", f"{task.get('name', _MISSING)} ({task.get('kind', '?')})"))
        if task.get("description"):
            items.append(("Description", str(task["description"])))
        labels = task.get("labels")
        if labels is None and isinstance(task.get("scale"), dict):
            labels = [task["scale"].get("min"), "…", task["scale"].get("max")]
        if labels:
            items.append(("Labels", ", ".join(str(label) for label in labels)))
    state = data.state or {}
    identity = state.get("identity", {}) if isinstance(state.get("identity"), dict) else {}
    if identity.get("judge_sees"):
        items.append(("Judge sees", str(identity["judge_sees"])))
    models = identity.get("models")
    if isinstance(models, dict):
        for role in ("verbalizer", "judge", "proposer"):
            model = models.get(role, {}).get("model") if isinstance(models.get(role), dict) else None
            if model:
                items.append((f"{role.capitalize()} LM", str(model)))
    split = identity.get("data")
    if isinstance(split, dict) and "n_train" in split:
        items.append(
            ("Train / validation examples", f"{_fmt_int(split.get('n_train'))} / {_fmt_int(split.get('n_val'))}")
        )
    params = state.get("params")
    if isinstance(params, dict):
        shown = [f"{key}={_fmt_cell(params[key], digits)}" for key in _REPORT_PARAMS if key in params]
        if shown:
            items.append(("Optimizer parameters", ", ".join(shown)))
    if state.get("status"):
        items.append(("Status", str(state["status"])))
    diagnostics = data.diagnostics
    if diagnostics.get("stop_reason_"):
        items.append(("Stop reason", str(diagnostics["stop_reason_"])))
    if data.rounds or data.state is not None:
        items.append(("Outer steps finished", str(len(data.rounds))))
    metric = data.metric_name
    seed_score, best_score = diagnostics.get("seed_score_"), diagnostics.get("best_score_")
    if seed_score is not None or best_score is not None:
        name = _metric_title(metric) if metric else "score"
        items.append(
            (
                f"Validation {name}",
                f"{format_number(seed_score, digits)} (seed) → {format_number(best_score, digits)} (compiled)",
            )
        )
    if not items:
        return None
    return Section("Summary", (KeyValues(tuple(items)),))


def _evaluation_sections(data: RunData, digits: int, images: Sequence[str]) -> list[Section]:
    evaluations = data.evaluations
    if not evaluations:
        return [
            Section(
                "Held-out evaluation",
                (Paragraph(f"No evaluation found ({EVALUATIONS_DIR}/seed.json, {EVALUATIONS_DIR}/compiled.json)."),),
            )
        ]
    missing = [n for n in EVALUATION_NAMES if n not in evaluations]
    blocks: list[Block] = []
    first = next(iter(evaluations.values()))
    task_name = first.get("task")
    intro = "Agreement with the human labels on the held-out split"
    intro += f" (task {task_name})." if task_name else "."
    intro += " Intervals are percentile-bootstrap confidence intervals."
    if missing:
        intro += " Not evaluated: " + ", ".join(f"{n} program ({EVALUATIONS_DIR}/{n}.json)" for n in missing) + "."
    blocks.append(Paragraph(intro))
    blocks.append(_scores_table(evaluations, digits))
    blocks.append(
        Paragraph(
            "Parse failures are answers that did not parse to a label; failed calls raised or returned an error. "
            "Both count as wrong answers in every metric."
        )
    )
    blocks.append(_answers_table(evaluations, digits))
    sections = [Section("Held-out evaluation", tuple(blocks))]

    per_class: list[Block] = []
    confusion: list[Block] = []
    for name, evaluation in evaluations.items():
        cm = evaluation.get("confusion_matrix")
        if cm is None:
            continue
        title = f"{_EVAL_TITLES[name]} program"
        per_class += [Paragraph(f"{title}:"), _per_class_table(cm, digits)]
        confusion += [Paragraph(f"{title} (rows: human label, columns: judge label):"), _confusion_table(cm)]
        png = CONFUSION_PNG.format(name=name)
        if png in images:
            confusion.append(Plot(png, f"Confusion matrix of the {name} program"))
    if per_class:
        sections.append(Section("Per-class metrics", tuple(per_class)))
        sections.append(Section("Confusion matrices", tuple(confusion)))
    return sections


def _history_section(data: RunData, digits: int, images: Sequence[str]) -> Section | None:
    if data.state is None:
        if data.program is None:
            return None
        return Section("Optimisation history", (Paragraph(f"No {STATE_FILE}: the history is not available."),))
    metric = _metric_title(data.metric_name) if data.metric_name else "score"
    blocks: list[Block] = []
    if HISTORY_PNG in images:
        blocks.append(Plot(HISTORY_PNG, f"Validation {metric} per outer step and inner candidates"))
    seed_score = data.diagnostics.get("seed_score_")
    rows = []
    if seed_score is not None:
        rows.append(("seed", _MISSING, format_number(seed_score, digits)))
    for r in data.rounds:
        accepted = r.get("accepted")
        rows.append(
            (
                str(r["outer_step"]),
                str(accepted) if accepted else "kept incumbent",
                format_number(r.get("val_score"), digits),
            )
        )
    if rows:
        blocks.append(Paragraph(f"Validation {metric} of the incumbent after each outer step:"))
        blocks.append(
            Table(("Outer step", "Accepted candidate", f"Validation {metric}"), tuple(rows), (False, False, True))
        )
    history = data.history
    if history:
        blocks.append(
            Paragraph(
                "Inner steps: the inner score is the share of the error batch the proposed judge instruction fixes "
                "(minus retained examples it breaks, with guarded selection); the validation score is given for "
                "candidates that were evaluated on the whole validation split."
            )
        )
        hrows = tuple(
            (
                str(h["outer_step"]),
                _fmt_cell(h.get("inner_step"), digits),
                _snippet(h.get("q")),
                _snippet(h.get("p_prime")),
                format_number(h.get("inner_score"), digits) if h.get("inner_score") is not None else _MISSING,
                _fmt_int(h.get("fixed")),
                _fmt_int(h.get("broken")),
                format_number(h.get("val_score"), digits) if h.get("val_score") is not None else _MISSING,
                _fmt_cell(h.get("pruned"), digits),
                "yes" if h.get("accepted") else "no",
                str(h["error"]) if h.get("error") else "",
            )
            for h in history
        )
        header = ("Outer", "Inner", "q (I2T)", "p′ (judge)", "Inner score", "Fixed", "Broken", f"Validation {metric}")
        header += ("Pruned", "Accepted", "Error")
        numeric = (True, True, False, False, True, True, True, True, False, False, False)
        blocks.append(Table(header, hrows, numeric))
    elif not rows:
        blocks.append(Paragraph("No outer step was recorded."))
    return Section("Optimisation history", tuple(blocks))


def _instructions_section(data: RunData) -> Section | None:
    seed, final = data.seed_instructions, data.final_instructions
    if seed is None and final is None:
        return None
    rows = []
    for role, title in (("verbalizer", "Verbalizer (I2T) instruction q"), ("judge", "Judge instruction p")):
        before = seed.get(role) if seed else None
        after = final.get(role) if final else None
        changed = _MISSING if before is None or after is None else ("yes" if before != after else "no")
        rows.append((title, before or _MISSING, after or _MISSING, changed))
    table = Table(("Instruction", "Seed", "Compiled", "Changed"), tuple(rows), wrap=True)
    return Section("Instructions", (table,))


def _usage_section(data: RunData) -> Section | None:
    usage = data.usage
    roles = [role for role in USAGE_ROLES if isinstance(usage.get(role), dict)]
    roles += [r for r in usage if r not in roles and r != "verbalization_cache" and isinstance(usage[r], dict)]
    if not roles:
        return None
    rows = []
    for role in roles:
        counters = usage[role]
        cells = [role]
        for key, _ in USAGE_COLUMNS:
            value = counters.get(key)
            cells.append(format_number(value, 3) if key == "seconds" else _fmt_int(value))
        rows.append(tuple(cells))
    header = ("Role", *(title for _, title in USAGE_COLUMNS))
    blocks: list[Block] = [
        Paragraph(
            "LM calls per role during the compile. Calls are calls actually made; replayed calls were finished by an "
            "earlier attempt of the run and read back on resume (their tokens, as reported when they were made, are "
            "the replayed tokens); cache hits were served from the caches."
        ),
        Table(header, tuple(rows), (False, *([True] * len(USAGE_COLUMNS)))),
    ]
    cache = usage.get("verbalization_cache")
    if isinstance(cache, dict):
        blocks.append(
            KeyValues(
                (
                    (
                        "Verbalization cache",
                        f"{_fmt_int(cache.get('hits'))} hits, {_fmt_int(cache.get('misses'))} misses",
                    ),
                )
            )
        )
    return Section("Usage", tuple(blocks))


def _rows_table(rows: Sequence[Mapping[str, Any]], digits: int) -> Table:
    keys: list[str] = []
    for row in rows:
        for key in row:
            if key not in keys:
                keys.append(key)
    cells = tuple(tuple(_fmt_cell(row.get(key), digits) for key in keys) for row in rows)
    numeric = tuple(
        all(isinstance(row.get(k), int | float) and not isinstance(row.get(k), bool) for row in rows if k in row)
        for k in keys
    )
    return Table(tuple(keys), cells, numeric)


def _is_rows(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, Mapping) for item in value)


def _compare_section(data: RunData, digits: int) -> Section | None:
    compare = data.compare
    if compare is None:
        return None
    blocks: list[Block] = []
    if _is_rows(compare):
        blocks.append(_rows_table(compare, digits))
    elif isinstance(compare, Mapping):
        scalars = tuple((str(k), _fmt_cell(v, digits)) for k, v in compare.items() if not _is_rows(v))
        if scalars:
            blocks.append(KeyValues(scalars))
        for key, value in compare.items():
            if _is_rows(value):
                blocks += [Paragraph(f"{key}:"), _rows_table(value, digits)]
    else:
        blocks.append(Paragraph(_fmt_cell(compare, digits)))
    return Section("Comparison", tuple(blocks) or (Paragraph(f"{COMPARE_FILE} is empty."),))


_COMPARE_SETTINGS: tuple[tuple[str, str], ...] = (
    ("task", "Task"),
    ("judge_sees", "Judge sees"),
    ("seeds", "Seeds"),
    ("splits", "Split sizes"),
    ("split_seed", "Split seed"),
    ("max_calls", "LM-call budget per compile"),
    ("outer_steps", "Outer steps"),
    ("inner_steps", "Inner steps"),
    ("models", "Models"),
)


def _setting_text(value: Any, digits: int) -> str:
    if value is None:
        return "none"
    if isinstance(value, list):
        return ", ".join(_fmt_cell(v, digits) for v in value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {_fmt_cell(v, digits)}" for k, v in value.items())
    return _fmt_cell(value, digits)


def _first_line(text: Any, limit: int = 300) -> str:
    if not isinstance(text, str) or not text.strip():
        return _MISSING
    return text.strip().splitlines()[0][:limit]


def _comparison_sections(data: RunData, digits: int, images: Sequence[str]) -> list[Section]:
    """The comparison table, failures, per-run scores and the comparison plots, all from the runs' result.json."""
    from blpo_dspy.compare import aggregate, compile_calls, compile_tokens, table_header, table_rows

    results = data.results
    groups = _by_optimizer(data)
    metrics = comparison_metrics(results)
    primary = metrics[0] if metrics else None
    primary_title = _metric_title(primary) if primary else "primary metric"
    compare = data.compare if isinstance(data.compare, Mapping) else {}
    ci = _ci_header({str(i): r["test"] for i, r in enumerate(results) if r["status"] == "ok"})

    blocks: list[Block] = []
    settings = tuple((title, _setting_text(compare[key], digits)) for key, title in _COMPARE_SETTINGS if key in compare)
    if settings:
        blocks.append(KeyValues(settings))
    blocks.append(
        Paragraph(
            f"Held-out test scores: mean ± sample standard deviation over each optimizer's ok seeds ({primary_title} "
            "is the task's primary metric). LM calls, images, tokens and compile time are means over the ok seeds, "
            f"measured during the compile (the test evaluation excluded). Computed from the {len(results)} files "
            f"{RESULTS_GLOB}."
        )
    )
    header = table_header(metrics)
    cells = table_rows(aggregate(results, data.result_optimizers, metrics), metrics, digits)
    blocks.append(Table(tuple(header), tuple(tuple(row) for row in cells), (False, *([True] * (len(header) - 1)))))
    if COMPARE_SCORES_PNG in images:
        blocks.append(
            Plot(
                COMPARE_SCORES_PNG,
                f"Held-out {primary_title} per optimizer: mean ± sample std over seeds (diamond), each seed with its "
                f"bootstrap {ci} (points); optimizers without a score are marked failed",
            )
        )
    sections = [Section("Comparison", tuple(blocks))]

    failures = [r for r in results if r["status"] != "ok"]
    if failures:
        rows = tuple((r["optimizer"], str(r["seed"]), _first_line(r.get("error"))) for r in failures)
        sections.append(
            Section(
                "Failed runs",
                (
                    Paragraph("These runs raised; the comparison went on without them (details in error.txt)."),
                    Table(("Optimizer", "Seed", "Error"), rows, (False, True, False)),
                ),
            )
        )

    run_rows = []
    for r in results:
        score = r["test"]["scores"].get(primary) if r["status"] == "ok" and primary else None
        usage = r.get("usage") or {}
        total = usage.get("total") or {}
        tokens = (
            compile_tokens(r)
            if _is_number(total.get("prompt_tokens")) and _is_number(total.get("completion_tokens"))
            else None
        )
        run_rows.append(
            (
                r["optimizer"],
                str(r["seed"]),
                r["status"],
                format_number(score.get("value"), digits) if score else _MISSING,
                _fmt_interval(score, digits) if score else _MISSING,
                _fmt_int(compile_calls(r, "total") if _is_number(total.get("calls")) else None),
                _fmt_int(tokens),
                format_number(r["wall_seconds"].get("compile"), 2),
                format_number(r["test"].get("parse_failure_rate"), digits) if r["status"] == "ok" else _MISSING,
            )
        )
    run_header = ("Optimizer", "Seed", "Status", f"{primary_title}", ci, "LM calls", "Tokens", "Compile time (s)")
    run_header += ("Parse-failure rate",)
    sections.append(
        Section(
            "Runs",
            (
                Paragraph(
                    f"Every (optimizer, seed) run: held-out {primary_title} with its percentile-bootstrap interval, "
                    "and the LM calls and tokens of the compile."
                ),
                Table(run_header, tuple(run_rows), (False, True, False, *([True] * 6))),
            ),
        )
    )

    if COMPARE_COST_PNG in images:
        sections.append(
            Section(
                "Quality vs cost",
                (
                    Plot(
                        COMPARE_COST_PNG,
                        f"Held-out {primary_title} vs LM calls of the compile, one marker per run (vertical lines: "
                        f"bootstrap {ci}); failed runs have no score",
                    ),
                ),
            )
        )

    confusion_blocks: list[Block] = []
    if COMPARE_CONFUSION_PNG in images:
        confusion_blocks.append(
            Plot(COMPARE_CONFUSION_PNG, "Held-out confusion matrices per optimizer, pooled over its ok seeds")
        )
    for group in groups:
        pooled, seeds = group.pooled_confusion
        if pooled is None:
            reason = "failed" if not group.ok else "no confusion matrix in its result.json files"
            confusion_blocks.append(Paragraph(f"{group.name}: {reason}."))
            continue
        confusion_blocks.append(
            Paragraph(
                f"{group.name}, pooled over {seeds} seed{'s' if seeds != 1 else ''} "
                "(rows: human label, columns: judge label):"
            )
        )
        confusion_blocks.append(_confusion_table(pooled))
    if confusion_blocks:
        sections.append(Section("Confusion matrices (pooled over seeds)", tuple(confusion_blocks)))
    return sections


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("blpo-dspy")
    except PackageNotFoundError:
        return "unknown"


def build_document(
    data: RunData, *, title: str | None = None, images: Iterable[str] = (), digits: int = 3
) -> ReportDocument:
    """Format everything a report shows into a :class:`ReportDocument` (numbers are formatted here, once).

    Args:
        data: The inputs (see :func:`load_run`).
        title: The page title; default ``"BLPO report: <task>"`` (or ``"BLPO comparison"``).
        images: File names of the plots that were rendered (see :func:`render_plots`); others are not shown.
        digits: Decimal places of scores.

    Returns:
        The document.
    """
    images = tuple(images)
    if title is None:
        task = data.task
        task_name = task.get("name") if task else None
        if task_name is None:
            task_name = next((e.get("task") for e in data.evaluations.values() if e.get("task")), None)
        if data.results:
            compare_task = data.compare.get("task") if isinstance(data.compare, Mapping) else None
            task_name = compare_task if isinstance(compare_task, str) else data.results[0].get("task")
            title = f"BLPO comparison: {task_name}" if isinstance(task_name, str) else "BLPO comparison"
        else:
            title = (
                f"BLPO report: {task_name}"
                if task_name
                else ("BLPO comparison" if data.compare is not None else "BLPO report")
            )
    sections: list[Section | None] = [_summary_section(data, digits)]
    if data.state is not None or data.program is not None or data.evaluations:
        sections += _evaluation_sections(data, digits, images)
        sections.append(_history_section(data, digits, images))
        sections.append(_instructions_section(data))
        sections.append(_usage_section(data))
    if data.results:
        sections += _comparison_sections(data, digits, images)
    else:
        sections.append(_compare_section(data, digits))
    footer = f"Generated by blpo-dspy {_version()} from {', '.join(data.sources)}."
    document = ReportDocument(title=title, sections=tuple(s for s in sections if s is not None), footer=footer)
    return _scrub_paths(document, _home_scrubber())


def _home_scrubber() -> Callable[[str], str]:
    """Replace the user's home directory by ``~`` in text read from the inputs (error messages, say)."""
    home = str(Path.home()).rstrip("/\\")
    if len(home) <= 1:
        return lambda text: text
    pattern = re.compile(re.escape(home) + r"(?![\w.-])")
    return lambda text: pattern.sub("~", text)


def _scrub_paths(value: Any, scrub: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, tuple):
        return tuple(_scrub_paths(item, scrub) for item in value)
    if is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _scrub_paths(getattr(value, f.name), scrub) for f in fields(value)}
        return replace(value, **changes)
    return value


# ---------------------------------------------------------------------------------------------------- plots
def _matplotlib() -> tuple[Any, Any]:
    """``(Figure, FigureCanvasAgg)``, imported lazily (no pyplot: no global backend change, thread-safe)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "report plots need matplotlib, which is not installed: pip install 'blpo-dspy[report]' "
            "(or call write_report(..., plots=False) for a report without plots)"
        ) from exc
    return Figure, FigureCanvasAgg


def _png(figure: Any, canvas_class: Any) -> bytes:
    canvas_class(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def _draw_confusion(ax: Any, cm: Mapping[str, Any], title: str) -> None:
    labels, columns, counts = cm["labels"], cm["columns"], cm["counts"]
    peak = max(1, max(max(row) for row in counts))
    ax.imshow(counts, cmap="Blues", vmin=0, vmax=peak, aspect="auto")
    for i, row in enumerate(counts):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    ax.set_xticks(range(len(columns)), [str(c) for c in columns])
    ax.set_yticks(range(len(labels)), [str(label) for label in labels])
    ax.set_xlabel("judge label")
    ax.set_ylabel("human label")
    ax.set_title(title)


def _confusion_png(cm: Mapping[str, Any], title: str) -> bytes:
    figure_class, canvas_class = _matplotlib()
    labels, columns = cm["labels"], cm["columns"]
    fig = figure_class(figsize=(1.6 + 0.9 * len(columns), 1.4 + 0.7 * len(labels)), layout="constrained")
    _draw_confusion(fig.add_subplot(), cm, title)
    return _png(fig, canvas_class)


_MARKERS = "osD^vP*Xhp<>"


def _compare_scores_png(groups: Sequence[_OptimizerRuns], primary: str | None) -> bytes:
    """Held-out primary metric per optimizer: mean ± sample std over seeds, and each seed with its bootstrap CI."""
    figure_class, canvas_class = _matplotlib()
    title = _metric_title(primary) if primary else "primary metric"
    fig = figure_class(figsize=(max(6.0, 1.3 * len(groups) + 2.5), 4.8), layout="constrained")
    ax = fig.add_subplot()
    mean_label, seed_label = "mean ± sample std over seeds", "one seed (bootstrap CI)"
    plotted = False
    for x, group in enumerate(groups):
        scores = [(r, s) for r in group.ok if primary and (s := _run_score(r, primary)) is not None]
        if not scores:
            ax.text(
                x,
                0.5,
                group.missing_reason,
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="center",
                color="tab:red",
                fontweight="bold",
            )
            continue
        plotted = True
        values = [s[0] for _, s in scores]
        mean = statistics.fmean(values)
        std = statistics.stdev(values) if len(values) >= 2 else None
        ax.errorbar(
            [x - 0.2],
            [mean],
            yerr=None if std is None else [[std], [std]],
            fmt="D",
            color="black",
            markersize=7,
            capsize=6,
            label=mean_label,
            zorder=3,
        )
        mean_label = "_nolegend_"
        for k, (_, (value, low, high)) in enumerate(scores):
            dx = 0.05 + (0.25 * k / (len(scores) - 1) if len(scores) > 1 else 0.125)
            yerr = None if low is None or high is None else [[max(0.0, value - low)], [max(0.0, high - value)]]
            ax.errorbar(
                [x + dx],
                [value],
                yerr=yerr,
                fmt="o",
                color="tab:blue",
                alpha=0.8,
                markersize=5,
                capsize=3,
                elinewidth=1,
                label=seed_label,
                zorder=2,
            )
            seed_label = "_nolegend_"
    ax.set_xticks(range(len(groups)), [g.tick for g in groups], rotation=20 if len(groups) > 4 else 0)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    if not plotted:
        ax.set_ylim(0, 1)
    ax.margins(y=0.12)
    ax.set_ylabel(f"held-out {title}")
    ax.set_title(f"Held-out {title} per optimizer")
    ax.grid(True, axis="y", alpha=0.3)
    if plotted:
        ax.legend(loc="best", fontsize="small")
    return _png(fig, canvas_class)


def _compare_cost_png(groups: Sequence[_OptimizerRuns], primary: str | None) -> bytes:
    """Held-out primary metric vs LM calls of the compile, one marker per ok run, one colour per optimizer."""
    from blpo_dspy.compare import compile_calls

    figure_class, canvas_class = _matplotlib()
    title = _metric_title(primary) if primary else "primary metric"
    fig = figure_class(figsize=(7.8, 4.8), layout="constrained")
    ax = fig.add_subplot()
    plotted = False
    for i, group in enumerate(groups):
        color, marker = f"C{i % 10}", _MARKERS[i % len(_MARKERS)]
        points = [(float(compile_calls(r, "total")), s) for r in group.ok if primary and (s := _run_score(r, primary))]
        if not points:
            ax.plot([], [], linestyle="none", marker="x", color="gray", label=f"{group.name} ({group.missing_reason})")
            continue
        plotted = True
        for calls, (_, low, high) in points:
            if low is not None and high is not None:
                ax.vlines(calls, low, high, color=color, alpha=0.35, linewidth=1.5, zorder=1)
        ax.plot(
            [calls for calls, _ in points],
            [s[0] for _, s in points],
            linestyle="none",
            marker=marker,
            markersize=8,
            color=color,
            alpha=0.85,
            label=group.name if not group.failed else f"{group.name} ({group.failed}/{len(group.runs)} failed)",
            zorder=2,
        )
    if not plotted:
        ax.set_ylim(0, 1)
    ax.margins(x=0.08, y=0.12)
    ax.set_xlabel("LM calls during the compile (verbalizer + judge + proposer)")
    ax.set_ylabel(f"held-out {title}")
    ax.set_title(f"Quality vs cost: held-out {title} and LM calls, one marker per run")
    ax.grid(True, alpha=0.3)
    if groups:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    return _png(fig, canvas_class)


def _compare_confusion_png(groups: Sequence[_OptimizerRuns]) -> bytes:
    """One confusion-matrix panel per optimizer, pooled over its ok seeds; failed optimizers get a "failed" panel."""
    figure_class, canvas_class = _matplotlib()
    ncols = max(1, min(3, len(groups)))
    nrows = max(1, math.ceil(len(groups) / ncols))
    fig = figure_class(figsize=(3.6 * ncols, 3.0 * nrows + 0.4), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(groups) :]:
        ax.set_axis_off()
    for ax, group in zip(flat, groups, strict=False):
        pooled, seeds = group.pooled_confusion
        if pooled is None:
            reason = "failed" if not group.ok else "no confusion matrix\nin result.json"
            ax.set_axis_off()
            ax.set_title(group.name)
            ax.text(0.5, 0.5, reason, transform=ax.transAxes, ha="center", va="center", color="tab:red")
            continue
        n = sum(sum(row) for row in pooled["counts"])
        _draw_confusion(ax, pooled, f"{group.name}: {seeds} seed{'s' if seeds != 1 else ''}, n={n}")
    fig.suptitle("Held-out confusion matrices, pooled over each optimizer's ok seeds")
    return _png(fig, canvas_class)


def _history_png(data: RunData) -> bytes:
    """Validation score of the incumbent (a step line) and the candidates of every inner step (points).

    The x axis counts candidates in the order they were proposed; outer steps are separated by dotted lines, where
    the selection of that outer step moves the incumbent line.
    """
    figure_class, canvas_class = _matplotlib()
    metric = data.metric_name
    metric_title = _metric_title(metric) if metric else "score"
    history, rounds = data.history, data.rounds
    x_of = {id(h): i + 1 for i, h in enumerate(history)}
    steps = sorted({r["outer_step"] for r in rounds} | {h["outer_step"] for h in history})
    block_end: dict[int, float] = {}
    last = 0.0
    for step in steps:
        xs = [x_of[id(h)] for h in history if h["outer_step"] == step]
        last = (max(xs) if xs else last + 1) + 0.5
        block_end[step] = last
    block_start = {step: (block_end[steps[i - 1]] if i else 0.5) for i, step in enumerate(steps)}

    fig = figure_class(figsize=(7.5, 5.6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    seed_score = _finite(data.diagnostics.get("seed_score_"))
    line_x: list[float] = []
    line_y: list[float] = []
    if seed_score is not None:
        line_x.append(0)
        line_y.append(seed_score)
    for r in rounds:
        score = _finite(r.get("val_score"))
        if score is not None:
            line_x.append(block_end[r["outer_step"]])
            line_y.append(score)
    if line_x:
        step_x, step_y = [*line_x, line_x[-1] + 0.5], [*line_y, line_y[-1]]
        top.plot(step_x, step_y, drawstyle="steps-post", color="tab:blue", zorder=2)
        top.plot(line_x, line_y, "o", color="tab:blue", label="incumbent", zorder=2)

    def scatter(ax: Any, key: str) -> None:
        points = [h for h in history if _finite(h.get(key)) is not None]
        groups = (
            ("candidate", [h for h in points if not h.get("accepted") and not h.get("pruned")], "o", "full"),
            ("pruned", [h for h in points if not h.get("accepted") and h.get("pruned")], "o", "none"),
            ("accepted", [h for h in points if h.get("accepted")], "*", "full"),
        )
        for label, group, marker, fill in groups:
            if group:
                ax.plot(
                    [x_of[id(h)] for h in group],
                    [float(h[key]) for h in group],
                    linestyle="none",
                    marker=marker,
                    markersize=14 if marker == "*" else 6,
                    color="tab:orange" if marker == "*" else "tab:gray",
                    fillstyle=fill,
                    label=label,
                    zorder=3,
                )

    scatter(top, "val_score")
    scatter(bottom, "inner_score")
    top.set_ylabel(f"validation {metric_title}")
    top.set_title("Optimisation history")
    bottom.set_ylabel("inner score")
    bottom.set_xlabel("candidates in proposal order, by outer step")
    ticks = ([0.0] if seed_score is not None else []) + [(block_start[s] + block_end[s]) / 2 for s in steps]
    labels = (["seed"] if seed_score is not None else []) + [f"outer {s}" for s in steps]
    bottom.set_xticks(ticks, labels)
    for ax in (top, bottom):
        for step in steps:
            ax.axvline(block_end[step], color="tab:blue", linestyle=":", linewidth=0.8, alpha=0.6)
        ax.grid(True, axis="y", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize="small")
    return _png(fig, canvas_class)


def render_plots(data: RunData) -> dict[str, bytes]:
    """Render the report's plots as PNG bytes, by file name.

    Args:
        data: The inputs.

    Returns:
        ``{file name: PNG bytes}``: one confusion matrix per evaluation and the optimisation history, for the inputs
        present; for a comparison, the primary metric per optimizer, quality vs LM calls and the pooled confusion
        matrices (from the runs' ``result.json`` files).

    Raises:
        ImportError: matplotlib is not installed (it is in the ``report`` extra).
    """
    plots: dict[str, bytes] = {}
    if data.results:
        groups = _by_optimizer(data)
        metrics = comparison_metrics(data.results)
        primary = metrics[0] if metrics else None
        plots[COMPARE_SCORES_PNG] = _compare_scores_png(groups, primary)
        plots[COMPARE_COST_PNG] = _compare_cost_png(groups, primary)
        plots[COMPARE_CONFUSION_PNG] = _compare_confusion_png(groups)
    for name, evaluation in data.evaluations.items():
        cm = evaluation.get("confusion_matrix")
        if cm is not None:
            n = evaluation.get("n")
            title = f"{_EVAL_TITLES[name]} program" + (f" (n={n})" if n is not None else "")
            plots[CONFUSION_PNG.format(name=name)] = _confusion_png(cm, title)
    if data.history or data.rounds:
        plots[HISTORY_PNG] = _history_png(data)
    return plots


# ---------------------------------------------------------------------------------------------------- layout
def _md_text(text: str) -> str:
    return text.replace("<", "&lt;").replace(">", "&gt;")


def _md_cell(text: str) -> str:
    cell = _md_text(text).replace("\\", "\\\\").replace("|", "\\|")
    return "<br>".join(line.strip() for line in cell.splitlines()) if "\n" in cell else cell


def _md_table(table: Table) -> list[str]:
    aligns = [
        ("---:" if table.numeric[i] else "---") if i < len(table.numeric) else "---" for i in range(len(table.header))
    ]
    lines = ["| " + " | ".join(_md_cell(h) for h in table.header) + " |", "|" + "|".join(aligns) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    return lines


def render_markdown(document: ReportDocument) -> str:
    """Lay a report out as Markdown (GitHub-flavoured tables; plots referenced by relative file name).

    Args:
        document: The report (see :func:`build_document`).

    Returns:
        The Markdown text.
    """
    lines = [f"# {_md_text(document.title)}", ""]
    for section in document.sections:
        lines += [f"{'#' * section.level} {_md_text(section.title)}", ""]
        for block in section.blocks:
            if isinstance(block, Paragraph):
                lines.append(_md_text(block.text))
            elif isinstance(block, KeyValues):
                lines += [f"- **{_md_text(k)}**: {_md_text(v)}" for k, v in block.items]
            elif isinstance(block, Table):
                lines += _md_table(block)
            elif isinstance(block, Plot):
                lines.append(f"![{_md_text(block.caption)}]({block.file})")
            lines.append("")
    lines += ["---", "", _md_text(document.footer), ""]
    return "\n".join(lines)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto; max-width: 72rem;
       padding: 0 1rem; color: #1f2328; line-height: 1.45; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: .3rem; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .6rem 0 1rem; font-size: .92rem; }
th, td { border: 1px solid #d0d7de; padding: .3rem .6rem; vertical-align: top; }
th { background: #f6f8fa; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.wrap td { white-space: pre-wrap; max-width: 32rem; }
dl { display: grid; grid-template-columns: max-content auto; gap: .2rem 1rem; }
dt { font-weight: 600; }
dd { margin: 0; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; border: 1px solid #d0d7de; }
figcaption { color: #57606a; font-size: .9rem; }
footer { margin-top: 3rem; color: #57606a; font-size: .85rem; border-top: 1px solid #d0d7de; padding-top: .5rem; }
""".strip()


def _html_table(table: Table) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in table.header)
    body = []
    for row in table.rows:
        cells = []
        for i, cell in enumerate(row):
            numeric = i < len(table.numeric) and table.numeric[i]
            cells.append(f'<td class="num">{esc(cell)}</td>' if numeric else f"<td>{esc(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    css = ' class="wrap"' if table.wrap else ""
    return f"<table{css}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(document: ReportDocument, images: Mapping[str, bytes]) -> str:
    """Lay a report out as one self-contained HTML page: inline CSS, plots as base64 PNG data URIs, text escaped.

    Args:
        document: The report (see :func:`build_document`).
        images: PNG bytes by file name, for every plot of the document.

    Returns:
        The HTML text.

    Raises:
        KeyError: A plot of the document is missing from ``images``.
    """
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(document.title)}</title>",
        f"<style>\n{_CSS}\n</style>",
        "</head>",
        "<body>",
        f"<h1>{esc(document.title)}</h1>",
    ]
    for section in document.sections:
        parts.append(f"<section><h{section.level}>{esc(section.title)}</h{section.level}>")
        for block in section.blocks:
            if isinstance(block, Paragraph):
                parts.append(f"<p>{esc(block.text)}</p>")
            elif isinstance(block, KeyValues):
                items = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in block.items)
                parts.append(f"<dl>{items}</dl>")
            elif isinstance(block, Table):
                parts.append(_html_table(block))
            elif isinstance(block, Plot):
                data = base64.b64encode(images[block.file]).decode("ascii")
                parts.append(
                    f'<figure><img alt="{esc(block.caption)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{esc(block.caption)}</figcaption></figure>"
                )
        parts.append("</section>")
    parts += [f"<footer>{esc(document.footer)}</footer>", "</body>", "</html>", ""]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------- writing
def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_report(run_dir: str | Path, *, title: str | None = None, plots: bool = True, digits: int = 3) -> ReportPaths:
    """Write ``report.md``, a self-contained ``report.html`` and the PNG plots into a run directory.

    The report shows, for the inputs present: a summary of the compile; the seed-vs-compiled table of every score
    with its confidence interval and the difference; the parse-failure rate and failed calls; per-class precision,
    recall and F1 and the confusion matrices; the optimisation history (plot and tables); the final instructions
    beside the seed ones; LM usage per role. For a comparison directory (written by
    :func:`blpo_dspy.compare.run_compare`) it shows the table of mean ± sample std over seeds per optimizer, the
    failed runs, every run's score with its CI, and three plots computed from ``runs/*/seed-*/result.json`` alone:
    ``report_compare_scores.png`` (the primary metric per optimizer: mean ± std, each seed with its bootstrap CI,
    optimizers without a score marked "failed"), ``report_compare_cost.png`` (primary metric vs LM calls of the
    compile, one marker per run) and ``report_compare_confusion.png`` (confusion matrices pooled over each
    optimizer's ok seeds). Any other ``compare.json`` is shown as tables. Missing inputs leave their sections out
    (or say what is missing). The output is deterministic and holds no absolute path.

    Args:
        run_dir: A run directory (``state.json``, ``program.json``, ``evaluations/*.json``) or a comparison directory
            (``compare.json``, ``runs/<optimizer>/seed-<s>/result.json``).
        title: The page title (default from the task name).
        plots: Render PNG plots (needs matplotlib); ``False`` writes the tables only.
        digits: Decimal places of scores.

    Returns:
        The paths written.

    Raises:
        FileNotFoundError: No run directory, or nothing to report in it.
        ReportError: A malformed input file (the message names the file and the field).
        ImportError: ``plots=True`` and matplotlib is not installed.
    """
    run_dir = Path(run_dir)
    data = load_run(run_dir)
    images = render_plots(data) if plots else {}
    document = build_document(data, title=title, images=images, digits=digits)
    md_path, html_path = run_dir / REPORT_MD, run_dir / REPORT_HTML
    _atomic_write(md_path, render_markdown(document).encode("utf-8"))
    _atomic_write(html_path, render_html(document, images).encode("utf-8"))
    written = []
    for name in document.images:
        path = run_dir / name
        _atomic_write(path, images[name])
        written.append(path)
    stale = {HISTORY_PNG, *COMPARE_PNGS, *(CONFUSION_PNG.format(name=n) for n in EVALUATION_NAMES)}
    stale -= set(document.images)
    for name in sorted(stale):
        if (run_dir / name).is_file():
            (run_dir / name).unlink()
    logger.info("report written to %s/%s and %s (%d plots)", run_dir.name, REPORT_MD, REPORT_HTML, len(written))
    return ReportPaths(md=md_path, html=html_path, images=tuple(written))
