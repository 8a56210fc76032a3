"""Optuna ask-and-tell selection among a round's candidates and the incumbent, with multi-fidelity pruning.

Each outer round gets its own study (``<prefix>-round-<t>``) in the run's storage, with one categorical parameter:
which candidate a trial evaluates. The incumbent enters as a finished trial with its scores at every rung, so the
pruner compares every candidate against it. The round's candidates are enqueued best inner score first and asked
together; the trials then climb the rungs (growing prefixes of a seeded permutation of the validation split) in
step: at each rung every surviving candidate is scored in one parallel batch, reported, and the pruner
(successive halving by default) stops the weak ones. Scoring all survivors of a rung at once keeps the LM threads
busy and makes the pruning order, hence the round, deterministic.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from blpo_dspy.cache import SQLITE_TIMEOUT_S

if TYPE_CHECKING:
    import optuna

logger = logging.getLogger(__name__)

PARAM = "candidate"
INCUMBENT_ID = "incumbent"
ROUND_ATTR = "blpo_round"  # study user attribute: what a selection worker needs to evaluate the round's trials


def import_optuna() -> Any:
    """Import optuna lazily with an actionable error."""
    try:
        import optuna
    except ModuleNotFoundError as exc:  # pragma: no cover - optuna is a core dependency
        if exc.name == "optuna":
            raise ImportError("BLPO's selection needs 'optuna'. Install it with `pip install optuna`.") from exc
        raise
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


_STORAGES: collections.OrderedDict[str, tuple[Any, tuple[int, int] | None]] = collections.OrderedDict()
_STORAGES_LOCK = threading.Lock()
MAX_OPEN_STORAGES = 8


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """One Optuna storage object per URL and process (the last ``MAX_OPEN_STORAGES`` URLs are kept open).

    Building an ``RDBStorage`` runs schema checks against the database; doing it once per process (rather than on
    every ``load_study(storage=url)``) keeps processes that share a SQLite file from racing on them. SQLite
    connections wait up to ``SQLITE_TIMEOUT_S`` for a lock instead of failing with "database is locked". A storage
    pushed out of the cache has its connection pool closed (it reconnects if still used), so a process running many
    compiles does not keep a pool per run directory. A SQLite file deleted or replaced since it was opened (a run
    directory removed and made again) gets a new storage: the cached one's pooled connections still hold the old file.
    """
    optuna = import_optuna()
    with _STORAGES_LOCK:
        if url in _STORAGES:
            storage, opened = _STORAGES[url]
            if opened == _sqlite_file(url):
                _STORAGES.move_to_end(url)
                return storage
            del _STORAGES[url]
            _dispose(storage)
        if url.startswith("sqlite:"):
            with _storage_lock(url):  # processes opening one new file at once would race on creating its schema
                storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": SQLITE_TIMEOUT_S}})
        else:
            storage = optuna.storages.get_storage(url)
        _STORAGES[url] = (storage, _sqlite_file(url))
        while len(_STORAGES) > MAX_OPEN_STORAGES:
            _, (old, _) = _STORAGES.popitem(last=False)
            _dispose(old)
        return storage


def _sqlite_database(url: str | None) -> str | None:
    """The database file of a SQLite URL; ``None`` for other URLs and in-memory databases."""
    if not url or not url.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url  # optuna's own dependency

    database = make_url(url).database
    return None if not database or database == ":memory:" else database


def _sqlite_file(url: str) -> tuple[int, int] | None:
    """(device, inode) of a SQLite URL's database file; ``None`` for other URLs, in-memory databases or no file."""
    database = _sqlite_database(url)
    if database is None:
        return None
    try:
        stat = os.stat(database)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _dispose(storage: Any) -> None:
    engine = getattr(storage, "engine", None)
    if engine is not None:
        engine.dispose()


def rung_sizes(n: int, n_rungs: int) -> list[int]:
    """Prefix sizes that double up to ``n``: e.g. n=20, 3 rungs -> [5, 10, 20]."""
    if n <= 0:
        return []
    first = max(1, math.ceil(n / 2 ** (n_rungs - 1)))
    sizes = sorted({min(n, first * 2**r) for r in range(n_rungs)})
    if sizes[-1] != n:
        sizes.append(n)
    return sizes


