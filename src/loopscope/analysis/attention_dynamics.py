"""Dynamics of the attention maps of a looped model, as pure functions of one prompt's maps:
their distance to the maps at the fixed point, the distances between every pair of
(recurrence, layer) maps, and the Lipschitz bound on how much attention can move per
recurrence, ‖S(X_t) − S(X_{t−1})‖ ≤ (B·κ/√d)·‖X_t − X_{t−1}‖ with B the largest input token
norm, κ the largest per-head ‖W_Q W_Kᵀ‖₂ and d the head width.

``attn`` arrays are (R, L, H, T, T): row-stochastic causal attention probabilities per head.
Query rows that are non-finite anywhere are dropped from every norm, like divergent tokens of
the residual stream.
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
    stays_below_from,
)

__all__ = [
    "BoundCheck",
    "attention_bound_check",
    "attention_fixed_point_distances",
    "attention_pair_distances",
    "attention_stabilised_from",
    "kappa_from_weights",
]


# --------------------------------------------------------------------------- distances between maps


def _attn_rows(attn: ArrayLike, name: str = "attn") -> tuple[NDArray[Any], BoolArray]:
    a = as_array(attn, 5, name)
    if a.shape[-1] != a.shape[-2]:
        raise ValueError(f"{name} must be (R, L, H, T, T), got shape {a.shape}")
    return a, finite_tokens(a)


def attention_fixed_point_distances(
    attn: ArrayLike, reference: ArrayLike | None = None
) -> FloatArray:
    """(R, L): ‖A[r,l,h] − A*[l,h]‖_F, mean over heads: the attention maps' approach to their
    fixed point.

    ``reference`` is (L, H, T, T), default ``attn[-1]``. Query rows that are non-finite
    anywhere (in ``attn`` or the reference) are dropped from every norm.
    """
    a, ok = _attn_rows(attn)
    ref = a[-1] if reference is None else as_array(reference, 4, "reference")
    if ref.shape != a.shape[1:]:
        raise ValueError(f"reference shape {ref.shape} does not match attn {a.shape[1:]}")
    ok = ok & finite_tokens(ref)
    ref_ok = f64(ref[:, :, ok, :])
    out = np.zeros(a.shape[:2])
    for r in range(a.shape[0]):
        diff = f64(a[r][:, :, ok, :]) - ref_ok  # (L, H, T', T)
        out[r] = frobenius(np.nan_to_num(diff)).mean(axis=-1) if a.shape[2] else np.nan
    return out


def attention_pair_distances(attn: ArrayLike) -> FloatArray:
    """(R*L, R*L), r-major: ‖A_i − A_j‖_F between every pair of (recurrence, layer) attention
    maps, mean over heads. Block structure along the layer stride means a layer's
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
        m = np.nan_to_num(f64(flat[:, h][:, ok, :]).reshape(n, -1))
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
    return stays_below_from(attn_fixed_point_curve, tol)


# ---------------------------------------------------------------------------------- Lipschitz bound


@dataclass(frozen=True)
class BoundCheck:
    """Attention Lipschitz bound check: ‖S(X_t) − S(X_{t−1})‖ ≤ (B·κ/√d)·‖X_t − X_{t−1}‖.

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
    """Compare measured attention steps with the Lipschitz bound of the module docstring.

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
    w = f64(w)
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
