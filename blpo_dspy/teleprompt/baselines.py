"""The BLPO paper's baselines as teleprompters with BLPO's budget knobs.

- :class:`NoOptimization` — the seed program, unchanged.
- :class:`FixedI2T` — BLPO with the inner loop off: the judge instruction is updated from errors verbalized under
  the seed I2T instruction (judge-only APO over verbalizations; the paper's first ablation).
- :class:`JudgePromptAsI2T` — BLPO where the current judge instruction is reused as the I2T instruction (the
  paper's second ablation).
- :class:`OPRO` — the proposer sees only the history of (judge instruction, train score) pairs: no error examples,
  no images (Yang et al., "Large Language Models as Optimizers", 2023).
- :class:`APOImage` — ProTeGi-style error-driven edits where the optimizer is shown the raw images of the judge's
  errors with their gold and predicted labels (Pryzant et al., "Automatic Prompt Optimization with 'Gradient
  Descent' and Beam Search", 2023). Needs a vision-capable proposer.

Every ``compile(student, *, trainset, valset=None)`` returns a new program carrying ``usage_`` (LM calls, tokens
and images per role, measured with :class:`~blpo_dspy.teleprompt.builtins.LMCallCounter`) and ``history_``.
``max_calls`` is a hard cap (an int for the total or ``{"judge": n, "verbalizer": n, "proposer": n, "total": n}``):
reaching it stops the search with the best validated program so far.

OPRO and APO-image optimize the judge instruction p only; the I2T instruction stays the seed's (it matters only
when the judge reads verbalizations). Each outer step proposes ``proposals_per_step`` instructions, scores each on
the train split, and validates the step's best on the valset if it is not worse than the incumbent on train; the
incumbent is replaced when the validation metric does not drop (as in BLPO's guarded selection). They make their LM
calls through BLPO's call layer (:class:`~blpo_dspy.teleprompt.calls.ProgramCalls`: budgeted, single-flight, with
a journal in a temporary directory), so no judge or verbalizer call is made twice; ``cache_path`` shares the
verbalization cache between compiles. A failed call is a scored failure, never an exception.
"""

from __future__ import annotations

import logging
import random
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import dspy
from dspy.teleprompt import Teleprompter

from blpo_dspy.budget import ROLES, TOTAL, BudgetExhaustedError, UsageLedger, normalise_caps
from blpo_dspy.metrics import METRICS, corpus_value, primary_metric
from blpo_dspy.task import Label, Task
from blpo_dspy.teleprompt.blpo import BLPO
from blpo_dspy.teleprompt.builtins import LMCallCounter, empty_usage
from blpo_dspy.teleprompt.calls import Candidate, JudgeRecord, ProgramCalls, program_setup
from blpo_dspy.teleprompt.errors import BalancedSampler, BatchSampler
from blpo_dspy.teleprompt.inputs import check_compile_inputs
from blpo_dspy.teleprompt.proposers import (
    ErrorCase,
    render_errors,
    render_history,
    render_tried,
    task_description,
)

logger = logging.getLogger(__name__)

CorpusMetric = Callable[[Task, Sequence[dspy.Example], Sequence[Label | None]], float]

_RULES = """\
Rules:
- State general criteria. Never quote or refer to specific examples, images or prompts.
- Do not add any output-format instructions (the answer format is fixed elsewhere); keep the task's label scale.
- The new instruction must differ from every instruction already tried.
Answer with the complete new instruction only."""

OPRO_INSTRUCTIONS = f"""\
You improve the instruction given to an AI judge that labels images. You see the task and the judge instructions
tried so far, each with its score on a labelled training set (agreement with human labels, higher is better),
sorted from lowest to highest score. Write a new judge instruction that should score higher than all of them.
{_RULES}"""

APO_IMAGE_INSTRUCTIONS = f"""\
You improve the instruction given to an AI judge that labels images. You see the judge's current instruction and a
batch of examples it got wrong: the attached images (in the order the errors are listed), the gold label given by
humans, the judge's predicted label and the judge's rationale. Look at the images, diagnose what the judge
systematically misses or misreads, then write an improved judge instruction.
- Make minimal, targeted edits to the current instruction; keep what already works.
{_RULES}"""


