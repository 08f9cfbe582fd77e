"""Stage alignment: does each pass of the recurrent block repeat the feedforward stages?

A pass's metric curve (k block layers) and a feedforward reference curve (n layers) are put on
a common relative-depth grid on [0, 1] by linear interpolation and z-scored, so that only the
*shape* is compared (looped and feedforward models differ in scale: norms, entropies). Shape
agreement is summarised by Pearson and Spearman correlations and by a dynamic-time-warping
distance, which forgives stages that happen a little earlier or later within the pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from loopscope.analysis.stages import METRICS, StagesProfile

__all__ = [
    "Alignment",
    "align_pass_to_reference",
    "alignment_summary",
    "dtw_distance",
    "resample",
    "stage_alignment",
    "zscore",
]


@dataclass(frozen=True)
class Alignment:
    """How well one pass matches the reference.

    ``grid`` is the relative-depth grid; ``pass_curve`` / ``reference_curve`` are the resampled,
    z-scored curves that were compared. ``dtw_distance`` is the mean |difference| along the
    optimal warping path; ``lockstep_distance`` is the same without warping (the diagonal), so
    ``dtw ≤ lockstep`` always and their gap measures how much warping helped. Correlations are
    NaN when either curve is flat (no shape to compare) or has NaNs.
    """

    pearson: float
    spearman: float
    dtw_distance: float
    lockstep_distance: float
    grid: np.ndarray
    pass_curve: np.ndarray
    reference_curve: np.ndarray


def resample(curve: np.ndarray, size: int) -> np.ndarray:
    """Linear interpolation of ``curve`` (evenly spaced on [0, 1]) onto ``size`` points."""
    y = np.asarray(curve, dtype=np.float64)
    if len(y) == 0:
        raise ValueError("cannot resample an empty curve")
    if len(y) == 1:
        return np.full(size, y[0])
    return np.interp(np.linspace(0.0, 1.0, size), np.linspace(0.0, 1.0, len(y)), y)


def zscore(y: np.ndarray) -> np.ndarray:
    """(y − mean) / std (population std); a flat curve maps to zeros rather than NaN."""
    y = np.asarray(y, dtype=np.float64)
    sd = y.std()
    return (y - y.mean()) / sd if sd > 0 else np.zeros_like(y)


def _ranks(y: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as scipy.stats.rankdata 'average')."""
    order = np.argsort(y, kind="stable")
    ranks = np.empty(len(y), dtype=np.float64)
    ranks[order] = np.arange(len(y), dtype=np.float64)
    _, inv, cnt = np.unique(y, return_inverse=True, return_counts=True)
    sums = np.zeros(len(cnt))
    np.add.at(sums, inv, ranks)
    return sums[inv] / cnt[inv]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or a.std() == 0 or b.std() == 0 or not np.all(np.isfinite(a + b)):
        return float("nan")
    return float(np.clip(np.mean(zscore(a) * zscore(b)), -1.0, 1.0))


def dtw_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Dynamic-time-warping distance with cost |a_i − b_j|, normalised by the path length.

    O(n·m) time and memory; steps (1,0), (0,1), (1,1), ties resolved towards the diagonal.
    Dividing by the number of steps makes distances comparable across grid sizes and with the
    lockstep (diagonal-only) distance.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        raise ValueError("dtw needs non-empty curves")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("nan")
    cost = np.abs(a[:, None] - b[None, :])
    acc = np.full((n + 1, m + 1), np.inf)
    steps = np.zeros((n + 1, m + 1), dtype=np.int64)  # path length to (i, j)
    acc[0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            diag, up, left = acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1]
            if diag <= up and diag <= left:
                best, prev = diag, steps[i - 1, j - 1]
            elif up <= left:
                best, prev = up, steps[i - 1, j]
            else:
                best, prev = left, steps[i, j - 1]
            acc[i, j] = cost[i - 1, j - 1] + best
            steps[i, j] = prev + 1
    return float(acc[n, m] / steps[n, m])


def align_pass_to_reference(
    pass_curve: np.ndarray, reference_curve: np.ndarray, grid_size: int | None = None
) -> Alignment:
    """Compare one pass (k values) with the reference (n values) on relative depth.

    Both are linearly resampled to ``grid_size`` points on [0, 1] (default max(k, n), so no
    layer is lost and neither curve is over-weighted) and z-scored before every score.
    """
    p = np.asarray(pass_curve, dtype=np.float64)
    r = np.asarray(reference_curve, dtype=np.float64)
    g = grid_size or max(len(p), len(r))
    pr, rr = resample(p, g), resample(r, g)
    zp, zr = zscore(pr), zscore(rr)
    finite = bool(np.all(np.isfinite(pr)) and np.all(np.isfinite(rr)))
    return Alignment(
        pearson=_pearson(pr, rr),
        spearman=_pearson(_ranks(pr), _ranks(rr)) if finite else float("nan"),
        dtw_distance=dtw_distance(zp, zr),
        lockstep_distance=float(np.mean(np.abs(zp - zr))) if finite else float("nan"),
        grid=np.linspace(0.0, 1.0, g),
        pass_curve=zp,
        reference_curve=zr,
    )


def stage_alignment(
    profile_looped: StagesProfile,
    profile_reference: StagesProfile,
    metrics: Sequence[str] | None = None,
    grid_size: int | None = None,
) -> dict[str, list[Alignment]]:
    """metric → one :class:`Alignment` per block pass (in recurrence order).

    The reference is taken as a single pass over *all* its sites in depth order (a feedforward
    model stored as block layers at recurrence 0, or as prelude/block/coda). Only the looped
    model's block passes are compared; its prelude and coda are not part of any pass.
    """
    names = (
        list(metrics)
        if metrics is not None
        else [m for m in METRICS if m in profile_looped.metrics and m in profile_reference.metrics]
    )
    out: dict[str, list[Alignment]] = {}
    for m in names:
        _, ref = profile_reference.as_single_pass(m)
        passes = profile_looped.by_recurrence(m)
        out[m] = [align_pass_to_reference(passes[r][1], ref, grid_size) for r in sorted(passes)]
    return out


def alignment_summary(scores: dict[str, list[Alignment]]) -> dict[str, dict[str, float]]:
    """metric → mean (over passes, ignoring NaN) pearson, spearman, dtw and lockstep distance."""

    def mean(xs: list[float]) -> float:
        arr = np.asarray(xs, dtype=np.float64)
        return float(np.nanmean(arr)) if np.any(np.isfinite(arr)) else float("nan")

    return {
        m: {
            "pearson": mean([a.pearson for a in al]),
            "spearman": mean([a.spearman for a in al]),
            "dtw_distance": mean([a.dtw_distance for a in al]),
            "lockstep_distance": mean([a.lockstep_distance for a in al]),
        }
        for m, al in scores.items()
    }
