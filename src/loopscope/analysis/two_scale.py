"""Two-timescale analyses: does the inner loop settle within each outer step, and does the outer
loop settle across its steps? Pure functions over state arrays, their figures and the report
section; :mod:`loopscope.analysis.two_scale_run` runs a nested model to fill them.

A two-scale model (HRM-Text) keeps a fast state z_L, updated L times inside each of H outer
steps with the slow state z_H held fixed, then z_H is updated once. So:

* **inner convergence** reads z_L[h, l] (H, L, T, D): per H step, the step sizes
  ‖z_L[h, l] − z_L[h, l−1]‖ and their geometric rate; with z_H fixed the inner map
  z_L ↦ f(z_L; z_H) has, when it contracts, one fixed point z_L*(h) per H step, and the
  distance to it falls by the rate every L cycle;
* **outer convergence** reads z_H[h] (H, T, D) the same way across H steps;
* **extrapolation** runs each level past its trained count and asks whether the steps keep
  shrinking (:func:`loopscope.analysis.dynamics.extrapolation_summary`);
* **stability** certificates are spectral radii of the inner map's Jacobian at its fixed point
  (z_H fixed) and of the whole H step's (both states moving), from
  :func:`loopscope.analysis.stability.spectral_radius`.

Norms are Frobenius over tokens × hidden; a rate is exp(slope of log step) fitted to the
positive finite steps, so a geometric sequence gives its ratio exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure
from numpy.typing import ArrayLike

from loopscope.analysis.dynamics import extrapolation_summary
from loopscope.analysis.numerics import FloatArray, safe_ratio
from loopscope.analysis.report_parts import Cell, Figure, Section, Table

__all__ = [
    "LevelSteps",
    "StackSummary",
    "TwoScaleResult",
    "geometric_rate",
    "level_steps",
    "plot_inner_steps",
    "plot_outer_steps",
    "pool_two_scale",
    "two_scale_metrics",
    "two_scale_section",
    "two_scale_verdict",
]

#: A level has converged when its last relative step is at most this.
CONVERGED_TOL = 1e-3


def geometric_rate(steps: ArrayLike) -> float:
    """Geometric factor per step, exp(slope of log step), from the positive finite steps;
    NaN with fewer than two of them."""
    s = np.asarray(steps, dtype=np.float64).reshape(-1)
    keep = np.isfinite(s) & (s > 0)
    if keep.sum() < 2:
        return float("nan")
    slope = np.polyfit(np.flatnonzero(keep).astype(np.float64), np.log(s[keep]), 1)[0]
    return float(np.exp(slope))


def _norms(x: FloatArray) -> FloatArray:
    """Frobenius norm over the last two axes (tokens, hidden)."""
    return np.asarray(np.sqrt(np.sum(x * x, axis=(-2, -1))), dtype=np.float64)


@dataclass(frozen=True)
class LevelSteps:
    """Step-to-step change of one level's state along its cycle axis (axis -3 of the states).

    ``step`` (..., n−1): ‖s[i] − s[i−1]‖; ``relative``: ``step`` / ‖s[i]‖; ``rate`` (...):
    :func:`geometric_rate` of ``step``; ``distance`` (..., n): ‖s[i] − s*‖ to the reference
    when one was given (NaN otherwise); ``converged`` (...): last relative step ≤ tol."""

    step: FloatArray
    relative: FloatArray
    rate: FloatArray
    distance: FloatArray
    converged: np.ndarray


def level_steps(
    states: ArrayLike, reference: ArrayLike | None = None, tol: float = CONVERGED_TOL
) -> LevelSteps:
    """Steps of ``states`` (..., n, T, D) along n; ``reference`` (..., T, D) is the level's
    fixed point (per leading index: one inner fixed point per H step)."""
    x = np.asarray(states, dtype=np.float64)
    if x.ndim < 3:
        raise ValueError(f"states must be (..., cycles, tokens, hidden), got shape {x.shape}")
    diff = np.diff(x, axis=-3)
    step = _norms(diff)
    relative = safe_ratio(step, _norms(x[..., 1:, :, :]))
    lead = step.shape[:-1]
    rate = np.array([geometric_rate(row) for row in step.reshape(-1, step.shape[-1])])
    rate = rate.reshape(lead)
    if reference is None:
        distance = np.full(x.shape[:-2], np.nan)
    else:
        ref = np.asarray(reference, dtype=np.float64)
        distance = _norms(x - ref[..., None, :, :])
    last = relative[..., -1] if relative.shape[-1] else np.full(lead, np.nan)
    return LevelSteps(step, relative, rate, distance, np.asarray(last <= tol))


@dataclass(frozen=True)
class StackSummary:
    """One stack's per-layer picture: its layers' fixed points collapsed onto one point
    (``degenerate_cosine``: the degeneracy minimum cosine), the fraction of tokens per
    limiting label of its state, and the first cycle from which its attention stays within
    tolerance of its last maps (None: never, or not measured)."""

    degenerate_cosine: float
    limiting: dict[str, float]
    attention_stable_from: int | None


@dataclass
class TwoScaleResult:
    """Everything measured on one prompt (or pooled over prompts by :func:`pool_two_scale`)."""

    trained: dict[str, int]
    inner: LevelSteps  # at the trained counts, (H, L−1) steps
    outer: LevelSteps  # at the trained counts, (H−1) steps
    inner_extended: FloatArray  # relative inner steps of the last H step, l up to the extension
    outer_extended: FloatArray  # relative outer steps, h up to the extension
    inner_radius: FloatArray  # (H,) ρ of the inner map at its fixed point, per H step
    outer_radius: float  # ρ of the whole H step at the final state
    stacks: dict[str, StackSummary] = field(default_factory=dict)
    prompts: int = 1


def _quiet(reduce: Any, values: ArrayLike, axis: int | None = None) -> Any:
    """A NaN-skipping numpy reduction that returns NaN, without a warning, where every value
    is NaN (an unmeasured quantity, e.g. a rate from too few steps)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return reduce(np.asarray(values, dtype=np.float64), axis=axis)


