"""Stages of inference end to end: profile a model over prompts, compare it with a feedforward
reference, classify MLP neurons, measure interventions, and write the report section.

    >>> from loopscope.studies.stages import run_stages
    >>> run_stages("demo", "prompts.jsonl", "out/", reference="demo-feedforward")  # doctest: +SKIP

Profiles are streamed: a :class:`~loopscope.analysis.stages.StagesAccumulator` reduces every
layer's residual stream and attention to a few numbers while the engine runs, so no attention
matrix outlives its layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from loopscope.analysis.alignment import Alignment, alignment_summary, stage_alignment
from loopscope.analysis.figures_stages import (
    METRIC_LABELS,
    plot_alignment,
    plot_intervention_comparison,
    plot_neuron_classes,
    plot_stages_views,
)
from loopscope.analysis.stages import (
    METRICS,
    NeuronClasses,
    StagesAccumulator,
    StagesProfile,
)
from loopscope.analysis.stages import neuron_classes as classify_neurons
from loopscope.engine.contract import InitState, LoopedLM
from loopscope.engine.interventions import InterventionSpec, check_specs
from loopscope.engine.interventions import edit_plan as make_edit_plan
from loopscope.engine.loop import EditPlan
from loopscope.report.html import Figure, ReportPaths, Section, Table, write_report
from loopscope.trace.writer import PromptInput, TraceError, TraceStore

__all__ = [
    "InterventionResult",
    "compare_intervention",
    "neuron_classes_per_layer",
    "pool_profiles",
    "pooled_profile_from_trace",
    "run_stages",
    "stages_profile",
    "stages_sections",
    "stages_verdict",
]

#: Alignment tables list every pass up to this many, else the first and last half of it.
MAX_PASS_ROWS = 24


# --------------------------------------------------------------------------- profiling


def _check_prompts(prompts: Sequence[PromptInput]) -> None:
    if not prompts:
        raise ValueError("no prompts: give at least one prompt (is the prompt file empty?)")
    for i, p in enumerate(prompts):
        if not p.ids:
            raise ValueError(f"prompt {i} has no tokens; remove it from the prompt file")


def _forward(
    model: LoopedLM,
    prompt: PromptInput,
    probe: StagesAccumulator,
    recurrences: int | None,
    plan: EditPlan | None,
    init_state: InitState | None,
    seed: int,
) -> Tensor:
    """One prompt (batch 1, eager attention) through the engine; returns its logits (T, V)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt.ids], device=device)
    out = model(
        ids,
        recurrences=recurrences,
        init_state=init_state,
        seed=seed,
        probes=[probe],
        return_attn=True,
        edit_plan=plan,
    )
    logits: Tensor = out.logits[0]
    return logits


def _profile_meta(model: LoopedLM, n_prompts: int, recurrences: int | None) -> dict[str, Any]:
    meta = model.meta
    return {
        "model": meta.name or meta.family,
        "n_prompts": n_prompts,
        "recurrences": meta.train_recurrences if recurrences is None else int(recurrences),
    }


@torch.no_grad()
def stages_profile(
    model: LoopedLM,
    prompts: Sequence[PromptInput],
    *,
    recurrences: int | None = None,
    edit_plan: EditPlan | None = None,
    sink_threshold: float = 0.3,
    init_state: InitState | None = None,
    seed: int = 0,
    progress: bool = True,
) -> StagesProfile:
    """Stage metrics per site, averaged over prompts (each prompt weighs the same).

    Prompts run one at a time (batch 1, so no padding leaks into the metrics) with eager
    attention; ``recurrences`` defaults to the model's training count, ``edit_plan`` applies an
    intervention (see :mod:`loopscope.engine.interventions`).
    """
    from tqdm.auto import tqdm

    _check_prompts(prompts)
    model.eval()
    acc = StagesAccumulator(sink_threshold=sink_threshold)
    for prompt in tqdm(prompts, desc="stages", disable=not progress):
        _forward(model, prompt, acc, recurrences, edit_plan, init_state, seed)
    profile = acc.result()
    profile.meta.update(_profile_meta(model, len(prompts), recurrences))
    return profile


