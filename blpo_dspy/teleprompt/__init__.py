"""Teleprompters: BLPO and its building blocks (proposers, selection, sampling policies)."""

from blpo_dspy.teleprompt.blpo import BLPO, ResumeError
from blpo_dspy.teleprompt.calls import JudgeRecord, ProgramCalls
from blpo_dspy.teleprompt.errors import BalancedSampler, BatchSampler, UniformSampler

__all__ = ["BLPO", "BalancedSampler", "BatchSampler", "JudgeRecord", "ProgramCalls", "ResumeError", "UniformSampler"]
