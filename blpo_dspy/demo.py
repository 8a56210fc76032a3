"""The offline demo: the SYNTHETIC compliance task, seed judge vs BLPO, on the embedded local stack.

Everything runs in process with no network: the fact-sheet verbalizer (OpenCV + RapidOCR facts rewritten by the
local LM under the verbalizer instruction: it sees colours, shapes, counts, layout and text, not objects or style)
and a small local Qwen2.5-Coder model as text judge and proposer. The budgets are sized to finish in about 20
minutes on 2 CPU cores with the 0.5B model.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blpo_dspy.evaluation import EvaluationReport, evaluate

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoBudget:
    """Sizes of the demo's splits and search.

    Attributes:
        n_train: Optimisation split (errors are sampled from it).
        n_val: Validation split (decides selection).
        n_test: Held-out split (the before/after numbers).
        outer_steps: BLPO outer steps.
        inner_steps: BLPO inner steps (proposed I2T instructions per outer step).
        error_batch_size: Errors per batch.
        retain_batch_size: Retain-batch size (guarded selection).
    """

    n_train: int = 8
    n_val: int = 6
    n_test: int = 12
    outer_steps: int = 1
    inner_steps: int = 2
    error_batch_size: int = 3
    retain_batch_size: int = 2

    @property
    def n_total(self) -> int:
        """Banners rendered."""
        return self.n_train + self.n_val + self.n_test


@dataclass
class DemoResult:
    """What the demo measured.

    Attributes:
        run_dir: The run directory.
        seed: Evaluation of the seed program on the held-out split.
        compiled: Evaluation of the compiled program on the held-out split.
        instructions: Seed and compiled instructions.
        usage: BLPO's calls/tokens/seconds per role.
        eval_seconds: Wall time of the two held-out evaluations.
        wall_seconds: Whole demo wall time.
        stop_reason: Why BLPO stopped.
    """

    run_dir: Path
    seed: EvaluationReport
    compiled: EvaluationReport
    instructions: dict[str, dict[str, str]]
    usage: dict[str, Any]
    eval_seconds: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0
    stop_reason: str = ""

    def summary(self) -> str:
        """A plain-text summary: agreement before/after with CIs, an honest verdict, usage per role."""
        primary = self.seed.primary
        lines = [
            "SYNTHETIC compliance task (rendered banners; the fact-sheet verbalizer sees colours, shapes, counts,",
            f"layout and text only). Held-out split, n = {self.seed.n}.",
            "",
            f"{'metric':<24}{'seed program':>26}{'BLPO-compiled':>26}",
        ]
        for name, score in self.seed.scores.items():
            after = self.compiled.scores.get(name)
            lines.append(f"{name:<24}{score.format():>26}{after.format() if after else 'n/a':>26}")
        lines.append(
            f"{'parse failures':<24}{self.seed.parse_failure_rate:>26.1%}{self.compiled.parse_failure_rate:>26.1%}"
        )
        before, after = self.seed.scores[primary], self.compiled.scores[primary]
        lines.append("")
        lines.append(_verdict(primary, before, after))
        lines += ["", "Instructions:"]
        for role in ("verbalizer", "judge"):
            lines.append(f"  {role} (seed):     {self.instructions['seed'][role]}")
            lines.append(f"  {role} (compiled): {self.instructions['compiled'][role]}")
        lines += ["", f"LM usage during BLPO (stopped: {self.stop_reason}):"]
        lines.append(f"  {'role':<12}{'calls':>7}{'cache hits':>12}{'failures':>10}{'tokens':>10}{'seconds':>10}")
        for role in ("verbalizer", "judge", "proposer", "total"):
            u = self.usage[role]
            tokens = u["prompt_tokens"] + u["completion_tokens"]
            lines.append(
                f"  {role:<12}{u['calls']:>7}{u['cache_hits']:>12}{u['failures']:>10}{tokens:>10}{u['seconds']:>10.1f}"
            )
        lines.append(
            f"Held-out evaluations: seed {self.eval_seconds.get('seed', 0.0):.1f} s, compiled "
            f"{self.eval_seconds.get('compiled', 0.0):.1f} s. Whole demo: {self.wall_seconds:.1f} s."
        )
        lines.append(f"Run directory: {self.run_dir}")
        return "\n".join(lines)


def _verdict(name: str, before: Any, after: Any) -> str:
    delta = after.value - before.value
    overlap = (
        before.low is not None and after.low is not None and not (after.low > before.high or before.low > after.high)
    )
    if delta > 0 and not overlap:
        return f"{name} improved by {delta:+.3f}; the 95% intervals do not overlap."
    if delta > 0:
        return (
            f"{name} changed by {delta:+.3f}, but the 95% intervals overlap: this small held-out split does not "
            "show a reliable improvement."
        )
    return f"{name} changed by {delta:+.3f}: no improvement on the held-out split."


def run_demo(
    run_dir: str | Path = "runs/demo",
    *,
    quality: bool = False,
    n: int | None = None,
    seed: int = 0,
    resume: bool = False,
    budget: DemoBudget | None = None,
    num_threads: int = 2,
) -> DemoResult:
    """Run the offline demo end to end and write its run directory.

    Args:
        run_dir: Where the synthetic data, BLPO's run state, evaluations and report go. If it already holds a
            finished or killed demo, it is resumed (finished LM calls are replayed, not repeated).
        quality: Use the 1.5B model instead of the 0.5B one.
        n: Banners to render (scales the splits of ``budget`` proportionally when given).
        seed: Seed of the data, the splits and BLPO.
        resume: Resume explicitly (an existing run directory is resumed anyway).
        budget: Split sizes and search budget.
        num_threads: Parallel LM calls (llama.cpp has one slot, so generation queues; 2 overlaps fact-sheet work).

    Returns:
        The measurements (see ``DemoResult.summary``).
    """
    from blpo_dspy.cache import CallJournal, VerbalizationCache
    from blpo_dspy.data import load_manifest, stratified_split
    from blpo_dspy.data.synthetic import make_compliance_dataset
    from blpo_dspy.lm_specs import local_role_lm
    from blpo_dspy.modules import ImageJudge
    from blpo_dspy.task import Task
    from blpo_dspy.teleprompt import BLPO

    started = time.time()
    budget = budget or DemoBudget()
    if n is not None:
        scale = n / budget.n_total
        budget = DemoBudget(
            n_train=max(4, round(budget.n_train * scale)),
            n_val=max(4, round(budget.n_val * scale)),
            n_test=max(4, round(budget.n_test * scale)),
            outer_steps=budget.outer_steps,
            inner_steps=budget.inner_steps,
            error_batch_size=budget.error_batch_size,
            retain_batch_size=budget.retain_batch_size,
        )
    run_dir = Path(run_dir)
    resume = resume or (run_dir / "state.json").exists()
    if resume:
        logger.info("run directory %s exists: resuming it (finished LM calls are replayed, not repeated)", run_dir)
    task = Task.load("compliance")
    logger.info("rendering %d SYNTHETIC banners with their creative briefs", budget.n_total)
    manifest = make_compliance_dataset(run_dir / "data", budget.n_total, seed=seed)
    examples = load_manifest(manifest, task)
    splits = stratified_split(
        examples, sizes={"train": budget.n_train, "val": budget.n_val, "test": budget.n_test}, seed=seed
    )
    model = "1.5b" if quality else "0.5b"
    logger.info("loading the local %s model and the fact-sheet verbalizer (OpenCV + RapidOCR)", model)
    verbalizer_lm = local_role_lm("verbalizer", model=model)
    judge_lm = local_role_lm("judge", model=model)
    proposer_lm = local_role_lm("proposer", model=model)
    program = ImageJudge(task, judge_sees="text", verbalizer_lm=verbalizer_lm, judge_lm=judge_lm)

    evaluations = run_dir / "evaluations"
    evaluations.mkdir(parents=True, exist_ok=True)
    cache = VerbalizationCache(run_dir / "eval-cache.sqlite")
    journal = CallJournal(run_dir / "cache.sqlite")  # held-out answers, replayed by a resumed demo
    eval_seconds: dict[str, float] = {}

    def held_out(name: str, candidate: ImageJudge) -> EvaluationReport:
        logger.info("evaluating the %s program on the held-out split (%d banners)", name, len(splits["test"]))
        began = time.time()
        candidate = candidate.deepcopy()
        candidate.set_cache(cache)
        report = evaluate(candidate, splits["test"], num_threads=num_threads, seed=seed, journal=journal)
        eval_seconds[name] = time.time() - began
        (evaluations / f"{name}.json").write_text(json.dumps(report.to_dict(), indent=2, default=str))
        logger.info("%s program: %s", name, report.primary_score.format())
        return report

    seed_report = held_out("seed", program)
    optimizer = BLPO(
        proposer_lm=proposer_lm,
        outer_steps=budget.outer_steps,
        inner_steps=budget.inner_steps,
        error_batch_size=budget.error_batch_size,
        retain_batch_size=budget.retain_batch_size,
        num_threads=num_threads,
        seed=seed,
        run_dir=run_dir,
        resume=resume,
        progress=True,
    )
    compiled = optimizer.compile(program, trainset=splits["train"], valset=splits["val"])
    compiled_report = held_out("compiled", compiled)
    result = DemoResult(
        run_dir=run_dir,
        seed=seed_report,
        compiled=compiled_report,
        instructions={"seed": program.instructions, "compiled": compiled.instructions},
        usage=compiled.usage_,
        eval_seconds=eval_seconds,
        wall_seconds=time.time() - started,
        stop_reason=compiled.stop_reason_,
    )
    (run_dir / "demo.json").write_text(
        json.dumps(
            {
                "seed": seed_report.to_dict(),
                "compiled": compiled_report.to_dict(),
                "instructions": result.instructions,
                "usage": result.usage,
                "eval_seconds": eval_seconds,
                "wall_seconds": result.wall_seconds,
                "budget": budget.__dict__,
                "model": model,
            },
            indent=2,
            default=str,
        )
    )
    from blpo_dspy.report import write_report

    try:
        write_report(run_dir, title="blpo demo: SYNTHETIC compliance task")
    except ImportError as exc:  # matplotlib missing: write the report without plots
        logger.warning("%s; writing the report without plots", exc)
        write_report(run_dir, title="blpo demo: SYNTHETIC compliance task", plots=False)
    return result
