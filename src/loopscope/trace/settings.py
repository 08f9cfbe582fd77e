"""What a trace runs and keeps: its settings, its prompts, and the error for a trace that
cannot be written or read as asked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from loopscope.core.errors import LoopscopeError
from loopscope.engine.contract import InitState, LoopedLM
from loopscope.engine.loop import RunSpec


class TraceError(LoopscopeError):
    """A trace that cannot be written or read as asked."""


CAPTURES = ("auto", "full", "summary")
STATE_DTYPES = ("auto", "float16", "bfloat16", "float32")


@dataclass(frozen=True)
class TraceSettings:
    """What to run and what to keep. ``positions``: "all", "last" or explicit indices; ``layers``:
    block layers to keep (None = all); ``keep_recurrences``: recurrences whose states are stored
    (None = all; the online reductions still cover every recurrence, and the report then uses
    them); ``capture``: "full" writes states, "summary" keeps only online reductions (then a
    second pass measures distances to the fixed point), "auto" (the default) full when the
    states fit under the disk budget, else summary (see :mod:`loopscope.trace.plan`).
    ``state_dtype``: how stored states are kept on disk, "float32", "float16" or "bfloat16";
    "auto" (the default) float32 for a float32 model and float16 for any other. Attention is
    kept for the first ``attention_recurrences`` recurrences and the last one. ``fixed_point``:
    the reference X* the distances are measured against — the state after the last recurrence
    ("last", the study's choice) or the fixed point of the block map solved by Anderson
    acceleration to ``fixed_point_tol`` ("anderson"), mixing ``fixed_point_memory`` past steps
    with relaxation ``fixed_point_beta`` (memory 20 and β 2 need ~1.7× fewer block applications
    on slowly contracting pre-norm stacks; the defaults are the safer choice for sandwich and
    Ouro norms, see ``benchmarks/fixed_point.py``)."""

    recurrences: int = 64
    init_state: str | None = None
    seed: int = 0
    positions: str | list[int] = "all"
    layers: list[int] | None = None
    keep_recurrences: list[int] | None = None
    capture: str = "auto"
    attention: bool = True
    attention_recurrences: int = 16
    stability_prompts: int = 2
    stability_iters: int = 40
    state_dtype: str = "auto"
    fixed_point: str = "last"
    fixed_point_tol: float = 1e-5
    fixed_point_memory: int = 5
    fixed_point_beta: float = 1.0

    @property
    def run(self) -> RunSpec:
        """The run every pass over a prompt retraces."""
        return RunSpec(self.recurrences, cast("InitState | None", self.init_state), self.seed)

    def validate(self, model: LoopedLM) -> None:
        if self.capture not in CAPTURES:
            raise TraceError(f"capture must be 'auto', 'full' or 'summary', got {self.capture!r}")
        if self.recurrences < 2:
            raise TraceError("recurrences must be ≥ 2 to measure any dynamics")
        k = model.meta.block_layers
        late = [r for r in self.keep_recurrences or [] if not 0 <= r < self.recurrences]
        if late:
            raise TraceError(
                f"recurrences to keep {late} lie outside 0..{self.recurrences - 1}; pass "
                "indices below --recurrences"
            )
        bad = [layer for layer in self.layers or [] if not 0 <= layer < k]
        if bad:
            raise TraceError(
                f"unknown block layer index {bad}: {model.meta.name or model.meta.family} has "
                f"{k} block layers (0..{k - 1})"
            )
        if self.state_dtype not in STATE_DTYPES:
            raise TraceError(
                f"state_dtype must be one of {', '.join(STATE_DTYPES)}, got {self.state_dtype!r}"
            )
        if self.fixed_point not in ("last", "anderson"):
            raise TraceError(
                f"fixed_point must be 'last' (the state after the last recurrence) or "
                f"'anderson' (solved with Anderson acceleration), got {self.fixed_point!r}"
            )
        if not self.fixed_point_tol > 0:
            raise TraceError(f"fixed_point_tol must be > 0, got {self.fixed_point_tol}")
        if self.fixed_point_memory < 1:
            raise TraceError(
                f"fixed_point_memory (past steps Anderson mixes) must be ≥ 1, "
                f"got {self.fixed_point_memory}"
            )
        if not self.fixed_point_beta > 0:
            raise TraceError(
                f"fixed_point_beta (Anderson's relaxation) must be > 0, got {self.fixed_point_beta}"
            )

    def token_positions(self, length: int) -> list[int] | None:
        """The token positions kept of a prompt of ``length`` tokens (None: all of them)."""
        if self.positions == "all":
            return None
        if self.positions == "last":
            return [length - 1]
        if isinstance(self.positions, list):
            bad = [p for p in self.positions if not -length <= p < length]
            if bad:
                raise TraceError(f"token positions {bad} lie outside a prompt of {length} tokens")
            return [p % length for p in self.positions]
        raise TraceError(f"positions must be 'all', 'last' or a list of ints, got {self.positions}")

    def attention_kept(self) -> list[int]:
        """The first ``attention_recurrences`` recurrences plus the last (the fixed-point
        reference for attention distances)."""
        first = list(range(min(self.attention_recurrences, self.recurrences)))
        return sorted(set(first) | {self.recurrences - 1})

    def keeps_everything(self) -> bool:
        """True when the stored states cover every layer, token and recurrence (what checks
        that rebuild a layer's input from the previous one need)."""
        return self.layers is None and self.positions == "all" and self.keep_recurrences is None


@dataclass
class PromptInput:
    """One prompt: its text (for the report) and its token ids (what the model runs on)."""

    text: str
    ids: list[int]
