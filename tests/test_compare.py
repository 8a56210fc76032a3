"""run_compare: identical splits and seeds, per-run result files, failures, and tables recomputable from the runs."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any

import dspy
import pytest
from dspy.teleprompt import Teleprompter

from blpo_dspy.compare import OPTIMIZER_NAMES, OptimizerContext, build_optimizer, run_compare
from blpo_dspy.teleprompt import BLPO
from blpo_dspy.teleprompt.baselines import OPRO, APOImage, FixedI2T, JudgePromptAsI2T, NoOptimization
from blpo_dspy.teleprompt.builtins import BuiltinOptimizer
from blpo_dspy.testing import NUMBER_RULE, PROPOSED_VERBALIZER_INSTRUCTIONS, CountingWorld

KNOBS: dict[str, Any] = {"outer_steps": 2, "inner_steps": 3, "error_batch_size": 5, "retain_batch_size": 4}


def _boom(context: OptimizerContext) -> Any:
    raise RuntimeError(f"deliberate failure for seed {context.seed}")


class _SeedDependent(Teleprompter):
    """Seed 0 gets the cue (counting verbalizer + number rule, perfect); other seeds keep the seed program."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed

    def compile(self, student: Any, *, trainset: Any, valset: Any = None, **kwargs: Any) -> Any:
        program = student.deepcopy()
        if self.seed == 0:
            program = program.with_instructions(verbalizer=PROPOSED_VERBALIZER_INSTRUCTIONS[2], judge=NUMBER_RULE)
        return program


def _splits(world: CountingWorld) -> dict[str, list[dspy.Example]]:
    return {"train": world.examples(16, seed=1), "val": world.examples(8, seed=2), "test": world.examples(12, seed=3)}