@dataclass
class TrialRecord:
    """What one trial did.

    Attributes:
        number: Optuna trial number.
        candidate: Candidate id evaluated.
        rung_scores: Corpus metric at each rung reached.
        pruned: Whether the pruner stopped it.
    """

    number: int
    candidate: str
    rung_scores: list[float]
    pruned: bool


@dataclass
class SelectionOutcome:
    """Result of one round's selection.

    Attributes:
        full_scores: Candidate id -> full-validation score, for candidates that survived every rung.
        pruned: Candidate ids stopped by the pruner.
        trials: Every trial, in order.
        study_name: The study holding the round.
    """

    full_scores: dict[str, float] = field(default_factory=dict)
    pruned: set[str] = field(default_factory=set)
    trials: list[TrialRecord] = field(default_factory=list)
    study_name: str = ""


class OptunaSelector:
    """Ask-and-tell selection over candidates with growing validation minibatches.

    Args:
        storage: Optuna storage URL (``sqlite:///RUN_DIR/study.db``, or ``postgresql://...`` for workers on many
            machines) or ``None`` for in-memory.
        study_prefix: Prefix of the per-round study names.
        seed: Base seed; round ``t`` uses ``seed * 1000 + t`` for its sampler.
        pruner_factory: Builds the pruner given the first rung size; defaults to successive halving (eta=2).
        trials_per_round: Most candidates evaluated per round (the best inner scores); ``None`` evaluates them all.
        shared: Leave the round's trials in the study for selection workers (other processes, see
            :mod:`blpo_dspy.teleprompt.workers`) to claim, claim them too, and decide once every trial finished.
            Trials then climb the rungs one at a time, so pruning depends on who finishes first.
        worker_timeout: In shared mode, seconds to wait for a trial a worker claimed before failing it and
            evaluating its candidate here.
        poll_interval: In shared mode, seconds between looks at the storage while workers finish.
    """

    def __init__(
        self,
        storage: str | None,
        study_prefix: str,
        seed: int,
        pruner_factory: Callable[[int], optuna.pruners.BasePruner] | None = None,
        trials_per_round: int | None = None,
        *,
        shared: bool = False,
        worker_timeout: float = 300.0,
        poll_interval: float = 0.2,
    ) -> None:
        if shared and storage is None:
            raise ValueError("shared selection needs a persistent Optuna storage (workers reach the study through it)")
        self.storage = storage
        self.study_prefix = study_prefix
        self.seed = seed
        self.pruner_factory = pruner_factory
        self.trials_per_round = trials_per_round
        self.shared = shared
        self.worker_timeout = worker_timeout
        self.poll_interval = poll_interval

    def study_name(self, round_index: int) -> str:
        """The study name of one round."""
        return f"{self.study_prefix}-round-{round_index}"

    def select(
        self,
        round_index: int,
        candidate_ids: Sequence[str],
        incumbent_rung_scores: Sequence[float],
        sizes: Sequence[int],
        score_rung: Callable[[Sequence[str], int, int], Mapping[str, float]],
        round_info: Mapping[str, Any] | None = None,
    ) -> tuple[SelectionOutcome, optuna.Study]:
        """Run one round of successive halving over the round's candidates.

        Every candidate is enqueued (the round's search space is the finite candidate set, so there is nothing for a
        sampler to guess). By default they are asked at once and climb the rungs in step: each rung evaluates all
        surviving candidates in one batch, reports their scores, then asks the pruner about each in candidate order,
        so the round is deterministic for a given order and scores, which a resumed run needs to replay it from the
        journal. In shared mode the trials wait in the study for whoever claims them first.

        Args:
            round_index: Outer step index (names the study and seeds the sampler).
            candidate_ids: Ids of the round's new candidates, best first (the incumbent is added automatically);
                at most ``trials_per_round`` of them are evaluated.
            incumbent_rung_scores: The incumbent's corpus metric at each rung size.
            sizes: Rung sizes (prefix lengths of the permuted validation split).
            score_rung: ``(candidate_ids, start, stop) -> {candidate_id: corpus metric on the first stop examples}``;
                it only needs to run examples ``start:stop`` (earlier ones were scored at the previous rung). May
                raise ``BudgetExhaustedError``, which marks the running trials failed and propagates.
            round_info: JSON-safe facts a worker needs (stored as the study's ``blpo_round`` user attribute), with
                ``candidates``: ``{candidate_id: {...}}`` whose entries become the trials' user attributes.

        Returns:
            The outcome and the study.
        """
        optuna = import_optuna()
        name = self.study_name(round_index)
        storage = open_storage(self.storage) if self.storage is not None else None
        if storage is not None:
            try:  # a resumed run replays the round from the journal
                optuna.delete_study(study_name=name, storage=storage)
            except KeyError:
                pass
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            direction="maximize",
            sampler=optuna.samplers.TPESampler(seed=self.seed * 1000 + round_index),
            pruner=make_pruner(self.pruner_factory, sizes[0]),
        )
        chosen = list(dict.fromkeys(candidate_ids))[: self.trials_per_round or None]
        distribution = optuna.distributions.CategoricalDistribution([INCUMBENT_ID, *chosen])
        study.add_trial(
            optuna.trial.create_trial(
                params={PARAM: INCUMBENT_ID},
                distributions={PARAM: distribution},
                value=incumbent_rung_scores[-1],
                intermediate_values=dict(zip(sizes, incumbent_rung_scores, strict=True)),
                system_attrs={f"completed_rung_{i}": v for i, v in enumerate(incumbent_rung_scores)},
                user_attrs={"candidate": INCUMBENT_ID},
            )
        )
        info = dict(round_info or {})
        payloads = dict(info.pop("candidates", {}) or {})
        if self.shared:
            study.set_user_attr(ROUND_ATTR, {**info, "sizes": list(sizes), "open": True})
        for cid in chosen:
            study.enqueue_trial({PARAM: cid}, user_attrs={**payloads.get(cid, {}), "candidate": cid})
        try:
            if self.shared:
                self._run_shared(study, chosen, sizes, score_rung)
            else:
                self._run_in_step(study, chosen, distribution, sizes, score_rung)
        finally:
            if self.shared:
                study.set_user_attr(ROUND_ATTR, {**info, "sizes": list(sizes), "open": False})
        outcome = outcome_of(study, sizes)
        logger.info(
            "round %d selection: %d trials, %d candidates fully evaluated, %d pruned",
            round_index,
            len(outcome.trials),
            len(outcome.full_scores) - 1,
            len(outcome.pruned),
        )
        return outcome, study

    def _run_in_step(
        self,
        study: optuna.Study,
        chosen: Sequence[str],
        distribution: optuna.distributions.CategoricalDistribution,
        sizes: Sequence[int],
        score_rung: Callable[[Sequence[str], int, int], Mapping[str, float]],
    ) -> None:
        optuna = import_optuna()
        alive = [study.ask({PARAM: distribution}) for _ in chosen]
        last: dict[int, float] = {}
        start = 0
        try:
            for size in sizes:
                scores = score_rung([trial.params[PARAM] for trial in alive], start, size)
                for trial in alive:
                    last[trial.number] = float(scores[trial.params[PARAM]])
                    trial.report(last[trial.number], step=size)
                start = size
                if size == sizes[-1]:
                    break
                survivors = []
                for trial in alive:
                    if trial.should_prune():
                        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                    else:
                        survivors.append(trial)
                alive = survivors
                if not alive:
                    break
        except BaseException:
            for trial in alive:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        for trial in alive:
            study.tell(trial, last[trial.number])

    def _run_shared(
        self,
        study: optuna.Study,
        chosen: Sequence[str],
        sizes: Sequence[int],
        score_rung: Callable[[Sequence[str], int, int], Mapping[str, float]],
    ) -> None:
        optuna = import_optuna()
        waited_since = time.monotonic()
        while True:
            trial = claim_waiting_trial(study, worker="leader", storage_url=self.storage)
            if trial is not None:
                climb(study, trial, sizes, lambda cid, start, stop: score_rung([cid], start, stop)[cid])
                waited_since = time.monotonic()
                continue
            running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if not running:
                break
            if time.monotonic() - waited_since > self.worker_timeout:
                for stale in running:  # a worker died or stalled: take its candidate back
                    logger.warning("selection trial %d timed out at its worker; evaluating it here", stale.number)
                    study.tell(stale.number, state=optuna.trial.TrialState.FAIL)
                    study.enqueue_trial({PARAM: stale.params[PARAM]}, user_attrs=dict(stale.user_attrs))
                continue
            time.sleep(self.poll_interval)


