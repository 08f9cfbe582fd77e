"""A trace's arrays as labelled ``xarray`` datasets: named dimensions, coordinates, attributes.

Prompts have different lengths, so every array is padded along its token axes to the longest
prompt: states with NaN, token ids and positions with -1, and the coordinate ``length``
(``prompt``) says how many entries of each row are real. Two datasets come out:

- *states* (the stored states, what ``capture="full"`` keeps): ``block`` (prompt, recurrence,
  layer, token, hidden), ``prelude`` (prompt, prelude_layer, token, hidden), ``coda``
  (prompt, coda_layer, token, hidden), ``attn`` (prompt, attn_recurrence, layer, head, query,
  key), ``fixed_point`` (prompt, layer, token, hidden), and the coordinates ``recurrence`` and
  ``layer`` (the ones kept), ``position`` (prompt, token: the prompt position each stored token
  is at) and ``length``;
- *summary* (the online reductions, over every recurrence and block layer): each ``summary.npz``
  entry (prompt, recurrence, layer), ``divergent`` (prompt, token), ``logit_lens`` (prompt,
  recurrence, token) and ``tokens`` (prompt, token: the token ids).

Attributes (JSON): the trace header (``format``, ``model`` fingerprint, ``settings``,
``tokenizer``, ...), ``prompts`` and ``prompt_tokens`` (every prompt's text and token count),
and per prompt stored ``stages``, ``stability`` and ``fixed_point_solve`` (None where not
measured). States are float32, what every measurement reads.
Importing this module loads ``xarray``: it is imported lazily, never by ``import loopscope``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from loopscope.trace.store import PromptTrace, TraceStore

__all__ = [
    "PaddedSizes",
    "STATE_DIMS",
    "padded_sizes",
    "prompt_datasets",
    "store_attrs",
    "trace_datasets",
]

#: The dimensions of each stored state array, after the leading ``prompt``.
STATE_DIMS: dict[str, tuple[str, ...]] = {
    "block": ("recurrence", "layer", "token", "hidden"),
    "prelude": ("prelude_layer", "token", "hidden"),
    "coda": ("coda_layer", "token", "hidden"),
    "attn": ("attn_recurrence", "layer", "head", "query", "key"),
    "fixed_point": ("layer", "token", "hidden"),
}
#: Axes padded to the longest prompt (every other axis has the same size in every prompt).
_TOKEN_AXES = ("token", "query", "key")


@dataclass(frozen=True)
class PaddedSizes:
    """The padded sizes of the token axes: ``stored`` states' token axis, ``tokens`` the
    prompt's own length (token ids, logit lens, divergent flags)."""

    stored: int
    tokens: int


def _rows(array: np.ndarray | None) -> int:
    """The stored token count of a state array (its second-to-last axis), 0 without one."""
    return 0 if array is None or array.ndim < 2 else int(array.shape[-2])


def padded_sizes(prompts: Sequence[PromptTrace]) -> PaddedSizes:
    """The longest stored token axis and the longest prompt over ``prompts`` (arrays are
    memory-mapped, so only their headers are read)."""
    stored = tokens = 0
    for prompt in prompts:
        tokens = max(tokens, len(prompt.tokens))
        for name in STATE_DIMS:
            stored = max(stored, _rows(prompt.array(name)))
    return PaddedSizes(stored=stored, tokens=tokens)


def _pad(array: np.ndarray, dims: Sequence[str], size: int, fill: float | int) -> np.ndarray:
    """``array`` padded with ``fill`` at the end of every token axis up to ``size``."""
    widths = [(0, size - array.shape[i] if d in _TOKEN_AXES else 0) for i, d in enumerate(dims)]
    if any(w for _, w in widths):
        return np.pad(array, widths, constant_values=fill)
    return array


def _positions(settings: dict[str, Any], length: int, stored: int) -> list[int]:
    """The prompt positions of the ``stored`` tokens of a prompt of ``length`` tokens."""
    kept = settings.get("positions", "all")
    if kept == "last":
        return [length - 1]
    if isinstance(kept, list):
        return [int(p) % length for p in kept]
    return list(range(min(length, stored) if stored else length))


def _kept(prompt: PromptTrace, name: str, default: Sequence[int]) -> list[int]:
    """Recurrence labels stored next to a state array (``block_recurrences.npy``, ...)."""
    labels = prompt.array(name)
    return list(default) if labels is None else [int(x) for x in np.asarray(labels)]


def _state_vars(prompt: PromptTrace, sizes: PaddedSizes) -> dict[str, Any]:
    variables: dict[str, Any] = {}
    for name, dims in STATE_DIMS.items():
        array = prompt.array(name)
        if array is None or array.ndim != len(dims):
            continue  # not captured (or an empty stage, a model without prelude)
        padded = _pad(np.asarray(array, dtype=np.float32), dims, sizes.stored, np.nan)
        variables[name] = (("prompt", *dims), padded[None])
    return variables


