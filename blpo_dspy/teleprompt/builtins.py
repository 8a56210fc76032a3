"""DSPy's built-in optimizers on an ``ImageJudge``, with comparable budgets and per-role call accounting.

:func:`make_optimizer` wraps MIPROv2, COPRO, GEPA, SIMBA and BootstrapFewShot in :class:`BuiltinOptimizer`, a
teleprompter that (1) translates one LM-call budget into each optimizer's own knobs (:class:`BudgetPlan`),
(2) keeps images away from a text-only proposer/reflection LM, and (3) counts every LM call per role with a DSPy
callback (:class:`LMCallCounter`), so the compiled program carries ``usage_`` like BLPO's.

Settings per optimizer (``proposer_supports_images=False``, the default; see also :data:`BUILTIN_NOTES`):

- ``mipro`` — ``MIPROv2(auto=None)`` zero-shot (``max_bootstrapped_demos=0, max_labeled_demos=0``), optimizing
  the instructions of both predictors (verbalizer q and judge p). A text-only proposer gets
  ``fewshot_aware_proposer=False`` and MIPROv2's demo bootstrapping is skipped: in zero-shot mode MIPROv2 still
  bootstraps 3-demo sets only to show them to the proposer (DSPy issue #9938), which costs program calls and sends
  the demos' images to the proposer. ``minibatch`` is used only when the valset has more than 50 examples.
  ``num_candidates``/``num_trials`` are chosen to fit the budget.
- ``copro`` — ``COPRO(breadth, depth)`` chosen to fit the budget. COPRO has no valset: it gets train + val.
  COPRO's proposer never sees examples, so no image can reach it.
- ``gepa`` — ``GEPA(max_metric_calls=...)`` with the feedback metric ``as_dspy_metric(task, feedback=True)``. A
  text-only reflection LM gets :func:`text_only_instruction_proposer` (GEPA's default proposer with every image in
  the reflective dataset replaced by a placeholder); with ``proposer_supports_images=True`` GEPA's default
  proposer shows the images.
- ``simba`` — ``SIMBA(max_demos=0)`` (rules only, zero-shot). SIMBA puts one LM on every predictor during its
  rollouts, overriding the program's per-role LMs: it runs only when every role the program uses is served by one
  LM (the judge LM; with ``judge_sees="text"|"both"`` the verbalizer LM must be the same model). SIMBA has no
  valset: it gets train + val. Its rule proposer masks images as ``<non-serializable: Image>``.
- ``bootstrap`` — ``BootstrapFewShot(max_bootstrapped_demos=4, max_labeled_demos=0)`` on train + val (truncated
  to fit the budget). It uses no proposer; its demos carry images to the judge/verbalizer LMs.

Budgets: a *program call* costs ``1`` judge call plus, when the judge reads text, one verbalizer call per image
(before caching: MIPROv2 and COPRO, which only score programs, share a verbalization cache keyed by (image,
instruction, model) during the compile; GEPA and SIMBA need the verbalizer's traces, BootstrapFewShot its demos,
so they run uncached). The plans are
estimates made before the run — only BLPO and the baselines in :mod:`blpo_dspy.teleprompt.baselines` enforce a
hard cap. ``usage_`` always holds the measured counts.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dspy
from dspy.teleprompt import Teleprompter
from dspy.utils.callback import BaseCallback

from blpo_dspy.budget import ROLES, TOTAL
from blpo_dspy.cache import VerbalizationCache, lm_identity
from blpo_dspy.metrics import as_dspy_metric
from blpo_dspy.task import DESCRIPTION_FIELD, LABEL_FIELD, RATIONALE_FIELD, Task
from blpo_dspy.teleprompt.inputs import check_compile_inputs

logger = logging.getLogger(__name__)

BUILTIN_OPTIMIZERS: tuple[str, ...] = ("mipro", "copro", "gepa", "simba", "bootstrap")
"""Names accepted by :func:`make_optimizer`."""

BUILTIN_NOTES: dict[str, str] = {
    "mipro": "zero-shot MIPROv2 (auto=None) on both predictors; num_candidates/num_trials fitted to the budget; "
    "text-only proposer: no demo bootstrapping, fewshot_aware_proposer=False; selects on the valset",
    "copro": "COPRO breadth/depth fitted to the budget; scores candidates on train+val (no valset parameter)",
    "gepa": "GEPA max_metric_calls fitted to the budget; feedback metric; text-only reflection proposer unless "
    "proposer_supports_images; Pareto tracking on the valset",
    "simba": "SIMBA rules only (max_demos=0); bsize/num_candidates/max_steps fitted to the budget; needs one LM for "
    "every role the program uses; train+val (no valset parameter)",
    "bootstrap": "BootstrapFewShot(max_bootstrapped_demos=4, max_labeled_demos=0); no proposer; train+val, truncated "
    "to the budget",
}

IMAGE_PLACEHOLDER = "[image omitted: the reflection model reads text only]"
_CUSTOM_TYPE = re.compile(r"<<CUSTOM-TYPE-START-IDENTIFIER>>(.*?)<<CUSTOM-TYPE-END-IDENTIFIER>>", re.DOTALL)
_OUTPUT_LINE = re.compile(r"^\d+\. `(\w+)`", re.MULTILINE)
_IMAGE_BLOCK_TYPES = frozenset({"image_url", "input_image", "image"})
_HISTORY_SCAN = 256


# ---------------------------------------------------------------------------------------------- call accounting
def _blank_usage() -> dict[str, float]:
    return {
        "calls": 0,
        "completions": 0,
        "failures": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "images": 0,
        "seconds": 0.0,
    }


def empty_usage() -> dict[str, dict[str, float]]:
    """A zeroed usage dict in :meth:`LMCallCounter.usage` format (every role plus ``total``)."""
    return {role: _blank_usage() for role in (*ROLES, TOTAL)}


def _system_and_parts(inputs: Mapping[str, Any]) -> tuple[str, int]:
    """System text and number of image parts of an LM call's inputs (OpenAI messages or an lm15 Request)."""
    from dspy.lm15 import ImagePart, Request

    prompt = inputs.get("prompt")
    request = prompt if isinstance(prompt, Request) else (inputs.get("kwargs") or {}).get("request")
    if isinstance(request, Request):
        system = request.system if isinstance(request.system, str) else ""
        if not isinstance(request.system, str):
            system = "".join(getattr(p, "text", "") or "" for p in (request.system or ()))
        images = 0
        for message in request.messages:
            if message.role == "system":
                system += "".join(getattr(p, "text", "") or "" for p in message.parts)
            images += sum(isinstance(p, ImagePart) for p in message.parts)
        return system, images
    system, images = "", 0
    for message in inputs.get("messages") or ():
        if not isinstance(message, Mapping):
            continue
        content = message.get("content")
        texts: list[str] = []
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, Sequence):
            for block in content:
                if not isinstance(block, Mapping):
                    continue
                if block.get("type") in _IMAGE_BLOCK_TYPES:
                    images += 1
                elif isinstance(block.get("text"), str):
                    texts.append(block["text"])
        for text in texts:  # unexpanded custom-type markers still become image blocks on the wire
            images += sum("image_url" in m for m in _CUSTOM_TYPE.findall(text))
        if message.get("role") == "system":
            system += "".join(texts)
    if isinstance(prompt, str) and not system:
        system = prompt
    return system, images


