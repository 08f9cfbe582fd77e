"""Where each token's state ends up: whether the block's layers share one fixed point or trace a
cycle of distinct points (cosine between every pair of (recurrence, layer) states), the latent
trajectory of the first prompt's last token, and each token's limiting behaviour (fixed
point, orbit, slider, divergent or unknown). All read stored states."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from loopscope.analysis import dynamics as dyn
from loopscope.analysis import figures_dynamics as figs
from loopscope.analysis import limiting as lim
from loopscope.analysis.numerics import FloatArray, mean_over_prompts
from loopscope.analysis.registry import (
    BLOCK_STATES,
    Measurement,
    PromptView,
    Results,
    Source,
    TraceFacts,
    VerdictColumn,
    register,
)
from loopscope.analysis.report_parts import Figure

# ----------------------------------------------------------------------- cycles, degeneracy


@dataclass(frozen=True)
class Cycles:
    """Mean cosine between every pair of (recurrence, layer) states over the first
    ``heatmap_recurrences`` recurrences, and whether the layers' fixed points collapse."""

    cosine_map: FloatArray
    pairwise: FloatArray
    min_cosine: float
    degenerate: bool
    heatmap_recurrences: int


def _read_cycles(prompt: PromptView, facts: TraceFacts) -> tuple[Any, ...]:
    states = prompt.states()
    head = min(facts.thresholds.heatmap_recurrences, states.shape[0])
    return dyn.layer_recurrence_cosine(states[:head]), dyn.degeneracy(states[-1]), head


def _pool_cycles(parts: list[tuple[Any, ...]], facts: TraceFacts, results: Results) -> Cycles:
    min_cosine = float(np.nanmean([p[1].min_cosine for p in parts]))
    return Cycles(
        cosine_map=mean_over_prompts([p[0] for p in parts]),
        pairwise=mean_over_prompts([p[1].pairwise for p in parts]),
        min_cosine=min_cosine,
        degenerate=bool(min_cosine >= facts.thresholds.degenerate_cosine),
        heatmap_recurrences=int(parts[0][2]),
    )


def _cycles_text(cycles: Cycles, facts: TraceFacts, results: Results) -> str:
    words = (
        "degenerate (all layers collapse onto one point)"
        if cycles.degenerate
        else "distinct fixed points (a genuine cycle)"
    )
    return (
        "Cosine between the residual streams after every (recurrence, layer) pair. "
        "Stripes every block length mean the block traces a cycle through distinct "
        f"points. Mean min cosine between layers' fixed points: "
        f"{cycles.min_cosine:.3f} → {words}."
    )


def _degeneracy_cell(cycles: Cycles, layer: int) -> str:
    word = "degenerate" if cycles.degenerate else "distinct"
    return word + f" (cos to layer 0: {float(cycles.pairwise[0, layer]):.3f})"


DEGENERACY = register(
    Measurement(
        name="degeneracy",
        title="Cycles and degeneracy",
        sources=(Source((BLOCK_STATES,), _read_cycles),),
        pool=_pool_cycles,
        metrics=lambda c: {
            "degeneracy": {
                "min_cosine": c.min_cosine,
                "degenerate": c.degenerate,
                "pairwise": c.pairwise,
            }
        },
        text=_cycles_text,
        figure=lambda c, facts, results: Figure(
            "cosine_heatmap",
            f"First {c.heatmap_recurrences} recurrences.",
            figs.plot_cosine_heatmap(c.cosine_map, facts.block_layers),
        ),
        verdict=VerdictColumn(
            "fixed point",
            _degeneracy_cell,
            lambda facts: (
                "degenerate when the mean min cosine between layers' fixed points ≥ "
                f"{facts.thresholds.degenerate_cosine}"
            ),
        ),
    )
)


# ----------------------------------------------------------------------- latent trajectory


def _read_trajectory(prompt: PromptView, facts: TraceFacts) -> dyn.PCATrajectory | None:
    """The first prompt's last token only: one trajectory is what the figure can show."""
    if prompt.index != 0:
        return None
    return dyn.pca_trajectory(prompt.states()[:, :, -1, :])


