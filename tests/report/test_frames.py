"""The analysis as notebook objects: pandas tables equal to the report's own tables, and the
report's body inline through ``_repr_html_``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import random_prompts

from loopscope.analysis.report_parts import Table
from loopscope.families.looplm import LoopLM
from loopscope.pipeline import open_analysis, report
from loopscope.report.frames import limiting_rates_frame, table_frame
from loopscope.report.html import page_body, to_jsonable
from loopscope.trace.settings import TraceSettings
from loopscope.trace.writer import trace_prompts

pd = pytest.importorskip("pandas")

SETTINGS = TraceSettings(recurrences=10, stability_prompts=1, stability_iters=8)


@pytest.fixture(scope="module")
def traced(tiny_trace_model: LoopLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("frames") / "trace"
    trace_prompts(tiny_trace_model, random_prompts(2, seed=5), out, SETTINGS, progress=False)
    return out


def test_a_table_becomes_a_frame_indexed_by_its_row_labels() -> None:
    table = Table("t", ["layer", "rate", "note"], [["a", 0.5, "x"], ["b", 1.0, None]])
    frame = table_frame(table)
    assert frame.index.tolist() == ["a", "b"] and frame.index.name == "layer"
    assert frame["rate"].tolist() == [0.5, 1.0]
    assert frame.attrs["title"] == "t"


def test_limiting_rates_have_one_row_per_scope() -> None:
    rates = {"fixed_point": 0.75, "orbit": 0.25, "slider": 0.0, "unknown": 0.0, "divergent": 0.0}
    metrics = {
        "limiting_behaviour": {
            "last_layer": {"token_rates": rates, "example_rates": {**rates, "orbit": 0.5}},
            "per_layer_token_rates": [rates, {**rates, "fixed_point": 1.0, "orbit": 0.0}],
        }
    }
    frame = limiting_rates_frame(metrics)
    assert frame.index.tolist() == [
        "last layer, tokens",
        "last layer, prompts",
        "layer 0, tokens",
        "layer 1, tokens",
    ]
    assert frame.loc["last layer, prompts", "orbit"] == 0.5
    assert frame.loc["layer 1, tokens", "fixed_point"] == 1.0
    assert frame.columns.tolist() == list(rates)


def test_open_analysis_matches_the_written_report(traced: Path, tmp_path: Path) -> None:
    analysis = open_analysis(traced)
    paths = report(traced, tmp_path)
    written = json.loads(paths.metrics_json.read_text())["dynamics"]
    assert json.loads(json.dumps(to_jsonable(analysis.metrics))) == written
    frame = analysis.verdict_frame
    assert frame.index.tolist() == [row[0] for row in analysis.verdict.rows]
    assert frame.columns.tolist() == analysis.verdict.columns[1:]
    last = written["limiting_behaviour"]["last_layer"]["token_rates"]
    assert analysis.limiting_rates.loc["last layer, tokens"].to_dict() == last
    assert all(isinstance(t, pd.DataFrame) for t in analysis.tables().values())


def test_the_report_shows_its_body_inline(traced: Path, tmp_path: Path) -> None:
    paths = report(traced, tmp_path)
    inline = paths._repr_html_()
    page = paths.html.read_text()
    body = page[page.index("<body>") + len("<body>") : page.index("</body>")]
    assert inline == f'<div class="loopscope-report">{body}</div>'
    assert "<h1>" in inline and "<html" not in inline and "<style>" not in inline
    analysed = open_analysis(traced)._repr_html_()
    assert "data:image/png;base64," in analysed and "<html" not in analysed
    assert page_body("no page") == '<div class="loopscope-report">no page</div>'
