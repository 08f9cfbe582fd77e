"""The verdict's four parts (direction, magnitude, norm trend, certificate) and the label they
give, on systems whose answer is known: a linear drift along a settled direction, a
contraction, an explosion and a rotation. States are (R, L, B=1, T, D)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from loopscope.studies.ablation.measures import measure_states, power_law_exponent
from loopscope.studies.ablation.verdict import (
    BOUNDED,
    CONVERGED,
    EXPLOSIVE,
    FAILS,
    HOLDS,
    LINEAR,
    MOVING,
    NOT_SHRINKING,
    NOT_STABLE,
    STABLE_DEGENERATE,
    STABLE_DISTINCT,
    Verdict,
    VerdictRule,
    verdict_of,
)

RULE = VerdictRule()
R = 64


def _layer_directions(distinct: bool) -> torch.Tensor:
    """(L=2, T=3, D=4): per-layer directions, orthogonal between layers or one shared."""
    v0 = torch.tensor([[1.0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]])
    v1 = torch.tensor([[0.0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]]) if distinct else v0
    return torch.stack([v0, v1])


def _judge(states: torch.Tensor, radius: float) -> Verdict:
    return verdict_of(measure_states(states), radius, RULE)


def _offset() -> torch.Tensor:
    return torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("distinct", "label"), [(True, STABLE_DISTINCT), (False, STABLE_DEGENERATE)]
)
def test_linear_drift_settles_in_direction_while_its_norm_grows(distinct: bool, label: str) -> None:
    # x_r = r·v + w: the map x ↦ x + v has Jacobian I (ρ = 1). The direction settles as
    # ‖w⊥‖/(r²‖v‖) (≈ 1e-3·‖w‖/‖v‖ at r = 63), the magnitude moves by 1/r, the norm ∝ r.
    v, w = _layer_directions(distinct), _offset()
    states = torch.stack([r * v + w for r in range(R)])[:, :, None]
    m = measure_states(states)
    verdict = verdict_of(m, 1.0, RULE)
    assert verdict.direction == CONVERGED
    assert verdict.magnitude == MOVING
    assert verdict.norm_trend == LINEAR
    assert verdict.certificate == HOLDS
    assert verdict.label == label
    assert "the norm grows (linear)" in verdict.reason
    assert m.direction_cosine > 1 - 1e-5  # successive states all but parallel
    assert m.raw_last_step == pytest.approx(1 / 63, rel=0.2)  # ‖v‖/‖63v + w‖, w is O(v)


def test_contraction_is_stable_in_every_part() -> None:
    # x_r = x* + 0.5^r·e: Jacobian 0.5·I.
    star = _layer_directions(distinct=True)
    states = torch.stack([star + 0.5**r * torch.ones_like(star) for r in range(R)])[:, :, None]
    verdict = _judge(states, 0.5)
    assert (verdict.direction, verdict.magnitude) == (CONVERGED, CONVERGED)
    assert (verdict.norm_trend, verdict.certificate) == (BOUNDED, HOLDS)
    assert verdict.label == STABLE_DISTINCT


def test_explosion_is_not_stable_though_its_direction_never_moves() -> None:
    # x_r = 2^r·v: a constant direction, norm ×2 per recurrence (Jacobian 2·I). 2^39 is
    # far inside float32's range.
    v = _layer_directions(distinct=True)
    states = torch.stack([2.0**r * v for r in range(40)])[:, :, None]
    m = measure_states(states)
    verdict = verdict_of(m, 2.0, RULE)
    assert verdict.direction == CONVERGED
    assert verdict.norm_trend == EXPLOSIVE and verdict.certificate == FAILS
    assert verdict.label == NOT_STABLE and "norm explodes" in verdict.reason
    # log ‖x‖ = (t − 1)·ln 2 has log-log slope t·ln 2; fitted over t = 21..40 that is about
    # its value mid-window, 30·ln 2 (5 % covers the curvature across the window)
    assert m.norm_exponent == pytest.approx(30 * math.log(2), rel=0.05)


def test_rotation_keeps_its_norm_but_never_settles() -> None:
    # x_r = rotation by 0.1·r in the first two coordinates: |eigenvalues| = 1, norm constant.
    angles = torch.arange(R, dtype=torch.float32) * 0.1
    circle = torch.stack([angles.cos(), angles.sin(), torch.zeros(R), torch.zeros(R)], -1)
    states = circle[:, None, None, None, :].expand(R, 2, 1, 3, 4).clone()
    verdict = _judge(states, 1.0)
    assert verdict.norm_trend == BOUNDED and verdict.certificate == HOLDS
    assert verdict.direction == NOT_SHRINKING
    assert verdict.label == NOT_STABLE and "not shrinking" in verdict.reason


def test_non_finite_states_are_explosive_and_not_stable() -> None:
    states = torch.ones(8, 2, 1, 3, 4)
    states[5, 0, 0, 1, 2] = float("inf")
    verdict = _judge(states, float("nan"))
    assert verdict.norm_trend == EXPLOSIVE and verdict.label == NOT_STABLE
    assert "recurrence 5" in verdict.reason


def test_norm_exponent_on_exact_power_laws() -> None:
    t = np.arange(1, 101, dtype=np.float64)
    # least squares on exact data: only float64 rounding remains
    assert power_law_exponent(np.ones(100)) == pytest.approx(0.0, abs=1e-12)
    assert power_law_exponent(3 * t) == pytest.approx(1.0, abs=1e-12)
    assert power_law_exponent(t**2) == pytest.approx(2.0, abs=1e-12)


def test_the_written_rule_uses_the_thresholds_the_label_uses() -> None:
    strict = VerdictRule(explosive_exponent=0.9, tol_step=2e-3)
    text = strict.describe()
    assert "p > 0.9" in text and "≤ 0.002" in text
    # the same linear drift is explosive under a rule that calls p > 0.9 explosive
    states = torch.stack([r * _layer_directions(True) + _offset() for r in range(R)])[:, :, None]
    verdict = verdict_of(measure_states(states), 1.0, strict)
    assert verdict.norm_trend == EXPLOSIVE and verdict.label == NOT_STABLE
    assert f"≤ {RULE.tol_step:g}" in RULE.describe()
