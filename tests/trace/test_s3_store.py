"""A Zarr trace store on S3, against a real (local) S3 server: moto's, started on a free port
inside the test. Written through an ``s3://`` URL with the endpoint passed as fsspec/s3fs
storage options (or, for the CLI, the AWS environment variables), read back by plain
``xarray.open_zarr`` with the labels and numbers of the local trace. Skipped without the
``moto[server]`` and ``s3fs`` dev extras."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
from helpers import random_prompts

from loopscope.cli.main import main
from loopscope.families.looplm import LoopLM
from loopscope.pipeline import open_trace
from loopscope.report.frames import open_analysis
from loopscope.trace.settings import TraceSettings
from loopscope.trace.store import TraceStore
from loopscope.trace.writer import trace_prompts
from loopscope.trace.zarr_store import convert_trace, is_zarr_store

moto_server = pytest.importorskip("moto.server", reason="needs the dev extra moto[server]")
s3fs = pytest.importorskip("s3fs", reason="needs the s3 extra: pip install 'loopscope[s3]'")

SETTINGS = TraceSettings(recurrences=6, stability_prompts=1, stability_iters=6)
BUCKET = "loopscope-traces"


@pytest.fixture(scope="module")
def s3_options() -> Iterator[dict[str, Any]]:
    """A local S3 server with one empty bucket; yields the storage options that reach it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"key": "test", "secret": "test", "endpoint_url": f"http://{host}:{port}"}
        s3fs.S3FileSystem(**options).mkdir(BUCKET)
        yield options
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


@pytest.fixture(scope="module")
def traced(tiny_trace_model: LoopLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("s3") / "trace"
    trace_prompts(tiny_trace_model, random_prompts(3, seed=7), out, SETTINGS, progress=False)
    return out


def test_a_store_written_to_s3_reads_back_with_plain_xarray(
    traced: Path, s3_options: dict[str, Any]
) -> None:
    url = f"s3://{BUCKET}/plain/trace.zarr"
    assert not is_zarr_store(url, s3_options)
    assert convert_trace(traced, url, storage_options=s3_options) == url
    assert is_zarr_store(url, s3_options)
    states = xr.open_zarr(url, storage_options=s3_options)
    summary = xr.open_zarr(url, group="summary", storage_options=s3_options)
    local = open_trace(traced)
    assert states["block"].dims == ("prompt", "recurrence", "layer", "token", "hidden")
    assert states["recurrence"].values.tolist() == list(range(6))
    assert states["length"].values.tolist() == [5, 6, 7]
    assert states.attrs["prompts"] == TraceStore(traced).texts
    assert states.attrs["stages"] == [TraceStore(traced).prompt(i).stages for i in range(3)]
    xr.testing.assert_identical(states.load(), local.states)
    xr.testing.assert_identical(summary.load(), local.summary)
    np.testing.assert_array_equal(
        states["block"].sel(prompt=2).values, np.asarray(TraceStore(traced).prompt(2).block)
    )
    objects = s3fs.S3FileSystem(**s3_options).find(f"{BUCKET}/plain/trace.zarr/block")
    assert sum("/c/" in name for name in objects) == 3  # one chunk object per prompt


def test_the_cli_reaches_s3_through_the_aws_environment(
    traced: Path, s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No CLI flag carries storage options: s3fs (through botocore) reads the endpoint and
    the credentials from the usual AWS environment variables."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_options["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_options["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_options["secret"])
    s3fs.S3FileSystem.clear_instance_cache()
    url = f"s3://{BUCKET}/cli/trace.zarr"
    try:
        assert main(["convert-trace", str(traced), url]) == 0
        xr.testing.assert_identical(xr.open_zarr(url).load(), open_trace(traced).states)
        assert main(["convert-trace", str(traced), url]) == 2  # a finished store is kept
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_a_stopped_upload_resumes_and_analyses_to_the_local_numbers(
    traced: Path, s3_options: dict[str, Any]
) -> None:
    url = f"s3://{BUCKET}/resumed/trace.zarr"
    convert_trace(traced, url, storage_options=s3_options, stop_after=2)
    with pytest.raises(KeyError):
        _ = xr.open_zarr(url, consolidated=False, storage_options=s3_options).attrs["stages"]
    convert_trace(traced, url, storage_options=s3_options)
    xr.testing.assert_identical(
        open_trace(url, storage_options=s3_options).states.load(), open_trace(traced).states
    )
    remote = open_analysis(url, storage_options=s3_options)
    direct = open_analysis(traced)
    assert remote.verdict.rows == direct.verdict.rows
    assert remote.source == url