TRAJECTORY = register(
    Measurement(
        name="trajectory",
        title="Latent trajectory",
        sources=(Source((BLOCK_STATES,), _read_trajectory),),
        pool=lambda parts, facts, results: parts[0],
        text=lambda t, facts, results: (
            "PCA of every (recurrence, layer) state of the last token of the first prompt; "
            "a closed loop is a cycle. Explained variance: "
            + ", ".join(f"{v:.2f}" for v in t.explained_variance_ratio)
        ),
        figure=lambda t, facts, results: Figure(
            "pca_trajectory", "Last token position, first prompt.", figs.plot_pca_trajectory(t)
        ),
    )
)


# ---------------------------------------------------------------------- limiting behaviour


@dataclass(frozen=True)
class Limiting:
    """Token and example rates of each limiting behaviour per block layer, pooled over
    prompts, and the first prompt's last-layer classification (for its example curves)."""

    per_layer: list[lim.LimitingRates]
    first_prompt_last_layer: lim.LimitingBehaviour
    tau: float
    rho: float


def _read_limiting(prompt: PromptView, facts: TraceFacts) -> list[lim.LimitingBehaviour]:
    states, th = prompt.states(), facts.thresholds
    return [
        lim.classify_limiting_behaviour(states[:, layer], tau=th.tau, rho=th.rho)
        for layer in range(states.shape[1])
    ]


def _pool_limiting(
    parts: list[list[lim.LimitingBehaviour]], facts: TraceFacts, results: Results
) -> Limiting:
    per_layer = [lim.per_example_rates([p[j] for p in parts]) for j in range(facts.block_layers)]
    th = facts.thresholds
    return Limiting(per_layer, parts[0][-1], th.tau, th.rho)


def _limiting_metrics(result: Limiting) -> dict[str, Any]:
    last = result.per_layer[-1]
    return {
        "limiting_behaviour": {
            "last_layer": {
                "token_rates": last.token_rates,
                "example_rates": last.example_rates,
                "non_fixed_point_token_rate": last.non_fixed_point_token_rate,
                "non_fixed_point_example_rate": last.non_fixed_point_example_rate,
            },
            "per_layer_token_rates": [r.token_rates for r in result.per_layer],
            "tau": result.tau,
            "rho": result.rho,
        }
    }


def _limiting_text(result: Limiting, facts: TraceFacts, results: Results) -> str:
    last = result.per_layer[-1]
    return (
        "Tokens of the last block layer classified from cos(x_r, x_last) with "
        f"τ={result.tau}, ρ={result.rho}. Non-fixed-point tokens: "
        f"{100 * last.non_fixed_point_token_rate:.2f}% of tokens, in "
        f"{100 * last.non_fixed_point_example_rate:.1f}% of prompts."
    )


def _rates_cell(result: Limiting, layer: int) -> str:
    rates = result.per_layer[layer].token_rates
    return (
        f"{100 * rates['fixed_point']:.1f}% / {100 * rates['orbit']:.1f}% / "
        f"{100 * rates['slider']:.1f}% / {100 * rates['unknown']:.1f}%"
    )


LIMITING_BEHAVIOUR = register(
    Measurement(
        name="limiting_behaviour",
        title="Limiting behaviour",
        sources=(Source((BLOCK_STATES,), _read_limiting),),
        pool=_pool_limiting,
        metrics=_limiting_metrics,
        text=_limiting_text,
        figure=lambda r, facts, results: Figure(
            "limiting_behaviour",
            "Rates pooled over prompts; example curves.",
            figs.plot_limiting_behaviour(
                r.first_prompt_last_layer, rates=r.per_layer[-1].token_rates
            ),
        ),
        verdict=VerdictColumn(
            "fixed point / orbit / slider / unknown",
            _rates_cell,
            lambda facts: (
                f"limiting behaviour with τ={facts.thresholds.tau}, ρ={facts.thresholds.rho}"
            ),
        ),
    )
)
