"""Fixtures shared across the test folders, which mirror the package's own folders (core, data,
engine, families, analysis, trace, report, training, studies, cli); the tests at this level cut
across all of them (layering, bad-input fuzzing, crash safety). Plain helper functions are in
``helpers.py`` and the derived numerical tolerances in ``tolerances.py``."""

from __future__ import annotations

import pytest
from helpers import TINY_TRACE_CONFIG

from loopscope.families.looplm import LoopLM


@pytest.fixture(scope="session")
def tiny_trace_model() -> LoopLM:
    """The tiny looped model of ``helpers.TINY_TRACE_CONFIG``, built once per run. Its weights
    are seeded by the config, so every test sees the same model; no test may change them."""
    return LoopLM(TINY_TRACE_CONFIG).eval()
