"""Agreement metrics: hand-computed values, None handling, bootstrap intervals, registry, DSPy metric adapter."""

from __future__ import annotations

import functools
import inspect
import json
import math
import warnings

import dspy
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from sklearn import metrics as skm

from blpo_dspy import metrics as bm
from blpo_dspy.task import LabelError, Task

# --------------------------------------------------------------------------------------------- fixtures
ALIGNMENT = Task.load("alignment")  # binary: yes/no, positive "yes"
SAFETY = Task.load("safety")  # binary: safe/unsafe, positive "unsafe"
RATING = Task.load("rating")  # ordinal 1..5
PREFERENCE = Task.load("preference")  # pairwise A/B
ANIMALS = Task.from_dict(
    {
        "name": "animals",
        "description": "Which animal is in the image?",
        "kind": "categorical",
        "labels": ["cat", "dog", "bird"],
        "instructions": {"judge": "Which animal is shown?"},
    }
)

# A binary split, counted by hand:
#   idx   0    1    2     3    4    5    6    7
#   gold  yes  yes  yes   no   no   no   yes  no
#   pred  yes  no   None  no   yes  no   yes  "No."  (parses to "no")
# yes row: 2 right, 1 -> no, 1 unparsed;  no row: 3 right, 1 -> yes.
BIN_TRUE = ["yes", "yes", "yes", "no", "no", "no", "yes", "no"]
BIN_PRED = ["yes", "no", None, "no", "yes", "no", "yes", "No."]


# --------------------------------------------------------------------------------------------- binary
def test_binary_accuracy_and_balanced_accuracy_count_none_as_wrong() -> None:
    assert bm.accuracy(ALIGNMENT, BIN_TRUE, BIN_PRED) == pytest.approx(5 / 8)
    recall_yes, recall_no = 2 / 4, 3 / 4
    assert bm.balanced_accuracy(ALIGNMENT, BIN_TRUE, BIN_PRED) == pytest.approx((recall_yes + recall_no) / 2)


def test_binary_f1_scores() -> None:
    # yes: TP 2, FP 1 (idx 4), FN 2 (idx 1 and the unparsed idx 2); no: TP 3, FP 1 (idx 1), FN 1 (idx 4).
    f1_yes = 2 * 2 / (2 * 2 + 1 + 2)
    f1_no = 2 * 3 / (2 * 3 + 1 + 1)
    assert bm.binary_f1(ALIGNMENT, BIN_TRUE, BIN_PRED) == pytest.approx(f1_yes)
    assert bm.macro_f1(ALIGNMENT, BIN_TRUE, BIN_PRED) == pytest.approx((f1_yes + f1_no) / 2)


def test_binary_f1_uses_the_task_positive_label() -> None:
    gold = ["unsafe", "unsafe", "safe", "safe"]
    pred = ["unsafe", "safe", "unsafe", "safe"]  # unsafe: TP 1, FP 1, FN 1
    assert bm.binary_f1(SAFETY, gold, pred) == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))
    # Making the positive class perfect changes the score, the negative class does not matter.
    assert bm.binary_f1(SAFETY, gold, ["unsafe", "unsafe", "safe", "unsafe"]) == pytest.approx(2 * 2 / (2 * 2 + 1))


def test_binary_kappa_with_unparsed_column() -> None:
    observed = 5 / 8
    gold_marg = {"yes": 4 / 8, "no": 4 / 8}
    pred_marg = {"yes": 3 / 8, "no": 4 / 8, "unparsed": 1 / 8}  # the unparsed class never occurs in gold
    expected = sum(gold_marg[c] * pred_marg[c] for c in gold_marg)
    assert bm.cohen_kappa(ALIGNMENT, BIN_TRUE, BIN_PRED) == pytest.approx((observed - expected) / (1 - expected))
    assert bm.cohen_kappa(ALIGNMENT, BIN_TRUE, BIN_PRED) == pytest.approx(1 / 3)


