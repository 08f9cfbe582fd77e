"""A sharded Ray trace written as one Zarr store at a URL, by workers that share no disk.

:func:`trace_distributed_zarr` is :func:`loopscope.trace.sharding.trace_distributed` with a
Zarr store (``s3://``, ``gs://``, ``file://``, any fsspec URL, or a local path) in place of
the ``.npy`` trace directory, so workers on different machines need only reach that URL. It
runs in three steps:

1. *stage*: each Ray task traces its shard's prompts, one at a time, into a scratch folder of
   its own machine and uploads each finished chunk next to the store, under
   ``PARENT/.NAME.staging/prompt_NNNNN/``; the chunk's mark (``staged.json``, which also holds
   its padded sizes) goes up last, so a chunk without one is unfinished and is traced again;
2. *write*: once every prompt is staged, the driver lays out the store (every array sized for
   all prompts, padded to the longest: the layout of :mod:`loopscope.trace.labelled`), and each
   task writes its own prompts' rows into it. A prompt's row is one chunk (one object) of each
   array, so each is written whole, and no two tasks write the same object;
3. *merge*: the driver writes the attributes (the header, every prompt's text, stages and
   stability records), the root's last (they mark the store complete, as for
   ``convert-trace``), consolidates the metadata and removes the staging folder.

The result equals the store ``loopscope convert-trace`` makes of a one-process trace of the
same prompts. Rerunning after a crash re-traces only the prompts with no staged chunk. A task
a worker dies in is retried by Ray (``max_retries``), and skips what it had staged.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from loopscope.families.checkpoint import BUNDLED
from loopscope.trace.labelled import PaddedSizes, padded_sizes, prompt_datasets
from loopscope.trace.settings import PromptInput, TraceError, TraceSettings
from loopscope.trace.sharding import (
    _cluster_plan,
    _import_ray,
    _prepare,
    _unwrap,
    _worker_model,
    connect,
    default_shard_size,
    plan_shards,
)
from loopscope.trace.store import PromptTrace, chunk_name
from loopscope.trace.writer import trace_one
from loopscope.trace.zarr_store import (
    SUMMARY_GROUP,
    _encoding,
    _is_complete,
    _zarr_target,
    is_url,
    store_location,
)

__all__ = ["STAGED_MARK", "staging_url", "trace_distributed_zarr"]

#: Written last into a staged chunk: the chunk is whole; it holds the chunk's padded sizes.
STAGED_MARK = "staged.json"
_HEADER = "header.json"


def staging_url(store: str) -> str:
    """Where the chunks of ``store`` are staged: ``PARENT/.NAME.staging`` beside it."""
    parent, _, name = str(store).rstrip("/").rpartition("/")
    if not name or parent.endswith(":/"):
        raise TraceError(
            f"{store} names no folder inside its bucket or file system; give the store a "
            "path there (s3://bucket/traces/run.zarr)"
        )
    return f"{parent}/.{name}.staging"


def _fs(url: str, options: dict[str, Any] | None) -> tuple[Any, str]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **(options or {}))
    return fs, str(root).rstrip("/")


def _read_json(fs: Any, path: str) -> Any:
    with fs.open(path, "r") as fh:
        return json.load(fh)


def _write_json(fs: Any, path: str, data: Any) -> None:
    with fs.open(path, "w") as fh:
        json.dump(data, fh, sort_keys=True)


# -- worker side ---------------------------------------------------------------------------


def _upload_chunk(fs: Any, local: Path, remote: str, sizes: PaddedSizes) -> None:
    """Every file of the finished chunk ``local`` to ``remote``, the mark last."""
    fs.makedirs(remote, exist_ok=True)
    for file in sorted(local.iterdir()):
        fs.put_file(str(file), f"{remote}/{file.name}")
    _write_json(fs, f"{remote}/{STAGED_MARK}", {"stored": sizes.stored, "tokens": sizes.tokens})


def _stage_shard(
    source: str,
    device: str,
    fingerprint: dict[str, Any],
    staging: str,
    options: dict[str, Any] | None,
    items: list[tuple[int, PromptInput]],
    settings: TraceSettings,
) -> dict[int, tuple[int, int]]:
    """Ray task: trace and stage each prompt of one shard not staged yet; returns every
    prompt's padded sizes (stored, tokens), read from the marks of those staged before."""
    model, found = _worker_model(source, device)
    if found != fingerprint:
        raise TraceError(
            f"worker pid {os.getpid()} loaded another model from {source!r} than the trace "
            "header records; every worker must see the same checkpoint"
        )
    fs, root = _fs(staging, options)
    sizes: dict[int, tuple[int, int]] = {}
    for index, prompt in items:
        remote = f"{root}/{chunk_name(index)}"
        if fs.exists(f"{remote}/{STAGED_MARK}"):
            mark = _read_json(fs, f"{remote}/{STAGED_MARK}")
            sizes[index] = (int(mark["stored"]), int(mark["tokens"]))
            continue
        with tempfile.TemporaryDirectory(prefix="loopscope-stage-") as scratch:
            trace_one(model, prompt, Path(scratch), index, settings)
            local = Path(scratch) / chunk_name(index)
            own = padded_sizes([PromptTrace(local, prompt.text)])
            _upload_chunk(fs, local, remote, own)
        sizes[index] = (own.stored, own.tokens)
    return sizes


