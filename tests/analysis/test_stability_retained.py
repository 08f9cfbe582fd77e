"""The retained-forward JVP shortcut of the stability certificate: every product from one
forward pass equals the Jacobian's product on maps whose Jacobian is known, the spectral
estimate built on it equals the one built on forward-mode JVPs, and a map that is not twice
differentiable falls back to forward-mode JVPs with the same answer."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tolerances import rounding_tolerance

from loopscope.analysis.stability import jvp, retained_jvp, spectral_radius
from loopscope.engine.loop import block_step, prelude_output
from loopscope.families.looplm import LoopLM
from loopscope.studies.ablation.presets import RANDOM_INIT_PRESETS, cell_init
from loopscope.studies.ablation.random_init import Cell, bundled_prompt_ids, cell_config


def _random(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_products_of_an_affine_map_are_its_matrix() -> None:
    a, b = _random((6, 6), 0), _random((6,), 1)
    x = _random((3, 6), 2)  # three tokens: J = I ⊗ A
    out, product = retained_jvp(lambda z: z @ a.T + b, x)
    torch.testing.assert_close(out, x @ a.T + b, atol=0, rtol=0)  # the same ops, once
    for seed in (3, 4):  # the graph is kept: every product reuses it
        v = _random((3, 6), seed)
        expected = v @ a.T
        tol = rounding_tolerance(torch.float64, float(expected.abs().max()), 6)  # 6-term sums
        torch.testing.assert_close(product(v), expected, atol=tol, rtol=0)


def test_products_of_a_nonlinear_map_are_its_dense_jacobian() -> None:
    # f(x) = tanh(W x) · x away from any special point: J = diag(x)·diag(sech²(Wx))·W + diag(tanh)
    w = _random((5, 5), 5) / 2
    x = _random((5,), 6)

    def fn(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(w @ z) * z

    dense = torch.autograd.functional.jacobian(fn, x)
    _, product = retained_jvp(fn, x)
    v = _random((5,), 7)
    expected = dense @ v
    tol = rounding_tolerance(torch.float64, float(dense.abs().max() * v.abs().max()), 5 * 5)
    torch.testing.assert_close(product(v), expected, atol=tol, rtol=0)
    torch.testing.assert_close(product(v), jvp(fn, x, v), atol=tol, rtol=0)


def test_spectral_estimate_is_the_same_with_the_shortcut() -> None:
    q, _ = torch.linalg.qr(_random((8, 8), 8))
    spectrum = torch.tensor([0.9, -0.7, 0.5, 0.3, 0.2, 0.1, -0.05, 0.0], dtype=torch.float64)
    a = q @ torch.diag(spectrum) @ q.T
    x = torch.zeros(2, 8, dtype=torch.float64)
    slow = spectral_radius(lambda z: z @ a.T, x)
    fast = spectral_radius(lambda z: z @ a.T, x, retain_forward=True)
    exact = rounding_tolerance(torch.float64, 1.0, 16 * 16)  # J = I ⊗ A on 16 entries
    assert fast.radius == pytest.approx(0.9, rel=exact)
    assert fast.radius == pytest.approx(slow.radius, rel=exact)
    assert (fast.iterations, fast.converged, fast.verdict) == (
        slow.iterations,
        slow.converged,
        slow.verdict,
    )


def test_a_looped_block_gives_the_same_radius_both_ways() -> None:
    # The random-init sweep's certificate on a small stack: an unconverged budget, so the
    # estimate depends on every product, and it still agrees to float32 round-off.
    preset = RANDOM_INIT_PRESETS["quick"]
    cell = Cell("huginn", "concat-linear", 2, 0)
    model = LoopLM(cell_config(cell, preset))
    model.reset_parameters(0, cell_init(cell.norm, preset.init))
    model.eval()
    ids, _ = bundled_prompt_ids(2, 12)
    with torch.no_grad():
        z = model(ids, recurrences=6).state
        x, positions = prelude_output(model, ids)

    def block_map(state: torch.Tensor) -> torch.Tensor:
        return block_step(model, state, x, positions)

    slow = spectral_radius(block_map, z, iters=12, seed=3)
    fast = spectral_radius(block_map, z, iters=12, seed=3, retain_forward=True)
    assert fast.iterations == slow.iterations == 12 and not slow.converged
    # float32 products differ by round-off (ε ≈ 1.2e-7, about 3e-7 measured after 12 steps);
    # 1e-5 leaves room for other kernels and is still far below the certificate's 0.02 margin
    assert fast.radius == pytest.approx(slow.radius, rel=1e-5)
    assert fast.verdict == slow.verdict


class _OnceDifferentiableCube(torch.autograd.Function):
    """x³ with forward-mode AD but a backward that cannot itself be differentiated."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x**3

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x * x * grad

    @staticmethod
    def jvp(ctx: Any, tangent: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x * x * tangent


def test_a_map_without_double_backward_falls_back_to_forward_mode() -> None:
    x = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)  # J = diag(3x²) = diag(3, 12, 0.75)
    est = spectral_radius(_OnceDifferentiableCube.apply, x, retain_forward=True)
    assert est.radius == pytest.approx(12.0, rel=rounding_tolerance(torch.float64, 1.0, 3 * 3))
    assert est == spectral_radius(_OnceDifferentiableCube.apply, x)