def test_binary_mcc_multiclass_form() -> None:
    # Gorodkin: (c*s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)), classes yes/no/unparsed.
    s, c = 8, 5
    t = [4, 4, 0]
    p = [3, 4, 1]
    expected = (c * s - sum(a * b for a, b in zip(p, t, strict=True))) / math.sqrt(
        (s**2 - sum(x * x for x in p)) * (s**2 - sum(x * x for x in t))
    )
    assert bm.mcc(ALIGNMENT, BIN_TRUE, BIN_PRED) == pytest.approx(expected)


def test_mcc_matches_the_binary_formula_without_failures() -> None:
    gold = ["yes", "yes", "yes", "no", "no", "yes", "no", "no", "no"]
    pred = ["yes", "yes", "no", "no", "yes", "yes", "no", "no", "no"]
    tn = sum(g == p == "no" for g, p in zip(gold, pred, strict=True))
    fn = sum(g == "yes" and p == "no" for g, p in zip(gold, pred, strict=True))
    fp = sum(g == "no" and p == "yes" for g, p in zip(gold, pred, strict=True))
    tp = sum(g == p == "yes" for g, p in zip(gold, pred, strict=True))
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert bm.mcc(ALIGNMENT, gold, pred) == pytest.approx(expected)


def test_predictions_are_reparsed_and_garbage_is_unparsed() -> None:
    gold = ["yes", "no", "yes", "no"]
    pred = ["**Yes**", "0", "maybe", 42]  # yes, no (alias), unparsable, unparsable
    assert bm.accuracy(ALIGNMENT, gold, pred) == pytest.approx(2 / 4)
    assert bm.coverage(ALIGNMENT, gold, pred) == pytest.approx(2 / 4)
    assert bm.zero_one_loss(ALIGNMENT, gold, pred).tolist() == [0.0, 0.0, 1.0, 1.0]


def test_gold_aliases_are_accepted_and_bad_gold_is_named() -> None:
    assert bm.accuracy(ALIGNMENT, ["Yes", "1", "no"], ["yes", "yes", "no"]) == 1.0
    with pytest.raises(LabelError, match=r"y_true\[1\].*maybe"):
        bm.accuracy(ALIGNMENT, ["yes", "maybe"], ["yes", "no"])
    with pytest.raises(LabelError, match=r"y_true\[0\]"):
        bm.accuracy(ALIGNMENT, [None], ["yes"])


def test_length_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="differ in length: 2 != 1"):
        bm.accuracy(ALIGNMENT, ["yes", "no"], ["yes"])


# --------------------------------------------------------------------------------------------- categorical
def test_macro_f1_skips_labels_absent_from_gold_and_predictions() -> None:
    gold = ["cat", "cat", "dog"]
    pred = ["cat", "dog", "dog"]
    f1_cat = 2 * 1 / (2 * 1 + 0 + 1)
    f1_dog = 2 * 1 / (2 * 1 + 1 + 0)
    # "bird" occurs nowhere, so it is not averaged in (it would drag the mean to 4/9).
    assert bm.macro_f1(ANIMALS, gold, pred) == pytest.approx((f1_cat + f1_dog) / 2)
    # A predicted-but-never-gold label is averaged in with F1 = 0.
    assert bm.macro_f1(ANIMALS, gold, ["cat", "bird", "dog"]) == pytest.approx((f1_cat + 1.0 + 0.0) / 3)


def test_balanced_accuracy_over_present_gold_classes() -> None:
    gold = ["cat", "cat", "cat", "dog"]
    pred = ["cat", None, "bird", "dog"]
    assert bm.balanced_accuracy(ANIMALS, gold, pred) == pytest.approx((1 / 3 + 1.0) / 2)


