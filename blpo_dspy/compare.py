"""Compare BLPO with the paper's baselines and DSPy's built-in optimizers on identical splits and seeds.

:func:`run_compare` compiles one ``ImageJudge`` per (optimizer, seed) on the same train/val splits, evaluates each
compiled program on the same held-out test split, and writes::

    out_dir/
      splits.json                      ids and fingerprints of the splits every optimizer used
      runs/<optimizer>/seed-<s>/
        result.json                    held-out scores with 95% bootstrap CIs and the confusion matrix, LM
                                       calls/tokens/images per role, wall time, final instructions, status
                                       ok/failed (+ error text)
        program.json                   the compiled program (ok runs)
        optimizer/                     BLPO-family run directory (state, study, cache)
        optimizer.discarded/           an unfinished attempt that could not be resumed (kept, not deleted)
        evaluation.sqlite              journal of the held-out evaluation (answers and verbalizations)
      compare.json  compare.csv  compare.md   mean ± std over seeds per optimizer

``result.json["test"]`` holds ``n``, ``primary``, ``confidence``, ``scores`` (``{metric: {value, low, high}}``),
``parse_failure_rate``, ``error_count`` and ``confusion_matrix``: ``{labels, columns, counts}`` with rows the human
labels in task order and columns the judge's labels plus ``"unparsed"`` (answers that did not parse and failed
calls), ``counts[i][j]`` the number of test examples of label ``labels[i]`` answered ``columns[j]``.

A failing optimizer is recorded as failed and the other runs go on. Running the same comparison again reuses the
ok runs and finishes the others where they stopped: a BLPO-family compile resumes from its ``optimizer/`` state
without repeating a finished LM call, and held-out examples already answered are replayed from
``evaluation.sqlite`` (a killed ``blpo compare`` loses only the calls in flight). Its ``result.json`` says
``resumed: true`` and counts, under ``replayed``, the compile's calls per role (``compile``), their tokens
(``compile_tokens``) and the test examples (``evaluation``) replayed from the earlier attempt. An unfinished run
made with other data, seed or models starts again; ``overwrite`` starts every run again. Every number in the tables
is a mean or a sample standard deviation (ddof=1) over the ok runs' ``result.json`` values, so the tables can be
recomputed from the run files; ``blpo report`` (:func:`blpo_dspy.report.write_report`) recomputes them, and draws
its plots, from the ``result.json`` files alone. LM calls are counted by a DSPy callback during the compile (the test
evaluation is counted separately, under ``evaluation_usage``); they include calls answered by DSPy's own cache, if
the LMs use it. ``usage`` counts the calls the run's last attempt made; the tables' call and token columns add the
calls it replayed from an earlier attempt, so a resumed run counts what an uninterrupted one makes.

Optimizer names (:data:`OPTIMIZER_NAMES`): ``no-opt``, ``blpo`` (guarded selection), ``blpo-paper`` (the paper's
selection), ``fixed-i2t``, ``judge-prompt-i2t``, ``opro``, ``apo-image``, ``mipro``, ``copro``, ``gepa``,
``simba``, ``bootstrap``. ``max_calls`` is a hard cap for BLPO, its ablations, OPRO and APO-image; the DSPy
built-ins get it as a budget their own knobs are fitted to (see :mod:`blpo_dspy.teleprompt.builtins`). OPRO and
APO-image propose ``inner_steps + 1`` judge instructions per outer step, as many as BLPO scores per outer step.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shutil
import statistics
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import dspy
from dspy.teleprompt import Teleprompter

from blpo_dspy.budget import ROLES, TOTAL, normalise_caps
from blpo_dspy.cache import CallJournal, VerbalizationCache, lm_identity
from blpo_dspy.data.splits import data_fingerprint, stratified_split
from blpo_dspy.evaluation import evaluate
from blpo_dspy.metrics import METRICS, primary_metric
from blpo_dspy.modules import ImageJudge
from blpo_dspy.task import JudgeSees, Task
from blpo_dspy.teleprompt.blpo import ResumeError
from blpo_dspy.teleprompt.builtins import BUILTIN_OPTIMIZERS, LMCallCounter, make_optimizer, share_on_deepcopy

logger = logging.getLogger(__name__)

COMPARE_FORMAT = 1
OPTIMIZER_NAMES: tuple[str, ...] = (
    "no-opt",
    "blpo",
    "blpo-paper",
    "fixed-i2t",
    "judge-prompt-i2t",
    "opro",
    "apo-image",
    "mipro",
    "copro",
    "gepa",
    "simba",
    "bootstrap",
)
DEFAULT_SPLIT_SIZES: dict[str, float] = {"train": 0.5, "val": 0.25, "test": 0.25}
KAPPA = "cohen_kappa"
EVALUATION_JOURNAL = "evaluation.sqlite"
_MAX_ERROR_TEXT = 2000


@dataclass(frozen=True)
class OptimizerContext:
    """Everything a factory needs to build one optimizer for one run.

    Attributes:
        name: The optimizer name.
        task: The judging task.
        seed: The run's seed.
        proposer_lm: The proposer / reflection LM.
        verbalizer_lm: The verbalizer LM.
        max_calls: The LM-call budget (BLPO format).
        num_threads: Parallel calls.
        run_dir: A directory the optimizer may write into (BLPO's run directory).
        outer_steps: BLPO/OPRO/APO outer steps.
        inner_steps: BLPO inner steps (OPRO/APO propose ``inner_steps + 1`` per outer step).
        error_batch_size: BLPO/APO error batch size.
        retain_batch_size: BLPO retain batch size.
        proposer_supports_images: Whether the proposer accepts images (``None``: ask DSPy's model metadata).
        resume: ``run_dir`` holds the state of an earlier attempt of this run that did not finish; an optimizer that
            can resume (the BLPO family) continues it without repeating finished LM calls.
    """

    name: str
    task: Task
    seed: int
    proposer_lm: dspy.LM
    verbalizer_lm: dspy.LM | None
    max_calls: int | Mapping[str, int] | None
    num_threads: int
    run_dir: Path
    outer_steps: int = 5
    inner_steps: int = 5
    error_batch_size: int = 10
    retain_batch_size: int = 10
    proposer_supports_images: bool | None = False
    resume: bool = False

    @property
    def budget_calls(self) -> int | None:
        """``max_calls`` as one total (the ``total`` cap, else the sum of the role caps)."""
        caps = normalise_caps(self.max_calls)
        if not caps:
            return None
        return caps.get(TOTAL, sum(caps.values()))


OptimizerFactory = Callable[[OptimizerContext], Teleprompter]


def build_optimizer(context: OptimizerContext) -> Teleprompter:
    """The teleprompter for one of :data:`OPTIMIZER_NAMES`, configured from the run context.

    Raises:
        ValueError: Unknown name, or an optimizer that refuses the configuration (e.g. APO-image with a
            text-only proposer).
    """
    from blpo_dspy.teleprompt.baselines import OPRO, APOImage, FixedI2T, JudgePromptAsI2T, NoOptimization
    from blpo_dspy.teleprompt.blpo import BLPO

    c = context
    if c.name == "no-opt":
        return NoOptimization(seed=c.seed)
    blpo_kwargs: dict[str, Any] = {
        "proposer_lm": c.proposer_lm,
        "verbalizer_lm": c.verbalizer_lm,
        "outer_steps": c.outer_steps,
        "inner_steps": c.inner_steps,
        "error_batch_size": c.error_batch_size,
        "retain_batch_size": c.retain_batch_size,
        "num_threads": c.num_threads,
        "seed": c.seed,
        "max_calls": c.max_calls,
        "run_dir": c.run_dir,
        "resume": c.resume,
    }
    if c.name == "blpo":
        return BLPO(**blpo_kwargs)
    if c.name == "blpo-paper":
        return BLPO(**blpo_kwargs, selection="paper")
    if c.name == "fixed-i2t":
        return FixedI2T(**blpo_kwargs)
    if c.name == "judge-prompt-i2t":
        return JudgePromptAsI2T(**blpo_kwargs)
    search_kwargs: dict[str, Any] = {
        "proposer_lm": c.proposer_lm,
        "outer_steps": c.outer_steps,
        "proposals_per_step": c.inner_steps + 1,
        "num_threads": c.num_threads,
        "seed": c.seed,
        "max_calls": c.max_calls,
    }
    if c.name == "opro":
        return OPRO(**search_kwargs)
    if c.name == "apo-image":
        return APOImage(
            **search_kwargs,
            proposer_supports_images=c.proposer_supports_images,
            error_batch_size=min(c.error_batch_size, 10),
        )
    if c.name in BUILTIN_OPTIMIZERS:
        return make_optimizer(
            c.name,
            task=c.task,
            proposer_lm=c.proposer_lm,
            budget_calls=c.budget_calls,
            seed=c.seed,
            num_threads=c.num_threads,
            proposer_supports_images=bool(c.proposer_supports_images),
        )
    raise ValueError(f"unknown optimizer {c.name!r}; known: {', '.join(OPTIMIZER_NAMES)}")


@dataclass
class CompareResult:
    """What :func:`run_compare` produced.

    Attributes:
        out_dir: The output directory.
        primary: The task's primary metric (first metric column).
        metrics: Metric names in the tables (primary, accuracy, Cohen's kappa).
        rows: One aggregate row per optimizer (as in ``compare.json``).
        runs: Every run's ``result.json`` content, in run order.
        markdown: The ``compare.md`` text.
    """

    out_dir: Path
    primary: str
    metrics: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    markdown: str = ""

    def row(self, optimizer: str) -> dict[str, Any]:
        """The aggregate row of one optimizer."""
        for row in self.rows:
            if row["optimizer"] == optimizer:
                return row
        raise KeyError(optimizer)

    @property
    def failed(self) -> list[dict[str, Any]]:
        """The runs whose status is ``failed``."""
        return [run for run in self.runs if run["status"] != "ok"]


# ---------------------------------------------------------------------------------------------- the runner
def run_compare(
    task: Task | str,
    examples_or_splits: Sequence[dspy.Example] | Mapping[str, Sequence[dspy.Example]],
    *,
    optimizers: Sequence[str],
    seeds: int | Sequence[int] = 3,
    judge_sees: JudgeSees = "image",
    verbalizer_lm: dspy.LM | None = None,
    judge_lm: dspy.LM | None = None,
    proposer_lm: dspy.LM | None = None,
    out_dir: str | Path,
    num_threads: int = 8,
    max_calls: int | Mapping[str, int] | None = None,
    split_sizes: Mapping[str, int] | Mapping[str, float] | None = None,
    split_seed: int = 0,
    outer_steps: int = 5,
    inner_steps: int = 5,
    error_batch_size: int = 10,
    retain_batch_size: int = 10,
    proposer_supports_images: bool | None = False,
    n_resamples: int = 1000,
    factories: Mapping[str, OptimizerFactory] | None = None,
    overwrite: bool = False,
) -> CompareResult:
    """Run every optimizer on identical splits for every seed, evaluate on the held-out split, write the tables.

    Args:
        task: The task (or a built-in task name).
        examples_or_splits: Labelled examples (split with :func:`~blpo_dspy.data.splits.stratified_split`) or a
            mapping with ``train``, ``val`` and ``test`` splits.
        optimizers: Names from :data:`OPTIMIZER_NAMES` (or keys of ``factories``), in table order.
        seeds: Number of seeds (``0..n-1``) or explicit seeds. Each seed is the optimizer's seed; the splits stay
            the same across seeds.
        judge_sees: What the judge reads: ``"image"``, ``"text"`` or ``"both"``.
        verbalizer_lm: LM of the verbalizer (vision).
        judge_lm: LM of the judge.
        proposer_lm: LM of the proposer (text only unless ``proposer_supports_images``).
        out_dir: Output directory (created).
        num_threads: Parallel LM calls in optimizers and evaluations.
        max_calls: LM-call budget per compile (int total or BLPO's per-role mapping).
        split_sizes: Split sizes when examples are given (counts or fractions); default 50/25/25 %.
        split_seed: Seed of the split.
        outer_steps: Outer steps of BLPO, its ablations, OPRO and APO-image.
        inner_steps: BLPO inner steps (OPRO/APO-image propose ``inner_steps + 1`` per outer step).
        error_batch_size: Error batch size (BLPO, APO-image; APO-image caps it at 10 images).
        retain_batch_size: BLPO retain batch size.
        proposer_supports_images: Whether the proposer accepts images (APO-image needs it; ``None`` asks DSPy's
            model metadata; ``True`` also lets MIPROv2/GEPA show images to it).
        n_resamples: Bootstrap resamples of the test-set confidence intervals.
        factories: Extra or replacement optimizers: ``{name: factory(context) -> Teleprompter}``.
        overwrite: Re-run runs whose ``result.json`` says ok (by default they are reused; failed runs are re-run).

    Returns:
        The :class:`CompareResult`.

    Raises:
        ValueError: Unknown optimizer names, bad seeds, a missing or empty split, or no proposer LM.
    """
    task = task if isinstance(task, Task) else Task.load(task)
    factories = dict(factories or {})
    names = list(dict.fromkeys(optimizers))
    if not names:
        raise ValueError("optimizers: name at least one optimizer")
    unknown = [name for name in names if name not in OPTIMIZER_NAMES and name not in factories]
    if unknown:
        raise ValueError(f"unknown optimizer(s) {', '.join(unknown)}; known: {', '.join(OPTIMIZER_NAMES)}")
    seed_list = _seed_list(seeds)
    if proposer_lm is None and any(name != "no-opt" for name in names):
        raise ValueError("run_compare needs a proposer_lm")
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be an int >= 1, got {num_threads!r}")
    normalise_caps(max_calls)
    splits = _splits(task, examples_or_splits, split_sizes, split_seed)
    # programs are deep-copied many times per run; shared LMs keep their call history out of those copies
    verbalizer_lm, judge_lm = share_on_deepcopy(verbalizer_lm), share_on_deepcopy(judge_lm)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    primary = primary_metric(task)
    metrics = list(dict.fromkeys([primary, "accuracy", KAPPA]))
    split_info = {
        name: {
            "n": len(examples),
            "fingerprint": data_fingerprint(examples),
            "ids": [str(e.get("id")) for e in examples],
        }
        for name, examples in splits.items()
    }
    _write_json(out / "splits.json", {"seed": split_seed, "splits": split_info})

    runs: list[dict[str, Any]] = []
    for name in names:
        for seed in seed_list:
            run_dir = out / "runs" / name / f"seed-{seed}"
            context = OptimizerContext(
                name=name,
                task=task,
                seed=seed,
                proposer_lm=proposer_lm,  # type: ignore[arg-type]
                verbalizer_lm=verbalizer_lm,
                max_calls=max_calls,
                num_threads=num_threads,
                run_dir=run_dir / "optimizer",
                outer_steps=outer_steps,
                inner_steps=inner_steps,
                error_batch_size=error_batch_size,
                retain_batch_size=retain_batch_size,
                proposer_supports_images=proposer_supports_images,
            )
            runs.append(
                _run_one(
                    context,
                    factories.get(name, build_optimizer),
                    splits,
                    judge_sees=judge_sees,
                    verbalizer_lm=verbalizer_lm,
                    judge_lm=judge_lm,
                    metrics=metrics,
                    n_resamples=n_resamples,
                    out_dir=out,
                    overwrite=overwrite,
                    split_info=split_info,
                )
            )

    rows = aggregate(runs, names, metrics)
    settings = {
        "task": task.name,
        "judge_sees": judge_sees,
        "seeds": seed_list,
        "splits": {name: info["n"] for name, info in split_info.items()},
        "split_seed": split_seed,
        "max_calls": max_calls,
        "outer_steps": outer_steps,
        "inner_steps": inner_steps,
        "models": {
            "verbalizer": lm_identity(verbalizer_lm)["model"],
            "judge": lm_identity(judge_lm)["model"],
            "proposer": lm_identity(proposer_lm)["model"],
        },
    }
    markdown = render_markdown(rows, metrics, settings, runs)
    _write_json(
        out / "compare.json",
        {
            "format": COMPARE_FORMAT,
            **settings,
            "primary": primary,
            "metrics": metrics,
            "optimizers": names,
            "rows": rows,
            "runs": [
                {
                    "optimizer": r["optimizer"],
                    "seed": r["seed"],
                    "status": r["status"],
                    "path": f"runs/{r['optimizer']}/seed-{r['seed']}/result.json",
                }
                for r in runs
            ],
        },
    )
    (out / "compare.csv").write_text(render_csv(rows, metrics), encoding="utf-8")
    (out / "compare.md").write_text(markdown, encoding="utf-8")
    logger.info("compare: wrote %s, %s and %s", "compare.json", "compare.csv", "compare.md")
    return CompareResult(out_dir=out, primary=primary, metrics=metrics, rows=rows, runs=runs, markdown=markdown)


def _seed_list(seeds: int | Sequence[int]) -> list[int]:
    if isinstance(seeds, bool):
        raise ValueError(f"seeds must be a count or a list of ints, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {seeds}")
        return list(range(seeds))
    out = list(seeds)
    if not out or any(isinstance(s, bool) or not isinstance(s, int) for s in out):
        raise ValueError(f"seeds must be a non-empty list of ints, got {seeds!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"seeds must be distinct, got {out}")
    return out


def _splits(
    task: Task,
    data: Sequence[dspy.Example] | Mapping[str, Sequence[dspy.Example]],
    sizes: Mapping[str, int] | Mapping[str, float] | None,
    seed: int,
) -> dict[str, list[dspy.Example]]:
    if isinstance(data, Mapping):
        splits = {name: list(examples) for name, examples in data.items()}
    else:
        chosen = dict(sizes or DEFAULT_SPLIT_SIZES)
        splits = stratified_split(list(data), sizes=chosen, seed=seed)
    for name in ("train", "val", "test"):
        if not splits.get(name):
            raise ValueError(f"the {name!r} split is missing or empty (splits: {', '.join(splits) or 'none'})")
    return {name: splits[name] for name in ("train", "val", "test")}


def _run_one(
    context: OptimizerContext,
    factory: OptimizerFactory,
    splits: Mapping[str, list[dspy.Example]],
    *,
    judge_sees: JudgeSees,
    verbalizer_lm: dspy.LM | None,
    judge_lm: dspy.LM | None,
    metrics: list[str],
    n_resamples: int,
    out_dir: Path,
    overwrite: bool,
    split_info: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """Compile and evaluate one (optimizer, seed); never raises for an optimizer failure.

    A run that did not finish (killed, or failed) keeps its directory: a BLPO-family compile resumes from its state
    without repeating finished LM calls, and the held-out examples already answered are replayed from the run's
    evaluation journal. ``overwrite`` starts every run afresh.
    """
    run_dir = context.run_dir.parent
    result_path = run_dir / "result.json"
    if result_path.exists() and not overwrite:
        previous = json.loads(result_path.read_text(encoding="utf-8"))
        if previous.get("status") == "ok":
            logger.info("compare: %s seed %d already done; reusing its result.json", context.name, context.seed)
            return previous
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    for stale in ("result.json", "program.json", "error.txt"):  # an earlier attempt's outcome, written again below
        (run_dir / stale).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    if (context.run_dir / "state.json").exists():
        context = replace(context, resume=True)
        logger.info("compare: %s, seed %d, resuming the unfinished attempt", context.name, context.seed)
    else:
        logger.info("compare: %s, seed %d", context.name, context.seed)
    task = context.task
    result: dict[str, Any] = {
        "format": COMPARE_FORMAT,
        "optimizer": context.name,
        "seed": context.seed,
        "status": "failed",
        "error": None,
        "task": task.name,
        "judge_sees": judge_sees,
        "splits": {name: {"n": info["n"], "fingerprint": info["fingerprint"]} for name, info in split_info.items()},
        "max_calls": context.max_calls,
        "test": None,
        "usage": None,
        "evaluation_usage": None,
        "optimizer_usage": None,
        "proposer_images": None,
        "wall_seconds": {"compile": None, "evaluate": None},
        "instructions": None,
        "stop_reason": None,
        "settings": None,
        "resumed": False,
        "replayed": None,
    }
    counter = LMCallCounter()
    began = time.perf_counter()
    try:
        student = ImageJudge(task, judge_sees=judge_sees, verbalizer_lm=verbalizer_lm, judge_lm=judge_lm)
        with counter.active():
            compiled = _compile(context, factory, student, splits, result)
        compiled_at = time.perf_counter()
        result["wall_seconds"]["compile"] = round(compiled_at - began, 3)
        result["usage"] = counter.usage()
        result["proposer_images"] = result["usage"]["proposer"]["images"]
        result["optimizer_usage"] = _json_safe(getattr(compiled, "usage_", None))
        result["stop_reason"] = getattr(compiled, "stop_reason_", None)
        result["instructions"] = dict(compiled.instructions)
        if getattr(compiled, "budget_plan_", None) is not None:
            result["budget_plan"] = _json_safe(compiled.budget_plan_)
        eval_counter = LMCallCounter()
        # Journaled in the run's directory, verbalizations included: a resumed run replays the held-out examples
        # (and the verbalizations) answered before the kill instead of asking them again.
        journal = CallJournal(run_dir / EVALUATION_JOURNAL)
        verbalizations = VerbalizationCache(run_dir / EVALUATION_JOURNAL)
        judged = compiled.deepcopy()
        if isinstance(judged, ImageJudge):
            judged.set_cache(verbalizations)
        try:
            with eval_counter.active():
                report = evaluate(
                    judged,
                    splits["test"],
                    task=task,
                    metric=metrics,
                    num_threads=context.num_threads,
                    ci=True,
                    n_resamples=n_resamples,
                    seed=context.seed,
                    journal=journal,
                )
        finally:
            journal.close()
            verbalizations.close()
        result["wall_seconds"]["evaluate"] = round(time.perf_counter() - compiled_at, 3)
        result["evaluation_usage"] = eval_counter.usage()
        result["replayed"] = {
            "compile": _replayed(compiled, "replayed", (*ROLES, TOTAL)),
            "compile_tokens": _replayed(compiled, "replayed_tokens", (TOTAL,))[TOTAL],
            "evaluation": report.replayed,
        }
        result["test"] = {
            "n": report.n,
            "primary": report.primary,
            "confidence": report.confidence,
            "scores": {name: score.to_dict() for name, score in report.scores.items()},
            "parse_failure_rate": report.parse_failure_rate,
            "error_count": report.error_count,
            "confusion_matrix": report.confusion.to_dict(),
        }
        result["status"] = "ok"
        _save_program(compiled, run_dir / "program.json")
    except Exception as exc:  # one optimizer's failure must not stop the comparison
        logger.error("compare: %s seed %d failed: %s: %s", context.name, context.seed, type(exc).__name__, exc)
        result["error"] = _scrub(f"{type(exc).__name__}: {exc}", out_dir)[:_MAX_ERROR_TEXT]
        (run_dir / "error.txt").write_text(_scrub(traceback.format_exc(), out_dir), encoding="utf-8")
        if result["usage"] is None:
            result["usage"] = counter.usage()
            result["proposer_images"] = result["usage"]["proposer"]["images"]
        if result["wall_seconds"]["compile"] is None:
            result["wall_seconds"]["compile"] = round(time.perf_counter() - began, 3)
    _write_json(result_path, result)
    return result


def _compile(
    context: OptimizerContext,
    factory: OptimizerFactory,
    student: dspy.Module,
    splits: Mapping[str, list[dspy.Example]],
    result: dict[str, Any],
) -> dspy.Module:
    """Build the run's optimizer and compile the student; record its settings and whether it resumed in ``result``.

    An unfinished attempt that cannot be resumed (its run directory was made with other data, seed or models) is
    moved aside to ``optimizer.discarded/`` (replacing an earlier one there) with a warning, and the run starts again.
    """

    def attempt(context: OptimizerContext) -> dspy.Module:
        optimizer = factory(context)
        result["settings"] = _json_safe(optimizer.get_params())
        result["resumed"] = context.resume
        return optimizer.compile(student, trainset=list(splits["train"]), valset=list(splits["val"]))

    if context.resume:
        try:
            return attempt(context)
        except ResumeError as exc:
            aside = context.run_dir.with_name(context.run_dir.name + ".discarded")
            logger.warning(
                "compare: %s seed %d cannot resume (%s); starting it again (the unfinished attempt is kept in %s/)",
                context.name,
                context.seed,
                exc,
                aside.name,
            )
            shutil.rmtree(aside, ignore_errors=True)
            context.run_dir.rename(aside)
            context = replace(context, resume=False)
    return attempt(context)


def _replayed(compiled: Any, counter: str, roles: Sequence[str]) -> dict[str, int]:
    """Per role, a counter of the compile's ``usage_`` (BLPO family; 0 for others and for a malformed value)."""
    usage = getattr(compiled, "usage_", None)
    usage = usage if isinstance(usage, Mapping) else {}
    out = {}
    for role in roles:
        counts = usage.get(role)
        value = counts.get(counter, 0) if isinstance(counts, Mapping) else 0
        out[role] = value if isinstance(value, int) and not isinstance(value, bool) else 0
    return out


def _save_program(program: Any, path: Path) -> None:
    from blpo_dspy.persistence import save_program

    try:
        save_program(program, path)
    except Exception as exc:  # the scores are what matters; a program that cannot be saved is noted in the log
        logger.warning("compare: could not save %s: %s", path.name, exc)


# ---------------------------------------------------------------------------------------------- aggregation
def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) >= 2 else None
    return mean, std


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def aggregate(runs: Sequence[Mapping[str, Any]], optimizers: Sequence[str], metrics: Sequence[str]) -> list[dict]:
    """Mean and sample std (ddof=1) over the ok runs of each optimizer, from ``result.json`` contents.

    Per optimizer: ``runs``, ``ok``, ``failed`` (counts), ``failed_seeds``; per metric ``{mean, std, n}`` of the
    held-out value; ``calls`` (mean LM calls per role and total during the compile), ``tokens`` (mean prompt +
    completion tokens), ``proposer_images`` and ``wall_seconds`` (mean compile time). ``std`` is ``None`` with
    fewer than two values; every mean is ``None`` when no run is ok.
    """
    rows = []
    for name in optimizers:
        mine = [r for r in runs if r["optimizer"] == name]
        ok = [r for r in mine if r["status"] == "ok"]
        row: dict[str, Any] = {
            "optimizer": name,
            "runs": len(mine),
            "ok": len(ok),
            "failed": len(mine) - len(ok),
            "failed_seeds": [r["seed"] for r in mine if r["status"] != "ok"],
            "metrics": {},
        }
        for metric in metrics:
            values = [
                r["test"]["scores"][metric]["value"]
                for r in ok
                if metric in r["test"]["scores"] and _finite(r["test"]["scores"][metric]["value"])
            ]
            mean, std = _mean_std(values)
            row["metrics"][metric] = {"mean": mean, "std": std, "n": len(values)}
        row["calls"] = {role: _mean_std([compile_calls(r, role) for r in ok])[0] for role in (*ROLES, TOTAL)}
        row["tokens"] = _mean_std([compile_tokens(r) for r in ok])[0]
        row["proposer_images"] = _mean_std([r["usage"]["proposer"]["images"] for r in ok])[0]
        row["wall_seconds"] = _mean_std([r["wall_seconds"]["compile"] for r in ok])[0]
        rows.append(row)
    return rows


def compile_calls(run: Mapping[str, Any], role: str) -> int:
    """A run's compile LM calls of one role (or ``"total"``) from its ``result.json``: made by the attempt that
    finished it, plus those an earlier, killed attempt finished and the resumed one replayed (so a resumed run counts
    what an uninterrupted one makes)."""
    replayed = (run.get("replayed") or {}).get("compile") or {}
    return run["usage"][role]["calls"] + replayed.get(role, 0)


def compile_tokens(run: Mapping[str, Any]) -> int:
    """A run's compile prompt + completion tokens from its ``result.json``, counted as :func:`compile_calls` counts
    calls: those of the calls made, plus those of the calls replayed from an earlier attempt, as the LM reported them
    then."""
    total = run["usage"][TOTAL]
    replayed = (run.get("replayed") or {}).get("compile_tokens") or 0
    return total["prompt_tokens"] + total["completion_tokens"] + replayed


def format_mean_std(mean: float | None, std: float | None, digits: int = 3) -> str:
    """``"0.812 ± 0.034"``; just the mean when ``std`` is ``None``; ``"—"`` when there is no value."""
    if mean is None:
        return "—"
    if std is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_number(value: float | None, digits: int = 1) -> str:
    """A mean count or time with fixed decimals; ``"—"`` when missing."""
    return "—" if value is None else f"{value:.{digits}f}"


def table_rows(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str], digits: int = 3) -> list[list[str]]:
    """The cells of the Markdown table (one list per optimizer), in column order (see :func:`table_header`).

    Args:
        rows: Aggregate rows (see :func:`aggregate`).
        metrics: Metric names, in column order.
        digits: Decimal places of the scores.
    """
    cells = []
    for row in rows:
        line = [row["optimizer"], f"{row['ok']}/{row['runs']}"]
        line += [format_mean_std(row["metrics"][m]["mean"], row["metrics"][m]["std"], digits) for m in metrics]
        line += [
            format_number(row["calls"][TOTAL]),
            format_number(row["calls"]["judge"]),
            format_number(row["calls"]["verbalizer"]),
            format_number(row["calls"]["proposer"]),
            format_number(row["proposer_images"]),
            format_number(row["tokens"], 0),
            format_number(row["wall_seconds"], 2),
        ]
        cells.append(line)
    return cells


def table_header(metrics: Sequence[str]) -> list[str]:
    """Column titles of the Markdown table."""
    titles = [METRICS[m].title if m in METRICS else m for m in metrics]
    return [
        "Optimizer",
        "OK runs",
        *titles,
        "LM calls",
        "Judge calls",
        "Verbalizer calls",
        "Proposer calls",
        "Images to proposer",
        "Tokens",
        "Compile time (s)",
    ]


def render_markdown(
    rows: Sequence[Mapping[str, Any]],
    metrics: Sequence[str],
    settings: Mapping[str, Any],
    runs: Sequence[Mapping[str, Any]],
) -> str:
    """The ``compare.md`` report: settings, the table (mean ± std over seeds), failures and notes."""
    header = table_header(metrics)
    lines = [
        f"# Optimizer comparison: {settings['task']}",
        "",
        f"- judge sees: {settings['judge_sees']}; seeds: {', '.join(map(str, settings['seeds']))}; "
        f"splits: " + ", ".join(f"{k} {v}" for k, v in settings["splits"].items()),
        f"- LM-call budget per compile: {settings['max_calls'] if settings['max_calls'] is not None else 'none'}; "
        f"outer steps {settings['outer_steps']}, inner steps {settings['inner_steps']}",
        "- models: " + ", ".join(f"{role} `{model}`" for role, model in settings["models"].items()),
        "",
        f"Held-out test scores: mean ± sample std over the ok seeds ({metrics[0]} is the task's primary metric; "
        "per-run 95% bootstrap intervals are in each run's result.json). Calls, tokens and images are means over "
        "the ok seeds, measured during the compile (test evaluation excluded).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows, metrics)]
    failures = [r for r in runs if r["status"] != "ok"]
    if failures:
        lines += ["", "## Failed runs", ""]
        lines += [
            f"- {r['optimizer']} seed {r['seed']}: {(r.get('error') or '').splitlines()[0][:300]}" for r in failures
        ]
    lines += [
        "",
        "Budgets: `max_calls` is a hard cap for BLPO, its ablations, OPRO and APO-image; MIPROv2, COPRO, GEPA, SIMBA "
        "and BootstrapFewShot get their own knobs fitted to it (an estimate, see `budget_plan` in result.json).",
        "",
    ]
    return "\n".join(lines)


def render_csv(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> str:
    """``compare.csv``: one row per optimizer with full-precision means and stds (empty when missing)."""
    columns = ["optimizer", "runs", "ok", "failed"]
    for metric in metrics:
        columns += [f"{metric}_mean", f"{metric}_std", f"{metric}_n"]
    columns += [f"calls_{role}_mean" for role in (TOTAL, *ROLES)]
    columns += ["tokens_mean", "proposer_images_mean", "compile_seconds_mean"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        values: list[Any] = [row["optimizer"], row["runs"], row["ok"], row["failed"]]
        for metric in metrics:
            stats = row["metrics"][metric]
            values += [stats["mean"], stats["std"], stats["n"]]
        values += [row["calls"][role] for role in (TOTAL, *ROLES)]
        values += [row["tokens"], row["proposer_images"], row["wall_seconds"]]
        writer.writerow(["" if v is None else repr(v) if isinstance(v, float) else v for v in values])
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- helpers
def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)


def _scrub(text: str, out_dir: Path) -> str:
    """Remove the machine's absolute paths from error texts written to artifacts."""
    for path, marker in ((out_dir.resolve(), "<out_dir>"), (Path.home(), "~")):
        text = text.replace(str(path), marker)
    return text


def _json_safe(value: Any, depth: int = 0) -> Any:
    """Parameters and diagnostics reduced to JSON: LMs by model id, paths by name, other objects by type."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return value.name
    if isinstance(value, dspy.BaseLM):
        return lm_identity(value)["model"]
    if isinstance(value, Task):
        return value.name
    if depth > 8:
        return type(value).__name__
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v, depth + 1) for v in value]
    return getattr(value, "__name__", type(value).__name__)
