"""``loopscope.pipeline.open_trace(path)``: a trace as labelled ``xarray`` objects, for notebooks.

The same object comes back for a ``.npy`` trace directory (read into memory) and a Zarr store
written by ``loopscope convert-trace`` (opened lazily, at a path or an fsspec URL), so that
``trace.block.sel(layer=2, recurrence=slice(0, 8))`` reads the same either way. The
dimensions, padding and attributes are those of :mod:`loopscope.trace.labelled`.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loopscope.trace.settings import TraceError

__all__ = ["OpenedTrace", "open_trace"]


@dataclass(frozen=True)
class OpenedTrace:
    """A trace's *states* and *summary* datasets; each array is a named ``DataArray``."""

    states: Any  # xarray.Dataset
    summary: Any  # xarray.Dataset
    source: str

    def _state(self, name: str) -> Any:
        if len(self) == 0:
            raise TraceError(f"{self.source} holds no finished prompt; run `loopscope trace`")
        if name not in self.states:
            raise TraceError(
                f"{self.source} stores no {name!r} states (traced with capture "
                f"{self.settings.get('capture')!r}); trace again with --capture full"
            )
        return self.states[name]

    @property
    def block(self) -> Any:
        """(prompt, recurrence, layer, token, hidden): the residual stream after each block
        layer, NaN past each prompt's ``length``."""
        return self._state("block")

    @property
    def prelude(self) -> Any:
        return self._state("prelude")

    @property
    def coda(self) -> Any:
        return self._state("coda")

    @property
    def attn(self) -> Any:
        """(prompt, attn_recurrence, layer, head, query, key) attention probabilities."""
        return self._state("attn")

    @property
    def tokens(self) -> Any:
        """(prompt, token) token ids, -1 past each prompt's length."""
        return self.summary["tokens"]

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.states.attrs)

    @property
    def texts(self) -> list[str]:
        return list(self.attrs.get("prompts", []))

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.attrs.get("settings", {}))

    @property
    def model(self) -> dict[str, Any]:
        """The model fingerprint: metadata, weight checksum, dtype."""
        return dict(self.attrs.get("model", {}))

    def __len__(self) -> int:
        return int(self.summary.sizes.get("prompt", 0))

    def _repr_html_(self) -> str:
        meta = self.model.get("meta", {})
        name = html.escape(str(meta.get("name") or meta.get("family") or "model"))
        head = f"<p><b>loopscope trace</b> of {name}: {len(self)} prompts, {self.source}</p>"
        return head + str(self.states._repr_html_())


def open_trace(path: str | Path, *, storage_options: dict[str, Any] | None = None) -> OpenedTrace:
    """Open a ``.npy`` trace directory or a Zarr trace store (a path or an fsspec URL;
    ``storage_options`` go to fsspec) as labelled ``xarray`` datasets."""
    from loopscope.trace.zarr_store import is_url, is_zarr_store, open_zarr_datasets

    if is_zarr_store(path, storage_options):
        states, summary = open_zarr_datasets(path, storage_options)
        return OpenedTrace(states, summary, str(path))
    if is_url(path):
        raise TraceError(
            f"{path} holds no Zarr trace store (no zarr.json); write one there with "
            "`loopscope convert-trace TRACE_DIR URL`"
        )
    if not (Path(path) / "trace.json").is_file():
        raise TraceError(
            f"{path} is neither a loopscope trace directory (no trace.json) nor a Zarr trace "
            "store (no zarr.json); pass the --out directory of `loopscope trace`"
        )
    from loopscope.trace.labelled import trace_datasets
    from loopscope.trace.store import TraceStore

    states, summary = trace_datasets(TraceStore(path))
    return OpenedTrace(states, summary, str(path))
