"""Scale-free measures of a looped block's states, shared by both sweeps: how much the
RMS-normalised state still moves, how far it is from its last value, whether the block layers'
fixed points collapse onto one point, and how fast the raw state grows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from loopscope.analysis.dynamics import degeneracy
from loopscope.engine.sites import Site


@dataclass(frozen=True)
class StateMeasures:
    """Scale-free dynamics of one run. ``step_curve`` (R−1,): relative step of the per-token
    RMS-normalised state, max over layers and prompts; ``distance_curve`` (R,): relative
    distance of the normalised state to its last value X*, mean over layers and prompts;
    ``raw_last_step``: the last step of the raw (unnormalised) state; ``min_cosine``: the
    degeneracy measure, mean over prompts; ``norm_growth``: ‖X_R‖/‖X_{R/2}‖ of the last layer
    (≈ 2 when the state grows linearly, ≈ 1 when it is bounded)."""

    finite: bool
    first_bad_recurrence: int | None
    step_curve: np.ndarray
    distance_curve: np.ndarray
    raw_last_step: float
    min_cosine: float
    norm_growth: float

    @property
    def last_step(self) -> float:
        return float(self.step_curve[-1]) if self.step_curve.size else float("nan")

    @property
    def trend(self) -> float:
        """Last step / step at R/2: ≈ 1 for a constant drift, ≪ 1 for convergence."""
        c = self.step_curve
        if c.size < 2:
            return float("nan")
        mid, last = float(c[(c.size - 1) // 2]), float(c[-1])
        if mid > 0:
            return last / mid
        return 0.0 if last == 0 else float("inf")


def _unit_tokens(x: Tensor) -> Tensor:
    """Per-token RMS normalisation in float32 (a zero token stays zero)."""
    x = x.float()
    return x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-30)


def measure_states(states: Tensor) -> StateMeasures:
    """Measures of block states (R, L, B, T, D): recurrence, block layer, prompt, token, hidden.

    Non-finite states short-circuit: the curves are NaN and ``first_bad_recurrence`` says where
    it happened. Works one layer at a time so the normalised copy stays 1/L of the input.
    """
    if states.dim() != 5:
        raise ValueError(f"states must be (R, L, B, T, D), got shape {tuple(states.shape)}")
    r_count, n_layers, batch = states.shape[:3]
    if r_count < 4:
        raise ValueError(f"need at least 4 recurrences to judge convergence, got {r_count}")
    finite_r = torch.isfinite(states).flatten(1).all(dim=1)
    if not bool(finite_r.all()):
        nan = float("nan")
        return StateMeasures(
            finite=False,
            first_bad_recurrence=int((~finite_r).nonzero()[0, 0]),
            step_curve=np.full(r_count - 1, nan),
            distance_curve=np.full(r_count, nan),
            raw_last_step=nan,
            min_cosine=nan,
            norm_growth=nan,
        )
    steps = torch.zeros(r_count - 1, n_layers, batch)
    dist = torch.zeros(r_count, n_layers, batch)
    for layer in range(n_layers):
        n = _unit_tokens(states[:, layer])  # (R, B, T, D)
        norms = n.flatten(2).norm(dim=-1).clamp_min(1e-30)  # (R, B)
        steps[:, layer] = (n[1:] - n[:-1]).flatten(2).norm(dim=-1).cpu() / norms[1:].cpu()
        dist[:, layer] = (n - n[-1:]).flatten(2).norm(dim=-1).cpu() / norms[-1:].cpu()
    last, prev = states[-1].float(), states[-2].float()  # (L, B, T, D)
    raw = (last - prev).flatten(2).norm(dim=-1) / last.flatten(2).norm(dim=-1).clamp_min(1e-30)
    mid = states[r_count // 2, -1].float().flatten(1).norm(dim=-1).clamp_min(1e-30)
    growth = states[-1, -1].float().flatten(1).norm(dim=-1) / mid
    fixed = states[-1].float().cpu().numpy()  # (L, B, T, D)
    min_cos = [degeneracy(fixed[:, b]).min_cosine for b in range(batch)]
    return StateMeasures(
        finite=True,
        first_bad_recurrence=None,
        step_curve=steps.amax(dim=(1, 2)).double().numpy(),
        distance_curve=dist.mean(dim=(1, 2)).double().numpy(),
        raw_last_step=float(raw.max()),
        min_cosine=float(np.mean(min_cos)),
        norm_growth=float(growth.mean()),
    )


def combine_measures(parts: Sequence[StateMeasures]) -> StateMeasures:
    """Pool per-prompt measures the way :func:`measure_states` pools a batch: steps by max,
    distances, cosines and growth by mean; any non-finite prompt makes the pool non-finite."""
    if not parts:
        raise ValueError("no measures to combine")
    bad = [p for p in parts if not p.finite]
    if bad:
        return bad[0]
    return StateMeasures(
        finite=True,
        first_bad_recurrence=None,
        step_curve=np.max(np.stack([p.step_curve for p in parts]), axis=0),
        distance_curve=np.mean(np.stack([p.distance_curve for p in parts]), axis=0),
        raw_last_step=max(p.raw_last_step for p in parts),
        min_cosine=float(np.mean([p.min_cosine for p in parts])),
        norm_growth=float(np.mean([p.norm_growth for p in parts])),
    )


class BlockStates:
    """Probe keeping every block state (batch kept) of one run; the engine never mutates a
    state after handing it over, so references suffice."""

    wants_attention = False

    def __init__(self, recurrences: int, layers: int) -> None:
        self.rows: list[list[Tensor | None]] = [[None] * layers for _ in range(recurrences)]

    def observe(self, site: Site, hidden: Tensor, attn: Tensor | None) -> None:
        if site.stage == "block":
            self.rows[site.recurrence][site.layer] = hidden.detach()

    def stacked(self) -> Tensor:
        rows = []
        for r, row in enumerate(self.rows):
            if any(h is None for h in row):
                raise RuntimeError(f"recurrence {r} was not observed completely")
            rows.append(torch.stack([h for h in row if h is not None]))
        return torch.stack(rows)
