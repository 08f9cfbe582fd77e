"""A trace as a Zarr v3 store that any ``xarray`` reads, with or without loopscope.

Layout (see :mod:`loopscope.trace.labelled` for the variables, dimensions and padding)::

    STORE/zarr.json          root group: the *states* dataset and every attribute (the trace
                             header, the prompts' texts, per prompt stages and stability)
    STORE/block/, attn/, ... one array each, chunked one prompt per chunk, compressed
    STORE/summary/           group: the *summary* dataset (online reductions, token ids)

``xarray.open_zarr(STORE)`` opens the states and ``xarray.open_zarr(STORE, group="summary")``
the summaries, lazily. ``STORE`` is a local path or an fsspec URL (``memory://``, ``s3://``,
``gs://``, with the matching fsspec extra installed). A local store is written as
``.NAME.partial`` and renamed into place when complete (``core/atomic.py::publish_directory``),
so a visible store is whole; a store at a URL is written in place, one prompt chunk at a time,
and is complete once its root attributes are written. A conversion that stops (killed, a full
disk) resumes at the first prompt it had not written. A ``file://`` URL is written as its path.

Storage options (endpoint, credentials) go to fsspec as the ``storage_options`` dict every
function here, ``loopscope.pipeline.open_trace`` and ``xarray.open_zarr`` take; for an S3
server of one's own (MinIO, a local test server) with ``pip install 'loopscope[s3]'``::

    options = {"key": "...", "secret": "...", "endpoint_url": "http://127.0.0.1:9000"}
    convert_trace("trace", "s3://bucket/run.zarr", storage_options=options)
    xarray.open_zarr("s3://bucket/run.zarr", storage_options=options)

The CLI takes no such flag: s3fs reads the usual AWS environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``), which
``loopscope convert-trace TRACE s3://bucket/run.zarr`` and ``trace --zarr`` then use.
A sharded Ray trace writes one store at a URL directly: :mod:`loopscope.trace.zarr_shards`.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from loopscope.core.atomic import publish_directory, write_json, write_text, write_with
from loopscope.trace.settings import TraceError
from loopscope.trace.store import TraceStore, chunk_name

__all__ = [
    "SUMMARY_GROUP",
    "convert_trace",
    "is_url",
    "is_zarr_store",
    "open_zarr_datasets",
    "restore_trace",
    "store_location",
]

SUMMARY_GROUP = "summary"


def is_url(path: str | Path) -> bool:
    """True for an fsspec URL (``memory://x``, ``s3://bucket/x``), False for a local path."""
    return "://" in str(path)


def store_location(store: str | Path) -> str:
    """``store`` as it is written to: a ``file://`` URL as its local path (zarr's local store
    creates the folders it writes into, fsspec's local file system does not), anything else
    as it is."""
    text = str(store)
    return text.removeprefix("file://") if text.startswith("file://") else text


def is_zarr_store(path: str | Path, storage_options: dict[str, Any] | None = None) -> bool:
    """True when ``path`` holds a Zarr store (a ``zarr.json`` at its root)."""
    if not is_url(path):
        return (Path(path) / "zarr.json").is_file()
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(path), **(storage_options or {}))
    return bool(fs.exists(f"{root.rstrip('/')}/zarr.json"))


def _encoding(dataset: Any) -> dict[str, dict[str, Any]]:
    """One chunk per prompt: a reader of one prompt reads one chunk of each array."""
    return {
        name: {"chunks": tuple(1 if d == "prompt" else n for d, n in zip(var.dims, var.shape))}
        for name, var in dataset.variables.items()
        if "prompt" in var.dims
    }


def _zarr_target(store: str, options: dict[str, Any] | None) -> Any:
    """What ``zarr`` opens ``store`` through: the path itself, or an fsspec store for a URL."""
    import zarr

    if is_url(store):
        return zarr.storage.FsspecStore.from_url(store, storage_options=options)
    return store


#: The root attribute written last: a store without it is one a conversion has not finished.
_COMPLETE = "stages"


