"""The memoized LM call layer of a compile: verbalize, judge, predict and propose, journaled and budgeted.

:class:`ProgramCalls` makes every LM call of BLPO, its baselines and selection workers: the journal
(``cache.sqlite``) serves a call finished before (a resumed run replays it, counted as ``replayed``), the
verbalization cache serves an (image, I2T instruction, model) seen in any compile sharing it, the ledger counts calls,
tokens, seconds and failures per role and enforces the budget, and one key is in flight at most once
(single-flight), so concurrent threads never make the same call twice. A failed call is a scored failure, never an
exception.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import dspy

from blpo_dspy.budget import BudgetExhaustedError, UsageLedger
from blpo_dspy.cache import CallJournal, VerbalizationCache, content_key, lm_identity
from blpo_dspy.images import LazyImage, image_sha256
from blpo_dspy.modules import Judge
from blpo_dspy.task import Label, Task
from blpo_dspy.teleprompt.proposers import clean_instruction

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JudgeRecord:
    """One judge outcome.

    Attributes:
        label: Canonical label, or ``None`` (failed call or unparseable answer).
        raw_label: The LM's label text.
        rationale: The judge's rationale.
        error: Why ``label`` is ``None``.
        descriptions: Verbalizations the judge read (text/both modes).
        budget: The call was not made because the budget ran out.
    """

    label: Label | None
    raw_label: str | None = None
    rationale: str = ""
    error: str | None = None
    descriptions: Mapping[str, str] = field(default_factory=dict)
    budget: bool = False


@dataclass
class Candidate:
    """A (q, p) pair."""

    verbalizer: str
    judge: str

    @property
    def id(self) -> str:
        """Content id of the pair."""
        return content_key(self.verbalizer, self.judge)[:12]


class ProgramCalls:
    """Journaled, cached, budgeted LM calls for one ``ImageJudge``-like program.

    Args:
        task: The judging task.
        judge_sees: ``"image"``, ``"text"`` or ``"both"``.
        verbalizer_lm: LM of the verbalizer role.
        judge_lm: LM of the judge role.
        proposer_lm: LM of the proposer role (``None`` if this layer never proposes).
        ledger: Usage and budget ledger.
        journal: Journal of finished calls (the run's ``cache.sqlite``).
        vcache: Verbalization cache (may be shared between compiles).
        num_threads: Parallel calls per batch.
    """

    def __init__(
        self,
        *,
        task: Task,
        judge_sees: str,
        verbalizer_lm: dspy.LM,
        judge_lm: dspy.LM,
        proposer_lm: dspy.LM | None,
        ledger: UsageLedger,
        journal: CallJournal,
        vcache: VerbalizationCache,
        num_threads: int,
    ) -> None:
        self.task = task
        self.judge_sees = judge_sees
        self.verbalizer_lm = verbalizer_lm
        self.judge_lm = judge_lm
        self.proposer_lm = proposer_lm
        self.ledger = ledger
        self.journal = journal
        self.vcache = vcache
        self.num_threads = num_threads
        self._seen_journal_keys: set[str] = set()
        self._key_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._judges: dict[str, Judge] = {}
        self._verbalizers: dict[str, dspy.Predict] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ keys and locks
    def example_key(self, example: dspy.Example) -> list[Any]:
        """Content key of an example's inputs: image SHA-256s and text fields."""
        shas = []
        for name in self.task.image_fields:
            stored = example.get(f"{name}_sha256") if hasattr(example, "get") else None
            shas.append(stored or image_sha256(example[name]))
        texts = [str(example.get(name, "")) for name in self.task.text_fields]
        return [shas, texts]

    @contextlib.contextmanager
    def _single_flight(self, key: str) -> Iterator[None]:
        with self._locks_guard:
            lock = self._key_locks.setdefault(key, threading.Lock())
        with lock:
            yield

    def _mark_seen(self, key: str) -> None:
        with self._locks_guard:
            self._seen_journal_keys.add(key)

    def _charge_replay_or_hit(self, role: str, key: str, made: Mapping[str, Any] | None) -> bool:
        """Account a stored result: replayed (its journal entry ``made`` says an earlier attempt of this run made the
        call; its journaled tokens are counted too) or a plain cache hit."""
        with self._locks_guard:
            first = key not in self._seen_journal_keys
            self._seen_journal_keys.add(key)
        if made is not None and first:
            if not self.ledger.acquire(role, replay=True):
                return False
            self.ledger.record_replayed_tokens(role, made.get("tokens"))
            return True
        self.ledger.record_hit(role)
        return True

    # ------------------------------------------------------------------ memoized LM calls
    def verbalize(self, example: dspy.Example, q: str) -> dict[str, str] | Literal["budget"] | None:
        """Verbalize every image of an example under q (cache first). ``None`` on failure."""
        text = {name: str(example.get(name, "")) for name in self.task.text_fields}
        out: dict[str, str] = {}
        for image_field, desc_field in zip(self.task.image_fields, self.task.description_fields, strict=True):
            image = example[image_field]
            digest = example.get(f"{image_field}_sha256") or image_sha256(image)
            key = VerbalizationCache.key(image_sha256=digest, instruction=q, lm=self.verbalizer_lm, text_fields=text)
            with self._single_flight("v:" + key):
                cached = self.vcache.get(key)
                if cached is not None:
                    made = self.journal.get("verbalization_made", key)
                    if not self._charge_replay_or_hit("verbalizer", key, made):
                        return "budget"
                    out[desc_field] = cached
                    continue
                if not self.ledger.acquire("verbalizer"):
                    return "budget"
                self._mark_seen(key)
                predictor = self._verbalizer_for(q)
                began = time.perf_counter()
                try:
                    with dspy.context(lm=self.verbalizer_lm), dspy.track_usage() as usage:
                        description = predictor(image=image, **text).description
                    tokens = self.ledger.record_tokens("verbalizer", usage.get_total_tokens())
                except Exception as exc:
                    self.ledger.record_failure("verbalizer")
                    self.ledger.record_time("verbalizer", time.perf_counter() - began)
                    logger.debug("verbalizer call failed: %s", exc)
                    return None
                self.ledger.record_time("verbalizer", time.perf_counter() - began)
                if not isinstance(description, str) or not description.strip():
                    self.ledger.record_failure("verbalizer")
                    return None
                self.journal.put("verbalization_made", key, {"tokens": tokens})
                self.vcache.put(
                    key, description, image_sha256=digest, instruction=q, model=lm_identity(self.verbalizer_lm)["model"]
                )
                out[desc_field] = description
        return out

    def judge(self, example: dspy.Example, p: str, descriptions: Mapping[str, str]) -> JudgeRecord:
        """Judge one example under p (journal first); never raises."""
        key = content_key(
            "judge", p, self.judge_sees, self.example_key(example), dict(descriptions), lm_identity(self.judge_lm)
        )
        with self._single_flight("j:" + key):
            stored = self.journal.get("judge", key)
            if stored is not None:
                if not self._charge_replay_or_hit("judge", key, stored):
                    return JudgeRecord(label=None, error="budget", budget=True)
                label = self.task.parse_label(stored["raw_label"])
                if label is None:
                    self.ledger.record_failure("judge")
                return JudgeRecord(
                    label, stored["raw_label"], stored["rationale"], stored.get("error"), dict(descriptions)
                )
            if not self.ledger.acquire("judge"):
                return JudgeRecord(label=None, error="budget", budget=True)
            self._mark_seen(key)
            judge = self._judge_for(p)
            inputs = {name: example[name] for name in self.task.input_fields}
            inputs.update(descriptions)
            began = time.perf_counter()
            with dspy.context(lm=self.judge_lm), dspy.track_usage() as usage:
                result = judge.run(inputs)
            self.ledger.record_time("judge", time.perf_counter() - began)
            tokens = self.ledger.record_tokens("judge", usage.get_total_tokens())
            if result.label is None:
                self.ledger.record_failure("judge")
            if result.raw_label is not None:  # the call finished: journal it (failed calls are retried on resume)
                entry = {"raw_label": result.raw_label, "rationale": result.rationale, "error": result.error}
                entry["tokens"] = tokens
                self.journal.put("judge", key, entry)
            return JudgeRecord(result.label, result.raw_label, result.rationale, result.error, dict(descriptions))

    def predict(self, example: dspy.Example, candidate: Candidate) -> JudgeRecord:
        """The program (q, p) on one example."""
        descriptions: Mapping[str, str] = {}
        if self.judge_sees in ("text", "both"):
            verbalized = self.verbalize(example, candidate.verbalizer)
            if verbalized == "budget":
                return JudgeRecord(label=None, error="budget", budget=True)
            if verbalized is None:
                self.ledger.record_failure("judge")
                return JudgeRecord(label=None, error="verbalizer failed")
            descriptions = verbalized
        return self.judge(example, candidate.judge, descriptions)

    def parallel(self, function: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """Run a batch on the layer's thread pool (``num_threads``), results in item order.

        An item that raises becomes ``None`` (logged), never an exception. Batches submitted from several threads at
        once share the pool, so at most ``num_threads`` calls are in flight. Each item runs in a copy of the
        submitting thread's context (DSPy settings overrides included).

        Raises:
            BudgetExhaustedError: The budget ran out during the batch.
        """
        return self.submit(function, items)()

    def submit(self, function: Callable[[Any], Any], items: Sequence[Any]) -> Callable[[], list[Any]]:
        """Queue a batch on the thread pool now; the returned function waits for it (see :meth:`parallel`).

        Batches run in the order they were queued, so queuing a later batch behind a current one fills the threads
        the current batch leaves idle without delaying it.
        """

        def guarded(item: Any) -> Any:
            try:
                return function(item)
            except Exception as exc:  # a scored failure for the caller, never a crash of the batch
                logger.warning("a batch item failed: %s", exc)
                return None

        if self.num_threads == 1 or len(items) <= 1:
            futures = None
            results = [guarded(item) for item in items]
        else:
            pool = self._thread_pool()
            futures = [pool.submit(contextvars.copy_context().run, guarded, item) for item in items]

        def wait() -> list[Any]:
            out = [future.result() for future in futures] if futures is not None else results
            if self.ledger.exhausted:
                raise BudgetExhaustedError(f"LM call budget reached ({self.ledger.exhausted_role})")
            return out

        return wait

    def _thread_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._locks_guard:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.num_threads, thread_name_prefix="blpo-call")
            return self._pool

    def close(self) -> None:
        """Stop the thread pool: queued calls are dropped, running ones finish (idempotent; a new batch reopens it)."""
        with self._locks_guard:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)  # a stopped compile drops its queued calls

    def predict_many(self, examples: Sequence[dspy.Example], candidate: Candidate) -> list[JudgeRecord]:
        """The program (q, p) on many examples, in parallel."""
        results = self.parallel(lambda example: self.predict(example, candidate), examples)
        return [as_record(r) for r in results]

    def propose(self, kind: str, signature: type[dspy.Signature], **inputs: Any) -> str | None:
        """One proposer call (journal first). ``None`` on failure or an empty answer.

        An image input whose file vanished or changed since loading fails the call (charged, counted as a failure)
        before anything is sent: DSPy would otherwise send an unreadable image inside a list as its bare name.
        """
        key = content_key(kind, inputs, lm_identity(self.proposer_lm))
        stored = self.journal.get("proposer", key)
        if stored is not None:
            if not self._charge_replay_or_hit("proposer", key, stored):
                raise BudgetExhaustedError("LM call budget reached (proposer)")
            return stored["text"]
        if not self.ledger.acquire("proposer"):
            raise BudgetExhaustedError(f"LM call budget reached ({self.ledger.exhausted_role})")
        self._mark_seen(key)
        began = time.perf_counter()
        try:
            for value in inputs.values():
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, LazyImage):
                        item.format()  # reads and checks the file now; the adapter reuses the cached result
            with dspy.context(lm=self.proposer_lm), dspy.track_usage() as usage:
                answer = dspy.Predict(signature)(**inputs).new_instruction
            tokens = self.ledger.record_tokens("proposer", usage.get_total_tokens())
            self.ledger.record_time("proposer", time.perf_counter() - began)
        except Exception as exc:
            self.ledger.record_time("proposer", time.perf_counter() - began)
            self.ledger.record_failure("proposer")
            logger.warning("%s proposal failed: %s", kind, exc)
            return None
        text = clean_instruction(answer)
        if text is None:
            self.ledger.record_failure("proposer")
            return None
        self.journal.put("proposer", key, {"text": text, "tokens": tokens})
        return text

    def _judge_for(self, p: str) -> Judge:
        with self._locks_guard:
            if p not in self._judges:
                self._judges[p] = Judge(self.task, self.judge_sees, instruction=p)  # type: ignore[arg-type]
            return self._judges[p]

    def _verbalizer_for(self, q: str) -> dspy.Predict:
        with self._locks_guard:
            if q not in self._verbalizers:
                self._verbalizers[q] = dspy.Predict(self.task.verbalizer_signature(q))
            return self._verbalizers[q]