def _mean(arrays: Sequence[ArrayLike]) -> FloatArray:
    return np.asarray(_quiet(np.nanmean, np.stack([np.asarray(a, float) for a in arrays]), 0))


def pool_two_scale(results: Sequence[TwoScaleResult]) -> TwoScaleResult:
    """Mean curves, median rates and the largest spectral radius over prompts; a level counts
    as converged only where it converged on every prompt."""
    if not results:
        raise ValueError("no prompt was measured")
    first = results[0]

    def pooled(levels: list[LevelSteps]) -> LevelSteps:
        rate = _quiet(np.nanmedian, np.stack([lv.rate for lv in levels]), 0)
        converged = np.logical_and.reduce([lv.converged for lv in levels])
        return LevelSteps(
            _mean([lv.step for lv in levels]),
            _mean([lv.relative for lv in levels]),
            np.asarray(rate),
            _mean([lv.distance for lv in levels]),
            np.asarray(converged),
        )

    stacks = {
        name: StackSummary(
            float(_quiet(np.nanmin, [r.stacks[name].degenerate_cosine for r in results])),
            {
                label: float(np.mean([r.stacks[name].limiting.get(label, 0.0) for r in results]))
                for label in first.stacks[name].limiting
            },
            _latest([r.stacks[name].attention_stable_from for r in results]),
        )
        for name in first.stacks
    }
    return TwoScaleResult(
        trained=dict(first.trained),
        inner=pooled([r.inner for r in results]),
        outer=pooled([r.outer for r in results]),
        inner_extended=_mean([r.inner_extended for r in results]),
        outer_extended=_mean([r.outer_extended for r in results]),
        inner_radius=np.asarray(_quiet(np.nanmax, np.stack([r.inner_radius for r in results]), 0)),
        outer_radius=float(_quiet(np.nanmax, [r.outer_radius for r in results])),
        stacks=stacks,
        prompts=sum(r.prompts for r in results),
    )


def _latest(values: Sequence[int | None]) -> int | None:
    """The latest stabilisation over prompts (None if any prompt never stabilised)."""
    return None if any(v is None for v in values) else max(v for v in values if v is not None)


