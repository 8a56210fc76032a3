"""Benchmark: the embedded local engine against raw xllamacpp on the same prompts, measured in one run.

Prints, for judge calls and for verbalizations (fact sheet + rewrite):
* seconds per call, prompt and generation tokens/s (llama.cpp's own timings),
* the raw baseline: ``handle_chat_completions`` on exactly the body our engine sent, in the same process,
* the ratio engine / raw (the overhead of DSPy's adapter, our schema building, rendering and parsing).

Cold figures disable llama.cpp's prompt-prefix cache so both paths do the same work; the "typical" figures keep
it on, as a real run does (every judge call shares DSPy's system prompt).

Run: ``python benchmarks/local_engine.py [--model qwen2.5-coder-0.5b] [--calls 3] [--threads N]``. Needs the
``[local]`` extra and the model's weights packages. Uses SYNTHETIC banners.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dspy
from dspy.lm15 import Message, Request, Response, Usage

from blpo_dspy.data.synthetic import generate_specs, render_banner
from blpo_dspy.engines import prompt_format
from blpo_dspy.engines.factsheet import FactSheetCache, FactSheetEngine, compute_fact_sheet
from blpo_dspy.engines.llamacpp import LlamaCppEngine, machine_threads
from blpo_dspy.task import Task


class Recorder:
    """Wraps an engine's ``build_body`` and ``_call`` to keep every body it sends and every raw response."""

    def __init__(self, engine: LlamaCppEngine) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.raws: list[dict[str, Any]] = []
        build_body, call = engine.build_body, engine._call

        def recording_build_body(request: Request) -> Any:
            result = build_body(request)
            self.bodies.append(result[0])
            return result

        def recording_call(body: dict[str, Any]) -> dict[str, Any]:
            raw = call(body)
            self.raws.append(raw)
            return raw

        engine.build_body = recording_build_body  # type: ignore[method-assign]
        engine._call = recording_call  # type: ignore[method-assign]


class Capture:
    """Records DSPy's requests and answers with placeholder values (no model)."""

    def __init__(self) -> None:
        self.requests: list[Request] = []

    def __deepcopy__(self, memo: dict[int, Any]) -> Capture:
        return self

    def complete(self, request: Request) -> Response:
        self.requests.append(request)
        fields = prompt_format.parse_output_fields(str(request.system))
        text = prompt_format.render_chat({f.name: "yes" for f in fields}, fields)
        return Response(
            id=None, model=request.model, message=Message.assistant(text), finish_reason="stop", usage=Usage()
        )

    def close(self) -> None:
        pass


def _row(name: str, seconds: list[float], raws: list[dict[str, Any]]) -> dict[str, float]:
    prompt_n = sum(r["timings"]["prompt_n"] for r in raws)
    prompt_s = sum(r["timings"]["prompt_ms"] for r in raws) / 1000
    gen_n = sum(r["timings"]["predicted_n"] for r in raws)
    gen_s = sum(r["timings"]["predicted_ms"] for r in raws) / 1000
    row = {
        "s_per_call": statistics.mean(seconds),
        "prompt_tps": prompt_n / prompt_s if prompt_s else float("nan"),
        "gen_tps": gen_n / gen_s if gen_s else float("nan"),
        "prompt_tokens": prompt_n / len(raws),
        "gen_tokens": gen_n / len(raws),
    }
    print(
        f"  {name:<24} {row['s_per_call']:6.2f} s/call | prompt {row['prompt_tps']:6.1f} tok/s "
        f"({row['prompt_tokens']:4.0f} tok evaluated) | generation {row['gen_tps']:5.1f} tok/s "
        f"({row['gen_tokens']:3.0f} tok)"
    )
    return row


def _judge_inputs(calls: int, seed: int) -> list[dict[str, str]]:
    inputs = []
    for spec in generate_specs(calls, seed=seed):
        description = (
            f"A {spec.background} banner with {spec.drawn_count} {spec.drawn_shape_colour} {spec.shape}s, the "
            f"headline '{spec.drawn_headline}' and a {spec.logo_colour} square in the {spec.drawn_logo_corner} corner."
        )
        inputs.append({"description": description, "brief": spec.brief})
    return inputs


