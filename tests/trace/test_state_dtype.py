"""How captured states are stored (``state_dtype``), and what ``trace.json`` records of the
device and dtype a trace ran in."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_TRACE_CONFIG, random_prompts

from loopscope.families.looplm import LoopLM
from loopscope.trace.settings import TraceError, TraceSettings
from loopscope.trace.store import TraceStore, read_states, stored_states
from loopscope.trace.writer import trace_prompts

FULL = TraceSettings(recurrences=4, capture="full", stability_prompts=0)


def _with(state_dtype: str) -> TraceSettings:
    return TraceSettings(**{**FULL.__dict__, "state_dtype": state_dtype})


def test_bfloat16_bits_round_to_nearest_even() -> None:
    values = np.asarray([1.0, 1 + 2**-8, 1 + 3 * 2**-8, -2.5, np.inf, 3e38], np.float32)
    bits = stored_states(values, "bfloat16")
    assert bits.dtype == np.uint16
    assert bits[:3].tolist() == [0x3F80, 0x3F80, 0x3F82]  # ties go to the even mantissa
    reference = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy()
    assert bits.tolist() == reference.astype(np.uint16).tolist()  # torch rounds the same
    back = read_states(bits)
    assert back.dtype == np.float32 and back[3] == -2.5 and np.isposinf(back[4])
    assert np.isnan(read_states(stored_states(np.asarray([np.nan], np.float32), "bfloat16")))


def test_half_precision_states_read_back_as_float32() -> None:
    values = np.asarray([0.1, -3.0, 65504.0], np.float32)
    stored = stored_states(values, "float16")
    assert stored.dtype == np.float16
    np.testing.assert_array_equal(read_states(stored), values.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(read_states(stored_states(values, "float32")), values)
    assert stored_states(values, "float32").dtype == np.float32


@pytest.mark.parametrize(
    ("state_dtype", "on_disk", "rounding"),
    [("float16", np.float16, torch.float16), ("bfloat16", np.uint16, torch.bfloat16)],
)
def test_a_trace_stores_states_in_the_chosen_dtype(
    tiny_trace_model: LoopLM,
    tmp_path: Path,
    state_dtype: str,
    on_disk: type,
    rounding: torch.dtype,
) -> None:
    prompts = random_prompts(2, seed=4)
    exact = trace_prompts(tiny_trace_model, prompts, tmp_path / "fp32", _with("float32"))
    narrow = trace_prompts(tiny_trace_model, prompts, tmp_path / "n", _with(state_dtype))
    assert np.load(narrow.prompt(0).path / "block.npy", mmap_mode="r").dtype == on_disk
    assert np.load(narrow.prompt(0).path / "attn.npy", mmap_mode="r").dtype == on_disk
    for i in range(2):
        for name in ("block", "prelude", "coda", "attn"):
            got = narrow.prompt(i).array(name)
            want = exact.prompt(i).array(name)
            assert got is not None and want is not None and got.dtype == np.float32
            rounded = torch.from_numpy(np.array(want)).to(rounding).float().numpy()
            np.testing.assert_array_equal(got, rounded)
    assert narrow.settings["state_dtype"] == state_dtype  # recorded in trace.json


def test_auto_state_dtype_is_recorded_concretely(tiny_trace_model: LoopLM, tmp_path: Path) -> None:
    store = trace_prompts(tiny_trace_model, random_prompts(1, seed=5), tmp_path, _with("auto"))
    assert store.settings["state_dtype"] == "float32"
    with pytest.raises(TraceError, match="state_dtype must be one of"):
        trace_prompts(tiny_trace_model, random_prompts(1, seed=5), tmp_path / "x", _with("int8"))


def test_the_header_records_device_and_dtype_and_dtype_decides_resuming(
    tiny_trace_model: LoopLM, tmp_path: Path
) -> None:
    prompts = random_prompts(2, seed=6)
    summary = TraceSettings(recurrences=3, capture="summary", stability_prompts=0)
    trace_prompts(tiny_trace_model, prompts, tmp_path, summary, stop_after=1, progress=False)
    header = json.loads((tmp_path / "trace.json").read_text())
    assert header["runtime"] == {"device": "cpu", "dtype": "float32"}
    assert header["model"]["dtype"] == "float32"
    half = LoopLM(TINY_TRACE_CONFIG).to(torch.bfloat16)
    with pytest.raises(TraceError, match="different model"):
        trace_prompts(half, prompts, tmp_path, summary, progress=False)
    done = trace_prompts(tiny_trace_model, prompts, tmp_path, summary, progress=False)
    assert len(TraceStore(done.path)) == 2  # same dtype: resumed