def _resume_point(target: Any, indices: list[int], header: dict[str, Any], token_size: int) -> int:
    """How many of ``indices`` a stopped conversion of the same trace already wrote into
    ``target`` (0: start afresh). A prompt counts once both groups hold it; an array that
    holds one more (the run stopped between the two) is cut back first."""
    import zarr

    try:
        root: Any = zarr.open_group(target, mode="r+", zarr_format=3)
        summary: Any = root[SUMMARY_GROUP]
    except (FileNotFoundError, KeyError, ValueError, zarr.errors.NodeNotFoundError):
        return 0
    same = {k: root.attrs.get(k) for k in header} == header and _COMPLETE not in root.attrs
    if not same or "tokens" not in summary or summary["tokens"].shape[1] != token_size:
        return 0
    done = min(int(root["prompt"].shape[0]), int(summary["prompt"].shape[0]))
    if [int(i) for i in root["prompt"][:done]] != indices[:done]:
        return 0
    for group in (root, summary):
        for _, array in group.arrays():
            names = getattr(array.metadata, "dimension_names", None) or ()
            if names[:1] == ("prompt",) and array.shape[0] > done:
                array.resize((done, *array.shape[1:]))
    return done


def _write(
    store: str, trace: TraceStore, options: dict[str, Any] | None, stop_after: int | None
) -> bool:
    """Append every finished prompt of ``trace`` to ``store``, one prompt per write, resuming
    a stopped conversion of the same trace; True once the store is complete. ``stop_after``
    ends after that many new prompts (what an interrupted conversion looks like, for tests)."""
    import zarr

    from loopscope.trace.labelled import padded_sizes, prompt_datasets, store_attrs

    indices = trace.completed()
    if not indices:
        raise TraceError(f"{trace.path} has no finished prompt to convert; trace it first")
    sizes = padded_sizes([trace.prompt(i) for i in indices])
    target = _zarr_target(store, options)
    done = _resume_point(target, indices, trace.header, sizes.tokens)
    todo = indices[done:] if stop_after is None else indices[done : done + max(0, stop_after)]
    common: dict[str, Any] = {"zarr_format": 3, "consolidated": False, "storage_options": options}
    for place, index in enumerate(todo, start=done):
        states, summary = prompt_datasets(trace.prompt(index), index, trace.settings, sizes)
        if place == 0:
            states.attrs.update(trace.header)  # identifies the trace to a resumed conversion
            states.to_zarr(store, mode="w", encoding=_encoding(states), **common)
            summary.to_zarr(
                store, group=SUMMARY_GROUP, mode="w", encoding=_encoding(summary), **common
            )
        else:
            states.to_zarr(store, append_dim="prompt", **common)
            summary.to_zarr(store, group=SUMMARY_GROUP, append_dim="prompt", **common)
    if done + len(todo) < len(indices):
        return False
    attrs = store_attrs(trace, indices)
    for group in (SUMMARY_GROUP, None):  # the root last: its attributes mark the store complete
        opened = zarr.open_group(target, path=group, mode="r+", zarr_format=3)
        opened.attrs.update(attrs)
    with warnings.catch_warnings():  # zarr warns that v3 does not standardise it yet
        warnings.simplefilter("ignore", category=UserWarning)
        # one read opens the store: what a plain ``xarray.open_zarr`` looks for first
        zarr.consolidate_metadata(target, zarr_format=3)
    return True


def _is_complete(store: str, options: dict[str, Any] | None) -> bool:
    import zarr

    try:
        root = zarr.open_group(_zarr_target(store, options), mode="r", zarr_format=3)
    except (FileNotFoundError, KeyError, ValueError, zarr.errors.NodeNotFoundError):
        return False
    return _COMPLETE in root.attrs


def convert_trace(
    source: str | Path,
    dest: str | Path,
    *,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    stop_after: int | None = None,
) -> str:
    """Write the ``.npy`` trace directory ``source`` as a Zarr v3 store at ``dest`` (a path or
    an fsspec URL); returns ``dest``. A finished ``dest`` is refused unless ``overwrite``; a
    conversion that stopped (killed, say) resumes at its first prompt not yet written. A local
    store is built as ``.NAME.partial`` next to ``dest`` and renamed into place when complete;
    at a URL the store is built in place and complete once its root attributes are written.
    ``stop_after`` ends after that many new prompts (for tests). A ``file://`` URL is
    written as its local path."""
    trace = TraceStore(source)
    dest = store_location(dest)
    if is_url(dest):
        if not overwrite and _is_complete(str(dest), storage_options):
            raise TraceError(f"{dest} already holds a Zarr store; pass overwrite=True to replace")
        if overwrite and is_zarr_store(dest, storage_options):
            import fsspec

            fs, root = fsspec.core.url_to_fs(str(dest), **(storage_options or {}))
            fs.rm(root, recursive=True)
        _write(str(dest), trace, storage_options, stop_after)
        return str(dest)
    target = Path(dest)
    if target.exists() and not overwrite:
        raise TraceError(f"{target} already exists; choose another output or remove it first")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{target.name}.partial"
    if overwrite and partial.exists():
        shutil.rmtree(partial)
    if _write(str(partial), trace, None, stop_after):
        if target.exists():
            shutil.rmtree(target)
        publish_directory(partial, target)
    return str(target)


