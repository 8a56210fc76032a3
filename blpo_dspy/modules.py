"""DSPy modules: the Verbalizer (image-to-text, instruction q), the Judge (instruction p) and ImageJudge.

LMs are held as plain attributes and applied with ``dspy.context(lm=...)`` inside ``forward``: a predictor's own
``.lm`` is dropped by ``reset_copy()`` (BootstrapFewShot) and mixed predictor LMs crash SIMBA, whereas plain
attributes survive ``deepcopy`` and every built-in optimizer. Instructions are only ever set with
``pred.signature = pred.signature.with_instructions(text)``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import dspy

from blpo_dspy.dspy_objects import make_prediction, prediction_fields
from blpo_dspy.task import JUDGE_SEES, LABEL_FIELD, RATIONALE_FIELD, JudgeSees, Task

if TYPE_CHECKING:
    from blpo_dspy.cache import VerbalizationCache

logger = logging.getLogger(__name__)

VERBALIZER = "verbalizer"
JUDGE = "judge"


@contextlib.contextmanager
def _lm_context(lm: dspy.LM | None) -> Iterator[None]:
    if lm is None:
        yield
    else:
        with dspy.context(lm=lm):
            yield


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 500 else text[:497] + "..."


_read_attribute = object.__getattribute__


class _Module(dspy.Module):
    """A ``dspy.Module`` whose attribute reads are Python's own.

    ``dspy.Module.__getattribute__`` runs Python code on every attribute read of a module, only to warn when
    ``forward`` is read from anywhere but ``Module.__call__``; this project's modules read several attributes per
    call, so they use the built-in lookup and give the same warning from ``forward`` itself
    (:meth:`_warn_forward_called_directly`). Everything ``dspy.Module.__call__`` does (callbacks, caller modules,
    histories, usage tracking) is unchanged.
    """

    __getattribute__ = object.__getattribute__

    def _warn_forward_called_directly(self) -> None:
        """DSPy's warning for a ``forward`` not called by ``Module.__call__`` (checked by each ``forward``)."""
        logger.warning(
            "Calling module.forward(...) on %s directly is discouraged. Please use module(...) instead.",
            type(self).__name__,
        )


class Verbalizer(_Module):
    """Image-to-text module g(x; q): one image (+ the task's text fields) -> ``description``.

    Args:
        task: The judging task.
        instruction: The I2T instruction q (defaults to the task card's seed instruction).
    """

    def __init__(self, task: Task, instruction: str | None = None) -> None:
        super().__init__()
        self.task = task
        self.predict = dspy.Predict(task.verbalizer_signature(instruction))
        self.cache: VerbalizationCache | None = None

    @property
    def instruction(self) -> str:
        """The current I2T instruction q."""
        return self.predict.signature.instructions

    def set_instruction(self, text: str) -> None:
        """Replace the I2T instruction (through ``with_instructions``, never by mutation)."""
        self.predict.signature = self.predict.signature.with_instructions(text)

    def forward(self, image: dspy.Image, **text_fields: Any) -> dspy.Prediction:
        """Describe one image. Raises on LM failure (callers decide how to score it)."""
        if sys._getframe(1).f_code.co_name != "__call__":
            self._warn_forward_called_directly()
        fields = {name: text_fields.get(name, "") for name in self.task.text_fields}
        lm = dspy.settings.lm
        if self.cache is not None and lm is not None:
            return self.cache.get_or_compute(
                image=image,
                instruction=self.instruction,
                lm=lm,
                text_fields=fields,
                compute=lambda: self.predict(image=image, **fields).description,
            )
        description = self.predict(image=image, **fields).description
        return dspy.Prediction(description=description, cached=False)


