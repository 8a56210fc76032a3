"""Benchmark: framework overhead of ``evaluate()`` + ``ImageJudge`` vs a plain loop of ``dspy.Predict`` calls.

Run: ``.venv/bin/python benchmarks/overhead.py [--examples 200] [--repeats 15]`` (no network; the scripted
CountingWorld engine answers instantly, so only framework time is measured). Target: ratio <= 1.05.

Both sides do the same program work, and the script checks it:

- ``plain``: a hand-written evaluation loop. For each example ``dspy.Predict(signature)(**example.inputs())`` under
  ``dspy.context(lm=...)``, the answer parsed with ``task.parse_label``, a failed call scored as wrong; then the
  accuracy. ``signature`` is the program's own judge signature (same instructions, fields and types).
- ``evaluate``: ``blpo_dspy.evaluate(ImageJudge(task, judge_sees="image"), examples, num_threads=1, ci=False)``.

Times are CPU seconds of this process (``time.process_time``: the framework's own work, not inflated when other
processes preempt the benchmark on a busy machine); wall-clock ratios are printed as well. Every repetition records
the engine's requests on both sides and asserts that they are identical (same system prompt, same user text, same
image bytes, same order) and that both sides found the same labels. Repetitions are interleaved (the order
alternates), each preceded by a ``gc.collect()``; the script prints the median time per side, the median of the
per-repetition ratios with its spread, and a breakdown:

- ``program``: the same hand-written loop calling ``ImageJudge(**inputs)`` instead of the bare ``dspy.Predict``
  (what the two ``dspy.Module`` layers ``ImageJudge`` -> ``Judge``, their ``dspy.context`` and label handling cost);
- ``evaluate`` minus ``program``: ``evaluate()``'s own bookkeeping (input/label checks, records, metrics);
- the number of Python function calls per example on each side (one run under ``cProfile``), a deterministic
  measure of the work that the load of a shared machine cannot blur.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy

from blpo_dspy.evaluation import evaluate
from blpo_dspy.modules import ImageJudge
from blpo_dspy.task import Label, Task
from blpo_dspy.testing import CountingWorld

TARGET = 1.05

Side = Callable[[], list[Label | None]]


def _score(labels: list[Label | None], golds: Sequence[Label]) -> float:
    return sum(label is not None and label == gold for label, gold in zip(labels, golds, strict=True)) / len(golds)


def plain_loop(task: Task, predict: dspy.Predict, lm: dspy.LM, examples: list[dspy.Example]) -> list[Label | None]:
    """A hand-written evaluation loop over a bare ``dspy.Predict``: call, parse the label, score."""
    labels: list[Label | None] = []
    with dspy.context(lm=lm):
        for example in examples:
            try:
                labels.append(task.parse_label(predict(**example.inputs()).label))
            except Exception:
                labels.append(None)
    _score(labels, [example.label for example in examples])
    return labels


def program_loop(program: ImageJudge, examples: list[dspy.Example]) -> list[Label | None]:
    """The same hand-written loop calling the ``ImageJudge`` program (its own LM, parsed labels)."""
    labels: list[Label | None] = []
    for example in examples:
        try:
            labels.append(program(**example.inputs()).label)
        except Exception:
            labels.append(None)
    _score(labels, [example.label for example in examples])
    return labels


def evaluate_loop(program: ImageJudge, examples: list[dspy.Example]) -> list[Label | None]:
    """``evaluate(program, examples, num_threads=1, ci=False)``; the predicted labels."""
    report = evaluate(program, examples, num_threads=1, ci=False)
    return [record.label for record in report.predictions]


def _requests(world: CountingWorld) -> list[tuple[str, str, tuple[tuple[str, tuple[bytes, ...]], ...]]]:
    return [
        (call.system, call.user_text, tuple((name, tuple(data)) for name, data in sorted(call.images.items())))
        for call in world.engine.calls
    ]


def _timed(world: CountingWorld, side: Side) -> tuple[float, float, list[Label | None], list[Any]]:
    """(CPU seconds, wall seconds, labels, requests) of one run of a side."""
    world.engine.reset()
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    labels = side()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu, wall, labels, _requests(world)


def _function_calls(world: CountingWorld, side: Side) -> int:
    """Python function calls made by one run of a side (``cProfile``): a deterministic measure of work that a busy
    machine cannot disturb."""
    world.engine.reset()
    profile = cProfile.Profile()
    profile.enable()
    side()
    profile.disable()
    return pstats.Stats(profile).total_calls


def _spread(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return f"min {min(values):.3f}, IQR [{q[0]:.3f}, {q[2]:.3f}], max {max(values):.3f}"


def run(n_examples: int, repeats: int) -> dict[str, Any]:
    """Run the benchmark; return the raw timings and the figures printed by :func:`main`."""
    world = CountingWorld()
    lm = world.lm
    examples = world.examples(n_examples, seed=1)
    program = ImageJudge(world.task, judge_sees="image", judge_lm=lm, verbalizer_lm=lm)
    predict = dspy.Predict(program.judge.predict.signature)  # the very signature the program's judge uses
    sides: dict[str, Side] = {
        "plain": lambda: plain_loop(world.task, predict, lm, examples),
        "program": lambda: program_loop(program, examples),
        "evaluate": lambda: evaluate_loop(program, examples),
    }
    for side in sides.values():  # warm-up: imports, adapter and pydantic caches
        side()
    times: dict[str, list[float]] = {name: [] for name in sides}
    walls: dict[str, list[float]] = {name: [] for name in sides}
    calls = 0
    for repeat in range(repeats):
        order = list(sides) if repeat % 2 == 0 else list(reversed(sides))
        seen: dict[str, tuple[list[Label | None], list[Any]]] = {}
        for name in order:
            cpu, wall, labels, requests = _timed(world, sides[name])
            times[name].append(cpu)
            walls[name].append(wall)
            seen[name] = (labels, requests)
        reference_labels, reference_requests = seen["plain"]
        for name, (labels, requests) in seen.items():
            if requests != reference_requests:
                raise AssertionError(f"{name} made different LM requests from the plain loop")
            if labels != reference_labels:
                raise AssertionError(f"{name} found different labels from the plain loop")
        calls = len(reference_requests)
    ratios = [ours / plain for ours, plain in zip(times["evaluate"], times["plain"], strict=True)]
    wall_ratios = [ours / plain for ours, plain in zip(walls["evaluate"], walls["plain"], strict=True)]
    program_ratios = [prog / plain for prog, plain in zip(times["program"], times["plain"], strict=True)]
    median = {name: statistics.median(values) for name, values in times.items()}
    per_example_us = {name: value / n_examples * 1e6 for name, value in median.items()}

    def paired_us(a: str, b: str) -> float:  # median over repetitions of (a - b), per example
        return statistics.median(x - y for x, y in zip(times[a], times[b], strict=True)) / n_examples * 1e6

    return {
        "examples": n_examples,
        "repeats": repeats,
        "calls": calls,
        "function_calls": {name: _function_calls(world, side) / n_examples for name, side in sides.items()},
        "layers_us": paired_us("program", "plain"),
        "bookkeeping_us": paired_us("evaluate", "program"),
        "times": times,
        "walls": walls,
        "wall_ratio": statistics.median(wall_ratios),
        "wall_ratios": wall_ratios,
        "median": median,
        "per_example_us": per_example_us,
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "program_ratio": statistics.median(program_ratios),
        "program_ratios": program_ratios,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments, run, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200, help="examples per run (default 200)")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved repetitions (default 15)")
    args = parser.parse_args(argv)
    result = run(args.examples, args.repeats)
    us = result["per_example_us"]
    print(
        f"{result['examples']} examples x {result['repeats']} interleaved repetitions, {result['calls']} judge calls "
        "per side, identical requests and labels on every side"
    )
    for name in ("plain", "program", "evaluate"):
        print(
            f"  {name:9s} median CPU {result['median'][name]:.4f} s = {us[name]:7.1f} us/example "
            f"(wall {statistics.median(result['walls'][name]):.4f} s)"
        )
    print(
        f"ratio evaluate/plain (CPU time): median {result['ratio']:.3f} ({_spread(result['ratios'])}); "
        f"target <= {TARGET}: {'met' if result['ratio'] <= TARGET else 'NOT met'}"
    )
    print(f"ratio evaluate/plain (wall time): median {result['wall_ratio']:.3f} ({_spread(result['wall_ratios'])})")
    best = min(result["times"]["evaluate"]) / min(result["times"]["plain"])
    print(f"ratio of the best (minimum) CPU times, least disturbed by a busy machine: {best:.3f}")
    print(
        f"overhead (medians of paired differences): ImageJudge/Judge module layers {result['layers_us']:.1f} "
        f"us/example (program/plain {result['program_ratio']:.3f}) + evaluate() bookkeeping "
        f"{result['bookkeeping_us']:.1f} us/example"
    )
    calls = result["function_calls"]
    print(
        "Python function calls per example (cProfile, deterministic): "
        + ", ".join(f"{name} {count:.1f}" for name, count in calls.items())
        + f"; evaluate/plain {calls['evaluate'] / calls['plain']:.3f}"
    )


if __name__ == "__main__":
    main()
