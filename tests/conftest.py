"""Shared fixtures: isolated DSPy settings and cache, no network."""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from pathlib import Path

import dspy
import pytest
from hypothesis import settings

# Property tests draw the same examples on every run (a reproducible CI); HYPOTHESIS_PROFILE=explore draws new ones.
settings.register_profile("reproducible", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "reproducible"))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_dspy(tmp_path_factory: pytest.TempPathFactory) -> None:
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    with dspy.context(lm=None, adapter=None, track_usage=False):
        yield


@pytest.fixture
def shared_data() -> Path:
    """The shared data folder beside the repository (skips when absent)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found beside the repository ({SHARED_DATA.name}); nothing to read")
    return SHARED_DATA