def output_fields_of(system: str) -> tuple[str, ...]:
    """Output field names listed in a DSPy adapter's system prompt (``Your output fields are: ...``)."""
    if "Your output fields are:" not in system:
        return ()
    section = system.split("Your output fields are:", 1)[1].split("All interactions", 1)[0]
    return tuple(m.group(1) for m in _OUTPUT_LINE.finditer(section))


class LMCallCounter(BaseCallback):
    """A DSPy callback counting LM calls, completions, tokens, images and time per role.

    The role of a call is read from the request: a call whose output fields are the verbalizer's
    (``description``) is a verbalizer call, one whose output fields are the judge's (``rationale``, ``label``) is
    a judge call, anything else (instruction proposals, dataset summaries, reflections, rules) is a proposer call.
    This survives the deep copies and ``lm.copy()`` clones optimizers make, which defeat identity checks. LMs
    passed in ``lms`` are classified by identity first (use it for an LM that serves exactly one role).

    Register with :meth:`active` (adds the counter to the callbacks already in the context). Settings-level
    callbacks see every call, in every thread. Tokens are read from the LM's history entry of the call
    (``None`` tokens when DSPy history is disabled). A call served from DSPy's own cache is still counted.

    Args:
        lms: Optional ``{role: lm}`` for identity classification.
        role_of: Optional ``(output_fields, system_text) -> role`` overriding the request rule.
    """

    def __init__(
        self,
        lms: Mapping[str, Any] | None = None,
        role_of: Callable[[tuple[str, ...], str], str] | None = None,
    ) -> None:
        super().__init__()
        self._identity = {id(lm): role for role, lm in (lms or {}).items() if lm is not None}
        self._role_of = role_of
        self._lock = threading.Lock()
        self._open: dict[str, tuple[str, Any, float]] = {}
        self._usage: dict[str, dict[str, float]] = {role: _blank_usage() for role in ROLES}

    # ------------------------------------------------------------------ DSPy callback hooks
    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        """Classify and count one LM call."""
        try:
            system, images = _system_and_parts(inputs)
        except Exception:  # an unusual request shape: count the call all the same
            logger.debug("could not parse an LM request for accounting", exc_info=True)
            system, images = "", 0
        role = self.classify(instance, system)
        with self._lock:
            usage = self._usage[role]
            usage["calls"] += 1
            usage["images"] += images
            self._open[call_id] = (role, instance, time.perf_counter())

    def on_lm_end(self, call_id: str, outputs: Any | None, exception: Exception | None = None) -> None:
        """Record the outcome, tokens and time of one LM call."""
        with self._lock:
            opened = self._open.pop(call_id, None)
        if opened is None:
            return
        role, instance, began = opened
        prompt_tokens, completion_tokens = (0, 0) if exception is not None else _tokens_of(instance, outputs)
        completions = len(outputs) if isinstance(outputs, list) else (0 if outputs is None else 1)
        with self._lock:
            usage = self._usage[role]
            usage["seconds"] += time.perf_counter() - began
            if exception is not None:
                usage["failures"] += 1
                return
            usage["completions"] += completions
            usage["prompt_tokens"] += prompt_tokens
            usage["completion_tokens"] += completion_tokens

    # ------------------------------------------------------------------ classification
    def classify(self, instance: Any, system: str) -> str:
        """The role of a call made by ``instance`` with this system prompt."""
        if id(instance) in self._identity:
            return self._identity[id(instance)]
        fields = output_fields_of(system)
        if self._role_of is not None:
            return self._role_of(fields, system)
        return role_from_output_fields(fields)

    # ------------------------------------------------------------------ reading
    def calls(self, role: str | None = None) -> int:
        """LM calls of one role, or of all roles."""
        with self._lock:
            if role is None:
                return int(sum(u["calls"] for u in self._usage.values()))
            return int(self._usage[role]["calls"])

    def images(self, role: str) -> int:
        """Image parts sent in calls of one role."""
        with self._lock:
            return int(self._usage[role]["images"])

    def usage(self) -> dict[str, dict[str, float]]:
        """``{role: {calls, completions, failures, prompt_tokens, completion_tokens, images, seconds}}`` + ``total``."""
        with self._lock:
            out = {role: dict(values) for role, values in self._usage.items()}
        out[TOTAL] = {key: sum(out[role][key] for role in ROLES) for key in _blank_usage()}
        for values in out.values():
            values["seconds"] = round(float(values["seconds"]), 3)
        return out

    @contextlib.contextmanager
    def active(self) -> Iterator[LMCallCounter]:
        """Count every LM call made inside the block (callbacks already in the context keep running)."""
        existing = list(dspy.settings.get("callbacks", None) or [])
        with dspy.context(callbacks=[*existing, self]):
            yield self


