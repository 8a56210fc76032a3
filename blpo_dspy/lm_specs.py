"""Turning LM spec strings from the command line into ``dspy.LM`` objects.

- ``local`` / ``local:0.5b`` / ``local:1.5b`` / ``local:/path/model.gguf``: the embedded llama.cpp engine
  (``pip install "blpo-dspy[local]"``). As a verbalizer, ``local`` means the fact-sheet verbalizer (OpenCV + OCR
  facts rewritten by the local LM): it sees colours, shapes, counts, layout and text, not objects or style.
- ``factsheet``: the fact-sheet verbalizer without the LM rewrite (fastest).
- ``py:package.module:attribute``: an LM built by your own Python code, for custom engines, clients that need
  authentication, or test doubles. The attribute (a dotted path inside the module is allowed) is either a
  ``dspy.LM`` instance, used for the role as is, or a callable called as ``attribute(role=role)`` that returns a
  ``dspy.LM`` (``role`` is ``"verbalizer"``, ``"judge"`` or ``"proposer"``). The module must be importable
  (installed, or on ``PYTHONPATH``); importing it runs its code, as ``python -m`` would. For example, with
  ``my_lms.py`` on ``PYTHONPATH``::

      import dspy

      def judge_lm(role: str) -> dspy.LM:
          return dspy.LM("openai/my-model", api_base="https://llm.internal/v1", temperature=0.0)

  and ``blpo compile ... --judge-lm py:my_lms:judge_lm``.
- anything else: a DSPy/LiteLLM model string (``openai/gpt-4o-mini``, ``anthropic/...``, ``ollama_chat/llava``);
  credentials come from the usual environment variables and are never written to artifacts.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from typing import Any

import dspy

logger = logging.getLogger(__name__)

LOCAL_PREFIX = "local"
PYTHON_PREFIX = "py:"
_DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def build_lm(spec: str, *, role: str, temperature: float = 0.0, max_tokens: int | None = None) -> dspy.LM:
    """Build the LM for one role from a spec string.

    Args:
        spec: The spec (see the module docstring).
        role: ``"verbalizer"``, ``"judge"`` or ``"proposer"``.
        temperature: Decoding temperature for remote models.
        max_tokens: Optional completion cap for remote models.

    Raises:
        ValueError: An empty spec, or a ``py:`` spec that is malformed, names a module or attribute that cannot be
            found, or does not give a ``dspy.LM`` (the message names the spec).
    """
    spec = spec.strip()
    if not spec:
        raise ValueError(f"empty LM spec for the {role}")
    if spec.startswith(PYTHON_PREFIX):
        return python_lm(spec, role=role)
    if spec == "factsheet" or spec == LOCAL_PREFIX or spec.startswith(LOCAL_PREFIX + ":"):
        model = spec.split(":", 1)[1] if ":" in spec else None
        return local_role_lm(role, model=model, rewrite=spec != "factsheet")
    kwargs: dict[str, Any] = {"temperature": temperature}
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    return dspy.LM(spec, **kwargs)


def python_lm(spec: str, *, role: str) -> dspy.LM:
    """Build the LM for one role from a ``py:package.module:attribute`` spec.

    The attribute is a ``dspy.LM`` (returned as is) or a callable called as ``attribute(role=role)`` returning one.

    Args:
        spec: ``py:`` followed by a dotted module path, a colon and a (dotted) attribute path.
        role: ``"verbalizer"``, ``"judge"`` or ``"proposer"``; passed to a callable attribute.

    Returns:
        The ``dspy.LM``.

    Raises:
        ValueError: A malformed spec, a module that cannot be imported, a missing attribute, a callable that does
            not take ``role=``, or a result that is not a ``dspy.LM``; the message names the spec.
    """
    spec = spec.strip()
    target = spec.removeprefix(PYTHON_PREFIX)
    module_name, sep, attribute = target.partition(":")
    if not sep or not _DOTTED_NAME.fullmatch(module_name) or not _DOTTED_NAME.fullmatch(attribute):
        raise ValueError(
            f"LM spec {spec!r} for the {role}: expected 'py:package.module:attribute' (Python names separated by dots)"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"LM spec {spec!r} for the {role}: cannot import module {module_name!r} ({exc}); "
            "is it installed or on PYTHONPATH?"
        ) from exc
    value: Any = module
    for part in attribute.split("."):
        if not hasattr(value, part):
            raise ValueError(f"LM spec {spec!r} for the {role}: module {module_name!r} has no attribute {attribute!r}")
        value = getattr(value, part)
    if not isinstance(value, dspy.LM):
        if not callable(value):
            raise ValueError(
                f"LM spec {spec!r} for the {role}: {attribute!r} is of type {type(value).__name__}, "
                "neither a dspy.LM nor a callable returning one"
            )
        try:
            inspect.signature(value).bind(role=role)
        except TypeError as exc:
            raise ValueError(
                f"LM spec {spec!r} for the {role}: {attribute!r} must accept a 'role' keyword argument ({exc})"
            ) from exc
        except ValueError:  # no signature available (some builtins): just call it
            pass
        value = value(role=role)
        if not isinstance(value, dspy.LM):
            raise ValueError(
                f"LM spec {spec!r} for the {role}: {attribute!r}(role={role!r}) returned an object of type "
                f"{type(value).__name__}, not a dspy.LM"
            )
    logger.debug("LM for the %s from %s: %s", role, spec, getattr(value, "model", "?"))
    return value


LOCAL_ALIASES = {"0.5b": "qwen2.5-coder-0.5b", "1.5b": "qwen2.5-coder-1.5b"}
PROPOSER_MAX_TOKENS = 200
JUDGE_MAX_TOKENS = 96
RATIONALE_MAX_CHARS = 160  # small models ramble; a short rationale keeps a judge call to a few seconds on a CPU
VERBALIZATION_MAX_TOKENS = 110


def local_role_lm(role: str, *, model: str | None = None, rewrite: bool = True) -> dspy.LM:
    """The embedded offline LM for one role (one model load shared by every role in the process).

    Args:
        role: ``"verbalizer"`` gets the fact-sheet verbalizer (OpenCV + OCR facts, rewritten by the local LM under
            the I2T instruction unless ``rewrite`` is false); other roles get the local text LM.
        model: ``"0.5b"`` (default), ``"1.5b"``, an embedded model name, or a GGUF path.
        rewrite: For the verbalizer: have the local LM rewrite the fact sheet under the instruction.
    """
    from blpo_dspy.engines import factsheet_lm, local_lm

    name = LOCAL_ALIASES.get(model or "", model)
    if role == "verbalizer":
        text_lm = local_lm(name) if rewrite else None
        return factsheet_lm(text_lm, rewrite=rewrite, rewrite_max_tokens=VERBALIZATION_MAX_TOKENS)
    if role == "proposer":
        return local_lm(name, max_tokens=PROPOSER_MAX_TOKENS)
    return local_lm(name, max_tokens=JUDGE_MAX_TOKENS, max_chars={"rationale": RATIONALE_MAX_CHARS})
