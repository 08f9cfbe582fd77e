"""Stability certificate against maps whose Jacobian spectrum is known."""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import rounding_tolerance

from loopscope.analysis.stability import jvp, spectral_radius, verdict_for


def rotation(theta: float) -> torch.Tensor:
    c, s = math.cos(theta), math.sin(theta)
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)


def conjugated(blocks: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Q B Qᵀ for a random orthogonal Q: same spectrum, no special basis."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(
        torch.randn(blocks.shape[0], blocks.shape[0], generator=g, dtype=torch.float64)
    )
    return q @ blocks @ q.T


def affine(a: torch.Tensor, b: torch.Tensor):
    return lambda x: x @ a.T + b  # works on (..., D): Jacobian is I ⊗ A


def test_symmetric_matrix_radius():
    a = conjugated(torch.diag(torch.tensor([0.9, -0.7, 0.5, 0.3, 0.1, -0.05], dtype=torch.float64)))
    est = spectral_radius(
        affine(a, torch.ones(6, dtype=torch.float64)), torch.zeros(6, dtype=torch.float64)
    )
    # Arnoldi spans the whole 6-dim space: only float64 rounding of Q D Qᵀ and of the n-term
    # products and orthogonalisations, n² roundings, separates the estimate from 0.9
    assert est.radius == pytest.approx(0.9, rel=rounding_tolerance(torch.float64, 1.0, 6 * 6))
    assert est.converged and est.verdict == "contracting"


def test_rotation_scaled_matrix_complex_pair():
    # Dominant eigenvalues 0.8·e^{±iθ}: plain power iteration would oscillate here.
    block = torch.zeros(8, 8, dtype=torch.float64)
    block[:2, :2] = 0.8 * rotation(0.7)
    block[2:, 2:] = torch.diag(torch.tensor([0.6, -0.5, 0.3, 0.2, 0.1, 0.0], dtype=torch.float64))
    a = conjugated(block, seed=1)
    x = torch.zeros(3, 8, dtype=torch.float64)  # several tokens: J = I ⊗ A, same spectrum
    est = spectral_radius(affine(a, torch.zeros(8, dtype=torch.float64)), x)
    exact = rounding_tolerance(torch.float64, 1.0, 24 * 24)  # J = I ⊗ A acts on 3·8 entries
    assert est.radius == pytest.approx(0.8, rel=exact)
    assert est.converged and est.verdict == "contracting"
    pure = spectral_radius(
        affine(0.8 * rotation(1.3), torch.zeros(2, dtype=torch.float64)), x[:, :2]
    )
    assert pure.radius == pytest.approx(0.8, rel=rounding_tolerance(torch.float64, 1.0, 6 * 6))


def test_verdicts_and_determinism():
    a = conjugated(torch.diag(torch.tensor([1.2, 0.5, 0.1], dtype=torch.float64)))
    fn = affine(a, torch.zeros(3, dtype=torch.float64))
    x = torch.zeros(3, dtype=torch.float64)
    est = spectral_radius(fn, x)
    exact = rounding_tolerance(torch.float64, 1.0, 3 * 3)  # a 3-dim space, n² roundings
    assert est.radius == pytest.approx(1.2, rel=exact) and est.verdict == "expanding"
    assert spectral_radius(fn, x) == est
    assert spectral_radius(lambda z: 1.01 * z, x).verdict == "neutral"
    assert verdict_for(float("nan")) == "undetermined"
    assert verdict_for(0.99, margin=0.0) == "contracting"


def test_nonlinear_map_at_its_fixed_point():
    # f(x) = tanh(W x): fixed point x* = 0, Jacobian there = W (tanh'(0) = 1); float32 path.
    w = conjugated(torch.diag(torch.tensor([0.95, 0.6, -0.4, 0.2], dtype=torch.float64)), 2).float()
    est = spectral_radius(lambda x: torch.tanh(x @ w.T), torch.zeros(5, 4))
    # W rounded to float32 moves a symmetric matrix's eigenvalues by its n²-term rounding
    assert est.radius == pytest.approx(0.95, rel=rounding_tolerance(torch.float32, 1.0, 4 * 4))


def test_zero_and_low_rank_jacobians():
    x = torch.zeros(10, dtype=torch.float64)
    assert spectral_radius(lambda z: 0.0 * z, x).radius == 0.0
    u = torch.linspace(-1, 1, 10, dtype=torch.float64)
    v = torch.cos(torch.arange(10, dtype=torch.float64))
    est = spectral_radius(lambda z: u * (v @ z), x)  # J = u vᵀ: one eigenvalue vᵀu
    exact = rounding_tolerance(torch.float64, 1.0, 10 * 10)  # n² roundings in a 10-dim space
    assert est.radius == pytest.approx(abs(float(v @ u)), rel=exact) and est.converged


def test_budget_and_shape_errors():
    a = conjugated(torch.diag(torch.linspace(0.9, -0.89, 200, dtype=torch.float64)))
    est = spectral_radius(lambda z: a @ z, torch.zeros(200, dtype=torch.float64), iters=5)
    assert est.iterations <= 5 and not est.converged
    with pytest.raises(ValueError):
        spectral_radius(lambda z: z[:2], torch.zeros(3))


def test_jvp_fallback_for_untransformable_functions():
    def fn(z: torch.Tensor) -> torch.Tensor:
        scale = z.sum().item()  # .item() is not allowed under torch.func transforms
        return 0.5 * z + 0.0 * scale

    out = jvp(fn, torch.ones(3), torch.ones(3))
    # 0.5·1 + 0·scale: exact in float32
    torch.testing.assert_close(out, torch.full((3,), 0.5), atol=0, rtol=0)


def test_attention_block_matches_dense_jacobian():
    # nn.TransformerEncoderLayer runs fused SDPA / inference fast paths that support no
    # forward AD; jvp must still work, even when the caller is under no_grad.
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    x = torch.randn(1, 4, 32)
    with torch.no_grad():
        est = spectral_radius(lambda z: layer(z), x, iters=150)
    dense = torch.autograd.functional.jacobian(lambda z: layer(z), x).reshape(128, 128)
    expected = float(torch.linalg.eigvals(dense.double()).abs().max())
    # a convergence tolerance: restarted Arnoldi's 150 JVPs on a non-normal 128-dim Jacobian
    assert est.converged and est.radius == pytest.approx(expected, rel=1e-3)