def make_pruner(
    factory: Callable[[int], optuna.pruners.BasePruner] | None, first_rung: int
) -> optuna.pruners.BasePruner:
    """The round's pruner: ``factory(first_rung)``, or successive halving from the first rung with eta=2."""
    optuna = import_optuna()
    if factory is not None:
        return factory(first_rung)
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=first_rung, reduction_factor=2)


def claim_waiting_trial(study: optuna.Study, *, worker: str, storage_url: str | None = None) -> optuna.Trial | None:
    """Claim one enqueued trial of a study, or ``None`` if none is waiting.

    Unlike ``study.ask()``, this never creates a sampled trial when the queue is empty, so several processes can
    drain one queue. The claim is a compare-and-set (WAITING -> RUNNING) in the storage; for SQLite, whose Python
    driver does not hold a lock between the read and the write, claims are serialised with a lock file beside the
    database. The claiming process is recorded in the ``worker`` user attribute.

    Args:
        study: The round's study.
        worker: Name recorded on the claimed trial.
        storage_url: The study's storage URL (selects the SQLite lock file).
    """
    optuna = import_optuna()
    with _storage_lock(storage_url):
        trials = study.get_trials(deepcopy=False)
        choices = next((t.distributions[PARAM].choices for t in trials if PARAM in t.distributions), None)
        for frozen in trials:
            if frozen.state != optuna.trial.TrialState.WAITING:
                continue
            if study._storage.set_trial_state_values(frozen._trial_id, state=optuna.trial.TrialState.RUNNING):
                trial = optuna.trial.Trial(study, frozen._trial_id)
                if choices is not None:
                    trial.suggest_categorical(PARAM, choices)  # an enqueued trial gets its fixed value
                trial.set_user_attr("worker", worker)
                return trial
    return None