def pool_profiles(profiles: Sequence[StagesProfile]) -> StagesProfile:
    """Mean of per-prompt profiles over the same sites, each value weighted by its site count;
    NaN values (a metric not observed for that prompt) are left out of the mean."""
    if not profiles:
        raise ValueError("no profiles to pool")
    first = profiles[0]
    names = [s.name for s in first.sites]
    for i, p in enumerate(profiles[1:], 1):
        if [s.name for s in p.sites] != names:
            raise ValueError(
                f"profile {i} has other sites than profile 0 (different recurrences or model?); "
                "pool only profiles of one run"
            )
    weights = np.stack([p.counts for p in profiles]).astype(np.float64)  # (P, S)
    metrics: dict[str, np.ndarray] = {}
    for m in first.metrics:
        values = np.stack([p.metrics.get(m, np.full(len(names), np.nan)) for p in profiles])
        ok = np.isfinite(values) & (weights > 0)
        total = np.where(ok, weights, 0.0).sum(0)
        summed = np.where(ok, values * weights, 0.0).sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            metrics[m] = np.where(total > 0, summed / np.where(total > 0, total, 1.0), np.nan)
    meta = dict(first.meta)
    meta["n_prompts"] = len(profiles)
    return StagesProfile(
        sites=list(first.sites),
        metrics=metrics,
        counts=weights.sum(0).astype(np.int64),
        meta=meta,
    )


def pooled_profile_from_trace(store: TraceStore) -> StagesProfile:
    """The stages profile of a whole trace: the count-weighted mean of every traced prompt's
    ``stages.json``, i.e. the same numbers :func:`stages_profile` gives for those prompts."""
    profiles = [StagesProfile.from_dict(p.stages) for p in store]
    if not profiles:
        raise TraceError(f"{store.path} holds no finished prompts; trace some first")
    pooled = pool_profiles(profiles)
    pooled.meta.setdefault("model", store.meta.get("name") or store.meta.get("family"))
    pooled.meta["recurrences"] = store.settings.get("recurrences")
    return pooled


# --------------------------------------------------------------------------- neuron classes


def _output_projection(layer: Any) -> Tensor | None:
    """The MLP's output projection (D, F) of a layer, whatever the family calls it."""
    for obj in (layer, getattr(layer, "layer", None)):  # raven wraps its first coda layer
        mlp = getattr(obj, "mlp", None)
        for name in ("down", "proj"):
            linear = getattr(mlp, name, None)
            weight = getattr(linear, "weight", None)
            if isinstance(weight, Tensor) and weight.dim() == 2:
                return weight
    return None


def _final_norm_gain(model: LoopedLM) -> Tensor | None:
    norm = getattr(model, "final_norm", None)
    weight = getattr(norm, "weight", None)
    if isinstance(weight, Tensor):
        return weight
    getter = getattr(model, "final_norm_weight", None)
    if callable(getter):
        gain = getter()
        return gain if isinstance(gain, Tensor) else None
    return None


@torch.no_grad()
def neuron_classes_per_layer(
    model: LoopedLM,
    *,
    notes: list[str] | None = None,
    kurtosis_threshold: float = 10.0,
    skew_threshold: float = 1.0,
) -> dict[str, NeuronClasses]:
    """Prediction / suppression neurons of every MLP, keyed ``prelude.0``, ``block.2``,
    ``coda.1`` in depth order (a block layer is one set of weights, however often it runs).

    The final norm's gain is folded into the unembedding when the model has one. Layers without
    a recognisable MLP output projection (and models without an unembedding) are skipped and a
    sentence saying so is appended to ``notes``. The thresholds are those of
    :func:`~loopscope.analysis.stages.neuron_classes`.
    """
    out: dict[str, NeuronClasses] = {}
    name = model.meta.name or model.meta.family
    try:
        unembed = model.unembedding()
    except NotImplementedError:
        if notes is not None:
            notes.append(f"{name} exposes no unembedding, so neurons were not classified.")
        return out
    gain = _final_norm_gain(model)
    skipped: list[str] = []
    for stage, layers in (("prelude", model.prelude), ("block", model.block), ("coda", model.coda)):
        for i, layer in enumerate(layers):
            w_out = _output_projection(layer)
            if w_out is None or w_out.shape[0] != unembed.shape[1]:
                skipped.append(f"{stage}.{i}")
                continue
            out[f"{stage}.{i}"] = classify_neurons(
                w_out,
                unembed,
                kurtosis_threshold=kurtosis_threshold,
                skew_threshold=skew_threshold,
                final_norm_weight=gain,
            )
    if skipped and notes is not None:
        notes.append(
            f"{name}: no MLP output projection (mlp.down / mlp.proj) found in "
            f"{', '.join(skipped)}; those layers were not classified."
        )
    return out


