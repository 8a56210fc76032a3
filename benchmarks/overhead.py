"""Benchmark: framework overhead of BLPO's evaluation loops vs a plain loop of ``dspy.Predict`` calls.

Run: ``.venv/bin/python benchmarks/overhead.py [--examples 200] [--rounds 10]`` (no network; the scripted
CountingWorld engine answers instantly, so only framework time is measured). Target: ratio <= 1.05 for
``evaluate``.

All sides run under one ``dspy.context(lm=lm)``, as the plain loop does; ``ImageJudge`` (given ``judge_lm=lm``)
finds its LM current and enters no context of its own. What is compared, all sides making the same LM requests
(checked: same system prompt, same user text, same image bytes, same order) and finding the same labels:

- ``plain``: a hand-written evaluation loop. For each example ``dspy.Predict(signature)(**example.inputs())`` under
  ``dspy.context(lm=...)``, the answer parsed with ``task.parse_label``, a failed call scored as wrong; then the
  accuracy. ``signature`` is the program's own judge signature (same instructions, fields and types).
- ``evaluate`` (the target): ``blpo_dspy.evaluate(ImageJudge(task, judge_sees="image", judge_lm=lm), examples,
  num_threads=1, ci=False)``, the loop that scores a program on held-out data (``blpo eval``, the compile's test
  report, ``compare``), over all the examples in one call.
- ``program``: a hand-written loop calling ``ImageJudge(**inputs)`` (what the program's DSPy module call and its
  label handling cost; ``evaluate`` minus ``program`` is ``evaluate()``'s own bookkeeping).
- ``module``: the plain loop's body around the least DSPy program there is, a ``dspy.Module`` whose ``forward``
  returns ``self.predict(**inputs)``: what one DSPy module call costs by itself (callbacks, the caller-module
  context, a history per module), the floor under any program's loop. ``program`` minus ``module`` is what
  ``ImageJudge`` adds on top of being a DSPy module.
- ``compile``: the loop that scores a candidate (q, p) inside a compile, ``ProgramCalls.predict_many`` at one
  thread: a content key per call, the run's journal looked up first and written after every finished call (the
  SQLite write that lets a killed compile resume without repeating it), usage tracking, the budget ledger. Each
  round opens a fresh journal, so every call is live. ``journal`` times the content keys, lookups and writes alone,
  on the same keys (what durability costs).

Method: the sides take turns example by example. A shared machine's load changes over tens of milliseconds, so
comparing whole runs of a side measured seconds apart is mostly noise; here each plain call runs right before or
after (alternately) the call it is compared with, in the same loop:

- ``evaluate`` runs once over all examples on a proxy program whose call runs the plain loop's body for the same
  example next to ``ImageJudge``'s call. The proxy is the instrument: the time inside its frames (the plain segment,
  its readings and bookkeeping) is taken out of ``evaluate``'s time and the timed ``ImageJudge`` call put back, so
  ``evaluate`` is charged its own loop, its bookkeeping and the program calls, as in a run on the program itself.
  (Until this was done, the proxy's frames, about 4 us per example or 0.4%, were charged to ``evaluate``.)
- ``program`` and ``compile`` alternate with the plain body in a hand-written loop (``compile`` one example per
  ``predict_many`` call, which also counts that call's batch set-up against it).

Times are CPU seconds of this process (``time.process_time``: not inflated when other processes preempt the
benchmark; the work of every thread is counted). Garbage collection is left on, but each pause is timed
(``gc.callbacks``) and taken out of the segment it fell in: a full collection walks DSPy's call histories (10,000
entries per LM and per module by default) and can take longer than many calls, so whichever segment triggered it
would look slow. The pauses are summed and shared out in proportion to what triggers them: each side's net
allocations of garbage-collected objects per example (CPython collects when that count passes a threshold),
counted with ``gc.get_count()`` in a separate pass where each side's loop and the plain loop run on their own with
collection off (:meth:`Bench.allocations`; in the interleaved rounds one loop frees history entries another
allocated). Each side's plain loop has a predictor of its own, as a user's loop would: one predictor shared by
every loop records all their calls, so its history turns over faster than the program's. The ratio is (own CPU
time + share of the pauses)
of a side over the same for its interleaved plain segments; the spread over rounds and the ratio without
collections are printed too, and the number of Python function calls per example on each side (one run under
``cProfile``), a deterministic measure of the work that the load of a shared machine cannot blur.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy
from dspy.clients import base_lm

from blpo_dspy.budget import UsageLedger
from blpo_dspy.cache import CallJournal, VerbalizationCache, content_key, lm_identity
from blpo_dspy.evaluation import evaluate
from blpo_dspy.modules import ImageJudge
from blpo_dspy.task import Label, Task
from blpo_dspy.teleprompt.calls import Candidate, ProgramCalls
from blpo_dspy.testing import CountingWorld

TARGET = 1.05
SIDES = ("evaluate", "program", "module", "compile", "journal")

Request = tuple[str, str, tuple[tuple[str, tuple[bytes, ...]], ...]]


class GCMeter:
    """Times garbage-collection pauses."""

    def __init__(self) -> None:
        self.pause = 0.0  # CPU seconds of all collections so far
        self._began = 0.0

    def __enter__(self) -> GCMeter:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.process_time()
        else:
            self.pause += time.process_time() - self._began

    def reading(self) -> tuple[float, float]:
        """(CPU seconds now, pauses so far)."""
        return time.process_time(), self.pause


@dataclass
class Tally:
    """CPU seconds of one side without collection pauses."""

    seconds: float = 0.0

    def add(self, start: tuple[float, float], end: tuple[float, float]) -> None:
        """Count the segment between two :meth:`GCMeter.reading` s."""
        self.seconds += (end[0] - start[0]) - (end[1] - start[1])


@dataclass
class Round:
    """One round: each side's tally and the tally of the plain segments interleaved with it."""

    ours: dict[str, Tally] = field(default_factory=lambda: {name: Tally() for name in SIDES})
    plain: dict[str, Tally] = field(default_factory=lambda: {name: Tally() for name in SIDES})


