"""Saving and loading compiled judge programs as JSON (DSPy's state format plus the task card). No pickle.

``program.json`` is exactly what ``ImageJudge.save(path)`` writes (so ``ImageJudge(task).load(path)`` works), with
one extra top-level key, ``blpo``, holding the task card, ``judge_sees`` and the compile's diagnostics, so that
``load_program(path)`` can rebuild the program without knowing its task in advance.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import dspy

from blpo_dspy.modules import ImageJudge
from blpo_dspy.task import JUDGE_SEES, Task

PROGRAM_FORMAT = 1
_DIAGNOSTICS = ("best_instructions_", "best_score_", "seed_score_", "metric_name_", "usage_", "stop_reason_")


def save_program(program: ImageJudge, path: str | Path) -> Path:
    """Write an ``ImageJudge`` to a JSON file (atomically).

    Args:
        program: The program (compiled or not).
        path: Destination ``.json`` file.

    Returns:
        The path written.
    """
    path = Path(path)
    if path.suffix != ".json":
        raise ValueError(f"programs are saved as JSON; use a .json path, got '{path.name}'")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = program.dump_state(json_mode=True)
    for name in list(state):
        state[name]["lm"] = None  # LMs are runtime attributes, never saved (no endpoints or keys in artifacts)
    from dspy.utils.saving import get_dependency_versions

    state["metadata"] = {"dependency_versions": get_dependency_versions()}
    state["blpo"] = {
        "format": PROGRAM_FORMAT,
        "task": program.task.to_dict(),
        "judge_sees": program.judge_sees,
        "instructions": program.instructions,
        "diagnostics": {name: getattr(program, name) for name in _DIAGNOSTICS if hasattr(program, name)},
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_program(
    path: str | Path, *, verbalizer_lm: dspy.LM | None = None, judge_lm: dspy.LM | None = None
) -> ImageJudge:
    """Rebuild an ``ImageJudge`` saved by ``save_program`` (or by BLPO into its run directory).

    Args:
        path: The ``program.json`` file.
        verbalizer_lm: LM to attach for the verbalizer.
        judge_lm: LM to attach for the judge.

    Raises:
        ValueError: The file is not a blpo program; the message names the file and the missing key.
    """
    path = Path(path)
    try:
        state: Any = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path.name}: not valid JSON: {exc}") from exc
    meta = state.get("blpo") if isinstance(state, dict) else None
    if not isinstance(meta, dict) or "task" not in meta:
        raise ValueError(f"{path.name}: key 'blpo.task' missing: not a program saved by blpo-dspy")
    task = Task.from_dict(meta["task"], source=f"{path.name}:blpo.task")
    judge_sees = meta.get("judge_sees", "image")
    if judge_sees not in JUDGE_SEES:
        raise ValueError(
            f"{path.name}: key 'blpo.judge_sees': must be one of {', '.join(JUDGE_SEES)}, got {judge_sees!r}"
        )
    program = ImageJudge(task, judge_sees=judge_sees, verbalizer_lm=verbalizer_lm, judge_lm=judge_lm)
    missing = [name for name, _ in program.named_predictors() if not isinstance(state.get(name), dict)]
    if missing:
        raise ValueError(f"{path.name}: key '{missing[0]}' missing: not a program state for task '{task.name}'")
    program.load_state({k: v for k, v in state.items() if k not in ("blpo", "metadata")})
    for name, value in meta.get("diagnostics", {}).items():
        setattr(program, name, value)
    return program