def _state_coords(
    prompt: PromptTrace, index: int, settings: dict[str, Any], sizes: PaddedSizes
) -> dict[str, Any]:
    block = prompt.array("block")
    length = len(prompt.tokens)
    coords: dict[str, Any] = {"prompt": [index], "length": ("prompt", [length])}
    layers = settings.get("layers")
    if block is not None and block.ndim == 4:
        coords["recurrence"] = _kept(prompt, "block_recurrences", range(block.shape[0]))
        coords["layer"] = list(layers) if layers is not None else list(range(block.shape[1]))
        positions = _positions(settings, length, _rows(block))
        padded = np.full(sizes.stored, -1, dtype=np.int64)
        padded[: len(positions)] = positions
        coords["position"] = (("prompt", "token"), padded[None])
    attn = prompt.array("attn")
    if attn is not None and attn.ndim == 5:
        labels = _kept(prompt, "attn_recurrences", range(attn.shape[0]))
        if len(labels) != attn.shape[0]:
            # with kept recurrences, attention is stored only at those among its recurrences
            kept = set(_kept(prompt, "block_recurrences", labels))
            labels = [r for r in labels if r in kept]
        coords["attn_recurrence"] = labels
    return {**_index_coords(prompt, sizes.stored), **coords}


def _index_coords(prompt: PromptTrace, stored: int) -> dict[str, list[int]]:
    """``0..n-1`` along every other dimension the prompt's state arrays have, so that any of
    them can be selected by label."""
    coords: dict[str, list[int]] = {}
    for name, dims in STATE_DIMS.items():
        array = prompt.array(name)
        if array is None or array.ndim != len(dims):
            continue
        for dim, size in zip(dims, array.shape):
            coords.setdefault(dim, list(range(stored if dim in _TOKEN_AXES else size)))
    return coords


def _summary_vars(prompt: PromptTrace, sizes: PaddedSizes) -> dict[str, Any]:
    variables: dict[str, Any] = {}
    arrays = dict(prompt.summary)
    lens = prompt.array("logit_lens")
    if lens is not None:
        arrays["logit_lens"] = np.asarray(lens)
    for name, array in sorted(arrays.items()):
        dims: tuple[str, ...] = {1: ("token",), 2: ("recurrence", "layer")}.get(array.ndim, ())
        if name == "logit_lens":
            dims = ("recurrence", "token")
        if not dims:
            continue
        fill: float | int = np.nan if array.dtype.kind == "f" else -1
        if array.dtype.kind == "b":
            array, fill = array.astype(np.int8), -1
        variables[name] = (("prompt", *dims), _pad(array, dims, sizes.tokens, fill)[None])
    tokens = _pad(np.asarray(prompt.tokens, dtype=np.int64), ("token",), sizes.tokens, -1)
    variables["tokens"] = (("prompt", "token"), tokens[None])
    return variables


def prompt_datasets(
    prompt: PromptTrace, index: int, settings: dict[str, Any], sizes: PaddedSizes
) -> tuple[xr.Dataset, xr.Dataset]:
    """Prompt ``index``'s chunk as one-prompt *states* and *summary* datasets, padded to
    ``sizes`` (so that prompts concatenate along ``prompt``)."""
    states = xr.Dataset(
        _state_vars(prompt, sizes), coords=_state_coords(prompt, index, settings, sizes)
    )
    length = len(prompt.tokens)
    coords: dict[str, Any] = {"prompt": [index], "length": ("prompt", [length])}
    summary = xr.Dataset(_summary_vars(prompt, sizes), coords=coords)
    summary = summary.assign_coords(
        {d: range(n) for d, n in summary.sizes.items() if d != "prompt"}
    )
    return states, summary


def _json_or_none(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def store_attrs(store: TraceStore, indices: Sequence[int]) -> dict[str, Any]:
    """The attributes every labelled trace carries: the header, every prompt's text and token
    count (``prompts[i]`` is prompt i's), and for each prompt stored, in ``prompt`` order, its
    stages, stability and fixed-point solve records (JSON, so any reader can use them)."""
    lines = (store.path / "prompts.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    chunks = [store.prompt(i) for i in indices]
    return {
        **store.header,
        "prompts": [r["text"] for r in records],
        "prompt_tokens": [r.get("n_tokens") for r in records],
        "stages": [p.stages for p in chunks],
        "stability": [p.stability for p in chunks],
        "fixed_point_solve": [_json_or_none(p.path / "fixed_point.json") for p in chunks],
    }


def trace_datasets(store: TraceStore) -> tuple[xr.Dataset, xr.Dataset]:
    """Every finished prompt of ``store`` as the *states* and *summary* datasets (read into
    memory: for traces larger than memory, convert to a Zarr store and open that lazily)."""
    indices = store.completed()
    prompts = [store.prompt(i) for i in indices]
    sizes = padded_sizes(prompts)
    pairs = [prompt_datasets(p, i, store.settings, sizes) for p, i in zip(prompts, indices)]
    attrs = store_attrs(store, indices)
    if not pairs:
        return xr.Dataset(attrs=attrs), xr.Dataset(attrs=attrs)
    states = xr.concat([s for s, _ in pairs], dim="prompt", data_vars="all")
    summary = xr.concat([s for _, s in pairs], dim="prompt", data_vars="all")
    states.attrs.update(attrs)
    summary.attrs.update(attrs)
    return states, summary
