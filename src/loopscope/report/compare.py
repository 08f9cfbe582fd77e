"""Analysed runs set side by side: ``loopscope compare`` and ``analyze --system-variants``.

A run is a directory ``loopscope analyze`` wrote: its ``metrics.json`` and, when it is there,
its ``trace/`` (whose per-prompt stage profiles give the stages figure). The comparison page
has one section per measurement — convergence, limiting behaviour, attention stabilisation,
stages, stability — each with one figure in which every run is one overlaid curve or one bar,
and a summary table. ``metrics.json`` holds one entry per run, keyed by its name.

Numbers are read from ``metrics.json`` as the run's report wrote them; nothing is recomputed
except the stage profiles, pooled over prompts weighted by their site counts as the stages
study pools them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure

from loopscope.core.errors import LoopscopeError
from loopscope.report.html import Figure, ReportPaths, Section, Table, write_report
from loopscope.trace.store import TraceStore

__all__ = [
    "CompareError",
    "Run",
    "load_run",
    "run_summary",
    "summary_table",
    "write_comparison",
    "write_variants_report",
]

#: Stage metrics drawn in the stages figure, with their axis labels.
STAGE_METRICS = {
    "residual_norm": "residual norm",
    "mixing": "mixing",
    "sink_rate": "sink rate",
    "matrix_entropy": "matrix entropy",
}


class CompareError(LoopscopeError):
    """A directory that is not an analysed run, or runs that cannot be compared."""


@dataclass(frozen=True)
class Run:
    """One analysed run: its name on the page, its directory, its ``metrics.json`` and its
    pooled stage profile (metric -> (relative depth, value); empty without a trace)."""

    name: str
    directory: Path
    metrics: dict[str, Any]
    stages: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def dynamics(self) -> dict[str, Any]:
        return dict(self.metrics.get("dynamics", {}))


def _pooled_stages(trace_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each stage metric's count-weighted mean over the traced prompts, against the site's
    depth relative to the deepest site (0 = first layer, 1 = last)."""
    if not (trace_dir / "trace.json").exists():
        return {}
    profiles = [p.stages for p in TraceStore(trace_dir)]
    if not profiles:
        return {}
    depths = np.array([s["depth"] for s in profiles[0]["sites"]], dtype=np.float64)
    relative = depths / depths.max() if depths.max() > 0 else depths
    pooled: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for metric in STAGE_METRICS:
        values, weights = [], []
        for profile in profiles:
            if metric not in profile["metrics"] or len(profile["sites"]) != len(depths):
                continue
            values.append(np.array(profile["metrics"][metric], dtype=np.float64))
            weights.append(np.array(profile.get("counts", [1] * len(depths)), dtype=np.float64))
        if not values:
            continue
        v, w = np.stack(values), np.stack(weights)
        ok = np.isfinite(v) & (w > 0)
        total = np.where(ok, w, 0.0).sum(0)
        summed = np.where(ok, v * w, 0.0).sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            pooled[metric] = (relative, np.where(total > 0, summed / total, np.nan))
    return pooled


def load_run(directory: str | Path, name: str | None = None) -> Run:
    """The analysed run in ``directory`` (named after the directory unless ``name`` is given)."""
    path = Path(directory)
    metrics_path = path / "metrics.json"
    if not metrics_path.is_file():
        raise CompareError(
            f"{path} is not an analysed run (no metrics.json); run `loopscope analyze ... "
            f"--out {path}` first, or give the directory analyze wrote"
        )
    try:
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CompareError(f"{metrics_path} is not valid JSON ({err}); analyse again") from None
    if isinstance(metrics, dict) and "variants" in metrics and "dynamics" not in metrics:
        names = ", ".join(str(path / name) for name in metrics["variants"])
        raise CompareError(
            f"{path} is a page of system-prompt variants; compare its variants' own "
            f"directories instead ({names})"
        )
    if not isinstance(metrics, dict) or "dynamics" not in metrics:
        raise CompareError(
            f"{metrics_path} holds no dynamics entry; give a directory `loopscope analyze` wrote"
        )
    return Run(name or path.resolve().name, path, metrics, _pooled_stages(path / "trace"))


