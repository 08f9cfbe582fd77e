"""Limiting behaviour of a looped model's tokens: does each token's state settle on a fixed
point, circle an orbit, slide steadily towards where it ends, diverge, or none of these; and
those labels pooled over prompts as token and example rates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from loopscope.analysis.numerics import FloatArray, as_array, f64, finite_tokens, token_cosine

#: Labels of :func:`classify_limiting_behaviour`, in the order rates are reported.
LIMIT_LABELS: tuple[str, ...] = ("fixed_point", "orbit", "slider", "unknown", "divergent")

__all__ = [
    "LIMIT_LABELS",
    "LimitingBehaviour",
    "LimitingRates",
    "classify_limiting_behaviour",
    "per_example_rates",
]


@dataclass(frozen=True)
class LimitingBehaviour:
    """Per-token limiting behaviour of one block layer (the report classifies every layer).

    ``labels`` (T,): one of :data:`LIMIT_LABELS`. ``periods`` (T,): orbit period, 0 otherwise.
    ``rates``: label → fraction of the T tokens (every label present, summing to 1 when T > 0).
    ``cosine_to_last`` (R, T): s_r = cos(x_r, x_{R−1}) per token (NaN for divergent tokens).
    ``tau``, ``rho``: the thresholds used.
    """

    labels: NDArray[np.str_]
    periods: NDArray[np.int64]
    rates: dict[str, float]
    cosine_to_last: FloatArray
    tau: float
    rho: float


def _return_fractions(window: FloatArray, tau: float) -> FloatArray:
    """(P_max+1, T): fraction of r in the window with 1 − cos(x_r, x_{r+P}) ≤ τ, per lag P.

    Row 0 is unused. Uses each token's (M, M) Gram matrix, so all lags cost one batched matmul.
    """
    m, t, _ = window.shape
    p_max = m // 2
    out = np.zeros((p_max + 1, t))
    if p_max == 0:
        return out
    per_tok = np.transpose(window, (1, 0, 2))  # (T, M, D)
    with np.errstate(all="ignore"):
        gram = per_tok @ np.transpose(per_tok, (0, 2, 1))
        norms = np.sqrt(np.clip(np.einsum("tmm->tm", gram), 0.0, None))
        den = norms[:, :, None] * norms[:, None, :]
        cos = np.where(den > 0, gram / np.where(den > 0, den, 1.0), 0.0)
    both_zero = (norms[:, :, None] == 0) & (norms[:, None, :] == 0)
    cos = np.where(both_zero, 1.0, cos)
    for p in range(1, p_max + 1):
        lag = np.diagonal(cos, offset=p, axis1=1, axis2=2)  # (T, M−P)
        out[p] = np.mean(1.0 - lag <= tau, axis=1)
    return out


def classify_limiting_behaviour(
    last_layer_states: ArrayLike, tau: float = 0.05, rho: float = 0.9
) -> LimitingBehaviour:
    """Label each token fixed point / orbit / slider / unknown / divergent.

    The rule (our decision; the study gave only τ and ρ). Let s_r = cos(x_r, x_{R−1}),
    d_r = 1 − s_r, and the *second half* be recurrences h = ⌊R/2⌋ … R−1. In order:

    1. ``divergent``: some state of the token is non-finite.
    2. ``fixed_point``: d_r ≤ τ for at least a fraction ρ of r ∈ [h, R−2] (the last recurrence,
       trivially d = 0, is left out).
    3. ``orbit`` with period P: P ≥ 2 is the smallest lag, 1 ≤ P ≤ (R−h)/2, for which the state
       returns, i.e. 1 − cos(x_r, x_{r+P}) ≤ τ for at least a fraction ρ of the pairs
       h ≤ r < r+P ≤ R−1 (compared directly, not through x_{R−1}). Lag 1 not qualifying is the
       "moves in between" condition; if lag 1 qualifies the token is step-stationary, no orbit.
    4. ``slider``: d_r > τ at r = h (it has not settled) and d is non-increasing
       (d_{r+1} ≤ d_r + 1e-6) on at least a fraction ρ of the steps in [h, R−2]: a steady drift
       towards where it ends up, never returning.
    5. ``unknown``: anything else, and every token when R < 3 (no second half to judge).
    """
    x = as_array(last_layer_states, 3, "last_layer_states")
    r_count, t, _ = x.shape
    ok = finite_tokens(x)
    labels = np.full(t, "unknown", dtype="<U11")
    periods = np.zeros(t, dtype=np.int64)
    cos_last = np.full((r_count, t), np.nan)
    labels[~ok] = "divergent"
    idx = np.flatnonzero(ok)
    if r_count and idx.size:
        sel = f64(x[:, idx, :])
        cos_last[:, idx] = token_cosine(sel, sel[-1][None])
    half = r_count // 2
    if r_count >= 3 and idx.size:
        d = 1.0 - cos_last[half : r_count - 1][:, idx]  # (W, T')
        fixed = np.mean(d <= tau, axis=0) >= rho
        returns = _return_fractions(f64(x[half:, idx, :]), tau)  # (P_max+1, T')
        qualifies = returns[1:] >= rho  # R >= 3 guarantees at least lag 1
        first = np.where(qualifies.any(axis=0), qualifies.argmax(axis=0) + 1, 0)
        orbit = ~fixed & (first >= 2)
        if d.shape[0] > 1:
            monotone = np.mean(np.diff(d, axis=0) <= 1e-6, axis=0) >= rho
        else:
            monotone = np.ones(d.shape[1], dtype=bool)
        slider = ~fixed & ~orbit & (d[0] > tau) & monotone
        labels[idx[fixed]] = "fixed_point"
        labels[idx[orbit]] = "orbit"
        periods[idx[orbit]] = first[orbit]
        labels[idx[slider]] = "slider"
    rates = {lab: float(np.mean(labels == lab)) if t else 0.0 for lab in LIMIT_LABELS}
    return LimitingBehaviour(
        labels=labels, periods=periods, rates=rates, cosine_to_last=cos_last, tau=tau, rho=rho
    )


@dataclass(frozen=True)
class LimitingRates:
    """Limiting behaviour pooled over prompts.

    ``token_rates``: label → fraction of all tokens of all prompts.
    ``example_rates``: label → fraction of prompts with at least one token of that label.
    ``non_fixed_point_token_rate`` / ``non_fixed_point_example_rate``: the same for "anything
    but fixed_point" (divergent counts as non-fixed-point). Rates are 0 with no tokens/prompts.
    """

    token_rates: dict[str, float]
    example_rates: dict[str, float]
    non_fixed_point_token_rate: float
    non_fixed_point_example_rate: float
    n_tokens: int
    n_examples: int


def per_example_rates(results: Sequence[LimitingBehaviour]) -> LimitingRates:
    """Aggregate per-prompt classifications the way the study reports them (tokens, examples)."""
    all_labels = (
        np.concatenate([r.labels for r in results]) if results else np.array([], dtype="<U11")
    )
    n_tok, n_ex = int(all_labels.size), len(results)

    def frac(x: Sequence[bool] | NDArray[np.bool_], n: int) -> float:
        return float(np.sum(x)) / n if n else 0.0

    token_rates = {lab: frac(all_labels == lab, n_tok) for lab in LIMIT_LABELS}
    example_rates = {
        lab: frac([bool(np.any(r.labels == lab)) for r in results], n_ex) for lab in LIMIT_LABELS
    }
    return LimitingRates(
        token_rates=token_rates,
        example_rates=example_rates,
        non_fixed_point_token_rate=frac(all_labels != "fixed_point", n_tok),
        non_fixed_point_example_rate=frac(
            [bool(np.any(r.labels != "fixed_point")) for r in results], n_ex
        ),
        n_tokens=n_tok,
        n_examples=n_ex,
    )
