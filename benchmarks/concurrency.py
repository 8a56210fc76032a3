"""Benchmark: BLPO compile wall time under 100 ms simulated LM latency at 1, 4 and 8 threads.

Run: ``.venv/bin/python benchmarks/concurrency.py`` (no network; scripted CountingWorld + injected latency).
Compares wall time with three ideals: ``calls x 0.1 s / threads`` (simple); the proposer calls serial, as Algorithm
1 needs each proposal's score before the next (serial-proposer); and the ideal allowed by the actual batch structure
(each parallel batch of k items and c calls needs ceil(k / threads) x (c / k) x 0.1 s; calls outside batches are
serial). Two configs: a tiny search (``small``) and one outer step at BLPO's default batch sizes (``defaults``).
Target: wall / ideal <= 1.25 at 8 threads.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from blpo_dspy.modules import ImageJudge
from blpo_dspy.teleprompt import BLPO
from blpo_dspy.teleprompt import blpo as blpo_module
from blpo_dspy.testing import CountingWorld

LATENCY_S = 0.1
THREADS = (1, 4, 8)
# (BLPO parameters, train size, val size): a tiny search, and one outer step at BLPO's default batch sizes
CONFIGS: dict[str, tuple[dict[str, Any], int, int]] = {
    "small": ({"outer_steps": 1, "inner_steps": 2, "error_batch_size": 8, "retain_batch_size": 4}, 16, 12),
    "defaults": ({"outer_steps": 1, "inner_steps": 5, "error_batch_size": 10, "retain_batch_size": 10}, 40, 40),
}


class BatchTracker:
    """Records the size of every ``_Run.parallel`` batch and which batch each LM call belongs to."""

    def __init__(self) -> None:
        self.current: int | None = None
        self.sizes: list[int] = []
        self.calls: Counter[int | None] = Counter()
        self.lock = threading.Lock()

    def ideal_seconds(self, threads: int) -> float:
        """Lower bound on wall time given the batch structure."""
        total = LATENCY_S * self.calls.get(None, 0)
        for batch, size in enumerate(self.sizes):
            calls = self.calls.get(batch, 0)
            if calls and size:
                total += math.ceil(size / min(threads, size)) * (calls / size) * LATENCY_S
        return total


def install(world: CountingWorld, tracker: BatchTracker) -> None:
    """Make every call on the world's engine sleep ``LATENCY_S`` (thread-safe) and be counted per batch."""
    inner = world.engine.complete

    def complete(request: Any) -> Any:
        with tracker.lock:
            tracker.calls[tracker.current] += 1
        time.sleep(LATENCY_S)
        return inner(request)

    world.engine.complete = complete  # type: ignore[method-assign]


def run(config: str, threads: int) -> tuple[float, int, BatchTracker]:
    """One compile of a config at ``threads``; returns (wall seconds, LM calls, batch tracker)."""
    params, n_train, n_val = CONFIGS[config]
    tracker = BatchTracker()
    original: Callable[..., Any] = blpo_module._Run.parallel

    def parallel(self: Any, function: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        tracker.sizes.append(len(items))
        tracker.current = len(tracker.sizes) - 1
        try:
            return original(self, function, items)
        finally:
            tracker.current = None

    blpo_module._Run.parallel = parallel  # type: ignore[method-assign]
    try:
        world = CountingWorld()
        install(world, tracker)
        program = ImageJudge(world.task, judge_sees="text", verbalizer_lm=world.lm, judge_lm=world.lm)
        optimizer = BLPO(proposer_lm=world.lm, num_threads=threads, **params)
        start = time.perf_counter()
        optimizer.compile(program, trainset=world.examples(n_train, seed=1), valset=world.examples(n_val, seed=2))
        wall = time.perf_counter() - start
    finally:
        blpo_module._Run.parallel = original  # type: ignore[method-assign]
    return wall, len(world.engine.calls), tracker


def main() -> None:
    """Run the benchmark and print its figures."""
    for config in CONFIGS:
        baseline_wall = None
        for threads in THREADS:
            wall, calls, tracker = run(config, threads)
            baseline_wall = baseline_wall or wall
            simple = calls * LATENCY_S / threads
            structured = tracker.ideal_seconds(threads)
            serial = tracker.calls.get(None, 0)
            amdahl = serial * LATENCY_S + (calls - serial) * LATENCY_S / threads
            print(
                f"[{config}] threads={threads}: calls={calls} (serial outside batches={serial}, "
                f"batches={len(tracker.sizes)}) wall={wall:.2f}s speedup vs 1 thread={baseline_wall / wall:.2f}x | "
                f"simple ideal={simple:.2f}s ratio={wall / simple:.2f}x | "
                f"serial-proposer ideal={amdahl:.2f}s ratio={wall / amdahl:.2f}x | "
                f"batch-structure ideal={structured:.2f}s ratio={wall / structured:.2f}x (target <= 1.25 at 8)"
            )


if __name__ == "__main__":
    main()
