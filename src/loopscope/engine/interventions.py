"""Interventions: rewrite one branch (attention or MLP) of chosen layers at chosen recurrences.

An :class:`InterventionSpec` names *where* (stage, layer, component, recurrences) and *what*
(zero the branch output, replace it with a given tensor, or any callable). :func:`edit_plan`
turns a list of specs into the engine's ``edit_plan`` (site → Edit or None), so an intervened
run is an ordinary run of the one engine::

    specs = [parse_intervention("block.1.mlp@0-3:zero")]
    out = model(ids, recurrences=8, edit_plan=edit_plan(specs))

String syntax (the CLI's ``--intervene``): ``STAGE.LAYER.COMPONENT[@RECURRENCES][:ACTION]``

* ``STAGE`` is ``prelude``, ``block`` or ``coda``; ``LAYER`` the layer index within the stage;
  ``COMPONENT`` is ``attn`` or ``mlp``.
* ``@RECURRENCES`` (block only) is a comma-separated list of recurrences and inclusive ranges,
  e.g. ``@0,1,2`` or ``@0-3,7``; omitted (or ``@all``) means every recurrence.
* ``:ACTION`` is ``zero`` (the default), ``scale=F`` (multiply the branch output by F) or
  ``replace=F`` (every entry of the branch output becomes F).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import Tensor

from loopscope.core.errors import LoopscopeError
from loopscope.engine.contract import FamilyMeta
from loopscope.engine.loop import EditPlan
from loopscope.engine.sites import Site, Stage
from loopscope.nn.layers import Component, Edit

__all__ = [
    "InterventionError",
    "InterventionSpec",
    "check_specs",
    "edit_plan",
    "parse_intervention",
]

Action = Literal["zero", "replace"] | Callable[[Tensor], Tensor]
STAGES: tuple[Stage, ...] = ("prelude", "block", "coda")
COMPONENTS: tuple[Component, ...] = ("attn", "mlp")
SYNTAX = "STAGE.LAYER.COMPONENT[@RECURRENCES][:ACTION], e.g. block.1.mlp@0,1,2:zero"
#: More recurrences than any run makes; a range beyond it is a typo, not a request.
MAX_RECURRENCE = 1_000_000


class InterventionError(LoopscopeError):
    """An intervention that is malformed or does not fit the model."""


def _is_index(value: object) -> bool:
    """An int ≥ 0 that is not a bool (True would silently mean layer 1)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class InterventionSpec:
    """Rewrite ``component`` of layer ``layer`` of ``stage`` at ``recurrences`` (None = all).

    ``action`` is ``"zero"``, ``"replace"`` (by ``value``, broadcast to the branch output
    (batch, T, D)) or a callable mapping the branch output to a tensor of the same shape.
    Prelude and coda run once per forward pass (recurrence 0), so their ``recurrences`` must be
    None or [0].
    """

    stage: Stage
    layer: int
    component: Component
    recurrences: list[int] | None = None
    action: Action = "zero"
    value: Tensor | None = None

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise InterventionError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.component not in COMPONENTS:
            raise InterventionError(f"component must be 'attn' or 'mlp', got {self.component!r}")
        if not _is_index(self.layer):
            raise InterventionError(f"layer must be an int ≥ 0, got {self.layer!r}")
        recs = self.recurrences
        if recs is not None:
            if not recs or not all(_is_index(r) for r in recs):
                raise InterventionError(
                    f"recurrences must be a non-empty list of ints ≥ 0 or None (all), got {recs!r}"
                )
            if self.stage != "block" and set(recs) != {0}:
                raise InterventionError(
                    f"{self.stage} layers run once (recurrence 0); drop the recurrences "
                    f"{recs} or intervene on a block layer"
                )
        if callable(self.action):
            return
        if self.action not in ("zero", "replace"):
            raise InterventionError(
                f"action must be 'zero', 'replace' or a callable, got {self.action!r}"
            )
        if self.action == "replace" and self.value is None:
            raise InterventionError("action 'replace' needs a value tensor (value=...)")
        if self.action == "zero" and self.value is not None:
            raise InterventionError("action 'zero' takes no value; use action='replace'")

    @property
    def label(self) -> str:
        """Short readable name, in the string syntax where the action allows."""
        recs = "" if self.recurrences is None else "@" + _format_recurrences(self.recurrences)
        if self.action == "replace" and self.value is not None and self.value.numel() == 1:
            action = f"replace={float(self.value):g}"
        elif isinstance(self.action, str):
            action = self.action
        else:
            action = str(getattr(self.action, "label", "custom"))
        return f"{self.stage}.{self.layer}.{self.component}{recs}:{action}"

    def matches(self, site: Site) -> bool:
        return (
            site.stage == self.stage
            and site.layer == self.layer
            and (self.recurrences is None or site.recurrence in self.recurrences)
        )

    def apply(self, branch: Tensor) -> Tensor:
        """The rewritten branch output (same shape, dtype and device as ``branch``)."""
        if self.action == "zero":
            return torch.zeros_like(branch)
        if self.action == "replace":
            value = cast(Tensor, self.value).to(dtype=branch.dtype, device=branch.device)
            try:
                return torch.broadcast_to(value, branch.shape).clone()
            except RuntimeError:
                raise InterventionError(
                    f"{self.label}: replacement of shape {tuple(value.shape)} does not broadcast "
                    f"to the {self.component} output {tuple(branch.shape)} (batch, tokens, "
                    "d_model); give a (d_model,) vector, a (tokens, d_model) matrix or a scalar"
                ) from None
        fn = cast(Callable[[Tensor], Tensor], self.action)
        out = fn(branch)
        if not isinstance(out, Tensor) or out.shape != branch.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise InterventionError(
                f"{self.label}: the callable must return a tensor shaped like its input "
                f"{tuple(branch.shape)}, got {got}"
            )
        return out


