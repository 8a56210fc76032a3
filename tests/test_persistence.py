"""Saving and loading compiled judge programs (JSON, no LM state, no absolute paths)."""

from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import dspy
import pytest
from PIL import Image as PILImage

from blpo_dspy.modules import ImageJudge
from blpo_dspy.persistence import PROGRAM_FORMAT, load_program, save_program
from blpo_dspy.task import Task, TaskCardError
from blpo_dspy.testing import ScriptedEngine

ALIGNMENT = Task.load("alignment")
PREFERENCE = Task.load("preference")
DIAGNOSTICS: dict[str, Any] = {
    "best_instructions_": {"verbalizer": "Count it.", "judge": "Compare counts."},
    "best_score_": 0.875,
    "seed_score_": 0.5,
    "metric_name_": "macro_f1",
    "usage_": {"judge": {"calls": 12, "prompt_tokens": 3400}},
    "stop_reason_": "outer_steps",
}


def _image() -> dspy.Image:
    buffer = io.BytesIO()
    PILImage.new("RGB", (6, 6), (40, 80, 120)).save(buffer, format="PNG")
    return dspy.Image(f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}")


def _secret_lm(engine: ScriptedEngine) -> dspy.LM:
    return engine.lm("secret-model-xyz")


def _provider_lm() -> dspy.LM:
    """A provider LM with credentials and an endpoint (never called)."""
    return dspy.LM("openai/private-model-abc", api_key="sk-VERY-SECRET", api_base="http://10.9.8.7:1234/v1")


def _compiled(task: Task, judge_sees: str, engine: ScriptedEngine) -> ImageJudge:
    program = ImageJudge(task, judge_sees=judge_sees, verbalizer_lm=_secret_lm(engine), judge_lm=_secret_lm(engine))  # type: ignore[arg-type]
    program = program.with_instructions(verbalizer="Count it.", judge="Compare counts.")
    for name, value in DIAGNOSTICS.items():
        setattr(program, name, value)
    return program


@pytest.mark.parametrize(("task", "judge_sees"), [(ALIGNMENT, "image"), (ALIGNMENT, "text"), (PREFERENCE, "both")])
def test_save_then_load_rebuilds_the_program(tmp_path: Path, task: Task, judge_sees: str) -> None:
    engine = ScriptedEngine()
    program = _compiled(task, judge_sees, engine)
    path = save_program(program, tmp_path / "run" / "program.json")
    assert path == tmp_path / "run" / "program.json"
    assert not list(path.parent.glob("*.tmp"))

    loaded = load_program(path)
    assert loaded.task.source == "program.json:blpo.task"
    assert replace(loaded.task, source=task.source) == task
    assert loaded.task.name == task.name
    assert loaded.judge_sees == judge_sees
    assert loaded.instructions == {"verbalizer": "Count it.", "judge": "Compare counts."}
    for name, value in DIAGNOSTICS.items():
        assert getattr(loaded, name) == value
    assert list(loaded.judge.predict.signature.input_fields) == list(program.judge.predict.signature.input_fields)
    assert loaded.verbalizer_lm is None
    assert loaded.judge_lm is None


def test_loaded_program_runs_on_the_lms_given_at_load(tmp_path: Path) -> None:
    path = save_program(_compiled(ALIGNMENT, "text", ScriptedEngine()), tmp_path / "program.json")
    vision, judge = ScriptedEngine(model="vlm"), ScriptedEngine(rules=[lambda c: {"rationale": "r", "label": "no"}])
    loaded = load_program(path, verbalizer_lm=vision.lm(), judge_lm=judge.lm())
    assert loaded(image=_image(), prompt="p").label == "no"
    assert [c.instructions for c in vision.calls] == ["Count it."]
    assert [c.instructions for c in judge.calls] == ["Compare counts."]


