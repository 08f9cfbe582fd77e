"""The one verdict rule both sweeps use, from a run's scale-free measures.

States are compared after per-token RMS normalisation, i.e. by direction: every reader of the
stream (the next layer's pre-norm, the final norm) is scale-free, and a pre-norm stack whose
state grows along a settled direction must not count as moving just because its norm grows.

1. *not stable* if any state is NaN/Inf (or the cell raised: the reason says which);
2. *not stable* if the last relative step ‖n_R − n_{R−1}‖/‖n_R‖ (max over layers and prompts)
   exceeds ``tol_step`` — the reason says whether it was still shrinking (slow convergence) or
   not (drift / cycling);
3. *not stable* if the block's Jacobian spectral radius at the last state exceeds
   1 + ``radius_margin`` (an expanding fixed point is not an attractor, however small the step);
4. otherwise *stable, degenerate* when min over l of cos(X*[0], X*[l]) ≥ ``degenerate_cosine``
   (all block layers collapsed onto one point) and *stable, distinct* below.

The thresholds default to those of :class:`loopscope.report.trace_report.Thresholds`
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


@dataclass(frozen=True)
class VerdictRule:
    """Thresholds of the verdict (see the module docstring). ``shrinking_trend``: a last step
    below this fraction of the step at R/2 counts as "still shrinking" in the reason text."""

    tol_step: float = 1e-3
    radius_margin: float = 0.02
    degenerate_cosine: float = 0.99
    shrinking_trend: float = 0.5

    def describe(self) -> str:
        return (
            f"not stable if any state is NaN/Inf, if the last relative step of the "
            f"RMS-normalised state (max over layers and prompts) exceeds {self.tol_step:g}, or if "
            f"the block's Jacobian spectral radius at the last state exceeds "
            f"1 + {self.radius_margin:g}; otherwise stable, degenerate when the min cosine "
            f"between layer 0's fixed point and every other layer's is ≥ "
            f"{self.degenerate_cosine:g}, else stable, distinct"
        )


def judge(
    *,
    finite: bool,
    last_step: float,
    trend: float,
    radius: float,
    min_cosine: float,
    rule: VerdictRule,
    first_bad_recurrence: int | None = None,
) -> tuple[str, str]:
    """(verdict, reason) for one cell's measurements under ``rule``."""
    if not finite:
        where = "" if first_bad_recurrence is None else f" from recurrence {first_bad_recurrence}"
        return NOT_STABLE, f"states became non-finite (NaN/Inf){where}"
    if not math.isfinite(last_step):
        return NOT_STABLE, "no finite step to judge"
    if last_step > rule.tol_step:
        if math.isfinite(trend) and trend < rule.shrinking_trend:
            how = f"still shrinking (×{trend:.2f} over the second half): converging too slowly"
        else:
            how = f"not shrinking (×{trend:.2f} over the second half): drifting or cycling"
        return NOT_STABLE, f"last step {last_step:.1e} > {rule.tol_step:g}, {how}"
    if math.isfinite(radius) and radius > 1.0 + rule.radius_margin:
        return NOT_STABLE, f"settled but the block Jacobian is expanding (ρ = {radius:.3f})"
    rho = f", ρ = {radius:.3f}" if math.isfinite(radius) else ""
    if math.isfinite(min_cosine) and min_cosine >= rule.degenerate_cosine:
        return STABLE_DEGENERATE, (
            f"settled (last step {last_step:.1e}{rho}); layers' fixed points collapse "
            f"(min cos {min_cosine:.4f} ≥ {rule.degenerate_cosine:g})"
        )
    return STABLE_DISTINCT, (
        f"settled (last step {last_step:.1e}{rho}); distinct layer fixed points "
        f"(min cos {min_cosine:.4f})"
    )


def judge_measures(measures: StateMeasures, radius: float, rule: VerdictRule) -> tuple[str, str]:
    """:func:`judge` on a run's measures and its block spectral radius (NaN when unknown)."""
    return judge(
        finite=measures.finite,
        last_step=measures.last_step,
        trend=measures.trend,
        radius=radius,
        min_cosine=measures.min_cosine,
        rule=rule,
        first_bad_recurrence=measures.first_bad_recurrence,
    )