def _download_chunk(fs: Any, remote: str, local: Path) -> None:
    local.mkdir(parents=True)
    for path in fs.ls(remote, detail=False):
        name = str(path).rstrip("/").rpartition("/")[2]
        if name != STAGED_MARK:
            fs.get_file(path, str(local / name))


def _prompt_row(
    fs: Any, staging_root: str, index: int, text: str, settings: dict[str, Any], sizes: PaddedSizes
) -> tuple[Any, Any, dict[str, Any]]:
    """Prompt ``index``'s staged chunk as one-prompt *states* and *summary* datasets (padded
    to ``sizes``), and its per-prompt records (stages, stability, fixed-point solve)."""
    with tempfile.TemporaryDirectory(prefix="loopscope-row-") as scratch:
        local = Path(scratch) / chunk_name(index)
        _download_chunk(fs, f"{staging_root}/{chunk_name(index)}", local)
        prompt = PromptTrace(local, text)
        states, summary = prompt_datasets(prompt, index, settings, sizes)
        states, summary = states.load(), summary.load()
        solve = local / "fixed_point.json"
        records = {
            "stages": prompt.stages,
            "stability": prompt.stability,
            "fixed_point_solve": json.loads(solve.read_text()) if solve.is_file() else None,
        }
    return states, summary, records


def _prompt_variables(dataset: Any) -> Any:
    """The variables along ``prompt``: those a row write touches (the rest are the same for
    every prompt and were written with the layout)."""
    return dataset.drop_vars([n for n, v in dataset.variables.items() if "prompt" not in v.dims])


def _write_rows(
    store: str,
    staging: str,
    options: dict[str, Any] | None,
    rows: list[tuple[int, int, str]],
    settings: dict[str, Any],
    sizes: tuple[int, int],
) -> dict[int, dict[str, Any]]:
    """Ray task: write each (place, index, text) prompt's row into the laid-out store, one
    chunk per array; returns each prompt's records by index for the driver's merge."""
    fs, root = _fs(staging, options)
    padded = PaddedSizes(*sizes)
    common: dict[str, Any] = {"zarr_format": 3, "consolidated": False, "mode": "r+"}
    records: dict[int, dict[str, Any]] = {}
    for place, index, text in rows:
        states, summary, records[index] = _prompt_row(fs, root, index, text, settings, padded)
        region = {"prompt": slice(place, place + 1)}
        for group, dataset in ((None, states), (SUMMARY_GROUP, summary)):
            _prompt_variables(dataset).to_zarr(
                store, group=group, region=region, storage_options=options, **common
            )
    return records


# -- driver side ---------------------------------------------------------------------------