def bench_judge(engine: LlamaCppEngine, calls: int, *, cold: bool) -> None:
    """Raw and engine calls alternate, so a change in machine load hits both paths alike.

    With the prompt cache off both paths get the same inputs. With it on, the raw path gets a second input set
    of the same kind (the same body twice in a row would be a full cache hit); every call then reuses the
    shared system prompt of the previous call, as in a real run.
    """
    signature = Task.load("compliance").judge_signature("text")
    engine_inputs = _judge_inputs(calls, seed=99)
    raw_inputs = engine_inputs if cold else _judge_inputs(calls, seed=98)
    engine.cache_prompt = not cold
    capture = Capture()
    capture_lm = dspy.LM("capture/judge", engine=capture, cache=False, temperature=0.0, max_tokens=160)
    with dspy.context(lm=capture_lm):
        for item in raw_inputs:
            dspy.Predict(signature)(**item)
    raw_bodies = [engine.build_body(request)[0] for request in capture.requests]

    recorder = Recorder(engine)
    lm = dspy.LM(f"local/{engine.model_name}", engine=engine, cache=False, temperature=0.0, max_tokens=160)
    raw_seconds, raw_responses, engine_seconds = [], [], []
    for body, item in zip(raw_bodies, engine_inputs, strict=True):
        start = time.perf_counter()
        raw_responses.append(engine.chat(body))
        raw_seconds.append(time.perf_counter() - start)
        recorder.raws.pop()  # engine.chat goes through the recorder too; keep only the engine path's calls
        start = time.perf_counter()
        with dspy.context(lm=lm):
            dspy.Predict(signature)(**item)
        engine_seconds.append(time.perf_counter() - start)
    _restore(engine)
    raw = _row("raw xllamacpp", raw_seconds, raw_responses)
    ours = _row("blpo engine via dspy", engine_seconds, recorder.raws)
    note = f"identical bodies: {recorder.bodies == raw_bodies}" if cold else "same kind of inputs, other briefs"
    print(f"  ratio engine / raw: {ours['s_per_call'] / raw['s_per_call']:.3f}  ({note})")
    engine.cache_prompt = True


def _restore(engine: LlamaCppEngine) -> None:
    for name in ("build_body", "_call"):
        engine.__dict__.pop(name, None)


def bench_verbalize(engine: LlamaCppEngine, calls: int) -> None:
    """Fact sheet timings, then verbalizations through DSPy vs the raw rewrite call (prompt cache off on both)."""
    task = Task.load("compliance")
    specs = generate_specs(calls + 1, seed=98)
    images = [render_banner(s) for s in specs]
    start = time.perf_counter()
    compute_fact_sheet(images[0])
    print(f"  fact sheet, cold (loads the OCR models): {time.perf_counter() - start:5.2f} s")
    warm = []
    for image in images[1:]:
        start = time.perf_counter()
        compute_fact_sheet(image)
        warm.append(time.perf_counter() - start)
    print(f"  fact sheet, warm:                        {statistics.mean(warm):5.2f} s/image (OpenCV + RapidOCR)")

    engine.cache_prompt = False
    recorder = Recorder(engine)
    verbalizer_lm = dspy.LM("factsheet/bench", engine=FactSheetEngine(engine, cache=FactSheetCache()), cache=False)
    verbalizer = dspy.Predict(task.verbalizer_signature())
    total, raw_seconds, raw_responses = [], [], []
    for spec, image in zip(specs[1:], images[1:], strict=True):
        start = time.perf_counter()
        with dspy.context(lm=verbalizer_lm):
            verbalizer(image=dspy.Image(image), brief=spec.brief)
        total.append(time.perf_counter() - start)
        start = time.perf_counter()
        raw_responses.append(engine.chat(recorder.bodies[-1]))
        raw_seconds.append(time.perf_counter() - start)
        recorder.raws.pop()
    _restore(engine)
    engine.cache_prompt = True
    raw = _row("raw rewrite xllamacpp", raw_seconds, raw_responses)
    ours = _row("verbalization via dspy", total, recorder.raws)
    print(
        f"  ratio verbalization / raw rewrite: {ours['s_per_call'] / raw['s_per_call']:.3f} (verbalization includes "
        "the fact sheet, cold per new image)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="embedded model name or GGUF path (default: $BLPO_GGUF or 0.5B)")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--n-ctx", type=int, default=4096)
    args = parser.parse_args()

    start = time.perf_counter()
    engine = LlamaCppEngine(args.model, threads=args.threads, n_ctx=args.n_ctx, max_tokens=160)
    resolved = time.perf_counter() - start
    loaded = engine.load()
    threads = args.threads or machine_threads()
    print(
        f"model {engine.model_name}: weights ready in {resolved:.1f} s, llama.cpp load {loaded.load_seconds:.1f} s; "
        f"{threads} threads, n_ctx {args.n_ctx}, {args.calls} calls per row; load average {os.getloadavg()[0]:.1f}"
    )
    print("judge calls (compliance task, ChatAdapter, JSON schema), prompt cache OFF:")
    bench_judge(engine, args.calls, cold=True)
    print("judge calls, prompt cache ON (typical run: DSPy's system prompt is a shared prefix):")
    bench_judge(engine, args.calls, cold=False)
    print("verbalization = fact sheet (OpenCV + RapidOCR) + rewrite by the local LM, prompt cache OFF:")
    bench_verbalize(engine, args.calls)


if __name__ == "__main__":
    main()
