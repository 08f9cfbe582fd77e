"""The demo model traced in bfloat16 reaches the verdicts it reaches in float32: the metrics
accumulate in float32, and the settled-step tolerance is never finer than the dtype rounds."""

from __future__ import annotations

import re
from pathlib import Path

from helpers import DEMO_PROMPTS

from loopscope.analysis.registry import Thresholds
from loopscope.report.trace_report import analyse_dynamics, at_dtype_resolution
from loopscope.trace.settings import TraceSettings


def _words(cell: object) -> str:
    """A verdict cell without its numbers (which differ in the last digits between dtypes)."""
    return re.sub(r"[-+]?\d[\d.e+-]*", "#", str(cell))


def test_demo_in_bfloat16_gives_the_float32_verdict_table(tmp_path: Path) -> None:
    from loopscope.pipeline import trace

    settings = TraceSettings(recurrences=32, stability_prompts=1, stability_iters=20)
    tables = {}
    for dtype in ("float32", "bfloat16"):
        store = trace(
            "demo", DEMO_PROMPTS, tmp_path / dtype, settings, limit=4, progress=False,
            device="cpu", dtype=dtype,
        )  # fmt: skip
        assert store.header["runtime"]["dtype"] == dtype
        verdict = analyse_dynamics(store).verdict
        tables[dtype] = [[_words(c) for c in row] for row in verdict.rows]
    assert tables["bfloat16"] == tables["float32"]
    assert any(row[1].startswith("yes") for row in tables["float32"])  # something converged


def test_settled_step_is_floored_at_the_dtype_rounding_step() -> None:
    default = Thresholds()
    assert at_dtype_resolution(default, {"runtime": {"dtype": "float32"}}) == default
    assert at_dtype_resolution(default, {}) == default  # traces from before the runtime record
    assert at_dtype_resolution(default, {"runtime": {"dtype": "bfloat16"}}).settled_step == 2**-7
    assert at_dtype_resolution(default, {"runtime": {"dtype": "float16"}}) == default  # 2⁻¹⁰ < 1e-3
