"""The measurement registry and its one loop over a trace: lean traces say which capture a
measurement needs, the logit lens agrees with the engine's own read-outs, and a measurement
registered from outside reaches metrics.json, the verdict table and the report."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import random_prompts, tiny_trace_config
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure
from tolerances import rounding_tolerance

from loopscope.analysis.measures.logit_lens import LogitLensProbe, agreement_counts, settled_from
from loopscope.analysis.registry import (
    MEASUREMENTS,
    Measurement,
    Need,
    Registry,
    Source,
    VerdictColumn,
)
from loopscope.analysis.report_parts import Figure
from loopscope.families.looplm import LoopLM
from loopscope.pipeline import report
from loopscope.report.trace_report import run_measurements
from loopscope.trace.settings import PromptInput, TraceSettings
from loopscope.trace.store import TraceStore
from loopscope.trace.writer import trace_prompts

TINY = tiny_trace_config(name="tiny-measures")
RECURRENCES = 12
SETTINGS = TraceSettings(
    recurrences=RECURRENCES, stability_prompts=1, stability_iters=8, attention_recurrences=4
)
NEEDS_STATES = "needs stored states: trace with --capture full, keeping every recurrence"


def _prompts() -> list[PromptInput]:
    return random_prompts(2, seed=1)


@pytest.fixture(scope="module")
def model() -> LoopLM:
    return LoopLM(TINY).eval()


@pytest.fixture(scope="module")
def full(model: LoopLM, tmp_path_factory: pytest.TempPathFactory) -> TraceStore:
    out = tmp_path_factory.mktemp("full") / "trace"
    return trace_prompts(model, _prompts(), out, SETTINGS, progress=False)


@pytest.fixture(scope="module")
def lean(model: LoopLM, tmp_path_factory: pytest.TempPathFactory) -> TraceStore:
    out = tmp_path_factory.mktemp("lean") / "trace"
    settings = TraceSettings(**{**SETTINGS.__dict__, "capture": "summary"})
    return trace_prompts(model, _prompts(), out, settings, progress=False)


def test_lean_trace_says_which_capture_each_measurement_needs(lean: TraceStore) -> None:
    analysis = run_measurements(lean)
    metrics = analysis.metrics
    assert metrics["capture"] == "summary"
    missing = metrics["not_measured"]
    for name in ("degeneracy", "trajectory", "limiting_behaviour"):
        assert missing[name] == NEEDS_STATES
    assert missing["attention_stabilisation"] == (
        "needs stored attention maps: trace with --capture full, without --no-attention"
    )
    # measured from the online reductions instead of stored states
    assert "successive_difference" not in missing and "fixed_point" not in missing
    assert len(metrics["successive_difference"]["relative"]) == RECURRENCES - 1
    assert len(metrics["fixed_point"]["relative"]) == RECURRENCES
    assert metrics["stability"]["prompts"] == 1
    assert metrics["logit_lens"]["tokens"] == 5 + 6
    sections = {s.title: s for s in analysis.sections}
    assert sections["Cycles and degeneracy"].text == f"Not measured: {NEEDS_STATES}."
    assert not sections["Cycles and degeneracy"].figures
    assert sections["Successive differences"].figures
    columns = analysis.verdict.columns
    row = dict(zip(columns, analysis.verdict.rows[0]))
    assert row["fixed point"] == "— (needs stored states)"
    assert row["attention stabilised"] == "— (needs stored attention maps)"
    assert row["converged"].startswith(("yes", "no"))
    assert f"fixed point {NEEDS_STATES}" in analysis.verdict.note


def test_states_for_some_recurrences_only_fall_back_to_online_reductions(
    model: LoopLM, tmp_path: Path
) -> None:
    kept = TraceSettings(**{**SETTINGS.__dict__, "keep_recurrences": [0, 5, 11]})
    store = trace_prompts(model, _prompts(), tmp_path / "kept", kept, progress=False)
    metrics = run_measurements(store).metrics
    assert metrics["not_measured"]["limiting_behaviour"] == NEEDS_STATES
    assert len(metrics["successive_difference"]["relative"]) == RECURRENCES - 1
    assert "attention_stabilisation" not in metrics["not_measured"]  # attention was kept
    # a full capture has no online distances to the fixed point, and its states are partial
    assert metrics["not_measured"]["fixed_point"] == (
        "needs stored states: trace with --capture full, keeping every recurrence; or online "
        "distances to the fixed point: trace with --capture summary (its second pass measures "
        "them)"
    )


def test_logit_lens_on_hand_built_predictions() -> None:
    top1 = np.array(
        [
            [5, 1, 7, 2],
            [5, 2, 7, 3],
            [5, 3, 8, 4],
            [5, 3, 7, -1],  # the last token's final read-out was not finite: left out
        ]
    )
    counts, tokens = agreement_counts(top1)
    assert tokens == 3
    np.testing.assert_array_equal(counts, [2, 2, 2, 3])
    np.testing.assert_array_equal(settled_from(top1), [0, 2, 3])
    steady = np.full((4, 2), 9)
    np.testing.assert_array_equal(settled_from(steady), [0, 0])
    assert agreement_counts(steady) == (pytest.approx([2, 2, 2, 2]), 2)


def test_logit_lens_probe_records_the_engines_own_read_outs(model: LoopLM) -> None:
    ids = torch.tensor([_prompts()[1].ids])
    probe = LogitLensProbe(model)
    with torch.no_grad():
        out = model(ids, recurrences=RECURRENCES, probes=[probe], exit_every_recurrence=True)
    expected = torch.stack([logits[0].argmax(-1) for logits in out.recurrence_logits])
    np.testing.assert_array_equal(probe.result(), expected.numpy())
    np.testing.assert_array_equal(probe.result()[-1], out.logits[0].argmax(-1).numpy())


def test_logit_lens_in_the_report_pools_every_token(
    model: LoopLM, full: TraceStore, tmp_path: Path
) -> None:
    agree = np.zeros(RECURRENCES)
    tokens = 0
    for prompt in _prompts():
        ids = torch.tensor([prompt.ids])
        with torch.no_grad():
            out = model(ids, recurrences=RECURRENCES, exit_every_recurrence=True, return_attn=True)
        top1 = torch.stack([logits[0].argmax(-1) for logits in out.recurrence_logits]).numpy()
        agree += (top1 == top1[-1]).sum(axis=1)
        tokens += top1.shape[1]
    paths = report(full.path, tmp_path / "report")
    lens = json.loads(paths.metrics_json.read_text())["dynamics"]["logit_lens"]
    assert lens["tokens"] == tokens
    pooled = rounding_tolerance(np.float64, 1.0, tokens)  # at most a sum over the tokens
    np.testing.assert_allclose(lens["agreement"], agree / tokens, rtol=0, atol=pooled)
    assert lens["agreement"][-1] == 1.0
    html = paths.html.read_text()
    assert "<h2>Logit lens</h2>" in html and 'id="fig-logit_lens"' in html
    assert (tmp_path / "report" / "figures" / "logit_lens.png").stat().st_size > 0


def _tokens_figure(total: int) -> MplFigure:
    fig = MplFigure(figsize=(3, 2))
    FigureCanvasAgg(fig)
    fig.add_subplot().bar(["tokens"], [total])
    return fig


DUMMY = Measurement(
    name="token_count",
    title="Token count (test)",
    sources=(
        Source(
            (Need("token ids", "always stored", lambda p: p.array("tokens") is not None),),
            lambda prompt, facts: int(np.asarray(prompt.array("tokens")).size),
        ),
    ),
    pool=lambda parts, facts, results: sum(parts),
    metrics=lambda total: {"token_count": total},
    text=lambda total, facts, results: f"{total} tokens over {facts.prompts} prompts.",
    figure=lambda total, facts, results: Figure(
        "token_count", "Tokens traced.", _tokens_figure(total)
    ),
    verdict=VerdictColumn(
        "tokens (test)", lambda total, layer: f"{total} at layer {layer}", lambda f: "dummy note"
    ),
)


@pytest.fixture
def dummy_registered() -> Iterator[Measurement]:
    MEASUREMENTS.register(DUMMY)
    try:
        yield DUMMY
    finally:
        MEASUREMENTS.unregister(DUMMY.name)


def test_a_registered_measurement_reaches_metrics_verdict_and_report(
    dummy_registered: Measurement, full: TraceStore, tmp_path: Path
) -> None:
    paths = report(full.path, tmp_path / "report")
    metrics = json.loads(paths.metrics_json.read_text())["dynamics"]
    assert metrics["token_count"] == 5 + 6
    assert list(metrics)[-1] == "token_count"  # after every built-in key
    html = paths.html.read_text()
    assert "<h2>Token count (test)</h2>" in html and "11 tokens over 2 prompts." in html
    assert ">tokens (test)</th>" in html and "11 at layer 1" in html and "dummy note" in html
    assert (tmp_path / "report" / "figures" / "token_count.png").is_file()


def test_a_measurement_it_cannot_feed_is_listed_with_its_need(
    full: TraceStore, tmp_path: Path
) -> None:
    never = Need("a file no trace has", "nothing records it", lambda p: False)
    missing = Measurement(
        name="impossible",
        title="Impossible (test)",
        sources=(Source((never,), lambda prompt, facts: None),),
        pool=lambda parts, facts, results: None,
        text=lambda r, facts, results: "never shown",
    )
    analysis = run_measurements(full, measurements=[*MEASUREMENTS, missing])
    assert analysis.metrics["not_measured"] == {
        "impossible": "needs a file no trace has: nothing records it"
    }
    section = analysis.sections[-1]
    assert section.title == "Impossible (test)"
    assert section.text == "Not measured: needs a file no trace has: nothing records it."


def test_registry_refuses_duplicates_and_unknown_dependencies() -> None:
    registry = Registry()
    registry.register(DUMMY)
    with pytest.raises(ValueError, match="registered already"):
        registry.register(DUMMY)
    dependent = Measurement(
        name="needs_other",
        title="x",
        sources=DUMMY.sources,
        pool=DUMMY.pool,
        uses=("not_there",),
    )
    with pytest.raises(ValueError, match="not registered before it"):
        registry.register(dependent)
    assert list(registry) == [DUMMY] and "token_count" in registry
    registry.unregister("token_count")
    assert len(registry) == 0