class OPROProposal(dspy.Signature):
    """OPRO meta-prompt (replaced by OPRO_INSTRUCTIONS)."""

    task_description: str = dspy.InputField(desc="What the judge labels and the label scale.")
    scored_instructions: str = dspy.InputField(desc="Judge instructions tried so far with their scores, lowest first.")
    new_instruction: str = dspy.OutputField(desc="The new judge instruction.")


class ImageErrorProposal(dspy.Signature):
    """APO-image edit step (replaced by APO_IMAGE_INSTRUCTIONS)."""

    task_description: str = dspy.InputField(desc="What the judge labels and the label scale.")
    current_instruction: str = dspy.InputField(desc="The judge's current instruction.")
    errors: str = dspy.InputField(desc="Examples the judge got wrong; 'attached image k' refers to error_images.")
    error_images: list[dspy.Image] = dspy.InputField(desc="The images of the errors, in the order referenced.")
    tried_instructions: str = dspy.InputField(desc="Judge instructions already tried (do not repeat them).")
    new_instruction: str = dspy.OutputField(desc="The complete improved judge instruction.")


OPROProposal = OPROProposal.with_instructions(OPRO_INSTRUCTIONS)
ImageErrorProposal = ImageErrorProposal.with_instructions(APO_IMAGE_INSTRUCTIONS)


