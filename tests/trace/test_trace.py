"""The trace engine: online probes agree with offline analyses, the store resumes, bad input
gets clear errors, and a report comes out of a trace."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_TRACE_CONFIG, random_prompts
from tolerances import magnitude, rounding_tolerance

from loopscope.analysis import dynamics as dyn
from loopscope.data import DataFormatError
from loopscope.engine.cache import ActivationCache
from loopscope.engine.loop import ContextLengthError
from loopscope.engine.sites import Site
from loopscope.families.looplm import LoopLM
from loopscope.nn.layers import Edit
from loopscope.pipeline import prompt_inputs, report
from loopscope.trace.settings import PromptInput, TraceError, TraceSettings
from loopscope.trace.store import TraceStore
from loopscope.trace.writer import trace_prompts

TINY = TINY_TRACE_CONFIG
SETTINGS = TraceSettings(
    recurrences=12, stability_prompts=1, stability_iters=12, attention_recurrences=4
)


def _prompts(n: int = 3) -> list[PromptInput]:
    return random_prompts(n, seed=0)


@pytest.fixture(scope="module")
def model(tiny_trace_model: LoopLM) -> LoopLM:
    return tiny_trace_model


def _online_tolerances(block: np.ndarray) -> tuple[float, float]:
    """How far the trace's online measures may lie from the offline ones on its float32
    states: a distance is a difference of states of size |X| and a norm over the T·d entries
    of a layer; a per-token cosine is a dot product and two norms over d entries."""
    t, d = block.shape[-2:]
    norm = rounding_tolerance(torch.float32, magnitude(block), t * d + 1)
    return norm, rounding_tolerance(torch.float32, 1.0, 3 * d)


def test_full_trace_shapes_and_online_probes_match_offline(model: LoopLM, tmp_path: Path) -> None:
    store = trace_prompts(model, _prompts(), tmp_path / "t", SETTINGS, progress=False)
    assert store.completed() == [0, 1, 2]
    prompt = store.prompt(1)
    block = np.asarray(prompt.block)
    assert block.shape == (12, 2, 6, 16)
    assert np.asarray(prompt.array("prelude")).shape == (1, 6, 16)
    attn = np.asarray(prompt.attn)
    assert attn.shape == (5, 2, 2, 6, 6)  # first 4 recurrences + the last
    rows = rounding_tolerance(torch.float32, 1.0, attn.shape[-1])  # a sum of T probabilities
    np.testing.assert_allclose(attn.sum(-1), 1.0, atol=rows, rtol=0)
    offline = dyn.successive_differences(block)
    summary = prompt.summary
    norm, cosine = _online_tolerances(block)
    np.testing.assert_allclose(summary["step_norm"][1:], offline.norm, atol=norm, rtol=0)
    np.testing.assert_allclose(summary["step_cosine"][1:], offline.cosine, atol=cosine, rtol=0)
    stability = store.prompt(0).stability
    assert stability is not None and len(stability["layers"]) == 2
    assert prompt.stability is None  # only the first stability_prompts prompts


def test_summary_mode_measures_fixed_point_distance_in_a_second_pass(
    model: LoopLM, tmp_path: Path
) -> None:
    full = trace_prompts(model, _prompts(1), tmp_path / "full", SETTINGS, progress=False)
    summary_settings = TraceSettings(**{**SETTINGS.__dict__, "capture": "summary"})
    lean = trace_prompts(model, _prompts(1), tmp_path / "lean", summary_settings, progress=False)
    assert lean.prompt(0).block is None
    block = np.asarray(full.prompt(0).block)
    offline = dyn.fixed_point_distances(block)
    online = lean.prompt(0).summary
    norm, cosine = _online_tolerances(block)
    np.testing.assert_allclose(online["ref_distance"], offline.distance, atol=norm, rtol=0)
    np.testing.assert_allclose(online["ref_cosine"], offline.cosine, atol=cosine, rtol=0)


def test_nan_mid_run_marks_tokens_divergent_and_run_goes_on(model: LoopLM, tmp_path: Path) -> None:
    def poison(site: Site) -> Edit | None:
        if site.stage == "block" and site.layer == 1 and site.recurrence == 5:

            def edit(component: str, out: torch.Tensor) -> torch.Tensor:
                if component != "mlp":
                    return out
                out = out.clone()
                out[:, -1] = float("nan")
                return out

            return edit
        return None

    settings = TraceSettings(**{**SETTINGS.__dict__, "stability_prompts": 0})
    store = trace_prompts(
        model, _prompts(2), tmp_path / "nan", settings, progress=False, edit_plan=poison
    )
    divergent = store.prompt(0).summary["divergent"]
    assert divergent[-1] and not divergent[0]
    paths = report(store.path, tmp_path / "nan-report")
    metrics = json.loads(paths.metrics_json.read_text())
    assert metrics["dynamics"]["divergent_tokens"] >= 2
    rates = metrics["dynamics"]["limiting_behaviour"]["last_layer"]["token_rates"]
    assert rates["divergent"] > 0


def test_interrupted_trace_resumes_without_losing_or_redoing_work(
    model: LoopLM, tmp_path: Path
) -> None:
    out = tmp_path / "resume"
    trace_prompts(model, _prompts(), out, SETTINGS, progress=False, stop_after=1)
    first = out / "prompt_00000" / "block.npy"
    stamp = first.stat().st_mtime_ns
    (out / "prompt_00001.partial").mkdir()  # a chunk killed mid-write
    store = trace_prompts(model, _prompts(), out, SETTINGS, progress=False)
    assert store.completed() == [0, 1, 2]
    assert first.stat().st_mtime_ns == stamp
    assert not (out / "prompt_00001.partial").exists()
    fresh = trace_prompts(model, _prompts(), tmp_path / "fresh", SETTINGS, progress=False)
    for i in range(3):
        np.testing.assert_array_equal(
            np.asarray(store.prompt(i).block), np.asarray(fresh.prompt(i).block)
        )


def test_bad_inputs_get_clear_errors(model: LoopLM, tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="prompt file is empty"):
        trace_prompts(model, [], tmp_path / "a", SETTINGS, progress=False)
    too_long = [PromptInput("long", list(range(30)))]
    with pytest.raises(ContextLengthError, match="prompt 0 has 30 tokens"):
        trace_prompts(model, too_long, tmp_path / "b", SETTINGS, progress=False)
    bad_layer = TraceSettings(**{**SETTINGS.__dict__, "layers": [5]})
    with pytest.raises(TraceError, match="unknown block layer index"):
        trace_prompts(model, _prompts(1), tmp_path / "c", bad_layer, progress=False)
    trace_prompts(model, _prompts(1), tmp_path / "d", SETTINGS, progress=False)
    other = LoopLM(TINY.with_(init_seed=7))
    with pytest.raises(TraceError, match="different model"):
        trace_prompts(other, _prompts(1), tmp_path / "d", SETTINGS, progress=False)
    with pytest.raises(TraceError, match="traced with another model"):
        TraceStore(tmp_path / "d").check_model(other)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataFormatError, match="empty"):
        prompt_inputs(empty)
    with pytest.raises(TraceError, match="not a loopscope trace"):
        TraceStore(tmp_path)


def test_positions_layers_and_recurrences_selection(model: LoopLM, tmp_path: Path) -> None:
    settings = TraceSettings(**{**SETTINGS.__dict__, "positions": "last", "layers": [1]})
    store = trace_prompts(model, _prompts(1), tmp_path / "sel", settings, progress=False)
    assert np.asarray(store.prompt(0).block).shape == (12, 1, 1, 16)
    every = trace_prompts(model, _prompts(1), tmp_path / "all", SETTINGS, progress=False)
    kept = TraceSettings(**{**SETTINGS.__dict__, "keep_recurrences": [0, 5, 11]})
    some = trace_prompts(model, _prompts(1), tmp_path / "some", kept, progress=False)
    np.testing.assert_array_equal(
        np.asarray(some.prompt(0).block), np.asarray(every.prompt(0).block)[[0, 5, 11]]
    )
    metrics = json.loads(report(some.path, tmp_path / "some-report").metrics_json.read_text())
    assert len(metrics["dynamics"]["successive_difference"]["relative"]) == 11  # online: all
    with pytest.raises(TraceError, match="outside 0..11"):
        bad = TraceSettings(**{**SETTINGS.__dict__, "keep_recurrences": [12]})
        trace_prompts(model, _prompts(1), tmp_path / "bad", bad, progress=False)


def test_report_from_trace_has_verdict_rows_and_metrics(model: LoopLM, tmp_path: Path) -> None:
    store = trace_prompts(model, _prompts(2), tmp_path / "r", SETTINGS, progress=False)
    paths = report(store.path, tmp_path / "report")
    html = paths.html.read_text()
    assert 'id="verdict"' in html
    assert "block layer 0" in html and "block layer 1" in html and "whole block" in html
    metrics = json.loads(paths.metrics_json.read_text())
    dyn_metrics = metrics["dynamics"]
    assert len(dyn_metrics["fixed_point"]["relative"]) == 12
    assert set(dyn_metrics["limiting_behaviour"]["last_layer"]["token_rates"]) >= {
        "fixed_point",
        "orbit",
        "slider",
        "unknown",
    }
    assert dyn_metrics["stability"]["prompts"] == 1
    bound = dyn_metrics["attention_bound"]
    assert set(bound) == {"block.0", "block.1"}
    for layer in bound.values():
        assert layer["steps_checked"] == 3 and layer["kappa"] > 0 and layer["bound_B"] > 0
        # RoPE makes κ of the un-rotated product only approximate, yet far from violated here
        assert layer["holds"] is True and layer["tightness_max"] < 0.5
    assert "Proposition 4.2" in html
    shutil.rmtree(tmp_path / "report")


def test_anderson_reference_is_a_fixed_point_of_the_block(tmp_path: Path) -> None:
    contractive = LoopLM(TINY.with_(norm_scheme="pre")).eval()
    settings = TraceSettings(
        **{
            **SETTINGS.__dict__,
            "fixed_point": "anderson",
            "stability_prompts": 0,
            "capture": "summary",
        }
    )
    store = trace_prompts(contractive, _prompts(1), tmp_path / "aa", settings, progress=False)
    chunk = store.prompt(0)
    info = json.loads((chunk.path / "fixed_point.json").read_text())
    assert info["converged"] and info["relative_residual"] <= 1e-5
    reference = np.asarray(chunk.array("fixed_point"))
    assert reference.shape == (2, 5, 16)
    ids = torch.tensor([_prompts(1)[0].ids])
    with torch.no_grad():
        long_run = _last_recurrence_states(contractive, ids, 400)
    # a convergence tolerance, not a rounding one: the solve stops at relative residual 1e-5
    np.testing.assert_allclose(reference, long_run, rtol=1e-3, atol=1e-4)
    relative = chunk.summary["ref_relative"]
    assert relative[-1].max() < relative[0].max()


def _last_recurrence_states(model: LoopLM, ids: torch.Tensor, recurrences: int) -> np.ndarray:
    """Every block layer's state at the last of ``recurrences`` plain recurrences."""
    last = ActivationCache(lambda s: s.stage == "block" and s.recurrence == recurrences - 1)
    model(ids, recurrences=recurrences, probes=[last])
    return last.stage("block")[0, :, 0].numpy()  # (layers, tokens, d) of the one prompt


def test_lean_trace_still_gets_a_report(model: LoopLM, tmp_path: Path) -> None:
    lean_settings = TraceSettings(**{**SETTINGS.__dict__, "capture": "summary"})
    store = trace_prompts(model, _prompts(2), tmp_path / "lean", lean_settings, progress=False)
    paths = report(store.path, tmp_path / "lean-report")
    metrics = json.loads(paths.metrics_json.read_text())["dynamics"]
    assert metrics["capture"] == "summary"
    assert len(metrics["fixed_point"]["relative"]) == 12
    assert len(metrics["successive_difference"]["relative"]) == 11
    html = paths.html.read_text()
    assert "block layer 1" in html and "needs stored states" in html
