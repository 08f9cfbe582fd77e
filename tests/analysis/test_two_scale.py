"""Two-scale analyses on known-answer systems: a nested affine model whose inner map at fixed
z_H contracts by a known factor to a known fixed point, and whose whole H step is a known 2×2
linear map per channel."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from loopscope.analysis.two_scale import (
    geometric_rate,
    level_steps,
    pool_two_scale,
    two_scale_metrics,
    two_scale_section,
    two_scale_verdict,
)
from loopscope.analysis.two_scale_run import measure_two_scale, two_scale_shape
from loopscope.core.errors import LoopscopeError
from loopscope.engine.nested import Loop, NestedProbe, Stack, run_nested
from loopscope.report.html import to_jsonable

T, D = 4, 3


@dataclass
class Affine:
    """x ↦ scale·x + shift, with constant attention (each token attends to itself)."""

    scale: float
    shift: Tensor

    def __call__(
        self, x: Tensor, context: Any, *, return_attn: bool = False, edit: Any = None
    ) -> tuple[Tensor, Tensor | None]:
        attn = torch.eye(x.shape[1]).expand(x.shape[0], 1, -1, -1) if return_attn else None
        return self.scale * x + self.shift, attn


@dataclass
class AffineTwoScale:
    """z_L ← a(z_L + z_H) + c_L  (L times),  z_H ← b(z_H + z_L) + c_H, from z_H = e, z_L = 0.

    With z_H held at z, the inner map contracts by a to z_L* = (a z + c_L) / (1 − a). One H
    step maps (z_H, z_L) linearly with, per channel, the matrix
    [[b(1 + s), b aᴸ], [s, aᴸ]], s = a + a² + … + aᴸ."""

    a: float
    b: float
    n_h: int
    n_l: int
    c_l: Tensor
    c_h: Tensor
    e: Tensor

    @property
    def loop_tree(self) -> Loop:
        inner = Loop("l", (Stack("L", ("L", "H")),), self.n_l)
        return Loop("h", (inner, Stack("H", ("H", "L"))), self.n_h)

    def stack_layers(self, stack: str) -> Sequence[Affine]:
        return [Affine(self.a, self.c_l)] if stack == "L" else [Affine(self.b, self.c_h)]

    def stack_output(self, stack: str, hidden: Tensor) -> Tensor:
        return hidden

    def context(self, length: int, device: torch.device, token_type_ids: Tensor | None) -> Any:
        return None

    def run(
        self,
        input_ids: Tensor,
        *,
        cycles: Mapping[str, int] | None = None,
        token_type_ids: Tensor | None = None,
        probes: Sequence[NestedProbe] = (),
        return_attn: bool | None = None,
    ) -> Any:
        initial = {"H": self.e.clone(), "L": torch.zeros_like(self.e)}
        return run_nested(
            self, initial, None, cycles=cycles, probes=probes, return_attn=return_attn
        )

    def step_matrix(self) -> np.ndarray:
        s = sum(self.a**k for k in range(1, self.n_l + 1))
        return np.array([[self.b * (1 + s), self.b * self.a**self.n_l], [s, self.a**self.n_l]])

    def hand_trajectory(self) -> tuple[list[list[np.ndarray]], list[np.ndarray]]:
        """z_L[h][l] and the z_H in force during each H step, by the recurrence written out."""
        z_h, z_l = self.e[0].double().numpy(), np.zeros((T, D))
        c_l, c_h = self.c_l.double().numpy(), self.c_h.double().numpy()
        inner, held = [], []
        for _ in range(self.n_h):
            held.append(z_h)
            row = []
            for _ in range(self.n_l):
                z_l = self.a * (z_l + z_h) + c_l
                row.append(z_l)
            inner.append(row)
            z_h = self.b * (z_h + z_l) + c_h
        return inner, held


def affine(
    a: float = 0.25, b: float = 0.5, n_h: int = 3, n_l: int = 8, seed: int = 0
) -> AffineTwoScale:
    g = torch.Generator().manual_seed(seed)
    pick = lambda: torch.randn(1, T, D, generator=g, dtype=torch.float64)  # noqa: E731
    return AffineTwoScale(a, b, n_h, n_l, pick(), pick(), pick())


IDS = torch.zeros(1, T, dtype=torch.long)


def test_geometric_rate_is_exact_on_a_geometric_sequence() -> None:
    assert geometric_rate(3.0 * 0.7 ** np.arange(6)) == pytest.approx(0.7, rel=1e-12)
    assert np.isnan(geometric_rate([1.0])) and np.isnan(geometric_rate([0.0, 0.0, 1.0]))


def test_level_steps_of_a_geometric_approach() -> None:
    rng = np.random.default_rng(0)
    fixed, v = rng.normal(size=(T, D)), rng.normal(size=(T, D))
    states = np.stack([fixed + 0.5**i * v for i in range(10)])
    steps = level_steps(states, reference=fixed)
    norm_v = np.linalg.norm(v)
    np.testing.assert_allclose(steps.step, 0.5 ** np.arange(1, 10) * norm_v, rtol=1e-10)
    np.testing.assert_allclose(steps.distance, 0.5 ** np.arange(10) * norm_v, rtol=1e-10)
    assert float(steps.rate) == pytest.approx(0.5, rel=1e-10)
    assert bool(steps.converged) == (steps.relative[-1] <= 1e-3)
    with pytest.raises(ValueError, match="cycles, tokens, hidden"):
        level_steps(np.zeros((3, 4)))


def test_inner_level_has_the_known_rate_fixed_points_and_radius() -> None:
    system = affine()
    result = measure_two_scale(system, [IDS])
    np.testing.assert_allclose(result.inner.rate, system.a, rtol=1e-9)
    np.testing.assert_allclose(result.inner_radius, system.a, rtol=1e-4)
    inner, held = system.hand_trajectory()
    c_l = system.c_l[0].numpy()
    for h in range(system.n_h):
        fixed = (system.a * held[h] + c_l) / (1 - system.a)
        expected = [np.linalg.norm(z - fixed) for z in inner[h]]
        np.testing.assert_allclose(result.inner.distance[h, 1:], expected, rtol=1e-6, atol=1e-12)
    assert bool(np.all(result.inner.converged))  # a⁸ ≈ 1.5e-5 of the first step


def test_outer_level_has_the_known_radius_and_rate() -> None:
    system = affine(n_h=30)
    rho = float(np.max(np.abs(np.linalg.eigvals(system.step_matrix()))))
    result = measure_two_scale(system, [IDS])
    assert result.outer_radius == pytest.approx(rho, rel=1e-4)
    # Outer steps are a sum of two geometric sequences; the dominant one sets the rate.
    assert float(result.outer.rate) == pytest.approx(rho, rel=1e-2)
    assert bool(result.outer.converged)
    assert result.stacks["H"].limiting["fixed_point"] == 1.0
    assert result.stacks["L"].attention_stable_from == 0  # constant attention
    verdict = two_scale_verdict(result)
    assert verdict["inner"].startswith("converges") and "contracting" in verdict["inner"]
    assert verdict["outer"].startswith("converges") and "not contracting" not in verdict["outer"]


def test_an_expanding_outer_step_is_not_certified() -> None:
    system = affine(a=0.5, b=1.5, n_h=4, n_l=3)
    rho = float(np.max(np.abs(np.linalg.eigvals(system.step_matrix()))))
    assert rho > 1
    result = measure_two_scale(system, [IDS])
    assert result.outer_radius == pytest.approx(rho, rel=1e-4)
    assert "not contracting" in two_scale_verdict(result)["outer"]
    assert not bool(np.all(result.outer.converged))


def test_extrapolation_runs_each_level_past_its_trained_count() -> None:
    system = affine(n_h=3, n_l=4)
    result = measure_two_scale(system, [IDS], extend=3)
    assert result.inner_extended.shape == (12,) and result.outer_extended.shape == (9,)
    metrics = two_scale_metrics(result)
    assert metrics["inner"]["extrapolation"]["keeps_shrinking"]
    # Relative steps divide by ‖z_L‖, which settles too: the rate is a up to that drift.
    assert metrics["inner"]["extrapolation"]["decay_rate_after"] == pytest.approx(system.a, 1e-4)
    json.dumps(to_jsonable(metrics), allow_nan=False)


def test_pooling_keeps_the_worst_case() -> None:
    good = measure_two_scale(affine(seed=1), [IDS])
    slow = measure_two_scale(affine(a=0.6, seed=2), [IDS])
    pooled = pool_two_scale([good, slow])
    assert pooled.prompts == 2
    np.testing.assert_allclose(pooled.inner_radius, np.maximum(good.inner_radius, 0.6), rtol=1e-4)
    assert not bool(np.all(pooled.inner.converged))
    with pytest.raises(ValueError, match="no prompt"):
        pool_two_scale([])


def test_section_shows_both_scales() -> None:
    section = two_scale_section(measure_two_scale(affine(), [IDS]))
    assert [f.name for f in section.figures] == ["two_scale_inner", "two_scale_outer"]
    assert [t.title for t in section.tables] == ["Inner loop per H step", "Outer loop", "Per stack"]
    assert len(section.tables[0].rows) == 3 and "Inner:" in section.text
    for fig in section.figures:
        assert fig.figure.axes[0].get_yscale() == "log"


def test_other_trees_and_settings_are_refused() -> None:
    flat = Loop("r", (Stack("B", ("B",)),), 4)
    with pytest.raises(LoopscopeError, match="OUTER"):
        two_scale_shape(flat)
    with pytest.raises(LoopscopeError, match="extend"):
        measure_two_scale(affine(), [IDS], extend=1)
    with pytest.raises(LoopscopeError, match="shape"):
        measure_two_scale(affine(), [torch.zeros(2, T, dtype=torch.long)])
