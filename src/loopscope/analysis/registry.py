"""The measurement registry: every measurement of a trace is declared once, here or in a module
of :mod:`loopscope.analysis.measures`.

A :class:`Measurement` says what it reads from a trace (:class:`Need`), how it reads one
prompt (a :class:`Source` per way of measuring it, best first: stored states where the trace
kept them, online reductions where it did not), how it pools the prompts, what it adds to
``metrics.json``, its section of the report (text, tables, one figure) and its column of the
verdict table, if it has one. One loop (:mod:`loopscope.report.trace_report`) runs every
registered measurement over a trace, full or lean alike; a measurement whose needs a trace does
not meet is reported with the capture it needs instead of being left out silently.

Pure: a measurement sees a prompt only through :class:`PromptData`, the read-only interface a
trace chunk offers, so nothing here imports the trace layer (which sits above analysis).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from loopscope.analysis.numerics import FloatArray
from loopscope.analysis.report_parts import Cell, Figure, Table

__all__ = [
    "ATTENTION_BOUND",
    "ATTENTION_MAPS",
    "BLOCK_STATES",
    "FIXED_POINT_DISTANCES",
    "MEASUREMENTS",
    "ONLINE_SUMMARIES",
    "STABILITY",
    "Measurement",
    "Need",
    "PromptData",
    "PromptView",
    "Registry",
    "Source",
    "Thresholds",
    "TraceFacts",
    "VerdictColumn",
    "register",
]


class PromptData(Protocol):
    """What a measurement may read of one traced prompt (a trace chunk provides exactly this)."""

    def array(self, name: str) -> np.ndarray | None: ...

    @property
    def block(self) -> np.ndarray | None: ...

    @property
    def attn(self) -> np.ndarray | None: ...

    @property
    def summary(self) -> dict[str, np.ndarray]: ...

    @property
    def stability(self) -> dict[str, Any] | None: ...


class PromptView:
    """One prompt as the measurements read it: its stored states and attention converted to
    float64 once, however many measurements read them, and dropped with the view. ``index``
    is the prompt's place among the trace's prompts (0: the first, which figures of a single
    prompt show)."""

    def __init__(self, chunk: PromptData, index: int = 0) -> None:
        self.chunk = chunk
        self.index = index
        self._states: FloatArray | None = None
        self._attention: FloatArray | None = None

    def states(self) -> FloatArray:
        """(R, L, T, D) block states; only sources that need :data:`BLOCK_STATES` ask."""
        if self._states is None:
            block = self.chunk.block
            if block is None:
                raise ValueError("this prompt has no stored states; declare BLOCK_STATES")
            self._states = np.asarray(block, dtype=np.float64)
        return self._states

    def attention(self) -> FloatArray:
        """(R, L, H, T, T) attention maps; only sources that need :data:`ATTENTION_MAPS` ask."""
        if self._attention is None:
            attn = self.chunk.attn
            if attn is None:
                raise ValueError("this prompt has no stored attention; declare ATTENTION_MAPS")
            self._attention = np.asarray(attn, dtype=np.float64)
        return self._attention

    def array(self, name: str) -> np.ndarray | None:
        return self.chunk.array(name)

    @property
    def summary(self) -> dict[str, np.ndarray]:
        return self.chunk.summary

    @property
    def stability(self) -> dict[str, Any] | None:
        return self.chunk.stability


@dataclass(frozen=True)
class Thresholds:
    """Tolerances behind the verdicts (the same for every measurement that uses them)."""

    converged_relative: float = 1e-2
    settled_step: float = 1e-3
    attention_relative: float = 5e-2
    degenerate_cosine: float = 0.99
    tau: float = 0.05
    rho: float = 0.9
    heatmap_recurrences: int = 16


@dataclass(frozen=True)
class TraceFacts:
    """What every measurement may know about the trace besides its prompts."""

    prompts: int
    block_layers: int
    train_recurrences: int
    recurrences: int
    capture: str
    thresholds: Thresholds


# ------------------------------------------------------------------------------------ needs


@dataclass(frozen=True)
class Need:
    """Something a measurement reads from a trace, and how to trace so that it is there.

    ``every_prompt``: whether each prompt must have it (stored states) or one is enough
    (stability certificates are computed for the first prompts only)."""

    what: str
    capture: str
    present: Callable[[PromptData], bool]
    every_prompt: bool = True

    def met_by(self, prompts: Sequence[PromptData]) -> bool:
        if not prompts:
            return False
        check = all if self.every_prompt else any
        return check(self.present(p) for p in prompts)

    @property
    def message(self) -> str:
        """``needs WHAT: HOW``, the line a report shows for a measurement it could not make."""
        return f"needs {self.what}: {self.capture}"


def _has_every_state(prompt: PromptData) -> bool:
    block = prompt.block
    return block is not None and block.ndim == 4 and prompt.array("block_recurrences") is None


def _bound_terms(prompt: PromptData) -> bool:
    return bool((prompt.stability or {}).get("attention_bound"))


BLOCK_STATES = Need(
    "stored states", "trace with --capture full, keeping every recurrence", _has_every_state
)
ATTENTION_MAPS = Need(
    "stored attention maps",
    "trace with --capture full, without --no-attention",
    lambda p: p.attn is not None,
)
ONLINE_SUMMARIES = Need(
    "online summaries (summary.npz)",
    "trace again: every trace records them",
    lambda p: "step_relative" in p.summary,
)
FIXED_POINT_DISTANCES = Need(
    "online distances to the fixed point",
    "trace with --capture summary (its second pass measures them)",
    lambda p: "ref_relative" in p.summary,
)
STABILITY = Need(
    "a stability certificate (stability.json)",
    "trace with --stability-prompts 1 or more",
    lambda p: p.stability is not None,
    every_prompt=False,
)
ATTENTION_BOUND = Need(
    "the attention-bound terms",
    "trace with --capture full, attention on, every position, layer and recurrence kept and "
    "--stability-prompts 1 or more",
    _bound_terms,
    every_prompt=False,
)


# ------------------------------------------------------------------------------ declaration


@dataclass(frozen=True)
class Source:
    """One way to make a measurement: what it needs, and what it reads from one prompt."""

    needs: tuple[Need, ...]
    read: Callable[[PromptView, TraceFacts], Any]

    def unmet(self, prompts: Sequence[PromptData]) -> Need | None:
        """The first need ``prompts`` do not meet, or None when they meet all."""
        return next((n for n in self.needs if not n.met_by(prompts)), None)


#: Results of the measurements made so far, by name.
Results = Mapping[str, Any]


@dataclass(frozen=True)
class VerdictColumn:
    """A measurement's column of the verdict table: one cell per block layer, a cell for the
    whole block (None: that row shows a dash) and the note that says how cells are decided."""

    title: str
    cell: Callable[[Any, int], Cell]
    note: Callable[[TraceFacts], str]
    whole_block: Callable[[Any], Cell] | None = None


def _no_metrics(result: Any) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Measurement:
    """One measurement of a trace, declared once.

    ``sources``: the ways to make it, best first; the loop uses the first whose needs the trace
    meets. ``pool(parts, facts, results)`` turns what ``read`` gave for every prompt into the
    pooled result; ``uses`` names measurements (registered earlier) whose results it reads,
    and the measurement is not made when one of them was not. ``metrics(result)`` is what it
    adds to ``metrics.json`` (top-level keys of the ``dynamics`` entry); ``text``, ``tables``
    and ``figure`` make its report section, titled ``title``; ``verdict`` is its column of the
    verdict table. The section builders also get every result, so a figure may draw another
    measurement's curve (the fixed-point figure shows the attention's)."""

    name: str
    title: str
    sources: tuple[Source, ...]
    pool: Callable[[list[Any], TraceFacts, Results], Any]
    metrics: Callable[[Any], Mapping[str, Any]] = _no_metrics
    text: Callable[[Any, TraceFacts, Results], str] | None = None
    tables: Callable[[Any, TraceFacts], list[Table]] | None = None
    figure: Callable[[Any, TraceFacts, Results], Figure | None] | None = None
    verdict: VerdictColumn | None = None
    uses: tuple[str, ...] = ()

    def choose_source(self, prompts: Sequence[PromptData]) -> tuple[Source | None, str]:
        """The first source ``prompts`` can feed, or None and the line saying what they lack."""
        missing: list[Need] = []
        for source in self.sources:
            need = source.unmet(prompts)
            if need is None:
                return source, ""
            missing.append(need)
        lines = [n.message[len("needs ") :] for n in missing]
        return None, "needs " + "; or ".join(lines)

    def short_need(self, prompts: Sequence[PromptData]) -> str:
        """A verdict cell's reason: ``needs WHAT`` of the best source."""
        need = self.sources[0].unmet(prompts) if self.sources else None
        return f"needs {need.what}" if need is not None else "not measured"