# --------------------------------------------------------------------------------------------- ordinal
def test_ordinal_kappas_by_hand() -> None:
    # Scale 1..5; gold 1, 2, 3; predictions 1, 3, unparsed. Weights: linear |i-j|/4, quadratic (i-j)^2/16,
    # unparsed always 1.
    gold, pred = [1, 2, 3], [1, 3, None]
    # Unweighted: p_o = 1/3, p_e = 1/3*1/3 (label 1) + 1/3*1/3 (label 3) = 2/9.
    assert bm.cohen_kappa(RATING, gold, pred) == pytest.approx((1 / 3 - 2 / 9) / (1 - 2 / 9))
    # Linear: observed = (0 + 1/4 + 1)/3 = 5/12; expected = (1/9) * (6/4 + 6/4 + 6/4) = 1/2.
    assert bm.cohen_kappa(RATING, gold, pred, weights="linear") == pytest.approx(1 - (5 / 12) / (1 / 2))
    # Quadratic: observed = (0 + 1/16 + 1)/3 = 17/48; expected = (1/9) * (20/16 + 18/16 + 20/16) = 58/144.
    assert bm.cohen_kappa(RATING, gold, pred, weights="quadratic") == pytest.approx(7 / 58)


def test_weighted_kappa_penalises_far_misses_more() -> None:
    gold = [1, 2, 3, 4, 5, 1, 2, 3, 4, 5]
    near = [2, 2, 3, 4, 4, 1, 3, 3, 4, 5]  # three misses, each one point off
    far = [5, 2, 3, 4, 1, 1, 3, 3, 4, 5]  # three misses, two of them four points off
    assert bm.accuracy(RATING, gold, near) == bm.accuracy(RATING, gold, far)
    assert bm.cohen_kappa(RATING, gold, near, "quadratic") > bm.cohen_kappa(RATING, gold, far, "quadratic")
    assert bm.cohen_kappa(RATING, gold, near, "linear") > bm.cohen_kappa(RATING, gold, far, "linear")


def test_unparsed_is_worse_than_a_near_miss_in_weighted_kappa() -> None:
    gold = [1, 2, 3, 4, 5, 3]
    near = [1, 2, 3, 4, 4, 3]  # one point off
    failed = [1, 2, 3, 4, None, 3]  # weight 1, like the farthest possible answer
    for weights in ("linear", "quadratic"):
        assert bm.cohen_kappa(RATING, gold, failed, weights) < bm.cohen_kappa(RATING, gold, near, weights)


def test_rank_correlations_on_parsed_pairs_with_coverage() -> None:
    gold = [1, 2, 3, 4, 5]
    pred = [2, 1, 4, 3, None]
    # Parsed pairs (1,2) (2,1) (3,4) (4,3): rank differences all 1 -> rho = 1 - 6*4 / (4*(16-1)) = 0.6.
    assert bm.spearman(RATING, gold, pred) == pytest.approx(1 - 6 * 4 / (4 * 15))
    # Of the 6 pairs of pairs, 4 are concordant and 2 discordant, no ties -> tau = 2/6.
    assert bm.kendall(RATING, gold, pred) == pytest.approx((4 - 2) / 6)
    assert bm.coverage(RATING, gold, pred) == pytest.approx(4 / 5)


def test_rank_correlations_with_ties_match_scipy() -> None:
    gold = [1, 1, 2, 3, 3, 3, 5, 4, 2]
    pred = [1, 2, 2, 3, 4, 3, 5, None, 1]
    parsed = [(g, p) for g, p in zip(gold, pred, strict=True) if p is not None]
    g, p = zip(*parsed, strict=True)
    assert bm.spearman(RATING, gold, pred) == pytest.approx(stats.spearmanr(g, p).statistic)
    assert bm.kendall(RATING, gold, pred) == pytest.approx(stats.kendalltau(g, p).statistic)


def test_perfect_and_reversed_rankings() -> None:
    gold = [1, 2, 3, 4, 5]
    assert bm.spearman(RATING, gold, gold) == pytest.approx(1.0)
    assert bm.kendall(RATING, gold, gold[::-1]) == pytest.approx(-1.0)


# --------------------------------------------------------------------------------------------- pairwise
def test_pairwise_accuracy_is_accuracy_of_a_b() -> None:
    gold = ["A", "B", "A", "B"]
    pred = ["A", "A", "Image A", None]
    assert bm.pairwise_accuracy(PREFERENCE, gold, pred) == pytest.approx(2 / 4)
    assert bm.pairwise_accuracy(PREFERENCE, gold, pred) == bm.accuracy(PREFERENCE, gold, pred)


