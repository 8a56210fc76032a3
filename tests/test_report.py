"""Reports: files, self-contained HTML, numbers equal to the JSON inputs, missing inputs, escaping, determinism."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import statistics
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import dspy
import numpy as np
import pytest
from report_tables import md_tables, section
from sklearn.metrics import precision_recall_fscore_support

from blpo_dspy.evaluation import evaluate
from blpo_dspy.metrics import METRICS
from blpo_dspy.modules import ImageJudge
from blpo_dspy.persistence import load_program
from blpo_dspy.report import (
    COMPARE_CONFUSION_PNG,
    COMPARE_PNGS,
    COMPARE_SCORES_PNG,
    HISTORY_PNG,
    ReportError,
    per_class_metrics,
    pool_confusion,
    write_report,
)
from blpo_dspy.teleprompt import BLPO
from blpo_dspy.testing import NUMBER_RULE, CountingWorld

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATA_URI = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def source_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished BLPO run directory on the counting world, with seed and compiled evaluations."""
    run_dir = tmp_path_factory.mktemp("report") / "run"
    world = CountingWorld()
    train, val, test = world.examples(20, seed=1), world.examples(12, seed=2), world.examples(16, seed=3)
    with dspy.context(lm=None, adapter=None):
        student = ImageJudge(world.task, judge_sees="text", verbalizer_lm=world.lm, judge_lm=world.lm)
        compiled = BLPO(
            proposer_lm=world.lm,
            outer_steps=2,
            inner_steps=3,
            error_batch_size=5,
            retain_batch_size=5,
            num_threads=4,
            run_dir=run_dir,
        ).compile(student, trainset=train, valset=val)
        saved = load_program(run_dir / "program.json", verbalizer_lm=world.lm, judge_lm=world.lm)
        assert saved.instructions == compiled.best_instructions_
        (run_dir / "evaluations").mkdir()
        for name, program in (("seed", student), ("compiled", saved)):
            report = evaluate(program, test, n_resamples=200)
            (run_dir / "evaluations" / f"{name}.json").write_text(json.dumps(report.to_dict()), encoding="utf-8")
    return run_dir