# ------------------------------------------------------------------------------------- verdict
def _radius_word(radius: float) -> str:
    if not np.isfinite(radius):
        return "undetermined"
    return "contracting" if radius < 1.0 else "not contracting"


def two_scale_verdict(result: TwoScaleResult) -> dict[str, str]:
    """One line per level: converged or not, at what rate, and what the certificate says."""
    inner_rate = (
        float(_quiet(np.nanmedian, result.inner.rate)) if result.inner.rate.size else np.nan
    )
    outer_rate = (
        float(_quiet(np.nanmedian, result.outer.rate)) if result.outer.rate.size else np.nan
    )
    inner_radius = float(_quiet(np.nanmax, result.inner_radius))
    inner_done = bool(np.all(result.inner.converged))
    outer_done = bool(np.all(result.outer.converged))
    return {
        "inner": (
            f"{'converges' if inner_done else 'does not converge'} within every H step "
            f"(rate {inner_rate:.3g}); inner map {_radius_word(inner_radius)}"
        ),
        "outer": (
            f"{'converges' if outer_done else 'does not converge'} across H steps "
            f"(rate {outer_rate:.3g}); whole H step {_radius_word(result.outer_radius)}"
        ),
    }


def two_scale_metrics(result: TwoScaleResult) -> dict[str, Any]:
    """The ``two_scale`` entry of metrics.json: one object per level."""
    trained = result.trained
    inner_ext = extrapolation_summary(result.inner_extended, trained["l"], first_recurrence=0)
    outer_ext = extrapolation_summary(result.outer_extended, trained["h"], first_recurrence=0)
    return {
        "prompts": result.prompts,
        "trained_cycles": dict(trained),
        "verdict": two_scale_verdict(result),
        "inner": {
            "relative_step": result.inner.relative.tolist(),
            "rate_per_h_step": result.inner.rate.tolist(),
            "converged_per_h_step": [bool(v) for v in np.ravel(result.inner.converged)],
            "distance_to_inner_fixed_point": result.inner.distance.tolist(),
            "spectral_radius_per_h_step": result.inner_radius.tolist(),
            "extrapolation": inner_ext,
        },
        "outer": {
            "relative_step": result.outer.relative.tolist(),
            "rate": float(_quiet(np.nanmedian, result.outer.rate))
            if result.outer.rate.size
            else None,
            "converged": bool(np.all(result.outer.converged)),
            "spectral_radius": result.outer_radius,
            "extrapolation": outer_ext,
        },
        "stacks": {
            name: {
                "degeneracy_min_cosine": s.degenerate_cosine,
                "limiting": s.limiting,
                "attention_stable_from": s.attention_stable_from,
            }
            for name, s in result.stacks.items()
        },
    }


