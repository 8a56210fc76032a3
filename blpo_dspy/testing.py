"""Deterministic, network-free DSPy engines for tests (ours and users').

``ScriptedEngine`` is a DSPy 3.4 engine (``complete(request) -> response``) that answers by rules over a parsed view
of the request (role, instruction, input field values, images) and records every request, so tests can assert on
exactly which calls were made and whether they carried images.

Example:
    >>> engine = ScriptedEngine(rules=[lambda call: {"label": "yes", "rationale": "ok"} if call.role == "judge"
    ...                                  else None])
    >>> lm = engine.lm()
    >>> with dspy.context(lm=lm):  # doctest: +SKIP
    ...     program(image=img, prompt="a cat")
"""

from __future__ import annotations

import inspect
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dspy
from dspy.lm15 import ImagePart, Message, Request, Response, TextPart, Usage

Answer = Mapping[str, Any] | str | BaseException | None
Rule = Callable[["ScriptedCall"], Answer]

_FIELD_MARKER = re.compile(r"\[\[ ## (\w+) ## \]\]")
_OUTPUT_LINE = re.compile(r"^\d+\. `(\w+)` \(([^)]*)\)", re.MULTILINE)
_IMAGE_TOKEN = "\x00IMAGE{}\x00"
_TOKENS_PER_IMAGE = 85
_JSON_ADAPTER_HINT = "JSON object"

ROLE_BY_OUTPUT_FIELD = {"description": "verbalizer", "label": "judge"}


@dataclass(frozen=True)
class ScriptedCall:
    """A parsed view of one LM request.

    Attributes:
        role: ``"verbalizer"``, ``"judge"`` or ``"proposer"`` (from the output fields; see ``role_of``).
        model: The request's model name.
        instructions: The signature instructions (the objective in DSPy's system prompt).
        inputs: Text values of the input fields of the last user message, by field name.
        images: Image bytes of the last user message, by input field name (lists, in order).
        output_fields: Names of the requested output fields, in order.
        all_images: Number of image parts anywhere in the request (demos included).
        system: The whole system prompt.
        user_text: The text of the last user message.
    """

    role: str
    model: str
    instructions: str
    inputs: Mapping[str, str]
    images: Mapping[str, list[bytes]]
    output_fields: tuple[str, ...]
    all_images: int
    system: str
    user_text: str

    @property
    def has_image(self) -> bool:
        """Whether any part of the request was an image."""
        return self.all_images > 0


def chat_answer(**fields: Any) -> str:
    """Render output fields the way DSPy's ChatAdapter parses them."""
    body = "".join(f"[[ ## {name} ## ]]\n{value}\n\n" for name, value in fields.items())
    return body + "[[ ## completed ## ]]"


def _system_text(request: Request) -> str:
    if isinstance(request.system, str):
        return request.system
    return "".join(getattr(p, "text", "") or "" for p in (request.system or ()))


def parse_request(request: Request, role_of: Callable[[Sequence[str]], str] | None = None) -> ScriptedCall:
    """Parse a DSPy ChatAdapter/JSONAdapter request into a ``ScriptedCall``."""
    system = _system_text(request)
    messages = [m for m in request.messages if m.role == "system"]
    for m in messages:
        system += "".join(getattr(p, "text", "") or "" for p in m.parts)
    output_section = system.split("Your output fields are:", 1)[-1].split("All interactions", 1)[0]
    output_fields = tuple(m.group(1) for m in _OUTPUT_LINE.finditer(output_section))
    objective = system.split("your objective is:", 1)[1] if "your objective is:" in system else ""
    instructions = inspect.cleandoc(objective)

    all_images = sum(isinstance(p, ImagePart) for m in request.messages for p in m.parts)
    users = [m for m in request.messages if m.role == "user"]
    last = users[-1] if users else None
    stream: list[str] = []
    image_data: list[bytes] = []
    for part in last.parts if last else ():
        if isinstance(part, ImagePart):
            stream.append(_IMAGE_TOKEN.format(len(image_data)))
            image_data.append(part.bytes or b"")
        elif isinstance(part, TextPart):
            stream.append(part.text or "")
    text = re.split(r"\n\s*Respond with ", "".join(stream), maxsplit=1)[0]
    inputs: dict[str, str] = {}
    images: dict[str, list[bytes]] = {}
    chunks = _FIELD_MARKER.split(text)
    for name, value in zip(chunks[1::2], chunks[2::2], strict=False):
        tokens = re.findall(r"\x00IMAGE(\d+)\x00", value)
        if tokens:
            images[name] = [image_data[int(t)] for t in tokens]
        inputs[name] = re.sub(r"\x00IMAGE\d+\x00", "", value).strip()
    user_text = re.sub(r"\x00IMAGE\d+\x00", "<image>", text)
    role = (role_of or default_role_of)(output_fields)
    return ScriptedCall(
        role=role,
        model=request.model,
        instructions=instructions,
        inputs=inputs,
        images=images,
        output_fields=output_fields,
        all_images=all_images,
        system=system,
        user_text=user_text,
    )