def program_setup(
    program: Any,
    directory: Path,
    *,
    cache_path: str | Path | None = None,
    verbalizer_lm: dspy.LM | None = None,
    need_verbalizer: bool = True,
) -> dict[str, Any]:
    """The :class:`ProgramCalls` arguments a program and a run directory determine.

    The task and ``judge_sees`` come from the program; each LM is the given one, else the program's own, else the
    configured ``dspy.settings.lm``; the journal is ``directory/cache.sqlite`` and so is the verbalization cache,
    unless ``cache_path`` names a shared one.

    Raises:
        ValueError: No LM for the judge, or none for the verbalizer when ``need_verbalizer``.
    """
    judge_lm = getattr(program, "judge_lm", None) or dspy.settings.lm
    verbalizer_lm = verbalizer_lm or getattr(program, "verbalizer_lm", None) or dspy.settings.lm
    if judge_lm is None:
        raise ValueError("no LM for the judge: give the program a judge_lm or call dspy.configure(lm=...)")
    if need_verbalizer and verbalizer_lm is None:
        raise ValueError("no LM for the verbalizer: give the program a verbalizer_lm or call dspy.configure(lm=...)")
    return {
        "task": program.task,
        "judge_sees": getattr(program, "judge_sees", "image"),
        "verbalizer_lm": verbalizer_lm,
        "judge_lm": judge_lm,
        "journal": CallJournal(directory / "cache.sqlite"),
        "vcache": VerbalizationCache(Path(cache_path) if cache_path else directory / "cache.sqlite"),
    }


def as_record(result: JudgeRecord | None) -> JudgeRecord:
    """A parallel batch item that died inside the executor (``None``) becomes a scored failure."""
    return result if result is not None else JudgeRecord(label=None, error="internal error")