def test_the_file_holds_no_lm_state_no_secrets_and_no_absolute_paths(tmp_path: Path) -> None:
    program = _compiled(ALIGNMENT, "both", ScriptedEngine())
    program.verbalizer.predict.lm = _provider_lm()  # even a predictor-attached LM is not saved
    path = save_program(program, tmp_path / "program.json")
    text = path.read_text(encoding="utf-8")
    state = json.loads(text)
    predictors = [name for name in state if name not in ("blpo", "metadata")]
    assert predictors == ["verbalizer.predict", "judge.predict"]
    assert all(state[name]["lm"] is None for name in predictors)
    assert "sk-VERY-SECRET" not in text
    assert "secret-model-xyz" not in text
    assert "private-model-abc" not in text
    assert "10.9.8.7" not in text
    assert str(tmp_path) not in text
    assert str(Path.home()) not in text
    assert str(Path(__file__).resolve().parents[1]) not in text
    assert state["blpo"]["format"] == PROGRAM_FORMAT
    assert state["blpo"]["task"] == ALIGNMENT.to_dict()
    assert "source" not in state["blpo"]["task"]
    assert state["blpo"]["instructions"] == {"verbalizer": "Count it.", "judge": "Compare counts."}
    assert "dspy" in state["metadata"]["dependency_versions"]


def test_save_program_output_loads_into_a_plain_image_judge(tmp_path: Path) -> None:
    path = save_program(_compiled(ALIGNMENT, "image", ScriptedEngine()), tmp_path / "program.json")
    fresh = ImageJudge(ALIGNMENT)
    fresh.load(str(path))
    assert fresh.instructions == {"verbalizer": "Count it.", "judge": "Compare counts."}


def test_program_without_diagnostics_saves_and_loads(tmp_path: Path) -> None:
    path = save_program(ImageJudge(PREFERENCE), tmp_path / "seed.json")
    assert json.loads(path.read_text(encoding="utf-8"))["blpo"]["diagnostics"] == {}
    loaded = load_program(path)
    assert loaded.instructions == ImageJudge(PREFERENCE).instructions
    assert not hasattr(loaded, "best_score_")


def test_save_program_refuses_a_non_json_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape("use a .json path, got 'program.pkl'")):
        save_program(ImageJudge(ALIGNMENT), tmp_path / "program.pkl")
    assert not (tmp_path / "program.pkl").exists()


# --------------------------------------------------------------------------------------------- bad files
def test_a_plain_dspy_save_is_refused_naming_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "plain.json"
    ImageJudge(ALIGNMENT).save(str(path))
    with pytest.raises(ValueError) as err:
        load_program(path)
    assert "plain.json" in str(err.value)
    assert "'blpo.task'" in str(err.value)
    assert str(tmp_path) not in str(err.value)


@pytest.mark.parametrize("content", ['{"blpo": {"format": 1}}', '{"blpo": "yes"}', "{}"])
def test_json_without_a_task_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "other.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape("other.json: key 'blpo.task' missing")):
        load_program(path)


@pytest.mark.parametrize("content", ["[]", '"program"', "3"])
def test_json_that_is_not_an_object_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "other.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape("other.json: key 'blpo.task' missing")):
        load_program(path)


def test_invalid_json_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"blpo": ', encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape("broken.json: not valid JSON")):
        load_program(path)


def test_a_bad_task_card_inside_names_file_and_key(tmp_path: Path) -> None:
    path = save_program(ImageJudge(ALIGNMENT), tmp_path / "program.json")
    state = json.loads(path.read_text(encoding="utf-8"))
    state["blpo"]["task"]["kind"] = "scalar"
    path.write_text(json.dumps(state), encoding="utf-8")
    with pytest.raises(TaskCardError) as err:
        load_program(path)
    assert err.value.source == "program.json:blpo.task"
    assert err.value.key == "kind"


def test_a_bad_judge_sees_names_file_and_key(tmp_path: Path) -> None:
    path = save_program(ImageJudge(ALIGNMENT), tmp_path / "program.json")
    state = json.loads(path.read_text(encoding="utf-8"))
    state["blpo"]["judge_sees"] = "video"
    path.write_text(json.dumps(state), encoding="utf-8")
    with pytest.raises(ValueError) as err:
        load_program(path)
    assert "program.json" in str(err.value)
    assert "blpo.judge_sees" in str(err.value)


def test_a_missing_predictor_state_names_file_and_key(tmp_path: Path) -> None:
    path = save_program(ImageJudge(ALIGNMENT), tmp_path / "program.json")
    state = json.loads(path.read_text(encoding="utf-8"))
    del state["judge.predict"]
    path.write_text(json.dumps(state), encoding="utf-8")
    with pytest.raises(ValueError) as err:
        load_program(path)
    assert "program.json" in str(err.value)
    assert "judge.predict" in str(err.value)