def _lay_out(
    store: str,
    staging: str,
    options: dict[str, Any] | None,
    first: tuple[int, str],
    count: int,
    settings: dict[str, Any],
    sizes: PaddedSizes,
) -> None:
    """Create the store (replacing an unfinished one) from the first prompt's row, every
    array along ``prompt`` then grown to ``count`` rows for the tasks to fill, but for the
    ``prompt`` labels themselves (0 … count-1, written here: a row write leaves an index
    coordinate alone)."""
    import zarr

    fs, root = _fs(staging, options)
    states, summary, _ = _prompt_row(fs, root, first[0], first[1], settings, sizes)
    common: dict[str, Any] = {"zarr_format": 3, "consolidated": False, "mode": "w"}
    states.to_zarr(store, encoding=_encoding(states), storage_options=options, **common)
    summary.to_zarr(
        store,
        group=SUMMARY_GROUP,
        encoding=_encoding(summary),
        storage_options=options,
        **common,
    )
    target = _zarr_target(store, options)
    for group in (None, SUMMARY_GROUP):
        opened: Any = zarr.open_group(target, path=group, mode="r+", zarr_format=3)
        for _, array in opened.arrays():
            names = getattr(array.metadata, "dimension_names", None) or ()
            if names[:1] == ("prompt",):
                array.resize((count, *array.shape[1:]))
        opened["prompt"][:] = np.arange(count, dtype=opened["prompt"].dtype)


def _merge(
    store: str,
    options: dict[str, Any] | None,
    header: dict[str, Any],
    prompts: Sequence[PromptInput],
    records: list[dict[str, Any]],
) -> None:
    """The attributes ``store_attrs`` gives a one-process trace, the root's last (they mark
    the store complete), then the consolidated metadata a plain ``xarray.open_zarr`` reads."""
    import zarr

    attrs = {
        **header,
        "prompts": [p.text for p in prompts],
        "prompt_tokens": [len(p.ids) for p in prompts],
        **{key: [r[key] for r in records] for key in ("stages", "stability", "fixed_point_solve")},
    }
    target = _zarr_target(store, options)
    for group in (SUMMARY_GROUP, None):
        zarr.open_group(target, path=group, mode="r+", zarr_format=3).attrs.update(attrs)
    with warnings.catch_warnings():  # zarr warns that v3 does not standardise it yet
        warnings.simplefilter("ignore", category=UserWarning)
        zarr.consolidate_metadata(target, zarr_format=3)


def _staged_header(
    staging: str, options: dict[str, Any] | None, header: dict[str, Any]
) -> dict[str, Any]:
    """The header of a staging folder a stopped run left (refused if it is another trace's),
    else ``header``, recorded there."""
    fs, root = _fs(staging, options)
    path = f"{root}/{_HEADER}"
    if not fs.exists(path):
        fs.makedirs(root, exist_ok=True)
        _write_json(fs, path, header)
        return header
    existing: dict[str, Any] = _read_json(fs, path)
    for key in ("format", "model", "settings", "prompts_sha256"):
        if existing.get(key) != header.get(key):
            raise TraceError(
                f"{staging} holds the staged chunks of another trace (its {key} differs); "
                "write to another URL, or delete that folder to start afresh"
            )
    return existing


def _run_tasks(
    ray: Any,
    task: Any,
    calls: list[tuple[str, tuple[Any, ...]]],
    concurrency: int,
    retries: int,
    done: Callable[[Any], None],
) -> None:
    """Run ``task`` on each (name, args), at most ``concurrency`` at once, handing each
    result to ``done``; the first failure is raised once every task has ended."""
    pending = list(calls)
    running: dict[Any, str] = {}
    failures: list[Exception] = []
    while pending or running:
        while pending and len(running) < concurrency:
            name, args = pending.pop(0)
            running[task.remote(*args)] = name
        ready, _ = ray.wait(list(running), num_returns=1)
        for ref in ready:
            name = running.pop(ref)
            try:
                done(ray.get(ref))
            except ray.exceptions.RayError as err:
                failures.append(_unwrap(ray, err, name, retries))
    if failures:
        raise failures[0]