def role_from_output_fields(fields: Sequence[str]) -> str:
    """``verbalizer`` for the verbalizer's output fields, ``judge`` for the judge's, otherwise ``proposer``."""
    names = set(fields)
    if names == {DESCRIPTION_FIELD}:
        return "verbalizer"
    if {RATIONALE_FIELD, LABEL_FIELD} <= names:
        return "judge"
    return "proposer"


def _tokens_of(instance: Any, outputs: Any) -> tuple[int, int]:
    """Prompt and completion tokens of the call that returned ``outputs``."""
    usage = getattr(outputs, "usage", None)
    if usage is not None and not isinstance(outputs, list):  # an lm15 Response (explicit Request call)
        return int(getattr(usage, "input_tokens", 0) or 0), int(getattr(usage, "output_tokens", 0) or 0)
    history = getattr(instance, "history", None)
    if not isinstance(history, list) or outputs is None:
        return 0, 0
    for entry in reversed(history[-_HISTORY_SCAN:]):
        if isinstance(entry, Mapping) and entry.get("outputs") is outputs:
            found = entry.get("usage") or {}
            return int(found.get("prompt_tokens") or 0), int(found.get("completion_tokens") or 0)
    return 0, 0


# ---------------------------------------------------------------------------------------------- cheap program copies
def share_on_deepcopy(lm: Any) -> Any:
    """A copy of ``lm`` (same engine and settings, its own history) that ``copy.deepcopy`` returns unchanged.

    ``ImageJudge`` holds its LMs as plain attributes, so every ``program.deepcopy()`` an optimizer makes also
    deep-copies each LM *with its whole call history* (up to 10 000 entries of messages and responses): copies get
    slower as the run goes on. Programs built on shared LMs copy in constant time. The copy's class is a subclass of
    the LM's class whose ``__deepcopy__`` returns the instance itself (``lm.copy(...)`` of it keeps that
    behaviour for the new instance). The original LM is not modified.

    Args:
        lm: A ``dspy.BaseLM`` or ``None``.

    Returns:
        The shared copy (``lm`` itself if it is already one, or if it cannot be copied; ``None`` for ``None``).
    """
    if lm is None or getattr(lm, "_blpo_shared", False) or not callable(getattr(lm, "copy", None)):
        return lm
    shared = lm.copy()
    shared.__class__ = _shared_type(type(lm))
    return shared


def _deepcopy_returns_self(self: Any, memo: dict[int, Any]) -> Any:
    memo[id(self)] = self
    return self


_SHARED_TYPES: dict[type, type] = {}
_SHARED_TYPES_LOCK = threading.Lock()


def _shared_type(base: type) -> type:
    with _SHARED_TYPES_LOCK:
        shared = _SHARED_TYPES.get(base)
        if shared is None:
            shared = type(
                f"Shared{base.__name__}",
                (base,),
                {"__deepcopy__": _deepcopy_returns_self, "_blpo_shared": True, "__module__": base.__module__},
            )
            _SHARED_TYPES[base] = shared
        return shared


def share_program_lms(program: dspy.Module) -> dspy.Module:
    """Replace an ``ImageJudge``'s LM attributes by :func:`share_on_deepcopy` copies (in place); return it."""
    for attr in ("verbalizer_lm", "judge_lm"):
        if getattr(program, attr, None) is not None:
            setattr(program, attr, share_on_deepcopy(getattr(program, attr)))
    return program