def open_zarr_datasets(
    store: str | Path, storage_options: dict[str, Any] | None = None
) -> tuple[Any, Any]:
    """The *states* and *summary* datasets of a Zarr trace store, opened lazily."""
    import xarray as xr

    common: dict[str, Any] = {"consolidated": True, "storage_options": storage_options}
    states = xr.open_zarr(str(store), **common)
    summary = xr.open_zarr(str(store), group=SUMMARY_GROUP, **common)
    return states, summary


#: Attributes the labelled views add to the ``trace.json`` header (see ``store_attrs``).
_VIEW_ATTRS = ("prompts", "prompt_tokens", "stages", "stability", "fixed_point_solve")
#: Summary variables that are no ``summary.npz`` entry.
_NOT_IN_NPZ = ("tokens", "logit_lens")


def _save(path: Path, array: Any) -> None:
    import numpy as np

    def save(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array)

    write_with(path, save)


def _restore_chunk(chunk: Path, states: Any, summary: Any, place: int, attrs: dict) -> None:
    """One prompt's ``.npy`` chunk from row ``place`` of the datasets, padding cut away."""
    import numpy as np

    length = int(summary["length"][place])
    row = summary.isel(prompt=place)
    _save(chunk / "tokens.npy", np.asarray(row["tokens"].values[:length], dtype=np.int64))
    _save(chunk / "logit_lens.npy", row["logit_lens"].values[:, :length])
    arrays = {}
    for name in sorted(set(summary.data_vars) - set(_NOT_IN_NPZ)):
        values = row[name].values
        arrays[name] = values[:length].astype(bool) if name == "divergent" else values

    def save_npz(tmp: str) -> None:
        savez: Any = np.savez
        with open(tmp, "wb") as fh:
            savez(fh, **arrays)

    write_with(chunk / "summary.npz", save_npz)
    stored = int((states["position"].values[place] >= 0).sum()) if "position" in states else 0
    for name in ("block", "prelude", "coda", "attn", "fixed_point"):
        if name in states:
            values = states[name].isel(prompt=place).values
            cut = [slice(None)] * values.ndim
            for axis, dim in enumerate(states[name].dims[1:]):
                if dim in ("token", "query", "key"):
                    cut[axis] = slice(0, stored)
            _save(chunk / f"{name}.npy", np.ascontiguousarray(values[tuple(cut)]))
    if "block" in states and attrs["settings"].get("keep_recurrences") is not None:
        _save(chunk / "block_recurrences.npy", states["recurrence"].values)
    if "attn" in states:
        _save(chunk / "attn_recurrences.npy", states["attn_recurrence"].values)
    write_json(chunk / "stages.json", attrs["stages"][place])
    for name, record in (
        ("stability", attrs["stability"]),
        ("fixed_point", attrs["fixed_point_solve"]),
    ):
        if record[place] is not None:
            write_json(chunk / f"{name}.json", record[place])


def restore_trace(
    store: str | Path, out_dir: str | Path, *, storage_options: dict[str, Any] | None = None
) -> TraceStore:
    """The ``.npy`` trace directory of a Zarr trace store (every analysis then runs on it as
    on the trace it came from); ``out_dir`` must not exist yet."""
    import json

    target = Path(out_dir)
    if target.exists():
        raise TraceError(f"{target} already exists; choose another output or remove it first")
    if not _is_complete(str(store), storage_options):
        raise TraceError(
            f"{store} is no complete Zarr trace store; run `loopscope convert-trace` into it "
            "again to finish it"
        )
    states, summary = open_zarr_datasets(store, storage_options)
    attrs = dict(states.attrs)
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        header = {k: v for k, v in attrs.items() if k not in _VIEW_ATTRS}
        write_json(building / "trace.json", header)
        lines = [
            json.dumps({"text": text, "n_tokens": n}) + "\n"
            for text, n in zip(attrs["prompts"], attrs["prompt_tokens"])
        ]
        write_text(building / "prompts.jsonl", "".join(lines))
        for place, index in enumerate(summary["prompt"].values.tolist()):
            chunk = building / chunk_name(int(index))
            chunk.mkdir()
            _restore_chunk(chunk, states, summary, place, attrs)
        publish_directory(building, target)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return TraceStore(target)
