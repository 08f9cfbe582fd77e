"""The stages-of-inference report sections (three views, alignment with a feedforward reference,
neuron classes, an intervention's effect), the verdict table, and every number they show."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from loopscope.analysis.alignment import Alignment, alignment_summary, stage_alignment
from loopscope.analysis.figures_stages import (
    METRIC_LABELS,
    plot_alignment,
    plot_intervention_comparison,
    plot_neuron_classes,
    plot_stages_views,
)
from loopscope.analysis.stages import METRICS, NeuronClasses, StagesProfile
from loopscope.report.html import Figure, Section, Table
from loopscope.studies.stages.profile import InterventionResult

__all__ = ["check_metric_names", "stages_sections", "stages_verdict"]

#: Alignment tables list every pass up to this many, else the first and last half of it.
MAX_PASS_ROWS = 24


def _present(profile: StagesProfile) -> list[str]:
    """Metrics with at least one finite value, in the canonical order."""
    return [m for m in METRICS if m in profile.metrics and np.isfinite(profile.metrics[m]).any()]


def _shown(profile: StagesProfile, show_metrics: Sequence[str] | None) -> list[str]:
    """The metrics to draw: ``show_metrics`` (checked) or every measured one."""
    if show_metrics is None:
        return _present(profile)
    check_metric_names(show_metrics)
    return [m for m in _present(profile) if m in show_metrics]


def check_metric_names(names: Sequence[str]) -> None:
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown stage metrics {unknown}; choose from {', '.join(METRICS)}")


def _label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def _profile_metrics(profile: StagesProfile) -> dict[str, Any]:
    d = profile.to_dict()
    d["site_names"] = [s.name for s in profile.sites]
    return d


def _extreme(profile: StagesProfile, metric: str, largest: bool) -> tuple[float, str]:
    v = profile.metrics[metric]
    if not np.isfinite(v).any():
        return float("nan"), ""
    i = int(np.nanargmax(v) if largest else np.nanargmin(v))
    if np.nanmax(v) == np.nanmin(v):
        return float(v[i]), "every site"
    return float(v[i]), profile.sites[i].name


def _pass_rows(passes: list[int]) -> tuple[list[int], str]:
    """Which passes a table lists, and a note when some are left out."""
    if len(passes) <= MAX_PASS_ROWS:
        return passes, ""
    half = MAX_PASS_ROWS // 2
    shown = passes[:half] + passes[-half:]
    return shown, (
        f"{len(passes) - len(shown)} middle passes left out here; metrics.json has every pass."
    )


def _views_section(
    looped: StagesProfile, reference: StagesProfile | None, names: list[str]
) -> Section:
    rows: list[list[Any]] = []
    recs = looped.recurrences
    for m in names:
        lo, lo_site = _extreme(looped, m, largest=False)
        hi, hi_site = _extreme(looped, m, largest=True)
        per_pass = looped.by_recurrence(m)
        first = float(np.nanmean(per_pass[recs[0]][1])) if recs else None
        last = float(np.nanmean(per_pass[recs[-1]][1])) if recs else None
        rows.append([_label(m), lo, lo_site, hi, hi_site, first, last])
    text = (
        "Seven stage metrics at every layer application (site), averaged over the prompts: "
        "attention sinks (ColSum concentration, sink rate and the sink score of the first "
        "token), token mixing (mean row entropy of attention), the matrix entropy of the "
        "residual stream (compression valleys), its norm, and the massive-activation ratio "
        "max|a| / median|a|.\n\n"
        "Three views of the same numbers: in realised depth (every layer application in the "
        "order it ran; dotted lines start a new pass of the block), by recurrence (each pass "
        "as one curve on relative depth within the block, darker = earlier) and by layer (each "
        "block layer across recurrences)."
    )
    if reference is not None:
        text += (
            " The feedforward reference is dashed black, stretched over the same span, so a "
            "pass that repeats the feedforward stages traces the dashed curve."
        )
    n = looped.meta.get("n_prompts")
    return Section(
        title="Stages of inference",
        text=text,
        tables=[
            Table(
                title="Stage metrics of the looped model",
                columns=[
                    "metric",
                    "min",
                    "min at",
                    "max",
                    "max at",
                    "mean over first pass",
                    "mean over last pass",
                ],
                rows=rows,
                note=f"Averages over {n} prompts." if n else "",
            )
        ],
        figures=[
            Figure(
                name="stages-views",
                caption="Stage metrics by realised depth, by recurrence and by block layer.",
                figure=plot_stages_views(looped, reference, metrics=names),
            )
        ],
    )


def _alignment_section(
    scores: dict[str, list[Alignment]], summary: dict[str, dict[str, float]], passes: list[int]
) -> Section:
    names = list(scores)
    shown, note = _pass_rows(passes)
    index = {r: j for j, r in enumerate(passes)}

    def per_pass(attr: str, title: str) -> Table:
        rows: list[list[Any]] = [
            [f"pass {r}", *[getattr(scores[m][index[r]], attr) for m in names]] for r in shown
        ]
        return Table(title=title, columns=["pass", *map(_label, names)], rows=rows, note=note)

    mean_rows: list[list[Any]] = [
        [
            _label(m),
            summary[m]["pearson"],
            summary[m]["spearman"],
            summary[m]["dtw_distance"],
            summary[m]["lockstep_distance"],
        ]
        for m in names
    ]
    return Section(
        title="Stage alignment with the feedforward model",
        text=(
            "Each pass of the block is compared with the whole feedforward model as one pass: "
            "both curves are resampled to relative depth on [0, 1] and z-scored, so only their "
            "shape counts. Pearson r near 1 means the pass goes through the same stages in the "
            "same order; the DTW distance (0 = identical shape) forgives stages that come a "
            "little earlier or later; it never exceeds the lockstep distance."
        ),
        tables=[
            Table(
                title="Alignment averaged over passes",
                columns=["metric", "Pearson r", "Spearman ρ", "DTW distance", "lockstep distance"],
                rows=mean_rows,
                note="NaN: a curve is flat or was not measured (no shape to compare).",
            ),
            per_pass("pearson", "Pearson r with the feedforward model, per pass"),
            per_pass("dtw_distance", "DTW distance to the feedforward model, per pass"),
        ],
        figures=[
            Figure(
                name="stages-alignment",
                caption="Per pass and metric: Pearson r (left) and DTW distance (right) "
                "between the pass and the feedforward model.",
                figure=plot_alignment(scores),
            )
        ],
    )


def _classes_metrics(classes: Mapping[str, NeuronClasses]) -> dict[str, dict[str, float]]:
    return {
        k: {
            "prediction_fraction": c.prediction_fraction,
            "suppression_fraction": c.suppression_fraction,
            "neurons": int(len(c.kurtosis)),
            "kurtosis_threshold": c.kurtosis_threshold,
            "skew_threshold": c.skew_threshold,
        }
        for k, c in classes.items()
    }


def _neuron_section(
    classes: Mapping[str, NeuronClasses],
    reference: Mapping[str, NeuronClasses] | None,
    notes: Sequence[str],
) -> Section:
    rows: list[list[Any]] = [
        [k, c.prediction_fraction, c.suppression_fraction, len(c.kurtosis)]
        for k, c in classes.items()
    ]
    rows += [
        [f"feedforward {k}", c.prediction_fraction, c.suppression_fraction, len(c.kurtosis)]
        for k, c in (reference or {}).items()
    ]
    text = (
        "Every MLP neuron's direct effect on the logits (its output weight projected on the "
        "unembedding, final-norm gain folded in) is reduced to its skew and excess kurtosis: "
        "heavy right tails boost a few tokens (prediction neurons), heavy left tails suppress a "
        "few (suppression neurons). In feedforward models they concentrate in the last layers."
    )
    if notes:
        text += "\n\n" + " ".join(notes)
    first = next(iter(classes.values()), None)
    note = (
        f"Thresholds: excess kurtosis > {first.kurtosis_threshold:g}, |skew| > "
        f"{first.skew_threshold:g}. A block layer's weights serve every recurrence."
        if first is not None
        else ""
    )
    figures = []
    if classes:
        figures.append(
            Figure(
                name="stages-neuron-classes",
                caption="Prediction / suppression fraction per layer (feedforward dashed) and "
                "every neuron's skew vs excess kurtosis.",
                figure=plot_neuron_classes(classes, reference),
            )
        )
    return Section(
        title="Prediction and suppression neurons",
        text=text,
        tables=[
            Table(
                title="Neuron classes per layer",
                columns=["layer", "prediction fraction", "suppression fraction", "neurons"],
                rows=rows,
                note=note,
            )
        ]
        if rows
        else [],
        figures=figures,
    )


def _intervention_metrics(result: InterventionResult) -> dict[str, Any]:
    change: dict[str, Any] = {}
    for m in _present(result.before):
        diff = result.after.metrics[m] - result.before.metrics[m]
        finite = np.isfinite(diff)
        if not finite.any():
            continue
        i = int(np.nanargmax(np.abs(np.where(finite, diff, np.nan))))
        change[m] = {
            "mean_abs_change": float(np.mean(np.abs(diff[finite]))),
            "max_abs_change": float(abs(diff[i])),
            "max_change_site": result.before.sites[i].name,
            "difference": diff,
        }
    return {
        "specs": result.specs,
        "kl": result.kl,
        "top1_agreement": result.top1_agreement,
        "per_prompt_kl": result.per_prompt_kl,
        "after": _profile_metrics(result.after),
        "change": change,
    }


def _intervention_section(
    result: InterventionResult, metrics: Mapping[str, Any], names: list[str]
) -> Section:
    change = {m: c for m, c in metrics["change"].items() if m in names}
    rows: list[list[Any]] = [
        [
            _label(m),
            c["mean_abs_change"],
            c["max_abs_change"],
            c["max_change_site"],
        ]
        for m, c in change.items()
    ]
    what = ", ".join(result.specs)
    return Section(
        title=f"Intervention: {what}",
        text=(
            f"The same prompts with {what} applied (zero: the branch output is removed before "
            "it joins the residual stream; scale / replace: it is rewritten). Left: without, "
            "right: with the intervention; the other profile is drawn in light grey.\n\n"
            f"Output change: mean KL(before ‖ after) of the next-token distribution "
            f"{result.kl:.4g} nats; the most likely next token is unchanged at "
            f"{100 * result.top1_agreement:.1f}% of positions."
        ),
        tables=[
            Table(
                title="Change of the stage metrics",
                columns=["metric", "mean |after − before|", "max |after − before|", "max at"],
                rows=rows,
            )
        ],
        figures=[
            Figure(
                name="stages-intervention",
                caption=f"Stage metrics in realised depth without and with {what}.",
                figure=plot_intervention_comparison(
                    result.before, result.after, metrics=names, labels=("before", f"after {what}")
                ),
            )
        ],
    )


def stages_sections(
    looped: StagesProfile,
    reference: StagesProfile | None = None,
    neuron_classes: Mapping[str, NeuronClasses] | None = None,
    intervention: InterventionResult | None = None,
    *,
    reference_neuron_classes: Mapping[str, NeuronClasses] | None = None,
    notes: Sequence[str] = (),
    show_metrics: Sequence[str] | None = None,
) -> tuple[list[Section], dict[str, Any]]:
    """Report sections for the stages of inference, and every number they show.

    Sections: the three views (with the feedforward overlay), the alignment with the
    reference (when given), neuron classes (when given) and a before/after comparison (when an
    intervention result is given). The metrics dict holds per-site metric arrays with site
    names, alignment per pass and its summary, neuron fractions and intervention effects.
    ``show_metrics`` limits figures and tables to some metrics (default: all measured ones);
    the metrics dict keeps every profile value.
    """
    shown = _shown(looped, show_metrics)
    sections = [_views_section(looped, reference, shown)]
    metrics: dict[str, Any] = {"looped": _profile_metrics(looped)}
    if reference is not None:
        metrics["reference"] = _profile_metrics(reference)
        names = [m for m in shown if m in _present(reference)]
        scores = stage_alignment(looped, reference, metrics=names)
        summary = alignment_summary(scores)
        passes = looped.recurrences
        metrics["alignment"] = {
            m: [
                {
                    "recurrence": r,
                    "pearson": a.pearson,
                    "spearman": a.spearman,
                    "dtw_distance": a.dtw_distance,
                    "lockstep_distance": a.lockstep_distance,
                }
                for r, a in zip(passes, al, strict=True)
            ]
            for m, al in scores.items()
        }
        metrics["alignment_summary"] = summary
        if names and passes:
            sections.append(_alignment_section(scores, summary, passes))
    if neuron_classes is not None or notes:
        classes = dict(neuron_classes or {})
        sections.append(_neuron_section(classes, reference_neuron_classes, notes))
        metrics["neuron_classes"] = _classes_metrics(classes)
        if reference_neuron_classes is not None:
            metrics["reference_neuron_classes"] = _classes_metrics(reference_neuron_classes)
    if intervention is not None:
        metrics["intervention"] = _intervention_metrics(intervention)
        sections.append(_intervention_section(intervention, metrics["intervention"], shown))
    return sections, metrics


def stages_verdict(
    looped: StagesProfile, metrics: Mapping[str, Any], show_metrics: Sequence[str] | None = None
) -> Table:
    """One row per metric: alignment with the reference (mean over passes) when there is one,
    and where the looped model's metric peaks; massive activations get their own sentence."""
    summary: Mapping[str, Mapping[str, float]] = metrics.get("alignment_summary", {})
    aligned = bool(summary)
    rows: list[list[Any]] = []
    for m in _shown(looped, show_metrics):
        hi, site = _extreme(looped, m, largest=True)
        row: list[Any] = [_label(m)]
        if aligned:
            s = summary.get(m, {})
            row += [s.get("pearson"), s.get("dtw_distance")]
        rows.append([*row, hi, site])
    columns = ["metric"]
    if aligned:
        columns += ["Pearson r with feedforward (mean over passes)", "DTW (mean over passes)"]
    columns += ["looped: max", "max at"]
    note = ""
    if "massive_ratio" in looped.metrics:
        ratio, where = _extreme(looped, "massive_ratio", largest=True)
        note = (
            f"Largest massive-activation ratio of the looped model: {ratio:.3g} at {where} "
            "(hundreds or more indicate massive activations; a Gaussian stream gives under 10)."
        )
    if aligned:
        note += " Pearson r near 1 and DTW near 0 mean every pass repeats the feedforward stages."
    return Table(
        title="Stages of inference: verdict", columns=columns, rows=rows, note=note.strip()
    )
