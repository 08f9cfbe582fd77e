"""Faster fixed points of the block map: Anderson acceleration with a safeguard.

Plain iteration z ← F(z) converges at the rate of the Jacobian's spectral radius ρ, which for
looped LMs is often close to 1, so reaching a tight fixed point takes hundreds of block
applications. Anderson acceleration (type II) extrapolates from the last ``memory`` iterates:
it picks the affine combination of past iterates whose linearised residual is smallest and
steps from there. On an affine map it is a Krylov method (at best as fast as GMRES), so
:func:`krylov_bound` (GMRES on the map linearised at z*) says how much any such solver could
gain. That depends on the Jacobian's spectrum, not on ρ alone: the trained demo contracts fast
(plain 18 applications, bound 11, Anderson 11–12), slowly contracting random pre-norm stacks
leave room (plain ~150, bound ~42, Anderson with memory 20 and β = 2 about 48).

Design decisions:

- **Global mixing.** One set of mixing coefficients for the whole tensor (every batch element
  and token), solved from one least-squares problem; the stopping test is the global relative
  residual ‖F(z) − z‖ / ‖F(z)‖. Per-element coefficients would need a batched solve and give a
  per-element stopping rule; when per-prompt convergence matters, solve one prompt at a time.
- **Regularised float64 solve.** The m×m normal equations (Gram matrix of residual
  differences) are formed and solved in float64 with a ridge ``ridge · trace(G)/m`` (scale
  free), so nearly collinear history never produces huge coefficients.
- **Safeguard.** Extrapolation can overshoot on strongly non-linear maps. When an accelerated
  step's residual ‖F(z) − z‖ is non-finite or grows past ``safeguard`` × the smallest so far
  (absolute, the quantity Anderson minimises: a far-away point can have a small *relative*
  residual merely because ‖F(z)‖ is huge), the step is discarded,
  the history is cleared and the next point is a plain step from the last accepted iterate
  (its F value is already known, so the rejected evaluation is the only cost).
- **No finite fixed point.** A pre-norm block with additive injection never settles: the
  stream grows linearly and only its direction converges. The relative residual still falls
  (like 1/k under plain iteration), and Anderson reaches ``tol`` by extrapolating far along
  the ray; :attr:`FixedPointResult.drifting` flags this case.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import Tensor

from loopscope.analysis.stability import _arnoldi, jvp
from loopscope.engine.loop import _check_inputs, block_step, prelude_output

if TYPE_CHECKING:
    from loopscope.engine.contract import InitState, LoopedLM

__all__ = [
    "FixedPointResult",
    "KrylovBound",
    "Method",
    "block_map",
    "krylov_bound",
    "solve_fixed_point",
]

Method = Literal["anderson", "plain"]
METHODS: tuple[Method, ...] = ("anderson", "plain")


@dataclass(frozen=True)
class FixedPointResult:
    """``state``: F(z) at the best iterate (the last one when converged). ``iterations``: block
    applications spent (calls of F). ``residuals``: relative residual ‖F(z)−z‖/‖F(z)‖ of every
    evaluated iterate, in order, and ``absolute_residuals`` the same without the division.
    ``fell_back``: how often the safeguard rejected an accelerated step."""

    state: Tensor
    iterations: int
    residuals: list[float] = field(repr=False)
    converged: bool
    method: str
    fell_back: int = 0
    absolute_residuals: list[float] = field(default_factory=list, repr=False)

    @property
    def residual(self) -> float:
        """Best relative residual reached."""
        return min(self.residuals) if self.residuals else math.inf

    @property
    def drifting(self) -> bool:
        """True when the *relative* residual fell only because the state ran off: it fell ≥ 10×
        while the absolute step ‖F(z) − z‖ stayed ≥ half its first value (so ‖F(z)‖ grew ≥ 5×).
        At a genuine fixed point both fall together.

        This is what a pre-norm block with additive injection does: every recurrence adds a
        bounded update to an unnormalised stream, so z_k ≈ k·v + w grows linearly, its
        direction converges like 1/k and there is no finite fixed point. Plain iteration still
        tracks the dynamics; Anderson then reaches ``tol`` by extrapolating far out, in a
        direction the tolerance does not pin down, so its state means nothing there.
        """
        rel, size = self.residuals, self.absolute_residuals
        if len(size) < 2 or not size[0] > 0 or not rel[0] > 0:
            return False
        return rel[-1] <= 0.1 * rel[0] and size[-1] >= 0.5 * size[0]


def _residual_norms(g: Tensor, r: Tensor) -> tuple[float, float]:
    """(‖r‖/‖g‖, ‖r‖) in float64; the relative one is 0 when both vanish (F(0) = 0 is a fixed
    point) and inf when only g does."""
    num = float(torch.linalg.vector_norm(r, dtype=torch.float64))
    den = float(torch.linalg.vector_norm(g, dtype=torch.float64))
    if den == 0.0:
        return (0.0 if num == 0.0 else math.inf), num
    return num / den, num


def _mixing_coefficients(d_res: Tensor, res: Tensor, ridge: float) -> Tensor | None:
    """γ = argmin ‖res − ΔR γ‖² + λ‖γ‖² in float64 (None when the solve fails)."""
    d64 = d_res.to(torch.float64)
    gram = d64.T @ d64
    rhs = d64.T @ res.to(torch.float64)
    m = gram.shape[0]
    scale = float(torch.trace(gram)) / m
    if not math.isfinite(scale) or scale <= 0.0:
        return None
    gram = gram + ridge * scale * torch.eye(m, dtype=torch.float64, device=gram.device)
    try:
        gamma = torch.linalg.solve(gram, rhs)
    except RuntimeError:  # singular even with the ridge: take a plain step instead
        return None
    if not bool(torch.isfinite(gamma).all()):
        return None
    return gamma


def _anderson_step(
    xs: deque[Tensor], rs: deque[Tensor], beta: float, ridge: float
) -> Tensor | None:
    """Next iterate x − ΔX γ + β (r − ΔR γ) from the history (flattened x_i and r_i)."""
    x_hist = torch.stack(list(xs), dim=1)  # (n, m+1)
    r_hist = torch.stack(list(rs), dim=1)
    d_x = x_hist[:, 1:] - x_hist[:, :-1]
    d_r = r_hist[:, 1:] - r_hist[:, :-1]
    gamma = _mixing_coefficients(d_r, rs[-1], ridge)
    if gamma is None:
        return None
    gamma = gamma.to(x_hist.dtype)
    return xs[-1] - d_x @ gamma + beta * (rs[-1] - d_r @ gamma)


def _check_options(method: str, tol: float, max_iter: int, memory: int, beta: float) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be ≥ 1, got {max_iter}")
    if memory < 1:
        raise ValueError(
            f"memory must be ≥ 1 (the number of past steps Anderson mixes), got {memory}"
        )
    if not beta > 0:
        raise ValueError(f"beta (the damping of Anderson's step) must be > 0, got {beta}")


def solve_fixed_point(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    method: Method = "anderson",
    tol: float = 1e-4,
    max_iter: int = 200,
    memory: int = 5,
    beta: float = 1.0,
    ridge: float = 1e-6,
    safeguard: float | None = 5.0,
) -> FixedPointResult:
    """Find z* = f(z*) from ``z0`` by plain iteration or safeguarded Anderson acceleration.

    Stops when the relative residual ‖f(z) − z‖/‖f(z)‖ ≤ ``tol`` or after ``max_iter``
    applications of ``f``. ``memory``: past steps Anderson mixes; ``beta``: its damping (1 =
    undamped, > 1 over-relaxes: memory 20 with β = 2 needs ~1.7× fewer applications on slowly
    contracting pre-norm stacks, while memory 5 with β = 1 is safer on the non-linear paths of
    sandwich and Ouro norms); ``ridge``: relative Tikhonov term of its least squares;
    ``safeguard``: reject an accelerated step whose residual norm ‖f(z) − z‖ exceeds this
    multiple of the smallest so far and take a plain step from the last accepted iterate
    instead (None disables it, for experiments only; 2× rejected the normal early
    non-monotonicity of Anderson on block maps far too often, 5× did not). Runs under
    ``torch.no_grad``: the solve is not differentiable.

    Anderson finds zeros of f(z) − z whatever their stability, so it can land on a fixed point
    that plain iteration would never reach: certify with ``stability.spectral_radius``.
    """
    _check_options(method, tol, max_iter, memory, beta)
    shape = z0.shape
    xs: deque[Tensor] = deque(maxlen=memory + 1)
    rs: deque[Tensor] = deque(maxlen=memory + 1)
    residuals: list[float] = []
    sizes: list[float] = []
    best, best_size, best_g = math.inf, math.inf, z0.detach()
    fell_back, converged, accelerated = 0, False, False
    x = z0.detach().reshape(-1)
    last_g = x  # F of the last accepted iterate: where a rejected step restarts from
    with torch.no_grad():
        for _ in range(max_iter):
            g_full = f(x.reshape(shape))
            if g_full.shape != shape:
                raise ValueError(
                    f"f must map shape {tuple(shape)} to itself, got {tuple(g_full.shape)}"
                )
            g = g_full.reshape(-1)
            r = g - x
            res, size = _residual_norms(g, r)
            residuals.append(res)
            sizes.append(size)
            if accelerated and safeguard is not None and _rejected(size, best_size, safeguard):
                fell_back += 1
                xs.clear()
                rs.clear()
                x, accelerated = last_g, False
                continue
            if not math.isfinite(res):
                break  # plain iteration diverged: nothing left to fall back on
            if res < best:
                best, best_g = res, g_full
            best_size = min(best_size, size)
            last_g = g
            if res <= tol:
                converged = True
                break
            if method == "plain":
                x = g
                continue
            xs.append(x)
            rs.append(r)
            step = _anderson_step(xs, rs, beta, ridge) if len(xs) > 1 else None
            accelerated = step is not None
            x = step if step is not None else x + beta * r
    return FixedPointResult(
        state=best_g,
        iterations=len(residuals),
        residuals=residuals,
        converged=converged,
        method=method,
        fell_back=fell_back,
        absolute_residuals=sizes,
    )


def _rejected(size: float, best_size: float, factor: float) -> bool:
    """The safeguard's test: the residual norm is non-finite or grew past factor × the best."""
    return not math.isfinite(size) or size > factor * best_size


