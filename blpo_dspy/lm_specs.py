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
        from blpo_dspy.engines import local_role_lm

        model = spec.split(":", 1)[1] if ":" in spec else None
        return local_role_lm(role, model=model, rewrite=spec != "factsheet")
    kwargs: dict[str, Any] = {"temperature": temperature}
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    return dspy.LM(spec, **kwargs)