# --------------------------------------------------------------------------------------------- degenerate cases
def test_undefined_metrics_are_nan_and_mcc_is_zero() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from divisions by zero
        assert math.isnan(bm.cohen_kappa(ALIGNMENT, ["yes", "yes"], ["yes", "yes"]))
        assert bm.mcc(ALIGNMENT, ["yes", "yes"], ["yes", "no"]) == 0.0
        assert math.isnan(bm.binary_f1(ALIGNMENT, ["no", "no"], ["no", None]))
        assert math.isnan(bm.spearman(RATING, [1, 2], [3, None]))
        assert math.isnan(bm.kendall(RATING, [2, 2, 2], [1, 2, 3]))
        assert math.isnan(bm.accuracy(ALIGNMENT, [], []))


def test_metrics_reject_tasks_of_the_wrong_kind() -> None:
    with pytest.raises(ValueError, match="'spearman' applies to ordinal tasks; task 'alignment' is binary"):
        bm.spearman(ALIGNMENT, ["yes"], ["yes"])
    with pytest.raises(ValueError, match="ordinal"):
        bm.cohen_kappa(ALIGNMENT, ["yes"], ["yes"], weights="quadratic")
    with pytest.raises(ValueError, match="weights"):
        bm.cohen_kappa(RATING, [1], [1], weights="cubic")
    with pytest.raises(ValueError, match="binary"):
        bm.binary_f1(ANIMALS, ["cat"], ["cat"])
    with pytest.raises(ValueError, match="pairwise"):
        bm.pairwise_accuracy(ALIGNMENT, ["yes"], ["yes"])


# --------------------------------------------------------------------------------------------- cross-check
_PAIRS = st.lists(
    st.tuples(st.integers(1, 5), st.one_of(st.none(), st.integers(1, 5))),
    min_size=2,
    max_size=40,
)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-9)


@settings(max_examples=150, deadline=None)
@given(_PAIRS)
def test_all_metrics_agree_with_sklearn_and_scipy(pairs: list[tuple[int, int | None]]) -> None:
    gold = [g for g, _ in pairs]
    pred = [p for _, p in pairs]
    sentinel = [-1 if p is None else p for p in pred]  # sklearn: None as a class no gold label has
    present = sorted(set(gold) | {p for p in pred if p is not None})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn/scipy warn on degenerate inputs
        assert _same(bm.accuracy(RATING, gold, pred), skm.accuracy_score(gold, sentinel))
        assert _same(bm.balanced_accuracy(RATING, gold, pred), skm.balanced_accuracy_score(gold, sentinel))
        assert _same(
            bm.macro_f1(RATING, gold, pred),
            skm.f1_score(gold, sentinel, labels=present, average="macro", zero_division=0),
        )
        expected_kappa = skm.cohen_kappa_score(gold, sentinel, labels=[-1, 1, 2, 3, 4, 5])
        assert _same(bm.cohen_kappa(RATING, gold, pred), expected_kappa)
        assert _same(bm.mcc(RATING, gold, pred), skm.matthews_corrcoef(gold, sentinel))
        filled = [p if p is not None else 3 for p in pred]
        for weights in ("linear", "quadratic"):
            expected = skm.cohen_kappa_score(gold, filled, labels=[1, 2, 3, 4, 5], weights=weights)
            assert _same(bm.cohen_kappa(RATING, gold, filled, weights), expected)
        parsed = [(g, p) for g, p in pairs if p is not None]
        if len(parsed) >= 2:
            g, p = zip(*parsed, strict=True)
            assert _same(bm.spearman(RATING, gold, pred), stats.spearmanr(g, p).statistic)
            assert _same(bm.kendall(RATING, gold, pred), stats.kendalltau(g, p).statistic)


