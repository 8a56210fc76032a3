"""Update_p and Update_q: the optimizer LM's two proposal steps, as DSPy signatures over text only.

The proposer never receives an image: judge errors reach it as verbalizations, gold and predicted labels and the
judge's rationale. The rules of the paper (minimal edits, no specific examples, no output-format instructions,
keep the label scale, answer differs from all tried) live in the signatures' instructions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import dspy

from blpo_dspy.task import Task

UPDATE_P_INSTRUCTIONS = """\
You improve the instruction given to an AI judge that labels images. You see the judge's current instruction and
a batch of examples it got wrong. The judge's mistakes reach you as text: a description of each image written by
a describer, the gold label given by humans, the judge's predicted label and the judge's rationale.
Diagnose what the judge systematically misses or misreads, then write an improved judge instruction.
Rules:
- Make minimal, targeted edits to the current instruction; keep what already works.
- State general criteria. Never quote or refer to specific examples, images or prompts from the batch.
- Do not add any output-format instructions (the answer format is fixed elsewhere); keep the task's label scale.
- The new instruction must differ from every instruction listed as already tried.
Answer with the complete new instruction only."""

UPDATE_Q_INSTRUCTIONS = """\
You improve the instruction given to an image describer. Its descriptions are the only way an instruction
optimizer can see the images on which an AI judge made mistakes, so a good describer instruction makes the
describer report exactly the visual evidence the judge's task depends on (for example counts, text in the image,
colours, positions, anatomy or rendering flaws, unsafe details), in plain factual language.
You see the task, the judge's current instruction, and the describer instructions tried so far with their scores
(the share of the judge's errors that an instruction update based on those descriptions fixed), lowest first.
Write a new describer instruction that should score higher.
Rules:
- Ask for factual, task-relevant observations; do not ask the describer to judge or to give the label.
- Keep it general: no references to specific images or prompts.
- The new instruction must differ from every instruction already tried.
Answer with the new describer instruction only."""


class UpdateJudgeInstruction(dspy.Signature):
    """Update_p (replaced at runtime by UPDATE_P_INSTRUCTIONS)."""

    task_description: str = dspy.InputField(desc="What the judge labels and the label scale.")
    current_instruction: str = dspy.InputField(desc="The judge's current instruction.")
    errors: str = dspy.InputField(desc="Examples the judge got wrong, as text.")
    tried_instructions: str = dspy.InputField(desc="Judge instructions already tried (do not repeat them).")
    new_instruction: str = dspy.OutputField(desc="The complete improved judge instruction.")


class UpdateVerbalizerInstruction(dspy.Signature):
    """Update_q (replaced at runtime by UPDATE_Q_INSTRUCTIONS)."""

    task_description: str = dspy.InputField(desc="What the judge labels and the label scale.")
    judge_instruction: str = dspy.InputField(desc="The judge's current instruction.")
    history: str = dspy.InputField(desc="Describer instructions tried so far with their scores, lowest first.")
    new_instruction: str = dspy.OutputField(desc="The new describer instruction.")


UpdateJudgeInstruction = UpdateJudgeInstruction.with_instructions(UPDATE_P_INSTRUCTIONS)
UpdateVerbalizerInstruction = UpdateVerbalizerInstruction.with_instructions(UPDATE_Q_INSTRUCTIONS)


@dataclass(frozen=True)
class ErrorCase:
    """One judge error, as the proposer sees it (text only).

    Attributes:
        text_fields: The example's text inputs (e.g. the generation prompt).
        descriptions: Verbalization of each image under the candidate I2T instruction.
        gold: The human label.
        predicted: The judge's label (``None`` when unparseable).
        rationale: The judge's rationale.
    """

    text_fields: dict[str, str]
    descriptions: dict[str, str]
    gold: object
    predicted: object
    rationale: str


def task_description(task: Task) -> str:
    """The task description shown to the proposer."""
    text = f"{task.description} Labels: {task.label_space_text}."
    if task.categories:
        text += " Categories: " + "; ".join(task.categories) + "."
    return text


def render_errors(cases: Sequence[ErrorCase]) -> str:
    """Render error cases as numbered text blocks."""
    blocks = []
    for i, case in enumerate(cases, 1):
        lines = [f"Error {i}:"]
        lines += [f"  {name}: {value}" for name, value in case.text_fields.items()]
        for name, value in case.descriptions.items():
            which = name.removeprefix("description").strip("_").upper()
            lines.append(f"  image {which} description: {value}" if which else f"  image description: {value}")
        lines.append(f"  gold label: {case.gold}")
        lines.append(f"  judge's label: {case.predicted if case.predicted is not None else '(unparseable answer)'}")
        if case.rationale:
            lines.append(f"  judge's rationale: {case.rationale}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def render_history(history: Sequence[tuple[str, float]]) -> str:
    """OPRO-style history: instructions with scores, sorted lowest score first."""
    ordered = sorted(history, key=lambda item: item[1])
    return "\n".join(f"- score {score:.2f}: {text}" for text, score in ordered) or "(none yet)"


def render_tried(tried: Sequence[str]) -> str:
    """A bulleted list of already tried instructions."""
    unique = list(dict.fromkeys(tried))
    return "\n".join(f"- {text}" for text in unique) or "(none yet)"


def clean_instruction(text: object) -> str | None:
    """Normalise a proposed instruction; ``None`` if empty."""
    if not isinstance(text, str):
        return None
    cleaned = text.strip().strip('"').strip()
    return cleaned or None
