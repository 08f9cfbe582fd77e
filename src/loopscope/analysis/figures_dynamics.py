"""Figures for the dynamics analyses (steps, fixed points, cycles, attention, trajectories,
limiting behaviour, the attention bound, fixed-point solves): one function per result, each
returning a standalone :class:`matplotlib.figure.Figure` on an Agg canvas. No pyplot and no
global backend switch: figures are never shown or kept alive by pyplot, so reports can save many
of them and tests can inspect them without a display."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import ArrayLike, NDArray

from loopscope.analysis.attention_dynamics import BoundCheck
from loopscope.analysis.dynamics import FixedPointDistances, PCATrajectory, SuccessiveDifferences
from loopscope.analysis.limiting import LIMIT_LABELS, LimitingBehaviour

__all__ = [
    "plot_attention_heatmap",
    "plot_bound_check",
    "plot_cosine_heatmap",
    "plot_fixed_point_distances",
    "plot_limiting_behaviour",
    "plot_pca_trajectory",
    "plot_solver_convergence",
    "plot_successive_differences",
]

GroupBy = Literal["recurrence", "layer"]

_LABEL_COLOURS = {
    "fixed_point": "tab:green",
    "orbit": "tab:purple",
    "slider": "tab:orange",
    "unknown": "tab:gray",
    "divergent": "tab:red",
}


def _figure(ncols: int, width: float = 5.0, height: float = 4.0) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _log_y_if_positive(ax: Axes, *arrays: ArrayLike) -> None:
    """Log-scale y only when there is positive finite data, so empty/zero curves still draw."""
    vals = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])
    if np.any(np.isfinite(vals) & (vals > 0)):
        ax.set_yscale("log", nonpositive="mask")


def _train_line(ax: Axes, train_recurrences: int | None) -> None:
    if train_recurrences is not None:
        ax.axvline(train_recurrences, color="k", ls="--", lw=1, label="training recurrences")


def _layer_lines(
    ax: Axes, x: NDArray[Any], curves: NDArray[Any], ylabel: str, title: str, log: bool
) -> None:
    """One line per layer (columns of ``curves``)."""
    for layer in range(curves.shape[1]):
        ax.plot(x, curves[:, layer], marker=".", ms=3, label=f"layer {layer}")
    ax.set_xlabel("recurrence r")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        _log_y_if_positive(ax, curves)
    ax.grid(alpha=0.3)


def plot_successive_differences(
    diffs: SuccessiveDifferences, *, train_recurrences: int | None = None, title: str | None = None
) -> Figure:
    """Two panels: relative step ‖X[r]−X[r−1]‖/‖X[r]‖ (log y) and step cosine, per layer."""
    fig, (ax_n, ax_c) = _figure(2)
    r = np.arange(1, diffs.relative.shape[0] + 1)
    _layer_lines(ax_n, r, diffs.relative, "‖X[r] − X[r−1]‖ / ‖X[r]‖", "Successive difference", True)
    _layer_lines(ax_c, r, diffs.cosine, "cos(X[r], X[r−1])", "Successive cosine", False)
    for ax in (ax_n, ax_c):
        _train_line(ax, train_recurrences)
        ax.legend(fontsize="small")
    n_div = int(diffs.divergent.sum())
    suffix = f" ({n_div} divergent tokens excluded)" if n_div else ""
    fig.suptitle((title or "Successive differences per block layer") + suffix)
    return fig


def plot_fixed_point_distances(
    residual: FixedPointDistances,
    attention: ArrayLike | None = None,
    *,
    train_recurrences: int | None = None,
    title: str | None = None,
) -> Figure:
    """Residual relative distance (log y) and cosine to X*, plus attention distance if given."""
    fig, axes = _figure(3 if attention is not None else 2)
    r = np.arange(residual.relative.shape[0])
    _layer_lines(
        axes[0], r, residual.relative, "‖X[r] − X*‖ / ‖X*‖", "Residual to fixed point", True
    )
    _layer_lines(axes[1], r, residual.cosine, "cos(X[r], X*)", "Cosine to fixed point", False)
    if attention is not None:
        att = np.asarray(attention, dtype=np.float64)
        _layer_lines(
            axes[2],
            np.arange(att.shape[0]),
            att,
            "‖A[r] − A*‖_F (mean over heads)",
            "Attention to fixed point",
            True,
        )
    for ax in axes:
        _train_line(ax, train_recurrences)
        ax.legend(fontsize="small")
    fig.suptitle(title or "Distance to the approximate fixed point")
    return fig


def _pair_order(n_rec: int, n_layers: int, group_by: GroupBy) -> NDArray[np.intp]:
    """Permutation of r-major indices; "layer" puts each layer's recurrences side by side."""
    idx = np.arange(n_rec * n_layers).reshape(n_rec, n_layers)
    return (idx.T if group_by == "layer" else idx).reshape(-1)