# --------------------------------------------------------------------------- interventions


@dataclass
class InterventionResult:
    """Stage profiles without and with an intervention on the same prompts, and how much the
    model's output moved: ``kl`` is the mean over prompts and positions of
    KL(p_before ‖ p_after) of the next-token distributions (nats), ``top1_agreement`` the
    fraction of positions whose most likely next token is unchanged."""

    specs: list[str]
    before: StagesProfile
    after: StagesProfile
    kl: float
    top1_agreement: float
    per_prompt_kl: list[float] = field(default_factory=list)


def _as_specs(
    intervention: InterventionSpec | Sequence[InterventionSpec] | None,
) -> list[InterventionSpec]:
    if intervention is None:
        return []
    if isinstance(intervention, InterventionSpec):
        return [intervention]
    return list(intervention)


@torch.no_grad()
def compare_intervention(
    model: LoopedLM,
    prompts: Sequence[PromptInput],
    specs: InterventionSpec | Sequence[InterventionSpec],
    *,
    recurrences: int | None = None,
    sink_threshold: float = 0.3,
    init_state: InitState | None = None,
    seed: int = 0,
    progress: bool = True,
) -> InterventionResult:
    """Run every prompt twice, plainly and with ``specs`` applied, streaming both profiles and
    comparing the logits prompt by prompt (nothing but the two accumulators is kept)."""
    from tqdm.auto import tqdm

    chosen = _as_specs(specs)
    if not chosen:
        raise ValueError("no intervention given; pass at least one InterventionSpec")
    _check_prompts(prompts)
    n_rec = model.meta.train_recurrences if recurrences is None else int(recurrences)
    check_specs(chosen, model.meta, n_rec)
    plan = make_edit_plan(chosen)
    model.eval()
    acc_before = StagesAccumulator(sink_threshold=sink_threshold)
    acc_after = StagesAccumulator(sink_threshold=sink_threshold)
    kls: list[float] = []
    agree = 0
    tokens = 0
    for prompt in tqdm(prompts, desc="intervene", disable=not progress):
        before = _forward(model, prompt, acc_before, n_rec, None, init_state, seed).float()
        after = _forward(model, prompt, acc_after, n_rec, plan, init_state, seed).float()
        logp, logq = before.log_softmax(-1), after.log_softmax(-1)
        kl = (logp.exp() * (logp - logq)).sum(-1)  # (T,)
        kls.append(float(kl.mean()))
        agree += int((before.argmax(-1) == after.argmax(-1)).sum())
        tokens += before.shape[0]
    meta = _profile_meta(model, len(prompts), n_rec)
    p_before, p_after = acc_before.result(), acc_after.result()
    p_before.meta.update(meta)
    p_after.meta.update(meta, intervention=[s.label for s in chosen])
    return InterventionResult(
        specs=[s.label for s in chosen],
        before=p_before,
        after=p_after,
        kl=float(np.mean(kls)),
        top1_agreement=agree / tokens,
        per_prompt_kl=kls,
    )


# --------------------------------------------------------------------------- report section


def _present(profile: StagesProfile) -> list[str]:
    """Metrics with at least one finite value, in the canonical order."""
    return [m for m in METRICS if m in profile.metrics and np.isfinite(profile.metrics[m]).any()]


def _shown(profile: StagesProfile, show_metrics: Sequence[str] | None) -> list[str]:
    """The metrics to draw: ``show_metrics`` (checked) or every measured one."""
    if show_metrics is None:
        return _present(profile)
    _check_metric_names(show_metrics)
    return [m for m in _present(profile) if m in show_metrics]


def _check_metric_names(names: Sequence[str]) -> None:
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


# --------------------------------------------------------------------------- stand-alone report