class Judge(_Module):
    """The judge f(x; p): image(s) and/or verbalization(s) + text fields -> rationale + canonical label.

    The LM's label is parsed leniently with ``Task.parse_label``; an unparseable answer or a failed call becomes a
    prediction with ``label=None`` and ``error`` set, never an exception.

    Args:
        task: The judging task.
        judge_sees: ``"image"``, ``"text"`` or ``"both"``.
        instruction: The judge instruction p (defaults to the card's seed instruction).
    """

    def __init__(self, task: Task, judge_sees: JudgeSees = "image", instruction: str | None = None) -> None:
        super().__init__()
        self.task = task
        self.judge_sees = judge_sees
        self.predict = dspy.Predict(task.judge_signature(judge_sees, instruction))
        self._inputs_of: tuple[Any, frozenset[str]] = (None, frozenset())

    @property
    def instruction(self) -> str:
        """The current judge instruction p."""
        return self.predict.signature.instructions

    def set_instruction(self, text: str) -> None:
        """Replace the judge instruction (through ``with_instructions``)."""
        self.predict.signature = self.predict.signature.with_instructions(text)

    def forward(self, **inputs: Any) -> dspy.Prediction:
        """Judge one example; never raises for an LM failure or an unparseable label."""
        if sys._getframe(1).f_code.co_name != "__call__":
            self._warn_forward_called_directly()
        return self.run(inputs)

    def run(self, inputs: Mapping[str, Any]) -> dspy.Prediction:
        """What :meth:`forward` does, for a caller that is already a DSPy module call (``ImageJudge``).

        The predictor call goes through DSPy as usual (callbacks, history, usage tracking, traces); only this
        module's own ``__call__`` layer is skipped. Inputs the signature does not read are ignored.
        """
        predict = self.predict
        signature = _read_attribute(predict, "signature")  # a dspy.Predict reads attributes through a Python hook
        inputs_of = self._inputs_of
        if inputs_of[0] is not signature:  # input_fields builds a new dict on every access
            inputs_of = self._inputs_of = (signature, frozenset(signature.input_fields))
        wanted = inputs_of[1]
        try:
            raw = predict(**(inputs if wanted.issuperset(inputs) else {k: v for k, v in inputs.items() if k in wanted}))
        except Exception as exc:  # a failed call is a scored failure, not a crash
            logger.debug("judge call failed: %s", _error_text(exc))
            return make_prediction({"label": None, "raw_label": None, "rationale": "", "error": _error_text(exc)})
        fields = prediction_fields(raw) if type(raw) is dspy.Prediction else raw
        raw_label = fields.get(LABEL_FIELD)
        label = self.task.parse_label(raw_label)
        return make_prediction(
            {
                "label": label,
                "raw_label": raw_label,
                "rationale": fields.get(RATIONALE_FIELD) or "",
                "error": None if label is not None else f"unparseable label: {str(raw_label)[:80]!r}",
            }
        )


