"""Benchmark: ``evaluate()`` + ``ImageJudge`` overhead vs a plain loop of ``dspy.Predict`` calls (0 ms latency).

Run: ``.venv/bin/python benchmarks/overhead.py`` (no network; scripted engine answering instantly).
Both sides make the same judge calls (image mode) on the same examples on one thread; the ratio is the
per-example cost of BLPO's evaluation loop relative to the bare DSPy loop. Target: ratio <= 1.05.
"""

from __future__ import annotations

import os
import time
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy

from blpo_dspy.evaluation import evaluate
from blpo_dspy.modules import ImageJudge
from blpo_dspy.testing import CountingWorld

N_EXAMPLES = 200
REPEATS = 5


def plain_loop(world: CountingWorld, lm: dspy.LM, examples: list[dspy.Example]) -> float:
    """Seconds for a bare Python loop of ``dspy.Predict`` judge calls."""
    predict = dspy.Predict(world.task.judge_signature("image"))
    start = time.perf_counter()
    with dspy.context(lm=lm):
        for example in examples:
            predict(**example.inputs())
    return time.perf_counter() - start


def blpo_loop(world: CountingWorld, lm: dspy.LM, examples: list[dspy.Example]) -> float:
    """Seconds for ``evaluate(ImageJudge(image mode), examples, num_threads=1, ci=False)``."""
    program = ImageJudge(world.task, judge_sees="image", judge_lm=lm, verbalizer_lm=lm)
    start = time.perf_counter()
    evaluate(program, examples, num_threads=1, ci=False)
    return time.perf_counter() - start


def main() -> None:
    """Run the benchmark and print its figures (best of ``REPEATS``, interleaved)."""
    world = CountingWorld()
    lm = world.lm
    examples = world.examples(N_EXAMPLES, seed=1)
    plain_loop(world, lm, examples[:10])  # warm-up (imports, adapter caches)
    blpo_loop(world, lm, examples[:10])
    plain: list[float] = []
    ours: list[float] = []
    for _ in range(REPEATS):
        world.engine.reset()
        plain.append(plain_loop(world, lm, examples))
        plain_calls = len(world.engine.calls)
        world.engine.reset()
        ours.append(blpo_loop(world, lm, examples))
        our_calls = len(world.engine.calls)
    best_plain, best_ours = min(plain), min(ours)
    per: dict[str, Any] = {"plain": best_plain / N_EXAMPLES * 1e3, "evaluate": best_ours / N_EXAMPLES * 1e3}
    print(
        f"{N_EXAMPLES} examples, best of {REPEATS}: plain dspy.Predict loop={best_plain:.3f}s "
        f"({per['plain']:.2f} ms/ex, {plain_calls} calls) | evaluate(ImageJudge image)={best_ours:.3f}s "
        f"({per['evaluate']:.2f} ms/ex, {our_calls} calls) | ratio={best_ours / best_plain:.3f} (target <= 1.05); "
        f"overhead={per['evaluate'] - per['plain']:.3f} ms/example"
    )


if __name__ == "__main__":
    main()
