"""Benchmark: verbalizer calls per unique (image, instruction) pair, for one compile and for a resume.

Run: ``.venv/bin/python benchmarks/blpo_calls.py`` (no network; scripted CountingWorld).
Target: ratio 1.00 (every verbalization made once), and 0 new verbalizer calls when resuming a finished run.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from blpo_dspy.modules import ImageJudge
from blpo_dspy.teleprompt import BLPO
from blpo_dspy.testing import CountingWorld

PARAMS: dict[str, Any] = {
    "outer_steps": 2,
    "inner_steps": 3,
    "error_batch_size": 5,
    "retain_batch_size": 5,
    "num_threads": 4,
}


def compile_once(world: CountingWorld, run_dir: Path, resume: bool = False) -> Any:
    """One BLPO compile of an ImageJudge (text mode) on the counting world."""
    program = ImageJudge(world.task, judge_sees="text", verbalizer_lm=world.lm, judge_lm=world.lm)
    optimizer = BLPO(proposer_lm=world.lm, run_dir=run_dir, resume=resume, **PARAMS)
    return optimizer.compile(program, trainset=world.examples(20, seed=1), valset=world.examples(12, seed=2))


def verbalizer_stats(world: CountingWorld) -> tuple[int, int]:
    """(verbalizer calls, unique (image sha256, instruction) pairs) recorded by the world's engine."""
    calls = world.engine.calls_for("verbalizer")
    pairs = {(hashlib.sha256(c.images["image"][0]).hexdigest(), c.instructions) for c in calls}
    return len(calls), len(pairs)


def main() -> None:
    """Run the benchmark and print its figures."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        world = CountingWorld()
        compile_once(world, run_dir)
        calls, pairs = verbalizer_stats(world)
        print(f"compile: verbalizer calls={calls} unique pairs={pairs} ratio={calls / max(pairs, 1):.2f} (target 1.00)")

        resumed_world = CountingWorld()
        compile_once(resumed_world, run_dir, resume=True)
        new_calls, _ = verbalizer_stats(resumed_world)
        total = calls + new_calls
        print(
            f"resume:  new verbalizer calls={new_calls} (target 0); calls over both runs / unique pairs="
            f"{total / max(pairs, 1):.2f} (target 1.00); all new LM calls={len(resumed_world.engine.calls)}"
        )


if __name__ == "__main__":
    main()