@dataclass(frozen=True)
class KrylovBound:
    """The fewest block applications any Krylov method could spend on the linearised problem.

    ``applications``: 1 (for F(z0)) + the GMRES steps until the relative residual
    ‖r‖/‖z*‖ ≤ tol, or None when ``max_steps`` did not suffice. ``residuals``: that relative
    residual after each application (the first is at z0). ``start_mismatch``: how far F is
    from affine on the way: ‖r0_linear − r0‖/‖r0‖ at z0. The bound is exact for affine maps
    and a guide when this is small (≈ 0.1 on the trained demo); at ≥ 0.3 the solvers' path is
    non-linear and real solvers can need many more applications than the bound."""

    applications: int | None
    residuals: list[float] = field(repr=False)
    tol: float
    start_mismatch: float


def krylov_bound(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    fixed_point: Tensor,
    *,
    tol: float = 1e-4,
    max_steps: int = 200,
) -> KrylovBound:
    """How few applications of ``f`` a Krylov method needs from ``z0``, linearised at z*.

    Why: Anderson acceleration, Broyden and Newton–Krylov all build their k-th iterate inside
    z0 + span{r0, J r0, …} on an affine map, and GMRES picks the point of smallest residual in
    that space. So on F(z) ≈ z* + J (z − z*), no such method reaches ‖F(z) − z‖ ≤ tol·‖z*‖ in
    fewer applications than GMRES does: if plain iteration needs n, no accelerated solver can
    be more than n / bound times faster. (Only a guide far from z*, where F is not affine.)

    Runs GMRES on (I − J) with J·v by forward-mode JVPs at ``fixed_point`` (one block forward
    each, as the solvers' applications are), from the linearised residual r0 = (J − I)(z0 − z*),
    in float64 when ``fixed_point`` is float64, else float32.
    """
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be ≥ 1, got {max_steps}")
    if z0.shape != fixed_point.shape:
        raise ValueError(
            f"z0 {tuple(z0.shape)} and fixed_point {tuple(fixed_point.shape)} differ in shape"
        )
    star = fixed_point.detach()
    shape, n = star.shape, star.numel()
    work = torch.float64 if star.dtype == torch.float64 else torch.float32

    def residual_map(v: Tensor) -> Tensor:  # (I − J) v
        jv = jvp(f, star, v.reshape(shape).to(star.dtype)).reshape(n).to(work)
        return v - jv

    scale = max(float(torch.linalg.vector_norm(star, dtype=torch.float64)), 1e-300)
    target = tol * scale
    r0 = -residual_map((z0.detach().to(work) - star.to(work)).reshape(n))
    beta = float(torch.linalg.vector_norm(r0, dtype=torch.float64))
    residuals = [beta / scale]
    with torch.no_grad():
        true_r0 = (f(z0.detach()) - z0.detach()).reshape(n).to(work)
    mismatch = _relative_to(r0 - true_r0, true_r0)
    if beta <= target:
        return KrylovBound(1, residuals, tol, mismatch)

    def small_enough(hess: np.ndarray, steps: int) -> bool:
        rhs = np.zeros(steps + 1)
        rhs[0] = beta
        h = hess[: steps + 1, :steps]
        y = np.linalg.lstsq(h, rhs, rcond=None)[0]
        residual = float(np.linalg.norm(rhs - h @ y))
        residuals.append(residual / scale)
        return residual <= target

    with torch.no_grad():
        _, hess, steps = _arnoldi(residual_map, r0 / beta, min(max_steps, n), stop=small_enough)
    if len(residuals) < steps + 1:  # the Krylov space closed: GMRES's last step is exact
        small_enough(hess, steps)
    reached = residuals[-1] * scale <= target
    return KrylovBound(len(residuals) if reached else None, residuals, tol, mismatch)