@pytest.fixture
def run(source_run: Path, tmp_path: Path) -> Path:
    """A private copy of the source run (tests may delete or change its files)."""
    return Path(shutil.copytree(source_run, tmp_path / "run"))


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------- parsing helpers
class _HtmlTables(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _html_tables(text: str) -> list[list[list[str]]]:
    parser = _HtmlTables()
    parser.feed(text)
    return parser.tables


def _close(cell: str, value: float | None, digits: int = 3) -> bool:
    """Whether a formatted cell shows ``value`` (``n/a`` for missing / nan)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return cell == "n/a"
    return abs(float(cell) - value) <= 0.5 * 10**-digits + 1e-12


def _interval(cell: str) -> tuple[float, float]:
    low, high = cell.strip("[]").split(", ")
    return float(low), float(high)


# ---------------------------------------------------------------------------------------------------- tests
def test_writes_markdown_self_contained_html_and_pngs(run: Path) -> None:
    paths = write_report(run)
    assert paths.md == run / "report.md" and paths.html == run / "report.html"
    assert {p.name for p in paths.images} == {
        "report_confusion_seed.png",
        "report_confusion_compiled.png",
        HISTORY_PNG,
    }
    for image in paths.images:
        assert image.read_bytes().startswith(PNG_MAGIC)
    html = paths.html.read_text(encoding="utf-8")
    md = paths.md.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and "<style>" in html
    for external in ('src="http', "src='http", 'href="http', "<link", "<script", "@import", "url("):
        assert external not in html
    embedded = [base64.b64decode(data) for data in DATA_URI.findall(html)]
    assert sorted(embedded) == sorted(p.read_bytes() for p in paths.images)  # every plot embedded, byte for byte
    assert html.count("<img ") == len(paths.images)
    for image in paths.images:  # the Markdown links the PNGs by relative name
        assert f"]({image.name})" in md


def test_score_table_equals_the_evaluation_json(run: Path) -> None:
    md = write_report(run, plots=False).md.read_text(encoding="utf-8")
    seed, compiled = (_json(run / "evaluations" / f"{n}.json") for n in ("seed", "compiled"))
    table = md_tables(section(md, "Held-out evaluation"))[0]
    header, rows = table[0], table[1:]
    assert header == ["Metric", "Seed", "Seed 95% CI", "Compiled", "Compiled 95% CI", "Δ (compiled − seed)"]
    assert len(rows) == len(seed["scores"]) == len(compiled["scores"])
    by_title = {METRICS[name].title: name for name in seed["scores"]}
    assert rows[0][0] == f"{METRICS[seed['primary']].title} (primary)"
    seen = set()
    for row in rows:
        name = by_title[row[0].removesuffix(" (primary)")]
        seen.add(name)
        for cells, data in ((row[1:3], seed), (row[3:5], compiled)):
            score = data["scores"][name]
            assert _close(cells[0], score["value"])
            low, high = _interval(cells[1])
            assert _close(f"{low}", score["low"]) and _close(f"{high}", score["high"])
        delta = compiled["scores"][name]["value"] - seed["scores"][name]["value"]
        assert row[5].startswith(("+", "-")) and _close(row[5], delta)
    assert seen == set(seed["scores"])

    answers = md_tables(section(md, "Held-out evaluation"))[1]
    values = {row[0]: row[1:] for row in answers[1:]}
    assert values["Examples"] == [str(seed["n"]), str(compiled["n"])]
    assert _close(values["Parse-failure rate"][0], seed["parse_failure_rate"])
    assert _close(values["Parse-failure rate"][1], compiled["parse_failure_rate"])
    assert values["Failed calls"] == [str(seed["error_count"]), str(compiled["error_count"])]
    # the compiled counting judge is right everywhere, the seed one is not: the table shows a real difference
    assert float(rows[0][3]) > float(rows[0][1])


def test_html_shows_the_same_tables_as_the_markdown(run: Path) -> None:
    paths = write_report(run, plots=False)
    markdown = md_tables(paths.md.read_text(encoding="utf-8"))
    html_tables = _html_tables(paths.html.read_text(encoding="utf-8"))
    assert len(markdown) >= 8
    assert html_tables == markdown


def test_per_class_metrics_and_confusion_match_the_predictions(run: Path) -> None:
    md = write_report(run, plots=False).md.read_text(encoding="utf-8")
    tables = md_tables(section(md, "Per-class metrics"))
    confusion_tables = md_tables(section(md, "Confusion matrices"))
    assert len(tables) == len(confusion_tables) == 2
    for name, table, confusion in zip(("seed", "compiled"), tables, confusion_tables, strict=True):
        data = _json(run / "evaluations" / f"{name}.json")
        gold = [p["gold"] for p in data["predictions"]]
        pred = [p["label"] if p["label"] is not None else "unparsed" for p in data["predictions"]]
        labels = data["confusion_matrix"]["labels"]
        precision, recall, f1, support = precision_recall_fscore_support(
            gold, pred, labels=labels, zero_division=np.nan
        )
        assert [row[0] for row in table[1:]] == labels
        for i, row in enumerate(table[1:]):
            assert _close(row[1], float(precision[i])) and _close(row[2], float(recall[i]))
            assert _close(row[3], float(f1[i])) and int(row[4]) == support[i]
        assert confusion[0][1:] == [str(c) for c in data["confusion_matrix"]["columns"]]
        assert [[int(c) for c in row[1:]] for row in confusion[1:]] == data["confusion_matrix"]["counts"]


def test_per_class_metrics_count_unparsed_as_missed_gold() -> None:
    cm = {
        "labels": ["a", "b", "c"],
        "columns": ["a", "b", "c", "unparsed"],
        "counts": [[3, 1, 0, 2], [1, 4, 0, 0], [0, 0, 0, 5]],
    }
    a, b, c = per_class_metrics(cm)
    assert (a.support, a.predicted, a.unparsed) == (6, 4, 2)
    assert a.precision == pytest.approx(3 / 4) and a.recall == pytest.approx(3 / 6)
    assert a.f1 == pytest.approx(2 * 3 / (6 + 4))
    assert b.precision == pytest.approx(4 / 5) and b.recall == pytest.approx(4 / 5)
    assert c.precision is None and c.recall == 0.0 and c.f1 == 0.0  # never predicted, every answer unparsed


def test_instructions_history_and_usage_come_from_the_run(run: Path) -> None:
    md = write_report(run, plots=False).md.read_text(encoding="utf-8")
    state, program = _json(run / "state.json"), _json(run / "program.json")["blpo"]
    seed = state["identity"]["task"]["instructions"]
    final = program["instructions"]
    assert final["judge"] == NUMBER_RULE and "count" in final["verbalizer"].lower()
    (table,) = md_tables(section(md, "Instructions"))
    assert table[1] == ["Verbalizer (I2T) instruction q", seed["verbalizer"], final["verbalizer"], "yes"]
    assert table[2] == ["Judge instruction p", seed["judge"], final["judge"], "yes"]

    rounds_table, history_table = md_tables(section(md, "Optimisation history"))
    diagnostics = program["diagnostics"]
    assert rounds_table[1][0] == "seed" and _close(rounds_table[1][2], diagnostics["seed_score_"])
    assert len(rounds_table) - 2 == len(state["rounds"]) >= 1
    for row, record in zip(rounds_table[2:], state["rounds"], strict=True):
        assert row[0] == str(record["outer_step"]) and _close(row[2], record["val_score"])
        assert row[1] == (record["accepted"] or "kept incumbent")
    assert len(history_table) - 1 == len(state["history"])
    for row, entry in zip(history_table[1:], state["history"], strict=True):
        assert row[0] == str(entry["outer_step"]) and row[1] == str(entry["inner_step"])
        assert row[4] == "—" if entry["inner_score"] is None else _close(row[4], entry["inner_score"])
        assert row[7] == "—" if entry["val_score"] is None else _close(row[7], entry["val_score"])
        assert row[9] == ("yes" if entry["accepted"] else "no")

    usage_table = md_tables(section(md, "Usage"))[0]
    usage = diagnostics["usage_"]
    keys = ["calls", "replayed", "cache_hits", "failures", "prompt_tokens", "completion_tokens", "replayed_tokens"]
    assert [row[0] for row in usage_table[1:]] == ["verbalizer", "judge", "proposer", "total"]
    for row in usage_table[1:]:
        assert [int(c) for c in row[1:8]] == [usage[row[0]][k] for k in keys]
        assert _close(row[8], usage[row[0]]["seconds"])
    cache = usage["verbalization_cache"]
    assert f"{cache['hits']} hits, {cache['misses']} misses" in md


def test_missing_evaluations_give_a_report_of_what_exists(run: Path) -> None:
    write_report(run)
    assert (run / "report_confusion_seed.png").exists()
    (run / "evaluations" / "seed.json").unlink()
    paths = write_report(run)
    md = paths.md.read_text(encoding="utf-8")
    header = md_tables(section(md, "Held-out evaluation"))[0][0]
    assert header == ["Metric", "Compiled", "Compiled 95% CI"]
    assert "Not evaluated: seed program (evaluations/seed.json)" in md
    assert not (run / "report_confusion_seed.png").exists()  # the stale plot went with its evaluation
    assert {p.name for p in paths.images} == {"report_confusion_compiled.png", HISTORY_PNG}

    shutil.rmtree(run / "evaluations")
    md = write_report(run).md.read_text(encoding="utf-8")
    assert "No evaluation found" in md
    assert "## Optimisation history" in md and NUMBER_RULE in md

    (run / "state.json").unlink()  # program.json alone still gives instructions and usage
    md = write_report(run, plots=False).md.read_text(encoding="utf-8")
    assert NUMBER_RULE in md and "Please describe this image in detail." in md
    assert "history is not available" in md and "## Usage" in md


def test_a_directory_with_only_an_evaluation(tmp_path: Path) -> None:
    world = CountingWorld()
    examples = world.examples(8, seed=4)
    answers = ["yes", "maybe", "no", "raise", "no", "no", "yes", "yes"]

    by_image = {example.image.url: answer for example, answer in zip(examples, answers, strict=True)}
    assert len(by_image) == len(examples)

    def flaky(image: dspy.Image, prompt: str) -> dspy.Prediction:
        answer = by_image[image.url]
        if answer == "raise":
            raise RuntimeError("backend down")
        return dspy.Prediction(label=world.task.parse_label(answer), raw_label=answer)

    report = evaluate(flaky, examples, task=world.task, n_resamples=100)
    run = tmp_path / "eval-only"
    (run / "evaluations").mkdir(parents=True)
    (run / "evaluations" / "compiled.json").write_text(json.dumps(report.to_dict()), encoding="utf-8")
    md = write_report(run, plots=False).md.read_text(encoding="utf-8")
    assert md.startswith("# BLPO report: circle_count\n")
    answers_table = md_tables(section(md, "Held-out evaluation"))[1]
    rows = {row[0]: row[1] for row in answers_table[1:]}
    assert _close(rows["Parse-failure rate"], 1 / 8) and rows["Failed calls"] == "1"
    per_class = md_tables(section(md, "Per-class metrics"))[0]
    unparsed = {label: 0 for label in world.task.labels}
    for example, answer in zip(examples, answers, strict=True):
        unparsed[example.label] += answer in ("maybe", "raise")  # unparsable answer or failed call
    assert sum(unparsed.values()) == 2
    assert [row[6] for row in per_class[1:]] == [str(unparsed[label]) for label in world.task.labels]
    assert "## Optimisation history" not in md and "## Usage" not in md


def test_no_absolute_paths_in_any_output(run: Path, tmp_path: Path) -> None:
    home = str(Path.home())
    state = _json(run / "state.json")
    state["history"][0]["error"] = f"cannot read {home}/data/x.png (not {home}extra)"
    (run / "state.json").write_text(json.dumps(state), encoding="utf-8")
    paths = write_report(run)
    md = paths.md.read_text(encoding="utf-8")
    assert f"cannot read ~/data/x.png (not {home}extra)" in md  # the home directory is hidden, other text kept
    for text in (paths.md.read_text(encoding="utf-8"), DATA_URI.sub("", paths.html.read_text(encoding="utf-8"))):
        assert str(tmp_path) not in text and str(tmp_path.resolve()) not in text
        assert str(run.resolve()) not in text
        assert "/tmp/" not in text


def test_output_is_deterministic(run: Path, tmp_path: Path) -> None:
    first = write_report(run)
    before = {p.name: p.read_bytes() for p in (first.md, first.html, *first.images)}
    other = Path(shutil.copytree(run, tmp_path / "elsewhere" / "renamed"))
    second = write_report(other)
    after = {p.name: p.read_bytes() for p in (second.md, second.html, *second.images)}
    assert after == before
    again = write_report(run)
    assert {p.name: p.read_bytes() for p in (again.md, again.html, *again.images)} == before


def test_text_is_escaped(run: Path) -> None:
    state = _json(run / "state.json")
    state["identity"]["task"]["instructions"]["judge"] = 'Say <b>yes</b> | "no" & <script>alert(1)</script>'
    (run / "state.json").write_text(json.dumps(state), encoding="utf-8")
    paths = write_report(run, title="<i>My</i> report", plots=False)
    html = paths.html.read_text(encoding="utf-8")
    assert "<script>" not in html and "<b>yes" not in html and "<i>My" not in html
    assert "Say &lt;b&gt;yes&lt;/b&gt; | &quot;no&quot; &amp; &lt;script&gt;" in html
    assert "<title>&lt;i&gt;My&lt;/i&gt; report</title>" in html
    md = paths.md.read_text(encoding="utf-8")
    assert 'Say &lt;b&gt;yes&lt;/b&gt; \\| "no" & &lt;script&gt;' in md
    (table,) = md_tables(section(md, "Instructions"))
    assert table[2][1] == 'Say <b>yes</b> | "no" & <script>alert(1)</script>'  # the cell round-trips


def test_compare_json_is_rendered_as_a_table(tmp_path: Path) -> None:
    folder = tmp_path / "comparison"
    folder.mkdir()
    rows = [
        {"optimizer": "BLPO", "seed": 0, "macro_f1": 0.91234, "calls": 210},
        {"optimizer": "judge-only", "seed": 0, "macro_f1": 0.5, "calls": 120, "note": "fixed I2T"},
    ]
    (folder / "compare.json").write_text(json.dumps({"task": "circle_count", "rows": rows}), encoding="utf-8")
    paths = write_report(folder)
    md = paths.md.read_text(encoding="utf-8")
    assert md.startswith("# BLPO comparison\n")
    assert "- **task**: circle_count" in md
    (table,) = md_tables(section(md, "Comparison"))
    assert table[0] == ["optimizer", "seed", "macro_f1", "calls", "note"]
    assert table[1] == ["BLPO", "0", "0.912", "210", "—"]
    assert table[2] == ["judge-only", "0", "0.500", "120", "fixed I2T"]
    assert paths.images == () and "<img" not in paths.html.read_text(encoding="utf-8")


def test_bad_inputs_name_the_file_and_field(tmp_path: Path, run: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run directory 'nowhere' not found"):
        write_report(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="nothing to report"):
        write_report(tmp_path / "empty")

    seed_file = run / "evaluations" / "seed.json"
    good = seed_file.read_text(encoding="utf-8")
    seed_file.write_text("{not json", encoding="utf-8")
    with pytest.raises(ReportError, match=r"run/evaluations/seed\.json: not valid JSON"):
        write_report(run)
    data = json.loads(good)
    data["confusion_matrix"]["counts"][1] = [1, -2, 0]
    seed_file.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ReportError, match=r"seed\.json: field 'confusion_matrix\.counts\[1\]'"):
        write_report(run)
    data = json.loads(good)
    data["scores"]["accuracy"]["value"] = "high"
    seed_file.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ReportError, match=r"field 'scores\.accuracy\.value'"):
        write_report(run)
    seed_file.write_text(good, encoding="utf-8")
    state = _json(run / "state.json")
    state["history"][0]["outer_step"] = "zero"
    (run / "state.json").write_text(json.dumps(state), encoding="utf-8")
    with pytest.raises(ReportError, match=r"state\.json: field 'history\[0\]\.outer_step'"):
        write_report(run)
    assert not (run / "report.md").exists()  # nothing written from bad inputs


def test_missing_matplotlib_is_an_actionable_error(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=r"blpo-dspy\[report\]"):
        write_report(run)
    paths = write_report(run, plots=False)
    assert paths.images == ()
    assert "data:image/png" not in paths.html.read_text(encoding="utf-8")
    assert NUMBER_RULE in paths.md.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------- comparisons
def _result(
    optimizer: str,
    seed: int,
    macro_f1: float | None = None,
    counts: list[list[int]] | None = None,
    calls: int = 10,
    *,
    error: str | None = None,
) -> dict[str, Any]:
    """A ``result.json`` in :func:`blpo_dspy.compare.run_compare`'s format (ok when ``macro_f1`` is given)."""
    usage = {
        role: {"calls": calls if role in ("judge", "total") else 0, "prompt_tokens": 5 * calls, "completion_tokens": 2}
        for role in ("verbalizer", "judge", "proposer", "total")
    }
    for counters in usage.values():
        counters["images"] = 0
    result: dict[str, Any] = {
        "format": 1,
        "optimizer": optimizer,
        "seed": seed,
        "status": "failed" if macro_f1 is None else "ok",
        "error": error,
        "task": "circle_count",
        "test": None,
        "usage": usage,
        "wall_seconds": {"compile": 1.5 + seed, "evaluate": None if macro_f1 is None else 0.5},
    }
    if macro_f1 is not None:
        counts = counts or [[2, 1, 0], [1, 2, 0]]
        result["test"] = {
            "n": sum(map(sum, counts)),
            "primary": "macro_f1",
            "confidence": 0.95,
            "scores": {
                "macro_f1": {"value": macro_f1, "low": macro_f1 - 0.2, "high": min(1.0, macro_f1 + 0.1)},
                "accuracy": {"value": macro_f1, "low": None, "high": None},
            },
            "parse_failure_rate": 0.0,
            "error_count": 0,
            "confusion_matrix": {"labels": ["yes", "no"], "columns": ["yes", "no", "unparsed"], "counts": counts},
        }
    return result


def _write_results(folder: Path, results: list[dict[str, Any]]) -> None:
    for result in results:
        run = folder / "runs" / result["optimizer"] / f"seed-{result['seed']}"
        run.mkdir(parents=True, exist_ok=True)
        (run / "result.json").write_text(json.dumps(result), encoding="utf-8")


def test_comparison_report_is_computed_from_the_result_files(tmp_path: Path) -> None:
    folder = tmp_path / "cmp"
    _write_results(
        folder,
        [
            _result("beta", 0, 0.9, [[3, 0, 0], [1, 1, 1]], calls=40),
            _result("beta", 1, error="RuntimeError: no budget\nTraceback ..."),
            _result("alpha", 0, 0.5, calls=20),
            _result("alpha", 1, 0.7, [[3, 0, 0], [0, 2, 1]], calls=30),
            _result("gamma", 0, error="ValueError: bad"),
        ],
    )
    paths = write_report(folder)  # no compare.json: the runs alone are enough
    md = paths.md.read_text(encoding="utf-8")
    assert md.startswith("# BLPO comparison: circle_count\n")
    table = md_tables(section(md, "Comparison"))[0]
    assert table[0][:5] == ["Optimizer", "OK runs", "Macro-F1", "Accuracy", "LM calls"]
    assert [row[:5] for row in table[1:]] == [
        ["alpha", "2/2", f"0.600 ± {statistics.stdev([0.5, 0.7]):.3f}", "0.600 ± 0.141", "25.0"],
        ["beta", "1/2", "0.900", "0.900", "40.0"],
        ["gamma", "0/1", "—", "—", "—"],
    ]
    assert table[1][-1] == "2.00"  # mean compile time of alpha's seeds 0 and 1 (1.5 and 2.5 s)
    failed = md_tables(section(md, "Failed runs"))[0]
    assert failed[1:] == [["beta", "1", "RuntimeError: no budget"], ["gamma", "0", "ValueError: bad"]]
    runs = md_tables(section(md, "Runs"))[0]
    assert runs[1] == ["alpha", "0", "ok", "0.500", "[0.300, 0.600]", "20", "102", "1.50", "0.000"]
    assert runs[4] == ["beta", "1", "failed", "—", "—", "10", "52", "2.50", "—"]
    pooled = md_tables(section(md, "Confusion matrices (pooled over seeds)"))
    assert [[int(c) for c in row[1:]] for row in pooled[0][1:]] == [[5, 1, 0], [1, 4, 1]]  # alpha, both seeds
    assert [[int(c) for c in row[1:]] for row in pooled[1][1:]] == [[3, 0, 0], [1, 1, 1]]  # beta, its ok seed
    assert len(pooled) == 2 and "gamma: failed." in md

    assert {p.name for p in paths.images} == set(COMPARE_PNGS)
    html = paths.html.read_text(encoding="utf-8")
    embedded = [base64.b64decode(data) for data in DATA_URI.findall(html)]
    assert sorted(embedded) == sorted(p.read_bytes() for p in paths.images)
    for image in paths.images:
        assert image.read_bytes().startswith(PNG_MAGIC) and f"]({image.name})" in md
    assert _html_tables(html) == md_tables(md)

    other = Path(shutil.copytree(folder, tmp_path / "elsewhere"))  # deterministic, whatever the folder
    again = write_report(other)
    assert again.md.read_bytes() == paths.md.read_bytes()
    assert [p.read_bytes() for p in again.images] == [p.read_bytes() for p in paths.images]

    scores_png = (folder / COMPARE_SCORES_PNG).read_bytes()
    _write_results(folder, [_result("gamma", 0, 0.4)])  # the plots follow the result files
    second = write_report(folder)
    assert (folder / COMPARE_SCORES_PNG).read_bytes() != scores_png
    assert "gamma: failed." not in second.md.read_text(encoding="utf-8")
    write_report(folder, plots=False)
    assert not any((folder / name).exists() for name in COMPARE_PNGS)  # stale plots are removed


def test_compare_json_selects_and_orders_the_runs(tmp_path: Path) -> None:
    folder = tmp_path / "cmp"
    _write_results(folder, [_result("a", 0, 0.5), _result("a", 1, 0.6), _result("b", 0, 0.8), _result("old", 0, 0.1)])
    compare = {"task": "circle_count", "judge_sees": "text", "optimizers": ["b", "a"], "seeds": [0], "max_calls": None}
    (folder / "compare.json").write_text(json.dumps(compare), encoding="utf-8")
    md = write_report(folder, plots=False).md.read_text(encoding="utf-8")
    table = md_tables(section(md, "Comparison"))[0]
    assert [row[:3] for row in table[1:]] == [["b", "1/1", "0.800"], ["a", "1/1", "0.500"]]
    assert "- **Judge sees**: text" in md and "- **LM-call budget per compile**: none" in md
    assert "old" not in md and "(2 files)" in md


def test_comparison_runs_without_confusion_matrices(tmp_path: Path) -> None:
    folder = tmp_path / "cmp"
    old = _result("a", 0, 0.5)
    del old["test"]["confusion_matrix"]  # written before result.json held it
    _write_results(folder, [old, _result("b", 0, 0.6)])
    paths = write_report(folder)
    md = paths.md.read_text(encoding="utf-8")
    assert "a: no confusion matrix in its result.json files." in md
    assert len(md_tables(section(md, "Confusion matrices (pooled over seeds)"))) == 1
    assert (folder / COMPARE_CONFUSION_PNG).read_bytes().startswith(PNG_MAGIC)


def test_a_resumed_run_counts_the_calls_it_replayed(tmp_path: Path) -> None:
    """A run resumed after a kill made fewer calls itself: tables and cost plot add back those it replayed."""
    folder = tmp_path / "cmp"
    resumed = _result("a", 1, 0.7, calls=12)
    resumed["resumed"] = True
    replayed_calls = {"verbalizer": 0, "judge": 18, "proposer": 0, "total": 18}
    resumed["replayed"] = {"compile": replayed_calls, "compile_tokens": 90, "evaluation": 3}
    _write_results(folder, [_result("a", 0, 0.5, calls=30), resumed])
    md = write_report(folder).md.read_text(encoding="utf-8")
    assert md_tables(section(md, "Comparison"))[0][1][4] == "30.0"  # LM calls: mean of 30 and 12 + 18
    runs = md_tables(section(md, "Runs"))[0]
    assert [row[5] for row in runs[1:]] == ["30", "30"]
    assert [row[6] for row in runs[1:]] == ["152", "152"]  # tokens: 5 x 30 + 2, and 5 x 12 + 2 made + 90 replayed
    bad_fields = (
        ({"compile": {"judge": -1}}, "replayed.compile.judge"),
        ({"compile": []}, "replayed.compile"),
        ({"compile": {}, "compile_tokens": "90"}, "replayed.compile_tokens"),
    )
    for bad, field in bad_fields:
        resumed["replayed"] = bad
        _write_results(folder, [resumed])
        with pytest.raises(ReportError, match=rf"seed-1/result\.json: field '{re.escape(field)}'"):
            write_report(folder)


def test_bad_comparison_results_name_the_file_and_field(tmp_path: Path) -> None:
    folder = tmp_path / "cmp"
    bad = _result("a", 0, 0.5)
    del bad["test"]["scores"]
    _write_results(folder, [bad])
    with pytest.raises(ReportError, match=r"cmp/runs/a/seed-0/result\.json: field 'test\.scores'"):
        write_report(folder)
    bad = _result("a", 0, 0.5)
    bad["usage"]["total"]["calls"] = "many"
    _write_results(folder, [bad])
    with pytest.raises(ReportError, match=r"seed-0/result\.json: field 'usage\.total\.calls'"):
        write_report(folder)
    bad = _result("a", 0, 0.5)
    bad["test"]["primary"] = "f1"
    _write_results(folder, [bad])
    with pytest.raises(ReportError, match=r"field 'test\.primary'"):
        write_report(folder)
    other = _result("b", 1, 0.5)
    other["test"]["confusion_matrix"]["labels"] = ["no", "yes"]
    _write_results(folder, [_result("a", 0, 0.5), other])
    with pytest.raises(ReportError, match=r"runs/b/seed-1/result\.json: field 'test\.confusion_matrix'.*differ"):
        write_report(folder)
    assert not (folder / "report.md").exists()


def test_pool_confusion_sums_matching_matrices() -> None:
    a = {"labels": ["yes", "no"], "columns": ["yes", "no", "unparsed"], "counts": [[1, 2, 0], [3, 4, 1]]}
    b = {"labels": ["yes", "no"], "columns": ["yes", "no", "unparsed"], "counts": [[5, 0, 2], [0, 1, 0]]}
    assert pool_confusion([a, b])["counts"] == [[6, 2, 2], [3, 5, 1]]
    assert pool_confusion([]) is None
    with pytest.raises(ValueError, match="differ"):
        pool_confusion([a, {**b, "labels": ["no", "yes"]}])
