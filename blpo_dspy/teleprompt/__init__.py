"""Teleprompters: BLPO and its building blocks (proposers, selection, sampling policies)."""

from blpo_dspy.teleprompt.blpo import BLPO, JudgeRecord, ResumeError
from blpo_dspy.teleprompt.errors import BalancedSampler, BatchSampler, UniformSampler

__all__ = ["BLPO", "BalancedSampler", "BatchSampler", "JudgeRecord", "ResumeError", "UniformSampler"]
