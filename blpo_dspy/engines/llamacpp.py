"""A DSPy 3.4 engine running a GGUF model in process with llama.cpp (the prebuilt ``xllamacpp`` wheel).

``local_lm()`` gives a ``dspy.LM`` on the embedded Qwen2.5-Coder-Instruct model (see
:mod:`blpo_dspy.engines.weights`) or on a user GGUF file. Decoding is greedy (temperature 0, top-k 1). For
ChatAdapter and JSONAdapter requests the engine reads the output fields from DSPy's system prompt, generates
JSON constrained by a schema in which every string has a ``maxLength`` (label-like fields are restricted to
their labels), and renders the result back in the adapter's format. Any other request (a proposer calling
the LM with plain messages) is answered with free text.

Measured facts this design relies on (xllamacpp 2026.10.11549, 2 threads): concurrent
``handle_chat_completions`` calls from several Python threads are safe and release the GIL (4 threads gave the
same outputs as sequential calls), so the engine takes no lock around generation; prompt-prefix reuse is
automatic, which is why the system prompt (the stable part) must come first. The in-process server also
listens on a loopback HTTP port; the engine protects it with a random API key that is never logged or saved.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import dspy
from dspy.lm15 import (
    ContextLengthError,
    ImagePart,
    InvalidRequestError,
    Message,
    Request,
    Response,
    ServerError,
    TextPart,
    UnsupportedFeatureError,
    Usage,
)

from blpo_dspy.engines import prompt_format
from blpo_dspy.engines.prompt_format import AdapterMode, OutputField
from blpo_dspy.engines.weights import MODELS, resolve_gguf, resolve_mmproj

logger = logging.getLogger(__name__)

DEFAULT_N_CTX = 4096
DEFAULT_MAX_TOKENS = 384
XLLAMACPP_VERSION = "2026.10.11549"


class ChatBackend(Protocol):
    """What the engine needs from a model: llama.cpp server's chat-completions handler."""

    def handle_chat_completions(self, body: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover - protocol
        """Run one OpenAI-style chat completion and return the OpenAI-style response dict."""
        ...


def machine_threads() -> int:
    """CPU cores this process may run on (``os.sched_getaffinity``), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------------- loading
@dataclass(frozen=True)
class _ModelKey:
    path: str
    mmproj: str | None
    n_ctx: int
    threads: int
    parallel: int


class LoadedModel:
    """One GGUF model loaded in this process (shared by every engine that uses the same file and settings).

    Attributes:
        name: Embedded model name or the GGUF file name (never an absolute path).
        load_seconds: Wall time of the load.
        has_vision: Whether a vision projector (mmproj) is loaded.
    """

    def __init__(self, backend: ChatBackend, name: str, load_seconds: float, has_vision: bool) -> None:
        self.backend = backend
        self.name = name
        self.load_seconds = load_seconds
        self.has_vision = has_vision


_REGISTRY: dict[_ModelKey, LoadedModel] = {}
_REGISTRY_LOCK = threading.Lock()


def load_model(
    path: Path, name: str, *, mmproj: Path | None, n_ctx: int, threads: int, parallel: int = 1
) -> LoadedModel:
    """Load a GGUF file with xllamacpp once per process (keyed by path and settings) and return it.

    Args:
        path: The GGUF file.
        name: Display name (model name or file name).
        mmproj: Optional vision projector GGUF.
        n_ctx: Context length per parallel slot.
        threads: CPU threads for prompt processing and generation.
        parallel: Number of server slots (concurrent sequences).

    Raises:
        ImportError: xllamacpp is not installed (the message gives the pip line).
        RuntimeError: llama.cpp could not load the file.
    """
    key = _ModelKey(str(path), str(mmproj) if mmproj else None, n_ctx, threads, parallel)
    with _REGISTRY_LOCK:
        loaded = _REGISTRY.get(key)
        if loaded is not None:
            return loaded
        try:
            import xllamacpp
        except ImportError as exc:
            raise ImportError(
                f'the local engine needs xllamacpp: pip install "xllamacpp=={XLLAMACPP_VERSION}" '
                '(or pip install "blpo-dspy[local]")'
            ) from exc
        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_ctx = n_ctx * parallel
        params.n_parallel = parallel
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        params.verbosity = 3 if logger.isEnabledFor(logging.DEBUG) else 0
        # The in-process server also listens on a loopback port; lock it with a throwaway key.
        params.api_keys = [secrets.token_urlsafe(24)]
        if mmproj is not None:
            params.mmproj.path = str(mmproj)
        start = time.perf_counter()
        try:
            server = xllamacpp.Server(params)
        except Exception as exc:
            raise RuntimeError(f"llama.cpp could not load model {name!r}: {exc}") from exc
        seconds = time.perf_counter() - start
        logger.info("loaded local model %s in %.1f s (%d threads, n_ctx %d)", name, seconds, threads, n_ctx)
        loaded = LoadedModel(server, name, seconds, mmproj is not None)
        _REGISTRY[key] = loaded
        return loaded


def release_models() -> None:
    """Forget every loaded model so it can be freed (engines still holding one keep it alive)."""
    with _REGISTRY_LOCK:
        _REGISTRY.clear()


# ---------------------------------------------------------------------------------------------------- engine
@dataclass
class EngineStats:
    """Cumulative counters of one engine (for benchmarks and reports).

    Attributes:
        calls: Completed calls.
        prompt_tokens: Prompt tokens, including those reused from the prefix cache.
        cached_tokens: Prompt tokens reused from the prefix cache.
        completion_tokens: Generated tokens.
        prompt_seconds: Time spent evaluating (non-cached) prompt tokens, as reported by llama.cpp.
        generation_seconds: Time spent generating, as reported by llama.cpp.
        wall_seconds: Wall time of the calls, including the engine's own work.
    """

    calls: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    wall_seconds: float = 0.0


class LlamaCppEngine:
    """DSPy engine (``complete(Request) -> Response``) on a local GGUF model via xllamacpp.

    The model is loaded lazily on the first call (or by :meth:`load`) and shared with every other engine in the
    process that uses the same file and settings. Requests carrying images are refused unless a vision
    projector (``mmproj``) is configured.

    Args:
        model: Embedded model name (``"qwen2.5-coder-0.5b"``, ``"qwen2.5-coder-1.5b"``), a GGUF path, or
            ``None`` for ``$BLPO_GGUF`` if set, else the default embedded model.
        mmproj: Vision projector GGUF for a real local VLM (``None``: ``$BLPO_MMPROJ`` if set).
        n_ctx: Context length.
        threads: CPU threads; default: the cores this process may use.
        parallel: llama.cpp server slots (sequences decoded together). 1 keeps outputs deterministic.
        max_tokens: Generation budget when the request does not set one.
        max_chars: Per-output-field string limits in characters (e.g. ``{"description": 700}``).
        default_max_chars: Limit for string fields not in ``max_chars`` or the built-in defaults.
        constrain_labels: Restrict label-like string fields ("one of: a, b.") to their values.
        greedy: Greedy decoding (temperature 0, top-k 1) whatever the request asks; ``False`` honours the
            request's temperature/top-p/seed.
        cache_prompt: Reuse the longest matching prompt prefix from the previous call (llama.cpp's prompt
            cache). Turn off only to measure cold prompt processing.
        cache_dir: Where embedded models are assembled (default :func:`weights.default_cache_dir`).
        backend: A ready chat backend to use instead of loading a model (tests, custom servers).
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        mmproj: str | Path | None = None,
        n_ctx: int = DEFAULT_N_CTX,
        threads: int | None = None,
        parallel: int = 1,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        max_chars: Mapping[str, int] | None = None,
        default_max_chars: int = prompt_format.DEFAULT_STRING_MAX_CHARS,
        constrain_labels: bool = True,
        greedy: bool = True,
        cache_prompt: bool = True,
        cache_dir: str | Path | None = None,
        backend: ChatBackend | None = None,
    ) -> None:
        if n_ctx < 256:
            raise ValueError(f"n_ctx must be at least 256, got {n_ctx}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        if parallel < 1:
            raise ValueError(f"parallel must be at least 1, got {parallel}")
        self.n_ctx = n_ctx
        self.threads = threads
        self.parallel = parallel
        self.max_tokens = max_tokens
        self.max_chars = dict(max_chars or {})
        self.default_max_chars = default_max_chars
        self.constrain_labels = constrain_labels
        self.greedy = greedy
        self.cache_prompt = cache_prompt
        self.stats = EngineStats()
        self._stats_lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._loaded: LoadedModel | None = None
        if backend is not None:
            self._path: Path | None = None
            self.model_name = str(model) if model is not None else "custom-backend"
            self._mmproj = Path(mmproj) if mmproj is not None else None
            self._loaded = LoadedModel(backend, self.model_name, 0.0, self._mmproj is not None)
        else:
            self._path, self.model_name = resolve_gguf(model, cache_dir)
            self._mmproj = resolve_mmproj(mmproj)
        self.builtin = self.model_name in MODELS

    # -------------------------------------------------------------------------------------------- lifecycle
    def __deepcopy__(self, memo: dict[int, Any]) -> LlamaCppEngine:
        return self

    def load(self) -> LoadedModel:
        """Load the model now (otherwise it loads on the first call) and return it."""
        if self._loaded is None:
            with self._load_lock:
                if self._loaded is None:
                    assert self._path is not None
                    self._loaded = load_model(
                        self._path,
                        self.model_name,
                        mmproj=self._mmproj,
                        n_ctx=self.n_ctx,
                        threads=self.threads or machine_threads(),
                        parallel=self.parallel,
                    )
        return self._loaded

    @property
    def has_vision(self) -> bool:
        """Whether image inputs are accepted (a vision projector is configured)."""
        return self._mmproj is not None

    def close(self) -> None:
        """Nothing to release per engine: the loaded model is shared (see :func:`release_models`)."""

    def dump_state(self) -> dict[str, Any]:
        """Settings for ``program.save``: model name and decoding options, no paths or secrets."""
        return {
            "model": self.model_name if self.builtin else None,
            "gguf_name": self.model_name,
            "vision": self.has_vision,
            "n_ctx": self.n_ctx,
            "threads": self.threads,
            "parallel": self.parallel,
            "max_tokens": self.max_tokens,
            "max_chars": dict(self.max_chars),
            "default_max_chars": self.default_max_chars,
            "constrain_labels": self.constrain_labels,
            "greedy": self.greedy,
            "cache_prompt": self.cache_prompt,
        }

    @classmethod
    def load_state(cls, state: Mapping[str, Any]) -> LlamaCppEngine:
        """Rebuild an engine from :meth:`dump_state`; a user GGUF is taken from ``$BLPO_GGUF``/``$BLPO_MMPROJ``."""
        model = state.get("model")
        if model is None and state.get("gguf_name"):
            logger.info("saved engine used GGUF file %s; loading $BLPO_GGUF instead", state["gguf_name"])
        return cls(
            model,
            n_ctx=int(state.get("n_ctx", DEFAULT_N_CTX)),
            threads=state.get("threads"),
            parallel=int(state.get("parallel", 1)),
            max_tokens=int(state.get("max_tokens", DEFAULT_MAX_TOKENS)),
            max_chars=state.get("max_chars") or None,
            default_max_chars=int(state.get("default_max_chars", prompt_format.DEFAULT_STRING_MAX_CHARS)),
            constrain_labels=bool(state.get("constrain_labels", True)),
            greedy=bool(state.get("greedy", True)),
            cache_prompt=bool(state.get("cache_prompt", True)),
        )

    # -------------------------------------------------------------------------------------------- calls
    def complete(self, request: Request) -> Response:
        """Answer one DSPy request (see the module docstring for how the reply format is chosen)."""
        start = time.perf_counter()
        if not self.has_vision and _has_images(request):
            raise UnsupportedFeatureError(
                f"local model {self.model_name!r} is a text-only model and this request carries an image. "
                "Use the fact-sheet verbalizer (blpo_dspy.engines.factsheet_lm) for image inputs, or configure a "
                "vision projector (mmproj= or $BLPO_MMPROJ) with a vision GGUF.",
                feature="image input",
            )
        body, mode, fields = self.build_body(request)
        raw = self._call(body)
        text, finish = _content(raw)
        reply = self._reply_text(text, mode, fields, finish) if "response_format" in body else text
        usage = raw.get("usage") or {}
        self._record(raw, time.perf_counter() - start)
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        return Response(
            id=raw.get("id"),
            model=request.model,
            message=Message.assistant(reply),
            finish_reason=finish,
            usage=Usage(
                input_tokens=usage.get("prompt_tokens"),
                output_tokens=usage.get("completion_tokens"),
                total_tokens=usage.get("total_tokens"),
                cache_read_tokens=cached,
            ),
        )

    def build_body(self, request: Request) -> tuple[dict[str, Any], AdapterMode, list[OutputField]]:
        """The llama.cpp chat-completions body for a DSPy request, with the reply mode and output fields.

        Returns:
            ``(body, mode, fields)``; ``body`` holds a ``response_format`` JSON schema when the output fields
            can be expressed as one.
        """
        system = _system_text(request)
        mode = prompt_format.adapter_mode(system)
        fields = prompt_format.parse_output_fields(system) if mode != "text" else []
        max_tokens = request.config.max_tokens or self.max_tokens
        messages = _openai_messages(request)
        schema = None
        if mode != "text":
            schema = prompt_format.build_schema(
                fields,
                max_tokens=max_tokens,
                max_chars=self.max_chars,
                default_max_chars=self.default_max_chars,
                constrain_labels=self.constrain_labels,
            )
            if schema is not None and mode == "chat":
                messages = _chat_messages_for_json(messages, fields)
        body: dict[str, Any] = {"messages": messages, "max_tokens": max_tokens}
        if self.greedy:
            body.update(temperature=0.0, top_k=1)
        else:
            config = request.config
            body.update(
                {
                    k: v
                    for k, v in (("temperature", config.temperature), ("top_p", config.top_p), ("seed", config.seed))
                    if v is not None
                }
            )
        if not self.cache_prompt:
            body["cache_prompt"] = False
        if request.config.stop:
            body["stop"] = list(request.config.stop)
        if schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"schema": schema}}
        elif mode == "json":
            body["response_format"] = {"type": "json_object"}
        return body, mode, fields

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """Send a raw chat-completions body to the loaded model (no DSPy formatting); used by benchmarks."""
        return self._call(body)

    def _call(self, body: dict[str, Any]) -> dict[str, Any]:
        backend = self.load().backend
        try:
            raw = backend.handle_chat_completions(body)
        except RuntimeError as exc:
            raise InvalidRequestError(f"local model {self.model_name!r} refused the request: {exc}") from exc
        if not isinstance(raw, dict):
            raise ServerError(f"local model {self.model_name!r} returned {type(raw).__name__}, expected a dict")
        error = raw.get("error")
        if error:
            message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
            if isinstance(error, dict) and error.get("type") == "exceed_context_size_error":
                raise ContextLengthError(f"local model {self.model_name!r}: {message} (raise n_ctx, now {self.n_ctx})")
            raise InvalidRequestError(f"local model {self.model_name!r}: {message}")
        return raw

    def _reply_text(self, text: str, mode: AdapterMode, fields: list[OutputField], finish: str) -> str:
        if mode == "text" or not fields:
            return text
        values = prompt_format.parse_json_reply(text)
        if values is None:
            logger.warning(
                "local model %s returned no parsable JSON (finish_reason=%s); passing the raw text to the adapter",
                self.model_name,
                finish,
            )
            return text
        return prompt_format.render(values, mode, fields)

    def _record(self, raw: Mapping[str, Any], wall: float) -> None:
        usage = raw.get("usage") or {}
        timings = raw.get("timings") or {}
        with self._stats_lock:
            s = self.stats
            s.calls += 1
            s.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            s.cached_tokens += int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
            s.completion_tokens += int(usage.get("completion_tokens") or 0)
            s.prompt_seconds += float(timings.get("prompt_ms") or 0.0) / 1000
            s.generation_seconds += float(timings.get("predicted_ms") or 0.0) / 1000
            s.wall_seconds += wall