# ---------------------------------------------------------------------------------------------- no optimization
class NoOptimization(Teleprompter):
    """The seed program, unchanged (the paper's "no optimization" row). Makes no LM call.

    Args:
        seed: Accepted for a uniform interface; unused.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed

    def compile(
        self,
        student: dspy.Module,
        *,
        trainset: list[dspy.Example] | None = None,
        teacher: dspy.Module | None = None,
        valset: list[dspy.Example] | None = None,
        **kwargs: Any,
    ) -> dspy.Module:
        """Return a copy of ``student`` with zero ``usage_`` and an empty ``history_``."""
        program = student.deepcopy()
        program.usage_ = empty_usage()
        program.history_ = []
        program.stop_reason_ = "no_optimization"
        if hasattr(program, "instructions"):
            program.best_instructions_ = dict(program.instructions)
        program._compiled = True
        return program


# ---------------------------------------------------------------------------------------------- BLPO ablations
class _BLPOAblation(BLPO):
    """BLPO with a fixed ``i2t_policy``; adds the images sent per role (measured) to ``usage_``."""

    POLICY = "optimize"

    def __init__(self, metric: str | Callable[..., Any] = "primary", proposer_lm: dspy.LM | None = None, **kwargs: Any):
        policy = kwargs.pop("i2t_policy", self.POLICY)
        if policy != self.POLICY:
            raise ValueError(f"{type(self).__name__} always uses i2t_policy={self.POLICY!r}, got {policy!r}")
        super().__init__(metric, proposer_lm, i2t_policy=self.POLICY, **kwargs)

    def compile(
        self,
        student: dspy.Module,
        *,
        trainset: list[dspy.Example],
        teacher: dspy.Module | None = None,
        valset: list[dspy.Example] | None = None,
        **kwargs: Any,
    ) -> dspy.Module:
        """Compile like BLPO and record, per role, the image parts the LM calls carried (``usage_[role]["images"]``)."""
        counter = LMCallCounter()
        with counter.active():
            program = super().compile(student, trainset=trainset, teacher=teacher, valset=valset, **kwargs)
        for role in ROLES:
            program.usage_.setdefault(role, {})["images"] = counter.images(role)
        program.usage_.setdefault(TOTAL, {})["images"] = sum(counter.images(role) for role in ROLES)
        return program


class FixedI2T(_BLPOAblation):
    """BLPO with the inner loop off: p is updated from errors verbalized under the seed I2T instruction.

    The paper's "fixed I2T" ablation (judge-only APO over verbalizations). Takes BLPO's arguments except
    ``i2t_policy`` (always ``"fixed"``; ``inner_steps`` is unused); ``selection`` defaults to ``"guarded"``.
    """

    POLICY = "fixed"


class JudgePromptAsI2T(_BLPOAblation):
    """BLPO where the current judge instruction serves as the I2T instruction (the paper's second ablation).

    Takes BLPO's arguments except ``i2t_policy`` (always ``"judge_prompt"``).
    """

    POLICY = "judge_prompt"


# ---------------------------------------------------------------------------------------------- vision check
def lm_supports_images(lm: Any) -> bool | None:
    """Whether an LM accepts image inputs, from what DSPy knows about it; ``None`` when unknown.

    A custom engine may declare ``supports_vision`` (or ``supports_images``). For a model string, DSPy's bundled
    model metadata (LiteLLM's catalogue) is read for the resolved route, then LiteLLM's ``supports_vision`` is
    tried. No network call is made when ``LITELLM_LOCAL_MODEL_COST_MAP=True``.
    """
    engine = getattr(lm, "engine", None)
    if engine is not None and not isinstance(engine, str):
        for name in ("supports_vision", "supports_images"):
            flag = getattr(engine, name, None)
            if isinstance(flag, bool):
                return flag
        return None
    model = getattr(lm, "model", None)
    if not isinstance(model, str) or not model:
        return None
    from dspy.clients.model_metadata import model_info

    value: Any = None
    try:
        from dspy.clients.capabilities import resolve

        route = resolve(lm)
        value = model_info(route.provider, route.model).get("supports_vision")
    except Exception:  # unknown route: try the raw provider prefix
        if "/" in model:
            provider, name = model.split("/", 1)
            try:
                value = model_info(provider, name).get("supports_vision")
            except Exception:
                value = None
    if value is None and "litellm" in sys.modules:
        try:
            value = sys.modules["litellm"].supports_vision(model=model)
        except Exception:
            value = None
    return value if isinstance(value, bool) else None


# ---------------------------------------------------------------------------------------------- the shared search
def _resolve_metric(task: Task, metric: str | Callable[..., Any]) -> tuple[str, CorpusMetric]:
    """A corpus metric from a name (``"primary"`` or a :data:`METRICS` key) or a per-example DSPy metric."""
    if callable(metric):

        def mean_metric(task: Task, examples: Sequence[dspy.Example], labels: Sequence[Label | None]) -> float:
            values = [metric(e, dspy.Prediction(label=label), None) for e, label in zip(examples, labels, strict=True)]
            return sum(float(getattr(v, "score", v)) for v in values) / len(values) if values else 0.0

        return getattr(metric, "__name__", "custom"), mean_metric
    name = primary_metric(task) if metric == "primary" else metric
    if name not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use 'primary', a callable, or one of {', '.join(METRICS)}")
    METRICS[name].check(task)

    def corpus(task: Task, examples: Sequence[dspy.Example], labels: Sequence[Label | None]) -> float:
        value = corpus_value(task, name, examples, labels)
        return value if value == value else 0.0  # an undefined metric (nan) scores 0

    return name, corpus


class _JudgeInstructionSearch(Teleprompter):
    """Shared loop of :class:`OPRO` and :class:`APOImage` (judge instruction only; see the module docstring)."""

    def __init__(
        self,
        metric: str | Callable[..., Any] = "primary",
        proposer_lm: dspy.LM | None = None,
        *,
        outer_steps: int = 5,
        proposals_per_step: int = 2,
        num_threads: int = 8,
        seed: int = 0,
        max_calls: int | Mapping[str, int] | None = None,
        cache_path: str | Path | None = None,
    ) -> None:
        super().__init__()
        if proposer_lm is None:
            raise ValueError(f"{type(self).__name__} needs a proposer_lm")
        if not (isinstance(metric, str) or callable(metric)):
            raise TypeError(f"metric must be a metric name or a callable, got {type(metric).__name__}")
        for name, value, low in (
            ("outer_steps", outer_steps, 0),
            ("proposals_per_step", proposals_per_step, 1),
            ("num_threads", num_threads, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        normalise_caps(max_calls)
        self.metric = metric
        self.proposer_lm = proposer_lm
        self.outer_steps = outer_steps
        self.proposals_per_step = proposals_per_step
        self.num_threads = num_threads
        self.seed = seed
        self.max_calls = max_calls
        self.cache_path = cache_path

    def compile(
        self,
        student: dspy.Module,
        *,
        trainset: list[dspy.Example],
        teacher: dspy.Module | None = None,
        valset: list[dspy.Example] | None = None,
        **kwargs: Any,
    ) -> dspy.Module:
        """Search judge instructions; return a copy of ``student`` with the best one.

        Args:
            student: An ``ImageJudge`` (or a module with ``task``, ``verbalizer`` and ``judge`` like it).
            trainset: The optimisation split (proposals are scored on it; errors are sampled from it).
            teacher: Unused (must be ``None``).
            valset: The split that decides acceptance; defaults to ``trainset`` (with a warning).
            **kwargs: Not accepted (a ``TypeError`` names them).

        Returns:
            The program with ``best_instructions_``, ``best_score_`` (validation), ``seed_score_``,
            ``metric_name_``, ``history_``, ``usage_``, ``charged_calls_`` and ``stop_reason_``.
        """
        train, val = check_compile_inputs(type(self).__name__, student, trainset, teacher, valset, kwargs)
        self._check_ready()
        with tempfile.TemporaryDirectory(prefix="blpo-search-") as tmp:
            search = _Search(self, student, train, val, Path(tmp))
            try:
                with search.counter.active():
                    return search.run()
            finally:  # release the threads and SQLite handles before the directory goes
                search.close()
                search.journal.store.close()
                search.vcache.store.close()

    # hooks
    def _check_ready(self) -> None:
        """Raise if the optimizer cannot run (e.g. a text-only proposer for APO-image)."""

    def _propose(self, search: _Search, step: int, index: int) -> str | None:
        raise NotImplementedError


class _Search(ProgramCalls):
    """One OPRO / APO-image compile: the loop over :class:`ProgramCalls` (journaled, cached, budgeted LM calls).

    The journal lives in ``store`` (a temporary directory of the compile); the verbalization cache too, unless the
    optimizer has a ``cache_path`` (share it between compiles to share verbalizations).
    """

    def __init__(
        self, opt: _JudgeInstructionSearch, student: dspy.Module, trainset: list[Any], valset: list[Any], store: Path
    ) -> None:
        super().__init__(
            **program_setup(
                student,
                store,
                cache_path=opt.cache_path,
                need_verbalizer=getattr(student, "judge_sees", "image") != "image",  # judges reading text only
            ),
            proposer_lm=opt.proposer_lm,
            ledger=UsageLedger(opt.max_calls),
            num_threads=opt.num_threads,
        )
        self.opt = opt
        self.student = student
        self.trainset = trainset
        self.valset = valset
        self.metric_name, self._metric = _resolve_metric(self.task, opt.metric)
        self.q: str = student.verbalizer.instruction
        self.counter = LMCallCounter()
        self.history: list[dict[str, Any]] = []
        self.scored: list[tuple[str, float]] = []  # (judge instruction, train score), every distinct proposal
        self.incumbent: str = student.judge.instruction
        self._split_records: dict[tuple[int, str], list[JudgeRecord]] = {}

    # ------------------------------------------------------------------ the loop
    def run(self) -> dspy.Module:
        seed_p = self.incumbent
        seed_score: float | None = None
        best_val: float | None = None
        inc_train: float | None = None
        stop_reason = "outer_steps"
        try:
            inc_train = self.score(self.trainset, seed_p)
            self.scored.append((seed_p, inc_train))
            seed_score = best_val = self.score(self.valset, seed_p)
            logger.info("%s seed: train %.4f, validation %.4f", type(self.opt).__name__, inc_train, seed_score)
            for step in range(self.opt.outer_steps):
                step_best: tuple[str, float, dict[str, Any]] | None = None
                for index in range(self.opt.proposals_per_step):
                    entry = self._new_entry(step, index)
                    proposal = self.opt._propose(self, step, index)
                    if proposal is None:
                        entry["error"] = entry["error"] or "proposal failed"
                        continue
                    entry["instruction"] = proposal
                    known = dict(self.scored)
                    if proposal in known:
                        entry.update(duplicate=True, train_score=known[proposal])
                        continue
                    train = self.score(self.trainset, proposal)
                    self.scored.append((proposal, train))
                    entry["train_score"] = train
                    if step_best is None or train > step_best[1]:
                        step_best = (proposal, train, entry)
                if step_best is None or step_best[1] < inc_train:
                    logger.info("step %d: no proposal matched the incumbent on train", step)
                    continue
                proposal, train, entry = step_best
                val = self.score(self.valset, proposal)
                entry["val_score"] = val
                if best_val is None or val >= best_val:
                    entry["accepted"] = True
                    self.incumbent, inc_train, best_val = proposal, train, val
                    logger.info("step %d: accepted (validation %.4f)", step, val)
        except BudgetExhaustedError as exc:
            stop_reason = "budget"
            logger.warning("%s; stopping with the best validated program so far", exc)
        except _NoErrorsLeftError:
            stop_reason = "no_errors"
        return self._finish(best_val, seed_score, stop_reason)

    def _new_entry(self, step: int, index: int) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "outer_step": step,
            "proposal": index,
            "instruction": None,
            "train_score": None,
            "val_score": None,
            "accepted": False,
            "duplicate": False,
            "images_shown": 0,
            "error": None,
        }
        self.history.append(entry)
        return entry

    def _finish(self, score: float | None, seed_score: float | None, stop_reason: str) -> dspy.Module:
        program = self.student.deepcopy()
        program.judge.set_instruction(self.incumbent)
        program.best_instructions_ = {"verbalizer": self.q, "judge": self.incumbent}
        program.best_score_ = score
        program.seed_score_ = seed_score
        program.metric_name_ = self.metric_name
        program.history_ = [dict(entry) for entry in self.history]
        program.usage_ = self.counter.usage()
        program.charged_calls_ = self.ledger.total_calls
        program.stop_reason_ = stop_reason
        program._compiled = True
        logger.info(
            "%s finished (%s): validation %s %s -> %s; LM calls %s",
            type(self.opt).__name__,
            stop_reason,
            self.metric_name,
            seed_score,
            score,
            {role: usage["calls"] for role, usage in program.usage_.items()},
        )
        return program

    # ------------------------------------------------------------------ scoring
    def score(self, examples: list[dspy.Example], p: str) -> float:
        """The corpus metric of judge instruction ``p`` on ``examples`` (the train or the validation split)."""
        return self._metric(self.task, examples, [r.label for r in self.records(examples, p)])

    def records(self, examples: list[dspy.Example], p: str) -> list[JudgeRecord]:
        """Judge outcomes of (seed q, ``p``) on a split, in parallel; raises ``BudgetExhaustedError`` at the cap.

        A split is judged once per instruction: a later request (APO-image's error sampling, the validation of a
        search without valset) reuses the outcomes it was scored with, failures included.
        """
        key = (id(examples), p)
        if key not in self._split_records:
            self._split_records[key] = self.predict_many(examples, Candidate(verbalizer=self.q, judge=p))
        return self._split_records[key]


class _NoErrorsLeftError(Exception):
    """The incumbent makes no error on the train split: nothing left to learn from."""


# ---------------------------------------------------------------------------------------------- OPRO
class OPRO(_JudgeInstructionSearch):
    """OPRO on the judge instruction: the proposer sees (instruction, train score) pairs only.

    No error examples and no images reach the proposer. Each proposal is scored on the train split (the score the
    proposer sees next); the step's best is validated and accepted if the validation metric does not drop.

    Args:
        metric: Corpus metric name (``"primary"``: the task's primary metric) or a per-example DSPy metric.
        proposer_lm: The optimizer LM (text only).
        outer_steps: Optimization steps.
        proposals_per_step: Proposals per step (made one after another; each sees the scores of the previous).
        num_threads: Parallel judge calls.
        seed: Accepted for a uniform interface (OPRO's loop has no random choice of its own).
        max_calls: Hard cap on LM calls (int total or per-role mapping).
        cache_path: SQLite verbalization cache to use (share one file between compiles to share
            verbalizations); defaults to a temporary one per compile.
    """

    def _propose(self, search: _Search, step: int, index: int) -> str | None:
        return search.propose(
            f"opro:{step}:{index}",
            OPROProposal,
            task_description=task_description(search.task),
            scored_instructions=render_history(search.scored),
        )


# ---------------------------------------------------------------------------------------------- APO-image
class APOImage(_JudgeInstructionSearch):
    """ProTeGi-style APO where the optimizer sees the raw images of the judge's errors.

    Each proposal samples an error batch from the train split (balanced over (gold, predicted) pairs, seeded) and
    sends the error images (``dspy.Image`` inputs) with the gold and predicted labels and the judge's rationale to
    the proposer, which edits the judge instruction. Images sent are counted in ``usage_["proposer"]["images"]``.

    Args:
        metric: Corpus metric name (``"primary"``: the task's primary metric) or a per-example DSPy metric.
        proposer_lm: A vision-capable optimizer LM.
        proposer_supports_images: Whether ``proposer_lm`` accepts images. ``None`` asks DSPy's model metadata
            (:func:`lm_supports_images`) and refuses when it does not say yes.
        outer_steps: Optimization steps.
        proposals_per_step: Edits per step, each from its own error sample.
        error_batch_size: Errors per edit.
        max_images_per_call: Cap on images in one proposer call (models reason worse past ~5-10 images).
        num_threads: Parallel judge calls.
        seed: Seed of the error sampling.
        max_calls: Hard cap on LM calls (int total or per-role mapping).
        error_sampler: Policy for the error batch (default: balanced over (gold, predicted)).
        cache_path: SQLite verbalization cache to use (share one file between compiles to share
            verbalizations); defaults to a temporary one per compile.

    Raises:
        ValueError: The proposer is (or may be) text-only.
    """

    def __init__(
        self,
        metric: str | Callable[..., Any] = "primary",
        proposer_lm: dspy.LM | None = None,
        *,
        proposer_supports_images: bool | None = None,
        outer_steps: int = 5,
        proposals_per_step: int = 2,
        error_batch_size: int = 5,
        max_images_per_call: int = 10,
        num_threads: int = 8,
        seed: int = 0,
        max_calls: int | Mapping[str, int] | None = None,
        error_sampler: BatchSampler | None = None,
        cache_path: str | Path | None = None,
    ) -> None:
        super().__init__(
            metric,
            proposer_lm,
            outer_steps=outer_steps,
            proposals_per_step=proposals_per_step,
            num_threads=num_threads,
            seed=seed,
            max_calls=max_calls,
            cache_path=cache_path,
        )
        for name, value in (("error_batch_size", error_batch_size), ("max_images_per_call", max_images_per_call)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.proposer_supports_images = proposer_supports_images
        self.error_batch_size = error_batch_size
        self.max_images_per_call = max_images_per_call
        self.error_sampler = error_sampler
        self._check_ready()

    def _check_ready(self) -> None:
        supported = self.proposer_supports_images
        model = getattr(self.proposer_lm, "model", type(self.proposer_lm).__name__)
        if supported is False:
            raise ValueError(
                f"APOImage shows the raw error images to the proposer, but proposer_supports_images=False for "
                f"{model!r}; use a vision-capable proposer LM, or OPRO / BLPO for a text-only one"
            )
        if supported is None and lm_supports_images(self.proposer_lm) is not True:
            raise ValueError(
                f"APOImage shows the raw error images to the proposer, and DSPy's model metadata does not say that "
                f"{model!r} accepts images; pass proposer_supports_images=True if it does (or use OPRO / BLPO with "
                "a text-only proposer)"
            )

    def _propose(self, search: _Search, step: int, index: int) -> str | None:
        task = search.task
        records = search.records(search.trainset, search.incumbent)
        golds = [example.label for example in search.trainset]
        wrong = [i for i, record in enumerate(records) if record.label != golds[i]]
        if not wrong:
            raise _NoErrorsLeftError
        per_error = len(task.image_fields)
        k = max(1, min(self.error_batch_size, self.max_images_per_call // per_error))
        rng = random.Random(f"{self.seed}:{step}:{index}:apo-errors")
        sampler = self.error_sampler or BalancedSampler()
        chosen = sampler.sample(wrong, [(golds[i], records[i].label) for i in wrong], k, rng)
        images: list[dspy.Image] = []
        cases = []
        for i in chosen:
            example = search.trainset[i]
            refs = {}
            for image_field, desc_field in zip(task.image_fields, task.description_fields, strict=True):
                images.append(example[image_field])
                refs[desc_field] = f"attached image {len(images)}"
            cases.append(
                ErrorCase(
                    text_fields={name: str(example.get(name, "")) for name in task.text_fields},
                    descriptions=refs,
                    gold=golds[i],
                    predicted=records[i].label,
                    rationale=records[i].rationale,
                )
            )
        search.history[-1]["images_shown"] = len(images)
        tried = [text for text, _ in search.scored]
        return search.propose(
            f"apo-image:{step}:{index}",
            ImageErrorProposal,
            task_description=task_description(task),
            current_instruction=search.incumbent,
            errors=render_errors(cases),
            error_images=images,
            tried_instructions=render_tried(tried),
        )
