"""How the attention maps settle: their distance to the last recurrence's maps (per layer, and
from which recurrence it stays small), the distances between every pair of (recurrence, layer)
maps, and the Lipschitz bound on how far attention can move per recurrence. Read from stored
attention maps and from the bound's terms in the stability certificates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from loopscope.analysis import attention_dynamics as attn_dyn
from loopscope.analysis import figures_dynamics as figs
from loopscope.analysis.numerics import FloatArray, mean_over_prompts
from loopscope.analysis.registry import (
    ATTENTION_BOUND,
    ATTENTION_MAPS,
    Measurement,
    PromptView,
    Results,
    Source,
    TraceFacts,
    VerdictColumn,
    register,
)
from loopscope.analysis.report_parts import Figure, Table

# ------------------------------------------------------------------- attention stabilisation


@dataclass(frozen=True)
class AttentionStabilisation:
    """Attention distance to the last kept recurrence relative to its norm (kept recurrence,
    layer), the pairwise distance map of the first recurrences, and per layer the recurrence
    from which the distance stays small."""

    relative: FloatArray
    pair_map: FloatArray
    stabilised_from: list[int | None]


def _attention_relative(attn: np.ndarray) -> np.ndarray:
    """Attention distance to the last kept recurrence, relative to its Frobenius norm."""
    distance = attn_dyn.attention_fixed_point_distances(attn)
    ref = np.asarray(attn[-1], dtype=np.float64)
    ref_norm = np.sqrt((ref**2).sum(axis=(-2, -1))).mean(axis=-1)
    result: np.ndarray = distance / np.maximum(ref_norm, 1e-30)[None, :]
    return result


def _read_attention(prompt: PromptView, facts: TraceFacts) -> tuple[np.ndarray, np.ndarray]:
    attn = prompt.attention()
    head = min(facts.thresholds.heatmap_recurrences, facts.recurrences)
    pair_map = attn_dyn.attention_pair_distances(attn[: min(head, attn.shape[0] - 1)])
    return _attention_relative(attn), pair_map


def _pool_attention(
    parts: list[tuple[np.ndarray, np.ndarray]], facts: TraceFacts, results: Results
) -> AttentionStabilisation:
    relative = mean_over_prompts([p[0] for p in parts])
    tol = facts.thresholds.attention_relative
    return AttentionStabilisation(
        relative=relative,
        pair_map=mean_over_prompts([p[1] for p in parts]),
        stabilised_from=[
            attn_dyn.attention_stabilised_from(relative[:-1, j], tol)
            for j in range(facts.block_layers)
        ],
    )


def _stabilised_cell(result: AttentionStabilisation, layer: int) -> str:
    start = result.stabilised_from[layer]
    return f"from r={start}" if start is not None else "no"


ATTENTION_STABILISATION = register(
    Measurement(
        name="attention_stabilisation",
        title="Attention stabilisation",
        sources=(Source((ATTENTION_MAPS,), _read_attention),),
        pool=_pool_attention,
        metrics=lambda a: {
            "attention_fixed_point_relative": a.relative,
            "attention_stabilised_from": a.stabilised_from,
        },
        text=lambda a, facts, results: (
            "Frobenius distance between attention maps of every (layer, recurrence) pair, "
            "grouped by layer: a block-diagonal pattern means each layer's heads look like "
            "themselves at other recurrences."
        ),
        figure=lambda a, facts, results: Figure(
            "attention_heatmap",
            "Mean over heads and prompts.",
            figs.plot_attention_heatmap(a.pair_map, facts.block_layers),
        ),
        verdict=VerdictColumn(
            "attention stabilised",
            _stabilised_cell,
            lambda facts: (
                "attention stabilised: relative attention distance to the last recurrence ≤ "
                f"{facts.thresholds.attention_relative}"
            ),
        ),
    )
)


# ------------------------------------------------------------------------- attention bound


@dataclass(frozen=True)
class AttentionBound:
    """The attention Lipschitz bound checked per block layer on the steps every prompt with
    a stability certificate recorded; ``tightest`` is the layer closest to its bound."""

    per_layer: dict[str, dict[str, Any]]
    rows: list[list[Any]]
    tightest: tuple[int, attn_dyn.BoundCheck]


def _read_bound_terms(prompt: PromptView, facts: TraceFacts) -> list[dict[str, Any]]:
    return list((prompt.stability or {}).get("attention_bound") or [])


def _pool_bound(
    parts: list[list[dict[str, Any]]], facts: TraceFacts, results: Results
) -> AttentionBound:
    by_layer: dict[int, list[dict[str, Any]]] = {}
    for terms in parts:
        for term in terms:
            by_layer.setdefault(int(term["layer"]), []).append(term)
    per_layer: dict[str, dict[str, Any]] = {}
    rows: list[list[Any]] = []
    checks: list[tuple[int, attn_dyn.BoundCheck]] = []
    for layer, terms in sorted(by_layer.items()):
        kappa, bound_b = max(t["kappa"] for t in terms), max(t["bound_B"] for t in terms)
        check = attn_dyn.attention_bound_check(
            np.concatenate([t["attention_steps"] for t in terms]),
            np.concatenate([t["input_steps"] for t in terms]),
            kappa=kappa,
            bound_B=bound_b,
            d_head=int(terms[0]["d_head"]),
        )
        checks.append((layer, check))
        median = float(np.nanmedian(check.ratio)) if np.isfinite(check.ratio).any() else None
        per_layer[f"block.{layer}"] = {
            "kappa": kappa,
            "bound_B": bound_b,
            "lipschitz": check.lipschitz,
            "holds": check.holds,
            "tightness_max": check.tightness,
            "tightness_median": median,
            "steps_checked": check.n_checked,
        }
        rows.append(
            [
                f"block layer {layer}",
                kappa,
                bound_b,
                check.lipschitz,
                check.holds,
                check.tightness,
                median,
            ]
        )
    tightest = max(checks, key=lambda lc: lc[1].tightness if np.isfinite(lc[1].tightness) else -1)
    return AttentionBound(per_layer=per_layer, rows=rows, tightest=tightest)


_BOUND_COLUMNS = [
    "layer",
    "κ",
    "B",
    "Bκ/√d",
    "holds",
    "max measured/bound",
    "median measured/bound",
]

ATTENTION_BOUND_CHECK = register(
    Measurement(
        name="attention_bound",
        title="Attention bound (Proposition 4.2)",
        sources=(Source((ATTENTION_BOUND,), _read_bound_terms),),
        pool=_pool_bound,
        metrics=lambda b: {"attention_bound": b.per_layer},
        text=lambda b, facts, results: (
            "Measured change of the attention maps between consecutive recurrences (mean over "
            "heads of the Frobenius norm) against the bound ‖S(X_t) − S(X_{t−1})‖ ≤ "
            "½·2Bκ/√d·‖X_t − X_{t−1}‖, with X the attention input (after the pre-attention "
            "norm), B its largest token norm and κ the largest per-head ‖W_Q W_Kᵀ‖₂. Tightness "
            "is measured / bound: far below 1 means the bound is loose. With rotary positions "
            "κ is that of the un-rotated product."
        ),
        tables=lambda b, facts: [Table("Bound per block layer", list(_BOUND_COLUMNS), b.rows)],
        figure=lambda b, facts, results: Figure(
            "attention_bound",
            f"Block layer {b.tightest[0]}, the tightest.",
            figs.plot_bound_check(b.tightest[1]),
        ),
    )
)
