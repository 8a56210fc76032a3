"""Selection workers: other processes that evaluate a compile's validation trials through the shared Optuna study.

A compile started with ``BLPO(..., allow_workers=True)`` (CLI: ``blpo compile --allow-workers``) leaves each round's
candidate trials waiting in its study (``blpo-round-<t>`` in the study storage). A :class:`SelectionWorker` (CLI:
``blpo worker RUN_DIR --data ...``) loads the same data and LMs, claims waiting trials atomically through the storage,
climbs their rungs with the pruner, and tells the study; the compile claims trials too and decides each round once
every trial finished. Workers share the run directory's journal, so the compile replays what a worker computed
instead of paying for it again.

One machine: the default ``sqlite:///RUN_DIR/study.db`` is enough (SQLite in WAL mode serialises the writers).
Many machines: put the study in a server database (``BLPO(study_storage="postgresql://...")`` and
``SelectionWorker(storage=...)``) and the run directory on a shared filesystem.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dspy

from blpo_dspy.budget import UsageLedger
from blpo_dspy.cache import content_key, lm_identity
from blpo_dspy.metrics import corpus_value
from blpo_dspy.teleprompt.calls import Candidate, JudgeRecord, ProgramCalls, program_setup
from blpo_dspy.teleprompt.selection import (
    PARAM,
    ROUND_ATTR,
    claim_waiting_trial,
    climb,
    import_optuna,
    make_pruner,
    open_storage,
)

if TYPE_CHECKING:
    import optuna

logger = logging.getLogger(__name__)

DONE_STATUSES = ("finished", "budget_exhausted")


class WorkerError(RuntimeError):
    """A worker cannot serve a run (other task, models or data than the compile's)."""


@dataclass
class WorkerReport:
    """What a worker did.

    Attributes:
        trials: ``(study name, trial number, candidate id, state)`` of every trial it evaluated.
        usage: Its LM calls per role (``UsageLedger.to_dict()``).
        stop_reason: ``"run_finished"`` or ``"idle"``.
    """

    trials: list[tuple[str, int, str, str]] = field(default_factory=list)
    usage: dict[str, Any] = field(default_factory=dict)
    stop_reason: str = ""


class SelectionWorker:
    """Claims and evaluates the validation trials of a compile's selection rounds.

    Args:
        run_dir: The compile's run directory (its ``state.json``, journal and default study storage).
        program: An ``ImageJudge`` with the same task, ``judge_sees`` and LMs as the compile's student.
        examples: Examples holding the compile's validation split (e.g. the whole loaded dataset); they are matched
            to the round's validation order by content.
        storage: Optuna storage URL of the compile's studies; defaults to ``sqlite:///RUN_DIR/study.db``.
        cache_path: Verbalization cache, if the compile used a shared one; defaults to ``RUN_DIR/cache.sqlite``.
        num_threads: Parallel LM calls per rung.
        pruner: The compile's pruner factory, if it used a custom one.
        poll_interval: Seconds between looks at the storage when no trial waits.
        idle_timeout: Stop after this many seconds without a trial to evaluate.
        name: Worker name recorded on the trials it claims (e.g. a machine name); defaults to ``worker-<pid>``.
    """

    def __init__(
        self,
        run_dir: str | Path,
        program: dspy.Module,
        examples: Sequence[dspy.Example],
        *,
        storage: str | None = None,
        cache_path: str | Path | None = None,
        num_threads: int = 8,
        pruner: Any = None,
        poll_interval: float = 0.5,
        idle_timeout: float = 600.0,
        name: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.storage = storage or f"sqlite:///{self.run_dir / 'study.db'}"
        self.poll_interval = poll_interval
        self.idle_timeout = idle_timeout
        self.pruner = pruner
        self.name = name or f"worker-{os.getpid()}"
        self.calls = ProgramCalls(
            **program_setup(program, self.run_dir, cache_path=cache_path),
            proposer_lm=None,
            ledger=UsageLedger(None),
            num_threads=num_threads,
        )
        self._by_key = {content_key(self.calls.example_key(e), str(e.label)): e for e in examples}
        self._checked = False

    # ------------------------------------------------------------------ public
    def serve(self) -> WorkerReport:
        """Evaluate waiting trials until the compile finishes or nothing came for ``idle_timeout`` seconds."""
        try:
            optuna = import_optuna()
            report = WorkerReport()
            idle_since = time.monotonic()
            while True:
                state = self._state()
                if state is not None:
                    self._check_identity(state)
                did = state is not None and self._serve_waiting(optuna, report)  # the compile creates the storage first
                if did:
                    idle_since = time.monotonic()
                    continue
                if state is not None and state.get("status") in DONE_STATUSES:
                    report.stop_reason = "run_finished"
                    break
                if time.monotonic() - idle_since > self.idle_timeout:
                    report.stop_reason = "idle"
                    break
                time.sleep(self.poll_interval)
        finally:
            self.calls.close()
        report.usage = self.calls.ledger.to_dict()
        logger.info("worker %s stopped (%s) after %d trial(s)", self.name, report.stop_reason, len(report.trials))
        return report

    # ------------------------------------------------------------------ internals
    def _state(self) -> dict[str, Any] | None:
        path = self.run_dir / "state.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:  # written atomically; a torn read cannot happen, but never die on one
            return None

    def _check_identity(self, state: dict[str, Any]) -> None:
        if self._checked:
            return
        identity = state.get("identity", {})
        mine = {
            "judge_sees": self.calls.judge_sees,
            "task": self.calls.task.to_dict(),
            "verbalizer": lm_identity(self.calls.verbalizer_lm),
            "judge": lm_identity(self.calls.judge_lm),
        }
        theirs = {
            "judge_sees": identity.get("judge_sees"),
            "task": identity.get("task"),
            "verbalizer": identity.get("models", {}).get("verbalizer"),
            "judge": identity.get("models", {}).get("judge"),
        }
        diffs = [key for key in mine if _canonical(mine[key]) != _canonical(theirs[key])]
        if diffs:
            raise WorkerError(
                f"run directory '{self.run_dir.name}' compiles with another {', '.join(diffs)} than this worker; "
                "start the worker with the compile's task card, --judge-sees and LMs"
            )
        self._checked = True

    def _serve_waiting(self, optuna: Any, report: WorkerReport) -> bool:
        try:
            storage = open_storage(self.storage)
            names = [n for n in optuna.get_all_study_names(storage=storage) if "-round-" in n]
        except Exception as exc:  # the storage may not exist yet
            logger.debug("no study storage yet: %s", exc)
            return False
        for study_name in names:
            try:
                study = optuna.load_study(study_name=study_name, storage=storage)
                info = study.user_attrs.get(ROUND_ATTR)
                if not info or not info.get("open"):
                    continue
                study.pruner = make_pruner(self.pruner, info["sizes"][0])
                trial = claim_waiting_trial(study, worker=self.name, storage_url=self.storage)
            except KeyError:  # the compile deleted the study (a resumed round); look again
                continue
            if trial is None:
                continue
            self._evaluate(study, trial, info, report)
            return True
        return False

    def _evaluate(self, study: optuna.Study, trial: optuna.Trial, info: dict[str, Any], report: WorkerReport) -> None:
        missing = [key for key in info["val_keys"] if key not in self._by_key]
        if missing:
            study.tell(trial, state=import_optuna().trial.TrialState.FAIL)
            raise WorkerError(
                f"{len(missing)} of the {len(info['val_keys'])} validation examples of {study.study_name} are not in "
                "this worker's data; load the same dataset as the compile"
            )
        permuted = [self._by_key[key] for key in info["val_keys"]]
        attrs = trial.user_attrs
        candidate = Candidate(verbalizer=attrs["verbalizer"], judge=attrs["judge"])
        records: list[JudgeRecord] = []

        def score(cid: str, start: int, stop: int) -> float:
            records[start:] = self.calls.predict_many(permuted[start:stop], candidate)
            labels = [record.label for record in records]
            return corpus_value(self.calls.task, info["metric"], permuted[:stop], labels)

        climb(study, trial, info["sizes"], score)
        frozen = study._storage.get_trial(trial._trial_id)
        report.trials.append((study.study_name, frozen.number, str(frozen.params.get(PARAM)), frozen.state.name))
        logger.info("worker %s: %s trial %d -> %s", self.name, study.study_name, frozen.number, frozen.state.name)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
