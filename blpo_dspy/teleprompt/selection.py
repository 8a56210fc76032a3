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

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

logger = logging.getLogger(__name__)

PARAM = "candidate"
INCUMBENT_ID = "incumbent"


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
        storage: Optuna storage URL (``sqlite:///RUN_DIR/study.db``) or ``None`` for in-memory.
        study_prefix: Prefix of the per-round study names.
        seed: Base seed; round ``t`` uses ``seed * 1000 + t`` for its sampler.
        pruner_factory: Builds the pruner given the first rung size; defaults to successive halving (eta=2).
        trials_per_round: Most candidates evaluated per round (the best inner scores); ``None`` evaluates them all.
    """

    def __init__(
        self,
        storage: str | None,
        study_prefix: str,
        seed: int,
        pruner_factory: Callable[[int], optuna.pruners.BasePruner] | None = None,
        trials_per_round: int | None = None,
    ) -> None:
        self.storage = storage
        self.study_prefix = study_prefix
        self.seed = seed
        self.pruner_factory = pruner_factory
        self.trials_per_round = trials_per_round

    def _pruner(self, first_rung: int) -> optuna.pruners.BasePruner:
        optuna = import_optuna()
        if self.pruner_factory is not None:
            return self.pruner_factory(first_rung)
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first_rung, reduction_factor=2)

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
    ) -> tuple[SelectionOutcome, optuna.Study]:
        """Run one round: synchronous successive halving over the round's candidates.

        Every candidate is enqueued (the round's search space is the finite candidate set, so there is nothing for a
        sampler to guess) and asked at once; each rung evaluates all surviving candidates in one batch, reports
        their scores, then asks the pruner about each in candidate order. The outcome is therefore deterministic for
        a given order and scores, which a resumed run needs to replay the round from the journal.

        Args:
            round_index: Outer step index (names the study and seeds the sampler).
            candidate_ids: Ids of the round's new candidates, best first (the incumbent is added automatically);
                at most ``trials_per_round`` of them are evaluated.
            incumbent_rung_scores: The incumbent's corpus metric at each rung size.
            sizes: Rung sizes (prefix lengths of the permuted validation split).
            score_rung: ``(candidate_ids, start, stop) -> {candidate_id: corpus metric on the first stop examples}``;
                it only needs to run examples ``start:stop`` (earlier ones were scored at the previous rung). May
                raise ``BudgetExhaustedError``, which marks the running trials failed and propagates.

        Returns:
            The outcome and the study.
        """
        optuna = import_optuna()
        name = self.study_name(round_index)
        if self.storage is not None:
            try:  # a resumed run replays the round deterministically from the journal
                optuna.delete_study(study_name=name, storage=self.storage)
            except KeyError:
                pass
        study = optuna.create_study(
            study_name=name,
            storage=self.storage,
            direction="maximize",
            sampler=optuna.samplers.TPESampler(seed=self.seed * 1000 + round_index),
            pruner=self._pruner(sizes[0]),
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
        outcome = SelectionOutcome(study_name=name)
        outcome.full_scores[INCUMBENT_ID] = incumbent_rung_scores[-1]
        for cid in chosen:
            study.enqueue_trial({PARAM: cid}, user_attrs={"candidate": cid})
        trials = [study.ask({PARAM: distribution}) for _ in chosen]
        records = {trial.number: TrialRecord(trial.number, trial.params[PARAM], [], pruned=False) for trial in trials}
        alive = list(trials)
        start = 0
        try:
            for size in sizes:
                scores = score_rung([trial.params[PARAM] for trial in alive], start, size)
                for trial in alive:
                    value = float(scores[trial.params[PARAM]])
                    records[trial.number].rung_scores.append(value)
                    trial.report(value, step=size)
                start = size
                if size == sizes[-1]:
                    break
                survivors = []
                for trial in alive:
                    if trial.should_prune():
                        records[trial.number].pruned = True
                        outcome.pruned.add(trial.params[PARAM])
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
            record = records[trial.number]
            outcome.full_scores[record.candidate] = record.rung_scores[-1]
            study.tell(trial, record.rung_scores[-1])
        outcome.trials = [records[trial.number] for trial in trials]
        logger.info(
            "round %d selection: %d trials, %d candidates fully evaluated, %d pruned",
            round_index,
            len(outcome.trials),
            len(outcome.full_scores) - 1,
            len(outcome.pruned),
        )
        return outcome, study
