"""blpo-dspy: compile human-aligned multimodal judges with bi-level prompt optimization (BLPO) on DSPy.

Typical use::

    import dspy
    from blpo_dspy import BLPO, ImageJudge, Task, evaluate
    from blpo_dspy.data import load_manifest, stratified_split

    task = Task.load("alignment")
    splits = stratified_split(load_manifest("labels.csv", task), sizes={"train": 0.5, "val": 0.25, "test": 0.25},
                              seed=0)
    program = ImageJudge(task, judge_sees="image", judge_lm=dspy.LM("openai/gpt-4o-mini"))
    compiled = BLPO(proposer_lm=dspy.LM("openai/gpt-4o"), verbalizer_lm=dspy.LM("openai/gpt-4o-mini"),
                    run_dir="runs/alignment").compile(program, trainset=splits["train"], valset=splits["val"])
    print(evaluate(compiled, splits["test"]).table())
"""

from blpo_dspy.evaluation import EvaluationReport, PredictionRecord, evaluate
from blpo_dspy.metrics import (
    METRICS,
    Score,
    as_dspy_metric,
    bootstrap_ci,
    confusion_matrix,
    corpus_scores,
    metrics_for_task,
    primary_metric,
)
from blpo_dspy.modules import ImageJudge, Judge, Verbalizer
from blpo_dspy.persistence import load_program, save_program
from blpo_dspy.task import LabelError, Task, TaskCardError, builtin_task_names
from blpo_dspy.teleprompt import BLPO, ResumeError

__all__ = [
    "BLPO",
    "METRICS",
    "EvaluationReport",
    "ImageJudge",
    "Judge",
    "LabelError",
    "PredictionRecord",
    "ResumeError",
    "Score",
    "Task",
    "TaskCardError",
    "Verbalizer",
    "as_dspy_metric",
    "bootstrap_ci",
    "builtin_task_names",
    "confusion_matrix",
    "corpus_scores",
    "evaluate",
    "load_program",
    "metrics_for_task",
    "primary_metric",
    "save_program",
]
__version__ = "0.1.0"