# --------------------------------------------------------------------------------------------- helpers
def test_confusion_matrix_rows_in_task_order_with_unparsed_column() -> None:
    cm = bm.confusion_matrix(ALIGNMENT, BIN_TRUE, BIN_PRED)
    assert cm.labels == ("yes", "no")
    assert cm.columns == ("yes", "no", "unparsed")
    assert cm.counts.tolist() == [[2, 1, 1], [1, 3, 0]]
    assert json.loads(json.dumps(cm.to_dict()))["counts"] == [[2, 1, 1], [1, 3, 0]]
    rating = bm.confusion_matrix(RATING, [5, 1], [5, None])
    assert rating.columns == (1, 2, 3, 4, 5, "unparsed")
    assert rating.counts[4, 4] == 1 and rating.counts[0, 5] == 1 and rating.counts.sum() == 2


def test_zero_one_loss_per_example() -> None:
    assert bm.zero_one_loss(ALIGNMENT, BIN_TRUE, BIN_PRED).tolist() == [0, 1, 1, 0, 1, 0, 0, 0]


def test_kappa_weights_shape_and_unparsed_column() -> None:
    w = bm.kappa_weights(RATING, "quadratic")
    assert w.shape == (5, 6)
    assert w[0, 4] == 1.0 and w[1, 2] == pytest.approx(1 / 16) and (w[:, 5] == 1.0).all()
    assert (np.diag(bm.kappa_weights(ANIMALS)[:, :3]) == 0).all()


# --------------------------------------------------------------------------------------------- bootstrap
def _split(n: int, n_wrong_per_10: int = 3) -> tuple[list[str], list[str | None]]:
    gold = ["yes" if i % 2 else "no" for i in range(n)]
    pred: list[str | None] = []
    for i, g in enumerate(gold):
        if i % 10 < n_wrong_per_10:
            pred.append(None if i % 10 == 0 else ("no" if g == "yes" else "yes"))
        else:
            pred.append(g)
    return gold, pred


def test_bootstrap_contains_the_point_estimate() -> None:
    gold, pred = _split(200)
    acc = functools.partial(bm.accuracy, ALIGNMENT)
    low, high = bm.bootstrap_ci(acc, gold, pred, n_resamples=500, seed=1)
    assert low < acc(gold, pred) < high
    assert 0.6 < low and high < 0.8  # a 95% interval around 0.7 with n=200 is about +-0.065


def test_bootstrap_narrows_with_more_examples() -> None:
    acc = functools.partial(bm.accuracy, ALIGNMENT)
    widths = []
    for n in (40, 160, 640):
        low, high = bm.bootstrap_ci(acc, *_split(n), n_resamples=400, seed=0)
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]


def test_bootstrap_is_deterministic_by_seed() -> None:
    gold, pred = _split(60)
    f1 = functools.partial(bm.macro_f1, ALIGNMENT)
    first = bm.bootstrap_ci(f1, gold, pred, n_resamples=300, seed=7)
    assert bm.bootstrap_ci(f1, gold, pred, n_resamples=300, seed=7) == first
    assert bm.bootstrap_ci(f1, gold, pred, n_resamples=300, seed=8) != first


def test_bootstrap_confidence_level_widens_interval() -> None:
    gold, pred = _split(100)
    acc = functools.partial(bm.accuracy, ALIGNMENT)
    low90, high90 = bm.bootstrap_ci(acc, gold, pred, n_resamples=400, confidence=0.90)
    low99, high99 = bm.bootstrap_ci(acc, gold, pred, n_resamples=400, confidence=0.99)
    assert low99 <= low90 and high90 <= high99 and (high99 - low99) > (high90 - low90)


