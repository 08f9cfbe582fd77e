"""The one verdict rule both sweeps use, built from four parts that are each reported.

A looped state can settle in direction while its norm still grows (a pre-norm stack without
injection adds a near-constant vector every recurrence), and every reader of the stream (the
next layer's pre-norm, the final norm) is scale-free. So the rule judges direction and
magnitude apart:

- *direction*: the last relative step of the per-token RMS-normalised state
  ‖n_R − n_{R−1}‖/‖n_R‖ (max over layers and prompts), with the cosine between the last two
  states beside it;
- *magnitude*: the last relative step of the raw state;
- *norm trend*: bounded, linear growth or explosive, from the exponent of a power-law fit of
  the state norm over the second half of the recurrences;
- *certificate*: the spectral radius of the block's Jacobian at the last state.

The label (stable distinct, stable degenerate, not stable) follows from the parts by the rule
that :meth:`VerdictRule.describe` writes out with its thresholds. The step threshold and the
degeneracy cosine default to those of :class:`loopscope.report.trace_report.Thresholds`
(settled step 1e-3, degenerate cosine 0.99), so a sweep and a single-model report agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loopscope.studies.ablation.measures import StateMeasures

STABLE_DISTINCT = "stable, distinct"
STABLE_DEGENERATE = "stable, degenerate"
NOT_STABLE = "not stable"
#: Most conservative first: ties between seeds resolve to the earlier one.
VERDICTS: tuple[str, ...] = (NOT_STABLE, STABLE_DEGENERATE, STABLE_DISTINCT)

#: Values of the parts.
CONVERGED = "converged"
SHRINKING = "still shrinking"
NOT_SHRINKING = "not shrinking"
MOVING = "moving"
BOUNDED = "bounded"
LINEAR = "linear"
EXPLOSIVE = "explosive"
HOLDS = "holds"
FAILS = "fails"
UNKNOWN = "not measured"


@dataclass(frozen=True)
class VerdictRule:
    """Thresholds of the verdict. ``tol_step``: a relative step at or below it has converged
    (direction and magnitude alike); ``shrinking_trend``: a direction step above ``tol_step``
    that is below this fraction of the step at R/2 is "still shrinking"; ``bounded_exponent``
    / ``explosive_exponent``: the norm's power-law exponent p is bounded below the first
    (halfway between constant, p = 0, and linear, p = 1), explosive above the second (faster
    than quadratic); ``radius_margin``: the certificate holds for ρ ≤ 1 + margin;
    ``degenerate_cosine``: layers whose fixed points all have cosine ≥ this are degenerate."""

    tol_step: float = 1e-3
    radius_margin: float = 0.02
    degenerate_cosine: float = 0.99
    shrinking_trend: float = 0.5
    bounded_exponent: float = 0.5
    explosive_exponent: float = 2.0

    def describe(self) -> str:
        return (
            f"each cell has four parts. Direction: converged when the last relative step of the "
            f"RMS-normalised state (max over layers and prompts) is ≤ {self.tol_step:g}, else "
            f"still shrinking (below {self.shrinking_trend:g}× the step at R/2) or not shrinking; "
            f"the min cosine between the last two states is shown beside it. Magnitude: "
            f"converged when the last relative step of the raw state is ≤ {self.tol_step:g}, "
            f"else moving. Norm trend: the exponent p of a least-squares fit ‖X_t‖ ∝ t^p of the "
            f"last layer's state norm over the second half of the recurrences (max over "
            f"prompts): bounded for p < {self.bounded_exponent:g}, linear growth for "
            f"{self.bounded_exponent:g} ≤ p ≤ {self.explosive_exponent:g}, explosive for "
            f"p > {self.explosive_exponent:g} or any NaN/Inf state. Certificate: holds when the "
            f"block Jacobian's spectral radius at the last state is ≤ 1 + {self.radius_margin:g}, "
            f"fails above. Label: not stable if any state is NaN/Inf, the norm trend is "
            f"explosive, the direction has not converged or the certificate fails; otherwise "
            f"stable whatever the magnitude does (every reader of the stream is scale-free), "
            f"degenerate when the min cosine between layer 0's fixed point and every other "
            f"layer's is ≥ {self.degenerate_cosine:g}, else distinct"
        )


@dataclass(frozen=True)
class Verdict:
    """A cell's label, the reason in words, and the four parts it was derived from."""

    label: str
    reason: str
    direction: str
    magnitude: str
    norm_trend: str
    certificate: str


def direction_part(last_step: float, trend: float, rule: VerdictRule) -> str:
    if not math.isfinite(last_step):
        return UNKNOWN
    if last_step <= rule.tol_step:
        return CONVERGED
    return SHRINKING if math.isfinite(trend) and trend < rule.shrinking_trend else NOT_SHRINKING


def magnitude_part(raw_last_step: float, rule: VerdictRule) -> str:
    if not math.isfinite(raw_last_step):
        return UNKNOWN
    return CONVERGED if raw_last_step <= rule.tol_step else MOVING