def _score(labels: list[Label | None], golds: Sequence[Label]) -> float:
    return sum(label is not None and label == gold for label, gold in zip(labels, golds, strict=True)) / len(golds)


def plain_body(task: Task, predict: dspy.Module, example: dspy.Example) -> Label | None:
    """The body of a hand-written loop over a bare ``dspy.Predict``: call, parse the label (``None`` on failure)."""
    try:
        return task.parse_label(predict(**example.inputs()).label)
    except Exception:
        return None


class Wrapper(dspy.Module):
    """The least a DSPy program adds around a predictor: a module whose ``forward`` calls it."""

    def __init__(self, predict: dspy.Predict) -> None:
        super().__init__()
        self.predict = predict

    def forward(self, **inputs: Any) -> dspy.Prediction:
        """The predictor's prediction, unchanged."""
        return self.predict(**inputs)


class Bench:
    """The sides of the benchmark on one scripted world, each interleaved with the plain loop's body."""

    def __init__(self, n_examples: int, root: Path) -> None:
        self.world = CountingWorld()
        self.lm = self.world.lm
        self.task = self.world.task
        # Distinct inputs only: the compile's journal answers a repeated (image, prompt) without an LM call, and
        # every side must make the same calls as its plain loop (the scripted world repeats images past ~256).
        seen: set[tuple[bytes, str]] = set()
        self.examples = []
        for example in self.world.examples(n_examples, seed=1):
            content = (example.image.url.encode(), example.prompt)
            if content not in seen:
                seen.add(content)
                self.examples.append(example)
        self.program = ImageJudge(self.task, judge_sees="image", judge_lm=self.lm, verbalizer_lm=self.lm)
        signature = self.program.judge.predict.signature  # the very signature the judge uses
        # Each side's plain loop has a predictor of its own, as a user's loop would, and so does the wrapper: a
        # predictor shared by several loops records all their calls in its history, which then turns over faster
        # than the program's and frees history entries in the plain segments that the other side keeps alive.
        self.plain_predictors = {name: dspy.Predict(signature) for name in SIDES}
        self.wrapper = Wrapper(dspy.Predict(signature))
        self.candidate = Candidate(self.program.verbalizer.instruction, self.program.judge.instruction)
        self.root = root
        self.runs = 0
        self.meter = GCMeter()

    # ------------------------------------------------------------------ the plain segment
    def _plain(self, side: str, example: dspy.Example, tally: Tally, labels: list[Label | None]) -> None:
        predict = self.plain_predictors[side]
        start = self.meter.reading()
        labels.append(plain_body(self.task, predict, example))
        tally.add(start, self.meter.reading())

    def _check(self, name: str, ours: list[Label | None], plain: list[Label | None]) -> None:
        calls = self.world.engine.calls
        if len(calls) != 2 * len(self.examples):
            raise AssertionError(f"{name}: {len(calls)} LM requests, expected {2 * len(self.examples)}")
        requests: list[Request] = [
            (c.system, c.user_text, tuple((k, tuple(v)) for k, v in sorted(c.images.items()))) for c in calls
        ]
        if any(requests[i] != requests[i + 1] for i in range(0, len(requests), 2)):
            raise AssertionError(f"{name} made different LM requests from the plain loop")
        if ours != plain:
            raise AssertionError(f"{name} found different labels from the plain loop")
        _score(plain, [example.label for example in self.examples])

    # ------------------------------------------------------------------ sides
    def evaluate_side(self, ours: Tally, plain: Tally) -> None:
        """``evaluate()`` over all examples on a proxy that runs the plain body next to each program call.

        The proxy is the benchmark's instrument, not part of ``evaluate()``: its own frames are timed (from its entry
        to its exit) and taken out, and the program call inside it is timed and counted back in. What remains is
        ``evaluate()``'s loop and bookkeeping around the call (including making the call) plus the program calls.
        """
        plain_labels: list[Label | None] = []
        bench, meter = self, self.meter
        inside, calls = Tally(), Tally()  # time inside the proxy's frames; time in the program calls within them

        class Proxy:
            task = bench.task

            def __init__(self) -> None:
                self.calls = 0

            def __call__(self, **inputs: Any) -> Any:
                entry = meter.reading()
                example = bench.examples[self.calls]
                self.calls += 1
                if self.calls % 2:
                    bench._plain("evaluate", example, plain, plain_labels)
                    start = meter.reading()
                    prediction = bench.program(**inputs)
                    calls.add(start, meter.reading())
                else:
                    start = meter.reading()
                    prediction = bench.program(**inputs)
                    calls.add(start, meter.reading())
                    bench._plain("evaluate", example, plain, plain_labels)
                inside.add(entry, meter.reading())
                return prediction

        self.world.engine.reset()
        start = meter.reading()
        report = evaluate(Proxy(), self.examples, num_threads=1, ci=False)
        ours.add(start, meter.reading())
        ours.seconds += calls.seconds - inside.seconds  # the proxy's frames out, the program calls in
        self._check("evaluate", [record.label for record in report.predictions], plain_labels)

    def _alternate(self, name: str, ours: Tally, plain: Tally, call: Callable[[dspy.Example], Label | None]) -> None:
        """Run ``call`` on every example, each time right after (even examples) or before (odd) the plain body."""
        labels: list[Label | None] = []
        plain_labels: list[Label | None] = []
        self.world.engine.reset()
        for index, example in enumerate(self.examples):
            if index % 2 == 0:
                self._plain(name, example, plain, plain_labels)
            start = self.meter.reading()
            labels.append(call(example))
            ours.add(start, self.meter.reading())
            if index % 2 == 1:
                self._plain(name, example, plain, plain_labels)
        self._check(name, labels, plain_labels)

    def call_program(self, example: dspy.Example) -> Label | None:
        """The body of a hand-written loop calling the ``ImageJudge`` program."""
        try:
            return self.program(**example.inputs()).label
        except Exception:
            return None

    def program_side(self, ours: Tally, plain: Tally) -> None:
        """A hand-written loop calling the ``ImageJudge`` program, alternating with the plain body."""
        self._alternate("program", ours, plain, self.call_program)

    def module_side(self, ours: Tally, plain: Tally) -> None:
        """The plain loop's body around a minimal DSPy module (:class:`Wrapper`) instead of the bare predictor:
        the cost of a DSPy module call itself, the floor under any DSPy program's loop."""
        self._alternate("module", ours, plain, lambda example: plain_body(self.task, self.wrapper, example))

    def _calls(self) -> ProgramCalls:
        self.runs += 1
        run_dir = self.root / f"run-{self.runs}"
        return ProgramCalls(
            task=self.task,
            judge_sees="image",
            verbalizer_lm=self.lm,
            judge_lm=self.lm,
            proposer_lm=None,
            ledger=UsageLedger(),
            journal=CallJournal(run_dir / "cache.sqlite"),
            vcache=VerbalizationCache(run_dir / "verbalizations.sqlite"),
            num_threads=1,
        )

    def compile_side(self, ours: Tally, plain: Tally) -> None:
        """The compile's candidate scoring, one example per ``predict_many`` call, alternating with the plain body."""
        calls = self._calls()
        self._alternate("compile", ours, plain, lambda example: calls.predict_many([example], self.candidate)[0].label)

    def journal_side(self, ours: Tally, plain: Tally) -> None:
        """The journal lookups and writes of :meth:`compile_side` alone (same keys and values), with plain calls
        interleaved as elsewhere (they are the reference the journal's cost is compared with)."""
        step = self.journal_step()
        plain_labels: list[Label | None] = []
        self.world.engine.reset()
        for example in self.examples:
            self._plain("journal", example, plain, plain_labels)
            self._plain("journal", example, Tally(), [])  # a second call, so the request check's pairing holds
            start = self.meter.reading()
            step(example)
            ours.add(start, self.meter.reading())

    def journal_step(self) -> Callable[[dspy.Example], None]:
        """On a fresh run's journal: the content key of the compile's call on an example, its lookup and write."""
        calls = self._calls()
        journal = calls.journal
        identity = lm_identity(self.lm)

        def step(example: dspy.Example) -> None:
            key = content_key("judge", self.candidate.judge, "image", calls.example_key(example), {}, identity)
            if journal.get("judge", key) is None:
                journal.put("judge", key, {"raw_label": "yes", "rationale": "The image matches.", "error": None})

        return step

    def allocations(self) -> dict[str, float]:
        """Net allocations of gc-tracked objects per example of each side's loop and of the plain loop, each run
        on its own with collection off, after emptying DSPy's call histories (a full history evicts, and so frees,
        an earlier call's entry in whatever loop runs).

        Collections are triggered by net allocations and are longer the more objects survive, so the pauses are
        shared out by these counts. They are not counted in the interleaved rounds: there one loop frees what
        another allocated (a call's history entry is freed by whichever later call evicts it from the last history
        holding it), which shifts pauses between the sides.
        """
        task, examples = self.task, self.examples
        plain = dspy.Predict(self.plain_predictors["program"].signature)
        calls = self._calls()
        step = self.journal_step()
        loops: dict[str, Callable[[], Any]] = {
            "plain": lambda: [plain_body(task, plain, example) for example in examples],
            "evaluate": lambda: evaluate(self.program, examples, num_threads=1, ci=False),
            "program": lambda: [self.call_program(example) for example in examples],
            "module": lambda: [plain_body(task, self.wrapper, example) for example in examples],
            "compile": lambda: [calls.predict_many([example], self.candidate)[0].label for example in examples],
            "journal": lambda: [step(example) for example in examples],
        }
        base_lm.GLOBAL_HISTORY.clear()
        holders = [self.lm, self.wrapper, self.wrapper.predict, plain, *self.plain_predictors.values()]
        for holder in holders + [module for _, module in self.program.named_sub_modules()]:
            holder.history.clear()
        counts: dict[str, float] = {}
        ballast = [[] for _ in range(100_000)]  # keeps the counter far from 0, where CPython stops counting frees
        gc.disable()
        try:
            for name, loop in loops.items():
                self.world.engine.reset()
                before = gc.get_count()[0]
                result = loop()
                counts[name] = (gc.get_count()[0] - before) / len(examples)
                del result
        finally:
            gc.enable()
            del ballast
        return counts

    def sides(self) -> dict[str, Callable[[Tally, Tally], None]]:
        """The sides by name."""
        return {
            "evaluate": self.evaluate_side,
            "program": self.program_side,
            "module": self.module_side,
            "compile": self.compile_side,
            "journal": self.journal_side,
        }


