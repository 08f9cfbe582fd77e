"""A trace's analysis as notebook objects: ``pandas`` tables and an inline report.

``loopscope.pipeline.open_analysis(trace_dir)`` runs every registered measurement over a trace
(the same loop as ``loopscope report``, :func:`loopscope.report.trace_report.analyse_dynamics`)
and keeps the result in memory: the verdict table and the limiting-behaviour rates as
``pandas.DataFrame``s, every section's tables likewise, ``metrics`` as ``metrics.json`` holds
them, and a ``_repr_html_`` that shows the report's body (figures embedded) inline.
``alignment_frame`` and ``alignment_summary_frame`` give the stage alignment of a looped model
with its feedforward reference (:mod:`loopscope.analysis.alignment`) the same way; a sweep's
cells are ``loopscope.studies.ablation.frames.cells_frame`` (this layer may not import the
studies). ``pandas`` is imported only when a table is asked for.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopscope.analysis.alignment import Alignment
from loopscope.analysis.registry import Thresholds
from loopscope.analysis.report_parts import Section, Table
from loopscope.report.html import page_body, render_html
from loopscope.report.trace_report import analyse_dynamics
from loopscope.trace.store import TraceStore

__all__ = [
    "ALIGNMENT_SCORES",
    "TraceAnalysis",
    "alignment_frame",
    "alignment_summary_frame",
    "limiting_rates_frame",
    "open_analysis",
    "table_frame",
]

#: The scores of one pass against the feedforward reference (see analysis/alignment.py).
ALIGNMENT_SCORES = ("pearson", "spearman", "dtw_distance", "lockstep_distance")


def table_frame(table: Table) -> Any:
    """A report table as a ``DataFrame`` indexed by its first column (the row labels)."""
    import pandas as pd

    frame = pd.DataFrame(table.rows, columns=table.columns)
    frame = frame.set_index(table.columns[0]) if table.columns else frame
    frame.attrs["title"] = table.title
    return frame


def limiting_rates_frame(metrics: dict[str, Any]) -> Any:
    """The limiting-behaviour rates of ``metrics`` (the ``dynamics`` entry of
    ``metrics.json``): one row per scope (the last block layer over tokens and over prompts,
    then each block layer over tokens), one column per behaviour."""
    import pandas as pd

    limiting = metrics.get("limiting_behaviour") or {}
    rows: dict[str, dict[str, float]] = {}
    last = limiting.get("last_layer") or {}
    if "token_rates" in last:
        rows["last layer, tokens"] = dict(last["token_rates"])
    if "example_rates" in last:
        rows["last layer, prompts"] = dict(last["example_rates"])
    for layer, rates in enumerate(limiting.get("per_layer_token_rates") or []):
        rows[f"layer {layer}, tokens"] = dict(rates)
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "scope"
    return frame


def _alignment_record(score: Alignment | Mapping[str, Any]) -> dict[str, float]:
    if isinstance(score, Alignment):
        return {name: float(getattr(score, name)) for name in ALIGNMENT_SCORES}
    return {name: float(score[name]) for name in ALIGNMENT_SCORES}


def alignment_frame(
    alignment: Mapping[str, Sequence[Alignment | Mapping[str, Any]]],
    recurrences: Sequence[int] | None = None,
) -> Any:
    """Stage alignment with one row per (metric, recurrence): each pass's Pearson and
    Spearman correlation, DTW and lockstep distance with the feedforward reference.
    ``alignment`` is what :func:`loopscope.analysis.alignment.stage_alignment` returns (metric
    → one :class:`Alignment` per pass; ``recurrences`` labels the passes, default 0, 1, …) or
    the ``alignment`` entry of the stages study's metrics (records that carry their
    ``recurrence``)."""
    import pandas as pd

    rows: list[dict[str, Any]] = []
    for metric, scores in alignment.items():
        for place, score in enumerate(scores):
            if isinstance(score, Mapping) and "recurrence" in score:
                recurrence = int(score["recurrence"])
            else:
                recurrence = recurrences[place] if recurrences is not None else place
            rows.append({"metric": metric, "recurrence": recurrence, **_alignment_record(score)})
    frame = pd.DataFrame(rows, columns=["metric", "recurrence", *ALIGNMENT_SCORES])
    return frame.set_index(["metric", "recurrence"])


def alignment_summary_frame(summary: Mapping[str, Mapping[str, float]]) -> Any:
    """The mean over passes of each alignment score, one row per metric: what
    :func:`loopscope.analysis.alignment.alignment_summary` returns, or the stages study's
    ``alignment_summary`` metrics entry."""
    import pandas as pd

    frame = pd.DataFrame(
        [{name: float(scores[name]) for name in ALIGNMENT_SCORES} for scores in summary.values()],
        index=pd.Index(list(summary), name="metric"),
        columns=list(ALIGNMENT_SCORES),
    )
    return frame


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight", facecolor="white")
    return buffer.getvalue()


@dataclass
class TraceAnalysis:
    """Every measurement of one trace: ``metrics``, the ``verdict`` table and the report's
    ``sections``, with pandas views of the tables."""

    source: str
    metrics: dict[str, Any]
    verdict: Table
    sections: list[Section]
    prompts: list[str]
    _pngs: dict[str, bytes] = field(default_factory=dict, repr=False)

    @property
    def verdict_frame(self) -> Any:
        """The verdict table, one row per verdict column's subject."""
        return table_frame(self.verdict)

    @property
    def limiting_rates(self) -> Any:
        return limiting_rates_frame(self.metrics)

    def tables(self) -> dict[str, Any]:
        """Every section's tables as ``DataFrame``s, by table title."""
        return {t.title: table_frame(t) for s in self.sections for t in s.tables}

    def _figure_pngs(self) -> dict[str, bytes]:
        for section in self.sections:
            for figure in section.figures:
                if figure.name not in self._pngs:
                    self._pngs[figure.name] = _png(figure.figure)
        return self._pngs

    def html(self) -> str:
        """The whole report page, as ``loopscope report`` would write it (figures inline)."""
        return render_html(
            title=f"loopscope analysis — {self.source}",
            subtitle="",
            verdict=self.verdict,
            sections=self.sections,
            figure_pngs=self._figure_pngs(),
            prompts=self.prompts,
            formats=(),
        )

    def _repr_html_(self) -> str:
        return page_body(self.html())


def open_analysis(
    trace_dir: str | Path,
    thresholds: Thresholds | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
) -> TraceAnalysis:
    """Run every registered measurement over ``trace_dir`` and keep the results in memory. A
    Zarr trace store (a path or an fsspec URL; ``storage_options`` go to fsspec) is first
    turned back into a trace directory in a temporary folder, so the same loop measures it to
    the same numbers."""
    from loopscope.trace.zarr_store import is_zarr_store, restore_trace

    if is_zarr_store(trace_dir, storage_options):
        with tempfile.TemporaryDirectory(prefix="loopscope-analysis-") as scratch:
            restored = restore_trace(
                trace_dir, Path(scratch) / "trace", storage_options=storage_options
            )
            analysed = open_analysis(restored.path, thresholds)
        analysed.source = str(trace_dir)
        return analysed
    store = TraceStore(trace_dir)
    analysis = analyse_dynamics(store, thresholds)
    return TraceAnalysis(
        source=str(trace_dir),
        metrics=analysis.metrics,
        verdict=analysis.verdict,
        sections=analysis.sections,
        prompts=[store.texts[i] for i in store.completed()],
    )
