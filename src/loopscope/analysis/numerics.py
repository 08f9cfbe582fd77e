"""Numerics shared by the dynamics analyses: shape checks, finite-token masks, the per-token
cosine and NaN-safe means and ratios.

Conventions every analysis inherits from here: tokens sit on axis -2; a token whose entries are
non-finite anywhere is left out (and reported as divergent by the caller); cos(0, 0) = 1 and
cos(0, x) = 0 for x ≠ 0; 0/0 = 0 and x/0 = ∞, so a zero reference never crashes a ratio.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

__all__ = [
    "BoolArray",
    "FloatArray",
    "as_array",
    "f64",
    "finite_tokens",
    "frobenius",
    "mean_or_nan",
    "mean_over_prompts",
    "safe_ratio",
    "stays_below_from",
    "token_cosine",
]


def as_array(a: ArrayLike, ndim: int, name: str) -> NDArray[np.floating[Any]]:
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


def f64(x: NDArray[Any]) -> FloatArray:
    return np.asarray(x, dtype=np.float64)


def token_cosine(a: FloatArray, b: FloatArray) -> FloatArray:
    """Per-row cosine of two (..., D) arrays, with the zero-vector convention above."""
    dot = np.einsum("...d,...d->...", a, b)
    na = np.sqrt(np.einsum("...d,...d->...", a, a))
    nb = np.sqrt(np.einsum("...d,...d->...", b, b))
    den = na * nb
    with np.errstate(all="ignore"):
        cos = np.where(den > 0, dot / np.where(den > 0, den, 1.0), 0.0)
    cos = np.where((na == 0) & (nb == 0), 1.0, cos)
    return np.clip(cos, -1.0, 1.0)


def mean_or_nan(x: FloatArray, axis: int = -1) -> FloatArray:
    """Mean along ``axis`` that gives NaN (not a warning) for an empty axis."""
    if x.shape[axis] == 0:
        shape = list(x.shape)
        del shape[axis]
        return np.full(shape, np.nan)
    return np.asarray(x.mean(axis=axis), dtype=np.float64)


def safe_ratio(num: FloatArray, den: FloatArray) -> FloatArray:
    """num/den with 0/0 = 0 and x/0 = inf, so a zero reference never crashes."""
    with np.errstate(all="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num == 0, 0.0, np.inf))
    return np.asarray(out, dtype=np.float64)


def frobenius(x: FloatArray) -> FloatArray:
    """Frobenius norm over the last two axes."""
    with np.errstate(all="ignore"):
        return np.sqrt(np.einsum("...ij,...ij->...", x, x))


def stays_below_from(curve: ArrayLike, tol: float) -> int | None:
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


def mean_over_prompts(arrays: list[np.ndarray]) -> np.ndarray:
    """Mean over prompts ignoring NaN; the first prompt's array when nothing is finite."""
    with np.errstate(all="ignore"):
        stacked = np.stack(arrays)
        out: np.ndarray = np.nanmean(stacked, axis=0) if np.isfinite(stacked).any() else stacked[0]
    return out
