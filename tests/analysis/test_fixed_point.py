"""Anderson acceleration against maps whose fixed point is known, and on LoopLM block maps."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from tolerances import forward_tolerance, rounding_tolerance

from loopscope.analysis.fixed_point import block_map, krylov_bound, solve_fixed_point
from loopscope.families.looplm import LoopConfig, LoopLM
from loopscope.nn.injection import InjectionKind
from loopscope.nn.layers import NormScheme

F64 = torch.float64


def symmetric(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Q diag(eigs) Qᵀ for a seeded random orthogonal Q: known spectrum, no special basis."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=F64))
    return q @ torch.diag(eigs.to(F64)) @ q.T


def rhs(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_affine_map_anderson_is_much_faster_and_exact() -> None:
    n = 40
    a = symmetric(torch.linspace(0.0, 0.95, n))  # ρ = 0.95: plain needs ~ log(tol)/log(ρ)
    b = rhs(n)
    exact = torch.linalg.solve(torch.eye(n, dtype=F64) - a, b)

    def f(z: torch.Tensor) -> torch.Tensor:
        return a @ z + b

    z0 = torch.zeros(n, dtype=F64)
    plain = solve_fixed_point(f, z0, method="plain", tol=1e-8, max_iter=2000)
    anderson = solve_fixed_point(f, z0, method="anderson", tol=1e-8, max_iter=2000)
    assert plain.converged and anderson.converged
    assert anderson.fell_back == 0
    assert 3 * anderson.iterations <= plain.iterations
    for result in (plain, anderson):
        err = float(
            torch.linalg.vector_norm(result.state - exact) / torch.linalg.vector_norm(exact)
        )
        # a contraction by ρ = 0.95 stopped at relative residual 1e-8 lies within 1e-8/(1 − ρ)
        # of z*, and z* itself is solved to κ(I − A) = 1/(1 − ρ) times rounding
        assert err < 1e-8 / (1 - 0.95) + rounding_tolerance(F64, 1 / (1 - 0.95), n)
        assert result.iterations == len(result.residuals) == len(result.absolute_residuals)
        assert result.residuals[-1] <= 1e-8 and not result.drifting


def test_tanh_map_both_methods_reach_the_same_point() -> None:
    n = 40
    a = symmetric(torch.linspace(0.0, 0.95, n))  # tanh is 1-Lipschitz: still a contraction
    b = 0.3 * rhs(n)

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(a @ z + b)

    z0 = torch.zeros(n, dtype=F64)
    plain = solve_fixed_point(f, z0, method="plain", tol=1e-10, max_iter=2000)
    anderson = solve_fixed_point(f, z0, method="anderson", tol=1e-10)
    assert plain.converged and anderson.converged
    assert 2 * anderson.iterations <= plain.iterations
    # each stopped within 1e-10/(1 − 0.95)·‖z*‖ of z*, and at a residual of 1e-10·‖F(z)‖
    apart = 2 * 1e-10 / (1 - 0.95) * float(torch.linalg.vector_norm(plain.state))
    torch.testing.assert_close(anderson.state, plain.state, rtol=0, atol=apart)
    residual = 1e-10 * float(torch.linalg.vector_norm(f(anderson.state)))
    torch.testing.assert_close(f(anderson.state), anderson.state, rtol=0, atol=residual)


class BadStepAt:
    """An affine contraction whose ``call``-th evaluation goes wrong (overflow to NaN, or a
    huge value): the kind of failure an extrapolated step into an untested region causes."""

    def __init__(self, call: int, value: float) -> None:
        n = 20
        self.a = symmetric(torch.linspace(0.0, 0.9, n), seed=2)
        self.b = rhs(n, seed=3)
        self.exact = torch.linalg.solve(torch.eye(n, dtype=F64) - self.a, self.b)
        self.call, self.value, self.calls = call, value, 0

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.a @ z + self.b
        return torch.full_like(out, self.value) if self.calls == self.call else out


@pytest.mark.parametrize("value", [math.nan, 1e30])
def test_safeguard_rejects_a_bad_accelerated_step(value: float) -> None:
    bad = BadStepAt(call=6, value=value)  # call 6 evaluates an Anderson extrapolation
    guarded = solve_fixed_point(bad, torch.zeros(20, dtype=F64), tol=1e-9)
    assert guarded.converged and guarded.fell_back == 1
    err = torch.linalg.vector_norm(guarded.state - bad.exact) / torch.linalg.vector_norm(bad.exact)
    assert float(err) < 1e-9 / (1 - 0.9) + rounding_tolerance(F64, 1 / (1 - 0.9), 20)  # as above

    unguarded_map = BadStepAt(call=6, value=value)
    unguarded = solve_fixed_point(
        unguarded_map, torch.zeros(20, dtype=F64), tol=1e-9, safeguard=None
    )
    assert unguarded.fell_back == 0
    if math.isnan(value):  # NaN poisons the history: without the safeguard the solve stops
        assert not unguarded.converged and unguarded.iterations == 6
    else:  # the huge point enters the history and costs the unguarded solve extra steps
        assert unguarded.iterations > guarded.iterations


def test_safeguard_on_a_map_where_extrapolation_overshoots() -> None:
    # Secant-like steps on z − atan(z − 3) jump far out, where |z| > 10 makes the map explode.
    def f(z: torch.Tensor) -> torch.Tensor:
        return z - torch.atan(z - 3.0) * (1 + torch.relu(z.abs() - 10) ** 2)

    z0 = torch.tensor([8.0, 7.0, -1.0, 6.5], dtype=F64)
    guarded = solve_fixed_point(f, z0, tol=1e-8, max_iter=300)
    unguarded = solve_fixed_point(f, z0, tol=1e-8, max_iter=300, safeguard=None)
    assert guarded.converged and guarded.fell_back >= 1
    torch.testing.assert_close(guarded.state, torch.full((4,), 3.0, dtype=F64))
    assert max(unguarded.absolute_residuals) > 1000  # it ran out to |z| ≈ 60 and back
    assert guarded.iterations < unguarded.iterations


def tiny_model(injection: InjectionKind, scheme: NormScheme = "pre") -> LoopLM:
    config = LoopConfig(
        name="tiny",
        d_model=32,
        n_heads=2,
        prelude_layers=1,
        block_layers=2,
        coda_layers=1,
        context_length=64,
        injection=injection,
        norm_scheme=scheme,
    )
    return LoopLM(config).to(F64).eval()


def prompt_ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def test_looplm_block_map_anderson_matches_plain_and_the_engine() -> None:
    # Pre-norm with concat-linear injection (Huginn's adapter, W·[Z; X] with W_Z ≈ I/√2)
    # contracts the stream, so a finite fixed point exists.
    model = tiny_model("concat-linear")
    f, z0 = block_map(model, prompt_ids())
    plain = solve_fixed_point(f, z0, method="plain", tol=1e-9, max_iter=1000)
    anderson = solve_fixed_point(f, z0, method="anderson", tol=1e-9)
    assert plain.converged and anderson.converged
    assert anderson.iterations < plain.iterations
    rel = torch.linalg.vector_norm(anderson.state - plain.state) / torch.linalg.vector_norm(
        plain.state
    )
    assert float(rel) <= 1e-3
    # Plain iteration of block_map is the engine's recurrence, step for step.
    engine = model(prompt_ids(), recurrences=plain.iterations).state
    torch.testing.assert_close(plain.state, engine)


def test_pre_norm_additive_injection_drifts_instead_of_converging() -> None:
    # Each recurrence adds X plus bounded pre-norm updates to an unnormalised stream: the state
    # grows linearly, the relative residual decays like 1/k, and there is no finite fixed point.
    model = tiny_model("add")
    f, z0 = block_map(model, prompt_ids())
    plain = solve_fixed_point(f, z0, method="plain", tol=1e-2, max_iter=1000)
    assert plain.converged and plain.drifting
    assert 50 <= plain.iterations <= 200  # relative residual ≈ 1/k
    anderson = solve_fixed_point(f, z0, method="anderson", tol=1e-2)
    assert anderson.drifting


def test_bad_options_and_shapes_get_clear_errors() -> None:
    z0 = torch.zeros(3)
    with pytest.raises(ValueError, match="unknown method 'newton'"):
        solve_fixed_point(lambda z: z, z0, method="newton")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="memory"):
        solve_fixed_point(lambda z: z, z0, memory=0)
    with pytest.raises(ValueError, match="map shape"):
        solve_fixed_point(lambda z: z[:2], z0)
    with pytest.raises(ValueError, match="batch dimension"):
        block_map(tiny_model("add"), torch.zeros(1, 2, 3, dtype=torch.long))


def affine(
    a: torch.Tensor, b: torch.Tensor
) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """F(z) = A z + b and its exact fixed point (I − A)⁻¹ b."""
    exact = torch.linalg.solve(torch.eye(len(b), dtype=F64) - a, b)
    return (lambda z: a @ z + b), exact


@pytest.mark.parametrize("eigs", [[0.9], [0.9, 0.5], [0.95, 0.3, -0.4]])
def test_krylov_bound_is_one_plus_the_number_of_distinct_eigenvalues(eigs: list[float]) -> None:
    # GMRES on (I − A) terminates after as many steps as A has distinct eigenvalues.
    n = 30
    spectrum = torch.tensor([eigs[i % len(eigs)] for i in range(n)], dtype=F64)
    f, exact = affine(symmetric(spectrum), rhs(n))
    bound = krylov_bound(f, torch.zeros(n, dtype=F64), exact, tol=1e-10)
    assert bound.applications == 1 + len(eigs)
    assert len(bound.residuals) == bound.applications
    assert bound.residuals[0] > 1e-10 >= bound.residuals[-1]
    # an affine map is its own linearisation: only z*'s solve, κ(I − A) times rounding, differs
    condition = (1 - min(eigs)) / (1 - max(eigs))
    assert bound.start_mismatch < rounding_tolerance(F64, condition, n)


def test_krylov_bound_for_a_scaled_identity_matches_plain_iteration_analytically() -> None:
    # J = λI: plain iteration's residual shrinks exactly by λ per step; GMRES needs one step.
    n, lam, tol = 20, 0.8, 1e-6
    f, exact = affine(lam * torch.eye(n, dtype=F64), rhs(n))
    z0 = torch.zeros(n, dtype=F64)
    bound = krylov_bound(f, z0, exact, tol=tol)
    assert bound.applications == 2
    r0 = float(torch.linalg.vector_norm(f(z0) - z0))
    # Plain stops at the first k with ‖r_k‖/‖F(z_k)‖ = λ^k r0 / ‖F(z_k)‖ ≤ tol.
    plain = solve_fixed_point(f, z0, method="plain", tol=tol, max_iter=500)
    k = plain.iterations - 1
    # the computed residual differs from λ^k·r0 by the k steps' rounding of states ‖z‖ large,
    # which relative to a residual of tol·‖z‖ is that rounding over tol
    slack = forward_tolerance(F64, 1.0, plain.iterations, n) / tol
    assert lam**k * r0 <= tol * float(torch.linalg.vector_norm(plain.state)) * (1 + slack)
    assert lam ** (k - 1) * r0 > tol * float(torch.linalg.vector_norm(exact)) * 0.99


def test_no_anderson_setting_beats_the_krylov_bound_on_an_affine_map() -> None:
    n = 60
    f, exact = affine(symmetric(torch.linspace(-0.5, 0.97, n), seed=3), rhs(n))
    z0 = torch.zeros(n, dtype=F64)
    tol = 1e-8
    bound = krylov_bound(f, z0, exact, tol=tol)
    plain = solve_fixed_point(f, z0, method="plain", tol=tol, max_iter=5000)
    assert bound.applications is not None and bound.applications < plain.iterations
    for memory in (1, 5, 20, 60):
        for beta in (0.5, 1.0, 1.5):
            anderson = solve_fixed_point(f, z0, memory=memory, beta=beta, tol=tol, max_iter=5000)
            assert anderson.converged
            # ‖F(z)‖ and ‖z*‖ differ by < tol here, so the two stopping rules agree.
            assert anderson.iterations >= bound.applications - 1


def test_krylov_bound_on_a_block_map_lies_between_one_and_plain_iteration() -> None:
    f, z0 = block_map(tiny_model("concat-linear"), prompt_ids())
    tight = solve_fixed_point(f, z0, tol=1e-6, max_iter=400)
    bound = krylov_bound(f, z0, tight.state, tol=1e-4)
    plain = solve_fixed_point(f, z0, method="plain", tol=1e-4, max_iter=400)
    assert bound.applications is not None
    assert 1 < bound.applications <= plain.iterations
    assert 0.0 < bound.start_mismatch < math.inf


def test_krylov_bound_rejects_bad_arguments() -> None:
    f, exact = affine(0.5 * torch.eye(3, dtype=F64), rhs(3))
    with pytest.raises(ValueError, match="tol must be > 0"):
        krylov_bound(f, torch.zeros(3, dtype=F64), exact, tol=0.0)
    with pytest.raises(ValueError, match="max_steps"):
        krylov_bound(f, torch.zeros(3, dtype=F64), exact, max_steps=0)
    with pytest.raises(ValueError, match="differ in shape"):
        krylov_bound(f, torch.zeros(4, dtype=F64), exact)


def test_solver_convergence_figure_draws_every_solver_and_the_tolerance() -> None:
    from loopscope.analysis.figures_dynamics import plot_solver_convergence

    n = 20
    f, exact = affine(symmetric(torch.linspace(0.0, 0.9, n)), rhs(n))
    z0 = torch.zeros(n, dtype=F64)
    curves = {
        "plain": solve_fixed_point(f, z0, method="plain", tol=1e-6, max_iter=500).residuals,
        "anderson": solve_fixed_point(f, z0, tol=1e-6, max_iter=500).residuals,
        "bound": krylov_bound(f, z0, exact, tol=1e-6).residuals,
    }
    fig = plot_solver_convergence({"affine": curves, "again": curves}, tol=1e-6)
    assert len(fig.axes) == 2
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()] == [*curves, "tol 1e-06"]
    assert ax.get_yscale() == "log" and ax.get_title() == "affine"
    plain_line = ax.get_lines()[0]
    assert len(plain_line.get_xdata()) == len(curves["plain"])