@dataclass
class Registry:
    """Measurements in the order the report shows their sections."""

    _by_name: dict[str, Measurement] = field(default_factory=dict)

    def register(self, measurement: Measurement) -> Measurement:
        """Add ``measurement`` after the ones registered so far; returns it (so a module can
        keep the declaration under a name)."""
        if measurement.name in self._by_name:
            raise ValueError(f"a measurement named {measurement.name!r} is registered already")
        unknown = [u for u in measurement.uses if u not in self._by_name]
        if unknown:
            raise ValueError(
                f"measurement {measurement.name!r} uses {unknown}, which are not registered "
                "before it; register those first"
            )
        if not measurement.sources:
            raise ValueError(f"measurement {measurement.name!r} declares no source")
        self._by_name[measurement.name] = measurement
        return measurement

    def unregister(self, name: str) -> None:
        """Remove a measurement (and nothing else: measurements using it stay registered and
        are then reported as not made)."""
        del self._by_name[name]

    def __iter__(self) -> Iterator[Measurement]:
        return iter(list(self._by_name.values()))

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name


#: The registry every report reads; the modules of :mod:`loopscope.analysis.measures` fill it.
MEASUREMENTS = Registry()


def register(measurement: Measurement) -> Measurement:
    """Register ``measurement`` in :data:`MEASUREMENTS`."""
    return MEASUREMENTS.register(measurement)