def _fmt(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "—"
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def _num(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _markdown_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| Optimizer"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_run_compare_writes_runs_marks_failures_and_tables_recompute(tmp_path: Path) -> None:
    world = CountingWorld()
    lm = world.lm
    out = tmp_path / "cmp"
    optimizers = ["no-opt", "blpo-paper", "opro", "mixed", "boom"]
    result = run_compare(
        world.task,
        _splits(world),
        optimizers=optimizers,
        seeds=2,
        judge_sees="text",
        verbalizer_lm=lm,
        judge_lm=lm,
        proposer_lm=lm,
        out_dir=out,
        num_threads=4,
        max_calls=400,
        n_resamples=200,
        factories={"boom": _boom, "mixed": lambda context: _SeedDependent(context.seed)},
        **KNOBS,
    )

    for name in ("splits.json", "compare.json", "compare.csv", "compare.md"):
        assert (out / name).is_file()
    runs = {}
    for path in sorted(out.glob("runs/*/seed-*/result.json")):
        data = json.loads(path.read_text())
        runs[(data["optimizer"], data["seed"])] = data
    assert set(runs) == {(name, seed) for name in optimizers for seed in (0, 1)}

    # the failing optimizer is reported, the others finished
    for seed in (0, 1):
        failed = runs[("boom", seed)]
        assert failed["status"] == "failed" and f"deliberate failure for seed {seed}" in failed["error"]
        assert (out / "runs" / "boom" / f"seed-{seed}" / "error.txt").is_file()
    assert [r["status"] for k, r in runs.items() if k[0] != "boom"] == ["ok"] * 8
    assert {(r["optimizer"], r["seed"]) for r in result.failed} == {("boom", 0), ("boom", 1)}

    # identical splits everywhere; per-run contents
    fingerprints = {json.dumps(r["splits"], sort_keys=True) for r in runs.values()}
    assert len(fingerprints) == 1
    for (name, _), run in runs.items():
        if run["status"] != "ok":
            continue
        scores = run["test"]["scores"]
        assert list(scores) == ["macro_f1", "accuracy", "cohen_kappa"] and run["test"]["n"] == 12
        for score in scores.values():
            if score["value"] is not None:
                assert score["low"] <= score["value"] <= score["high"]
        assert set(run["usage"]) == {"verbalizer", "judge", "proposer", "total"}
        assert run["proposer_images"] == run["usage"]["proposer"]["images"] == 0
        assert run["usage"]["total"]["calls"] <= 400
        assert run["wall_seconds"]["compile"] >= 0 and run["instructions"]["judge"]
        assert (out / "runs" / name / f"seed-{run['seed']}" / "program.json").is_file()
    assert runs[("no-opt", 0)]["usage"]["total"]["calls"] == 0
    assert runs[("blpo-paper", 0)]["test"]["scores"]["macro_f1"]["value"] >= 0.9
    assert runs[("blpo-paper", 0)]["usage"]["proposer"]["calls"] > 0
    mixed = [runs[("mixed", seed)]["test"]["scores"]["macro_f1"]["value"] for seed in (0, 1)]
    assert mixed[0] == 1.0 > mixed[1]  # so the table's std is a real sample std, not 0

    # recompute the tables from the per-run files
    compare = json.loads((out / "compare.json").read_text())
    assert compare["optimizers"] == optimizers and compare["seeds"] == [0, 1]
    csv_rows = {row["optimizer"]: row for row in csv.DictReader((out / "compare.csv").open())}
    md_rows = _markdown_rows((out / "compare.md").read_text())
    metrics = ["macro_f1", "accuracy", "cohen_kappa"]
    for name in optimizers:
        ok = [runs[(name, s)] for s in (0, 1) if runs[(name, s)]["status"] == "ok"]
        cells = [f"{len(ok)}/2"]
        row = next(r for r in compare["rows"] if r["optimizer"] == name)
        assert (row["ok"], row["failed"]) == (len(ok), 2 - len(ok))
        assert int(csv_rows[name]["ok"]) == len(ok)
        for metric in metrics:
            values = [
                r["test"]["scores"][metric]["value"] for r in ok if r["test"]["scores"][metric]["value"] is not None
            ]
            mean = statistics.fmean(values) if values else None
            std = statistics.stdev(values) if len(values) >= 2 else None
            assert row["metrics"][metric]["mean"] == pytest.approx(mean)
            assert row["metrics"][metric]["std"] == pytest.approx(std)
            assert (float(csv_rows[name][f"{metric}_mean"]) if csv_rows[name][f"{metric}_mean"] else None) == (
                pytest.approx(mean) if mean is not None else None
            )
            cells.append(_fmt(mean, std))

        def mean_of(key: Any, ok: list[dict[str, Any]] = ok) -> float | None:
            return statistics.fmean([key(r) for r in ok]) if ok else None

        calls = {role: mean_of(lambda r, role=role: r["usage"][role]["calls"]) for role in ("total", "judge")}
        calls["verbalizer"] = mean_of(lambda r: r["usage"]["verbalizer"]["calls"])
        calls["proposer"] = mean_of(lambda r: r["usage"]["proposer"]["calls"])
        tokens = mean_of(lambda r: r["usage"]["total"]["prompt_tokens"] + r["usage"]["total"]["completion_tokens"])
        images = mean_of(lambda r: r["usage"]["proposer"]["images"])
        seconds = mean_of(lambda r: r["wall_seconds"]["compile"])
        cells += [_num(calls[k], 1) for k in ("total", "judge", "verbalizer", "proposer")]
        cells += [_num(images, 1), _num(tokens, 0), _num(seconds, 2)]
        assert md_rows[name] == cells
        if calls["total"] is not None:
            assert float(csv_rows[name]["calls_total_mean"]) == pytest.approx(calls["total"])
            assert float(csv_rows[name]["tokens_mean"]) == pytest.approx(tokens)
        else:
            assert csv_rows[name]["calls_total_mean"] == ""
    assert "boom seed 0: RuntimeError: deliberate failure for seed 0" in (out / "compare.md").read_text()

    # no absolute path of this machine in any artifact
    for path in out.rglob("*"):
        if path.suffix in (".json", ".md", ".csv", ".txt"):
            assert str(tmp_path) not in path.read_text(), path.name


def test_run_compare_reuses_finished_runs_and_retries_failed_ones(tmp_path: Path) -> None:
    world = CountingWorld()
    lm = world.lm
    attempts = []

    def flaky(context: OptimizerContext) -> Any:
        attempts.append(context.seed)
        if len(attempts) == 1:
            raise RuntimeError("transient")
        return NoOptimization()

    common: dict[str, Any] = {
        "optimizers": ["opro", "flaky"],
        "seeds": [3],
        "judge_sees": "image",
        "judge_lm": lm,
        "proposer_lm": lm,
        "out_dir": tmp_path,
        "num_threads": 2,
        "n_resamples": 50,
        "factories": {"flaky": flaky},
        **KNOBS,
    }
    first = run_compare(world.task, _splits(world), **common)
    assert [r["status"] for r in first.runs] == ["ok", "failed"]
    made = len(world.engine.calls)
    second = run_compare(world.task, _splits(world), **common)
    assert [r["status"] for r in second.runs] == ["ok", "ok"]
    assert second.runs[0] == first.runs[0]  # reused, not re-run
    assert attempts == [3, 3]
    assert len(world.engine.calls) - made == 12  # only the retried no-opt run's test evaluation
    assert second.row("flaky")["ok"] == 1


def test_run_compare_splits_examples_and_validates(tmp_path: Path) -> None:
    world = CountingWorld()
    lm = world.lm
    examples = world.examples(24, seed=5)
    result = run_compare(
        world.task,
        examples,
        optimizers=["no-opt"],
        seeds=1,
        judge_lm=lm,
        proposer_lm=lm,
        out_dir=tmp_path / "a",
        split_sizes={"train": 8, "val": 8, "test": 8},
        n_resamples=50,
    )
    split_ids = json.loads((tmp_path / "a" / "splits.json").read_text())["splits"]
    assert [split_ids[name]["n"] for name in ("train", "val", "test")] == [8, 8, 8]
    assert not set(split_ids["train"]["ids"]) & set(split_ids["test"]["ids"])
    assert result.runs[0]["test"]["n"] == 8

    with pytest.raises(ValueError, match="unknown optimizer"):
        run_compare(world.task, examples, optimizers=["textgrad"], proposer_lm=lm, out_dir=tmp_path / "b")
    assert not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="'test' split"):
        run_compare(
            world.task,
            {"train": examples[:8], "val": examples[8:16]},
            optimizers=["no-opt"],
            out_dir=tmp_path / "c",
        )
    with pytest.raises(ValueError, match="seeds"):
        run_compare(world.task, examples, optimizers=["no-opt"], seeds=0, out_dir=tmp_path / "d")
    with pytest.raises(ValueError, match="proposer_lm"):
        run_compare(world.task, examples, optimizers=["opro"], out_dir=tmp_path / "e")


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_every_name_builds_its_optimizer(name: str, tmp_path: Path) -> None:
    world = CountingWorld()
    context = OptimizerContext(
        name=name,
        task=world.task,
        seed=7,
        proposer_lm=world.lm,
        verbalizer_lm=None,
        max_calls={"judge": 100, "proposer": 20},
        num_threads=2,
        run_dir=tmp_path,
        proposer_supports_images=True,
    )
    optimizer = build_optimizer(context)
    expected = {
        "no-opt": NoOptimization,
        "blpo": BLPO,
        "blpo-paper": BLPO,
        "fixed-i2t": FixedI2T,
        "judge-prompt-i2t": JudgePromptAsI2T,
        "opro": OPRO,
        "apo-image": APOImage,
    }.get(name, BuiltinOptimizer)
    assert isinstance(optimizer, expected)
    assert optimizer.seed == 7
    if expected is BuiltinOptimizer:
        assert optimizer.name == name and optimizer.budget_calls == 120
    if name == "blpo-paper":
        assert optimizer.selection == "paper"
    if name in ("opro", "apo-image"):
        assert optimizer.proposals_per_step == context.inner_steps + 1
    if name in ("blpo", "fixed-i2t", "opro"):
        assert optimizer.max_calls == {"judge": 100, "proposer": 20}
