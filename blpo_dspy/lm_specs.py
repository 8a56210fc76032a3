"""Turning LM spec strings from the command line into ``dspy.LM`` objects.

- ``local`` / ``local:0.5b`` / ``local:1.5b`` / ``local:/path/model.gguf``: the embedded llama.cpp engine
  (``pip install "blpo-dspy[local]"``). As a verbalizer, ``local`` means the fact-sheet verbalizer (OpenCV + OCR
  facts rewritten by the local LM): it sees colours, shapes, counts, layout and text, not objects or style.
- ``factsheet``: the fact-sheet verbalizer without the LM rewrite (fastest).
- anything else: a DSPy/LiteLLM model string (``openai/gpt-4o-mini``, ``anthropic/...``, ``ollama_chat/llava``);
  credentials come from the usual environment variables and are never written to artifacts.
"""

from __future__ import annotations

from typing import Any

import dspy

LOCAL_PREFIX = "local"


def build_lm(spec: str, *, role: str, temperature: float = 0.0, max_tokens: int | None = None) -> dspy.LM:
    """Build the LM for one role from a spec string.

    Args:
        spec: The spec (see the module docstring).
        role: ``"verbalizer"``, ``"judge"`` or ``"proposer"``.
        temperature: Decoding temperature for remote models.
        max_tokens: Optional completion cap for remote models.

    Raises:
        ValueError: An empty spec.
    """
    spec = spec.strip()
    if not spec:
        raise ValueError(f"empty LM spec for the {role}")
    if spec == "factsheet" or spec == LOCAL_PREFIX or spec.startswith(LOCAL_PREFIX + ":"):
        model = spec.split(":", 1)[1] if ":" in spec else None
        return local_role_lm(role, model=model, rewrite=spec != "factsheet")
    kwargs: dict[str, Any] = {"temperature": temperature}
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    return dspy.LM(spec, **kwargs)


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