def norm_trend_part(finite: bool, norm_exponent: float, rule: VerdictRule) -> str:
    if not finite:
        return EXPLOSIVE
    if not math.isfinite(norm_exponent):
        return UNKNOWN
    if norm_exponent < rule.bounded_exponent:
        return BOUNDED
    return LINEAR if norm_exponent <= rule.explosive_exponent else EXPLOSIVE


def certificate_part(radius: float, rule: VerdictRule) -> str:
    if not math.isfinite(radius):
        return UNKNOWN
    return HOLDS if radius <= 1.0 + rule.radius_margin else FAILS


def _label(
    *,
    finite: bool,
    last_step: float,
    trend: float,
    radius: float,
    min_cosine: float,
    norm_exponent: float,
    parts: tuple[str, str, str, str],
    rule: VerdictRule,
    first_bad_recurrence: int | None,
) -> tuple[str, str]:
    direction, _, norm_trend, certificate = parts
    if not finite:
        where = "" if first_bad_recurrence is None else f" from recurrence {first_bad_recurrence}"
        return NOT_STABLE, f"states became non-finite (NaN/Inf){where}"
    if norm_trend == EXPLOSIVE:
        return NOT_STABLE, (
            f"the norm explodes (‖X_t‖ ∝ t^{norm_exponent:.2g} over the second half, "
            f"> t^{rule.explosive_exponent:g})"
        )
    if direction == UNKNOWN:
        return NOT_STABLE, "no finite step to judge"
    if direction != CONVERGED:
        if direction == SHRINKING:
            how = f"still shrinking (×{trend:.2f} over the second half): converging too slowly"
        else:
            how = f"not shrinking (×{trend:.2f} over the second half): drifting or cycling"
        return NOT_STABLE, f"direction: last step {last_step:.1e} > {rule.tol_step:g}, {how}"
    if certificate == FAILS:
        return NOT_STABLE, f"settled but the block Jacobian is expanding (ρ = {radius:.3f})"
    rho = f", ρ = {radius:.3f}" if math.isfinite(radius) else ""
    grows = f"; the norm grows ({norm_trend})" if norm_trend == LINEAR else ""
    settled = f"settled in direction (last step {last_step:.1e}{rho}){grows}"
    if math.isfinite(min_cosine) and min_cosine >= rule.degenerate_cosine:
        return STABLE_DEGENERATE, (
            f"{settled}; layers' fixed points collapse "
            f"(min cos {min_cosine:.4f} ≥ {rule.degenerate_cosine:g})"
        )
    return STABLE_DISTINCT, f"{settled}; distinct layer fixed points (min cos {min_cosine:.4f})"


def judge_parts(
    *,
    finite: bool,
    last_step: float,
    trend: float,
    radius: float,
    min_cosine: float,
    rule: VerdictRule,
    first_bad_recurrence: int | None = None,
    raw_last_step: float = math.nan,
    norm_exponent: float = math.nan,
) -> Verdict:
    """The four parts of one cell's measurements under ``rule``, and the label they give."""
    parts = (
        direction_part(last_step if finite else math.nan, trend, rule),
        magnitude_part(raw_last_step if finite else math.nan, rule),
        norm_trend_part(finite, norm_exponent, rule),
        certificate_part(radius, rule),
    )
    label, reason = _label(
        finite=finite,
        last_step=last_step,
        trend=trend,
        radius=radius,
        min_cosine=min_cosine,
        norm_exponent=norm_exponent,
        parts=parts,
        rule=rule,
        first_bad_recurrence=first_bad_recurrence,
    )
    return Verdict(label, reason, *parts)


def judge(
    *,
    finite: bool,
    last_step: float,
    trend: float,
    radius: float,
    min_cosine: float,
    rule: VerdictRule,
    first_bad_recurrence: int | None = None,
    raw_last_step: float = math.nan,
    norm_exponent: float = math.nan,
) -> tuple[str, str]:
    """(label, reason) of :func:`judge_parts`."""
    v = judge_parts(
        finite=finite,
        last_step=last_step,
        trend=trend,
        radius=radius,
        min_cosine=min_cosine,
        rule=rule,
        first_bad_recurrence=first_bad_recurrence,
        raw_last_step=raw_last_step,
        norm_exponent=norm_exponent,
    )
    return v.label, v.reason


def verdict_of(measures: StateMeasures, radius: float, rule: VerdictRule) -> Verdict:
    """:func:`judge_parts` on a run's measures and its block spectral radius (NaN: unknown)."""
    return judge_parts(
        finite=measures.finite,
        last_step=measures.last_step,
        trend=measures.trend,
        radius=radius,
        min_cosine=measures.min_cosine,
        rule=rule,
        first_bad_recurrence=measures.first_bad_recurrence,
        raw_last_step=measures.raw_last_step,
        norm_exponent=measures.norm_exponent,
    )


def judge_measures(measures: StateMeasures, radius: float, rule: VerdictRule) -> tuple[str, str]:
    """(label, reason) of :func:`verdict_of`."""
    v = verdict_of(measures, radius, rule)
    return v.label, v.reason
