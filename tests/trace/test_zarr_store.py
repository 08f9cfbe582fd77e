"""The Zarr v3 trace store: written by ``loopscope convert-trace``, read back by bare
``xarray.open_zarr`` (no loopscope on the path) with the labels and values of the ``.npy``
trace, at a local path or an fsspec URL, and analysed to the same numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from helpers import DEMO_PROMPTS, random_prompts

from loopscope.cli.main import main
from loopscope.families.looplm import LoopLM
from loopscope.pipeline import open_analysis, open_trace
from loopscope.report.html import to_jsonable
from loopscope.trace.labelled import padded_sizes, prompt_datasets
from loopscope.trace.settings import TraceError, TraceSettings
from loopscope.trace.store import TraceStore
from loopscope.trace.writer import trace_prompts
from loopscope.trace.zarr_store import convert_trace, is_zarr_store, restore_trace

SETTINGS = TraceSettings(recurrences=10, stability_prompts=1, stability_iters=8)


@pytest.fixture(scope="module")
def traced(tiny_trace_model: LoopLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("zarr") / "trace"
    trace_prompts(tiny_trace_model, random_prompts(3, seed=4), out, SETTINGS, progress=False)
    return out


#: Run in a fresh interpreter whose path holds no loopscope: what a colleague without it sees.
_BARE_READER = """
import json, sys
sys.path = [p for p in sys.path if 'loopscope' not in p and not p.endswith('/src')]
import importlib.util
assert importlib.util.find_spec('loopscope') is None, 'loopscope is importable'
import xarray as xr
states = xr.open_zarr(sys.argv[1])
summary = xr.open_zarr(sys.argv[1], group='summary')
block = states['block'].sel(layer=1, recurrence=slice(0, 8))
print(json.dumps({
    'dims': list(states['block'].dims),
    'attn_dims': list(states['attn'].dims),
    'recurrence': states['recurrence'].values.tolist(),
    'length': states['length'].values.tolist(),
    'block_p2': states['block'].sel(prompt=2).values.tolist(),
    'selected_shape': list(block.shape),
    'tokens': summary['tokens'].values.tolist(),
    'prompts': states.attrs['prompts'],
    'model': states.attrs['model'],
    'tokenizer': states.attrs['tokenizer'],
    'loopscope_loaded': any(m.startswith('loopscope') for m in sys.modules),
}))
"""


def _bare_read(store: Path) -> dict:
    env = {"PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"}
    out = subprocess.run(
        [sys.executable, "-S", "-c", _with_site(_BARE_READER), str(store)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return dict(json.loads(out.stdout))


def _with_site(code: str) -> str:
    """``code`` after adding the site-packages (xarray, zarr) but not the editable install
    of loopscope, whose path file ``-S`` keeps from being read."""
    import site

    packages = [p for p in site.getsitepackages() if "site-packages" in p]
    return f"import sys; sys.path.extend({packages!r})\n" + code


def test_bare_xarray_reads_the_labels_and_values_without_loopscope(
    traced: Path, tmp_path: Path
) -> None:
    store = tmp_path / "trace.zarr"
    assert main(["convert-trace", str(traced), str(store)]) == 0
    read = _bare_read(store)
    trace = TraceStore(traced)
    assert read["loopscope_loaded"] is False
    assert read["dims"] == ["prompt", "recurrence", "layer", "token", "hidden"]
    assert read["attn_dims"] == ["prompt", "attn_recurrence", "layer", "head", "query", "key"]
    assert read["recurrence"] == list(range(10))
    assert read["length"] == [5, 6, 7]
    assert read["selected_shape"] == [3, 9, 7, 16]
    np.testing.assert_array_equal(np.asarray(read["block_p2"]), np.asarray(trace.prompt(2).block))
    assert read["tokens"][0][:5] == trace.prompt(0).tokens.tolist()
    assert read["tokens"][0][5:] == [-1, -1]
    assert read["prompts"] == trace.texts
    assert read["model"] == trace.header["model"]
    assert read["tokenizer"] == trace.header["tokenizer"]


def test_the_store_opens_as_the_npy_trace_does(traced: Path, tmp_path: Path) -> None:
    convert_trace(traced, tmp_path / "t.zarr")
    from_npy = open_trace(traced)
    from_zarr = open_trace(tmp_path / "t.zarr")
    xr.testing.assert_identical(from_npy.states, from_zarr.states.load())
    xr.testing.assert_identical(from_npy.summary, from_zarr.summary.load())
    chunks = from_zarr.states["block"].encoding["chunks"]
    assert chunks[0] == 1  # one prompt per chunk


def test_memory_url_round_trip(traced: Path) -> None:
    url = "memory://loopscope-test/round-trip.zarr"
    assert not is_zarr_store(url)
    convert_trace(traced, url)
    assert is_zarr_store(url)
    opened = open_trace(url)
    np.testing.assert_array_equal(
        opened.block.sel(prompt=1, layer=0).values[:, :6],
        np.asarray(TraceStore(traced).prompt(1).block)[:, 0],
    )
    assert opened.attrs["stages"] == [TraceStore(traced).prompt(i).stages for i in range(3)]
    with pytest.raises(TraceError, match="already holds"):
        convert_trace(traced, url)
    convert_trace(traced, url, overwrite=True)


def test_an_existing_output_is_refused_and_a_url_without_store_is_named(
    traced: Path, tmp_path: Path
) -> None:
    (tmp_path / "taken").mkdir()
    assert main(["convert-trace", str(traced), str(tmp_path / "taken")]) == 2
    assert list((tmp_path / "taken").iterdir()) == []  # left as it was
    with pytest.raises(TraceError, match="no Zarr trace store"):
        open_trace("memory://loopscope-test/nothing-here")


def test_a_failed_conversion_leaves_no_store_behind(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "trace.json").write_text(json.dumps({"format": "loopscope-trace/1"}))
    (empty / "prompts.jsonl").write_text("")
    with pytest.raises(TraceError, match="no finished prompt"):
        convert_trace(empty, tmp_path / "out.zarr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no temporary left


def test_the_store_analyses_to_the_numbers_of_the_npy_trace(traced: Path, tmp_path: Path) -> None:
    url = "memory://loopscope-test/analysed.zarr"
    convert_trace(traced, url, overwrite=True)
    direct = open_analysis(traced)
    through_store = open_analysis(url)
    assert _jsonable(through_store.metrics) == _jsonable(direct.metrics)
    assert through_store.verdict.rows == direct.verdict.rows
    restored = restore_trace(url, tmp_path / "back")
    original = TraceStore(traced)
    assert restored.header == original.header and restored.texts == original.texts
    for before, after in zip(original, restored):
        np.testing.assert_array_equal(np.asarray(after.block), np.asarray(before.block))
        np.testing.assert_array_equal(after.tokens, before.tokens)
        assert after.summary.keys() == before.summary.keys()
        for name, values in before.summary.items():
            np.testing.assert_array_equal(after.summary[name], values)
            assert after.summary[name].dtype == values.dtype
        assert after.stages == before.stages and after.stability == before.stability
    files = sorted(p.relative_to(traced).as_posix() for p in traced.rglob("*"))
    assert (
        sorted(p.relative_to(restored.path).as_posix() for p in restored.path.rglob("*")) == files
    )


def test_convert_trace_turns_a_store_back_into_a_trace_directory(
    traced: Path, tmp_path: Path
) -> None:
    assert main(["convert-trace", str(traced), str(tmp_path / "s.zarr")]) == 0
    assert main(["convert-trace", str(tmp_path / "s.zarr"), str(tmp_path / "again")]) == 0
    assert TraceStore(tmp_path / "again").completed() == [0, 1, 2]
    assert main(["convert-trace", str(tmp_path / "s.zarr"), str(tmp_path / "again")]) == 2


def _jsonable(metrics: dict) -> str:
    return json.dumps(to_jsonable(metrics), sort_keys=True)


def test_trace_writes_the_store_too_when_asked(tmp_path: Path) -> None:
    url = "memory://loopscope-test/from-trace.zarr"
    argv = ["trace", "demo", "--prompts", str(DEMO_PROMPTS), "--recurrences", "3"]
    argv += ["--limit", "2", "--out", str(tmp_path / "t"), "--no-progress", "--zarr", url]
    assert main(argv) == 0
    opened = open_trace(url)
    assert opened.block.sizes["recurrence"] == 3 and len(opened) == 2
    np.testing.assert_array_equal(
        opened.tokens.sel(prompt=0).values[: int(opened.states["length"][0])],
        TraceStore(tmp_path / "t").prompt(0).tokens,
    )


def _stopped_between_groups(trace: Path, store: str, index: int) -> None:
    """What a conversion killed between its two writes of prompt ``index`` leaves: that
    prompt's states appended, its summaries not."""
    chunks = TraceStore(trace)
    sizes = padded_sizes(list(chunks))
    states, _ = prompt_datasets(chunks.prompt(index), index, chunks.settings, sizes)
    states.to_zarr(store, append_dim="prompt", zarr_format=3, consolidated=False)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_stopped_conversion_resumes_to_the_same_store(
    traced: Path, tmp_path: Path, where: str
) -> None:
    dest = str(tmp_path / "r.zarr") if where == "local" else "memory://loopscope-test/resumed"
    building = str(tmp_path / ".r.zarr.partial") if where == "local" else dest
    convert_trace(traced, dest, stop_after=1, overwrite=True)
    if where == "local":
        assert not (tmp_path / "r.zarr").exists()  # nothing visible until complete
    with pytest.raises(KeyError):
        _ = xr.open_zarr(building, consolidated=False).attrs["stages"]  # not complete yet
    _stopped_between_groups(traced, building, 1)
    with pytest.raises(TraceError, match="no complete Zarr trace store"):
        restore_trace(building, tmp_path / "too-early")
    assert xr.open_zarr(building, consolidated=False).sizes["prompt"] == 2
    convert_trace(traced, dest)
    resumed, fresh = open_trace(dest), open_trace(traced)
    xr.testing.assert_identical(resumed.states.load(), fresh.states)
    xr.testing.assert_identical(resumed.summary.load(), fresh.summary)
    if where == "local":
        assert not (tmp_path / ".r.zarr.partial").exists()
