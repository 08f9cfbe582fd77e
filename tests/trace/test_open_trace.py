"""``loopscope.open_trace``: a ``.npy`` trace as labelled xarray datasets whose labels and
values are those of the chunks on disk."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import random_prompts

from loopscope.families.looplm import LoopLM
from loopscope.pipeline import open_trace
from loopscope.trace.settings import TraceError, TraceSettings
from loopscope.trace.store import TraceStore
from loopscope.trace.writer import trace_prompts

SETTINGS = TraceSettings(recurrences=10, stability_prompts=1, stability_iters=8)


@pytest.fixture(scope="module")
def traced(tiny_trace_model: LoopLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("open") / "trace"
    trace_prompts(tiny_trace_model, random_prompts(3, seed=1), out, SETTINGS, progress=False)
    return out


def test_states_carry_the_chunks_values_under_named_dimensions(traced: Path) -> None:
    trace = open_trace(traced)
    store = TraceStore(traced)
    assert trace.block.dims == ("prompt", "recurrence", "layer", "token", "hidden")
    assert trace.attn.dims == ("prompt", "attn_recurrence", "layer", "head", "query", "key")
    assert trace.block["recurrence"].values.tolist() == list(range(10))
    assert trace.states["length"].values.tolist() == [5, 6, 7]
    for index, prompt in enumerate(store):
        block = np.asarray(prompt.block)
        length = block.shape[2]
        row = trace.block.sel(prompt=index).values
        np.testing.assert_array_equal(row[:, :, :length], block)
        assert np.isnan(row[:, :, length:]).all()  # padding past the prompt's length
        np.testing.assert_array_equal(trace.tokens.sel(prompt=index).values[:length], prompt.tokens)
        assert (trace.tokens.sel(prompt=index).values[length:] == -1).all()
        attn = np.asarray(prompt.attn)
        np.testing.assert_array_equal(
            trace.attn.sel(prompt=index).values[..., :length, :length], attn
        )
        np.testing.assert_array_equal(
            trace.summary["step_norm"].sel(prompt=index).values, prompt.summary["step_norm"]
        )
    assert trace.texts == store.texts
    assert trace.attrs["stages"][0] == store.prompt(0).stages
    assert trace.attrs["stability"][1] is None  # measured on the first prompt only
    assert trace.model == store.header["model"]


def test_selection_by_label_reads_the_stored_slice(traced: Path) -> None:
    trace = open_trace(traced)
    picked = trace.block.sel(layer=1, recurrence=slice(0, 8))
    assert picked.dims == ("prompt", "recurrence", "token", "hidden")
    assert picked["recurrence"].values.tolist() == list(range(9))  # label slices include 8
    first = np.asarray(TraceStore(traced).prompt(0).block)
    np.testing.assert_array_equal(picked.sel(prompt=0).values[:, :5], first[:9, 1])


def test_kept_subsets_label_the_recurrences_layers_and_positions_stored(
    tiny_trace_model: LoopLM, tmp_path: Path
) -> None:
    settings = TraceSettings(
        recurrences=6, keep_recurrences=[1, 4], layers=[1], positions="last", stability_prompts=0
    )
    trace_prompts(tiny_trace_model, random_prompts(2, seed=2), tmp_path, settings, progress=False)
    block = open_trace(tmp_path).block
    assert block["recurrence"].values.tolist() == [1, 4]
    assert block["layer"].values.tolist() == [1]
    assert block["position"].values.tolist() == [[4], [5]]  # the last token of each prompt
    assert open_trace(tmp_path).attn["attn_recurrence"].values.tolist() == [1, 4]
    stored = np.asarray(TraceStore(tmp_path).prompt(1).block)
    np.testing.assert_array_equal(block.sel(prompt=1, recurrence=4, layer=1).values, stored[1, 0])


def test_a_summary_only_trace_refuses_states_by_name(
    tiny_trace_model: LoopLM, tmp_path: Path
) -> None:
    settings = TraceSettings(recurrences=4, capture="summary", stability_prompts=0)
    trace_prompts(tiny_trace_model, random_prompts(1, seed=3), tmp_path, settings, progress=False)
    trace = open_trace(tmp_path)
    assert trace.summary["state_norm"].dims == ("prompt", "recurrence", "layer")
    with pytest.raises(TraceError, match="capture full"):
        _ = trace.block


def test_a_directory_that_is_no_trace_gets_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="neither a loopscope trace"):
        open_trace(tmp_path)


def test_importing_loopscope_loads_no_xarray_zarr_or_pandas() -> None:
    code = (
        "import sys, loopscope\n"
        "print(','.join(m for m in ('xarray', 'zarr', 'pandas', 'fsspec') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
