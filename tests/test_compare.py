"""run_compare: identical splits and seeds, per-run result files, failures, and tables recomputable from the runs."""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import re
import statistics
from pathlib import Path
from typing import Any

import dspy
import pytest
from dspy.teleprompt import Teleprompter
from PIL import Image as PILImage
from report_tables import md_tables, section

from blpo_dspy.cli import main as cli_main
from blpo_dspy.compare import (
    OPTIMIZER_NAMES,
    OptimizerContext,
    build_optimizer,
    format_mean_std,
    format_number,
    run_compare,
)
from blpo_dspy.data import load_manifest
from blpo_dspy.data.synthetic import REQUIREMENTS, make_compliance_dataset
from blpo_dspy.report import COMPARE_PNGS
from blpo_dspy.report import format_number as report_number
from blpo_dspy.task import Task
from blpo_dspy.teleprompt import BLPO
from blpo_dspy.teleprompt.baselines import OPRO, APOImage, FixedI2T, JudgePromptAsI2T, NoOptimization
from blpo_dspy.teleprompt.builtins import BuiltinOptimizer
from blpo_dspy.testing import (
    NUMBER_RULE,
    PROPOSED_VERBALIZER_INSTRUCTIONS,
    Answer,
    CountingWorld,
    ScriptedCall,
    ScriptedEngine,
)

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