def _has_images(request: Request) -> bool:
    parts = [p for m in request.messages for p in m.parts]
    if isinstance(request.system, tuple):
        parts.extend(request.system)
    return any(isinstance(p, ImagePart) for p in parts)


def _system_text(request: Request) -> str:
    system = request.system
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    return "".join(p.text for p in system if isinstance(p, TextPart))


def _openai_messages(request: Request) -> list[dict[str, Any]]:
    from dspy.clients.lm15_boundary import request_kwargs

    plain = replace(request, config=replace(request.config, response_format=None, extensions=None))
    return list(request_kwargs(plain, "chat")["messages"])


def _chat_messages_for_json(messages: list[dict[str, Any]], fields: list[OutputField]) -> list[dict[str, Any]]:
    """Demo replies in ChatAdapter sections become JSON and the closing request asks for JSON.

    The system prompt is left untouched so the llama.cpp prefix cache keeps hitting.
    """
    result: list[dict[str, Any]] = []
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    for i, message in enumerate(messages):
        content = message.get("content")
        if message.get("role") == "assistant" and isinstance(content, str):
            converted = prompt_format.chat_sections_to_json(content, fields)
            if converted is not None:
                message = {**message, "content": converted}
        elif i == last_user:
            message = {**message, "content": _map_text(content, fields)}
        result.append(message)
    return result


