"""The dynamics measurements of a whole trace (SPEC §2 items 1–6, 8, §4 stability), averaged
over prompts, as numbers (``metrics``), a verdict table and report sections.

Pure: reads a :class:`~loopscope.trace.writer.TraceStore`, never a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loopscope.analysis import dynamics as dyn
from loopscope.analysis import figures_dynamics as figs
from loopscope.report.html import Figure, Section, Table
from loopscope.trace.writer import PromptTrace, TraceStore


@dataclass(frozen=True)
class Thresholds:
    """Tolerances behind the verdicts (exposed on the CLI)."""

    converged_relative: float = 1e-2
    settled_step: float = 1e-3
    attention_relative: float = 5e-2
    degenerate_cosine: float = 0.99
    tau: float = 0.05
    rho: float = 0.9
    heatmap_recurrences: int = 16


@dataclass
class DynamicsAnalysis:
    metrics: dict[str, Any]
    verdict: Table
    sections: list[Section] = field(default_factory=list)


def _nanmean(arrays: list[np.ndarray]) -> np.ndarray:
    with np.errstate(all="ignore"):
        stacked = np.stack(arrays)
        out: np.ndarray = np.nanmean(stacked, axis=0) if np.isfinite(stacked).any() else stacked[0]
    return out


def _first_or_none(values: list[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


@dataclass
class _PerPrompt:
    step_relative: np.ndarray
    step_cosine: np.ndarray
    fp_relative: np.ndarray
    fp_cosine: np.ndarray
    attn_relative: np.ndarray | None
    cosine_map: np.ndarray
    attn_map: np.ndarray | None
    degeneracy: dyn.Degeneracy
    limiting: list[dyn.LimitingBehaviour]
    divergent: int


def _attention_relative(attn: np.ndarray) -> np.ndarray:
    """Attention distance to the last kept recurrence, relative to its Frobenius norm."""
    distance = dyn.attention_fixed_point_distances(attn)
    ref = np.asarray(attn[-1], dtype=np.float64)
    ref_norm = np.sqrt((ref**2).sum(axis=(-2, -1))).mean(axis=-1)
    result: np.ndarray = distance / np.maximum(ref_norm, 1e-30)[None, :]
    return result


def _analyse_prompt(prompt: PromptTrace, th: Thresholds) -> _PerPrompt:
    block = prompt.block
    if block is None or block.ndim != 4:
        raise ValueError(
            f"{prompt.path} has no full-capture block states; trace with --capture full to "
            "analyse fixed points, cycles and trajectories"
        )
    states = np.asarray(block, dtype=np.float64)
    diffs = dyn.successive_differences(states)
    solved = prompt.array("fixed_point")
    reference = None if solved is None else np.asarray(solved, dtype=np.float64)
    fixed = dyn.fixed_point_distances(states, reference)
    head = min(th.heatmap_recurrences, states.shape[0])
    attn_arr = prompt.attn
    attn_relative = attn_map = None
    if attn_arr is not None:
        attn = np.asarray(attn_arr, dtype=np.float64)
        attn_relative = _attention_relative(attn)
        attn_map = dyn.attention_pair_distances(attn[: min(head, attn.shape[0] - 1)])
    limiting = [
        dyn.classify_limiting_behaviour(states[:, layer], tau=th.tau, rho=th.rho)
        for layer in range(states.shape[1])
    ]
    return _PerPrompt(
        step_relative=diffs.relative,
        step_cosine=diffs.cosine,
        fp_relative=fixed.relative,
        fp_cosine=fixed.cosine,
        attn_relative=attn_relative,
        cosine_map=dyn.layer_recurrence_cosine(states[:head]),
        attn_map=attn_map,
        degeneracy=dyn.degeneracy(states[-1]),
        limiting=limiting,
        divergent=int(diffs.divergent.sum()),
    )


def _stability(store: TraceStore) -> dict[str, Any]:
    records = [p.stability for p in store if p.stability is not None]
    if not records:
        return {}
    block = [r["block"]["radius"] for r in records]
    layers = np.array([[layer["radius"] for layer in r["layers"]] for r in records])
    return {
        "prompts": len(records),
        "block_radius": float(np.mean(block)),
        "block_radius_max": float(np.max(block)),
        "block_verdicts": [r["block"]["verdict"] for r in records],
        "layer_radius": layers.mean(axis=0).tolist(),
        "layer_verdicts": [
            [r["layers"][j]["verdict"] for r in records] for j in range(layers.shape[1])
        ],
    }


def _attention_bound(store: TraceStore) -> tuple[dict[str, Any], Section | None]:
    """Proposition 4.2 per block layer, pooled over the prompts that recorded its terms."""
    per_layer: dict[int, list[dict[str, Any]]] = {}
    for prompt in store:
        record = prompt.stability
        for term in (record or {}).get("attention_bound") or []:
            per_layer.setdefault(int(term["layer"]), []).append(term)
    if not per_layer:
        return {}, None
    rows, metrics, checks = [], {}, []
    for layer, terms in sorted(per_layer.items()):
        check = dyn.attention_bound_check(
            np.concatenate([t["attention_steps"] for t in terms]),
            np.concatenate([t["input_steps"] for t in terms]),
            kappa=max(t["kappa"] for t in terms),
            bound_B=max(t["bound_B"] for t in terms),
            d_head=int(terms[0]["d_head"]),
        )
        checks.append((layer, check))
        median = float(np.nanmedian(check.ratio)) if np.isfinite(check.ratio).any() else None
        metrics[f"block.{layer}"] = {
            "kappa": max(t["kappa"] for t in terms),
            "bound_B": max(t["bound_B"] for t in terms),
            "lipschitz": check.lipschitz,
            "holds": check.holds,
            "tightness_max": check.tightness,
            "tightness_median": median,
            "steps_checked": check.n_checked,
        }
        rows.append(
            [
                f"block layer {layer}",
                metrics[f"block.{layer}"]["kappa"],
                metrics[f"block.{layer}"]["bound_B"],
                check.lipschitz,
                check.holds,
                check.tightness,
                median,
            ]
        )
    tightest = max(checks, key=lambda lc: lc[1].tightness if np.isfinite(lc[1].tightness) else -1)
    section = Section(
        "Attention bound (Proposition 4.2)",
        text=(
            "Measured change of the attention maps between consecutive recurrences (mean over "
            "heads of the Frobenius norm) against the bound ‖S(X_t) − S(X_{t−1})‖ ≤ "
            "½·2Bκ/√d·‖X_t − X_{t−1}‖, with X the attention input (after the pre-attention "
            "norm), B its largest token norm and κ the largest per-head ‖W_Q W_Kᵀ‖₂. Tightness "
            "is measured / bound: far below 1 means the bound is loose. With rotary positions "
            "κ is that of the un-rotated product."
        ),
        tables=[
            Table(
                "Bound per block layer",
                [
                    "layer",
                    "κ",
                    "B",
                    "Bκ/√d",
                    "holds",
                    "max measured/bound",
                    "median measured/bound",
                ],
                rows,
            )
        ],
        figures=[
            Figure(
                "attention_bound",
                f"Block layer {tightest[0]}, the tightest.",
                figs.plot_bound_check(tightest[1]),
            )
        ],
    )
    return metrics, section


def _verdict_word(radius: float | None) -> str:
    if radius is None or not np.isfinite(radius):
        return "—"
    if radius < 0.98:
        return f"{radius:.3f} contracting"
    if radius > 1.02:
        return f"{radius:.3f} expanding"
    return f"{radius:.3f} neutral"


def analyse_dynamics(store: TraceStore, thresholds: Thresholds | None = None) -> DynamicsAnalysis:
    """Every dynamics measurement of the trace, pooled over its prompts."""
    th = thresholds or Thresholds()
    prompts = list(store)
    if not prompts:
        raise ValueError(f"{store.path} holds no finished prompt; run `loopscope trace` first")
    partial = any(p.block is None or p.array("block_recurrences") is not None for p in prompts)
    if partial:
        return analyse_summaries(store, prompts, th)
    per = [_analyse_prompt(p, th) for p in prompts]
    meta = store.meta
    n_layers = meta["block_layers"]
    train_r = int(meta["train_recurrences"])
    step_rel = _nanmean([p.step_relative for p in per])
    step_cos = _nanmean([p.step_cosine for p in per])
    fp_rel = _nanmean([p.fp_relative for p in per])
    fp_cos = _nanmean([p.fp_cosine for p in per])
    attn_curves = [p.attn_relative for p in per if p.attn_relative is not None]
    attn_rel = _nanmean(attn_curves) if attn_curves else None
    cos_map = _nanmean([p.cosine_map for p in per])
    attn_maps = [p.attn_map for p in per if p.attn_map is not None]
    attn_map = _nanmean(attn_maps) if attn_maps else None
    pairwise = _nanmean([p.degeneracy.pairwise for p in per])
    min_cos = float(np.nanmean([p.degeneracy.min_cosine for p in per]))
    degenerate = bool(min_cos >= th.degenerate_cosine)
    stability = _stability(store)
    rates_per_layer = [dyn.per_example_rates([p.limiting[j] for p in per]) for j in range(n_layers)]

    converged_at: list[int | None] = []
    settled: list[bool] = []
    attn_from: list[int | None] = []
    rows: list[list[Any]] = []
    for j in range(n_layers):
        conv = dyn.convergence_recurrence(fp_rel[:, j], th.converged_relative)
        final_step = float(step_rel[-1, j])
        is_settled = bool(np.isfinite(final_step) and final_step <= th.settled_step)
        converged_at.append(conv if is_settled else None)
        settled.append(is_settled)
        stab_from = None
        if attn_rel is not None:
            stab_from = dyn.attention_stabilised_from(attn_rel[:-1, j], th.attention_relative)
        attn_from.append(stab_from)
        cos_to_first = float(pairwise[0, j])
        radius = stability["layer_radius"][j] if stability else None
        rates = rates_per_layer[j].token_rates
        rows.append(
            [
                f"block layer {j}",
                f"yes, from r={conv}"
                if is_settled and conv is not None
                else f"no (last step {final_step:.1e})",
                ("degenerate" if degenerate else "distinct")
                + f" (cos to layer 0: {cos_to_first:.3f})",
                f"from r={stab_from}" if stab_from is not None else "no",
                _verdict_word(radius),
                f"{100 * rates['fixed_point']:.1f}% / {100 * rates['orbit']:.1f}% / "
                f"{100 * rates['slider']:.1f}% / {100 * rates['unknown']:.1f}%",
            ]
        )
    if stability:
        rows.append(["whole block", "—", "—", "—", _verdict_word(stability["block_radius"]), "—"])
    verdict = Table(
        title="Verdict per block layer",
        columns=[
            "layer",
            "converged",
            "fixed point",
            "attention stabilised",
            "spectral radius",
            "fixed point / orbit / slider / unknown",
        ],
        rows=rows,
        note=(
            f"converged: relative distance to the fixed point ≤ {th.converged_relative} from "
            f"that recurrence on and last relative step ≤ {th.settled_step}; degenerate when the "
            f"mean min cosine between layers' fixed points ≥ {th.degenerate_cosine}; attention "
            f"stabilised: relative attention distance to the last recurrence ≤ "
            f"{th.attention_relative}; limiting behaviour with τ={th.tau}, ρ={th.rho}; spectral "
            "radius of each layer's Jacobian at the fixed point (power/Arnoldi iteration on JVPs)."
        ),
    )
    limiting_last = rates_per_layer[-1]
    extrapolation = dyn.extrapolation_summary(
        np.nanmean(step_rel, axis=1), train_r, first_recurrence=1
    )
    metrics: dict[str, Any] = {
        "prompts": len(per),
        "recurrences": int(store.settings["recurrences"]),
        "train_recurrences": train_r,
        "divergent_tokens": int(sum(p.divergent for p in per)),
        "successive_difference": {"relative": step_rel, "cosine": step_cos},
        "fixed_point": {
            "relative": fp_rel,
            "cosine": fp_cos,
            "converged_at": converged_at,
            "settled": settled,
        },
        "attention_fixed_point_relative": attn_rel,
        "attention_stabilised_from": attn_from,
        "degeneracy": {"min_cosine": min_cos, "degenerate": degenerate, "pairwise": pairwise},
        "stability": stability,
        "limiting_behaviour": {
            "last_layer": {
                "token_rates": limiting_last.token_rates,
                "example_rates": limiting_last.example_rates,
                "non_fixed_point_token_rate": limiting_last.non_fixed_point_token_rate,
                "non_fixed_point_example_rate": limiting_last.non_fixed_point_example_rate,
            },
            "per_layer_token_rates": [r.token_rates for r in rates_per_layer],
            "tau": th.tau,
            "rho": th.rho,
        },
        "extrapolation": extrapolation,
        "thresholds": th.__dict__,
    }
    bound_metrics, bound_section = _attention_bound(store)
    metrics["attention_bound"] = bound_metrics
    sections = _sections(
        store,
        per,
        metrics,
        step_rel,
        step_cos,
        fp_rel,
        fp_cos,
        attn_rel,
        cos_map,
        attn_map,
        n_layers,
        train_r,
        th,
    )
    if bound_section is not None:
        sections.insert(4, bound_section)
    return DynamicsAnalysis(metrics=metrics, verdict=verdict, sections=sections)


def _sections(
    store: TraceStore,
    per: list[_PerPrompt],
    metrics: dict[str, Any],
    step_rel: np.ndarray,
    step_cos: np.ndarray,
    fp_rel: np.ndarray,
    fp_cos: np.ndarray,
    attn_rel: np.ndarray | None,
    cos_map: np.ndarray,
    attn_map: np.ndarray | None,
    n_layers: int,
    train_r: int,
    th: Thresholds,
) -> list[Section]:
    diffs = dyn.SuccessiveDifferences(
        norm=step_rel, relative=step_rel, cosine=step_cos, divergent=np.zeros(0, bool)
    )
    fixed = dyn.FixedPointDistances(
        distance=fp_rel, relative=fp_rel, cosine=fp_cos, divergent=np.zeros(0, bool)
    )
    ex = metrics["extrapolation"]
    first = store.prompt(store.completed()[0])
    block = np.asarray(first.block, dtype=np.float64)
    trajectory = dyn.pca_trajectory(block[:, :, -1, :])
    lim = metrics["limiting_behaviour"]["last_layer"]
    stab = metrics["stability"]
    stab_rows = []
    if stab:
        stab_rows = [
            [f"block layer {j}", r, ", ".join(sorted(set(v)))]
            for j, (r, v) in enumerate(zip(stab["layer_radius"], stab["layer_verdicts"]))
        ]
        stab_rows.append(["whole block", stab["block_radius"], ", ".join(stab["block_verdicts"])])
    return [
        Section(
            "Successive differences",
            text=(
                "How much each block layer's output changes from one recurrence to the next "
                f"(mean over {len(per)} prompts). Mean relative step before the training "
                f"recurrence count ({train_r}): {_fmt(ex.get('mean_before'))}; after it: "
                f"{_fmt(ex.get('mean_after'))}; still shrinking past it: "
                f"{'yes' if ex.get('keeps_shrinking') else 'no'}."
            ),
            figures=[
                Figure(
                    "successive_differences",
                    "Relative step and step cosine per layer.",
                    figs.plot_successive_differences(diffs, train_recurrences=train_r),
                )
            ],
        ),
        Section(
            "Approximate fixed point",
            text=(
                f"X* is each layer's state after the last of {metrics['recurrences']} "
                "recurrences; every earlier recurrence is compared with it, for the residual "
                "stream and the attention maps."
            ),
            figures=[
                Figure(
                    "fixed_point",
                    "Distance and cosine to the approximate fixed point.",
                    figs.plot_fixed_point_distances(fixed, attn_rel, train_recurrences=train_r),
                )
            ],
        ),
        Section(
            "Cycles and degeneracy",
            text=(
                "Cosine between the residual streams after every (recurrence, layer) pair. "
                "Stripes every block length mean the block traces a cycle through distinct "
                f"points. Mean min cosine between layers' fixed points: "
                f"{metrics['degeneracy']['min_cosine']:.3f} → {_degeneracy_words(metrics)}."
            ),
            figures=[
                Figure(
                    "cosine_heatmap",
                    f"First {min(th.heatmap_recurrences, block.shape[0])} recurrences.",
                    figs.plot_cosine_heatmap(cos_map, n_layers),
                )
            ],
        ),
        Section(
            "Attention stabilisation",
            text=(
                "Frobenius distance between attention maps of every (layer, recurrence) pair, "
                "grouped by layer: a block-diagonal pattern means each layer's heads look like "
                "themselves at other recurrences."
            ),
            figures=[
                Figure(
                    "attention_heatmap",
                    "Mean over heads and prompts.",
                    figs.plot_attention_heatmap(attn_map, n_layers),
                )
            ]
            if attn_map is not None
            else [],
        ),
        Section(
            "Latent trajectory",
            text=(
                "PCA of every (recurrence, layer) state of the last token of the first prompt; "
                "a closed loop is a cycle. Explained variance: "
                + ", ".join(f"{v:.2f}" for v in trajectory.explained_variance_ratio)
            ),
            figures=[
                Figure(
                    "pca_trajectory",
                    "Last token position, first prompt.",
                    figs.plot_pca_trajectory(trajectory),
                )
            ],
        ),
        Section(
            "Limiting behaviour",
            text=(
                "Tokens of the last block layer classified from cos(x_r, x_last) with "
                f"τ={th.tau}, ρ={th.rho}. Non-fixed-point tokens: "
                f"{100 * lim['non_fixed_point_token_rate']:.2f}% of tokens, in "
                f"{100 * lim['non_fixed_point_example_rate']:.1f}% of prompts."
            ),
            figures=[
                Figure(
                    "limiting_behaviour",
                    "Rates pooled over prompts; example curves.",
                    figs.plot_limiting_behaviour(
                        dyn.classify_limiting_behaviour(block[:, -1], tau=th.tau, rho=th.rho),
                        rates=lim["token_rates"],
                    ),
                )
            ],
        ),
        Section(
            "Stability certificate",
            text=(
                "Spectral radius of the Jacobian at the fixed point, by Arnoldi iteration on "
                "Jacobian-vector products (no dense Jacobian): below 1 the fixed point is "
                "locally attracting."
            ),
            tables=[
                Table(
                    "Spectral radius at the fixed point", ["map", "radius", "verdicts"], stab_rows
                )
            ]
            if stab_rows
            else [],
        ),
    ]


def analyse_summaries(
    store: TraceStore, prompts: list[PromptTrace], th: Thresholds
) -> DynamicsAnalysis:
    """The measurements a lean trace (``--capture summary``: online reductions only) supports:
    successive differences, distances to the fixed point, the stability certificate. Cycles,
    trajectories and limiting behaviour need stored states and are left out, and say so."""
    summaries = [p.summary for p in prompts]
    meta = store.meta
    n_layers = int(meta["block_layers"])
    train_r = int(meta["train_recurrences"])
    step_rel = _nanmean([s["step_relative"][1:] for s in summaries])
    step_cos = _nanmean([s["step_cosine"][1:] for s in summaries])
    have_ref = all("ref_relative" in s for s in summaries)
    fp_rel = _nanmean([s["ref_relative"] for s in summaries]) if have_ref else None
    fp_cos = _nanmean([s["ref_cosine"] for s in summaries]) if have_ref else None
    stability = _stability(store)
    divergent = int(sum(int(np.asarray(s["divergent"]).sum()) for s in summaries))
    rows: list[list[Any]] = []
    converged_at: list[int | None] = []
    for j in range(n_layers):
        final_step = float(step_rel[-1, j])
        settled = bool(np.isfinite(final_step) and final_step <= th.settled_step)
        conv = None
        if settled and fp_rel is not None:
            conv = dyn.convergence_recurrence(fp_rel[:, j], th.converged_relative)
        converged_at.append(conv)
        radius = stability["layer_radius"][j] if stability else None
        rows.append(
            [
                f"block layer {j}",
                f"yes, from r={conv}" if conv is not None else f"no (last step {final_step:.1e})",
                "— (needs stored states)",
                "— (needs stored attention)",
                _verdict_word(radius),
                "— (needs stored states)",
            ]
        )
    if stability:
        rows.append(["whole block", "—", "—", "—", _verdict_word(stability["block_radius"]), "—"])
    verdict = Table(
        title="Verdict per block layer",
        columns=[
            "layer",
            "converged",
            "fixed point",
            "attention stabilised",
            "spectral radius",
            "fixed point / orbit / slider / unknown",
        ],
        rows=rows,
        note=(
            "Lean trace (online reductions only): cycles, attention stabilisation and limiting "
            "behaviour need `--capture full`. converged: relative distance to the fixed point "
            f"≤ {th.converged_relative} from that recurrence on and last relative step ≤ "
            f"{th.settled_step}."
        ),
    )
    diffs = dyn.SuccessiveDifferences(
        norm=step_rel, relative=step_rel, cosine=step_cos, divergent=np.zeros(0, bool)
    )
    sections = [
        Section(
            "Successive differences",
            text=f"Online reductions over {len(prompts)} prompts (lean trace).",
            figures=[
                Figure(
                    "successive_differences",
                    "Relative step and step cosine per layer.",
                    figs.plot_successive_differences(diffs, train_recurrences=train_r),
                )
            ],
        )
    ]
    if fp_rel is not None and fp_cos is not None:
        fixed = dyn.FixedPointDistances(
            distance=fp_rel, relative=fp_rel, cosine=fp_cos, divergent=np.zeros(0, bool)
        )
        sections.append(
            Section(
                "Approximate fixed point",
                text="Measured online in a second pass against the reference fixed point.",
                figures=[
                    Figure(
                        "fixed_point",
                        "Distance and cosine to the fixed point.",
                        figs.plot_fixed_point_distances(fixed, train_recurrences=train_r),
                    )
                ],
            )
        )
    metrics: dict[str, Any] = {
        "prompts": len(prompts),
        "capture": "summary",
        "recurrences": int(store.settings["recurrences"]),
        "train_recurrences": train_r,
        "divergent_tokens": divergent,
        "successive_difference": {"relative": step_rel, "cosine": step_cos},
        "fixed_point": {"relative": fp_rel, "cosine": fp_cos, "converged_at": converged_at},
        "stability": stability,
        "extrapolation": dyn.extrapolation_summary(
            np.nanmean(step_rel, axis=1), train_r, first_recurrence=1
        ),
        "thresholds": th.__dict__,
    }
    return DynamicsAnalysis(metrics=metrics, verdict=verdict, sections=sections)


def _degeneracy_words(metrics: dict[str, Any]) -> str:
    if metrics["degeneracy"]["degenerate"]:
        return "degenerate (all layers collapse onto one point)"
    return "distinct fixed points (a genuine cycle)"


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    return f"{float(value):.3g}"