def _site_edit(specs: Sequence[InterventionSpec]) -> Edit:
    """One Edit applying, per component, every matching spec in the order given."""

    def edit(component: Component, branch: Tensor) -> Tensor:
        for spec in specs:
            if spec.component == component:
                branch = spec.apply(branch)
        return branch

    return edit


def edit_plan(specs: Sequence[InterventionSpec]) -> EditPlan:
    """The engine's ``edit_plan``: per site the Edit of the specs that match it, else None."""
    chosen = list(specs)
    cache: dict[Site, Edit | None] = {}

    def plan(site: Site) -> Edit | None:
        if site not in cache:
            hits = [s for s in chosen if s.matches(site)]
            cache[site] = _site_edit(hits) if hits else None
        return cache[site]

    return plan


def check_specs(specs: Sequence[InterventionSpec], meta: FamilyMeta, recurrences: int) -> None:
    """Refuse specs that name a layer or recurrence the run does not have (they would silently
    do nothing)."""
    sizes = {
        "prelude": meta.prelude_layers,
        "block": meta.block_layers,
        "coda": meta.coda_layers,
    }
    name = meta.name or meta.family
    for spec in specs:
        n = sizes[spec.stage]
        if spec.layer >= n:
            have = f"layers 0..{n - 1}" if n else "no layers"
            raise InterventionError(f"{spec.label}: {name} has {n} {spec.stage} layers ({have})")
        late = [r for r in spec.recurrences or [] if r >= recurrences]
        if late:
            raise InterventionError(
                f"{spec.label}: recurrences {late} are not run (the run has {recurrences} "
                f"recurrences, 0..{recurrences - 1}); raise --recurrences or drop them"
            )


# --------------------------------------------------------------------------- string syntax


def _index(text: str) -> int | None:
    """A plain decimal index (ASCII digits only: ``int`` would also take "١" or "1_0")."""
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() else None


