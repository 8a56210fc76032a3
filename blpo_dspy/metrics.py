"""Agreement metrics between a judge's labels and human labels, on whole splits.

Every metric takes the :class:`~blpo_dspy.task.Task` (label order, kind, positive label) and two equally long
sequences ``y_true`` (human labels) and ``y_pred`` (the judge's labels).

**Failed predictions.** An item of ``y_pred`` may be ``None``: the LM answer could not be parsed, or the call
failed. Such a prediction always counts as wrong. Metrics that need a class give it an extra ``unparsed`` class
that no human label ever has, so it can never be correct:

- accuracy, balanced accuracy, pairwise accuracy: an unparsed prediction is a miss;
- macro-F1 / F1: it is a false negative for the gold class and a false positive for no class;
- Cohen's kappa and MCC: it is one more predicted class (a column of the confusion matrix), never on the diagonal;
  weighted kappa gives it the largest disagreement weight (it is as bad as the farthest label);
- Spearman and Kendall are computed on the parsed pairs only; read them together with ``coverage`` (the fraction
  of parsed predictions), which :func:`metrics_for_task` always includes.

Predicted values that are not canonical labels are passed through :meth:`Task.parse_label` (so ``"Yes."`` counts
as ``"yes"``); values it cannot parse count as unparsed. Human labels are validated strictly with
:meth:`Task.validate_label`.

**Implementation.** Every metric here is a closed-form function of the confusion matrix (gold labels in task order
× predicted labels + ``unparsed``); the formulas are the ones scikit-learn (``accuracy_score``,
``balanced_accuracy_score``, ``f1_score``, ``cohen_kappa_score``, ``matthews_corrcoef``) and SciPy (``spearmanr``,
``kendalltau`` tau-b) use, and the tests check agreement with those functions. Computing from the confusion
matrix lets the bootstrap score a thousand resamples with a handful of vectorised NumPy operations instead of
~2 ms of input validation per scikit-learn call per resample per metric.

**Degenerate cases.** A metric that is undefined on a split (kappa when chance disagreement is zero, F1 of a
class that is neither in the gold nor in the predictions, a rank correlation of a constant sequence or of fewer
than two parsed pairs) is ``nan``. MCC follows scikit-learn and is ``0.0`` when undefined. The bootstrap drops
resamples on which the metric is undefined.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import dspy
import numpy as np

from blpo_dspy.task import LABEL_FIELD, Label, LabelError, Task

logger = logging.getLogger(__name__)

UNPARSED = "unparsed"
"""Name of the extra confusion-matrix column holding failed / unparsable predictions."""

ZERO_ONE = "zero_one"
"""Name of the per-example 0-1 agreement, accepted by :func:`as_dspy_metric`."""

KappaWeights = Literal["linear", "quadratic"] | None
ConfusionFn = Callable[[Task, np.ndarray], np.ndarray]
_RESAMPLE_CHUNK_CELLS = 2_000_000  # resampled indices held in memory at once (chunk rows x n)


# ---------------------------------------------------------------------------------------------------- encoding
def encode_labels(task: Task, y_true: Sequence[Any], y_pred: Sequence[Any | None]) -> tuple[np.ndarray, np.ndarray]:
    """Map labels to indices in task order; failed predictions get the index ``len(task.labels)``.

    Args:
        task: The judging task.
        y_true: Human labels (canonical labels or anything :meth:`Task.validate_label` accepts).
        y_pred: Predicted labels; ``None`` or unparsable values mean a failed prediction.

    Returns:
        Two ``intp`` arrays ``(gold, pred)``; gold values are in ``[0, K)``, predictions in ``[0, K]`` where
        ``K = len(task.labels)`` and ``K`` stands for ``unparsed``.

    Raises:
        ValueError: The sequences differ in length.
        LabelError: A human label is outside the label space; the message gives its position.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true and y_pred differ in length: {len(y_true)} != {len(y_pred)}")
    index = {label: i for i, label in enumerate(task.labels)}
    unparsed = len(task.labels)
    gold = _exact_lookup(task, y_true)
    for i in [i for i, code in enumerate(gold) if code is None]:
        value = y_true[i]
        found = _lookup(index, value)
        if found is None:
            try:
                found = index[task.validate_label(value)]
            except LabelError as exc:
                raise LabelError(f"y_true[{i}]: {exc}") from exc
        gold[i] = found
    pred = _exact_lookup(task, y_pred)
    for i in [i for i, code in enumerate(pred) if code is None]:
        value = y_pred[i]
        found = _lookup(index, value)
        if found is None and value is not None:
            parsed = task.parse_label(value)
            found = None if parsed is None else index[parsed]
        pred[i] = unparsed if found is None else found
    return np.array(gold, dtype=np.intp), np.array(pred, dtype=np.intp)


