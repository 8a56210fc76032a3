"""Start several spawned processes that meet at a barrier before each step, so they act on the same thing at once."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from pathlib import Path
from typing import Any


def run_together(
    target: Callable[[str, int, int, Any], None], directory: Path, processes: int, rounds: int, timeout: float = 180.0
) -> list[int | None]:
    """Run ``target(str(directory), index, rounds, barrier)`` in ``processes`` spawned processes; their exit codes.

    ``target`` must be a module-level function that calls ``barrier.wait()`` before each of its ``rounds`` steps.
    """
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes)
    workers = [context.Process(target=target, args=(str(directory), i, rounds, barrier)) for i in range(processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=timeout)
        if worker.exitcode is None:
            worker.kill()
    return [worker.exitcode for worker in workers]