def _pair_heatmap(
    matrix: ArrayLike,
    n_layers: int,
    group_by: GroupBy,
    cmap: str,
    cbar_label: str,
    title: str,
    vmin: float | None,
    vmax: float | None,
) -> Figure:
    m = np.asarray(matrix, dtype=np.float64)
    n = m.shape[0]
    if n_layers <= 0 or n % n_layers:
        raise ValueError(f"matrix size {n} is not a multiple of n_layers={n_layers}")
    n_rec = n // n_layers
    order = _pair_order(n_rec, n_layers, group_by)
    m = m[np.ix_(order, order)]
    fig, (ax,) = _figure(1, width=6.5, height=5.5)
    im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    fig.colorbar(im, ax=ax, label=cbar_label)
    outer, inner = (n_layers, n_rec) if group_by == "layer" else (n_rec, n_layers)
    outer_name, inner_name = ("layer", "r") if group_by == "layer" else ("r", "layer")
    step = max(1, int(np.ceil(outer / 16)))  # at most ~16 labelled groups
    ticks = np.arange(0, outer, step) * inner + (inner - 1) / 2
    labels = [f"{outer_name} {g}" for g in range(0, outer, step)]
    ax.set_xticks(ticks, labels, rotation=90, fontsize="small")
    ax.set_yticks(ticks, labels, fontsize="small")
    for b in np.arange(1, outer) * inner - 0.5:
        ax.axhline(b, color="w", lw=0.4)
        ax.axvline(b, color="w", lw=0.4)
    axis_name = f"({outer_name}, {inner_name}) pairs, grouped by {group_by}"
    ax.set_xlabel(axis_name)
    ax.set_ylabel(axis_name)
    ax.set_title(title)
    return fig


def plot_cosine_heatmap(
    matrix: ArrayLike,
    n_layers: int,
    *,
    group_by: GroupBy = "recurrence",
    title: str = "Cosine between (recurrence, layer) residual streams",
) -> Figure:
    """Heatmap of :func:`layer_recurrence_cosine` (input r-major); stripes every L = a cycle."""
    return _pair_heatmap(
        matrix, n_layers, group_by, "viridis", "mean per-token cosine", title, None, 1.0
    )


def plot_attention_heatmap(
    matrix: ArrayLike,
    n_layers: int,
    *,
    group_by: GroupBy = "layer",
    title: str = "Attention distance between (layer, recurrence) pairs",
) -> Figure:
    """Heatmap of :func:`attention_pair_distances`; grouped by layer, block-diagonal = each
    layer's heads look like themselves at other recurrences."""
    return _pair_heatmap(
        matrix, n_layers, group_by, "magma_r", "‖A_i − A_j‖_F (mean over heads)", title, 0.0, None
    )


def plot_pca_trajectory(
    traj: PCATrajectory, *, title: str = "Latent trajectory (PCA)", last_loops: int = 1
) -> Figure:
    """PC1/PC2 path of one token: per-layer paths over recurrences (start ○, end ■), the realised
    path in grey, and the last ``last_loops`` recurrences' layer cycle closed with arrows."""
    pts = traj.points
    n_rec, n_layers = pts.shape[0], pts.shape[1]
    xy = pts[..., :2] if pts.shape[-1] >= 2 else np.concatenate([pts, np.zeros_like(pts)], -1)
    fig, (ax,) = _figure(1, width=6.5, height=5.5)
    realised = xy.reshape(-1, 2)
    ax.plot(realised[:, 0], realised[:, 1], color="0.75", lw=0.8, zorder=1, label="realised order")
    colours = matplotlib.colormaps["tab10"]
    for layer in range(n_layers):
        path = xy[:, layer]
        c = colours(layer % 10)
        ax.plot(path[:, 0], path[:, 1], "-", color=c, lw=1, alpha=0.8, marker=".", ms=3, zorder=2)
        ax.plot(*path[0], "o", mfc="none", color=c, ms=8, zorder=3)
        ax.plot(*path[-1], "s", color=c, ms=7, zorder=3, label=f"layer {layer} (○ start, ■ end)")
    for r in range(max(0, n_rec - last_loops), n_rec):
        loop = np.concatenate([xy[r], xy[r, :1]], axis=0)  # close the cycle back to layer 0
        for a, b in zip(loop[:-1], loop[1:], strict=True):
            if np.all(np.isfinite(a)) and np.all(np.isfinite(b)):
                ax.annotate(
                    "",
                    xy=b,
                    xytext=a,
                    zorder=4,
                    arrowprops={"arrowstyle": "->", "color": "k", "lw": 1.2},
                )
    evr = traj.explained_variance_ratio
    pc2 = f"{evr[1]:.1%}" if evr.size > 1 else "n/a"
    ax.set_xlabel(f"PC1 ({evr[0]:.1%} variance)" if evr.size else "PC1")
    ax.set_ylabel(f"PC2 ({pc2} variance)")
    ax.set_title(title + "\narrows: last recurrence's cycle through the layers")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return fig


def _example_tokens(labels: NDArray[np.str_], max_examples: int) -> list[int]:
    """Up to ``max_examples`` token indices, one per label first (rare behaviours shown first)."""
    picked: list[int] = []
    for lab in ("orbit", "slider", "unknown", "fixed_point"):
        hits = np.flatnonzero(labels == lab)
        if hits.size and len(picked) < max_examples:
            picked.append(int(hits[0]))
    rest = [i for i in range(labels.size) if i not in picked and labels[i] != "divergent"]
    return picked + rest[: max(0, max_examples - len(picked))]