# --------------------------------------------------------------------------- numbers


def _array(value: Any) -> np.ndarray:
    """A metrics.json list as floats (null becomes NaN)."""
    return np.array(
        [[np.nan if x is None else x for x in row] for row in value]
        if value and isinstance(value[0], list)
        else [np.nan if x is None else x for x in value or []],
        dtype=np.float64,
    )


def _last_layer_curve(value: Any) -> np.ndarray:
    """The last block layer's column of a (recurrence, layer) list."""
    arr = _array(value)
    return arr[:, -1] if arr.ndim == 2 and arr.size else arr


def _at(curve: np.ndarray, recurrence: int) -> float | None:
    """The curve's value after ``recurrence`` recurrences (1-based), None if out of range."""
    if not 1 <= recurrence <= len(curve) or not np.isfinite(curve[recurrence - 1]):
        return None
    return float(curve[recurrence - 1])


def run_summary(run: Run) -> dict[str, Any]:
    """The numbers the summary table and the variants' ``metrics.json`` entries hold: the last
    layer's non-fixed-point rates per token and per example, its convergence recurrence (None:
    not within the run), its relative distance to the fixed point at the training depth and at
    half the run, where attention stabilises, and the block's spectral radius."""
    d = run.dynamics
    last = d.get("limiting_behaviour", {}).get("last_layer", {})
    fixed = d.get("fixed_point", {})
    curve = _last_layer_curve(fixed.get("relative"))
    recurrences = int(d.get("recurrences") or len(curve))
    train = int(d.get("train_recurrences") or 1)
    converged = fixed.get("converged_at") or [None]
    attention = d.get("attention_stabilised_from") or [None]
    return {
        "prompts": d.get("prompts"),
        "recurrences": recurrences,
        "non_fixed_point_token_rate": last.get("non_fixed_point_token_rate"),
        "non_fixed_point_example_rate": last.get("non_fixed_point_example_rate"),
        "token_rates": last.get("token_rates"),
        "example_rates": last.get("example_rates"),
        "converged_at": converged[-1],
        "fixed_point_distance_at_train": _at(curve, train),
        "fixed_point_distance_at_half": _at(curve, max(1, recurrences // 2)),
        "attention_stabilised_from": attention[-1],
        "block_radius": d.get("stability", {}).get("block_radius"),
        "prompts_truncated": len(run.metrics.get("truncated_prompts") or []),
        "prompts_skipped": len(run.metrics.get("skipped_prompts") or []),
        "protocol": run.metrics.get("protocol"),
    }


def summary_table(runs: Sequence[Run], title: str = "The runs side by side") -> Table:
    columns = [
        "run",
        "prompts (cut to fit)",
        "tokens not at a fixed point",
        "examples not at a fixed point",
        "converged at r",
        "distance at training depth",
        "distance at half the run",
        "attention stable from r",
        "block ρ",
    ]
    rows = []
    for run in runs:
        s = run_summary(run)
        rows.append(
            [
                run.name,
                f"{s['prompts']} ({s['prompts_truncated']})"
                if s["prompts_truncated"]
                else s["prompts"],
                s["non_fixed_point_token_rate"],
                s["non_fixed_point_example_rate"],
                s["converged_at"],
                s["fixed_point_distance_at_train"],
                s["fixed_point_distance_at_half"],
                s["attention_stabilised_from"],
                s["block_radius"],
            ]
        )
    note = (
        "Last block layer. Rates are the fractions of tokens (examples) whose limit is not a "
        "fixed point; convergence is the first recurrence within the relative threshold of the "
        "fixed point (— when never); distances are ‖X_r − X*‖ / ‖X*‖ to the fixed point X*; "
        "ρ is the block map's spectral radius at X*. Prompts in brackets were cut to the "
        "model's context (--long-prompts truncate keeps their last tokens)."
    )
    return Table(title, columns, rows, note)


# --------------------------------------------------------------------------- figures


def _figure(ncols: int, width: float = 5.0, height: float = 3.8) -> tuple[MplFigure, list[Axes]]:
    fig = MplFigure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _legend(ax: Axes) -> None:
    """A legend when anything drawn has a label (a run may lack the measurement)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _overlay(ax: Axes, runs: Sequence[Run], curves: list[np.ndarray], log: bool = True) -> None:
    drawn = False
    for run, curve in zip(runs, curves, strict=True):
        if curve.size:
            ax.plot(np.arange(1, len(curve) + 1), curve, marker=".", label=run.name)
            drawn = drawn or bool(np.any(np.isfinite(curve) & (curve > 0)))
    if log and drawn:
        ax.set_yscale("log", nonpositive="mask")
    ax.set_xlabel("recurrence")
    _legend(ax)


def convergence_figure(runs: Sequence[Run]) -> MplFigure:
    fig, (left, right) = _figure(2)
    _overlay(
        left,
        runs,
        [_last_layer_curve(r.dynamics.get("fixed_point", {}).get("relative")) for r in runs],
    )
    left.set_ylabel("‖X_r − X*‖ / ‖X*‖ (last layer)")
    left.set_title("distance to the fixed point")
    successive = [
        _last_layer_curve(r.dynamics.get("successive_difference", {}).get("relative")) for r in runs
    ]
    _overlay(right, runs, successive)
    right.set_ylabel("‖X_r − X_{r−1}‖ / ‖X_r‖ (last layer)")
    right.set_title("successive differences")
    return fig


def limiting_figure(runs: Sequence[Run]) -> MplFigure:
    fig, (ax,) = _figure(1, width=6.5)
    names = [r.name for r in runs]
    summaries = [run_summary(r) for r in runs]
    x = np.arange(len(runs))
    for offset, key, label in (
        (-0.2, "non_fixed_point_token_rate", "per token"),
        (0.2, "non_fixed_point_example_rate", "per example"),
    ):
        values = [s[key] if s[key] is not None else np.nan for s in summaries]
        ax.bar(x + offset, values, width=0.4, label=label)
    ax.set_xticks(x, names, rotation=20, ha="right")
    highest = max((s[k] or 0.0 for s in summaries for k in ("non_fixed_point_token_rate",
                   "non_fixed_point_example_rate")), default=0.0)  # fmt: skip
    ax.set_ylim(0.0, max(0.01, 1.15 * highest))  # all-zero rates still show a scale from 0
    ax.set_ylabel("fraction whose limit is not a fixed point")
    ax.set_title("limiting behaviour (last layer)")
    _legend(ax)
    return fig


def attention_figure(runs: Sequence[Run]) -> MplFigure:
    fig, (ax,) = _figure(1, width=6.5)
    curves = [_last_layer_curve(r.dynamics.get("attention_fixed_point_relative")) for r in runs]
    _overlay(ax, runs, curves)
    ax.set_ylabel("attention distance to its limit (last layer)")
    ax.set_title("attention stabilisation")
    return fig


def stages_figure(runs: Sequence[Run]) -> MplFigure:
    fig, axes = _figure(len(STAGE_METRICS), width=3.8)
    for ax, (metric, label) in zip(axes, STAGE_METRICS.items(), strict=True):
        for run in runs:
            if metric in run.stages:
                depth, value = run.stages[metric]
                ax.plot(depth, value, label=run.name)
        ax.set_xlabel("relative depth")
        ax.set_title(label)
    _legend(axes[0])
    return fig


def stability_figure(runs: Sequence[Run]) -> MplFigure:
    fig, (ax,) = _figure(1, width=6.5)
    for run in runs:
        radii = _array(run.dynamics.get("stability", {}).get("layer_radius"))
        if radii.size:
            ax.plot(np.arange(len(radii)), radii, marker="o", label=run.name)
    ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("block layer")
    ax.set_ylabel("spectral radius at the fixed point")
    ax.set_title("stability (1 = neither contracting nor expanding)")
    _legend(ax)
    return fig


# --------------------------------------------------------------------------- pages


def _names(runs: Sequence[Run]) -> None:
    names = [r.name for r in runs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise CompareError(
            f"two runs share the name {', '.join(repeated)}; give each its own name with --names"
        )


def comparison_sections(runs: Sequence[Run]) -> list[Section]:
    """One section per measurement, each with its overlaid figure."""
    has_stages = any(r.stages for r in runs)
    return [
        Section(
            "Convergence",
            "Relative distance of the last block layer's state to the fixed point, and the "
            "relative change between successive recurrences, pooled over each run's prompts.",
            figures=[
                Figure(
                    "compare_convergence",
                    "Convergence, every run overlaid.",
                    convergence_figure(runs),
                )
            ],
        ),
        Section(
            "Limiting behaviour",
            "Fractions of tokens and of examples whose last-layer trajectory does not end at a "
            "fixed point (orbits, sliders, divergent or undecided).",
            figures=[
                Figure("compare_limiting", "Limiting behaviour per run.", limiting_figure(runs))
            ],
        ),
        Section(
            "Attention stabilisation",
            "Distance of the last layer's attention maps to their limit, per recurrence.",
            figures=[
                Figure(
                    "compare_attention",
                    "Attention stabilisation, overlaid.",
                    attention_figure(runs),
                )
            ],
        ),
        Section(
            "Stages",
            "Stage metrics pooled over each run's prompts against relative depth."
            if has_stages
            else "No run has its trace next to its metrics.json, so no stage profile is drawn.",
            figures=[
                Figure("compare_stages", "Stages of inference, overlaid.", stages_figure(runs))
            ]
            if has_stages
            else [],
        ),
        Section(
            "Stability",
            "Spectral radius of each block layer's Jacobian at the fixed point.",
            figures=[
                Figure(
                    "compare_stability", "Stability per layer, overlaid.", stability_figure(runs)
                )
            ],
        ),
    ]


def write_comparison(
    directories: Sequence[str | Path], out: str | Path, *, names: Sequence[str] | None = None
) -> ReportPaths:
    """``loopscope compare``: one page comparing two or more analysed runs."""
    if len(directories) < 2:
        raise CompareError("compare takes two or more analysed run directories")
    if names is not None and len(names) != len(directories):
        raise CompareError(f"--names gives {len(names)} names for {len(directories)} runs")
    runs = [load_run(d, None if names is None else names[i]) for i, d in enumerate(directories)]
    _names(runs)
    return write_report(
        Path(out),
        title="loopscope comparison — " + " vs ".join(r.name for r in runs),
        subtitle=f"{len(runs)} analysed runs: " + ", ".join(str(r.directory) for r in runs),
        verdict=summary_table(runs),
        sections=comparison_sections(runs),
        metrics={"runs": {r.name: run_summary(r) for r in runs}},
    )


def write_variants_report(directories: Sequence[Path], out: Path) -> ReportPaths:
    """``analyze --system-variants``: the variants' table, a limiting-behaviour figure and the
    comparison sections; ``metrics.json`` has one entry per variant under ``variants``."""
    runs = [load_run(d, d.name) for d in directories]
    _names(runs)
    first = runs[0].metrics.get("model", {})
    return write_report(
        out,
        title=f"loopscope system-prompt variants — {first.get('name') or first.get('family')}",
        subtitle="the same prompts traced under each system prompt: "
        + ", ".join(r.name for r in runs),
        verdict=summary_table(runs, "System-prompt variants side by side"),
        sections=comparison_sections(runs),
        metrics={
            "model": first,
            "variants": {
                r.name: {**run_summary(r), "report": f"{r.name}/report.html"} for r in runs
            },
        },
    )