def trace_distributed_zarr(
    source: str,
    prompts: Sequence[PromptInput],
    store: str,
    settings: TraceSettings,
    *,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    address: str | None = None,
    workers: int | None = None,
    shard_size: int | None = None,
    use_gpu: bool | None = None,
    max_retries: int = 3,
    tokenizer_name: str = "byte",
    bos: bool = True,
    long_prompts: str = "error",
) -> str:
    """Trace ``prompts`` through the model at ``source`` over Ray workers straight into one
    Zarr store at ``store`` (a path or an fsspec URL; ``storage_options`` go to fsspec on the
    driver and on every worker); returns where it went (a ``file://`` URL as its path). The
    other arguments are those of :func:`~loopscope.trace.sharding.trace_distributed`. A
    finished store is refused unless ``overwrite``; an unfinished one (a stopped run) is
    finished, re-tracing only what it had not staged."""
    if not isinstance(source, str):
        raise TraceError(
            "trace_distributed_zarr needs the model's source string ('demo', a checkpoint "
            "directory, …), which every worker loads itself; a model object is not shipped"
        )
    if str(store).startswith("memory://"):
        raise TraceError(
            f"{store}: a memory:// store lives in one process, out of the workers' reach; "
            "write to a path, a file:// URL or object storage (s3://, gs://)"
        )
    store = store_location(store)
    store = store if is_url(store) else str(Path(store).expanduser().resolve())
    if _is_complete(store, storage_options) and not overwrite:
        raise TraceError(f"{store} already holds a Zarr store; pass overwrite=True to replace")
    ray = _import_ray()
    local = Path(source).expanduser()
    if source not in BUNDLED and local.exists():
        source = str(local.resolve())
    started = connect(address, workers=workers)
    try:
        concurrency, device = _cluster_plan(ray, workers, use_gpu)
        options = {"num_cpus": 1, "num_gpus": 1 if device == "cuda" else 0}
        prepare = ray.remote(_prepare).options(max_retries=max_retries, **options)
        try:
            header, kept = ray.get(
                prepare.remote(
                    source, list(prompts), settings, tokenizer_name, bos, device, long_prompts
                )
            )
        except ray.exceptions.RayError as err:
            raise _unwrap(ray, err, f"loading {source!r} on a worker", max_retries) from None
        staging = staging_url(store)
        header = _staged_header(staging, storage_options, header)
        chosen = header["settings"]  # the worker made "auto" values concrete
        settings = replace(settings, capture=chosen["capture"], state_dtype=chosen["state_dtype"])
        size = shard_size or default_shard_size(len(kept), concurrency)
        shards = plan_shards(len(kept), set(), size)
        sizes: dict[int, tuple[int, int]] = {}
        stage = ray.remote(_stage_shard).options(max_retries=max_retries, **options)
        stage_calls = [
            (
                f"shard {s.name}",
                (source, device, header["model"], staging, storage_options,
                 [(i, kept[i]) for i in s.indices], settings),
            )
            for s in shards
        ]  # fmt: skip
        _run_tasks(ray, stage, stage_calls, concurrency, max_retries, sizes.update)
        padded = PaddedSizes(
            stored=max(s for s, _ in sizes.values()), tokens=max(t for _, t in sizes.values())
        )
        _lay_out(store, staging, storage_options, (0, kept[0].text), len(kept), chosen, padded)
        records: dict[int, dict[str, Any]] = {}
        write = ray.remote(_write_rows).options(max_retries=max_retries, num_cpus=1)
        write_calls = [
            (
                f"rows of shard {s.name}",
                (store, staging, storage_options, [(i, i, kept[i].text) for i in s.indices],
                 chosen, (padded.stored, padded.tokens)),
            )
            for s in shards
        ]  # fmt: skip
        _run_tasks(ray, write, write_calls, concurrency, max_retries, records.update)
        _merge(store, storage_options, header, kept, [records[i] for i in range(len(kept))])
        fs, root = _fs(staging, storage_options)
        fs.rm(root, recursive=True)
        return store
    finally:
        if started:
            ray.shutdown()
