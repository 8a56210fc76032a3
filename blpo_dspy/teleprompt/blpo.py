"""BLPO: bi-level prompt optimization for multimodal LLM judges, as a DSPy teleprompter.

Pan, Kan et al., "Bi-Level Prompt Optimization for Multimodal LLM-as-a-Judge", arXiv 2602.11340 (2026).

Outer loop over the judge instruction p, inner loop over the image-to-text (I2T) instruction q. An I2T instruction
is scored by how much the judge-instruction update it enables fixes the judge's errors: q is a tool for p.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import dspy
from dspy.teleprompt import Teleprompter

from blpo_dspy.budget import BudgetExhaustedError, UsageLedger, normalise_caps
from blpo_dspy.cache import content_key, lm_identity
from blpo_dspy.task import Label, Task
from blpo_dspy.teleprompt.calls import Candidate, JudgeRecord, ProgramCalls, as_record, program_setup
from blpo_dspy.teleprompt.errors import BalancedSampler, BatchSampler
from blpo_dspy.teleprompt.inputs import check_compile_inputs
from blpo_dspy.teleprompt.proposers import (
    ErrorCase,
    UpdateJudgeInstruction,
    UpdateVerbalizerInstruction,
    render_errors,
    render_history,
    render_tried,
    task_description,
)
from blpo_dspy.teleprompt.selection import INCUMBENT_ID, OptunaSelector, import_optuna, open_storage, rung_sizes

logger = logging.getLogger(__name__)

STATE_FORMAT = 1
Selection = Literal["guarded", "paper"]
I2TPolicy = Literal["optimize", "fixed", "judge_prompt"]
I2T_POLICIES: tuple[str, ...] = ("optimize", "fixed", "judge_prompt")
CorpusMetric = Callable[[Task, Sequence[dspy.Example], Sequence[Label | None]], float]


class ResumeError(RuntimeError):
    """A run directory cannot be resumed (missing, or made with other data, task, seed or models)."""


class BLPO(Teleprompter):
    """Bi-level prompt optimization of an ``ImageJudge``'s judge (p) and verbalizer (q) instructions.

    Per outer step: run the judge on the train split, sample an error batch balanced over (gold, predicted) pairs
    (and, with ``selection="guarded"``, a retain batch of correct examples); then for each inner step propose q from
    the OPRO-style history of (q, score), verbalize the error images under q, propose p' from the text-only errors,
    and score q by the share of the error batch p' fixes (minus the retain examples it breaks, when guarded).
    ``selection="paper"`` takes the p' of the best q (Algorithm 1). ``selection="guarded"`` lets Optuna pick among
    the round's candidates and the incumbent on growing validation minibatches with pruning, and accepts a
    candidate only if the corpus metric on the validation split does not drop (a tie is accepted only when the
    candidate fixed a net positive share of its error batch).

    Args:
        metric: The human-agreement metric that decides selection: a corpus metric name from
            ``blpo_dspy.metrics`` (e.g. ``"macro_f1"``, ``"kappa_quadratic"``), ``"primary"`` for the task's
            primary metric, or a DSPy metric ``(example, pred, trace=None) -> float`` averaged over the split.
        proposer_lm: Text LM for Update_p and Update_q. It never receives an image.
        verbalizer_lm: LM for verbalizations during optimization; defaults to the program's ``verbalizer_lm``,
            then ``dspy.settings.lm``.
        outer_steps: Outer iterations T (judge instruction updates).
        inner_steps: Proposed I2T instructions K per outer step (the incumbent's q is scored too).
        error_batch_size: Errors per batch.
        retain_batch_size: Correct examples per retain batch (guarded selection only).
        num_threads: Parallel LM calls per batch.
        seed: Seed of every random choice (batches, validation order, Optuna's sampler).
        selection: ``"guarded"`` (default) or ``"paper"``.
        patience: Stop after this many outer steps without a validation improvement (``None``: never).
        max_calls: Cap on LM calls: an int for the total, or ``{"judge": n, "verbalizer": n, "proposer": n,
            "total": n}``. Reaching it stops the search cleanly with the best program so far.
        run_dir: Directory for ``study.db``, ``state.json``, ``cache.sqlite`` and ``program.json``; ``None`` keeps
            everything in a temporary directory.
        resume: Continue a killed compile in ``run_dir`` without repeating finished LM calls.
        cache_path: SQLite file of the verbalization cache; defaults to ``run_dir/cache.sqlite``. Share one file
            between compiles to share verbalizations.
        n_rungs: Validation minibatch sizes per trial (doubling up to the whole split).
        trials_per_round: Most candidates evaluated on the validation split per outer step (best inner scores first;
            default: all of them).
        error_sampler: Policy for the error batch (default: balanced over (gold, predicted)).
        retain_sampler: Policy for the retain batch (default: balanced over gold labels).
        pruner: Optuna pruner factory ``(first_rung_size) -> pruner``; default successive halving.
        i2t_policy: ``"optimize"`` (BLPO), ``"fixed"`` (the inner loop switched off: errors are always verbalized
            under the incumbent's I2T instruction, i.e. judge-only APO) or ``"judge_prompt"`` (the current judge
            instruction is reused as the I2T instruction). The last two are the paper's ablations.
        progress: Show tqdm progress bars per loop level.
        study_storage: Optuna storage URL of the per-round studies; defaults to ``sqlite:///RUN_DIR/study.db``
            (in memory without a ``run_dir``). Use a server database (``postgresql://...``) when selection workers
            run on other machines. Never written to artifacts (it may hold credentials).
        allow_workers: Let selection workers (``blpo worker`` / :class:`~blpo_dspy.teleprompt.workers.SelectionWorker`,
            other processes sharing the run directory and the study storage) claim the validation trials of each
            round. Trials then climb the rungs one at a time in whichever process claims them, so pruning depends on
            timing and a resumed run may prune differently (no finished LM call is repeated either way). Needs a
            named metric and a persistent storage.
        worker_timeout: Seconds to wait for a trial a worker claimed before failing it and evaluating it here.
    """

    def __init__(
        self,
        metric: str | Callable[..., Any] = "primary",
        proposer_lm: dspy.LM | None = None,
        *,
        verbalizer_lm: dspy.LM | None = None,
        outer_steps: int = 5,
        inner_steps: int = 5,
        error_batch_size: int = 10,
        retain_batch_size: int = 10,
        num_threads: int = 8,
        seed: int = 0,
        selection: Selection = "guarded",
        patience: int | None = None,
        max_calls: int | Mapping[str, int] | None = None,
        run_dir: str | Path | None = None,
        resume: bool = False,
        cache_path: str | Path | None = None,
        n_rungs: int = 3,
        trials_per_round: int | None = None,
        error_sampler: BatchSampler | None = None,
        retain_sampler: BatchSampler | None = None,
        pruner: Callable[[int], Any] | None = None,
        i2t_policy: I2TPolicy = "optimize",
        progress: bool = False,
        study_storage: str | None = None,
        allow_workers: bool = False,
        worker_timeout: float = 300.0,
    ) -> None:
        super().__init__()
        if proposer_lm is None:
            raise ValueError("BLPO needs a proposer_lm (a text LM for Update_p and Update_q)")
        if not (isinstance(metric, str) or callable(metric)):
            raise TypeError(f"metric must be a metric name or a callable, got {type(metric).__name__}")
        for name, value, low in (
            ("outer_steps", outer_steps, 0),
            ("inner_steps", inner_steps, 0),
            ("error_batch_size", error_batch_size, 1),
            ("retain_batch_size", retain_batch_size, 0),
            ("num_threads", num_threads, 1),
            ("n_rungs", n_rungs, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if selection not in ("guarded", "paper"):
            raise ValueError(f"selection must be 'guarded' or 'paper', got {selection!r}")
        if i2t_policy not in I2T_POLICIES:
            raise ValueError(f"i2t_policy must be one of {I2T_POLICIES}, got {i2t_policy!r}")
        if patience is not None and (not isinstance(patience, int) or patience < 1):
            raise ValueError(f"patience must be None or an int >= 1, got {patience!r}")
        if trials_per_round is not None and (not isinstance(trials_per_round, int) or trials_per_round < 1):
            raise ValueError(f"trials_per_round must be None or an int >= 1, got {trials_per_round!r}")
        normalise_caps(max_calls)
        if allow_workers and callable(metric):
            raise ValueError("allow_workers needs a named metric (workers in other processes score trials by name)")
        if allow_workers and run_dir is None and study_storage is None:
            raise ValueError("allow_workers needs a run_dir (workers share its journal and study storage)")
        if isinstance(worker_timeout, bool) or not isinstance(worker_timeout, int | float) or worker_timeout <= 0:
            raise ValueError(f"worker_timeout must be a positive number of seconds, got {worker_timeout!r}")
        if resume and run_dir is None:
            raise ValueError("resume=True needs the run_dir of the compile to resume")
        self.metric = metric
        self.proposer_lm = proposer_lm
        self.verbalizer_lm = verbalizer_lm
        self.outer_steps = outer_steps
        self.inner_steps = inner_steps
        self.error_batch_size = error_batch_size
        self.retain_batch_size = retain_batch_size
        self.num_threads = num_threads
        self.seed = seed
        self.selection = selection
        self.patience = patience
        self.max_calls = max_calls
        self.run_dir = run_dir
        self.resume = resume
        self.cache_path = cache_path
        self.n_rungs = n_rungs
        self.trials_per_round = trials_per_round
        self.error_sampler = error_sampler
        self.retain_sampler = retain_sampler
        self.pruner = pruner
        self.i2t_policy = i2t_policy
        self.progress = progress
        self.study_storage = study_storage
        self.allow_workers = allow_workers
        self.worker_timeout = worker_timeout

    # ------------------------------------------------------------------ public
    def compile(
        self,
        student: dspy.Module,
        *,
        trainset: list[dspy.Example],
        teacher: dspy.Module | None = None,
        valset: list[dspy.Example] | None = None,
        **kwargs: Any,
    ) -> dspy.Module:
        """Optimize ``student``'s instructions; return a new program (the student is not modified).

        Args:
            student: An ``ImageJudge`` (or a module with ``task``, ``verbalizer`` and ``judge`` like it).
            trainset: The optimisation split (errors are sampled from it).
            teacher: Unused (must be ``None``).
            valset: The validation split that decides selection; defaults to ``trainset`` (with a warning).
            **kwargs: Not accepted (a ``TypeError`` names them).

        Returns:
            A copy of the student with the best instructions, carrying ``best_instructions_``, ``best_score_``,
            ``seed_score_``, ``history_``, ``study_`` (last round), ``studies_``, ``usage_``, ``stop_reason_`` and
            ``run_dir_``.
        """
        train, val = check_compile_inputs(type(self).__name__, student, trainset, teacher, valset, kwargs)
        import_optuna()

        with self._run_directory() as run_dir:
            run = _Run(self, student, train, val, run_dir)
            try:
                return run.execute()
            finally:
                run.close()

    @contextlib.contextmanager
    def _run_directory(self) -> Iterator[Path]:
        if self.run_dir is not None:
            path = Path(self.run_dir)
            if path.exists() and (path / "state.json").exists() and not self.resume:
                raise FileExistsError(
                    f"run directory '{path.name}' already holds a compile; pass resume=True to continue it or "
                    "choose a new directory"
                )
            if self.resume and not (path / "state.json").exists():
                raise ResumeError(f"nothing to resume: no state.json in run directory '{path.name}'")
            path.mkdir(parents=True, exist_ok=True)
            yield path
        else:
            with tempfile.TemporaryDirectory(prefix="blpo-run-") as tmp:
                yield Path(tmp)


def _atomic_write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("blpo-dspy", "dspy", "optuna"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


class _Run(ProgramCalls):
    """One compile: the call layer (LMs, stores, ledger) and the BLPO loop."""

    def __init__(
        self, opt: BLPO, student: dspy.Module, trainset: list[dspy.Example], valset: list[dspy.Example], run_dir: Path
    ) -> None:
        self.opt = opt
        self.student = student
        self.trainset = trainset
        self.valset = valset
        self.run_dir = run_dir
        self.persistent = opt.run_dir is not None
        self.study_storage = opt.study_storage or (f"sqlite:///{run_dir / 'study.db'}" if self.persistent else None)
        super().__init__(
            **program_setup(student, run_dir, cache_path=opt.cache_path, verbalizer_lm=opt.verbalizer_lm),
            proposer_lm=opt.proposer_lm,
            ledger=UsageLedger(opt.max_calls),
            num_threads=opt.num_threads,
        )
        self.error_sampler = opt.error_sampler or BalancedSampler()
        self.retain_sampler = opt.retain_sampler or BalancedSampler()
        self.history: list[dict[str, Any]] = []
        self.rounds: list[dict[str, Any]] = []
        self.studies: list[Any] = []
        self._metric_fn = self._resolve_metric(opt.metric)
        self.started = time.time()
        self.replaying_from: int | None = None
        self.state_path = run_dir / "state.json"
        self._check_resume()

    # ------------------------------------------------------------------ setup helpers
    def _resolve_metric(self, metric: str | Callable[..., Any]) -> CorpusMetric:
        if callable(metric):

            def mean_metric(task: Task, examples: Sequence[dspy.Example], labels: Sequence[Label | None]) -> float:
                if not examples:
                    return 0.0
                total = 0.0
                for example, label in zip(examples, labels, strict=True):
                    value = metric(example, dspy.Prediction(label=label), None)
                    total += float(getattr(value, "score", value))
                return total / len(examples)

            self.metric_name = getattr(metric, "__name__", "custom")
            return mean_metric
        from blpo_dspy.metrics import corpus_value, primary_metric

        name = primary_metric(self.task) if metric == "primary" else metric
        self.metric_name = name

        def corpus(task: Task, examples: Sequence[dspy.Example], labels: Sequence[Label | None]) -> float:
            return corpus_value(task, name, examples, labels)

        corpus(self.task, self.valset[:2], [None] * min(2, len(self.valset)))  # fail fast on an unknown name
        return corpus

    def _fingerprint(self, examples: Sequence[dspy.Example]) -> str:
        return content_key([[self.example_key(e), str(e.label)] for e in examples])

    def _identity(self) -> dict[str, Any]:
        return {
            "task": self.task.to_dict(),
            "judge_sees": self.judge_sees,
            "seed": self.opt.seed,
            "selection": self.opt.selection,
            "data": {
                "train_fingerprint": self._fingerprint(self.trainset),
                "val_fingerprint": self._fingerprint(self.valset),
                "n_train": len(self.trainset),
                "n_val": len(self.valset),
            },
            "models": {
                "verbalizer": lm_identity(self.verbalizer_lm),
                "judge": lm_identity(self.judge_lm),
                "proposer": lm_identity(self.proposer_lm),
            },
        }

    def _check_resume(self) -> None:
        if not self.opt.resume:
            return
        previous = json.loads(self.state_path.read_text(encoding="utf-8"))
        identity = self._identity()
        diffs = [key for key, value in identity.items() if previous.get("identity", {}).get(key) != value]
        if diffs:
            raise ResumeError(
                f"run directory '{self.run_dir.name}' was made with different {', '.join(diffs)}; "
                "resume with the same task, data, seed, selection and models, or start a new run directory"
            )
        self.replaying_from = len(previous.get("rounds", []))
        logger.info(
            "resuming: %d outer step(s) finished before; replaying them from the journal without LM calls",
            self.replaying_from,
        )

    # ------------------------------------------------------------------ persistence
    def _params(self) -> dict[str, Any]:
        params = {}
        for key, value in self.opt.get_params().items():
            if key in ("proposer_lm", "verbalizer_lm"):
                continue
            if key in ("run_dir", "cache_path") and value is not None:
                params[key] = Path(value).name  # never an absolute path of the user's machine
                continue
            if key == "study_storage" and value is not None:
                params[key] = str(value).split(":", 1)[0] + ":..."  # a server URL may hold credentials
                continue
            if isinstance(value, str | int | float | bool) or value is None:
                params[key] = value
            elif isinstance(value, Path):
                params[key] = value.name
            elif isinstance(value, Mapping):
                params[key] = dict(value)
            else:
                params[key] = getattr(value, "__name__", type(value).__name__)
        params["metric"] = self.metric_name
        return params

    def save_state(self, status: str, incumbent: Candidate, incumbent_score: float | None) -> None:
        if not self.persistent:
            return
        state = {
            "format": STATE_FORMAT,
            "status": status,
            "identity": self._identity(),
            "params": self._params(),
            "rng": {"scheme": "random.Random(f'{seed}:{outer_step}:{purpose}') per draw; no global RNG state"},
            "incumbent": {**asdict(incumbent), "val_score": incumbent_score},
            "rounds": self.rounds,
            "history": self.history,
            "usage": self.ledger.to_dict(),
            "versions": _versions(),
            "elapsed_seconds": round(time.time() - self.started, 3),
        }
        _atomic_write_json(self.state_path, state)

    # ------------------------------------------------------------------ scoring
    def corpus(self, examples: Sequence[dspy.Example], records: Sequence[JudgeRecord]) -> float:
        return self._metric_fn(self.task, examples, [r.label for r in records])

    def rng(self, step: int, purpose: str) -> random.Random:
        return random.Random(f"{self.opt.seed}:{step}:{purpose}")

    # ------------------------------------------------------------------ the loop
    def execute(self) -> dspy.Module:
        opt = self.opt
        seed_candidate = Candidate(self.student.verbalizer.instruction, self.student.judge.instruction)
        incumbent = seed_candidate
        incumbent_score: float | None = None
        seed_score: float | None = None
        best_val: float | None = None
        stop_reason = "outer_steps"
        self._log_preflight()
        if self.opt.allow_workers:  # create the study schema before state.json tells workers the run exists
            open_storage(self.study_storage)
        self.save_state("running", incumbent, None)
        bar = _progress(opt.progress, total=opt.outer_steps, desc="BLPO outer", position=0)
        try:
            val_records = self.predict_many(self.valset, incumbent)
            incumbent_score = seed_score = best_val = self.corpus(self.valset, val_records)
            logger.info("seed program: validation %s = %.4f", self.metric_name, seed_score)
            rounds_without_gain = 0
            for t in range(opt.outer_steps):
                outcome = self._outer_step(t, incumbent, incumbent_score)
                if outcome is None:
                    stop_reason = "no_errors"
                    break
                new_incumbent, new_score, improved = outcome
                incumbent, incumbent_score = new_incumbent, new_score
                if improved:
                    rounds_without_gain = 0
                else:
                    rounds_without_gain += 1
                best_val = incumbent_score if best_val is None else max(best_val, incumbent_score)
                self.save_state("running", incumbent, incumbent_score)
                bar.update(1)
                if opt.patience is not None and rounds_without_gain >= opt.patience:
                    stop_reason = "patience"
                    break
        except BudgetExhaustedError as exc:
            stop_reason = "budget"
            logger.warning("%s; stopping with the best program so far", exc)
        finally:
            bar.close()
        status = "finished" if stop_reason != "budget" else "budget_exhausted"
        self.save_state(status, incumbent, incumbent_score)
        return self._finish(incumbent, incumbent_score, seed_score, stop_reason)

    def _outer_step(
        self, t: int, incumbent: Candidate, incumbent_score: float | None
    ) -> tuple[Candidate, float, bool] | None:
        opt = self.opt
        train_records = self.predict_many(self.trainset, incumbent)
        golds = [e.label for e in self.trainset]
        wrong = [i for i, r in enumerate(train_records) if r.label != golds[i]]
        right = [i for i, r in enumerate(train_records) if r.label == golds[i]]
        train_score = self.corpus(self.trainset, train_records)
        logger.info("outer step %d: train %s = %.4f, %d errors", t, self.metric_name, train_score, len(wrong))
        if not wrong:
            logger.info("no errors left on the train split; stopping")
            return None
        rng = self.rng(t, "batches")
        error_idx = self.error_sampler.sample(
            wrong, [(golds[i], train_records[i].label) for i in wrong], opt.error_batch_size, rng
        )
        retain_idx: list[int] = []
        if opt.selection == "guarded" and opt.retain_batch_size:
            retain_idx = self.retain_sampler.sample(right, [golds[i] for i in right], opt.retain_batch_size, rng)
        error_examples = [self.trainset[i] for i in error_idx]
        retain_examples = [self.trainset[i] for i in retain_idx]
        error_records = [train_records[i] for i in error_idx]

        candidates: list[tuple[Candidate, float, dict[str, Any]]] = []
        q_history: list[tuple[str, float]] = []
        tried_p: list[str] = [incumbent.judge]
        n_inner = opt.inner_steps + 1 if opt.i2t_policy == "optimize" else 1
        inner_bar = _progress(opt.progress, total=n_inner, desc=f"  inner (outer {t})", position=1)
        try:
            for k in range(n_inner):
                entry = self._inner_step(
                    t, k, incumbent, q_history, tried_p, error_examples, error_records, retain_examples
                )
                inner_bar.update(1)
                if entry is None:
                    continue
                candidate, score, record = entry
                candidates.append((candidate, score, record))
        finally:
            inner_bar.close()

        if not candidates:
            logger.warning("outer step %d: no usable candidate (every proposal failed)", t)
            self.rounds.append({"outer_step": t, "accepted": None, "val_score": incumbent_score})
            return incumbent, float(incumbent_score or 0.0), False
        if opt.selection == "paper":
            return self._select_paper(t, incumbent, incumbent_score, candidates)
        return self._select_guarded(t, incumbent, incumbent_score, candidates)

    def _inner_step(
        self,
        t: int,
        k: int,
        incumbent: Candidate,
        q_history: list[tuple[str, float]],
        tried_p: list[str],
        error_examples: list[dspy.Example],
        error_records: list[JudgeRecord],
        retain_examples: list[dspy.Example],
    ) -> tuple[Candidate, float, dict[str, Any]] | None:
        opt = self.opt
        entry: dict[str, Any] = {
            "outer_step": t,
            "inner_step": k,
            "q": None,
            "p_prime": None,
            "inner_score": None,
            "fixed": None,
            "broken": None,
            "val_score": None,
            "pruned": None,
            "accepted": False,
            "error": None,
        }
        self.history.append(entry)
        if k == 0:
            q = incumbent.judge if opt.i2t_policy == "judge_prompt" else incumbent.verbalizer
        else:
            q = self.propose(
                "update_q",
                UpdateVerbalizerInstruction,
                task_description=task_description(self.task),
                judge_instruction=incumbent.judge,
                history=render_history(q_history),
            )
            if q is None:
                entry["error"] = "Update_q failed"
                return None
        entry["q"] = q
        errors_verbalized = self.submit(lambda example: self.verbalize(example, q), error_examples)
        # p' will be judged on the retain batch under q too: in text modes, queue its verbalizations behind the
        # errors' so they fill idle threads and run while Update_p (a serial call) is made
        retain_verbalized = None
        if self.judge_sees in ("text", "both") and retain_examples:
            retain_verbalized = self.submit(lambda example: self.verbalize(example, q), retain_examples)
        try:
            verbalized = errors_verbalized()
        except BaseException:
            if retain_verbalized is not None:
                retain_verbalized()
            raise
        cases = []
        for example, record, descriptions in zip(error_examples, error_records, verbalized, strict=True):
            if not isinstance(descriptions, dict):
                continue
            cases.append(
                ErrorCase(
                    text_fields={name: str(example.get(name, "")) for name in self.task.text_fields},
                    descriptions=descriptions,
                    gold=example.label,
                    predicted=record.label,
                    rationale=record.rationale,
                )
            )
        if not cases:
            entry["error"] = "every verbalization failed"
            q_history.append((q, 0.0))
            if retain_verbalized is not None:
                retain_verbalized()
            return None
        try:
            p_prime = self.propose(
                "update_p",
                UpdateJudgeInstruction,
                task_description=task_description(self.task),
                current_instruction=incumbent.judge,
                errors=render_errors(cases),
                tried_instructions=render_tried(tried_p),
            )
        finally:
            if retain_verbalized is not None:
                retain_verbalized()  # re-raises BudgetExhaustedError
        if p_prime is None:
            entry["error"] = "Update_p failed"
            q_history.append((q, 0.0))
            return None
        entry["p_prime"] = p_prime
        tried_p.append(p_prime)
        candidate = Candidate(verbalizer=q, judge=p_prime)
        batch = error_examples + retain_examples
        records = self.predict_many(batch, candidate)
        fixed = sum(r.label == e.label for e, r in zip(error_examples, records[: len(error_examples)], strict=True))
        broken = sum(r.label != e.label for e, r in zip(retain_examples, records[len(error_examples) :], strict=True))
        penalty = broken if opt.selection == "guarded" else 0
        score = (fixed - penalty) / len(error_examples)
        entry.update(fixed=fixed, broken=broken, inner_score=score)
        q_history.append((q, score))
        logger.info(
            "  inner %d.%d: score %.2f (fixed %d/%d, broke %d/%d)",
            t,
            k,
            score,
            fixed,
            len(error_examples),
            broken,
            len(retain_examples),
        )
        return candidate, score, entry

    def _select_paper(
        self,
        t: int,
        incumbent: Candidate,
        incumbent_score: float | None,
        candidates: list[tuple[Candidate, float, dict[str, Any]]],
    ) -> tuple[Candidate, float, bool]:
        best, _, record = max(candidates, key=lambda item: item[1])  # first of equal scores wins
        score = self.corpus(self.valset, self.predict_many(self.valset, best))
        record.update(val_score=score, accepted=True)
        self.rounds.append({"outer_step": t, "accepted": best.id, "val_score": score})
        improved = incumbent_score is None or score > incumbent_score
        return best, score, improved

    def _select_guarded(
        self,
        t: int,
        incumbent: Candidate,
        incumbent_score: float | None,
        candidates: list[tuple[Candidate, float, dict[str, Any]]],
    ) -> tuple[Candidate, float, bool]:
        order = list(range(len(self.valset)))
        self.rng(t, "validation-order").shuffle(order)
        permuted = [self.valset[i] for i in order]
        sizes = rung_sizes(len(permuted), self.opt.n_rungs)
        incumbent_records = self.predict_many(permuted, incumbent)
        incumbent_rungs = [self.corpus(permuted[:m], incumbent_records[:m]) for m in sizes]
        by_id: dict[str, tuple[Candidate, float, dict[str, Any]]] = {}
        for item in candidates:
            if item[0].id != incumbent.id and item[0].id not in by_id:
                by_id[item[0].id] = item
        if not by_id:
            self.rounds.append({"outer_step": t, "accepted": None, "val_score": incumbent_score})
            return incumbent, float(incumbent_rungs[-1]), False
        ordered = sorted(by_id, key=lambda cid: -by_id[cid][1])  # best inner score first; ties keep proposal order
        prefix_records: dict[str, list[JudgeRecord]] = {cid: [] for cid in by_id}

        def score_rung(cids: Sequence[str], start: int, stop: int) -> dict[str, float]:
            items = [(cid, example) for cid in cids for example in permuted[start:stop]]
            results = iter(self.parallel(lambda item: self.predict(item[1], by_id[item[0]][0]), items))
            for cid in cids:
                prefix_records[cid][start:] = [as_record(next(results)) for _ in range(start, stop)]
            return {cid: self.corpus(permuted[:stop], prefix_records[cid]) for cid in cids}

        selector = OptunaSelector(
            storage=self.study_storage,
            study_prefix="blpo",
            seed=self.opt.seed,
            pruner_factory=self.opt.pruner,
            trials_per_round=self.opt.trials_per_round,
            shared=self.opt.allow_workers,
            worker_timeout=self.opt.worker_timeout,
        )
        round_info = {
            "metric": self.metric_name,
            "judge_sees": self.judge_sees,
            "task": self.task.name,
            "val_keys": [content_key(self.example_key(example), str(example.label)) for example in permuted],
            "candidates": {cid: asdict(item[0]) for cid, item in by_id.items()},
        }
        outcome, study = selector.select(t, ordered, incumbent_rungs, sizes, score_rung, round_info)
        self.studies.append(study)
        for cid, (_, _, record) in by_id.items():
            record["pruned"] = cid in outcome.pruned
            record["val_score"] = outcome.full_scores.get(cid)
        reference = incumbent_rungs[-1]
        ranked = sorted(
            ((score, by_id[cid][1], cid) for cid, score in outcome.full_scores.items() if cid != INCUMBENT_ID),
            reverse=True,
        )
        # accept the best candidate if it does not lower the validation score; on a tie only if it fixed a net
        # positive share of its error batch (otherwise a tie is noise and the incumbent stays)
        acceptable = [item for item in ranked if item[0] > reference or (item[0] == reference and item[1] > 0)]
        if acceptable:
            score, _, cid = acceptable[0]
            chosen, _, record = by_id[cid]
            record["accepted"] = True
            self.rounds.append(
                {"outer_step": t, "accepted": cid, "val_score": score, "trials": [asdict(tr) for tr in outcome.trials]}
            )
            logger.info("outer step %d: accepted candidate %s (validation %.4f >= %.4f)", t, cid, score, reference)
            return chosen, score, score > reference
        self.rounds.append(
            {"outer_step": t, "accepted": None, "val_score": reference, "trials": [asdict(tr) for tr in outcome.trials]}
        )
        logger.info("outer step %d: kept the incumbent (validation %.4f)", t, reference)
        return incumbent, reference, False

    # ------------------------------------------------------------------ results
    def _log_preflight(self) -> None:
        opt = self.opt
        n_img = len(self.task.image_fields)
        text_mode = self.judge_sees in ("text", "both")
        inner = opt.inner_steps + 1
        batch = opt.error_batch_size + (opt.retain_batch_size if opt.selection == "guarded" else 0)
        judge = len(self.valset) + opt.outer_steps * (len(self.trainset) + inner * batch + inner * len(self.valset))
        verbal = opt.outer_steps * inner * opt.error_batch_size * n_img
        if text_mode:
            verbal += judge * n_img
        proposer = opt.outer_steps * (2 * inner - 1)
        logger.info(
            "pre-flight upper bound on LM calls (before caching): judge %d, verbalizer %d, proposer %d, total %d%s",
            judge,
            verbal,
            proposer,
            judge + verbal + proposer,
            f"; budget {normalise_caps(opt.max_calls)}" if opt.max_calls is not None else "",
        )

    def _finish(
        self, incumbent: Candidate, score: float | None, seed_score: float | None, stop_reason: str
    ) -> dspy.Module:
        program = self.student.deepcopy()
        program.verbalizer.set_instruction(incumbent.verbalizer)
        program.judge.set_instruction(incumbent.judge)
        program.best_instructions_ = {"verbalizer": incumbent.verbalizer, "judge": incumbent.judge}
        program.best_score_ = score
        program.seed_score_ = seed_score
        program.metric_name_ = self.metric_name
        program.history_ = [dict(entry) for entry in self.history]
        program.rounds_ = [dict(r) for r in self.rounds]
        program.studies_ = list(self.studies)
        program.study_ = self.studies[-1] if self.studies else None
        program.usage_ = {
            **self.ledger.to_dict(),
            "verbalization_cache": {"hits": self.vcache.hits, "misses": self.vcache.misses},
        }
        program.stop_reason_ = stop_reason
        program.run_dir_ = str(self.run_dir) if self.persistent else None
        program._compiled = True
        if self.persistent:
            from blpo_dspy.persistence import save_program

            save_program(program, self.run_dir / "program.json")
        logger.info(
            "BLPO finished (%s): validation %s %.4f -> %.4f; LM calls %s",
            stop_reason,
            self.metric_name,
            seed_score or 0.0,
            score or 0.0,
            {role: usage["calls"] for role, usage in self.ledger.to_dict().items()},
        )
        return program


def _progress(enabled: bool, **kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, leave=False, **kwargs)
