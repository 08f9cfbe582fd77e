"""Figures for the stages of inference: the three views, alignment scores, neuron classes and
before/after-intervention comparisons.

Figures are built on :class:`matplotlib.figure.Figure` directly (no pyplot, no global backend
switch), so they are safe in tests, notebooks and worker processes; save with ``fig.savefig``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from loopscope.analysis.alignment import Alignment
from loopscope.analysis.stages import METRICS, NeuronClasses, StagesProfile

__all__ = [
    "METRIC_LABELS",
    "plot_alignment",
    "plot_intervention_comparison",
    "plot_neuron_classes",
    "plot_stages_views",
]

METRIC_LABELS: dict[str, str] = {
    "colsum_concentration": "ColSum concentration",
    "sink_rate": "sink rate",
    "sink_score": "sink score (pos 0)",
    "mixing": "mixing (nats)",
    "matrix_entropy": "matrix entropy / log T",
    "residual_norm": "residual norm",
    "massive_ratio": "max|a| / median|a|",
}
_STAGE_COLORS = {"prelude": "tab:green", "block": "tab:blue", "coda": "tab:red"}
_REF_STYLE: dict[str, Any] = {"color": "black", "linestyle": "--", "linewidth": 1.2}


def _label(m: str) -> str:
    return METRIC_LABELS.get(m, m)


def _metrics(profile: StagesProfile, metrics: Sequence[str] | None) -> list[str]:
    if metrics is not None:
        return list(metrics)
    names = [m for m in METRICS if m in profile.metrics] + [
        m for m in profile.metrics if m not in METRICS
    ]
    return [m for m in names if np.any(np.isfinite(profile.metrics[m]))]


def _pass_colors(n: int) -> list[tuple[float, float, float, float]]:
    """Dark → light blues: later passes lighter."""
    cmap = matplotlib.colormaps["Blues"]
    return [cmap(v) for v in np.linspace(0.95, 0.35, max(n, 1))][:n]


def _depth_panel(
    ax: Axes,
    profile: StagesProfile,
    metric: str,
    reference: StagesProfile | None = None,
    color: str = "0.4",
    marker_stages: bool = True,
) -> None:
    """Realised-depth view; pass boundaries dotted; reference stretched over the same span."""
    x, y = profile.by_depth(metric)
    ax.plot(x, y, color=color, linewidth=1.0)
    if marker_stages:
        for stage, c in _STAGE_COLORS.items():
            idx = [i for i, s in enumerate(profile.sites) if s.stage == stage]
            if idx:
                ax.scatter(x[idx], y[idx], s=10, color=c, zorder=3, label=stage)
    for r in profile.recurrences[1:]:
        first = min(s.depth for s in profile.sites if s.stage == "block" and s.recurrence == r)
        ax.axvline(first - 0.5, color="0.7", linestyle=":", linewidth=0.8)
    if reference is not None and len(x):
        rx, ry = reference.as_single_pass(metric)
        ax.plot(x.min() + rx * (x.max() - x.min()), ry, label="feedforward", **_REF_STYLE)


def plot_stages_views(
    profile: StagesProfile,
    reference: StagesProfile | None = None,
    metrics: Sequence[str] | None = None,
) -> Figure:
    """Grid: rows = metrics; columns = realised depth / by recurrence / by layer.

    The feedforward ``reference`` (if any) is dashed black: stretched over the realised-depth
    span in column 1 and drawn on relative depth [0, 1] in column 2. Column 3 (x = recurrence)
    has no feedforward counterpart, so no reference there.
    """
    names = _metrics(profile, metrics)
    fig = Figure(figsize=(13, 2.6 * max(len(names), 1)), layout="constrained")
    axes = fig.subplots(max(len(names), 1), 3, squeeze=False)
    recs = profile.recurrences
    colors = _pass_colors(len(recs))
    for row, m in enumerate(names):
        a_depth, a_rec, a_layer = axes[row]
        _depth_panel(a_depth, profile, m, reference)
        for (r, (x, y)), c in zip(profile.by_recurrence(m).items(), colors, strict=True):
            lab = f"pass {r}" if r in (recs[0], recs[-1]) else None
            a_rec.plot(x, y, color=c, marker="o", markersize=2.5, linewidth=1.0, label=lab)
        if reference is not None:
            rx, ry = reference.as_single_pass(m)
            a_rec.plot(rx, ry, label="feedforward", **_REF_STYLE)
        layer_cmap = matplotlib.colormaps["tab10"]
        for i, (lay, (x, y)) in enumerate(profile.by_layer(m).items()):
            a_layer.plot(
                x,
                y,
                color=layer_cmap(i % 10),
                marker="o",
                markersize=2.5,
                linewidth=1.0,
                label=f"layer {lay}",
            )
        a_layer.xaxis.set_major_locator(MaxNLocator(integer=True))
        a_depth.set_ylabel(_label(m))
        if row == 0:
            a_depth.set_title("realised depth")
            a_rec.set_title("by recurrence")
            a_layer.set_title("by layer")
            for ax in (a_depth, a_rec, a_layer):
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=7, loc="best")
        if row == len(names) - 1:
            a_depth.set_xlabel("realised depth (layer application)")
            a_rec.set_xlabel("relative depth within pass")
            a_layer.set_xlabel("recurrence")
    return fig


def plot_alignment(scores: Mapping[str, Sequence[Alignment]]) -> Figure:
    """Heatmaps (metric × pass) of Pearson correlation and DTW distance with the reference."""
    names = list(scores)
    n_pass = max((len(v) for v in scores.values()), default=0)
    pear = np.full((len(names), n_pass), np.nan)
    dtw = np.full((len(names), n_pass), np.nan)
    for i, m in enumerate(names):
        for j, a in enumerate(scores[m]):
            pear[i, j], dtw[i, j] = a.pearson, a.dtw_distance
    fig = Figure(
        figsize=(2.5 + 0.9 * max(n_pass, 1) * 2, 1.2 + 0.45 * max(len(names), 1)),
        layout="constrained",
    )
    axes = fig.subplots(1, 2, squeeze=False)[0]
    for ax, data, title, cmap, lim in (
        (axes[0], pear, "Pearson r with feedforward", "coolwarm_r", (-1.0, 1.0)),
        (axes[1], dtw, "DTW distance (z-scored)", "viridis", (0.0, None)),
    ):
        vmax = (
            lim[1] if lim[1] is not None else (np.nanmax(data) if np.isfinite(data).any() else 1.0)
        )
        im = ax.imshow(data, cmap=cmap, vmin=lim[0], vmax=vmax, aspect="auto")
        ax.set_title(title)
        ax.set_yticks(range(len(names)), [_label(m) for m in names])
        ax.set_xticks(range(n_pass), [str(j) for j in range(n_pass)])
        ax.set_xlabel("pass (recurrence)")
        if data.size <= 200:
            for (i, j), v in np.ndenumerate(data):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def plot_neuron_classes(
    classes: Mapping[str, NeuronClasses],
    reference: Mapping[str, NeuronClasses] | None = None,
) -> Figure:
    """Left: prediction / suppression fraction per layer (keys in order; reference dashed on
    relative depth). Right: every neuron's skew vs excess kurtosis with the class thresholds."""
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    ax_frac, ax_sc = fig.subplots(1, 2)
    keys = list(classes)
    x = np.arange(len(keys), dtype=np.float64)
    pred = [classes[k].prediction_fraction for k in keys]
    supp = [classes[k].suppression_fraction for k in keys]
    ax_frac.plot(x, pred, marker="o", color="tab:blue", label="prediction")
    ax_frac.plot(x, supp, marker="o", color="tab:red", label="suppression")
    if reference:
        rk = list(reference)
        rx = np.linspace(0.0, max(len(keys) - 1, 0), len(rk)) if len(rk) > 1 else np.zeros(1)
        ax_frac.plot(
            rx,
            [reference[k].prediction_fraction for k in rk],
            color="tab:blue",
            linestyle="--",
            linewidth=1.0,
            marker="x",
            label="prediction (ff)",
        )
        ax_frac.plot(
            rx,
            [reference[k].suppression_fraction for k in rk],
            color="tab:red",
            linestyle="--",
            linewidth=1.0,
            marker="x",
            label="suppression (ff)",
        )
    ax_frac.set_xticks(x, keys, rotation=60, fontsize=7)
    ax_frac.set_ylabel("fraction of neurons")
    ax_frac.set_ylim(bottom=0.0)
    ax_frac.set_title("prediction / suppression neurons")
    ax_frac.legend(fontsize=7)
    cmap = matplotlib.colormaps["viridis"]
    for i, k in enumerate(keys):
        c = classes[k]
        ax_sc.scatter(c.skew, c.kurtosis, s=3, alpha=0.5, color=cmap(i / max(len(keys) - 1, 1)))
    if keys:
        c0 = classes[keys[0]]
        ax_sc.axhline(c0.kurtosis_threshold, color="0.5", linestyle=":")
        ax_sc.axvline(c0.skew_threshold, color="0.5", linestyle=":")
        ax_sc.axvline(-c0.skew_threshold, color="0.5", linestyle=":")
    ax_sc.set_yscale("symlog")
    ax_sc.set_xlabel("skew of W_U w_out")
    ax_sc.set_ylabel("excess kurtosis")
    ax_sc.set_title("neurons (colour = layer order)")
    return fig


def plot_intervention_comparison(
    before: StagesProfile,
    after: StagesProfile,
    metrics: Sequence[str] | None = None,
    labels: tuple[str, str] = ("before", "after"),
) -> Figure:
    """Side by side in realised depth: rows = metrics, columns = before / after (shared y);
    each panel also shows the other profile in light grey for direct comparison."""
    names = _metrics(before, metrics)
    fig = Figure(figsize=(10, 2.4 * max(len(names), 1)), layout="constrained")
    axes = fig.subplots(max(len(names), 1), 2, squeeze=False, sharey="row")
    for row, m in enumerate(names):
        for col, (prof, other) in enumerate(((before, after), (after, before))):
            ax = axes[row][col]
            if m in other.metrics:
                ox, oy = other.by_depth(m)
                ax.plot(ox, oy, color="0.8", linewidth=1.0)
            if m in prof.metrics:
                _depth_panel(ax, prof, m, color="0.3")
            if row == 0:
                ax.set_title(labels[col])
            if row == len(names) - 1:
                ax.set_xlabel("realised depth")
        axes[row][0].set_ylabel(_label(m))
    return fig