class ImageJudge(_Module):
    """A judge program: Verbalizer (q) + Judge (p) for one task.

    With ``judge_sees="image"`` (the paper's setting) the judge reads the image and the verbalizer serves the
    optimizer only; ``"text"`` makes a cheap text judge over verbalizations; ``"both"`` gives the judge both.

    One call is one DSPy module call (this program's) around its predictor calls: the inner ``Judge`` runs through
    :meth:`Judge.run`, not a second module call, so DSPy callbacks and module histories see ``ImageJudge`` and the
    predictors (whose calls, traces and usage are recorded as usual) but not the ``Judge`` wrapper in between.

    Args:
        task: The task (a ``Task`` or a built-in task name).
        judge_sees: What the judge reads.
        verbalizer_lm: LM for the verbalizer (vision); ``None`` uses the configured ``dspy.settings.lm``.
        judge_lm: LM for the judge; ``None`` uses the configured LM.

    Example:
        >>> program = ImageJudge("alignment", judge_sees="text")  # doctest: +SKIP
        >>> program(image=dspy.Image.from_path("cat.png"), prompt="a cat").label  # doctest: +SKIP
        'yes'
    """

    def __init__(
        self,
        task: Task | str,
        judge_sees: JudgeSees = "image",
        verbalizer_lm: dspy.LM | None = None,
        judge_lm: dspy.LM | None = None,
    ) -> None:
        super().__init__()
        if judge_sees not in JUDGE_SEES:
            raise ValueError(f"judge_sees must be one of {JUDGE_SEES}, got {judge_sees!r}")
        self.task = task if isinstance(task, Task) else Task.load(task)
        self.judge_sees = judge_sees
        self.verbalizer_lm = verbalizer_lm
        self.judge_lm = judge_lm
        self.verbalizer = Verbalizer(self.task)
        self.judge = Judge(self.task, judge_sees)

    def __deepcopy__(self, memo: dict[int, Any]) -> ImageJudge:
        """Deep-copy the program but share its LMs (copying an LM would copy its whole call history)."""
        for lm in (self.__dict__.get("verbalizer_lm"), self.__dict__.get("judge_lm")):
            if lm is not None:
                memo.setdefault(id(lm), lm)
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    # ------------------------------------------------------------------ instructions
    @property
    def instructions(self) -> dict[str, str]:
        """``{"verbalizer": q, "judge": p}``."""
        return {VERBALIZER: self.verbalizer.instruction, JUDGE: self.judge.instruction}

    def with_instructions(self, *, verbalizer: str | None = None, judge: str | None = None) -> ImageJudge:
        """A deep copy with the given instructions replaced (the original is left untouched)."""
        program = self.deepcopy()
        if verbalizer is not None:
            program.verbalizer.set_instruction(verbalizer)
        if judge is not None:
            program.judge.set_instruction(judge)
        return program

    def set_cache(self, cache: VerbalizationCache | None) -> None:
        """Attach a verbalization cache used by the verbalizer in ``forward``."""
        self.verbalizer.cache = cache

    # ------------------------------------------------------------------ calls
    def verbalize(self, **inputs: Any) -> dict[str, str]:
        """Verbalize every image field of one example under the current q: ``{description_field: text}``.

        Raises:
            Exception: the verbalizer LM's error (callers turn it into a scored failure).
        """
        text = {name: inputs.get(name, "") for name in self.task.text_fields}
        out: dict[str, str] = {}
        with _lm_context(self.verbalizer_lm):
            for image_field, desc_field in zip(self.task.image_fields, self.task.description_fields, strict=True):
                out[desc_field] = self.verbalizer(image=inputs[image_field], **text).description
        return out

    def forward(self, **inputs: Any) -> dspy.Prediction:
        """Judge one example. Returns a prediction with ``label`` (canonical or ``None``), ``raw_label``,
        ``rationale``, ``error`` and, when the judge reads text, the verbalizations."""
        if sys._getframe(1).f_code.co_name != "__call__":
            self._warn_forward_called_directly()
        descriptions: dict[str, str] = {}
        if self.judge_sees in ("text", "both"):
            try:
                descriptions = self.verbalize(**inputs)
            except Exception as exc:
                logger.debug("verbalizer call failed: %s", _error_text(exc))
                return make_prediction(
                    {"label": None, "raw_label": None, "rationale": "", "error": "verbalizer: " + _error_text(exc)}
                )
        judge_inputs = {**inputs, **descriptions} if descriptions else inputs
        lm = self.judge_lm
        if lm is None or dspy.settings.lm is lm:  # already the current LM (one context per loop, or configured)
            result = self.judge.run(judge_inputs)
        else:
            with dspy.context(lm=lm):
                result = self.judge.run(judge_inputs)
        if descriptions:
            result = make_prediction({**result.toDict(), **descriptions})
        return result


def named_instruction_predictors(program: dspy.Module) -> Mapping[str, dspy.Predict]:
    """The verbalizer and judge predictors of an ``ImageJudge`` (or any module holding ``verbalizer``/``judge``)."""
    return {VERBALIZER: program.verbalizer.predict, JUDGE: program.judge.predict}