@contextlib.contextmanager
def _storage_lock(storage_url: str | None) -> Iterator[None]:
    """Serialise, across processes, what SQLite's Python driver leaves open to races: a trial claim's read and write,
    and the creation of a new database's schema (Optuna creates its tables and stamps their version unguarded). A
    no-op for in-memory databases (one process) and server databases: their row locks make a claim atomic, and a
    compile with workers creates the schema before its ``state.json`` lets a worker in."""
    database = _sqlite_database(storage_url)
    if database is None or not os.path.isdir(os.path.dirname(os.path.abspath(database))):
        yield  # no file to share (a missing folder fails in Optuna with its own error)
        return
    with open(database + ".claim-lock", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def climb(
    study: optuna.Study, trial: optuna.Trial, sizes: Sequence[int], score: Callable[[str, int, int], float]
) -> None:
    """Evaluate one claimed trial rung by rung, asking the pruner after each, and tell the study the outcome.

    Args:
        study: The round's study.
        trial: A claimed trial (its ``candidate`` parameter names what to evaluate).
        sizes: Rung sizes.
        score: ``(candidate_id, start, stop) -> corpus metric on the first stop examples``.
    """
    optuna = import_optuna()
    cid = trial.user_attrs["candidate"]
    value = math.nan
    start = 0
    try:
        for size in sizes:
            value = float(score(cid, start, size))
            trial.report(value, step=size)
            start = size
            if size != sizes[-1] and trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                return
    except BaseException:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    study.tell(trial, value)


def outcome_of(study: optuna.Study, sizes: Sequence[int]) -> SelectionOutcome:
    """Read a finished round from its study: full scores of completed candidates, pruned ones, every trial."""
    optuna = import_optuna()
    outcome = SelectionOutcome(study_name=study.study_name)
    for trial in study.get_trials(deepcopy=False):
        cid = trial.user_attrs.get("candidate", trial.params.get(PARAM))
        rungs = [trial.intermediate_values[size] for size in sizes if size in trial.intermediate_values]
        if cid == INCUMBENT_ID:
            outcome.full_scores[INCUMBENT_ID] = float(trial.value)
            continue
        if trial.state == optuna.trial.TrialState.COMPLETE:
            outcome.full_scores[cid] = float(trial.value)
        elif trial.state == optuna.trial.TrialState.PRUNED:
            outcome.pruned.add(cid)
        else:
            continue
        outcome.trials.append(TrialRecord(trial.number, cid, rungs, trial.state == optuna.trial.TrialState.PRUNED))
    return outcome
