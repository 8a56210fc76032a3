"""blpo-dspy: compile human-aligned multimodal judges with bi-level prompt optimization on DSPy."""

from blpo_dspy.task import Task, TaskCardError, builtin_task_names

__all__ = ["Task", "TaskCardError", "builtin_task_names"]
__version__ = "0.1.0"
