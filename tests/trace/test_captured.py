"""States captured with nnsight from a loopscope model, laid out by ``trace/captured.py``,
equal loopscope's own trace and analyse to the same numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import random_prompts
from tolerances import magnitude, rounding_tolerance

from loopscope.analysis import dynamics as dyn
from loopscope.families.looplm import LoopLM
from loopscope.pipeline import open_trace
from loopscope.trace.captured import block_states, labelled_block
from loopscope.trace.settings import TraceError, TraceSettings
from loopscope.trace.writer import trace_prompts

nnsight = pytest.importorskip("nnsight")

RECURRENCES = 8


def _captured(model: LoopLM, ids: list[int]) -> np.ndarray:
    wrapped = nnsight.NNsight(model)
    with wrapped.trace(torch.tensor([ids]), recurrences=RECURRENCES) as tracer:
        outputs = list().save()
        for _ in tracer.iter[:RECURRENCES]:
            outputs.append([layer.output for layer in wrapped.block_stack])
    return block_states(outputs)


def test_nnsight_states_match_the_trace_and_its_analyses(
    tiny_trace_model: LoopLM, tmp_path: Path
) -> None:
    prompts = random_prompts(2, seed=6)
    settings = TraceSettings(recurrences=RECURRENCES, stability_prompts=0)
    trace_prompts(tiny_trace_model, prompts, tmp_path, settings, progress=False)
    traced = open_trace(tmp_path).block
    captured = labelled_block([_captured(tiny_trace_model, p.ids) for p in prompts])
    assert captured.dims == traced.dims
    assert captured["length"].values.tolist() == traced["length"].values.tolist()
    # the same forward pass, possibly through another attention kernel: equal to rounding of
    # the widest sum a state passes through (a d-wide matmul), at each layer of the run
    d = traced.sizes["hidden"]
    depth = RECURRENCES * 2 + 2
    atol = rounding_tolerance(torch.float32, magnitude(traced.values), d * depth)
    np.testing.assert_allclose(captured.values, traced.values, atol=atol, rtol=0)
    assert np.isnan(captured.values[0, :, :, 5:]).all()  # padding past the first prompt
    for index, prompt in enumerate(prompts):
        n = len(prompt.ids)
        states = traced.sel(prompt=index).values[:, :, :n]
        ours = dyn.successive_differences(states)
        theirs = dyn.successive_differences(captured.sel(prompt=index).values[:, :, :n])
        # both states of a difference may move by atol per entry: 2·atol·√(T·d) in its norm,
        # and a token's cosine by 2·atol·√d over its norm, besides the cosine's own rounding
        norm_tol = 2 * atol * np.sqrt(n * d)
        smallest = float(np.linalg.norm(states, axis=-1).min())
        cos_tol = 2 * atol * np.sqrt(d) / smallest + rounding_tolerance(torch.float32, 1.0, 3 * d)
        np.testing.assert_allclose(theirs.norm, ours.norm, atol=norm_tol, rtol=0)
        np.testing.assert_allclose(theirs.cosine, ours.cosine, atol=cos_tol, rtol=0)


def test_captured_outputs_of_the_wrong_shape_get_a_clear_error() -> None:
    with pytest.raises(TraceError, match="one output per block layer"):
        block_states([[np.zeros((1, 2, 3))], []])
    with pytest.raises(TraceError, match=r"\(batch, token, hidden\)"):
        block_states([[np.zeros((2, 3))]])
    states = block_states([[(np.ones((2, 3, 4)), None)]], row=1)
    assert states.shape == (1, 1, 3, 4)
