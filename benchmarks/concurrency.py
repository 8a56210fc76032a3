"""Benchmark: BLPO compile wall time under 100 ms simulated LM latency at 1, 4 and 8 threads.

Run: ``.venv/bin/python benchmarks/concurrency.py`` (no network; scripted CountingWorld + injected latency).
Compares wall time with two ideals measured from the same run's calls: ``calls x 0.1 s / threads`` (simple), and the
same with the proposer calls serial, as Algorithm 1 needs each proposal's score before the next one
(serial-proposer). Two configs: a tiny search (``small``) and one outer step at BLPO's default batch sizes
(``defaults``). Target: wall / simple ideal <= 1.25 at 8 threads.
"""

from __future__ import annotations

import os
import time
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from blpo_dspy.modules import ImageJudge
from blpo_dspy.teleprompt import BLPO
from blpo_dspy.testing import CountingWorld

LATENCY_S = 0.1
THREADS = (1, 4, 8)
# (BLPO parameters, train size, val size): a tiny search, and one outer step at BLPO's default batch sizes
CONFIGS: dict[str, tuple[dict[str, Any], int, int]] = {
    "small": ({"outer_steps": 1, "inner_steps": 2, "error_batch_size": 8, "retain_batch_size": 4}, 16, 12),
    "defaults": ({"outer_steps": 1, "inner_steps": 5, "error_batch_size": 10, "retain_batch_size": 10}, 40, 40),
}


def run(config: str, threads: int) -> tuple[float, int, int]:
    """One compile of a config at ``threads``; returns (wall seconds, LM calls, proposer calls)."""
    params, n_train, n_val = CONFIGS[config]
    world = CountingWorld(latency=LATENCY_S)  # every call sleeps first, releasing the GIL as network I/O does
    program = ImageJudge(world.task, judge_sees="text", verbalizer_lm=world.lm, judge_lm=world.lm)
    optimizer = BLPO(proposer_lm=world.lm, num_threads=threads, **params)
    start = time.perf_counter()
    optimizer.compile(program, trainset=world.examples(n_train, seed=1), valset=world.examples(n_val, seed=2))
    wall = time.perf_counter() - start
    return wall, len(world.engine.calls), world.engine.count("proposer")


def main() -> None:
    """Run the benchmark and print its figures."""
    for config in CONFIGS:
        baseline_wall = None
        for threads in THREADS:
            wall, calls, serial = run(config, threads)
            baseline_wall = baseline_wall or wall
            simple = calls * LATENCY_S / threads
            amdahl = serial * LATENCY_S + (calls - serial) * LATENCY_S / threads
            print(
                f"[{config}] threads={threads}: calls={calls} (proposer, serial: {serial}) wall={wall:.2f}s "
                f"speedup vs 1 thread={baseline_wall / wall:.2f}x | simple ideal={simple:.2f}s "
                f"ratio={wall / simple:.2f}x (target <= 1.25 at 8) | serial-proposer ideal={amdahl:.2f}s "
                f"ratio={wall / amdahl:.2f}x"
            )


if __name__ == "__main__":
    main()
