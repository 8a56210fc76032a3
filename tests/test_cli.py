"""The ``blpo`` command line, end to end on scripted LMs (no network, no model)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from blpo_dspy import cli
from blpo_dspy.images import image_bytes
from blpo_dspy.testing import CountingWorld

COUNTING_CARD = """
name = "circle_count"
description = "Does the image show exactly the number of red circles the prompt asks for?"
kind = "binary"
labels = ["yes", "no"]

[[text_inputs]]
name = "prompt"
description = "What the image should show."

[instructions]
judge = "Does the image match the prompt?"
"""


def test_tasks_lists_the_builtin_cards() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "blpo_dspy.cli", "tasks"], capture_output=True, text=True, check=True
    ).stdout
    names = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert {"alignment", "rating", "naturalness", "safety", "preference"} <= names


def _write_manifest(tmp_path: Path, world: CountingWorld) -> Path:
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    rows = []
    for example in world.examples(40, seed=5):
        name = f"{example.id}.png"
        (images / name).write_bytes(image_bytes(example.image))
        rows.append({"id": example.id, "image": f"images/{name}", "prompt": example.prompt, "label": example.label})
    manifest = tmp_path / "data" / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def test_compile_evaluate_and_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    world = CountingWorld()
    monkeypatch.setattr("blpo_dspy.lm_specs.build_lm", lambda spec, role, **_: world.lm)
    card = tmp_path / "circle_count.toml"
    card.write_text(COUNTING_CARD, encoding="utf-8")
    manifest = _write_manifest(tmp_path, world)
    run_dir = tmp_path / "run"
    compile_args = [
        "compile", str(card), "--data", str(manifest), "--verbalizer-lm", "scripted", "--judge-lm", "scripted",
        "--proposer-lm", "scripted", "--judge-sees", "text", "--run-dir", str(run_dir), "--outer-steps", "2",
        "--inner-steps", "3", "--error-batch-size", "5", "--retain-batch-size", "4", "--threads", "4",
    ]  # fmt: skip
    rc = cli.main(compile_args)
    out = capsys.readouterr().out
    assert rc == 0
    assert "count" in json.loads((run_dir / "state.json").read_text())["incumbent"]["verbalizer"].lower()
    for name in ("program.json", "splits.json", "study.db", "report.md", "report.html", "evaluations/compiled.json"):
        assert (run_dir / name).exists(), name
    compiled = json.loads((run_dir / "evaluations" / "compiled.json").read_text())
    seed = json.loads((run_dir / "evaluations" / "seed.json").read_text())
    assert compiled["scores"]["macro_f1"]["value"] >= 0.9 > seed["scores"]["macro_f1"]["value"]
    assert "held-out test split" in out

    rc = cli.main(
        [
            "evaluate",
            str(run_dir / "program.json"),
            "--data",
            str(manifest),
            "--judge-lm",
            "scripted",
            "--verbalizer-lm",
            "scripted",
            "--split",
            "test",
            "--json-out",
            str(tmp_path / "eval.json"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "Macro-F1" in out and "95% CI" in out  # scores with confidence intervals
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    splits = json.loads((run_dir / "splits.json").read_text())
    assert evaluated["n"] == len(splits["ids"]["test"])
    assert evaluated["scores"]["macro_f1"]["value"] == compiled["scores"]["macro_f1"]["value"]

    # resuming a finished compile replays it, held-out evaluations included, without a single new LM call
    calls = len(world.engine.calls)
    rc = cli.main([*compile_args, "--resume"])
    out = capsys.readouterr().out
    assert rc == 0
    assert world.engine.calls[calls:] == []
    n_test = len(splits["ids"]["test"])
    assert out.count(f"(n={n_test}; {n_test} replayed from the run's journal)") == 2  # seed and compiled programs
    for name in ("seed", "compiled"):
        replayed = json.loads((run_dir / "evaluations" / f"{name}.json").read_text())
        assert replayed == (compiled if name == "compiled" else seed)


def test_errors_are_reported_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "manifest.csv"
    bad.write_text("id,image,prompt,label\n1,missing.png,a cat,yes\n", encoding="utf-8")
    rc = cli.main(["evaluate", str(tmp_path / "nope.json"), "--data", str(bad), "--judge-lm", "openai/x"])
    assert rc == 2
    assert "blpo: error:" in capsys.readouterr().err
    rc = cli.main(
        [
            "compile",
            "alignment",
            "--data",
            str(bad),
            "--verbalizer-lm",
            "x/y",
            "--judge-lm",
            "x/y",
            "--proposer-lm",
            "x/y",
            "--run-dir",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "manifest.csv" in err and "row 1" in err and "image" in err