def plot_limiting_behaviour(
    result: LimitingBehaviour,
    *,
    rates: Mapping[str, float] | None = None,
    max_examples: int = 6,
    title: str = "Limiting behaviour of the last block layer",
) -> Figure:
    """Rates bar chart (``rates`` overrides, e.g. pooled token rates) and example s_r curves."""
    fig, (ax_b, ax_c) = _figure(2)
    shown = result.rates if rates is None else rates
    values = [float(shown.get(lab, 0.0)) for lab in LIMIT_LABELS]
    bars = ax_b.bar(LIMIT_LABELS, values, color=[_LABEL_COLOURS[lab] for lab in LIMIT_LABELS])
    ax_b.bar_label(bars, labels=[f"{v:.2%}" for v in values], fontsize="small")
    ax_b.set_ylabel("fraction of tokens")
    ax_b.set_ylim(0, 1.1)
    ax_b.set_title(f"Rates (τ={result.tau}, ρ={result.rho})")
    ax_b.tick_params(axis="x", rotation=30)
    r = np.arange(result.cosine_to_last.shape[0])
    for t in _example_tokens(result.labels, max_examples):
        lab = str(result.labels[t])
        extra = f", P={result.periods[t]}" if lab == "orbit" else ""
        ax_c.plot(
            r,
            result.cosine_to_last[:, t],
            color=_LABEL_COLOURS[lab],
            lw=1,
            label=f"token {t}: {lab}{extra}",
        )
    ax_c.axhline(1 - result.tau, color="k", ls=":", lw=1, label="1 − τ")
    ax_c.axvline(r.size // 2, color="0.5", ls="--", lw=1, label="second half starts")
    ax_c.set_xlabel("recurrence r")
    ax_c.set_ylabel("cos(x_r, x_last)")
    ax_c.set_title("Example tokens")
    ax_c.legend(fontsize="x-small")
    ax_c.grid(alpha=0.3)
    fig.suptitle(title)
    return fig


def plot_bound_check(
    check: BoundCheck,
    state_step_norms: ArrayLike | None = None,
    *,
    title: str = "Attention Lipschitz bound (Prop. 4.2)",
) -> Figure:
    """Measured attention steps against the bound per step (log y), and their ratio."""
    fig, (ax_s, ax_r) = _figure(2)
    steps = np.arange(1, check.measured.size + 1)
    ax_s.plot(steps, check.measured, "o-", ms=3, label="measured ‖S(X_t) − S(X_{t−1})‖")
    ax_s.plot(steps, check.bound, "--", label=f"bound {check.lipschitz:.3g}·‖X_t − X_{{t−1}}‖")
    _log_y_if_positive(ax_s, check.measured, check.bound)
    ax_s.set_xlabel("recurrence t")
    ax_s.set_ylabel("norm")
    verdict = "holds" if check.holds else "VIOLATED"
    ax_s.set_title(f"bound {verdict} on {check.n_checked} steps")
    ax_s.legend(fontsize="small")
    ax_s.grid(alpha=0.3)
    x_ratio: Sequence[float] | NDArray[Any] = steps
    xlabel = "recurrence t"
    if state_step_norms is not None:
        x_ratio, xlabel = np.asarray(state_step_norms, dtype=np.float64), "‖X_t − X_{t−1}‖"
    ax_r.plot(x_ratio, check.ratio, "o", ms=4)
    ax_r.axhline(1.0, color="r", ls="--", lw=1, label="bound (ratio 1)")
    ax_r.set_xlabel(xlabel)
    ax_r.set_ylabel("measured / bound")
    ax_r.set_title(f"tightness {check.tightness:.3g}")
    ax_r.legend(fontsize="small")
    ax_r.grid(alpha=0.3)
    fig.suptitle(title)
    return fig


def plot_solver_convergence(
    panels: Mapping[str, Mapping[str, Sequence[float]]], *, tol: float, title: str | None = None
) -> Figure:
    """Relative residual against block applications, one panel per case and one line per
    solver (e.g. plain, Anderson settings and the Krylov bound), with ``tol`` dashed: where
    the lines cross it is the benchmark's count, and their slopes show why."""
    fig, axes = _figure(max(1, len(panels)), width=4.5)
    for ax, (case, curves) in zip(axes, panels.items(), strict=False):
        for solver, residuals in curves.items():
            values = np.asarray(residuals, dtype=np.float64)
            ax.plot(np.arange(1, len(values) + 1), values, marker=".", ms=3, label=solver)
        ax.axhline(tol, color="k", ls="--", lw=1, label=f"tol {tol:g}")
        _log_y_if_positive(ax, *[np.asarray(c, dtype=np.float64) for c in curves.values()])
        ax.set_xlabel("block applications")
        ax.set_ylabel("‖F(z) − z‖ / ‖F(z)‖")
        ax.set_title(case)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title or "Fixed-point solves: residual per block application")
    return fig
