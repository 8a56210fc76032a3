"""The quickstart notebook runs top to bottom on a fresh kernel of this interpreter, offline, and shows its results."""

from __future__ import annotations

import base64
import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is in the dev extra")
nbclient = pytest.importorskip("nbclient", reason="nbclient is in the dev extra")
pytest.importorskip("ipykernel", reason="ipykernel is in the dev extra")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def _kernel_for_this_interpreter(root: Path) -> None:
    """A ``python3`` kernelspec running ``sys.executable``, first on ``JUPYTER_PATH`` (so no user kernel shadows it)."""
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "Python 3 (blpo-dspy tests)", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel), encoding="utf-8")


def _text_outputs(nb: nbformat.NotebookNode) -> str:
    chunks = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                chunks.append(output["text"])
            elif "data" in output:
                chunks.append(output["data"].get("text/markdown", "") or output["data"].get("text/plain", ""))
    return "\n".join(chunks)


def test_committed_notebook_has_no_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, "the quickstart has no code cells"
    assert all(not cell.outputs and cell.execution_count is None for cell in code)


def test_quickstart_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    jupyter = tmp_path / "jupyter"
    _kernel_for_this_interpreter(jupyter)
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("DSPY_CACHEDIR", str(tmp_path / "dspy-cache"))
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    workdir = tmp_path / "work"
    workdir.mkdir()

    nb = nbformat.read(NOTEBOOK, as_version=4)
    probe = nbformat.v4.new_code_cell("import sys; print('KERNEL-PYTHON', sys.executable)")
    nb.cells.insert(0, probe)  # the temp copy only: which interpreter ran it
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert errors == []
    text = _text_outputs(nb)
    assert f"KERNEL-PYTHON {sys.executable}" in text

    match = re.search(r"held-out macro_f1: seed ([\d.]+), judge-only ([\d.]+), BLPO ([\d.]+)", text)
    assert match, f"the comparison line is missing from the outputs:\n{text[-2000:]}"
    seed, judge_only, blpo = (float(g) for g in match.groups())
    assert blpo >= 0.9 and blpo > judge_only and blpo > seed  # BLPO finds the counting cue, judge-only cannot
    assert "| BLPO |" in text and "| judge-only (i2t_policy='fixed') |" in text
    assert re.search(r"validation macro_f1: seed [\d.]+ -> compiled [\d.]+", text)

    run = workdir / "quickstart_output" / "blpo"
    assert (run / "report.html").is_file() and (run / "report.md").is_file()
    assert (run / "evaluations" / "seed.json").is_file() and (run / "evaluations" / "compiled.json").is_file()

    # run_compare over two seeds, its report and the comparison plots
    match = re.search(r"mean held-out macro_f1 over seeds: no-opt ([\d.]+), fixed-i2t ([\d.]+), blpo ([\d.]+)", text)
    assert match, f"the run_compare line is missing from the outputs:\n{text[-2000:]}"
    no_opt, fixed_i2t, blpo_mean = (float(g) for g in match.groups())
    assert blpo_mean >= 0.9 and blpo_mean > fixed_i2t and blpo_mean > no_opt
    assert "# Optimizer comparison: circle_count" in text and "| blpo | 2/2 |" in text
    compare = workdir / "quickstart_output" / "compare"
    assert len(list(compare.glob("runs/*/seed-*/result.json"))) == 6
    assert {p.name for p in compare.glob("report_*.png")} == {
        "report_compare_scores.png",
        "report_compare_cost.png",
        "report_compare_confusion.png",
    }
    assert "](report_compare_scores.png)" in (compare / "report.md").read_text(encoding="utf-8")

    # the images shown are the run's three plots, then the comparison's score and cost plots, byte for byte
    shown = [
        base64.b64decode(o["data"]["image/png"])
        for cell in nb.cells
        for o in cell.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    expected = sorted(p.read_bytes() for p in run.glob("report_*.png"))
    assert len(expected) == 3 and sorted(shown[:3]) == expected
    assert shown[3:] == [
        (compare / name).read_bytes() for name in ("report_compare_scores.png", "report_compare_cost.png")
    ]
