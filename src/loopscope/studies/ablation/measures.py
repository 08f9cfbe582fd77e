"""Scale-free measures of a looped block's states, shared by both sweeps: how much the
RMS-normalised state still moves (direction), how much the raw state still moves (magnitude),
how far it is from its last value, whether the block layers' fixed points collapse onto one
point, and how the raw state's norm grows over the second half of the recurrences."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

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
    (≈ 2 when the state grows linearly, ≈ 1 when it is bounded); ``direction_cosine``: the
    cosine between the last two states, per token, min over tokens, layers and prompts;
    ``norm_exponent``: p of the least-squares fit ‖X_t‖ ∝ t^p of the last layer's state norm
    over the second half of the recurrences (t counts recurrences from 1), max over prompts:
    ≈ 0 bounded, ≈ 1 linear growth, large for exponential growth; ``norm_curve`` (R,): that
    norm per recurrence, mean over prompts."""

    finite: bool
    first_bad_recurrence: int | None
    step_curve: np.ndarray
    distance_curve: np.ndarray
    raw_last_step: float
    min_cosine: float
    norm_growth: float
    direction_cosine: float = float("nan")
    norm_exponent: float = float("nan")
    norm_curve: np.ndarray = field(default_factory=lambda: np.zeros(0))

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


def successive_cosine(last: Tensor, prev: Tensor) -> float:
    """Min over tokens of cos(last, prev) for (..., D) states; a token that is zero in both
    counts as unmoved (cosine 1)."""
    a, b = last.double(), prev.double()
    dot = (a * b).sum(-1)
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    cos = dot / (na * nb).clamp_min(1e-300)
    cos = torch.where((na == 0) & (nb == 0), torch.ones_like(cos), cos)
    return float(cos.min())


def power_law_exponent(norms: np.ndarray) -> float:
    """Slope of log ‖X_t‖ against log t over the second half of a (R,) norm curve, t = 1..R:
    0 for a constant norm, 1 for linear growth, ≈ t·log(ρ) for growth ρ^t."""
    r_count = norms.shape[0]
    t = np.arange(1, r_count + 1, dtype=np.float64)[r_count // 2 :]
    y = np.log(np.maximum(norms[r_count // 2 :].astype(np.float64), 1e-300))
    x = np.log(t)
    x_centred = x - x.mean()
    denom = float((x_centred**2).sum())
    return float((x_centred * (y - y.mean())).sum() / denom) if denom > 0 else float("nan")


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
    norm_rows = states[:, -1].double().flatten(2).norm(dim=-1).cpu().numpy()  # (R, B)
    exponents = [power_law_exponent(norm_rows[:, b]) for b in range(batch)]
    return StateMeasures(
        finite=True,
        first_bad_recurrence=None,
        step_curve=steps.amax(dim=(1, 2)).double().numpy(),
        distance_curve=dist.mean(dim=(1, 2)).double().numpy(),
        raw_last_step=float(raw.max()),
        min_cosine=float(np.mean(min_cos)),
        norm_growth=float(growth.mean()),
        direction_cosine=successive_cosine(states[-1], states[-2]),
        norm_exponent=float(np.max(exponents)),
        norm_curve=norm_rows.mean(axis=1),
    )


def combine_measures(parts: Sequence[StateMeasures]) -> StateMeasures:
    """Pool per-prompt measures the way :func:`measure_states` pools a batch: steps by max,
    distances, cosines and growth by mean, the successive cosine by min, the norm exponent by
    max; any non-finite prompt makes the pool non-finite."""
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
        direction_cosine=min(p.direction_cosine for p in parts),
        norm_exponent=max(p.norm_exponent for p in parts),
        norm_curve=np.mean(np.stack([p.norm_curve for p in parts]), axis=0),
    )


class BlockStates:
    """Probe keeping every block state (batch kept) of one run, written straight into one
    (R, L, B, T, D) tensor: the states are stacked once as they arrive instead of kept as R·L
    tensors and stacked at the end (which held the whole run twice)."""

    wants_attention = False

    def __init__(self, recurrences: int, layers: int) -> None:
        self.recurrences, self.layers = recurrences, layers
        self.states: Tensor | None = None
        self.seen = np.zeros((recurrences, layers), dtype=bool)

    def observe(self, site: Site, hidden: Tensor, attn: Tensor | None) -> None:
        if site.stage != "block":
            return
        if self.states is None:
            shape = (self.recurrences, self.layers, *hidden.shape)
            self.states = hidden.new_empty(shape)
        self.states[site.recurrence, site.layer].copy_(hidden.detach())
        self.seen[site.recurrence, site.layer] = True

    def stacked(self) -> Tensor:
        missing = np.flatnonzero(~self.seen.all(axis=1))
        if missing.size or self.states is None:
            r = int(missing[0]) if missing.size else 0
            raise RuntimeError(f"recurrence {r} was not observed completely")
        return self.states
