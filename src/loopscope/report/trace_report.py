"""Every registered measurement run over a trace, in one loop: the numbers of ``metrics.json``,
the verdict table and the report's sections, for full and lean (summary-only) traces alike.

Each prompt is read once (its states converted once, whichever measurements read them); each
measurement then pools its prompts. A measurement whose needs the trace does not meet gets a
section, a verdict cell and a ``metrics.json`` entry (``not_measured``) that say which capture
it needs. Pure: reads a :class:`~loopscope.trace.store.TraceStore`, never a model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import loopscope.analysis.measures  # noqa: F401 - importing it registers every measurement
from loopscope.analysis.registry import (
    MEASUREMENTS,
    Measurement,
    PromptView,
    Results,
    Source,
    Thresholds,
    TraceFacts,
)
from loopscope.analysis.report_parts import Cell, Section, Table
from loopscope.core.errors import LoopscopeError
from loopscope.trace.store import PromptTrace, TraceStore

__all__ = ["DynamicsAnalysis", "Thresholds", "analyse_dynamics", "run_measurements"]

# The page's layout: where each measurement's section, verdict column and metrics.json keys go,
# in the order readers of earlier reports know. Measurements not named here follow, in
# registration order.

#: Sections (and the verdict table's notes), by measurement.
SECTION_ORDER = (
    "successive_difference",
    "fixed_point",
    "degeneracy",
    "attention_stabilisation",
    "attention_bound",
    "trajectory",
    "limiting_behaviour",
    "stability",
)
#: The verdict table's columns, by measurement.
VERDICT_ORDER = (
    "fixed_point",
    "degeneracy",
    "attention_stabilisation",
    "stability",
    "limiting_behaviour",
)
#: Top-level keys of the ``dynamics`` entry of ``metrics.json`` (``not_measured`` comes last).
METRICS_ORDER = (
    "prompts",
    "capture",
    "recurrences",
    "train_recurrences",
    "divergent_tokens",
    "successive_difference",
    "fixed_point",
    "attention_fixed_point_relative",
    "attention_stabilised_from",
    "degeneracy",
    "stability",
    "limiting_behaviour",
    "extrapolation",
    "thresholds",
    "attention_bound",
)


@dataclass
class DynamicsAnalysis:
    """What the loop hands the report: the ``dynamics`` entry of ``metrics.json``, the verdict
    table and the sections, in the page's order."""

    metrics: dict[str, Any]
    verdict: Table
    sections: list[Section] = field(default_factory=list)


@dataclass(frozen=True)
class _Planned:
    """A measurement and the source the trace can feed, or why it cannot be made."""

    measurement: Measurement
    source: Source | None
    reason: str

    @property
    def made(self) -> bool:
        return self.source is not None


def _laid_out(plan: list[_Planned], order: tuple[str, ...]) -> list[_Planned]:
    """``plan`` in the layout ``order``, the measurements it does not name after (a stable
    sort keeps their registration order)."""
    rank = {name: i for i, name in enumerate(order)}
    return sorted(plan, key=lambda p: rank.get(p.measurement.name, len(rank)))


def _plan(measurements: Iterable[Measurement], prompts: Sequence[PromptTrace]) -> list[_Planned]:
    plan: list[_Planned] = []
    made: set[str] = set()
    for m in measurements:
        source, reason = m.choose_source(prompts)
        missing = [u for u in m.uses if u not in made]
        if source is not None and missing:
            source, reason = None, f"needs {', '.join(missing)}, which could not be measured"
        if source is not None:
            made.add(m.name)
        plan.append(_Planned(m, source, reason))
    return plan


def _measure(
    plan: list[_Planned], prompts: Sequence[PromptTrace], facts: TraceFacts
) -> dict[str, Any]:
    """Read every prompt once for all measurements, then pool each in registration order (so
    a measurement's pool sees the results of those it uses)."""
    active = [p for p in plan if p.source is not None]
    parts: dict[str, list[Any]] = {p.measurement.name: [] for p in active}
    for index, chunk in enumerate(prompts):
        view = PromptView(chunk, index)
        for p in active:
            assert p.source is not None
            parts[p.measurement.name].append(p.source.read(view, facts))
    results: dict[str, Any] = {}
    for p in active:
        name = p.measurement.name
        results[name] = p.measurement.pool(parts.pop(name), facts, results)
    return results


def _metrics(plan: list[_Planned], results: Results, facts: TraceFacts) -> dict[str, Any]:
    found: dict[str, Any] = {"prompts": facts.prompts}
    if facts.capture != "full":
        found["capture"] = facts.capture
    found["recurrences"] = facts.recurrences
    found["train_recurrences"] = facts.train_recurrences
    found["thresholds"] = asdict(facts.thresholds)
    owner: dict[str, str] = {}
    for p in plan:
        if not p.made:
            continue
        for key, value in p.measurement.metrics(results[p.measurement.name]).items():
            if key in found:
                earlier = owner.get(key, "the report itself")
                raise ValueError(
                    f"measurement {p.measurement.name!r} writes metrics key {key!r}, which "
                    f"{earlier} writes already; give it a key of its own"
                )
            found[key], owner[key] = value, p.measurement.name
    ordered = {k: found[k] for k in METRICS_ORDER if k in found}
    ordered.update((k, v) for k, v in found.items() if k not in ordered)
    not_measured = {p.measurement.name: p.reason for p in plan if not p.made}
    if not_measured:
        ordered["not_measured"] = not_measured
    return ordered


