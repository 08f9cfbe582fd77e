"""Convergence of the block: how much every block layer still moves from one recurrence to the
next (successive differences, and whether they keep shrinking past the training recurrence
count), and how close it is to its fixed point, from stored states or, in a lean trace, from
the online reductions. Pooled as the mean over prompts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from loopscope.analysis import dynamics as dyn
from loopscope.analysis import figures_dynamics as figs
from loopscope.analysis.numerics import FloatArray, mean_over_prompts
from loopscope.analysis.registry import (
    BLOCK_STATES,
    FIXED_POINT_DISTANCES,
    ONLINE_SUMMARIES,
    Measurement,
    PromptView,
    Results,
    Source,
    TraceFacts,
    VerdictColumn,
    register,
)
from loopscope.analysis.report_parts import Figure


def _fmt(value: Any) -> str:
    return "—" if value is None else f"{float(value):.3g}"


def _no_divergent() -> np.ndarray:
    return np.zeros(0, bool)


# ------------------------------------------------------------------ successive differences


@dataclass(frozen=True)
class Steps:
    """Step-to-step change per (recurrence, layer), pooled; ``online`` when it comes from the
    online summaries rather than stored states."""

    relative: FloatArray
    cosine: FloatArray
    divergent_tokens: int
    extrapolation: dict[str, Any]
    prompts: int
    online: bool


def _steps_from_states(prompt: PromptView, facts: TraceFacts) -> tuple[Any, ...]:
    diffs = dyn.successive_differences(prompt.states())
    return diffs.relative, diffs.cosine, int(diffs.divergent.sum()), False


def _steps_from_summary(prompt: PromptView, facts: TraceFacts) -> tuple[Any, ...]:
    s = prompt.summary
    divergent = int(np.asarray(s["divergent"]).sum())
    return s["step_relative"][1:], s["step_cosine"][1:], divergent, True


def _pool_steps(parts: list[tuple[Any, ...]], facts: TraceFacts, results: Results) -> Steps:
    relative = mean_over_prompts([p[0] for p in parts])
    extrapolation = dyn.extrapolation_summary(
        np.nanmean(relative, axis=1), facts.train_recurrences, first_recurrence=1
    )
    return Steps(
        relative=relative,
        cosine=mean_over_prompts([p[1] for p in parts]),
        divergent_tokens=int(sum(p[2] for p in parts)),
        extrapolation=extrapolation,
        prompts=len(parts),
        online=bool(parts[0][3]),
    )


def _steps_text(steps: Steps, facts: TraceFacts, results: Results) -> str:
    ex = steps.extrapolation
    text = (
        "How much each block layer's output changes from one recurrence to the next "
        f"(mean over {steps.prompts} prompts). Mean relative step before the training "
        f"recurrence count ({facts.train_recurrences}): {_fmt(ex.get('mean_before'))}; after it: "
        f"{_fmt(ex.get('mean_after'))}; still shrinking past it: "
        f"{'yes' if ex.get('keeps_shrinking') else 'no'}."
    )
    return text + (" Measured online while tracing." if steps.online else "")


def _steps_figure(steps: Steps, facts: TraceFacts, results: Results) -> Figure:
    diffs = dyn.SuccessiveDifferences(
        norm=steps.relative, relative=steps.relative, cosine=steps.cosine, divergent=_no_divergent()
    )
    return Figure(
        "successive_differences",
        "Relative step and step cosine per layer.",
        figs.plot_successive_differences(diffs, train_recurrences=facts.train_recurrences),
    )


SUCCESSIVE_DIFFERENCE = register(
    Measurement(
        name="successive_difference",
        title="Successive differences",
        sources=(
            Source((BLOCK_STATES,), _steps_from_states),
            Source((ONLINE_SUMMARIES,), _steps_from_summary),
        ),
        pool=_pool_steps,
        metrics=lambda s: {
            "divergent_tokens": s.divergent_tokens,
            "successive_difference": {"relative": s.relative, "cosine": s.cosine},
            "extrapolation": s.extrapolation,
        },
        text=_steps_text,
        figure=_steps_figure,
    )
)


# ------------------------------------------------------------------------------ fixed point


@dataclass(frozen=True)
class FixedPoint:
    """Distance to the fixed point per (recurrence, layer), pooled, and per layer whether it
    settled (last relative step small) and from which recurrence it stays converged."""

    relative: FloatArray
    cosine: FloatArray
    converged_at: list[int | None]
    settled: list[bool]
    last_step: list[float]
    online: bool


def _fixed_point_from_states(prompt: PromptView, facts: TraceFacts) -> tuple[Any, ...]:
    solved = prompt.array("fixed_point")
    reference = None if solved is None else np.asarray(solved, dtype=np.float64)
    fixed = dyn.fixed_point_distances(prompt.states(), reference)
    return fixed.relative, fixed.cosine, False


def _fixed_point_from_summary(prompt: PromptView, facts: TraceFacts) -> tuple[Any, ...]:
    s = prompt.summary
    return s["ref_relative"], s["ref_cosine"], True


def _pool_fixed_point(
    parts: list[tuple[Any, ...]], facts: TraceFacts, results: Results
) -> FixedPoint:
    th = facts.thresholds
    steps: Steps = results["successive_difference"]
    relative = mean_over_prompts([p[0] for p in parts])
    converged_at: list[int | None] = []
    settled: list[bool] = []
    last_step: list[float] = []
    for j in range(facts.block_layers):
        conv = dyn.convergence_recurrence(relative[:, j], th.converged_relative)
        final_step = float(steps.relative[-1, j])
        is_settled = bool(np.isfinite(final_step) and final_step <= th.settled_step)
        converged_at.append(conv if is_settled else None)
        settled.append(is_settled)
        last_step.append(final_step)
    return FixedPoint(
        relative=relative,
        cosine=mean_over_prompts([p[1] for p in parts]),
        converged_at=converged_at,
        settled=settled,
        last_step=last_step,
        online=bool(parts[0][2]),
    )


def _fixed_point_text(fixed: FixedPoint, facts: TraceFacts, results: Results) -> str:
    if fixed.online:
        return "Measured online in a second pass against the reference fixed point."
    return (
        f"X* is each layer's state after the last of {facts.recurrences} "
        "recurrences; every earlier recurrence is compared with it, for the residual "
        "stream and the attention maps."
    )


def _fixed_point_figure(fixed: FixedPoint, facts: TraceFacts, results: Results) -> Figure:
    distances = dyn.FixedPointDistances(
        distance=fixed.relative,
        relative=fixed.relative,
        cosine=fixed.cosine,
        divergent=_no_divergent(),
    )
    attention = results.get("attention_stabilisation")
    caption = "Distance and cosine to the " + ("" if fixed.online else "approximate ")
    return Figure(
        "fixed_point",
        caption + "fixed point.",
        figs.plot_fixed_point_distances(
            distances,
            None if attention is None else attention.relative,
            train_recurrences=facts.train_recurrences,
        ),
    )


def _converged_cell(fixed: FixedPoint, layer: int) -> str:
    at = fixed.converged_at[layer]
    return f"yes, from r={at}" if at is not None else f"no (last step {fixed.last_step[layer]:.1e})"


FIXED_POINT = register(
    Measurement(
        name="fixed_point",
        title="Approximate fixed point",
        sources=(
            Source((BLOCK_STATES,), _fixed_point_from_states),
            Source((FIXED_POINT_DISTANCES,), _fixed_point_from_summary),
        ),
        pool=_pool_fixed_point,
        uses=("successive_difference",),
        metrics=lambda f: {
            "fixed_point": {
                "relative": f.relative,
                "cosine": f.cosine,
                "converged_at": f.converged_at,
                "settled": f.settled,
            }
        },
        text=_fixed_point_text,
        figure=_fixed_point_figure,
        verdict=VerdictColumn(
            "converged",
            _converged_cell,
            lambda facts: (
                "converged: relative distance to the fixed point ≤ "
                f"{facts.thresholds.converged_relative} from that recurrence on and last "
                f"relative step ≤ {facts.thresholds.settled_step}"
            ),
        ),
    )
)
