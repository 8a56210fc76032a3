"""DSPy 3.4 engines for the embedded offline stack.

* :func:`local_lm` / :class:`LlamaCppEngine`: a local GGUF model (embedded Qwen2.5-Coder-Instruct, assembled
  from hash-pinned PyPI chunk packages, or the user's own file via ``BLPO_GGUF``) run in process by llama.cpp
  (``xllamacpp``), greedy, with JSON-schema constrained replies rendered in the adapter's format.
* :func:`factsheet_lm` / :class:`FactSheetEngine`: the offline verbalizer. It measures colours, shapes,
  counts, layout and OCR text with OpenCV and RapidOCR and has the local text LM rewrite those facts under the
  verbalizer instruction. It does not see objects or style (:data:`FACTSHEET_LIMITATIONS`).

Nothing heavy is imported until used: ``xllamacpp`` loads with the first model, RapidOCR with the first image.
"""

from blpo_dspy.engines.factsheet import (
    FACTSHEET_LIMITATIONS,
    FactSheet,
    FactSheetEngine,
    compute_fact_sheet,
    factsheet_lm,
)
from blpo_dspy.engines.llamacpp import LlamaCppEngine, local_lm, release_models
from blpo_dspy.engines.weights import (
    DEFAULT_MODEL,
    MODELS,
    ModelIntegrityError,
    ModelNotInstalledError,
    ModelSpec,
    ensure_model,
)

__all__ = [
    "DEFAULT_MODEL",
    "FACTSHEET_LIMITATIONS",
    "MODELS",
    "FactSheet",
    "FactSheetEngine",
    "LlamaCppEngine",
    "ModelIntegrityError",
    "ModelNotInstalledError",
    "ModelSpec",
    "compute_fact_sheet",
    "ensure_model",
    "factsheet_lm",
    "local_lm",
    "release_models",
]