def _verdict(
    plan: list[_Planned], results: Results, facts: TraceFacts, prompts: Sequence[PromptTrace]
) -> Table:
    columns = [p for p in _laid_out(plan, VERDICT_ORDER) if p.measurement.verdict is not None]
    rows: list[list[Cell]] = []
    for layer in range(facts.block_layers):
        row: list[Cell] = [f"block layer {layer}"]
        for p in columns:
            column = p.measurement.verdict
            assert column is not None
            if p.made:
                row.append(column.cell(results[p.measurement.name], layer))
            else:
                row.append(f"— ({p.measurement.short_need(prompts)})")
        rows.append(row)
    whole: list[Cell] = []
    for p in columns:
        column = p.measurement.verdict
        assert column is not None
        cell = None
        if p.made and column.whole_block is not None:
            cell = column.whole_block(results[p.measurement.name])
        whole.append(cell)
    if any(c is not None for c in whole):
        rows.append(["whole block", *(c if c is not None else "—" for c in whole)])
    notes, missing = [], []
    for p in _laid_out(plan, SECTION_ORDER):
        column = p.measurement.verdict
        if column is None:
            continue
        if p.made:
            notes.append(column.note(facts))
        else:
            missing.append(f"{column.title} {p.reason}")
    note = "; ".join(notes) + "." if notes else ""
    if missing:
        note += (" " if note else "") + "Not measured: " + "; ".join(missing) + "."
    return Table(
        title="Verdict per block layer",
        columns=["layer", *(p.measurement.verdict.title for p in columns if p.measurement.verdict)],
        rows=rows,
        note=note,
    )


def _sections(plan: list[_Planned], results: Results, facts: TraceFacts) -> list[Section]:
    sections: list[Section] = []
    for p in _laid_out(plan, SECTION_ORDER):
        m = p.measurement
        if m.text is None and m.tables is None and m.figure is None:
            continue
        if not p.made:
            sections.append(Section(m.title, text=f"Not measured: {p.reason}."))
            continue
        result = results[m.name]
        figure = m.figure(result, facts, results) if m.figure is not None else None
        sections.append(
            Section(
                m.title,
                text=m.text(result, facts, results) if m.text is not None else "",
                tables=m.tables(result, facts) if m.tables is not None else [],
                figures=[figure] if figure is not None else [],
            )
        )
    return sections


def run_measurements(
    store: TraceStore,
    thresholds: Thresholds | None = None,
    measurements: Iterable[Measurement] | None = None,
) -> DynamicsAnalysis:
    """Run ``measurements`` (default: every registered one) over the trace's prompts."""
    prompts = list(store)
    if not prompts:
        raise LoopscopeError(f"{store.path} holds no finished prompt; run `loopscope trace` first")
    settings = store.settings
    facts = TraceFacts(
        prompts=len(prompts),
        block_layers=int(store.meta["block_layers"]),
        train_recurrences=int(store.meta["train_recurrences"]),
        recurrences=int(settings["recurrences"]),
        capture=str(settings.get("capture", "full")),
        thresholds=at_dtype_resolution(thresholds or Thresholds(), store.header),
    )
    plan = _plan(MEASUREMENTS if measurements is None else measurements, prompts)
    results = _measure(plan, prompts, facts)
    return DynamicsAnalysis(
        metrics=_metrics(plan, results, facts),
        verdict=_verdict(plan, results, facts, prompts),
        sections=_sections(plan, results, facts),
    )


#: The relative rounding step (machine epsilon) of the dtypes a model runs in.
_DTYPE_EPS = {"bfloat16": 2.0**-7, "float16": 2.0**-10, "float32": 2.0**-23}


def at_dtype_resolution(thresholds: Thresholds, header: dict[str, Any]) -> Thresholds:
    """``thresholds`` with the settled-step tolerance no finer than the rounding step of the
    dtype the trace ran in: a bfloat16 state is rounded to 8 significant bits, so even at a
    fixed point its successive states differ by about that much, and a float32 tolerance
    would call every bfloat16 run unconverged."""
    from dataclasses import replace

    dtype = header.get("runtime", {}).get("dtype", "float32")
    floor = _DTYPE_EPS.get(str(dtype), 0.0)
    if thresholds.settled_step >= floor:
        return thresholds
    return replace(thresholds, settled_step=floor)


def analyse_dynamics(store: TraceStore, thresholds: Thresholds | None = None) -> DynamicsAnalysis:
    """Every registered measurement of the trace, pooled over its prompts."""
    return run_measurements(store, thresholds)