# ---------------------------------------------------------------------------------------------- images out of proposers
def strip_images(value: Any, placeholder: str = IMAGE_PLACEHOLDER) -> Any:
    """A copy of ``value`` with every ``dspy.Image`` (and image custom-type marker in strings) replaced by text.

    Mappings, lists and tuples are walked recursively; other values are returned unchanged.
    """
    if isinstance(value, dspy.Image):
        return placeholder
    if isinstance(value, str):
        if "<<CUSTOM-TYPE-START-IDENTIFIER>>" not in value:
            return value
        return _CUSTOM_TYPE.sub(lambda m: placeholder if "image_url" in m.group(1) else m.group(0), value)
    if isinstance(value, Mapping):
        return {key: strip_images(item, placeholder) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(strip_images(item, placeholder) for item in value)
    return value


@functools.cache
def _gepa_instruction_proposer() -> type:
    from dspy.teleprompt.gepa.instruction_proposal import InstructionProposer

    class TextOnlyInstructionProposer(InstructionProposer):
        """GEPA's default instruction proposer with every image in the reflective dataset replaced by text.

        Use it when the reflection LM is text-only: the reflection LM then reads the inputs' text fields, the
        generated outputs (the verbalizer's descriptions, the judge's rationale and label) and the metric's
        feedback, never an image.
        """

        def _prepare_examples(self, examples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
            return [strip_images(dict(example)) for example in super()._prepare_examples(examples)]

    return TextOnlyInstructionProposer


def text_only_instruction_proposer(**kwargs: Any) -> Any:
    """A GEPA instruction proposer that never sends an image to the reflection LM.

    Args:
        **kwargs: Passed to ``dspy.teleprompt.gepa.instruction_proposal.InstructionProposer``.
    """
    return _gepa_instruction_proposer()(**kwargs)


@functools.cache
def _zero_shot_mipro() -> type:
    from dspy.teleprompt import MIPROv2

    class ZeroShotMIPROv2(MIPROv2):
        """MIPROv2 that skips demo bootstrapping when the proposer is not shown demos.

        In zero-shot mode MIPROv2 still bootstraps demo sets, only to show them to the instruction proposer
        (DSPy issue #9938). With ``fewshot_aware_proposer=False`` those program calls are wasted, and with a
        vision program the demos would carry images to the proposer. ``skip_bootstrap=True`` returns no demo
        candidates, which MIPROv2 handles (``N`` instructions per predictor, no demo parameters).
        """

        def __init__(self, *args: Any, skip_bootstrap: bool = True, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.skip_bootstrap = skip_bootstrap

        def _bootstrap_fewshot_examples(self, *args: Any, **kwargs: Any) -> Any:
            if self.skip_bootstrap:
                logger.info("MIPROv2: demo bootstrapping skipped (zero-shot, text-only proposer)")
                return None
            return super()._bootstrap_fewshot_examples(*args, **kwargs)

    return ZeroShotMIPROv2


# ---------------------------------------------------------------------------------------------- budget plans
@dataclass
class BudgetPlan:
    """How a call budget maps onto one built-in optimizer's own knobs.

    Attributes:
        optimizer: The optimizer name.
        budget_calls: The LM-call budget (``None``: the optimizer's defaults).
        init_kwargs: Constructor arguments (besides metric and LMs).
        compile_kwargs: ``compile`` arguments (besides the student and the data).
        estimated_calls: Upper estimate of LM calls before caching.
        within_budget: Whether the estimate fits the budget (``False``: the smallest meaningful run is larger).
        calls_per_example: LM calls per program run (judge + verbalizer calls per example, before caching).
        data: Which splits the optimizer receives (``"train/val"`` or ``"train+val"``).
        notes: What was fitted and what the optimizer cannot bound.
    """

    optimizer: str
    budget_calls: int | None
    init_kwargs: dict[str, Any] = field(default_factory=dict)
    compile_kwargs: dict[str, Any] = field(default_factory=dict)
    estimated_calls: int = 0
    within_budget: bool = True
    calls_per_example: int = 1
    data: str = "train/val"
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def calls_per_example(task: Task, judge_sees: str) -> int:
    """LM calls of one program run before caching: the judge, plus one verbalization per image in text modes."""
    return 1 + (len(task.image_fields) if judge_sees in ("text", "both") else 0)


def plan_budget(
    name: str,
    budget_calls: int | None,
    *,
    n_train: int,
    n_val: int,
    per_example: int,
    n_predictors: int = 2,
) -> BudgetPlan:
    """Fit an optimizer's knobs to a budget of LM calls.

    Args:
        name: One of :data:`BUILTIN_OPTIMIZERS`.
        budget_calls: Total LM calls allowed; ``None`` uses defaults close to DSPy's.
        n_train: Train split size.
        n_val: Validation split size.
        per_example: LM calls per program run (:func:`calls_per_example`).
        n_predictors: Predictors in the program (2 for an ``ImageJudge``).

    Returns:
        The :class:`BudgetPlan`.

    Raises:
        ValueError: Unknown optimizer name or a non-positive budget.
    """
    if name not in BUILTIN_OPTIMIZERS:
        raise ValueError(f"unknown built-in optimizer {name!r}; choose from {', '.join(BUILTIN_OPTIMIZERS)}")
    if budget_calls is not None and (isinstance(budget_calls, bool) or budget_calls < 1):
        raise ValueError(f"budget_calls must be a positive int or None, got {budget_calls!r}")
    planner = {
        "mipro": _plan_mipro,
        "copro": _plan_copro,
        "gepa": _plan_gepa,
        "simba": _plan_simba,
        "bootstrap": _plan_bootstrap,
    }[name]
    plan = planner(budget_calls, n_train, n_val, per_example, n_predictors)
    plan.calls_per_example = per_example
    if not plan.within_budget:
        logger.warning(
            "%s: the smallest run (~%d LM calls) exceeds the budget of %s calls",
            name,
            plan.estimated_calls,
            budget_calls,
        )
    return plan


_MIPRO_MINIBATCH_ABOVE = 50
_MIPRO_MINIBATCH_SIZE = 35
_MIPRO_FULL_EVAL_STEPS = 5


def _mipro_trials_recommended(k: int, n_predictors: int) -> int:
    # MIPROv2's own rule for zero-shot runs: max(2 * num_vars * log2(N), 1.5 * N)
    return math.ceil(max(2 * n_predictors * math.log2(max(k, 2)), 1.5 * k))


def _plan_mipro(budget: int | None, n_train: int, n_val: int, per: int, n_pred: int) -> BudgetPlan:
    summary = min(math.ceil(n_train / 10), 10) + 1  # dataset descriptor calls + the summarizer
    minibatch = n_val > _MIPRO_MINIBATCH_ABOVE
    mb = min(_MIPRO_MINIBATCH_SIZE, n_val)

    def proposer_calls(k: int) -> int:
        return summary + 3 * n_pred * k  # program-aware: describe program + describe module + generate, per proposal

    def eval_calls(trials: int) -> int:
        if not minibatch:
            return (1 + trials) * n_val * per
        full = trials // _MIPRO_FULL_EVAL_STEPS + 1
        return (n_val + trials * mb + full * n_val) * per

    chosen: tuple[int, int] | None = None
    if budget is None:
        chosen = (6, _mipro_trials_recommended(6, n_pred))
    else:
        for k in range(10, 1, -1):
            trials = 0
            while eval_calls(trials + 1) + proposer_calls(k) <= budget and trials < k**n_pred:
                trials += 1
            if trials >= _mipro_trials_recommended(k, n_pred) or (k == 2 and trials >= 1):
                chosen = (k, trials)
                break
    within = chosen is not None
    k, trials = chosen or (2, 1)
    estimate = proposer_calls(k) + eval_calls(trials)
    compile_kwargs: dict[str, Any] = {
        "num_trials": trials,
        "minibatch": minibatch,
        "max_bootstrapped_demos": 0,
        "max_labeled_demos": 0,
    }
    if minibatch:
        compile_kwargs.update(minibatch_size=mb, minibatch_full_eval_steps=_MIPRO_FULL_EVAL_STEPS)
    return BudgetPlan(
        "mipro",
        budget,
        init_kwargs={"auto": None, "num_candidates": k, "max_bootstrapped_demos": 0, "max_labeled_demos": 0},
        compile_kwargs=compile_kwargs,
        estimated_calls=estimate,
        within_budget=within,
        notes=f"{k} instruction candidates per predictor, {trials} trials on the valset"
        + (" (minibatches)" if minibatch else "")
        + "; proposer calls estimated for the program-aware proposer",
    )


def _plan_copro(budget: int | None, n_train: int, n_val: int, per: int, n_pred: int) -> BudgetPlan:
    n_data = n_train + n_val

    def cost(breadth: int, depth: int) -> int:
        evaluations = n_pred * breadth * depth * (depth + 1) // 2  # every round re-scores all candidates so far
        return n_pred * depth + evaluations * n_data * per

    chosen: tuple[int, int] | None = None
    if budget is None:
        chosen = (10, 3)
    else:
        for depth in (3, 2, 1):
            breadth = 10
            while breadth >= 2 and cost(breadth, depth) > budget:
                breadth -= 1
            if breadth >= 2:
                chosen = (breadth, depth)
                break
    within = chosen is not None
    breadth, depth = chosen or (2, 1)
    return BudgetPlan(
        "copro",
        budget,
        init_kwargs={"breadth": breadth, "depth": depth},
        estimated_calls=cost(breadth, depth),
        within_budget=within,
        data="train+val",
        notes=f"breadth {breadth}, depth {depth}; each candidate scored on train+val; a proposer call returns "
        f"breadth completions (n={breadth})",
    )


_GEPA_MINIBATCH = 3


def _plan_gepa(budget: int | None, n_train: int, n_val: int, per: int, n_pred: int) -> BudgetPlan:
    mb = min(_GEPA_MINIBATCH, n_train)
    minimum = n_val + 2 * mb
    if budget is None:
        return BudgetPlan(
            "gepa",
            None,
            init_kwargs={"auto": "light", "reflection_minibatch_size": mb},
            estimated_calls=0,
            notes="auto='light' (no budget given); estimate unknown before the run",
        )
    # metric calls M cost M * per program calls plus at most one reflection per 2 * mb metric calls;
    # keep one minibatch round of slack because GEPA checks the budget between iterations.
    metric_calls = math.floor((budget - 1) / (per + 1 / (2 * mb))) - 2 * mb
    within = metric_calls >= minimum
    metric_calls = max(metric_calls, minimum)
    estimate = metric_calls * per + math.ceil(metric_calls / (2 * mb)) + 1
    return BudgetPlan(
        "gepa",
        budget,
        init_kwargs={"max_metric_calls": metric_calls, "reflection_minibatch_size": mb},
        estimated_calls=estimate,
        within_budget=within,
        notes=f"max_metric_calls {metric_calls} (program runs); GEPA checks the budget between iterations and may "
        "overshoot by one valset evaluation",
    )


def _plan_simba(budget: int | None, n_train: int, n_val: int, per: int, n_pred: int) -> BudgetPlan:
    n_data = n_train + n_val

    def cost(bsize: int, n_cand: int, steps: int) -> int:
        per_step = bsize * n_cand * per + (n_cand + 1) + (n_cand + 1) * bsize * per
        return steps * per_step + min(steps + 1, n_cand + 1) * n_data * per

    shapes = [(min(32, n_data), 6), (min(16, n_data), 4), (min(8, n_data), 3), (min(4, n_data), 2)]
    chosen: tuple[int, int, int] | None = None
    if budget is None:
        chosen = (*shapes[0], 8)
    else:
        for bsize, n_cand in shapes:
            steps = 0
            while steps < 8 and cost(bsize, n_cand, steps + 1) <= budget:
                steps += 1
            if steps >= 1:
                chosen = (bsize, n_cand, steps)
                break
    within = chosen is not None
    bsize, n_cand, steps = chosen or (*shapes[-1], 1)
    return BudgetPlan(
        "simba",
        budget,
        init_kwargs={"bsize": bsize, "num_candidates": n_cand, "max_steps": steps, "max_demos": 0},
        estimated_calls=cost(bsize, n_cand, steps),
        within_budget=within,
        data="train+val",
        notes=f"bsize {bsize}, {n_cand} candidates, {steps} steps, rules only; final selection on train+val",
    )


def _plan_bootstrap(budget: int | None, n_train: int, n_val: int, per: int, n_pred: int) -> BudgetPlan:
    n_data = n_train + n_val
    limit = n_data if budget is None else max(1, min(n_data, budget // per))
    return BudgetPlan(
        "bootstrap",
        budget,
        init_kwargs={"max_bootstrapped_demos": 4, "max_labeled_demos": 0, "max_rounds": 1},
        compile_kwargs={"max_examples": limit},
        estimated_calls=limit * per,
        within_budget=budget is None or budget >= per,
        data="train+val",
        notes=f"teacher runs on at most {limit} examples (stops after 4 successful traces); no proposer",
    )


# ---------------------------------------------------------------------------------------------- the adapter
_DIAGNOSTIC_ATTRS = (
    "candidate_programs",
    "mb_candidate_programs",
    "trial_logs",
    "detailed_results",
    "score",
    "prompt_model_total_calls",
    "total_calls",
)
_CACHED_VERBALIZATIONS = frozenset({"mipro", "copro"})  # optimizers that only score programs (no traces, no demos)


class BuiltinOptimizer(Teleprompter):
    """One of DSPy's built-in optimizers on an ``ImageJudge``, with a fitted budget and per-role call counts.

    Build it with :func:`make_optimizer`. ``compile`` fits the budget to the split sizes (:func:`plan_budget`),
    runs the DSPy optimizer under an :class:`LMCallCounter`, and returns the optimizer's program carrying
    ``usage_`` (measured calls, tokens and images per role), ``history_`` (JSON-ready trace of the search),
    ``budget_plan_``, ``best_instructions_`` and ``optimizer_name_``. The student is not modified.

    Args:
        name: One of :data:`BUILTIN_OPTIMIZERS`.
        task: The task (for the metric); defaults to the student's task at compile time.
        proposer_lm: The LM proposing instructions (MIPROv2 prompt model, COPRO prompt model, GEPA reflection LM,
            SIMBA prompt model). Unused by ``bootstrap``.
        budget_calls: Total LM calls to fit the optimizer into (``None``: defaults close to DSPy's).
        seed: Seed passed to the optimizer.
        num_threads: Threads for the optimizer's evaluations.
        proposer_supports_images: Whether the proposer LM accepts images. ``False`` (default) keeps every image
            away from it (see the module docstring); ``True`` lets MIPROv2 show bootstrapped demos and GEPA show
            the reflective examples' images.
        overrides: Extra constructor arguments for the DSPy optimizer (applied after the plan).
    """

    def __init__(
        self,
        name: str,
        *,
        task: Task | None = None,
        proposer_lm: dspy.LM | None = None,
        budget_calls: int | None = None,
        seed: int = 0,
        num_threads: int = 8,
        proposer_supports_images: bool = False,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if name not in BUILTIN_OPTIMIZERS:
            raise ValueError(f"unknown built-in optimizer {name!r}; choose from {', '.join(BUILTIN_OPTIMIZERS)}")
        if name != "bootstrap" and proposer_lm is None:
            raise ValueError(f"{name} needs a proposer_lm")
        if budget_calls is not None and (isinstance(budget_calls, bool) or not isinstance(budget_calls, int)):
            raise ValueError(f"budget_calls must be an int or None, got {budget_calls!r}")
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads must be an int >= 1, got {num_threads!r}")
        self.name = name
        self.task = task
        self.proposer_lm = proposer_lm
        self.budget_calls = budget_calls
        self.seed = seed
        self.num_threads = num_threads
        self.proposer_supports_images = bool(proposer_supports_images)
        self.overrides = dict(overrides or {})

    def plan(self, student: dspy.Module, trainset: Sequence[Any], valset: Sequence[Any]) -> BudgetPlan:
        """The budget plan this optimizer would use on these splits."""
        task = self.task or student.task
        return plan_budget(
            self.name,
            self.budget_calls,
            n_train=len(trainset),
            n_val=len(valset),
            per_example=calls_per_example(task, getattr(student, "judge_sees", "image")),
            n_predictors=len(student.predictors()),
        )

    def compile(
        self,
        student: dspy.Module,
        *,
        trainset: list[dspy.Example],
        teacher: dspy.Module | None = None,
        valset: list[dspy.Example] | None = None,
        **kwargs: Any,
    ) -> dspy.Module:
        """Run the DSPy optimizer on a copy of ``student``.

        Args:
            student: An ``ImageJudge``.
            trainset: The optimisation split.
            teacher: Unused (must be ``None``).
            valset: The validation split (defaults to the trainset, with a warning).
            **kwargs: Not accepted (a ``TypeError`` names them).

        Returns:
            The optimized program with ``usage_``, ``history_``, ``budget_plan_``, ``best_instructions_`` and
            ``optimizer_name_``.
        """
        trainset, valset = check_compile_inputs(self.name, student, trainset, teacher, valset, kwargs)
        task = self.task or student.task
        plan = self.plan(student, trainset, valset)
        judge_lm = getattr(student, "judge_lm", None) or dspy.settings.lm
        if judge_lm is None:
            raise ValueError("no LM for the judge: give the program a judge_lm or call dspy.configure(lm=...)")
        if self.name == "simba":
            _check_single_lm(student, judge_lm)

        counter = LMCallCounter()
        program = share_program_lms(student.deepcopy())
        began = time.perf_counter()
        with contextlib.ExitStack() as stack:
            if self.name in _CACHED_VERBALIZATIONS and getattr(program, "judge_sees", "image") != "image":
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="blpo-builtin-"))
                program.set_cache(VerbalizationCache(Path(tmp) / "verbalizations.sqlite"))
            stack.enter_context(counter.active())
            stack.enter_context(dspy.context(lm=judge_lm))
            compiled = self._run(plan, task, program, list(trainset), list(valset), judge_lm)
            if hasattr(compiled, "set_cache"):
                compiled.set_cache(None)
            if hasattr(program, "set_cache"):
                program.set_cache(None)
        elapsed = time.perf_counter() - began
        history = _history_of(self.name, compiled)
        for attr in _DIAGNOSTIC_ATTRS:
            if attr in compiled.__dict__:
                delattr(compiled, attr)
        compiled.usage_ = counter.usage()
        compiled.history_ = history
        compiled.budget_plan_ = plan.to_dict()
        compiled.optimizer_name_ = self.name
        compiled.best_instructions_ = dict(compiled.instructions) if hasattr(compiled, "instructions") else {}
        compiled.wall_seconds_ = round(elapsed, 3)
        compiled._compiled = True
        logger.info(
            "%s finished in %.1fs: LM calls %s (plan estimated %d)",
            self.name,
            elapsed,
            {role: values["calls"] for role, values in compiled.usage_.items()},
            plan.estimated_calls,
        )
        return compiled

    # ------------------------------------------------------------------ one optimizer each
    def _run(
        self,
        plan: BudgetPlan,
        task: Task,
        program: dspy.Module,
        trainset: list[dspy.Example],
        valset: list[dspy.Example],
        judge_lm: dspy.LM,
    ) -> dspy.Module:
        init = {**plan.init_kwargs, **self.overrides}
        metric = as_dspy_metric(task)
        if self.name == "mipro":
            mipro_cls = _zero_shot_mipro()
            optimizer = mipro_cls(
                metric=metric,
                prompt_model=self.proposer_lm,
                task_model=judge_lm,
                num_threads=self.num_threads,
                seed=self.seed,
                verbose=False,
                skip_bootstrap=not self.proposer_supports_images,
                **init,
            )
            return optimizer.compile(
                program,
                trainset=trainset,
                valset=valset,
                fewshot_aware_proposer=self.proposer_supports_images,
                **plan.compile_kwargs,
            )
        if self.name == "copro":
            from dspy.teleprompt import COPRO

            optimizer = COPRO(prompt_model=self.proposer_lm, metric=metric, **init)
            return optimizer.compile(
                program,
                trainset=trainset + valset,
                eval_kwargs={"num_threads": self.num_threads, "display_progress": False},
            )
        if self.name == "gepa":
            from dspy.teleprompt import GEPA

            if "instruction_proposer" not in init and not self.proposer_supports_images:
                init["instruction_proposer"] = text_only_instruction_proposer()
            init.setdefault("track_stats", True)  # candidates and scores become history_
            optimizer = GEPA(
                metric=as_dspy_metric(task, feedback=True),
                reflection_lm=self.proposer_lm,
                num_threads=self.num_threads,
                seed=self.seed,
                **init,
            )
            return optimizer.compile(program, trainset=trainset, valset=valset)
        if self.name == "simba":
            from dspy.teleprompt import SIMBA

            optimizer = SIMBA(metric=metric, prompt_model=self.proposer_lm, num_threads=self.num_threads, **init)
            return optimizer.compile(program, trainset=trainset + valset, seed=self.seed)
        from dspy.teleprompt import BootstrapFewShot

        optimizer = BootstrapFewShot(metric=metric, **init)
        data = (trainset + valset)[: plan.compile_kwargs.get("max_examples")]
        return optimizer.compile(program, trainset=data)


def _check_single_lm(student: dspy.Module, judge_lm: dspy.LM) -> None:
    """SIMBA puts one LM on every predictor: refuse programs whose roles need different LMs."""
    if getattr(student, "judge_sees", "image") == "image":
        return
    verbalizer_lm = getattr(student, "verbalizer_lm", None) or dspy.settings.lm
    if verbalizer_lm is judge_lm or lm_identity(verbalizer_lm) == lm_identity(judge_lm):
        return
    raise ValueError(
        "SIMBA runs every predictor on one LM during its rollouts (it calls set_lm on the program), so a program "
        "whose judge reads verbalizations needs the same LM for the verbalizer and the judge "
        f"(got verbalizer {lm_identity(verbalizer_lm)['model']!r}, judge {lm_identity(judge_lm)['model']!r}); "
        "use one vision LM for both roles, judge_sees='image', or another optimizer"
    )


def _json_safe(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth > 6:
        return None
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if isinstance(item, dspy.Module) or callable(item):
                continue
            out[str(key)] = _json_safe(item, depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [_json_safe(item, depth + 1) for item in value if not isinstance(item, dspy.Module)]
    return None


def _instructions_of(program: Any) -> dict[str, str] | None:
    if isinstance(program, dspy.Module):
        return {name: predictor.signature.instructions for name, predictor in program.named_predictors()}
    return None


def _history_of(name: str, program: dspy.Module) -> list[dict[str, Any]]:
    """A JSON-ready record of what the optimizer tried, from the diagnostics it attached to the program."""
    history: list[dict[str, Any]] = []
    if name == "gepa" and getattr(program, "detailed_results", None) is not None:
        results = program.detailed_results
        for i, candidate in enumerate(getattr(results, "candidates", []) or []):
            scores = getattr(results, "val_aggregate_scores", []) or []
            parents = getattr(results, "parents", []) or []
            history.append(
                {
                    "candidate": i,
                    "instructions": _instructions_of(candidate) or _json_safe(candidate),
                    "val_score": _json_safe(scores[i]) if i < len(scores) else None,
                    "parents": _json_safe(parents[i]) if i < len(parents) else None,
                }
            )
        return history
    for entry in getattr(program, "candidate_programs", None) or []:
        if isinstance(entry, Mapping):
            record = {k: _json_safe(v) for k, v in entry.items() if k not in ("program",)}
            record["instructions"] = _instructions_of(entry.get("program"))
            history.append(record)
    trial_logs = getattr(program, "trial_logs", None)
    if isinstance(trial_logs, Mapping) and trial_logs:
        history.append({"trial_logs": _json_safe(trial_logs)})
    if name == "bootstrap":
        history.append({"demos": {n: len(p.demos) for n, p in program.named_predictors()}})
    return history


def make_optimizer(
    name: str,
    *,
    task: Task | None = None,
    proposer_lm: dspy.LM | None = None,
    budget_calls: int | None = None,
    seed: int = 0,
    num_threads: int = 8,
    proposer_supports_images: bool = False,
    **overrides: Any,
) -> BuiltinOptimizer:
    """A DSPy built-in optimizer set up for an ``ImageJudge`` (see the module docstring for the settings).

    Args:
        name: ``"mipro"``, ``"copro"``, ``"gepa"``, ``"simba"`` or ``"bootstrap"``.
        task: The judging task (defaults to the student's at compile time).
        proposer_lm: The proposer / reflection LM (text-only unless ``proposer_supports_images``).
        budget_calls: Total LM calls to fit the optimizer into; ``None`` for defaults close to DSPy's.
        seed: Optimizer seed.
        num_threads: Evaluation threads.
        proposer_supports_images: Let MIPROv2/GEPA show images to the proposer.
        **overrides: Extra constructor arguments of the DSPy optimizer (e.g. ``use_merge=False`` for GEPA).

    Returns:
        A :class:`BuiltinOptimizer`.

    Example:
        >>> opt = make_optimizer("gepa", proposer_lm=text_lm, budget_calls=400)  # doctest: +SKIP
        >>> compiled = opt.compile(ImageJudge(task, judge_lm=vlm), trainset=train, valset=val)  # doctest: +SKIP
        >>> compiled.usage_["proposer"]["images"]  # doctest: +SKIP
        0
    """
    return BuiltinOptimizer(
        name,
        task=task,
        proposer_lm=proposer_lm,
        budget_calls=budget_calls,
        seed=seed,
        num_threads=num_threads,
        proposer_supports_images=proposer_supports_images,
        overrides=overrides,
    )