def _parse_recurrence_part(part: str, whole: str) -> range:
    """``N`` or ``A-B`` (inclusive, A ≤ B ≤ MAX_RECURRENCE) as a range."""
    lo, dash, hi = part.partition("-")
    a, b = _index(lo), (_index(hi) if dash else _index(lo))
    if a is None or b is None or b < a:
        raise InterventionError(
            f"bad recurrence {part!r} in {whole!r}: use ints ≥ 0 and ranges A-B with A ≤ B, "
            "separated by commas (e.g. @0,2-4)"
        )
    if b > MAX_RECURRENCE:
        raise InterventionError(
            f"recurrence {b} in {whole!r} is beyond any run (at most {MAX_RECURRENCE}); "
            "name the recurrences the run has, or omit '@...' for all of them"
        )
    return range(a, b + 1)


def _parse_recurrences(text: str, whole: str) -> list[int] | None:
    if text in ("", "all"):
        return None
    out: set[int] = set()
    for part in text.split(","):
        out.update(_parse_recurrence_part(part.strip(), whole))
    return sorted(out)


def _parse_float(text: str, what: str, whole: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise InterventionError(f"bad {what} {text!r} in {whole!r}: expected a number") from None
    if not math.isfinite(x):
        raise InterventionError(f"{what} must be finite in {whole!r}, got {text!r}")
    return x


class _Scale:
    """Multiply the branch output by a constant (a picklable, labelled callable action)."""

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.label = f"scale={factor:g}"

    def __call__(self, branch: Tensor) -> Tensor:
        return branch * self.factor


def _format_recurrences(recs: Sequence[int]) -> str:
    """[0, 1, 2, 5] → "0-2,5"."""
    out: list[str] = []
    values = sorted(set(recs))
    start = prev = values[0]
    for r in [*values[1:], None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return ",".join(out)


def parse_intervention(text: str) -> InterventionSpec:
    """Parse ``STAGE.LAYER.COMPONENT[@RECURRENCES][:ACTION]`` (see the module docstring)."""
    whole = text
    text = text.strip()
    if not text:
        raise InterventionError(f"empty intervention; expected {SYNTAX}")
    where, _, action_text = text.partition(":")
    where, at, rec_text = where.partition("@")
    parts = where.split(".")
    if len(parts) != 3:
        raise InterventionError(
            f"bad site {where!r} in {whole!r}: expected STAGE.LAYER.COMPONENT ({SYNTAX})"
        )
    stage, layer_text, component = (p.strip() for p in parts)
    if stage not in STAGES:
        raise InterventionError(f"bad stage {stage!r} in {whole!r}: choose prelude, block or coda")
    layer = _index(layer_text)
    if layer is None:
        raise InterventionError(
            f"bad layer {layer_text!r} in {whole!r}: expected a layer index ≥ 0"
        )
    if component not in COMPONENTS:
        raise InterventionError(f"bad component {component!r} in {whole!r}: choose attn or mlp")
    if at and not rec_text.strip():
        raise InterventionError(f"empty recurrence list after '@' in {whole!r}")
    recurrences = _parse_recurrences(rec_text.strip(), whole)
    if stage != "block" and recurrences is not None:
        raise InterventionError(
            f"{stage} layers run once per forward pass; drop '@{rec_text}' from {whole!r}"
        )
    name, eq, arg = action_text.strip().partition("=")
    action: Action
    value: Tensor | None = None
    if name in ("", "zero") and not eq:
        action = "zero"
    elif name == "scale" and eq:
        action = _Scale(_parse_float(arg, "scale factor", whole))
    elif name == "replace" and eq:
        action = "replace"
        value = torch.tensor(_parse_float(arg, "replacement value", whole))
    else:
        raise InterventionError(
            f"bad action {action_text!r} in {whole!r}: use zero, scale=F or replace=F"
        )
    return InterventionSpec(
        stage=cast(Stage, stage),
        layer=layer,
        component=cast(Component, component),
        recurrences=recurrences,
        action=action,
        value=value,
    )
