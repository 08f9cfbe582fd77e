"""Dynamics of a looped model's residual stream as pure functions of one prompt's states:
how much each block layer still moves between recurrences, how close it is to a fixed point,
whether the layers' fixed points are one point or a cycle, the latent trajectory of a token, and
whether convergence keeps improving past the training recurrence count.

Every function takes numpy arrays and returns a frozen dataclass (or an array), never mutates
its input and never raises on NaN/Inf: a token whose states are non-finite anywhere is reported
as ``divergent`` and left out of every norm and mean, so one exploding token cannot hide what
the rest of the prompt does. Attention maps are measured in
:mod:`loopscope.analysis.attention_dynamics`, limiting behaviour in
:mod:`loopscope.analysis.limiting`.

Array conventions (as the engine records them, one prompt at a time):

- ``states``: (R, L, T, D), residual stream after block layer l at recurrence r, T tokens,
  hidden size D. Flattened (recurrence, layer) pairs are always r-major: index ``r * L + l``.

Cosines are per-token means: cos(X, Y) = mean over finite tokens t of cos(X[t], Y[t]). Per-token
means weigh every token equally however large its norm (massive activations at a sink token
would otherwise dominate a cosine of the flattened matrices). Zero vectors: cos(0, 0) = 1 and
cos(0, x) = 0 for x ≠ 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from loopscope.analysis.numerics import (
    BoolArray,
    FloatArray,
    as_array,
    f64,
    finite_tokens,
    frobenius,
    mean_or_nan,
    safe_ratio,
    stays_below_from,
    token_cosine,
)

__all__ = [
    "Degeneracy",
    "FixedPointDistances",
    "PCATrajectory",
    "SuccessiveDifferences",
    "convergence_recurrence",
    "degeneracy",
    "extrapolation_summary",
    "fixed_point_distances",
    "layer_recurrence_cosine",
    "pca_trajectory",
    "successive_differences",
]


# --------------------------------------------------------------------------- successive differences


@dataclass(frozen=True)
class SuccessiveDifferences:
    """Step-to-step change of every block layer; row i compares recurrence i+1 with i.

    ``norm`` (R-1, L): ‖X[r,l] − X[r−1,l]‖_F over finite tokens × hidden.
    ``relative`` (R-1, L): ``norm`` / ‖X[r,l]‖_F (scale-free, comparable across models).
    ``cosine`` (R-1, L): mean over finite tokens of cos(X[r,l,t], X[r−1,l,t]).
    ``divergent`` (T,): tokens left out because some state was non-finite.
    """

    norm: FloatArray
    relative: FloatArray
    cosine: FloatArray
    divergent: BoolArray


def successive_differences(states: ArrayLike) -> SuccessiveDifferences:
    """How much each layer's output still moves from one recurrence to the next: a curve that
    falls towards 0 is a layer settling."""
    x = as_array(states, 4, "states")
    r_count, n_layers = x.shape[0], x.shape[1]
    ok = finite_tokens(x)
    steps = max(r_count - 1, 0)
    norm = np.zeros((steps, n_layers))
    rel = np.zeros((steps, n_layers))
    cos = np.zeros((steps, n_layers))
    prev = f64(x[0][:, ok]) if r_count else np.zeros((n_layers, 0, x.shape[3]))
    for r in range(1, r_count):
        cur = f64(x[r][:, ok])  # (L, T', D)
        with np.errstate(all="ignore"):
            norm[r - 1] = frobenius(cur - prev)
            rel[r - 1] = safe_ratio(norm[r - 1], frobenius(cur))
        cos[r - 1] = mean_or_nan(token_cosine(cur, prev))
        prev = cur
    return SuccessiveDifferences(norm=norm, relative=rel, cosine=cos, divergent=~ok)


# -------------------------------------------------------------------------------------- fixed point


@dataclass(frozen=True)
class FixedPointDistances:
    """Distance of every (recurrence, layer) state to a per-layer reference X*[l].

    ``distance`` (R, L): ‖X[r,l] − X*[l]‖_F over finite tokens.
    ``relative`` (R, L): ``distance`` / ‖X*[l]‖_F (the reference, so each layer's curve has a
    fixed denominator and its shape is the shape of ``distance``).
    ``cosine`` (R, L): mean over finite tokens of cos(X[r,l,t], X*[l,t]).
    ``divergent`` (T,): tokens non-finite in the states or in the reference.
    """

    distance: FloatArray
    relative: FloatArray
    cosine: FloatArray
    divergent: BoolArray


def fixed_point_distances(
    states: ArrayLike, reference: ArrayLike | None = None
) -> FixedPointDistances:
    """Approach of every layer to its approximate fixed point; reference defaults to
    ``states[-1]``.

    With the default reference the last row is zero by construction; pass the state of a longer
    (or Anderson-accelerated) run to measure distance to a better fixed point.
    """
    x = as_array(states, 4, "states")
    ref = x[-1] if reference is None else as_array(reference, 3, "reference")
    if ref.shape != x.shape[1:]:
        raise ValueError(f"reference shape {ref.shape} does not match states {x.shape[1:]}")
    ok = finite_tokens(x) & finite_tokens(ref)
    r_count, n_layers = x.shape[0], x.shape[1]
    ref_ok = f64(ref[:, ok])
    ref_norm = frobenius(ref_ok)
    dist = np.zeros((r_count, n_layers))
    cos = np.zeros((r_count, n_layers))
    for r in range(r_count):
        cur = f64(x[r][:, ok])
        with np.errstate(all="ignore"):
            dist[r] = frobenius(cur - ref_ok)
        cos[r] = mean_or_nan(token_cosine(cur, ref_ok))
    rel = safe_ratio(dist, np.broadcast_to(ref_norm, dist.shape))
    return FixedPointDistances(distance=dist, relative=rel, cosine=cos, divergent=~ok)


def convergence_recurrence(relative_curve: ArrayLike, tol: float) -> int | None:
    """First recurrence r from which the curve stays ≤ ``tol`` to the end (None if never).

    NaN counts as above ``tol``. With the default reference (the last state) the curve always
    ends at 0, so choose ``tol`` well above the noise floor or use a longer-run reference.
    """
    return stays_below_from(relative_curve, tol)


# --------------------------------------------------------------------- cosine between pairs, cycles


def _pairwise_cosine(x: NDArray[Any], ok: BoolArray) -> FloatArray:
    """(N, N) per-token mean cosine between N stacked (T, D) states, over ``ok`` tokens."""
    n = x.shape[0]
    t_ok = int(ok.sum())
    if t_ok == 0:
        return np.full((n, n), np.nan)
    dtype = np.float32 if x.dtype == np.float32 else np.float64  # float32 keeps big traces small
    sel = np.asarray(x[:, ok, :], dtype=dtype)
    with np.errstate(all="ignore"):
        norms = np.sqrt(np.einsum("ntd,ntd->nt", sel, sel, dtype=np.float64))  # (N, T')
        unit = sel / np.where(norms > 0, norms, 1.0)[..., None].astype(dtype)
    flat = unit.reshape(n, -1)
    cos = f64(flat @ flat.T)
    zero = (norms == 0).astype(np.float64)
    cos += zero @ zero.T  # cos(0, 0) = 1
    cos /= t_ok
    return np.asarray(np.clip(cos, -1.0, 1.0), dtype=np.float64)


def layer_recurrence_cosine(states: ArrayLike) -> FloatArray:
    """(R*L, R*L), r-major: per-token mean cosine between every pair of (recurrence, layer)
    residual streams. A cycle shows as bright off-diagonal stripes every L steps."""
    x = as_array(states, 4, "states")
    r_count, n_layers, t, d = x.shape
    return _pairwise_cosine(x.reshape(r_count * n_layers, t, d), finite_tokens(x))


@dataclass(frozen=True)
class Degeneracy:
    """Whether the block's per-layer fixed points are one point or a cycle of distinct points.

    ``pairwise`` (L, L): per-token mean cosine between X*[i] and X*[j].
    ``min_cosine``: min over l ≠ 0 of ``pairwise[0, l]`` (NaN when L = 1: nothing to compare).
    ``divergent`` (T,): tokens left out.
    """

    min_cosine: float
    pairwise: FloatArray
    divergent: BoolArray

    def is_degenerate(self, threshold: float = 0.99) -> bool:
        """True when every layer's fixed point has collapsed onto layer 0's (cos ≥ threshold)."""
        return bool(self.min_cosine >= threshold)


def degeneracy(fixed_states: ArrayLike) -> Degeneracy:
    """Whether per-layer fixed points (L, T, D) are one point: a minimum cosine to layer 0's near
    1 means the block's layers collapsed onto it, lower means a cycle of distinct points."""
    x = as_array(fixed_states, 3, "fixed_states")
    ok = finite_tokens(x)
    pair = _pairwise_cosine(x, ok)
    min_cos = float(np.min(pair[0, 1:])) if x.shape[0] > 1 else float("nan")
    return Degeneracy(min_cosine=min_cos, pairwise=pair, divergent=~ok)