def _relative_to(diff: Tensor, ref: Tensor) -> float:
    """‖diff‖/‖ref‖ in float64 (0 when both vanish, inf when only ref does)."""
    num = float(torch.linalg.vector_norm(diff, dtype=torch.float64))
    den = float(torch.linalg.vector_norm(ref, dtype=torch.float64))
    return (0.0 if num == 0.0 else math.inf) if den == 0.0 else num / den


def block_map(
    model: LoopedLM,
    input_ids: Tensor,
    *,
    init_state: InitState | None = None,
    seed: int = 0,
) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """The recurrence of ``model`` on a prompt as a map, with the engine's initial state.

    Returns ``(f, z0)``: f(z) = one recurrence (inject, block layers, recurrence norm) with the
    prelude output X fixed, under ``torch.no_grad``; z0 the state ``run_loop`` would start
    from (``init_state`` default: the model's; ``seed`` for the random one). Plain iteration
    of f from z0 reproduces ``model(ids, recurrences=n).state`` exactly.
    """
    ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    _check_inputs(model, ids, 1)
    mode = init_state or model.meta.default_init_state
    with torch.no_grad():
        inputs, positions = prelude_output(model, ids)
        generator = None
        if mode == "random":
            generator = torch.Generator(device=inputs.device).manual_seed(seed)
        z0 = model.initial_state(inputs, mode, generator, model.init_std)

    def f(z: Tensor) -> Tensor:
        with torch.no_grad():
            return block_step(model, z, inputs, positions)

    return f, z0
