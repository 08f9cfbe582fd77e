"""A sharded Ray trace written as one Zarr store at a URL (two worker processes, no shared
trace directory) equals the store ``convert-trace`` makes of a one-process trace: at a
``file://`` URL, finishing a half-staged chunk a stopped run left, and on a local S3 server."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import xarray as xr

import loopscope
from loopscope.data import ByteTokenizer
from loopscope.trace.settings import PromptInput, TraceError, TraceSettings
from loopscope.trace.sharding import _prepare
from loopscope.trace.writer import trace_prompts
from loopscope.trace.zarr_shards import (
    STAGED_MARK,
    _stage_shard,
    _staged_header,
    staging_url,
    trace_distributed_zarr,
)
from loopscope.trace.zarr_store import convert_trace

SRC = Path(loopscope.__file__).resolve().parents[1]
SETTINGS = TraceSettings(
    recurrences=5, stability_prompts=1, stability_iters=5, attention_recurrences=2
)


def _prompts(n: int) -> list[PromptInput]:
    tokenizer = ByteTokenizer()
    texts = [f"Q: {i} + {3 * i + 1}? A:" + " ok" * (i % 3) for i in range(n)]
    return [PromptInput(text, tokenizer.encode(text, bos=True)) for text in texts]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    ray = pytest.importorskip("ray", reason="needs the ray extra: pip install 'loopscope[ray]'")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def single_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: one process, one thread (what every CPU worker uses), converted."""
    root = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trace_prompts(loopscope.load("demo"), _prompts(4), root / "trace", SETTINGS, progress=False)
    finally:
        torch.set_num_threads(threads)
    return Path(convert_trace(root / "trace", root / "trace.zarr"))


def _assert_same_store(store: str, reference: Path, options: dict[str, Any] | None) -> None:
    """Opened by plain ``xarray.open_zarr`` (consolidated metadata), both groups are equal to
    the reference in values, labels and attributes, chunked one prompt per chunk."""
    for group in (None, "summary"):
        ours = xr.open_zarr(store, group=group, storage_options=options)
        theirs = xr.open_zarr(str(reference), group=group)
        xr.testing.assert_identical(ours.load(), theirs.load())
        assert ours.attrs == theirs.attrs
        for name, variable in ours.data_vars.items():
            assert variable.encoding["chunks"] == theirs[name].encoding["chunks"], name


def test_two_ray_workers_write_one_store_equal_to_the_single_process_one(
    ray_cluster: Any, single_store: Path, tmp_path: Path
) -> None:
    url = f"file://{tmp_path}/sharded.zarr"
    # What a run stopped while uploading prompt 2 leaves: a chunk with no mark, half written.
    stale = Path(staging_url(url).removeprefix("file://")) / "prompt_00002"
    stale.mkdir(parents=True)
    (stale / "block.npy").write_bytes(b"\x93NUMPY truncated")
    assert not (stale / STAGED_MARK).exists()

    written = trace_distributed_zarr("demo", _prompts(4), url, SETTINGS, workers=2, shard_size=2)

    assert written == str(tmp_path / "sharded.zarr")  # a file:// URL is written as its path
    _assert_same_store(url, single_store, None)
    assert not stale.parent.exists()  # the staging folder is gone once the store is complete
    with pytest.raises(TraceError, match="already holds"):
        trace_distributed_zarr("demo", _prompts(4), url, SETTINGS, workers=2)


def test_a_rerun_keeps_the_chunks_a_stopped_run_staged(
    ray_cluster: Any, single_store: Path, tmp_path: Path
) -> None:
    """Stage prompts 0-1 here, as a run stopped after them would have; the rerun uses those
    chunks as staged (prompt 0's stages record, edited, comes through) and traces the rest."""
    store = tmp_path / "resumed.zarr"
    staging = staging_url(str(store))
    threads = torch.get_num_threads()
    try:
        header, kept = _prepare("demo", _prompts(4), SETTINGS, "byte", True, "cpu")
        _staged_header(staging, None, header)
        chosen = header["settings"]  # "auto" made concrete, as the driver hands it on
        concrete = replace(SETTINGS, capture=chosen["capture"], state_dtype=chosen["state_dtype"])
        items = [(0, kept[0]), (1, kept[1])]
        staged = _stage_shard("demo", "cpu", header["model"], staging, None, items, concrete)
    finally:
        torch.set_num_threads(threads)
    assert sorted(staged) == [0, 1]
    edited = {"edited": True}
    (Path(staging) / "prompt_00000" / "stages.json").write_text(json.dumps(edited))

    trace_distributed_zarr("demo", _prompts(4), str(store), SETTINGS, workers=2, shard_size=2)

    ours, theirs = xr.open_zarr(store), xr.open_zarr(single_store)
    assert ours.attrs["stages"][0] == edited  # prompt 0 was not traced again
    assert ours.attrs["stages"][1:] == theirs.attrs["stages"][1:]
    xr.testing.assert_equal(ours.load(), theirs.load())


def test_two_ray_workers_write_one_store_on_s3(
    ray_cluster: Any, single_store: Path, tmp_path: Path
) -> None:
    moto_server = pytest.importorskip("moto.server", reason="needs the dev extra moto[server]")
    s3fs = pytest.importorskip("s3fs", reason="needs the s3 extra: pip install 'loopscope[s3]'")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"key": "test", "secret": "test", "endpoint_url": f"http://{host}:{port}"}
        s3fs.S3FileSystem(**options).mkdir("sharded")
        url = "s3://sharded/run/trace.zarr"
        trace_distributed_zarr(
            "demo", _prompts(4), url, SETTINGS, storage_options=options, workers=2, shard_size=2
        )
        _assert_same_store(url, single_store, options)
        assert s3fs.S3FileSystem(**options).ls("sharded/run", detail=False) == [
            "sharded/run/trace.zarr"
        ]
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