# -------------------------------------------------------------------------------- latent trajectory


@dataclass(frozen=True)
class PCATrajectory:
    """PCA of one token's latent states over all (recurrence, layer) pairs.

    ``points`` (R, L, n): projections (NaN for non-finite states). ``explained_variance_ratio``
    (n,). ``mean`` (D,). ``components`` (n, D), orthonormal rows, sign fixed so the entry of
    largest magnitude is positive. Components beyond the data's rank are zero rows.
    """

    points: FloatArray
    explained_variance_ratio: FloatArray
    mean: FloatArray
    components: FloatArray


def pca_trajectory(states_at_position: ArrayLike, n_components: int = 2) -> PCATrajectory:
    """Project every (recurrence, layer) state of one token onto its top principal components
    (PCA): a closed loop through the layers of the last recurrences is a cycle."""
    x = as_array(states_at_position, 3, "states_at_position")
    r_count, n_layers, d = x.shape
    flat = f64(x.reshape(-1, d))
    ok = np.isfinite(flat).all(axis=1)
    data = flat[ok]
    comps = np.zeros((n_components, d))
    evr = np.zeros(n_components)
    mean = data.mean(axis=0) if data.shape[0] else np.zeros(d)
    if data.shape[0]:
        centred = data - mean
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        k = min(n_components, vt.shape[0])
        vt = vt[:k]
        signs = np.sign(vt[np.arange(k), np.argmax(np.abs(vt), axis=1)])
        comps[:k] = vt * np.where(signs == 0, 1.0, signs)[:, None]
        total = float(np.sum(s**2))
        if total > 0:
            evr[:k] = s[:k] ** 2 / total
    points = np.full((flat.shape[0], n_components), np.nan)
    points[ok] = (data - mean) @ comps.T
    return PCATrajectory(
        points=points.reshape(r_count, n_layers, n_components),
        explained_variance_ratio=evr,
        mean=mean,
        components=comps,
    )