def test_bootstrap_drops_degenerate_resamples() -> None:
    gold = ["yes"] * 9 + ["no"]
    pred = list(gold)
    kappa = functools.partial(bm.cohen_kappa, ALIGNMENT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # About a third of the resamples miss the single "no" and have undefined kappa; the rest give 1.
        assert bm.bootstrap_ci(kappa, gold, pred, n_resamples=200) == (1.0, 1.0)
        low, high = bm.bootstrap_ci(kappa, ["yes"] * 5, ["yes"] * 5, n_resamples=50)
    assert math.isnan(low) and math.isnan(high)
    assert all(math.isnan(x) for x in bm.bootstrap_ci(kappa, [], []))


def test_bootstrap_of_one_example_is_the_point() -> None:
    acc = functools.partial(bm.accuracy, ALIGNMENT)
    assert bm.bootstrap_ci(acc, ["yes"], ["no"], n_resamples=20) == (0.0, 0.0)


def test_bootstrap_rejects_bad_arguments() -> None:
    acc = functools.partial(bm.accuracy, ALIGNMENT)
    with pytest.raises(ValueError, match="confidence"):
        bm.bootstrap_ci(acc, ["yes"], ["yes"], confidence=1.0)
    with pytest.raises(ValueError, match="n_resamples"):
        bm.bootstrap_ci(acc, ["yes"], ["yes"], n_resamples=0)
    with pytest.raises(ValueError, match="length"):
        bm.bootstrap_ci(acc, ["yes"], [], n_resamples=5)


# --------------------------------------------------------------------------------------------- corpus scores
def test_corpus_scores_match_bootstrap_ci_and_point_values() -> None:
    gold = [1, 2, 3, 4, 5, 3, 2, 4, 1, 5, 3, 3]
    pred = [1, 3, 3, 4, None, 2, 2, 5, 1, 5, 4, 3]
    scores = bm.corpus_scores(RATING, gold, pred, n_resamples=300, seed=3)
    assert list(scores) == bm.metrics_for_task(RATING)
    for name in ("cohen_kappa_quadratic", "spearman", "accuracy", "coverage"):
        fn = functools.partial(bm.METRICS[name], RATING)
        assert scores[name].value == pytest.approx(fn(gold, pred))
        assert (scores[name].low, scores[name].high) == pytest.approx(
            bm.bootstrap_ci(fn, gold, pred, n_resamples=300, seed=3)
        )
    assert scores["coverage"].value == pytest.approx(11 / 12)


def test_corpus_scores_options() -> None:
    scores = bm.corpus_scores(ALIGNMENT, BIN_TRUE, BIN_PRED, metrics="accuracy", ci=False)
    assert scores == {"accuracy": bm.Score(5 / 8)}
    scores = bm.corpus_scores(ALIGNMENT, BIN_TRUE, BIN_PRED, metrics=["mcc", "accuracy"], n_resamples=50)
    assert list(scores) == ["mcc", "accuracy"]
    assert scores["accuracy"].low is not None and scores["accuracy"].low <= 5 / 8 <= scores["accuracy"].high
    with pytest.raises(ValueError, match="unknown metric 'f2'"):
        bm.corpus_scores(ALIGNMENT, BIN_TRUE, BIN_PRED, metrics=["f2"])
    with pytest.raises(ValueError, match="empty"):
        bm.corpus_scores(ALIGNMENT, [], [])


@pytest.mark.parametrize(
    ("task", "gold", "pred"),
    [
        (ALIGNMENT, BIN_TRUE, BIN_PRED),
        (RATING, [1, 2, 3, 4, 5, 3, 2, 4], [1, "3", 3, True, None, 2.0, 2, 5]),  # values of other types than labels
    ],
)
def test_scores_and_confusion_equal_the_two_functions(task: Task, gold: list[object], pred: list[object]) -> None:
    """Encoding the labels once gives the scores (with intervals) and the confusion matrix of the two calls."""
    scores, confusion = bm.scores_and_confusion(task, gold, pred, n_resamples=200, seed=5)
    assert scores == bm.corpus_scores(task, gold, pred, n_resamples=200, seed=5)
    expected = bm.confusion_matrix(task, gold, pred)
    assert confusion.to_dict() == expected.to_dict() and int(confusion.counts.sum()) == len(gold)
    with pytest.raises(ValueError, match="unknown metric 'f2'"):
        bm.scores_and_confusion(task, gold, pred, metrics=["f2"])
    with pytest.raises(ValueError, match="empty"):
        bm.scores_and_confusion(task, [], [])


def test_score_serialisation() -> None:
    score = bm.Score(0.8123, 0.75, 0.86)
    assert score.to_dict() == {"value": 0.8123, "low": 0.75, "high": 0.86}
    assert score.format() == "0.812 [0.750, 0.860]"
    undefined = bm.Score(math.nan, math.nan, math.nan)
    assert json.dumps(undefined.to_dict(), allow_nan=False) == '{"value": null, "low": null, "high": null}'
    assert bm.Score(0.5).format(2) == "0.50" and undefined.format() == "n/a [n/a, n/a]"
    with pytest.raises(AttributeError):
        score.value = 1.0  # type: ignore[misc]


# --------------------------------------------------------------------------------------------- registry
@pytest.mark.parametrize(
    ("task", "primary"),
    [(ALIGNMENT, "macro_f1"), (ANIMALS, "macro_f1"), (RATING, "cohen_kappa_quadratic"), (PREFERENCE, "accuracy")],
)
def test_primary_metric_and_defaults(task: Task, primary: str) -> None:
    assert bm.primary_metric(task) == primary
    names = bm.metrics_for_task(task)
    assert names[0] == primary and "coverage" in names
    assert all(bm.METRICS[name].applies_to(task) for name in names)


def test_registry_kinds() -> None:
    assert "binary_f1" in bm.metrics_for_task(ALIGNMENT) and "binary_f1" not in bm.metrics_for_task(ANIMALS)
    assert {"spearman", "kendall", "cohen_kappa_linear"} <= set(bm.metrics_for_task(RATING))
    assert not bm.METRICS["spearman"].applies_to(PREFERENCE)
    assert bm.METRICS["pairwise_accuracy"].applies_to(PREFERENCE)
    assert bm.resolve_metric_names(RATING, ["accuracy", "accuracy", "kendall"]) == ["accuracy", "kendall"]
    with pytest.raises(ValueError, match="at least one"):
        bm.resolve_metric_names(RATING, [])


# --------------------------------------------------------------------------------------------- DSPy adapter
def _example(label: object, ident: str = "e1", prompt: str = "a red cube") -> dspy.Example:
    return dspy.Example(id=ident, prompt=prompt, label=label).with_inputs("prompt")


def test_dspy_metric_plain_form() -> None:
    metric = bm.as_dspy_metric(ALIGNMENT)
    ex = _example("yes")
    assert metric(ex, dspy.Prediction(label="yes")) == 1.0
    assert metric(ex, dspy.Prediction(label="Yes.")) == 1.0  # re-parsed
    assert metric(ex, dspy.Prediction(label="no")) == 0.0
    assert metric(ex, dspy.Prediction(label=None, raw_label="hmm")) == 0.0
    assert metric(ex, dspy.Prediction(rationale="no label at all")) == 0.0
    assert metric(ex, None) == 0.0
    assert metric(_example("1"), dspy.Prediction(label="yes")) == 1.0  # gold alias
    ordinal = bm.as_dspy_metric(RATING, "cohen_kappa_quadratic")
    assert ordinal(_example(4), dspy.Prediction(label="Score: 4/5")) == 1.0
    assert ordinal(_example(4), dspy.Prediction(label=5)) == 0.0  # 0-1, no partial credit
    assert ordinal.__name__ == "cohen_kappa_quadratic"


def test_dspy_metric_binds_gepa_arguments() -> None:
    metric = bm.as_dspy_metric(ALIGNMENT, "macro_f1", feedback=True)
    inspect.signature(metric).bind(None, None, None, None, None)  # GEPA's check
    ex = _example("yes")
    pred = dspy.Prediction(label="no")
    result = metric(ex, pred, None, "judge.predict", [])
    assert isinstance(result, dspy.Prediction)
    assert result.score == 0.0
    assert "'no'" in result.feedback and "'yes'" in result.feedback and "Wrong" in result.feedback
    assert metric(ex, dspy.Prediction(label="yes"), [("trace",)]).score == 1.0  # trace does not change the score


def test_dspy_metric_feedback_texts() -> None:
    metric = bm.as_dspy_metric(RATING, feedback=True)
    off = metric(_example(2), dspy.Prediction(label=5))
    assert "off by 3" in off.feedback
    unparsed = metric(_example(2), dspy.Prediction(label=None, raw_label="pretty good"))
    assert "'pretty good'" in unparsed.feedback and "integer from 1 to 5" in unparsed.feedback
    failed = metric(_example(2), dspy.Prediction(label=None, error="TimeoutError: 120 s"))
    assert "failed" in failed.feedback and "TimeoutError" in failed.feedback and failed.score == 0.0
    right = metric(_example(3), dspy.Prediction(label=3))
    assert right.score == 1.0 and right.feedback.startswith("Correct")


def test_dspy_metric_validates_name_and_gold() -> None:
    with pytest.raises(ValueError, match="unknown metric"):
        bm.as_dspy_metric(ALIGNMENT, "bleu")
    with pytest.raises(ValueError, match="ordinal"):
        bm.as_dspy_metric(ALIGNMENT, "spearman")
    metric = bm.as_dspy_metric(ALIGNMENT)
    with pytest.raises(LabelError, match=r"example 'x7': field 'label'"):
        metric(_example("perhaps", ident="x7"), dspy.Prediction(label="yes"))
    with pytest.raises(LabelError, match="missing"):
        metric(dspy.Example(id="x8", prompt="p").with_inputs("prompt"), dspy.Prediction(label="yes"))


class _FixedAnswers(dspy.Module):
    def __init__(self, answers: dict[str, str | None]) -> None:
        super().__init__()
        self.answers = answers

    def forward(self, prompt: str) -> dspy.Prediction:
        return dspy.Prediction(label=self.answers[prompt])


@pytest.mark.parametrize("feedback", [False, True])
def test_dspy_evaluate_accepts_the_metric(feedback: bool) -> None:
    devset = [
        _example("yes", "a", "p1"),
        _example("no", "b", "p2"),
        _example("yes", "c", "p3"),
        _example("no", "d", "p4"),
    ]
    program = _FixedAnswers({"p1": "Yes", "p2": "yes", "p3": None, "p4": "no"})
    evaluator = dspy.Evaluate(devset=devset, metric=bm.as_dspy_metric(ALIGNMENT, feedback=feedback), num_threads=2)
    result = evaluator(program)
    assert result.score == pytest.approx(50.0)  # Evaluate reports a percentage
    assert [float(score) for _, _, score in result.results] == [1.0, 0.0, 0.0, 1.0]


# --------------------------------------------------------------------------------------------- label encoding
def _encode_one_by_one(task: Task, values: list[object], gold: bool) -> list[int | None]:
    """The reference encoding: each value through ``_lookup``, then ``validate_label`` / ``parse_label``."""
    index = {label: i for i, label in enumerate(task.labels)}
    out: list[int | None] = []
    for value in values:
        found = bm._lookup(index, value)
        if found is None and gold:
            try:
                found = index[task.validate_label(value)]
            except LabelError:
                found = -1
        elif found is None and value is not None:
            parsed = task.parse_label(value)
            found = None if parsed is None else index[parsed]
        out.append(len(task.labels) if found is None else found)
    return out


_ODD_VALUES = [
    None,
    True,
    False,
    1,
    1.0,
    2,
    5.0,
    "1",
    " 3 ",
    "yes",
    "Yes.",
    " no",
    "NO",
    "A",
    "b",
    "maybe",
    [1],
    {"a": 1},
]


@given(st.sampled_from([ALIGNMENT, RATING, PREFERENCE]), st.lists(st.sampled_from(_ODD_VALUES), max_size=12))
@settings(max_examples=150, deadline=None)
def test_encode_labels_matches_a_value_by_value_encoding(task: Task, values: list[object]) -> None:
    """The batch lookup of exact-type labels gives what the value-by-value path gives, for any mix of values."""
    values = values + list(task.labels)
    _, pred = bm.encode_labels(task, [task.labels[0]] * len(values), values)
    assert pred.tolist() == _encode_one_by_one(task, values, gold=False)
    golds = [v for v, code in zip(values, _encode_one_by_one(task, values, gold=True), strict=True) if code != -1]
    gold, _ = bm.encode_labels(task, golds, [None] * len(golds))
    assert gold.tolist() == _encode_one_by_one(task, golds, gold=True)