def _resolve_prompts(
    prompts: str | Path | Sequence[PromptInput],
    limit: int | None,
    model: str | LoopedLM | None = None,
) -> list[PromptInput]:
    """Prompt files are tokenised with the tokenizer of ``model`` (when given by name)."""
    if isinstance(prompts, (str, Path)):
        from loopscope.families.table import tokenizer_for
        from loopscope.pipeline import prompt_inputs

        tokenizer = tokenizer_for(model) if isinstance(model, (str, Path)) else None
        return prompt_inputs(prompts, limit=limit, tokenizer=tokenizer)
    chosen = list(prompts)
    return chosen[:limit] if limit is not None else chosen


def _resolve(source: str | LoopedLM) -> LoopedLM:
    from loopscope.pipeline import resolve_model

    return resolve_model(source)


def run_stages(
    model: str | LoopedLM,
    prompts: str | Path | Sequence[PromptInput],
    out_dir: str | Path,
    *,
    reference: str | LoopedLM | StagesProfile | None = None,
    recurrences: int | None = None,
    intervention: InterventionSpec | Sequence[InterventionSpec] | None = None,
    limit: int | None = None,
    sink_threshold: float = 0.3,
    show_metrics: Sequence[str] | None = None,
    progress: bool = True,
) -> ReportPaths:
    """Write a stand-alone stages report (``report.html``, ``figures/``, ``metrics.json``).

    ``model`` / ``reference`` are anything :func:`loopscope.load` accepts or a loaded model (the
    reference may also be a ready profile); the reference runs its own training recurrence
    count. ``intervention`` adds a before/after section; ``show_metrics`` limits figures and
    tables to some of the metrics.
    """
    looped_model = _resolve(model)
    inputs = _resolve_prompts(prompts, limit, model)
    _check_prompts(inputs)
    n_rec = looped_model.meta.train_recurrences if recurrences is None else int(recurrences)
    specs = _as_specs(intervention)
    if specs:
        check_specs(specs, looped_model.meta, n_rec)
    if show_metrics is not None:
        _check_metric_names(show_metrics)

    result: InterventionResult | None = None
    if specs:
        result = compare_intervention(
            looped_model,
            inputs,
            specs,
            recurrences=n_rec,
            sink_threshold=sink_threshold,
            progress=progress,
        )
        looped = result.before
    else:
        looped = stages_profile(
            looped_model,
            inputs,
            recurrences=n_rec,
            sink_threshold=sink_threshold,
            progress=progress,
        )

    notes: list[str] = []
    classes = neuron_classes_per_layer(looped_model, notes=notes)
    ref_profile: StagesProfile | None = None
    ref_classes: dict[str, NeuronClasses] | None = None
    if isinstance(reference, StagesProfile):
        ref_profile = reference
    elif reference is not None:
        ref_model = _resolve(reference)
        ref_inputs = _resolve_prompts(prompts, limit, reference)  # its own tokenizer
        ref_profile = stages_profile(
            ref_model, ref_inputs, sink_threshold=sink_threshold, progress=progress
        )
        ref_classes = neuron_classes_per_layer(ref_model, notes=notes)

    sections, stage_metrics = stages_sections(
        looped,
        ref_profile,
        classes,
        result,
        reference_neuron_classes=ref_classes,
        notes=notes,
        show_metrics=show_metrics,
    )
    meta = looped_model.meta
    name = meta.name or meta.family
    layout = f"({meta.prelude_layers}, {meta.block_layers}⊗{n_rec}, {meta.coda_layers})"
    ref_text = ""
    if ref_profile is not None:
        ref_text = f"; feedforward reference {ref_profile.meta.get('model', 'given profile')}"
    return write_report(
        Path(out_dir),
        title=f"loopscope stages of inference — {name}",
        subtitle=(
            f"family {meta.family}, layout {layout}, {len(inputs)} prompts{ref_text}"
            + (f"; intervention {', '.join(s.label for s in specs)}" if specs else "")
        ),
        verdict=stages_verdict(looped, stage_metrics, show_metrics),
        sections=sections,
        metrics={"model": asdict(meta), "recurrences": n_rec, "stages": stage_metrics},
        prompts=[p.text for p in inputs],
    )