# ------------------------------------------------------------------------------------ extrapolation


def _decay_rate(values: FloatArray) -> float | None:
    """Geometric factor per recurrence, exp(slope of log v), from positive finite values."""
    pos = np.isfinite(values) & (values > 0)
    if pos.sum() < 2:
        return None
    r = np.flatnonzero(pos).astype(np.float64)
    slope = np.polyfit(r, np.log(values[pos]), 1)[0]
    return float(np.exp(slope))


def extrapolation_summary(
    curve: ArrayLike, train_recurrences: int, *, first_recurrence: int = 0
) -> dict[str, float | int | bool | None]:
    """Does a convergence curve keep improving past the training recurrence count?

    ``curve[i]`` belongs to recurrence ``first_recurrence + i`` (pass 1 for a successive
    difference curve, whose first entry compares recurrences 1 and 0). *Before* is recurrences
    < ``train_recurrences``, *after* the rest. Non-finite values are ignored. Keys:
    ``mean_before``, ``mean_after``, ``ratio_after_before`` (< 1: smaller past training),
    ``at_train`` (last value before), ``final``, ``final_over_at_train``, ``decay_rate_before`` /
    ``decay_rate_after`` (geometric factor per recurrence from a log-linear fit; < 1 shrinking),
    ``keeps_shrinking`` (decay_rate_after < 1 and final < at_train), ``n_before``, ``n_after``,
    ``train_recurrences``. Values are None where a side has no usable data.
    """
    c = np.asarray(curve, dtype=np.float64).reshape(-1)
    split = int(np.clip(train_recurrences - first_recurrence, 0, c.size))
    before, after = c[:split], c[split:]

    def mean(v: FloatArray) -> float | None:
        f = v[np.isfinite(v)]
        return float(f.mean()) if f.size else None

    def last(v: FloatArray) -> float | None:
        f = v[np.isfinite(v)]
        return float(f[-1]) if f.size else None

    def div(a: float | None, b: float | None) -> float | None:
        if a is None or b is None:
            return None
        return float(safe_ratio(np.array(a), np.array(b)))

    m_before, m_after = mean(before), mean(after)
    at_train, final = last(before), last(after)
    rate_after = _decay_rate(after)
    keeps = (
        rate_after is not None
        and rate_after < 1.0
        and at_train is not None
        and final is not None
        and final < at_train
    )
    return {
        "train_recurrences": int(train_recurrences),
        "n_before": int(before.size),
        "n_after": int(after.size),
        "mean_before": m_before,
        "mean_after": m_after,
        "ratio_after_before": div(m_after, m_before),
        "at_train": at_train,
        "final": final,
        "final_over_at_train": div(final, at_train),
        "decay_rate_before": _decay_rate(before),
        "decay_rate_after": rate_after,
        "keeps_shrinking": bool(keeps),
    }