# ------------------------------------------------------------------------------------- figures
def _figure() -> tuple[MplFigure, Any]:
    fig = MplFigure(figsize=(6.0, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _log_if_positive(ax: Any, values: ArrayLike) -> None:
    v = np.asarray(values, dtype=np.float64)
    if np.any(np.isfinite(v) & (v > 0)):
        ax.set_yscale("log", nonpositive="mask")


def plot_inner_steps(relative: ArrayLike, extended: ArrayLike, trained_l: int) -> MplFigure:
    """Relative inner step against L cycle, one line per H step, and the last H step run past
    the trained L count (dashed)."""
    fig, ax = _figure()
    rel = np.atleast_2d(np.asarray(relative, dtype=np.float64))
    for h, row in enumerate(rel):
        ax.plot(np.arange(row.size), row, marker="o", label=f"H step {h}")
    ext = np.asarray(extended, dtype=np.float64)
    ax.plot(np.arange(ext.size), ext, ls="--", color="k", label="last H step, extended")
    ax.axvline(trained_l - 0.5, color="grey", lw=0.8, ls=":")
    _log_if_positive(ax, np.concatenate([rel.ravel(), ext]))
    ax.set_xlabel("L cycle l (step from the state before it)")
    ax.set_ylabel("‖z_L[l] − z_L[l−1]‖ / ‖z_L[l]‖")
    ax.set_title("Inner loop within each H step")
    ax.legend(fontsize=8)
    return fig


def plot_outer_steps(relative: ArrayLike, extended: ArrayLike, trained_h: int) -> MplFigure:
    """Relative outer step against H cycle at the trained counts and run past the trained H
    count (dashed)."""
    fig, ax = _figure()
    rel = np.asarray(relative, dtype=np.float64)
    ext = np.asarray(extended, dtype=np.float64)
    ax.plot(np.arange(rel.size), rel, marker="o", label="trained counts")
    ax.plot(np.arange(ext.size), ext, ls="--", color="k", label="H extended")
    ax.axvline(trained_h - 0.5, color="grey", lw=0.8, ls=":")
    _log_if_positive(ax, np.concatenate([rel, ext]))
    ax.set_xlabel("H cycle h (step from the state before it)")
    ax.set_ylabel("‖z_H[h] − z_H[h−1]‖ / ‖z_H[h]‖")
    ax.set_title("Outer loop across H steps")
    ax.legend(fontsize=8)
    return fig


# ------------------------------------------------------------------------------------- section
def _fmt(x: float) -> Cell:
    return None if not np.isfinite(x) else float(x)


def two_scale_section(result: TwoScaleResult) -> Section:
    """The report section: the verdict per level, a table per level and one figure each."""
    verdict = two_scale_verdict(result)
    inner_rows: list[list[Cell]] = [
        [
            f"H step {h}",
            _fmt(float(result.inner.relative[h, -1])) if result.inner.relative.shape[-1] else None,
            _fmt(float(result.inner.rate[h])),
            _fmt(float(result.inner_radius[h])),
            "yes" if bool(np.ravel(result.inner.converged)[h]) else "no",
        ]
        for h in range(result.inner.rate.shape[0])
    ]
    stack_rows: list[list[Cell]] = [
        [
            name,
            _fmt(s.degenerate_cosine),
            _fmt(s.limiting.get("fixed_point", 0.0)),
            _fmt(s.limiting.get("orbit", 0.0)),
            s.attention_stable_from,
        ]
        for name, s in result.stacks.items()
    ]
    trained = result.trained
    text = (
        f"Two loops: L cycles inside each H cycle (trained {trained['h']} × {trained['l']}), "
        f"measured on {result.prompts} prompt(s). Inner: {verdict['inner']}. "
        f"Outer: {verdict['outer']}.\n\n"
        "The inner rate is the geometric factor by which z_L's step shrinks per L cycle with "
        "z_H held fixed; the spectral radius certifies the inner map at its fixed point "
        "(below 1: locally contracting). The outer rows do the same for z_H across H cycles "
        "and for the whole H step (both states moving)."
    )
    return Section(
        title="Two timescales: inner (L) and outer (H) loops",
        text=text,
        tables=[
            Table(
                "Inner loop per H step",
                ["H step", "last relative step", "rate", "spectral radius", "converged"],
                inner_rows,
            ),
            Table(
                "Outer loop",
                ["level", "last relative step", "rate", "spectral radius", "converged"],
                [
                    [
                        "H",
                        _fmt(float(result.outer.relative[-1]))
                        if result.outer.relative.size
                        else None,
                        _fmt(float(_quiet(np.nanmedian, result.outer.rate))),
                        _fmt(result.outer_radius),
                        "yes" if bool(np.all(result.outer.converged)) else "no",
                    ]
                ],
            ),
            Table(
                "Per stack",
                [
                    "stack",
                    "degeneracy min cosine",
                    "fixed-point tokens",
                    "orbit tokens",
                    "attention stable from cycle",
                ],
                stack_rows,
            ),
        ],
        figures=[
            Figure(
                "two_scale_inner",
                "Inner loop: relative step of z_L per L cycle, one line per H step.",
                plot_inner_steps(result.inner.relative, result.inner_extended, trained["l"]),
            ),
            Figure(
                "two_scale_outer",
                "Outer loop: relative step of z_H per H cycle.",
                plot_outer_steps(result.outer.relative, result.outer_extended, trained["h"]),
            ),
        ],
    )
