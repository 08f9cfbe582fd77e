"""Our random-init verdicts beside the study's (Blayney et al.: random-initialised 12-layer
stacks without prelude or coda, three seeds), with the reason for every difference computed
from this run's numbers: scale (our width and init), seeds (how they split) or thresholds
(``tol_step`` and the degeneracy cosine)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from loopscope.report.html import Table
from loopscope.studies.ablation.formatting import number, plus_minus
from loopscope.studies.ablation.random_init import CellResult, GroupSummary, summarise_groups
from loopscope.studies.ablation.verdict import (
    NOT_STABLE,
    STABLE_DEGENERATE,
    STABLE_DISTINCT,
    VerdictRule,
)

#: The study's verdicts for random-initialised 12-layer stacks (no prelude/coda, 3 seeds), keyed
#: by (norm, injected).
#: "stable" (Huginn + injection) does not say whether the fixed points are distinct.
STUDY_VERDICTS: dict[tuple[str, bool], str] = {
    ("pre", True): STABLE_DISTINCT,
    ("pre", False): STABLE_DEGENERATE,
    ("huginn", True): "stable",
    ("huginn", False): NOT_STABLE,
    ("ouro", True): NOT_STABLE,
    ("ouro", False): NOT_STABLE,
}


def _agrees(ours: str, study: str) -> bool:
    return ours.startswith("stable") if study == "stable" else ours == study


def _explain(g: GroupSummary, study: str, rule: VerdictRule) -> str:
    """Why our verdict differs from the study's, from this run's numbers."""
    notes: list[str] = []
    step, _ = g.last_step
    mc, _ = g.min_cosine
    rho, _ = g.radius
    if not g.unanimous:
        notes.append(f"seeds split ({g.counts_text()} distinct/degenerate/not stable)")
    if _agrees(g.verdict, study):
        return "; ".join(notes) or "—"
    if g.errors:
        notes.append(f"{g.errors} seed(s) raised (see cells/*.json)")
    if g.verdict == NOT_STABLE and study != NOT_STABLE:
        if g.norm_trend.startswith("explosive"):
            fit = number(g.norm_exponent, ".3g")
            notes.append(f"the norm explodes (‖X_t‖ ∝ t^{fit} over the second half)")
        if math.isfinite(step) and step > rule.tol_step:
            if math.isfinite(g.trend) and g.trend < rule.shrinking_trend:
                notes.append(
                    f"threshold/length: still converging at R={g.recurrences} (last step "
                    f"{step:.1e} > {rule.tol_step:g}, ×{g.trend:.2f} over the second half); more "
                    "recurrences or a looser tol_step would accept it"
                )
            else:
                notes.append(
                    f"keeps moving at R={g.recurrences} (last step {step:.1e}, ×{g.trend:.2f} "
                    "over the second half)"
                )
        if math.isfinite(g.norm_growth) and 1.5 < g.norm_growth <= 3.0:
            notes.append(
                f"the state grows linearly (‖X‖ ×{g.norm_growth:.2f} from R/2 to R), so its "
                "direction settles only algebraically (~1/t), not geometrically"
            )
        elif math.isfinite(g.norm_growth) and g.norm_growth > 3.0:
            notes.append(f"the state's norm blows up (×{g.norm_growth:.3g} from R/2 to R)")
        if g.injection == "concat-linear" and g.norm == "pre" and g.init == "identity-adapter":
            sigma = g.adapter_init_noise
            noise = sigma * math.sqrt(g.d_model)
            notes.append(
                f"scale/init: LoopLM's adapter starts as I/√2 on [Z; X] plus N(0, {sigma:g}) "
                f"noise, whose Z-block has spectral radius ≈ {sigma:g}·√{g.d_model}, so the "
                f"unnormalised linear recurrence has radius ≈ 0.71 + {noise:.2f} = "
                f"{2**-0.5 + noise:.2f} at this width (--adapter-init-noise sets σ)"
            )
        if math.isfinite(rho) and rho > 1 + rule.radius_margin:
            notes.append(f"block Jacobian expanding (ρ = {rho:.3f})")
        weak = math.isfinite(g.injection_ratio) and g.injection_ratio < 0.1
        if g.injection != "none" and g.norm != "pre" and weak and g.init == "identity-adapter":
            notes.append(
                f"scale/init: the injected embedding is only {g.injection_ratio:.2g}× the "
                f"state's RMS (N(0, {g.embed_init_std:g}) embeddings against a normalised "
                "stream), too weak to pin the state at random init (--embed-init-std sets it)"
            )
        if study == STABLE_DEGENERATE and math.isfinite(mc) and mc >= rule.degenerate_cosine:
            notes.append(f"its layers have already collapsed (min cos {mc:.4f}), as the study saw")
    elif g.verdict == STABLE_DEGENERATE and study == STABLE_DISTINCT:
        notes.append(
            f"threshold/scale: settled, but min cos {mc:.4f} ≥ {rule.degenerate_cosine:g}; the "
            f"layers' fixed points do differ (1 − cos = {1 - mc:.1e}), yet at width "
            f"{g.d_model} with depth-scaled output projections each layer moves the state "
            "only a little at init"
        )
    elif g.verdict == STABLE_DISTINCT and study == STABLE_DEGENERATE:
        notes.append(f"min cos {mc:.4f} < {rule.degenerate_cosine:g}: layers stay apart here")
    elif g.verdict.startswith("stable") and study == NOT_STABLE:
        notes.append(
            f"settled at R={g.recurrences} (last step {step:.1e} ≤ {rule.tol_step:g}, "
            f"ρ = {rho:.3f}): at width {g.d_model} and this init the instability did not "
            "appear within the run (scale/seeds)"
        )
    return "; ".join(notes) or "—"


def compare_with_study(
    results: Sequence[CellResult],
    *,
    block: int = 12,
    norms: Sequence[str] = ("pre", "huginn", "ouro"),
    injections: Sequence[str] = ("none", "concat-linear"),
    rule: VerdictRule | None = None,
) -> Table:
    """Our verdicts for the 12-layer cells the study reports beside the study's, with
    the reason for every difference computed from this run's numbers."""
    rule = rule or VerdictRule()
    groups = {(g.norm, g.injection, g.block): g for g in summarise_groups(results)}
    rows: list[list[Any]] = []
    for norm in norms:
        for injection in injections:
            g = groups.get((norm, injection, block))
            study = STUDY_VERDICTS.get((norm, injection != "none"), "—")
            if g is None:
                rows.append(
                    [f"{norm} + {injection}", "not run", "—", "—", "—", study, "—", "—", *"—" * 5]
                )
                continue
            rows.append([
                f"{norm} + {injection}",
                f"{g.verdict} ({g.counts_text()})",
                plus_minus(g.last_step, ".1e"),
                plus_minus(g.min_cosine, ".4f"),
                plus_minus(g.radius, ".3f"),
                study,
                "yes" if _agrees(g.verdict, study) else "no",
                _explain(g, study, rule),
                g.direction,
                g.magnitude,
                g.norm_trend,
                g.certificate,
                g.init,
            ])  # fmt: skip
    return Table(
        title=f"{block}-layer random-init stacks: ours vs the study",
        columns=[
            "stack",
            "ours (seeds distinct/degenerate/not stable)",
            "last step",
            "min cos",
            "ρ(block)",
            "study",
            "agree",
            "why they differ",
            "direction",
            "magnitude",
            "norm trend",
            "certificate",
            "init",
        ],
        rows=rows,
        note=f"Verdict rule: {rule.describe()}.",
    )