def _exact_lookup(task: Task, values: Sequence[Any]) -> list[int | None]:
    """The index of every value that is one of the task's labels with its exact type (``None`` for the others, which
    :func:`encode_labels` looks up one by one), in one pass without a Python call per value.

    When every value is of a label's exact type (or ``None``), a plain lookup by value is exact: no ``bool``, float
    or ``str`` subclass equal to a label is among them. Otherwise each value is looked up with its type.
    """
    exact = {type(label) for label in task.labels} & {str, int}
    table = {(type(label), label): i for i, label in enumerate(task.labels) if type(label) in exact}
    try:
        if set(map(type, values)) <= {*exact, type(None)}:
            return list(map({label: i for (_, label), i in table.items()}.get, values))
        get = table.get
        return [get((type(value), value)) for value in values]
    except TypeError:  # an unhashable value: every value one by one
        return [None] * len(values)


def _lookup(index: Mapping[Any, int], value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return index.get(value)
    except TypeError:  # unhashable
        return None


def _confusion_counts(gold: np.ndarray, pred: np.ndarray, n_labels: int) -> np.ndarray:
    """Confusion matrix of shape ``(K, K + 1)`` (float) from encoded labels."""
    codes = gold * (n_labels + 1) + pred
    counts = np.bincount(codes, minlength=n_labels * (n_labels + 1))
    return counts.reshape(n_labels, n_labels + 1).astype(float)


def _batched_confusion(codes: np.ndarray, rows: np.ndarray, n_labels: int) -> np.ndarray:
    """Confusion matrices ``(B, K, K + 1)`` of the resamples ``codes[rows[b]]``."""
    cells = n_labels * (n_labels + 1)
    offsets = (np.arange(rows.shape[0]) * cells)[:, None]
    counts = np.bincount((codes[rows] + offsets).ravel(), minlength=rows.shape[0] * cells)
    return counts.reshape(rows.shape[0], n_labels, n_labels + 1).astype(float)


# ---------------------------------------------------------------------------------------------------- formulas
# Each formula takes a confusion matrix of shape (..., K, K + 1) (last column = unparsed) and returns shape (...).


def _margins(c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    gold = c.sum(axis=-1)  # (..., K)
    pred = c.sum(axis=-2)  # (..., K + 1)
    return gold, pred, gold.sum(axis=-1)


def _diag(c: np.ndarray) -> np.ndarray:
    k = c.shape[-2]
    return np.diagonal(c[..., :, :k], axis1=-2, axis2=-1)  # (..., K)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _accuracy(task: Task, c: np.ndarray) -> np.ndarray:
    _, _, n = _margins(c)
    return _safe_div(_diag(c).sum(axis=-1), n)


def _coverage(task: Task, c: np.ndarray) -> np.ndarray:
    _, _, n = _margins(c)
    return _safe_div(n - c[..., :, -1].sum(axis=-1), n)


def _balanced_accuracy(task: Task, c: np.ndarray) -> np.ndarray:
    gold, _, _ = _margins(c)
    present = gold > 0
    recall = np.where(present, _safe_div(_diag(c), gold), 0.0)
    return _safe_div(recall.sum(axis=-1), present.sum(axis=-1).astype(float))


def _per_class_f1(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gold, pred, _ = _margins(c)
    k = c.shape[-2]
    support = gold + pred[..., :k]  # 2TP + FP + FN
    return _safe_div(2.0 * _diag(c), support), support > 0


def _macro_f1(task: Task, c: np.ndarray) -> np.ndarray:
    f1, present = _per_class_f1(c)
    return _safe_div(np.where(present, f1, 0.0).sum(axis=-1), present.sum(axis=-1).astype(float))


def _binary_f1(task: Task, c: np.ndarray) -> np.ndarray:
    f1, _ = _per_class_f1(c)
    return f1[..., task.labels.index(task.positive_label)]


def kappa_weights(task: Task, weights: KappaWeights = None) -> np.ndarray:
    """Disagreement weights of shape ``(K, K + 1)`` used by Cohen's kappa.

    Unweighted: 0 on the diagonal, 1 elsewhere. Linear / quadratic (ordinal tasks only): ``|i - j| / (K - 1)`` and
    its square. The ``unparsed`` column always has weight 1, the largest disagreement.

    Raises:
        ValueError: Weights requested for a task that is not ordinal, or unknown weights.
    """
    return _kappa_weights(task, weights).copy()


def _kappa_weights(task: Task, weights: KappaWeights) -> np.ndarray:
    """:func:`kappa_weights`, read-only and built once per label count and weighting."""
    if weights in ("linear", "quadratic"):
        if task.kind != "ordinal":
            raise ValueError(f"{weights} kappa weights need an ordinal task; task '{task.name}' is {task.kind}")
    elif weights is not None:
        raise ValueError(f"kappa weights must be None, 'linear' or 'quadratic', got {weights!r}")
    return _weights_table(len(task.labels), weights)


@functools.lru_cache(maxsize=64)
def _weights_table(k: int, weights: KappaWeights) -> np.ndarray:
    i, j = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    if weights is None:
        core = (i != j).astype(float)
    else:
        core = np.abs(i - j) / (k - 1)
        if weights == "quadratic":
            core = core**2
    table = np.concatenate([core, np.ones((k, 1))], axis=1)
    table.setflags(write=False)
    return table


def _kappa(task: Task, c: np.ndarray, weights: KappaWeights) -> np.ndarray:
    w = _kappa_weights(task, weights)
    gold, pred, n = _margins(c)
    observed = (w * c).sum(axis=(-2, -1)) * n
    expected = (w * (gold[..., :, None] * pred[..., None, :])).sum(axis=(-2, -1))
    return 1.0 - _safe_div(observed, expected)


def _mcc(task: Task, c: np.ndarray) -> np.ndarray:
    gold, pred, n = _margins(c)
    correct = _diag(c).sum(axis=-1)
    k = c.shape[-2]
    cov_tp = correct * n - (gold * pred[..., :k]).sum(axis=-1)  # gold has no unparsed class
    cov_pp = n**2 - (pred**2).sum(axis=-1)
    cov_tt = n**2 - (gold**2).sum(axis=-1)
    value = _safe_div(cov_tp, np.sqrt(cov_tt * cov_pp))
    return np.where(np.isnan(value), 0.0, value)


def _midranks(counts: np.ndarray) -> np.ndarray:
    """Average 1-based ranks of the tied groups of an ordered count vector."""
    return np.cumsum(counts, axis=-1) - counts + (counts + 1.0) / 2.0


def _parsed(c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    p = c[..., :, :-1]  # (..., K, K): parsed pairs only
    rows, cols = p.sum(axis=-1), p.sum(axis=-2)
    return p, rows, cols, rows.sum(axis=-1)


def _spearman(task: Task, c: np.ndarray) -> np.ndarray:
    p, rows, cols, m = _parsed(c)
    mean = (m + 1.0) / 2.0
    x = _midranks(rows) - mean[..., None]
    y = _midranks(cols) - mean[..., None]
    cov = np.einsum("...ij,...i,...j->...", p, x, y)
    var_x = (rows * x**2).sum(axis=-1)
    var_y = (cols * y**2).sum(axis=-1)
    return np.clip(_safe_div(cov, np.sqrt(var_x * var_y)), -1.0, 1.0)


def _suffix(a: np.ndarray, axis: int) -> np.ndarray:
    return np.flip(np.cumsum(np.flip(a, axis=axis), axis=axis), axis=axis)


def _kendall(task: Task, c: np.ndarray) -> np.ndarray:
    p, rows, cols, m = _parsed(c)
    k = p.shape[-1]
    pad = np.zeros((*p.shape[:-2], k + 1, k + 1))
    # later[i, j] = pairs with gold > i and pred > j; earlier[i, j] = gold > i and pred < j.
    pad[..., :k, :k] = _suffix(_suffix(p, -2), -1)
    later = pad[..., 1:, 1:].copy()
    pad[:] = 0.0
    pad[..., :k, 1:] = np.cumsum(_suffix(p, -2), axis=-1)
    earlier = pad[..., 1:, :k]
    concordant = (p * later).sum(axis=(-2, -1))
    discordant = (p * earlier).sum(axis=(-2, -1))
    n0 = m * (m - 1.0) / 2.0
    ties_gold = (rows * (rows - 1.0) / 2.0).sum(axis=-1)
    ties_pred = (cols * (cols - 1.0) / 2.0).sum(axis=-1)
    return np.clip(_safe_div(concordant - discordant, np.sqrt((n0 - ties_gold) * (n0 - ties_pred))), -1.0, 1.0)


# ---------------------------------------------------------------------------------------------------- registry
ALL_KINDS = frozenset({"binary", "ordinal", "categorical", "pairwise"})


@dataclass(frozen=True)
class MetricSpec:
    """A corpus-level metric in the registry.

    Attributes:
        name: Registry key, e.g. ``"macro_f1"``.
        title: Human-readable name for tables.
        description: One sentence on what it measures.
        kinds: Task kinds it applies to.
        from_confusion: The formula, on confusion matrices of shape ``(..., K, K + 1)`` (last column:
            ``unparsed``), returning shape ``(...)``.
    """

    name: str
    title: str
    description: str
    kinds: frozenset[str]
    from_confusion: ConfusionFn

    def applies_to(self, task: Task) -> bool:
        """Whether the metric is defined for this task's kind."""
        return task.kind in self.kinds and (self.name != "binary_f1" or task.positive_label is not None)

    def check(self, task: Task) -> None:
        """Raise ``ValueError`` if the metric does not apply to the task."""
        if not self.applies_to(task):
            raise ValueError(
                f"metric '{self.name}' applies to {', '.join(sorted(self.kinds))} tasks; "
                f"task '{task.name}' is {task.kind}"
            )

    def __call__(self, task: Task, y_true: Sequence[Any], y_pred: Sequence[Any | None]) -> float:
        """Compute the metric on a split.

        Args:
            task: The judging task.
            y_true: Human labels.
            y_pred: Predicted labels, ``None`` for failed predictions.

        Returns:
            The metric value (``nan`` when undefined on this split).
        """
        self.check(task)
        gold, pred = encode_labels(task, y_true, y_pred)
        if gold.size == 0:
            return math.nan
        return float(self.from_confusion(task, _confusion_counts(gold, pred, len(task.labels))))


def _spec(name: str, title: str, description: str, kinds: frozenset[str] | set[str], fn: ConfusionFn) -> MetricSpec:
    return MetricSpec(name=name, title=title, description=description, kinds=frozenset(kinds), from_confusion=fn)


METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        _spec(
            "accuracy",
            "Accuracy",
            "Fraction of examples whose predicted label equals the human label.",
            ALL_KINDS,
            _accuracy,
        ),
        _spec(
            "balanced_accuracy",
            "Balanced accuracy",
            "Mean recall over the gold classes present in the split.",
            ALL_KINDS,
            _balanced_accuracy,
        ),
        _spec(
            "macro_f1",
            "Macro-F1",
            "Unweighted mean of per-class F1 over the labels present in the gold or predicted labels.",
            ALL_KINDS,
            _macro_f1,
        ),
        _spec(
            "binary_f1",
            "F1 (positive label)",
            "F1 of the task's positive label.",
            {"binary"},
            _binary_f1,
        ),
        _spec(
            "cohen_kappa",
            "Cohen's κ",
            "Chance-corrected agreement, unweighted.",
            ALL_KINDS,
            lambda task, c: _kappa(task, c, None),
        ),
        _spec(
            "cohen_kappa_linear",
            "Cohen's κ (linear)",
            "Chance-corrected agreement with linear distance weights.",
            {"ordinal"},
            lambda task, c: _kappa(task, c, "linear"),
        ),
        _spec(
            "cohen_kappa_quadratic",
            "Cohen's κ (quadratic)",
            "Chance-corrected agreement with quadratic distance weights.",
            {"ordinal"},
            lambda task, c: _kappa(task, c, "quadratic"),
        ),
        _spec("mcc", "MCC", "Matthews correlation coefficient (multiclass form).", ALL_KINDS, _mcc),
        _spec(
            "spearman",
            "Spearman ρ",
            "Spearman rank correlation on the parsed predictions (see coverage).",
            {"ordinal"},
            _spearman,
        ),
        _spec(
            "kendall",
            "Kendall τ-b",
            "Kendall tau-b on the parsed predictions (see coverage).",
            {"ordinal"},
            _kendall,
        ),
        _spec(
            "pairwise_accuracy",
            "Pairwise accuracy",
            "Fraction of pairs where the judge prefers the same image as the human (accuracy of A/B).",
            {"pairwise"},
            _accuracy,
        ),
        _spec("coverage", "Coverage", "Fraction of predictions that parsed to a label.", ALL_KINDS, _coverage),
    )
}
"""All corpus metrics by name."""

_DEFAULTS: dict[str, tuple[str, ...]] = {
    "binary": ("macro_f1", "binary_f1", "accuracy", "balanced_accuracy", "cohen_kappa", "mcc", "coverage"),
    "categorical": ("macro_f1", "accuracy", "balanced_accuracy", "cohen_kappa", "mcc", "coverage"),
    "ordinal": (
        "cohen_kappa_quadratic",
        "cohen_kappa_linear",
        "cohen_kappa",
        "spearman",
        "kendall",
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "coverage",
    ),
    "pairwise": ("accuracy", "balanced_accuracy", "cohen_kappa", "mcc", "coverage"),
}


def corpus_value(task: Task, name: str, examples: Sequence[Any], labels: Sequence[Any | None]) -> float:
    """One corpus metric (no interval) of predicted ``labels`` against the examples' human labels.

    Args:
        task: The judging task.
        name: A metric name from :data:`METRICS`, or ``"primary"`` for the task's primary metric.
        examples: Examples carrying the gold ``label``.
        labels: Predicted labels (``None`` for a failed answer), aligned with ``examples``.
    """
    name = primary_metric(task) if name == "primary" else name
    gold = [example.label for example in examples]
    return float(corpus_scores(task, gold, list(labels), metrics=[name], ci=False)[name].value)


def primary_metric(task: Task) -> str:
    """The metric that decides model selection and leads reports for a task.

    - binary / categorical: ``macro_f1`` — robust to class imbalance (a judge answering "yes" to everything on a
      70 % "yes" split gets 0.41, not 0.70), and it is what the BLPO paper reports.
    - ordinal: ``cohen_kappa_quadratic`` — the usual agreement statistic for ordinal human ratings: chance-corrected,
      it penalises a 1-vs-5 disagreement far more than 4-vs-5, and unlike Spearman it does not ignore parse
      failures or reward a judge that is consistently shifted by a constant.
    - pairwise: ``accuracy`` — the fraction of pairs where the judge prefers the same image as the human.
    """
    return _DEFAULTS[task.kind][0]


def metrics_for_task(task: Task) -> list[str]:
    """Default metric names for a task, the primary metric first; always includes ``coverage``."""
    return [name for name in _DEFAULTS[task.kind] if METRICS[name].applies_to(task)]


def resolve_metric_names(task: Task, metrics: str | Sequence[str] | None) -> list[str]:
    """Validate metric names for a task; ``None`` gives :func:`metrics_for_task`.

    Raises:
        ValueError: Unknown name, a name that does not apply to the task, or an empty list.
    """
    if metrics is None:
        return metrics_for_task(task)
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    if not names:
        raise ValueError("metrics must name at least one metric")
    for name in names:
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; known metrics: {', '.join(METRICS)}")
        METRICS[name].check(task)
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------------- public functions
def accuracy(task: Task, y_true: Sequence[Any], y_pred: Sequence[Any | None]) -> float:
    """Fraction of examples whose predicted label equals the human label (``None`` counts as wrong)."""
    return METRICS["accuracy"](task, y_true, y_pred)


def balanced_accuracy(task: Task, y_true: Sequence[Any], y_pred: Sequence[Any | None]) -> float:
    """Mean per-class recall over the gold classes present (``None`` counts as a miss)."""
    return METRICS["balanced_accuracy"](task, y_true, y_pred)


def macro_f1(task: Task, y_true: Sequence[Any], y_pred: Sequence[Any | None]) -> float:
    """Unweighted mean of per-class F1 over the task labels that occur in ``y_true`` or ``y_pred``.

    A ``None`` prediction is a false negative for its gold class; the ``unparsed`` class itself is not averaged.
    Labels absent from both sequences are skipped (their F1 is undefined), as scikit-learn does when passed the
    labels present.
    """
    return METRICS["macro_f1"](task, y_true, y_pred)


def binary_f1(task: Task, y_true: Sequence[Any], y_pred: Sequence[Any | None]) -> float:
    """F1 of the positive label of a binary task (``nan`` if it is neither in ``y_true`` nor in ``y_pred``).

    A ``None`` prediction is a false negative when the gold label is positive and is harmless otherwise.
    """
    return METRICS["binary_f1"](task, y_true, y_pred)


def cohen_kappa(task: Task, y_true: Sequence[Any], y_pred: Sequence[Any | None], weights: KappaWeights = None) -> float:
    """Cohen's kappa, unweighted or (ordinal tasks) with linear / quadratic weights.

    ``kappa = 1 - sum(W * O) / sum(W * E)`` with ``O`` the confusion matrix, ``E`` the outer product of its
    margins over ``n`` and ``W`` the :func:`kappa_weights`. ``None`` predictions form the ``unparsed`` column with
    the largest weight. ``nan`` when the expected disagreement is zero.
    """
    name = {None: "cohen_kappa", "linear": "cohen_kappa_linear", "quadratic": "cohen_kappa_quadratic"}.get(weights)
    if name is None:
        raise ValueError(f"kappa weights must be None, 'linear' or 'quadratic', got {weights!r}")
    return METRICS[name](task, y_true, y_pred)


def mcc(task: Task, y_true: Sequence[Any], y_pred: Sequence[Any | None]) -> float:
    """Matthews correlation coefficient (Gorodkin's multiclass form; ``None`` is one more predicted class).

    ``0.0`` when undefined (a constant gold or predicted sequence), as in scikit-learn.
    """
    return METRICS["mcc"](task, y_true, y_pred)


def spearman(task: Task, y_true: Sequence[Any], y_pred: Sequence[Any | None]) -> float:
    """Spearman's rho (ties get average ranks) on the parsed pairs of an ordinal task; pair it with :func:`coverage`."""
    return METRICS["spearman"](task, y_true, y_pred)


def kendall(task: Task, y_true: Sequence[Any], y_pred: Sequence[Any | None]) -> float:
    """Kendall's tau-b on the parsed pairs of an ordinal task; pair it with :func:`coverage`."""
    return METRICS["kendall"](task, y_true, y_pred)


def pairwise_accuracy(task: Task, y_true: Sequence[Any], y_pred: Sequence[Any | None]) -> float:
    """Accuracy of the A/B choice of a pairwise task (``None`` counts as wrong)."""
    return METRICS["pairwise_accuracy"](task, y_true, y_pred)


def coverage(task: Task, y_true: Sequence[Any], y_pred: Sequence[Any | None]) -> float:
    """Fraction of predictions that parse to a label of the task."""
    return METRICS["coverage"](task, y_true, y_pred)


def zero_one_loss(task: Task, y_true: Sequence[Any], y_pred: Sequence[Any | None]) -> np.ndarray:
    """Per-example 0-1 loss: ``1.0`` where the prediction is wrong or ``None``, ``0.0`` where it is right."""
    gold, pred = encode_labels(task, y_true, y_pred)
    return (gold != pred).astype(float)


@dataclass(frozen=True)
class ConfusionMatrix:
    """Counts of (human label, predicted label) pairs.

    Attributes:
        labels: Row labels: the task's labels in task order.
        columns: Column labels: the task's labels followed by ``"unparsed"``.
        counts: Integer array of shape ``(len(labels), len(columns))``; ``counts[i, j]`` is the number of examples
            with human label ``labels[i]`` predicted as ``columns[j]``.
    """

    labels: tuple[Label, ...]
    columns: tuple[Label, ...]
    counts: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {"labels": list(self.labels), "columns": list(self.columns), "counts": self.counts.tolist()}


def confusion_matrix(task: Task, y_true: Sequence[Any], y_pred: Sequence[Any | None]) -> ConfusionMatrix:
    """Confusion matrix with rows in task label order and an extra ``"unparsed"`` column for ``None``."""
    gold, pred = encode_labels(task, y_true, y_pred)
    return _confusion(task, gold, pred)


def _confusion(task: Task, gold: np.ndarray, pred: np.ndarray) -> ConfusionMatrix:
    counts = _confusion_counts(gold, pred, len(task.labels)).astype(np.int64)
    return ConfusionMatrix(labels=tuple(task.labels), columns=(*task.labels, UNPARSED), counts=counts)


# ---------------------------------------------------------------------------------------------------- bootstrap
def _check_bootstrap_args(n_resamples: int, confidence: float) -> None:
    if not isinstance(n_resamples, int) or isinstance(n_resamples, bool) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence!r}")


def _resample_rows(n: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Bootstrap index rows ``(chunk, n)``; the concatenation does not depend on the chunk size."""
    rng = np.random.default_rng(seed)
    chunk = max(1, _RESAMPLE_CHUNK_CELLS // max(n, 1))
    done = 0
    while done < n_resamples:
        size = min(chunk, n_resamples - done)
        yield rng.integers(0, n, size=(size, n))
        done += size


def _percentile_interval(values: np.ndarray, confidence: float, what: str) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    dropped = values.size - finite.size
    if dropped:
        logger.debug("bootstrap of %s: %d of %d resamples undefined, dropped", what, dropped, values.size)
    if finite.size == 0:
        return math.nan, math.nan
    alpha = 1.0 - confidence
    low, high = np.quantile(finite, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def _as_indexable(values: Sequence[Any]) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values
    array = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        array[i] = value
    return array


def bootstrap_ci(
    metric_fn: Callable[[Any, Any], float],
    y_true: Sequence[Any],
    y_pred: Sequence[Any],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of a corpus metric.

    Examples are resampled with replacement (pairs ``(y_true[i], y_pred[i])`` stay together) using
    ``numpy.random.default_rng(seed)``. Resamples on which the metric is not finite (degenerate resamples, e.g.
    kappa on a resample with a single gold class) are dropped; if none is finite the interval is ``(nan, nan)``.

    Args:
        metric_fn: ``metric_fn(y_true_resample, y_pred_resample) -> float``; it receives NumPy arrays (object
            arrays unless the inputs were NumPy arrays). For the metrics here use e.g.
            ``functools.partial(macro_f1, task)``.
        y_true: Human labels.
        y_pred: Predictions (may contain ``None``).
        n_resamples: Number of bootstrap resamples.
        confidence: Coverage of the interval, e.g. ``0.95``.
        seed: Seed of the resampling generator; equal seeds give equal intervals.

    Returns:
        ``(low, high)``; ``(nan, nan)`` for empty inputs.

    Raises:
        ValueError: Mismatched lengths or invalid ``n_resamples`` / ``confidence``.
    """
    _check_bootstrap_args(n_resamples, confidence)
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true and y_pred differ in length: {len(y_true)} != {len(y_pred)}")
    n = len(y_true)
    if n == 0:
        return math.nan, math.nan
    true_arr, pred_arr = _as_indexable(y_true), _as_indexable(y_pred)
    values = np.array(
        [
            float(metric_fn(true_arr[row], pred_arr[row]))
            for rows in _resample_rows(n, n_resamples, seed)
            for row in rows
        ]
    )
    return _percentile_interval(values, confidence, getattr(metric_fn, "__name__", "metric"))


# ---------------------------------------------------------------------------------------------------- corpus scores
@dataclass(frozen=True)
class Score:
    """A metric value with an optional confidence interval.

    Attributes:
        value: Point estimate on the whole split (``nan`` when undefined).
        low: Lower end of the confidence interval, or ``None`` when no interval was computed.
        high: Upper end of the confidence interval, or ``None``.
    """

    value: float
    low: float | None = None
    high: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        """JSON-serialisable form; ``nan`` becomes ``None``."""
        return {
            "value": _finite_or_none(self.value),
            "low": _finite_or_none(self.low),
            "high": _finite_or_none(self.high),
        }

    def format(self, digits: int = 3) -> str:
        """``"0.812 [0.750, 0.860]"``; ``"n/a"`` for undefined values."""
        value = _fmt(self.value, digits)
        if self.low is None or self.high is None:
            return value
        return f"{value} [{_fmt(self.low, digits)}, {_fmt(self.high, digits)}]"


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def corpus_scores(
    task: Task,
    y_true: Sequence[Any],
    y_pred: Sequence[Any | None],
    *,
    metrics: str | Sequence[str] | None = None,
    ci: bool = True,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Score]:
    """Score a split on several metrics, with percentile-bootstrap intervals.

    All metrics share the same resamples (same ``seed``), so their intervals are paired. The interval of a metric
    equals ``bootstrap_ci(partial(metric, task), y_true, y_pred, n_resamples, confidence, seed)``.

    Args:
        task: The judging task.
        y_true: Human labels.
        y_pred: Predicted labels, ``None`` for failed predictions.
        metrics: A metric name, a list of names, or ``None`` for :func:`metrics_for_task`.
        ci: Whether to compute confidence intervals.
        n_resamples: Bootstrap resamples.
        seed: Bootstrap seed.
        confidence: Interval coverage.

    Returns:
        ``{name: Score}`` in the order of ``metrics``.

    Raises:
        ValueError: Unknown or inapplicable metric, empty input, mismatched lengths, bad bootstrap arguments.
        LabelError: A human label is outside the label space.
    """
    names = resolve_metric_names(task, metrics)
    _check_bootstrap_args(n_resamples, confidence)
    gold, pred = encode_labels(task, y_true, y_pred)
    return _scores(task, gold, pred, names, ci=ci, n_resamples=n_resamples, seed=seed, confidence=confidence)


def scores_and_confusion(
    task: Task,
    y_true: Sequence[Any],
    y_pred: Sequence[Any | None],
    *,
    metrics: str | Sequence[str] | None = None,
    ci: bool = True,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[dict[str, Score], ConfusionMatrix]:
    """:func:`corpus_scores` and :func:`confusion_matrix` of a split, with its labels encoded once.

    Args and Raises: as :func:`corpus_scores`.

    Returns:
        ``(scores, confusion)``, equal to ``corpus_scores(task, y_true, y_pred, ...)`` and
        ``confusion_matrix(task, y_true, y_pred)``.
    """
    names = resolve_metric_names(task, metrics)
    _check_bootstrap_args(n_resamples, confidence)
    gold, pred = encode_labels(task, y_true, y_pred)
    scores = _scores(task, gold, pred, names, ci=ci, n_resamples=n_resamples, seed=seed, confidence=confidence)
    return scores, _confusion(task, gold, pred)


def _scores(
    task: Task,
    gold: np.ndarray,
    pred: np.ndarray,
    names: list[str],
    *,
    ci: bool,
    n_resamples: int,
    seed: int,
    confidence: float,
) -> dict[str, Score]:
    """:func:`corpus_scores` on encoded labels and checked arguments."""
    if gold.size == 0:
        raise ValueError("cannot score an empty split")
    k = len(task.labels)
    whole = _confusion_counts(gold, pred, k)
    values = {name: float(METRICS[name].from_confusion(task, whole)) for name in names}
    if not ci:
        return {name: Score(values[name]) for name in names}
    codes = gold * (k + 1) + pred
    samples: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for rows in _resample_rows(gold.size, n_resamples, seed):
        batch = _batched_confusion(codes, rows, k)
        for name in names:
            samples[name].append(np.asarray(METRICS[name].from_confusion(task, batch), dtype=float))
    scores: dict[str, Score] = {}
    for name in names:
        low, high = _percentile_interval(np.concatenate(samples[name]), confidence, name)
        scores[name] = Score(values[name], low, high)
    return scores


# ---------------------------------------------------------------------------------------------------- DSPy adapter
def _field(obj: Any, name: str) -> tuple[bool, Any]:
    """``(present, value)`` of a field of a dspy.Example / Prediction / mapping / object."""
    if obj is None:
        return False, None
    if isinstance(obj, Mapping):
        return (name in obj), obj.get(name)
    try:
        return True, getattr(obj, name)
    except AttributeError:
        return False, None


def _gold_label(task: Task, example: Any) -> Label:
    present, value = _field(example, LABEL_FIELD)
    ident = _field(example, "id")[1]
    where = f"example {ident!r}" if ident is not None else "example"
    if not present:
        raise LabelError(f"{where}: field 'label': missing (the gold label is read from example.label)")
    try:
        return task.validate_label(value)
    except LabelError as exc:
        raise LabelError(f"{where}: field 'label': {exc}") from exc


def _feedback(task: Task, gold: Label, pred: Any, predicted: Label | None) -> str:
    _, error = _field(pred, "error")
    if pred is None or (predicted is None and error):
        reason = f" ({error})" if error else ""
        return f"Wrong. The judge call failed{reason}; the human label is {gold!r}."
    if predicted is None:
        _, raw = _field(pred, "raw_label")
        if raw is None:
            raw = _field(pred, LABEL_FIELD)[1]
        return (
            f"Wrong. The judge's answer {raw!r} could not be parsed as a label ({task.label_space_text}); "
            f"the human label is {gold!r}."
        )
    if predicted == gold:
        return f"Correct. The judge answered {predicted!r}, matching the human label {gold!r}."
    off = f" (off by {abs(int(predicted) - int(gold))})" if task.kind == "ordinal" else ""
    return f"Wrong. The judge answered {predicted!r} but the human label is {gold!r}{off}."


def as_dspy_metric(task: Task, name: str = ZERO_ONE, *, feedback: bool = False) -> Callable[..., Any]:
    """Expose agreement with the human label as a DSPy metric (for ``dspy.Evaluate`` and optimizers).

    A DSPy metric scores one example at a time, so the score is the per-example 0-1 agreement (1.0 if the
    predicted label equals the gold label, else 0.0) whatever ``name`` says: averaged over a split it is accuracy,
    not the corpus metric (macro-F1, kappa, ...) that ``name`` refers to. ``name`` is validated and used as the
    metric's ``__name__``; use :func:`corpus_scores` for corpus metrics. The score does not depend on ``trace``, so
    GEPA sees the same score with and without traces.

    The predicted label is ``pred.label`` re-parsed with :meth:`Task.parse_label` (raw strings such as ``"Yes."``
    work); a missing or unparsable label, or ``pred is None``, scores 0. The gold label is ``example.label``,
    validated with :meth:`Task.validate_label`.

    Args:
        task: The judging task.
        name: ``"zero_one"`` or a metric name from :data:`METRICS` applicable to the task.
        feedback: Return ``dspy.Prediction(score=..., feedback=...)`` (for GEPA) instead of a float; the feedback
            names the predicted and the human label.

    Returns:
        ``metric(example, pred, trace=None, pred_name=None, pred_trace=None)``.

    Raises:
        ValueError: Unknown or inapplicable ``name``.
    """
    if name != ZERO_ONE:
        resolve_metric_names(task, [name])

    def metric(
        example: Any, pred: Any, trace: Any = None, pred_name: str | None = None, pred_trace: Any = None
    ) -> float | dspy.Prediction:
        gold = _gold_label(task, example)
        predicted = task.parse_label(_field(pred, LABEL_FIELD)[1])
        score = 1.0 if predicted is not None and predicted == gold else 0.0
        if not feedback:
            return score
        return dspy.Prediction(score=score, feedback=_feedback(task, gold, pred, predicted))

    metric.__name__ = name
    metric.__qualname__ = f"as_dspy_metric.{name}"
    return metric