def default_role_of(output_fields: Sequence[str]) -> str:
    """Role from output field names: ``description`` -> verbalizer, ``label`` -> judge, otherwise proposer."""
    for name in output_fields:
        if name in ROLE_BY_OUTPUT_FIELD:
            return ROLE_BY_OUTPUT_FIELD[name]
    return "proposer"


class ScriptedEngine:
    """A DSPy 3.4 engine answering by rules, recording every request. Thread-safe; ``deepcopy`` returns itself.

    Args:
        rules: Callables tried in order with a ``ScriptedCall``; the first that returns non-``None`` answers. An
            answer is a mapping of output field values (rendered in the adapter's format), a raw string (returned
            verbatim), or an exception instance (raised, to simulate a failed call).
        default: Answer used when no rule matches: ``None`` fills every output field with ``"scripted <name>"``.
        role_of: Maps output field names to a role; defaults to ``default_role_of``.
        model: Model name reported in responses.
        latency: Seconds every call sleeps before answering (the sleep releases the GIL, as network I/O does).
    """

    def __init__(
        self,
        rules: Iterable[Rule] = (),
        *,
        default: Rule | None = None,
        role_of: Callable[[Sequence[str]], str] | None = None,
        model: str = "scripted",
        latency: float = 0.0,
    ) -> None:
        if latency < 0:
            raise ValueError(f"latency must be >= 0 seconds, got {latency}")
        self.latency = latency
        self.rules = list(rules)
        self.default = default
        self.role_of = role_of
        self.model = model
        self.calls: list[ScriptedCall] = []
        self.requests: list[Request] = []  # the raw requests, in the order of ``calls``
        self._lock = threading.Lock()

    @classmethod
    def answering(cls, text: str, *, model: str = "scripted") -> ScriptedEngine:
        """An engine that answers every request with ``text`` verbatim (and records it)."""
        return cls(default=lambda call: text, model=model)

    def __deepcopy__(self, memo: dict[int, Any]) -> ScriptedEngine:
        return self

    def lm(self, model: str | None = None, **kwargs: Any) -> dspy.LM:
        """A ``dspy.LM`` running on this engine (DSPy's cache off)."""
        return dspy.LM(f"scripted/{model or self.model}", engine=self, cache=False, **kwargs)

    # ------------------------------------------------------------------ engine contract
    def complete(self, request: Request) -> Response:
        """Answer one request by the rules."""
        if self.latency:
            time.sleep(self.latency)
        call = parse_request(request, self.role_of)
        with self._lock:
            self.calls.append(call)
            self.requests.append(request)
        answer: Answer = None
        for rule in self.rules:
            answer = rule(call)
            if answer is not None:
                break
        if answer is None and self.default is not None:
            answer = self.default(call)
        if answer is None:
            answer = {name: f"scripted {name}" for name in call.output_fields}
        if isinstance(answer, BaseException):
            raise answer
        text = answer if isinstance(answer, str) else self._render(call, answer)
        prompt_tokens = (len(call.system) + len(call.user_text)) // 4 + _TOKENS_PER_IMAGE * call.all_images
        return Response(
            id=None,
            model=request.model,
            message=Message.assistant(text),
            finish_reason="stop",
            usage=Usage(input_tokens=prompt_tokens, output_tokens=max(1, len(text) // 4)),
        )

    def close(self) -> None:
        """Nothing to release."""

    def dump_state(self) -> dict[str, Any]:
        """Engines are never saved with programs; present for DSPy's save contract."""
        return {"model": self.model}

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> ScriptedEngine:
        """Rebuild an engine with no rules."""
        return cls(model=state.get("model", "scripted"))

    # ------------------------------------------------------------------ assertions helpers
    def count(self, role: str | None = None, *, with_images: bool | None = None) -> int:
        """Number of recorded calls, optionally filtered by role and by whether they carried images."""
        with self._lock:
            calls = list(self.calls)
        return sum(
            1 for c in calls if (role is None or c.role == role) and (with_images is None or c.has_image == with_images)
        )

    def calls_for(self, role: str) -> list[ScriptedCall]:
        """Recorded calls of one role, in order."""
        with self._lock:
            return [c for c in self.calls if c.role == role]

    def reset(self) -> None:
        """Forget recorded calls."""
        with self._lock:
            self.calls.clear()
            self.requests.clear()

    @staticmethod
    def _render(call: ScriptedCall, fields: Mapping[str, Any]) -> str:
        if _JSON_ADAPTER_HINT in call.system or _JSON_ADAPTER_HINT in call.user_text:
            return json.dumps(dict(fields))
        return chat_answer(**fields)


# ---------------------------------------------------------------------- a scripted world for optimizer tests
COUNT_CUE_WORD = "count"
NUMBER_RULE = "Answer yes only if the number of circles in the description matches the number in the prompt."
VAGUE_RULE = "Judge carefully whether the image matches the prompt."
SEED_DESCRIPTION = "An image with some red circles on a plain background."
PROPOSED_VERBALIZER_INSTRUCTIONS = (
    "Describe the colours in the image.",
    "Describe the layout and composition of the image.",
    "Count the circles in the image and state the exact number.",
    "List every object with its colour and position.",
)


class CountingWorld:
    """A scripted world where the decisive cue (a count) is visible only to a verbalizer told to count.

    Each image encodes a number of circles n in its red channel; the prompt asks for m circles; the human label is
    ``yes`` iff n == m. The scripted verbalizer states the number only when its instruction mentions counting;
    the scripted judge compares numbers only when its instruction says so (and a number is in the description),
    otherwise it answers ``yes``. The scripted proposer's Update_q walks through ``PROPOSED_VERBALIZER_INSTRUCTIONS``
    (skipping tried ones) and its Update_p writes the number rule only if the errors it reads contain counts. So a
    judge-only optimizer (fixed verbalizer) cannot find the rule; BLPO can.

    Args:
        judge_fails_every: Make every n-th judge call raise (fault injection for tests); 0 disables.
        latency: Seconds every call takes (see ``ScriptedEngine``).
    """

    def __init__(self, judge_fails_every: int = 0, latency: float = 0.0) -> None:
        self.task = _counting_task()
        self.judge_fails_every = judge_fails_every
        self._judge_calls = 0
        self._lock = threading.Lock()
        self.engine = ScriptedEngine(
            rules=[self._verbalizer, self._judge, self._proposer], model="world", latency=latency
        )

    @property
    def lm(self) -> dspy.LM:
        """An LM on the world's engine (all roles)."""
        return self.engine.lm("world")

    def examples(self, n: int, *, seed: int = 0) -> list[dspy.Example]:
        """``n`` class-balanced examples (alternating labels), deterministic per seed."""
        import io
        import random

        from PIL import Image as PILImage

        rng = random.Random(seed)
        out = []
        for i in range(n):
            circles = rng.randint(1, 6)
            matches = i % 2 == 0
            asked = circles if matches else rng.choice([c for c in range(1, 7) if c != circles])
            buffer = io.BytesIO()
            PILImage.new("RGB", (8, 8), (circles * 40, (i * 37 + seed) % 256, 200)).save(buffer, format="PNG")
            out.append(
                dspy.Example(
                    id=f"s{seed}-{i}",
                    image=dspy.Image(buffer.getvalue()),
                    prompt=f"exactly {asked} red circles",
                    label="yes" if matches else "no",
                ).with_inputs("image", "prompt")
            )
        return out

    # rules
    @staticmethod
    def _count_in(image_bytes: bytes) -> int:
        import io

        from PIL import Image as PILImage

        return round(PILImage.open(io.BytesIO(image_bytes)).convert("RGB").getpixel((0, 0))[0] / 40)

    def _verbalizer(self, call: ScriptedCall) -> Answer:
        if call.role != "verbalizer":
            return None
        image = call.images.get("image", [b""])[0]
        if COUNT_CUE_WORD in call.instructions.lower():
            return {"description": f"The image shows {self._count_in(image)} red circles."}
        return {"description": SEED_DESCRIPTION}

    def _judge(self, call: ScriptedCall) -> Answer:
        if call.role != "judge":
            return None
        with self._lock:
            self._judge_calls += 1
            fail = self.judge_fails_every and self._judge_calls % self.judge_fails_every == 0
        if fail:
            return RuntimeError("scripted judge failure")
        seen = re.search(r"shows (\d+) red circles", call.inputs.get("description", ""))
        asked = re.search(r"(\d+)", call.inputs.get("prompt", ""))
        if "number of circles" in call.instructions and seen and asked:
            label = "yes" if seen.group(1) == asked.group(1) else "no"
            return {"rationale": "Compared the counts.", "label": label}
        return {"rationale": "Looks fine.", "label": "Yes."}

    def _proposer(self, call: ScriptedCall) -> Answer:
        if call.role != "proposer":
            return None
        if "history" in call.inputs:  # Update_q
            tried = call.inputs["history"]
            for text in PROPOSED_VERBALIZER_INSTRUCTIONS:
                if text not in tried:
                    return {"new_instruction": text}
            return {"new_instruction": PROPOSED_VERBALIZER_INSTRUCTIONS[-1] + " Be thorough."}
        errors = call.inputs.get("errors", "")
        tried = call.inputs.get("tried_instructions", "")
        rule = NUMBER_RULE if re.search(r"shows \d+ red circles", errors) else VAGUE_RULE
        text = rule
        while text in tried:
            text += " Be precise."
        return {"new_instruction": text}


def _counting_task() -> Any:
    from blpo_dspy.task import Task

    return Task.from_dict(
        {
            "name": "circle_count",
            "description": "Does the image show exactly the number of red circles the prompt asks for?",
            "kind": "binary",
            "labels": ["yes", "no"],
            "text_inputs": [{"name": "prompt", "description": "What the image should show."}],
            "instructions": {"judge": "Does the image match the prompt?"},
        },
        source="counting-world",
    )


# ---------------------------------------------------------------------- fault injection
FAULT_KINDS: tuple[str, ...] = ("timeout", "rate_limit", "server", "empty", "malformed")
TRANSIENT_FAULTS: frozenset[str] = frozenset({"timeout", "rate_limit", "server"})


class FaultInjectingEngine:
    """Wraps an engine and injects the faults real LM APIs produce, at a seeded rate.

    Transient faults (timeouts, 429 rate limits, 5xx server errors) are raised as ``dspy.lm15`` errors with a short
    ``retry_after`` hint, so DSPy's own retry loop (``dspy.LM(num_retries=...)``) retries them with backoff;
    permanent faults (empty and malformed answers) are returned as responses and end up as scored failures.

    Args:
        inner: The engine that answers when no fault is injected.
        rate: Probability of a fault per request.
        kinds: Fault kinds to draw from (see ``FAULT_KINDS``).
        seed: Seed of the fault draws.
        retry_after: Seconds DSPy is told to wait before retrying a transient fault.
    """

    def __init__(
        self,
        inner: Any,
        *,
        rate: float = 0.2,
        kinds: Sequence[str] = FAULT_KINDS,
        seed: int = 0,
        retry_after: float = 0.01,
    ) -> None:
        unknown = set(kinds) - set(FAULT_KINDS)
        if unknown or not kinds:
            raise ValueError(f"kinds must be a non-empty subset of {FAULT_KINDS}, got {sorted(kinds)}")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {rate}")
        import random

        self.inner = inner
        self.rate = rate
        self.kinds = tuple(kinds)
        self.retry_after = retry_after
        self.injected: dict[str, int] = dict.fromkeys(FAULT_KINDS, 0)
        self.requests = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def __deepcopy__(self, memo: dict[int, Any]) -> FaultInjectingEngine:
        return self

    def lm(self, model: str = "faulty", *, num_retries: int = 3) -> dspy.LM:
        """A ``dspy.LM`` on this engine with DSPy's retries on."""
        return dspy.LM(f"scripted/{model}", engine=self, cache=False, num_retries=num_retries)

    def complete(self, request: Request) -> Response:
        """Answer through the inner engine, or inject a fault."""
        from dspy import lm15

        with self._lock:
            self.requests += 1
            kind = self._rng.choice(self.kinds) if self._rng.random() < self.rate else None
            if kind is not None:
                self.injected[kind] += 1
        if kind == "timeout":
            raise lm15.TimeoutError("injected timeout", retry_after=self.retry_after)
        if kind == "rate_limit":
            raise lm15.RateLimitError("injected rate limit", status=429, retry_after=self.retry_after)
        if kind == "server":
            raise lm15.ServerError("injected server error", status=503, retry_after=self.retry_after)
        if kind in ("empty", "malformed"):
            text = "" if kind == "empty" else "{{{ not the requested format"
            return Response(
                id=None,
                model=request.model,
                message=Message.assistant(text),
                finish_reason="stop",
                usage=Usage(input_tokens=1, output_tokens=1),
            )
        return self.inner.complete(request)

    def close(self) -> None:
        """Nothing to release."""
