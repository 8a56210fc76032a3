"""Optuna ask-and-tell selection among a round's candidates and the incumbent, with multi-fidelity pruning.

Each outer round gets its own study (``<prefix>-round-<t>``) in the run's storage, with one categorical parameter:
which candidate to evaluate. The incumbent enters as a finished trial with its scores at every rung, so the pruner
compares every candidate against it. The candidate with the best inner score is enqueued first; a seeded
``TPESampler`` then picks the rest. A trial evaluates its candidate on growing prefixes of a seeded permutation of
the validation split (the rungs), reporting the corpus metric at each rung and stopping when the pruner says so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
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
        duplicate: The sampler picked an already-evaluated candidate (no LM calls made).
    """

    number: int
    candidate: str
    rung_scores: list[float]
    pruned: bool
    duplicate: bool = False


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
        trials_per_round: Asks per round; defaults to twice the number of candidates (a round ends early once every
            candidate was evaluated; picking an evaluated candidate again costs no LM call).
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
        first_pick: str | None,
        incumbent_rung_scores: Sequence[float],
        sizes: Sequence[int],
        score_prefix: Callable[[str, int], float],
    ) -> tuple[SelectionOutcome, optuna.Study]:
        """Run one round.

        Args:
            round_index: Outer step index (names the study and seeds the sampler).
            candidate_ids: Ids of the round's new candidates (the incumbent is added automatically).
            first_pick: Candidate enqueued first (e.g. the best inner score), or ``None``.
            incumbent_rung_scores: The incumbent's corpus metric at each rung size.
            sizes: Rung sizes (prefix lengths of the permuted validation split).
            score_prefix: ``(candidate_id, m) -> corpus metric on the first m validation examples``; may raise
                ``BudgetExhaustedError``, which marks the running trial failed and propagates.

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
            sampler=optuna.samplers.TPESampler(seed=self.seed * 1000 + round_index, n_startup_trials=3),
            pruner=self._pruner(sizes[0]),
        )
        choices = [INCUMBENT_ID, *candidate_ids]
        distribution = optuna.distributions.CategoricalDistribution(choices)
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
        if first_pick is not None:
            study.enqueue_trial({PARAM: first_pick})
        evaluated: dict[str, TrialRecord] = {}
        n_trials = self.trials_per_round or 2 * len(candidate_ids)
        for _ in range(n_trials):
            if all(cid in evaluated for cid in candidate_ids):
                break
            trial = study.ask({PARAM: distribution})
            cid = trial.params[PARAM]
            trial.set_user_attr("candidate", cid)
            if cid == INCUMBENT_ID or cid in evaluated:
                previous = evaluated.get(cid)
                if previous is not None and previous.pruned:
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                else:
                    study.tell(trial, outcome.full_scores[cid])
                outcome.trials.append(
                    TrialRecord(
                        trial.number,
                        cid,
                        list(previous.rung_scores if previous else []),
                        bool(previous and previous.pruned),
                        duplicate=True,
                    )
                )
                continue
            record = TrialRecord(trial.number, cid, [], pruned=False)
            try:
                for size in sizes:
                    value = score_prefix(cid, size)
                    record.rung_scores.append(value)
                    trial.report(value, step=size)
                    if size != sizes[-1] and trial.should_prune():
                        record.pruned = True
                        break
            except BaseException:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise
            evaluated[cid] = record
            outcome.trials.append(record)
            if record.pruned:
                outcome.pruned.add(cid)
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                outcome.full_scores[cid] = record.rung_scores[-1]
                study.tell(trial, record.rung_scores[-1])
        logger.info(
            "round %d selection: %d trials, %d candidates fully evaluated, %d pruned",
            round_index,
            len(outcome.trials),
            len(outcome.full_scores) - 1,
            len(outcome.pruned),
        )
        return outcome, study
