"""What a trained sweep writes: each looped cell's stage alignment with its feedforward twin,
the factor summary, ``table.md``, ``table.csv`` and the comparison report linking every looped
cell's own dynamics report."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np

from loopscope.core.atomic import write_text
from loopscope.nn.inits import describe_scheme
from loopscope.report.html import ReportPaths, Section, Table, write_report
from loopscope.studies.ablation.formatting import (
    csv_text,
    factor_paragraph,
    geomean,
    group_by,
    markdown_table,
    mean_sd,
    number,
    quiet_nan_warnings,
    ratio_text,
    summary_section,
)
from loopscope.studies.ablation.presets import TrainedPreset, cell_init
from loopscope.studies.ablation.store import table_paths
from loopscope.studies.ablation.trained import TrainedResult


def stage_alignment_scores(
    out: Path, results: Sequence[TrainedResult]
) -> dict[str, dict[str, Any]]:
    """name → {"pearson", "dtw", "reference"}: mean over stage metrics and block passes of the
    alignment of each looped cell's passes with the feedforward cell of the same norm and seed
    (named by "reference")."""
    from loopscope.analysis.alignment import alignment_summary, stage_alignment
    from loopscope.analysis.stages import StagesProfile

    def profile(name: str) -> StagesProfile | None:
        path = out / "cells" / name / "stages.json"
        return StagesProfile.from_dict(json.loads(path.read_text())) if path.exists() else None

    refs = {(r.norm, r.seed): r.name for r in results if r.feedforward}
    scores: dict[str, dict[str, Any]] = {}
    for r in results:
        ref_name = refs.get((r.norm, r.seed))
        if r.feedforward or ref_name is None:
            continue
        looped, ref = profile(r.name), profile(ref_name)
        if looped is None or ref is None:
            continue
        summary = alignment_summary(stage_alignment(looped, ref))
        with quiet_nan_warnings():
            pearson = float(np.nanmean([s["pearson"] for s in summary.values()] or [np.nan]))
            dtw = float(np.nanmean([s["dtw_distance"] for s in summary.values()] or [np.nan]))
        scores[r.name] = {"pearson": pearson, "dtw": dtw, "reference": ref_name}
    return scores


def _trained_levels(
    results: Sequence[TrainedResult],
    align: Mapping[str, Mapping[str, Any]],
    key: Callable[[TrainedResult], Any],
) -> dict[Any, dict[str, float]]:
    levels = group_by((r for r in results if not r.feedforward), key)
    out = {}
    for lv, rs in levels.items():
        out[lv] = {
            "n": len(rs),
            "accuracy": mean_sd(r.eval_accuracy for r in rs)[0],
            "loss": mean_sd(r.eval_loss for r in rs)[0],
            "stable": sum(r.verdict.startswith("stable") for r in rs),
            "step": geomean(r.last_step for r in rs),
            "radius": mean_sd(r.radius for r in rs)[0],
            "align": mean_sd(float(align[r.name]["pearson"]) for r in rs if r.name in align)[0],
        }
    return out


def _level_text(level: Any, s: Mapping[str, Any]) -> str:
    return (
        f"{level}: accuracy {s['accuracy']:.2f}, eval loss {s['loss']:.3f}, "
        f"{s['stable']}/{s['n']} stable, geometric-mean last step {s['step']:.1e}, mean ρ "
        f"{number(s['radius'], '.3f')}, stage alignment {number(s['align'], '.2f')}"
    )


def _change_text(level: Any, s: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    return (
        f"{level} moves accuracy by {s['accuracy'] - b['accuracy']:+.2f}, eval loss by "
        f"{s['loss'] - b['loss']:+.3f}, stage alignment by "
        f"{number(s['align'] - b['align'], '+.2f')} and the last step "
        f"{ratio_text(s['step'], b['step'])}"
    )


def trained_factor_summary(
    results: Sequence[TrainedResult], align: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    """One paragraph per factor of the trained sweep, numbers from this run."""
    paragraphs = []
    factors: list[tuple[str, Callable[[TrainedResult], Any]]] = [
        ("Block size", lambda r: f"k={r.block}"),
        ("Injection", lambda r: r.injection),
        ("Prelude/coda", lambda r: "with prelude/coda" if r.prelude_coda else "without"),
    ]
    for title, key in factors:
        stats = _trained_levels(results, align, key)
        if len(stats) < 2:
            continue
        paragraphs.append(factor_paragraph(title, "", stats, _level_text, _change_text))
    ff = [r for r in results if r.feedforward]
    looped = [r for r in results if not r.feedforward]
    if ff and looped:
        fa = mean_sd(r.eval_accuracy for r in ff)[0]
        la = mean_sd(r.eval_accuracy for r in looped)[0]
        paragraphs.append(
            f"Looped vs feedforward — mean accuracy of the looped models {la:.2f} against "
            f"{fa:.2f} for the {ff[0].block}-layer feedforward model; eval loss "
            f"{mean_sd(r.eval_loss for r in looped)[0]:.3f} against "
            f"{mean_sd(r.eval_loss for r in ff)[0]:.3f}."
        )
    return paragraphs


TRAINED_COLUMNS = [
    "cell",
    "layout",
    "accuracy",
    "eval loss",
    "init",
    "verdict",
    "direction",
    "magnitude",
    "norm trend",
    "certificate",
    "last step",
    "min cos",
    "ρ(block)",
    "settled layers",
    "stage alignment (Pearson)",
    "stage DTW",
]


def _trained_row(r: TrainedResult, align: Mapping[str, Mapping[str, Any]]) -> list[str]:
    a = align.get(r.name, {})
    return [
        r.name,
        r.layout,
        f"{r.eval_accuracy:.2f}",
        f"{r.eval_loss:.3f}",
        r.init,
        r.verdict,
        r.direction,
        r.magnitude,
        r.norm_trend,
        r.certificate,
        number(r.last_step, ".1e"),
        number(r.min_cosine, ".4f"),
        number(r.radius, ".3f"),
        "—" if r.converged_layers is None else f"{r.converged_layers}/{r.block}",
        number(float(a.get("pearson", float("nan"))), ".2f"),
        number(float(a.get("dtw", float("nan"))), ".2f"),
    ]


def _setup_text(preset: TrainedPreset) -> str:
    t = preset.train
    return (
        f"Preset {preset.name}: width {preset.d_model}, {preset.n_heads} heads, "
        f"{', '.join(preset.norms)} norm, constant 4 training recurrences, final-output loss; "
        f"{t.steps} steps of batch "
        f"{t.batch_size}, lr {t.lr:g}, problems of {t.min_problem_steps}–{t.max_problem_steps} "
        f"steps. Dynamics: {preset.trace_recurrences} recurrences on {preset.prompts} bundled "
        f"prompts; stages at the training recurrence count against the feedforward model. "
        f"Init {preset.init}: "
        + "; ".join(
            f"{norm}: {describe_scheme(cell_init(norm, preset.init))}" for norm in preset.norms
        )
        + "."
    )


def _results_csv(results: Sequence[TrainedResult], align: Mapping[str, Mapping[str, Any]]) -> str:
    """Every field of every result, then its stage alignment ('' for none)."""
    names = [f.name for f in fields(TrainedResult)]
    rows = [
        [
            *(getattr(r, n) for n in names),
            *(align.get(r.name, {}).get(k, "") for k in ("pearson", "dtw")),
        ]
        for r in results
    ]
    return csv_text([*names, "stage_pearson", "stage_dtw"], rows)


def write_trained_outputs(
    out: Path, results: Sequence[TrainedResult], preset: TrainedPreset, elapsed: float
) -> tuple[Path, Path, ReportPaths]:
    """``table.md``, ``table.csv`` and the comparison report of a trained sweep."""
    align = stage_alignment_scores(out, results)
    rows = [_trained_row(r, align) for r in results]
    summary = trained_factor_summary(results, align)
    notes = sorted({r.note for r in results if r.note})
    setup = _setup_text(preset)
    md = [
        "# Trained ablation\n",
        setup + "\n",
        f"Verdict rule: {preset.rule.describe()}.\n",
        *[n + "\n" for n in notes],
        "## Summary\n",
        *[p + "\n" for p in summary],
        "## Cells\n",
        markdown_table(TRAINED_COLUMNS, rows),
    ]
    md_path, csv_path = table_paths(out)
    write_text(md_path, "\n".join(md))
    write_text(csv_path, _results_csv(results, align))
    table = Table("Trained cells", TRAINED_COLUMNS, [list(r) for r in rows], note=" ".join(notes))
    links = "\n".join(
        f"{r.name}: cells/{r.name}/report/report.html" for r in results if not r.feedforward
    )
    sections = [
        summary_section(summary),
        Section(
            "Per-cell dynamics reports",
            text="Each looped cell has its own full dynamics report:\n\n" + links,
        ),
        Section("Method", text=setup + "\n\n" + f"Verdict rule: {preset.rule.describe()}."),
    ]
    paths = write_report(
        out,
        title="loopscope ablation — trained looped models",
        subtitle=f"{len(results)} trained cells; " + setup,
        verdict=table,
        sections=sections,
        metrics={
            "preset": asdict(preset),
            "elapsed_seconds": elapsed,
            "results": [asdict(r) for r in results],
            "stage_alignment": align,
            "summary": summary,
        },
    )
    return md_path, csv_path, paths