def _function_calls(run: Callable[[], Any]) -> int:
    """Python function calls made by one run (``cProfile``): a deterministic measure of work."""
    profile = cProfile.Profile()
    profile.enable()
    run()
    profile.disable()
    return pstats.Stats(profile).total_calls


def _spread(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return f"min {min(values):.3f}, IQR [{q[0]:.3f}, {q[2]:.3f}], max {max(values):.3f}"


def run(n_examples: int, rounds: int) -> dict[str, Any]:
    """Run the benchmark; return the raw tallies and the figures printed by :func:`main`."""
    with tempfile.TemporaryDirectory(prefix="blpo-overhead-") as tmp:
        bench = Bench(n_examples, Path(tmp))
        n_examples = len(bench.examples)  # distinct ones
        sides = bench.sides()
        for side in sides.values():  # warm-up: imports, adapter and pydantic caches, SQLite statement caches
            with dspy.context(lm=bench.lm):
                side(Tally(), Tally())
        with dspy.context(lm=bench.lm):
            allocated = bench.allocations()
        results = [Round() for _ in range(rounds)]
        gc.collect()
        with bench.meter:
            for index, result in enumerate(results):
                shift = index % len(SIDES)
                for name in SIDES[shift:] + SIDES[:shift]:
                    with dspy.context(lm=bench.lm):  # the plain loop's one context (it holds the judge's LM)
                        sides[name](result.ours[name], result.plain[name])
            pauses = bench.meter.pause
        world, examples = bench.world, bench.examples
        plain_predict = bench.plain_predictors["program"]
        profiled = {
            "plain": lambda: [plain_body(bench.task, plain_predict, example) for example in examples],
            "evaluate": lambda: evaluate(bench.program, examples, num_threads=1, ci=False),
            "program": lambda: [bench.program(**example.inputs()) for example in examples],
        }
        function_calls = {}
        for name, side_run in profiled.items():
            world.engine.reset()
            with dspy.context(lm=bench.lm):
                function_calls[name] = _function_calls(side_run) / n_examples
    ours = {name: sum(r.ours[name].seconds for r in results) for name in SIDES}
    plains = {name: sum(r.plain[name].seconds for r in results) for name in SIDES}
    # Every side and every plain segment ran rounds x examples times (the journal side's second, untimed plain
    # call as often): the pauses go to each in proportion to its allocations.
    weight = {name: max(allocated[name], 0.0) for name in SIDES}
    plain_weight = max(allocated["plain"], 0.0)
    total_weight = sum(weight.values()) + (len(SIDES) + 1) * plain_weight or 1.0
    ours_gc = {name: ours[name] + pauses * weight[name] / total_weight for name in SIDES}
    plains_gc = {name: plains[name] + pauses * plain_weight / total_weight for name in SIDES}
    n_total = rounds * n_examples
    ratio = {name: ours_gc[name] / plains_gc[name] for name in SIDES}
    return {
        "examples": n_examples,
        "rounds": rounds,
        "us": {name: ours_gc[name] / n_total * 1e6 for name in SIDES},
        "plain_us": {name: plains_gc[name] / n_total * 1e6 for name in SIDES},
        "own_ratio": {name: ours[name] / plains[name] for name in SIDES},
        "round_ratios": {name: [r.ours[name].seconds / r.plain[name].seconds for r in results] for name in SIDES},
        "gc_pauses_s": pauses,
        "allocations": allocated,
        "ratio": ratio,
        "function_calls": function_calls,
        "met": ratio["evaluate"] <= TARGET,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments, run, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200, help="examples per round (default 200)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds over all examples and sides (default 10)")
    args = parser.parse_args(argv)
    result = run(args.examples, args.rounds)
    us, plain_us, ratio = result["us"], result["plain_us"], result["ratio"]
    print(
        f"{result['examples']} distinct examples x {result['rounds']} rounds, each call of a side next to a plain "
        f"call on the same example; identical requests and labels; garbage collection {result['gc_pauses_s']:.2f} s "
        "in all, shared by net allocations per example ("
        + ", ".join(f"{name} {count:.1f}" for name, count in result["allocations"].items())
        + ")"
    )
    for name in SIDES:
        print(
            f"  {name:8s} {us[name]:7.1f} us/example vs plain {plain_us[name]:7.1f}: ratio {ratio[name]:.3f} "
            f"(without collections {result['own_ratio'][name]:.3f}; per round {_spread(result['round_ratios'][name])})"
        )
    print(f"evaluate/plain = {ratio['evaluate']:.3f}; target <= {TARGET}: {'met' if result['met'] else 'NOT met'}")
    floor = us["module"] - plain_us["module"]
    layer = us["program"] - plain_us["program"]
    print(
        f"per example: a DSPy module call {floor:+.1f} us (module/plain {ratio['module']:.3f}); ImageJudge beyond "
        f"it {layer - floor:+.1f} us; evaluate() bookkeeping {us['evaluate'] - plain_us['evaluate'] - layer:+.1f} us "
        f"(evaluate/module {ratio['evaluate'] / ratio['module']:.3f}); the compile's loop "
        f"{us['compile'] - plain_us['compile']:+.1f} us, of which content keys, journal lookups and writes "
        f"{us['journal']:.1f} us"
    )
    calls = result["function_calls"]
    print(
        "Python function calls per example (cProfile, deterministic): "
        + ", ".join(f"{name} {count:.1f}" for name, count in calls.items())
        + f"; evaluate/plain {calls['evaluate'] / calls['plain']:.3f}"
    )


if __name__ == "__main__":
    main()