def test_an_unfinished_run_that_cannot_be_resumed_starts_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A BLPO run left unfinished with other data (its state names other splits) is started afresh, not failed."""
    world = CountingWorld()
    common: dict[str, Any] = {
        "optimizers": ["blpo"],
        "seeds": [0],
        "judge_sees": "image",
        "verbalizer_lm": world.lm,
        "judge_lm": world.lm,
        "proposer_lm": world.lm,
        "out_dir": tmp_path,
        "num_threads": 1,
        "n_resamples": 20,
        **KNOBS,
    }
    first = run_compare(world.task, _splits(world), **common)
    cell = tmp_path / "runs" / "blpo" / "seed-0"
    assert first.runs[0]["status"] == "ok" and (cell / "optimizer" / "state.json").exists()
    (cell / "result.json").unlink()  # as if killed after the compile
    other = {**_splits(world), "train": world.examples(16, seed=9)}
    made = len(world.engine.calls)
    with caplog.at_level("WARNING", logger="blpo_dspy.compare"):
        second = run_compare(world.task, other, **common)
    run = second.runs[0]
    assert run["status"] == "ok" and run["resumed"] is False, run["error"]
    assert "cannot resume" in caplog.text and "different data" in caplog.text
    assert run["replayed"]["compile"]["total"] == 0
    assert len(world.engine.calls) - made == run["usage"]["total"]["calls"] + run["evaluation_usage"]["total"]["calls"]
    assert json.loads((cell / "optimizer" / "state.json").read_text())["status"] == "finished"
    # the attempt it could not resume is kept aside, not deleted (its state still names the first data)
    assert (cell / "optimizer.discarded" / "state.json").exists() and "optimizer.discarded/" in caplog.text


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


# ---------------------------------------------------------------------------------------------- compliance task
# requirement -> (the word an instruction must contain to look at it, the fact a verbalizer told so states when broken)
CUES: dict[str, tuple[str, str]] = {
    "req_count": ("count", "the number of shapes differs from the brief"),
    "req_headline": ("headline", "the headline is misspelled"),
    "req_logo": ("logo", "the logo is in the wrong corner"),
    "req_shapes": ("colour", "the shapes have the wrong colour"),
}
RULES: dict[str, str] = {
    "req_count": "Answer no if the count of shapes differs from the brief.",
    "req_headline": "Answer no if the headline is misspelled.",
    "req_logo": "Answer no if the logo is not in the briefed corner.",
    "req_shapes": "Answer no if the shapes are not in the briefed colour.",
}
VAGUE = "Judge the banner carefully against the brief."
Q_PROPOSALS = (
    "Describe the background of the banner.",
    "Count the shapes, read the headline and the logo corner; compare them with the brief.",
)
OPRO_PROPOSALS = (RULES["req_logo"], VAGUE)


class ComplianceWorld:
    """Scripted LMs over a SYNTHETIC compliance dataset, answering from the per-requirement truth of each banner.

    The judge checks a requirement only when its instruction names it (the seed instruction names none, so it
    answers yes to everything). The verbalizer states a broken requirement only when its instruction names it (the
    seed one does not). Update_q walks :data:`Q_PROPOSALS`; Update_p is myopic: it adds the rules of the first error
    whose description states a fact (so which rule BLPO finds depends on the seed's error batch); OPRO's proposer
    proposes the logo rule. So no-opt and fixed I2T stay at "always yes", OPRO and BLPO differ.
    """

    def __init__(self, root: Path, n: int) -> None:
        self.task = Task.load("compliance")
        manifest = make_compliance_dataset(root, n, seed=0)
        self.examples = load_manifest(manifest, self.task, extra_columns=list(REQUIREMENTS))
        self.truth = {e.image.sha256: {r: str(e[r]) == "1" for r in REQUIREMENTS} for e in self.examples}
        self.engine = ScriptedEngine(rules=[self._verbalizer, self._judge, self._proposer], model="compliance-world")

    def _broken(self, call: ScriptedCall) -> list[str]:
        facts = self.truth[hashlib.sha256(call.images["image"][0]).hexdigest()]
        text = call.instructions.lower()
        return [r for r in REQUIREMENTS if CUES[r][0] in text and not facts[r]]

    def _verbalizer(self, call: ScriptedCall) -> Answer:
        if call.role != "verbalizer":
            return None
        notes = "".join(f" Note: {CUES[r][1]}." for r in self._broken(call))
        return {"description": "A banner with shapes, a headline and a logo square." + notes}

    def _judge(self, call: ScriptedCall) -> Answer:
        if call.role != "judge":
            return None
        broken = self._broken(call)
        return {"rationale": f"Checked: {', '.join(broken) or 'nothing'}.", "label": "no" if broken else "yes"}

    def _proposer(self, call: ScriptedCall) -> Answer:
        if call.role != "proposer":
            return None
        if "history" in call.inputs:  # Update_q
            text = next((q for q in Q_PROPOSALS if q not in call.inputs["history"]), Q_PROPOSALS[-1] + " Be thorough.")
            return {"new_instruction": text}
        if "scored_instructions" in call.inputs:  # OPRO
            tried = call.inputs["scored_instructions"]
            text = next((p for p in OPRO_PROPOSALS if p not in tried), VAGUE)
        else:  # Update_p
            tried = call.inputs.get("tried_instructions", "")
            first = next((block for block in call.inputs.get("errors", "").split("Error ") if "Note:" in block), "")
            current = call.inputs.get("current_instruction", "")
            text = " ".join(RULES[r] for r in REQUIREMENTS if CUES[r][1] in first or RULES[r] in current) or VAGUE
        while text in tried:
            text += " Be precise."
        return {"new_instruction": text}


def _boom_everywhere(context: OptimizerContext) -> Any:
    raise RuntimeError(f"deliberate failure of {context.name} seed {context.seed}")


def test_formatting_functions() -> None:
    assert format_mean_std(0.5, 0.25) == "0.500 ± 0.250" and format_mean_std(0.71828, None) == "0.718"
    assert format_mean_std(None, None) == "—" and format_mean_std(1 / 3, 0.0, 2) == "0.33 ± 0.00"
    assert format_number(12.25, 1) == "12.2" and format_number(61310.5, 0) == "61310" and format_number(None) == "—"


def test_compare_on_the_compliance_task_recomputes_tables_and_plots_from_result_json(tmp_path: Path) -> None:
    world = ComplianceWorld(tmp_path / "data", 24)
    lm = world.engine.lm()
    out = tmp_path / "cmp"
    optimizers = ["no-opt", "blpo", "fixed-i2t", "opro", "boom"]
    seeds = [0, 1]
    result = run_compare(
        world.task,
        world.examples,
        optimizers=optimizers,
        seeds=len(seeds),
        judge_sees="image",
        verbalizer_lm=lm,
        judge_lm=lm,
        proposer_lm=lm,
        out_dir=out,
        num_threads=4,
        max_calls=200,
        n_resamples=200,
        outer_steps=1,
        inner_steps=2,
        error_batch_size=4,
        retain_batch_size=3,
        factories={"boom": _boom_everywhere},
    )
    assert cli_main(["report", str(out)]) == 0  # `blpo report DIR` on the comparison directory

    for name in ("splits.json", "compare.json", "compare.csv", "compare.md", "report.md", "report.html"):
        assert (out / name).is_file(), name
    runs = {}
    for path in sorted(out.glob("runs/*/seed-*/result.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        runs[(data["optimizer"], data["seed"])] = data
    assert set(runs) == {(name, seed) for name in optimizers for seed in seeds}
    test_n = json.loads((out / "splits.json").read_text(encoding="utf-8"))["splits"]["test"]["n"]

    # the failing optimizer is failed on every seed, every other run finished
    for seed in seeds:
        assert runs[("boom", seed)]["status"] == "failed" and runs[("boom", seed)]["test"] is None
        assert f"deliberate failure of boom seed {seed}" in runs[("boom", seed)]["error"]
    assert all(r["status"] == "ok" for (name, _), r in runs.items() if name != "boom")
    assert {(r["optimizer"], r["seed"]) for r in result.failed} == {("boom", 0), ("boom", 1)}

    # result.json holds the held-out confusion matrix, consistent with the run's accuracy
    for (name, _), run in runs.items():
        if name == "boom":
            continue
        cm = run["test"]["confusion_matrix"]
        assert cm["labels"] == ["yes", "no"] and cm["columns"] == ["yes", "no", "unparsed"]
        assert sum(map(sum, cm["counts"])) == run["test"]["n"] == test_n
        correct = cm["counts"][0][0] + cm["counts"][1][1]
        assert run["test"]["scores"]["accuracy"]["value"] == pytest.approx(correct / test_n)
    # the always-yes seed judge: every answer is "yes"
    assert runs[("no-opt", 0)]["test"]["confusion_matrix"]["counts"] == [[test_n // 2, 0, 0], [test_n // 2, 0, 0]]

    # recompute every aggregate from the per-run files
    metrics = ["macro_f1", "accuracy", "cohen_kappa"]
    expected: dict[str, dict[str, Any]] = {}
    for name in optimizers:
        ok = [runs[(name, s)] for s in seeds if runs[(name, s)]["status"] == "ok"]

        def mean(values: list[float]) -> float | None:
            return statistics.fmean(values) if values else None

        row: dict[str, Any] = {"runs": len(seeds), "ok": len(ok), "failed": len(seeds) - len(ok)}
        for metric in metrics:
            values = [r["test"]["scores"][metric]["value"] for r in ok]
            row[f"{metric}_mean"] = mean(values)
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) >= 2 else None
            row[f"{metric}_n"] = len(values)
        for role in ("total", "verbalizer", "judge", "proposer"):
            row[f"calls_{role}_mean"] = mean([r["usage"][role]["calls"] for r in ok])
        total = [r["usage"]["total"] for r in ok]
        row["tokens_mean"] = mean([u["prompt_tokens"] + u["completion_tokens"] for u in total])
        row["proposer_images_mean"] = mean([r["usage"]["proposer"]["images"] for r in ok])
        row["compile_seconds_mean"] = mean([r["wall_seconds"]["compile"] for r in ok])
        expected[name] = row

    means = {name: expected[name]["macro_f1_mean"] for name in optimizers if name != "boom"}
    assert len(set(means.values())) >= 2  # the scripted instructions make a real difference
    assert means["blpo"] > means["no-opt"] and means["opro"] > means["fixed-i2t"] == means["no-opt"]
    assert any(expected[name]["macro_f1_std"] for name in optimizers if name != "boom")  # a real sample std

    csv_rows = {row["optimizer"]: row for row in csv.DictReader((out / "compare.csv").open(encoding="utf-8"))}
    assert list(csv_rows) == optimizers
    for name in optimizers:
        for column, value in expected[name].items():
            cell = csv_rows[name][column]
            if value is None:
                assert cell == "", (name, column)
            else:
                assert float(cell) == pytest.approx(value, rel=1e-12, abs=1e-12), (name, column)

    def table_cells(name: str) -> list[str]:
        row = expected[name]
        cells = [name, f"{row['ok']}/{row['runs']}"]
        cells += [format_mean_std(row[f"{m}_mean"], row[f"{m}_std"]) for m in metrics]
        cells += [format_number(row[f"calls_{role}_mean"]) for role in ("total", "judge", "verbalizer", "proposer")]
        cells += [format_number(row["proposer_images_mean"]), format_number(row["tokens_mean"], 0)]
        cells += [format_number(row["compile_seconds_mean"], 2)]
        return cells

    compare_md = (out / "compare.md").read_text(encoding="utf-8")
    assert _markdown_rows(compare_md) == {name: table_cells(name)[1:] for name in optimizers}
    assert "| boom | 0/2 | — | — | — |" in compare_md

    # the report: the same table (recomputed by the report from the result.json files), runs, failures, confusion
    md = (out / "report.md").read_text(encoding="utf-8")
    assert md.startswith("# BLPO comparison: compliance\n")
    table = md_tables(section(md, "Comparison"))[0]
    assert table[0][:3] == ["Optimizer", "OK runs", "Macro-F1"]
    assert table[1:] == [table_cells(name) for name in optimizers]
    (failed_table,) = md_tables(section(md, "Failed runs"))
    assert [row[:2] for row in failed_table[1:]] == [["boom", "0"], ["boom", "1"]]
    assert failed_table[1][2] == "RuntimeError: deliberate failure of boom seed 0"
    (runs_table,) = md_tables(section(md, "Runs"))
    assert runs_table[0][3:5] == ["Macro-F1", "95% CI"]
    assert [row[:3] for row in runs_table[1:]] == [
        [name, str(seed), runs[(name, seed)]["status"]] for name in optimizers for seed in seeds
    ]
    for row in runs_table[1:]:
        run = runs[(row[0], int(row[1]))]
        assert row[5] == str(run["usage"]["total"]["calls"])
        if run["status"] == "ok":
            score = run["test"]["scores"]["macro_f1"]
            assert row[3] == report_number(score["value"])
            assert row[4] == f"[{report_number(score['low'])}, {report_number(score['high'])}]"
        else:
            assert row[3] == row[4] == "—"
    confusion_tables = md_tables(section(md, "Confusion matrices (pooled over seeds)"))
    assert len(confusion_tables) == len(optimizers) - 1
    for name, cm_table in zip([n for n in optimizers if n != "boom"], confusion_tables, strict=True):
        pooled = [
            [sum(runs[(name, s)]["test"]["confusion_matrix"]["counts"][i][j] for s in seeds) for j in range(3)]
            for i in range(2)
        ]
        assert cm_table[0][1:] == ["yes", "no", "unparsed"]
        assert [[int(c) for c in row[1:]] for row in cm_table[1:]] == pooled
    assert "boom: failed." in md

    # the plots: valid PNGs beside report.md, linked from it, embedded byte for byte in report.html
    html = (out / "report.html").read_text(encoding="utf-8")
    embedded = [base64.b64decode(data) for data in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)]
    pngs = {}
    for name in COMPARE_PNGS:
        path = out / name
        with PILImage.open(path) as image:
            assert image.format == "PNG" and image.size[0] >= 400 and image.size[1] >= 300
            image.verify()
        assert f"]({name})" in md
        pngs[name] = path.read_bytes()
        assert pngs[name] in embedded
    assert len(embedded) == len(COMPARE_PNGS)
    assert str(tmp_path) not in md and str(tmp_path) not in re.sub(r"data:image/png;base64,[^\"]+", "", html)

    # compare.json's aggregates are not an input: spoiling them changes nothing in the table or the plots
    compare = json.loads((out / "compare.json").read_text(encoding="utf-8"))
    for row in compare["rows"]:
        for stats in row["metrics"].values():
            stats["mean"], stats["std"] = 0.0, 0.0
        row["calls"] = dict.fromkeys(row["calls"], 0.0)
    (out / "compare.json").write_text(json.dumps(compare), encoding="utf-8")
    assert cli_main(["report", str(out)]) == 0
    assert md_tables(section((out / "report.md").read_text(encoding="utf-8"), "Comparison"))[0] == table
    assert {name: (out / name).read_bytes() for name in COMPARE_PNGS} == pngs
