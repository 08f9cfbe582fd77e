"""Dynamics of a looped model as pure functions of one prompt's trace (SPEC §2 items 1–6, 8).

Every function takes numpy arrays and returns a frozen dataclass (or an array), never mutates
its input and never raises on NaN/Inf: a token whose states are non-finite anywhere is reported
as ``divergent`` and left out of every norm and mean, so one exploding token cannot hide what
the rest of the prompt does.

Array conventions (as the engine records them, one prompt at a time):

- ``states``: (R, L, T, D), residual stream after block layer l at recurrence r, T tokens,
  hidden size D. Flattened (recurrence, layer) pairs are always r-major: index ``r * L + l``.
- ``attn``: (R, L, H, T, T), row-stochastic causal attention probabilities per head.

Cosines are per-token means: cos(X, Y) = mean over finite tokens t of cos(X[t], Y[t]). Per-token
means weigh every token equally however large its norm (massive activations at a sink token
would otherwise dominate a cosine of the flattened matrices). Zero vectors: cos(0, 0) = 1 and
cos(0, x) = 0 for x ≠ 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

#: Labels of :func:`classify_limiting_behaviour`, in the order rates are reported.
LIMIT_LABELS: tuple[str, ...] = ("fixed_point", "orbit", "slider", "unknown", "divergent")

__all__ = [
    "LIMIT_LABELS",
    "BoundCheck",
    "Degeneracy",
    "FixedPointDistances",
    "LimitingBehaviour",
    "LimitingRates",
    "PCATrajectory",
    "SuccessiveDifferences",
    "attention_bound_check",
    "attention_fixed_point_distances",
    "attention_pair_distances",
    "attention_stabilised_from",
    "classify_limiting_behaviour",
    "convergence_recurrence",
    "degeneracy",
    "extrapolation_summary",
    "finite_tokens",
    "fixed_point_distances",
    "kappa_from_weights",
    "layer_recurrence_cosine",
    "pca_trajectory",
    "per_example_rates",
    "successive_differences",
]


# --------------------------------------------------------------------------- helpers


def _as_array(a: ArrayLike, ndim: int, name: str) -> NDArray[np.floating[Any]]:
    """A floating view of ``a`` with a shape check (shape errors are caller bugs: they raise)."""
    arr = np.asarray(a)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    return arr


def finite_tokens(x: ArrayLike) -> BoolArray:
    """(T,) True where every entry of the token is finite; tokens sit on axis -2.

    Works for states (..., T, D) and attention (..., T, T) alike (for attention it checks the
    token's query rows). Loops over leading slices so no full-size boolean copy is made.
    """
    arr = np.asarray(x)
    if arr.ndim < 2:
        raise ValueError(f"need at least (T, D), got shape {arr.shape}")
    t, d = arr.shape[-2], arr.shape[-1]
    ok = np.ones(t, dtype=bool)
    for block in arr.reshape(-1, t, d):
        ok &= np.isfinite(block).all(axis=-1)
    return ok


def _f64(x: NDArray[Any]) -> FloatArray:
    return np.asarray(x, dtype=np.float64)


def _token_cosine(a: FloatArray, b: FloatArray) -> FloatArray:
    """Per-row cosine of two (..., D) arrays, with the zero-vector convention of the module."""
    dot = np.einsum("...d,...d->...", a, b)
    na = np.sqrt(np.einsum("...d,...d->...", a, a))
    nb = np.sqrt(np.einsum("...d,...d->...", b, b))
    den = na * nb
    with np.errstate(all="ignore"):
        cos = np.where(den > 0, dot / np.where(den > 0, den, 1.0), 0.0)
    cos = np.where((na == 0) & (nb == 0), 1.0, cos)
    return np.clip(cos, -1.0, 1.0)


def _mean_or_nan(x: FloatArray, axis: int = -1) -> FloatArray:
    """Mean along ``axis`` that gives NaN (not a warning) for an empty axis."""
    if x.shape[axis] == 0:
        shape = list(x.shape)
        del shape[axis]
        return np.full(shape, np.nan)
    return np.asarray(x.mean(axis=axis), dtype=np.float64)


def _ratio(num: FloatArray, den: FloatArray) -> FloatArray:
    """num/den with 0/0 = 0 and x/0 = inf, so a zero reference never crashes."""
    with np.errstate(all="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num == 0, 0.0, np.inf))
    return np.asarray(out, dtype=np.float64)


def _frob(x: FloatArray) -> FloatArray:
    """Frobenius norm over the last two axes."""
    with np.errstate(all="ignore"):
        return np.sqrt(np.einsum("...ij,...ij->...", x, x))


def _stays_below_from(curve: ArrayLike, tol: float) -> int | None:
    """First index from which the curve stays ≤ tol to the end; NaN counts as above."""
    c = np.asarray(curve, dtype=np.float64).reshape(-1)
    if c.size == 0:
        return None
    with np.errstate(invalid="ignore"):
        bad = ~(c <= tol)
    if bad[-1]:
        return None
    idx = np.flatnonzero(bad)
    return 0 if idx.size == 0 else int(idx[-1]) + 1


# --------------------------------------------------------------------------- 1. successive


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
    """How much each layer's output still moves from one recurrence to the next (SPEC §2.1)."""
    x = _as_array(states, 4, "states")
    r_count, n_layers = x.shape[0], x.shape[1]
    ok = finite_tokens(x)
    steps = max(r_count - 1, 0)
    norm = np.zeros((steps, n_layers))
    rel = np.zeros((steps, n_layers))
    cos = np.zeros((steps, n_layers))
    prev = _f64(x[0][:, ok]) if r_count else np.zeros((n_layers, 0, x.shape[3]))
    for r in range(1, r_count):
        cur = _f64(x[r][:, ok])  # (L, T', D)
        with np.errstate(all="ignore"):
            norm[r - 1] = _frob(cur - prev)
            rel[r - 1] = _ratio(norm[r - 1], _frob(cur))
        cos[r - 1] = _mean_or_nan(_token_cosine(cur, prev))
        prev = cur
    return SuccessiveDifferences(norm=norm, relative=rel, cosine=cos, divergent=~ok)


# --------------------------------------------------------------------------- 2. fixed point


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
    """Approach to an approximate fixed point (SPEC §2.2); reference defaults to ``states[-1]``.

    With the default reference the last row is zero by construction; pass the state of a longer
    (or Anderson-accelerated) run to measure distance to a better fixed point.
    """
    x = _as_array(states, 4, "states")
    ref = x[-1] if reference is None else _as_array(reference, 3, "reference")
    if ref.shape != x.shape[1:]:
        raise ValueError(f"reference shape {ref.shape} does not match states {x.shape[1:]}")
    ok = finite_tokens(x) & finite_tokens(ref)
    r_count, n_layers = x.shape[0], x.shape[1]
    ref_ok = _f64(ref[:, ok])
    ref_norm = _frob(ref_ok)
    dist = np.zeros((r_count, n_layers))
    cos = np.zeros((r_count, n_layers))
    for r in range(r_count):
        cur = _f64(x[r][:, ok])
        with np.errstate(all="ignore"):
            dist[r] = _frob(cur - ref_ok)
        cos[r] = _mean_or_nan(_token_cosine(cur, ref_ok))
    rel = _ratio(dist, np.broadcast_to(ref_norm, dist.shape))
    return FixedPointDistances(distance=dist, relative=rel, cosine=cos, divergent=~ok)


def convergence_recurrence(relative_curve: ArrayLike, tol: float) -> int | None:
    """First recurrence r from which the curve stays ≤ ``tol`` to the end (None if never).

    NaN counts as above ``tol``. With the default reference (the last state) the curve always
    ends at 0, so choose ``tol`` well above the noise floor or use a longer-run reference.
    """
    return _stays_below_from(relative_curve, tol)


# --------------------------------------------------------------------------- 3./5. attention


def _attn_rows(attn: ArrayLike, name: str = "attn") -> tuple[NDArray[Any], BoolArray]:
    a = _as_array(attn, 5, name)
    if a.shape[-1] != a.shape[-2]:
        raise ValueError(f"{name} must be (R, L, H, T, T), got shape {a.shape}")
    return a, finite_tokens(a)


def attention_fixed_point_distances(
    attn: ArrayLike, reference: ArrayLike | None = None
) -> FloatArray:
    """(R, L): ‖A[r,l,h] − A*[l,h]‖_F, mean over heads (SPEC §2.2 for attention).

    ``reference`` is (L, H, T, T), default ``attn[-1]``. Query rows that are non-finite
    anywhere (in ``attn`` or the reference) are dropped from every norm.
    """
    a, ok = _attn_rows(attn)
    ref = a[-1] if reference is None else _as_array(reference, 4, "reference")
    if ref.shape != a.shape[1:]:
        raise ValueError(f"reference shape {ref.shape} does not match attn {a.shape[1:]}")
    ok = ok & finite_tokens(ref)
    ref_ok = _f64(ref[:, :, ok, :])
    out = np.zeros(a.shape[:2])
    for r in range(a.shape[0]):
        diff = _f64(a[r][:, :, ok, :]) - ref_ok  # (L, H, T', T)
        out[r] = _frob(np.nan_to_num(diff)).mean(axis=-1) if a.shape[2] else np.nan
    return out


def attention_pair_distances(attn: ArrayLike) -> FloatArray:
    """(R*L, R*L), r-major: ‖A_i − A_j‖_F between every pair of (recurrence, layer) attention
    maps, mean over heads (SPEC §2.4). Block structure along the layer stride means a layer's
    heads look like themselves at other recurrences.

    Computed from a Gram matrix of the per-head maps (centred first to limit cancellation), so
    distances below ~1e-7·‖A‖ are at round-off level; the diagonal is exactly 0.
    """
    a, ok = _attn_rows(attn)
    r_count, n_layers, n_heads, t = a.shape[:4]
    n = r_count * n_layers
    out = np.zeros((n, n))
    if n == 0 or n_heads == 0:
        return out
    flat = a.reshape(n, n_heads, t, t)
    for h in range(n_heads):
        m = np.nan_to_num(_f64(flat[:, h][:, ok, :]).reshape(n, -1))
        m = m - m.mean(axis=0, keepdims=True)
        gram = m @ m.T
        sq = np.diag(gram)
        d2 = sq[:, None] + sq[None, :] - 2.0 * gram
        out += np.sqrt(np.clip(d2, 0.0, None))
    out /= n_heads
    np.fill_diagonal(out, 0.0)
    return np.asarray((out + out.T) / 2.0, dtype=np.float64)


def attention_stabilised_from(attn_fixed_point_curve: ArrayLike, tol: float) -> int | None:
    """First recurrence from which the attention distance to its fixed point stays ≤ ``tol``."""
    return _stays_below_from(attn_fixed_point_curve, tol)


# --------------------------------------------------------------------------- 4. cosine / cycles


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
    cos = _f64(flat @ flat.T)
    zero = (norms == 0).astype(np.float64)
    cos += zero @ zero.T  # cos(0, 0) = 1
    cos /= t_ok
    return np.asarray(np.clip(cos, -1.0, 1.0), dtype=np.float64)


def layer_recurrence_cosine(states: ArrayLike) -> FloatArray:
    """(R*L, R*L), r-major: per-token mean cosine between every pair of (recurrence, layer)
    residual streams (SPEC §2.3). A cycle shows as bright off-diagonal stripes every L steps."""
    x = _as_array(states, 4, "states")
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
    """Degeneracy check of SPEC §2.3 on per-layer fixed points (L, T, D): near 1 → collapsed."""
    x = _as_array(fixed_states, 3, "fixed_states")
    ok = finite_tokens(x)
    pair = _pairwise_cosine(x, ok)
    min_cos = float(np.min(pair[0, 1:])) if x.shape[0] > 1 else float("nan")
    return Degeneracy(min_cosine=min_cos, pairwise=pair, divergent=~ok)


# --------------------------------------------------------------------------- 4. bound check


@dataclass(frozen=True)
class BoundCheck:
    """Proposition 4.2 check: ‖S(X_t) − S(X_{t−1})‖ ≤ (B·κ/√d)·‖X_t − X_{t−1}‖.

    ``lipschitz`` = ½·2Bκ/√d = Bκ/√d. ``bound`` and ``measured`` are per step (R-1,).
    ``holds``: every finite measured ≤ bound + eps. ``tightness``: max measured/bound over steps
    with a positive bound (≤ 1 when it holds; near 1 means the bound is sharp; NaN if no step).
    ``ratio`` per step (NaN where bound is 0 or not finite). ``n_checked``: finite steps used.
    """

    bound: FloatArray
    measured: FloatArray
    ratio: FloatArray
    lipschitz: float
    holds: bool
    tightness: float
    n_checked: int


def attention_bound_check(
    attn_step_norms: ArrayLike,
    state_step_norms: ArrayLike,
    kappa: float,
    bound_B: float,  # noqa: N803 - the paper's symbol
    d_head: int,
    *,
    eps: float = 1e-9,
) -> BoundCheck:
    """Compare measured attention steps with the Lipschitz bound of SPEC §2.4.

    ``kappa`` is ‖W_Q W_Kᵀ‖₂ (use the max over heads with head-averaged norms, see
    :func:`kappa_from_weights`); ``bound_B`` bounds the input norms; ``d_head`` the head width.
    """
    measured = np.asarray(attn_step_norms, dtype=np.float64).reshape(-1)
    steps = np.asarray(state_step_norms, dtype=np.float64).reshape(-1)
    if measured.shape != steps.shape:
        raise ValueError(f"step norms differ in length: {measured.shape} vs {steps.shape}")
    lip = float(bound_B) * float(kappa) / float(np.sqrt(d_head))
    with np.errstate(all="ignore"):
        bound = lip * steps
        usable = np.isfinite(measured) & np.isfinite(bound)
        ratio = np.where(usable & (bound > 0), measured / np.where(bound > 0, bound, 1.0), np.nan)
    holds = bool(np.all(measured[usable] <= bound[usable] + eps))
    finite_ratio = ratio[np.isfinite(ratio)]
    tight = float(finite_ratio.max()) if finite_ratio.size else float("nan")
    return BoundCheck(
        bound=bound,
        measured=measured,
        ratio=ratio,
        lipschitz=lip,
        holds=holds,
        tightness=tight,
        n_checked=int(usable.sum()),
    )


def _split_heads(w: NDArray[Any], n_heads: int, name: str) -> FloatArray:
    """(H, D, dh) from (D, H*dh) or (H, D, dh)."""
    w = _f64(w)
    if w.ndim == 3:
        if w.shape[0] != n_heads:
            raise ValueError(f"{name} has {w.shape[0]} heads, expected {n_heads}")
        return w
    if w.ndim != 2 or w.shape[1] % n_heads:
        raise ValueError(f"{name} must be (D, H*dh) or (H, D, dh), got {w.shape}")
    d, hd = w.shape
    return w.reshape(d, n_heads, hd // n_heads).transpose(1, 0, 2)


def kappa_from_weights(
    w_q: ArrayLike, w_k: ArrayLike, n_heads: int, n_kv_heads: int | None = None
) -> FloatArray:
    """(H,) per-head κ_h = ‖W_Q^h (W_K^h)ᵀ‖₂ (spectral norm), without forming the D×D product.

    Layout is ``x @ W``: (D, H*dh) with head h in columns [h·dh, (h+1)·dh), or (H, D, dh).
    An ``nn.Linear`` weight is (out, in): pass ``weight.T``. With grouped-query attention pass
    ``n_kv_heads``; query head h uses key head h // (H / n_kv_heads). RoPE rotates queries and
    keys by position, so for RoPE models this κ is the un-rotated product's norm.
    """
    n_kv = n_heads if n_kv_heads is None else n_kv_heads
    if n_heads % n_kv:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv}")
    q = _split_heads(np.asarray(w_q), n_heads, "w_q")
    k = _split_heads(np.asarray(w_k), n_kv, "w_k")
    group = n_heads // n_kv
    out = np.zeros(n_heads)
    for h in range(n_heads):
        # Q Kᵀ = Uq Rq Rkᵀ Ukᵀ with orthonormal Uq, Uk: the spectral norm is that of Rq Rkᵀ.
        _, rq = np.linalg.qr(q[h])
        _, rk = np.linalg.qr(k[h // group])
        out[h] = float(np.linalg.norm(rq @ rk.T, ord=2))
    return out


# --------------------------------------------------------------------------- 5. PCA


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
    (SPEC §2.5): a closed loop through the layers of the last recurrences is a cycle."""
    x = _as_array(states_at_position, 3, "states_at_position")
    r_count, n_layers, d = x.shape
    flat = _f64(x.reshape(-1, d))
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


# --------------------------------------------------------------------------- 6. limiting


@dataclass(frozen=True)
class LimitingBehaviour:
    """Per-token limiting behaviour of the last block layer (SPEC §2.6).

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
    """Label each token fixed point / orbit / slider / unknown / divergent (SPEC §2.6).

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
    x = _as_array(last_layer_states, 3, "last_layer_states")
    r_count, t, _ = x.shape
    ok = finite_tokens(x)
    labels = np.full(t, "unknown", dtype="<U11")
    periods = np.zeros(t, dtype=np.int64)
    cos_last = np.full((r_count, t), np.nan)
    labels[~ok] = "divergent"
    idx = np.flatnonzero(ok)
    if r_count and idx.size:
        sel = _f64(x[:, idx, :])
        cos_last[:, idx] = _token_cosine(sel, sel[-1][None])
    half = r_count // 2
    if r_count >= 3 and idx.size:
        d = 1.0 - cos_last[half : r_count - 1][:, idx]  # (W, T')
        fixed = np.mean(d <= tau, axis=0) >= rho
        returns = _return_fractions(_f64(x[half:, idx, :]), tau)  # (P_max+1, T')
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


# --------------------------------------------------------------------------- 8. extrapolation


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
    """Does a convergence curve keep improving past the training recurrence count? (SPEC §2.8)

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
        return float(_ratio(np.array(a), np.array(b)))

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