def _map_text(content: Any, fields: list[OutputField]) -> Any:
    if isinstance(content, str):
        return prompt_format.replace_chat_reply_request(content, fields)
    if isinstance(content, list):
        return [
            {**block, "text": prompt_format.replace_chat_reply_request(block["text"], fields)}
            if isinstance(block, dict) and block.get("type") == "text"
            else block
            for block in content
        ]
    return content


def _content(raw: Mapping[str, Any]) -> tuple[str, str]:
    choices = raw.get("choices") or []
    if not choices:
        raise ServerError("local model returned no choices")
    choice = choices[0]
    text = (choice.get("message") or {}).get("content") or ""
    finish = choice.get("finish_reason") or "stop"
    if finish not in ("stop", "length", "tool_call", "content_filter", "error"):
        finish = "stop"
    return text, finish


# ---------------------------------------------------------------------------------------------------- factory
def local_lm(
    model: str | Path | None = None,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    n_ctx: int = DEFAULT_N_CTX,
    threads: int | None = None,
    **engine_options: Any,
) -> dspy.LM:
    """A ``dspy.LM`` on a local GGUF model (embedded Qwen2.5-Coder by default), with DSPy's cache off.

    The model is loaded once per process and shared by every LM made here with the same file and settings, so
    the verbalizer, judge and proposer roles can each get their own ``dspy.LM`` without loading it again.

    Args:
        model: Embedded model name, GGUF path, or ``None`` (``$BLPO_GGUF``, else ``"qwen2.5-coder-0.5b"``).
        max_tokens: Generation budget per call.
        n_ctx: Context length.
        threads: CPU threads (default: the cores available to this process).
        **engine_options: More :class:`LlamaCppEngine` options (``mmproj``, ``max_chars``, ``greedy``, ...).

    Returns:
        ``dspy.LM("local/<model>", engine=LlamaCppEngine(...), cache=False)``.

    Raises:
        ModelNotInstalledError: The embedded model's chunk packages are not installed (the message gives the
            pip command).
    """
    engine = LlamaCppEngine(model, max_tokens=max_tokens, n_ctx=n_ctx, threads=threads, **engine_options)
    return dspy.LM(f"local/{engine.model_name}", engine=engine, cache=False, temperature=0.0, max_tokens=max_tokens)
