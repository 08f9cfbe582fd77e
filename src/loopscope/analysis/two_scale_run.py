"""Running a two-scale nested model to fill :class:`loopscope.analysis.two_scale.TwoScaleResult`.

A two-scale loop tree is an outer loop whose body is one inner loop over a *fast* stack and
then one *slow* stack (HRM-Text: ``h × [l × [L-stack], H-stack]``). Per prompt this runs:

1. the trained counts, recording every state: inner and outer steps, and the inner fixed point
   of every H step (the inner map iterated further with z_H held at the value it had in that
   step);
2. the outer loop extended (``extend`` × its trained count): outer extrapolation, the slow
   stack's limiting behaviour, attention stabilisation and layer degeneracy;
3. the inner loop extended: the same for the fast stack, in the last H step;
4. stability certificates: the inner map's spectral radius at each inner fixed point, and the
   whole H step's at the final state.

Each step of a level compares a state with the one before it, starting from the state the level
entered with (the initial state, or the state carried over from the previous H step).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from loopscope.analysis.attention_dynamics import (
    attention_fixed_point_distances,
    attention_stabilised_from,
)
from loopscope.analysis.dynamics import degeneracy
from loopscope.analysis.limiting import classify_limiting_behaviour
from loopscope.analysis.stability import spectral_radius
from loopscope.analysis.two_scale import (
    LevelSteps,
    StackSummary,
    TwoScaleResult,
    level_steps,
    pool_two_scale,
)
from loopscope.core.errors import LoopscopeError
from loopscope.engine.nested import (
    Loop,
    NestedProbe,
    NestedSite,
    NestedStateRecorder,
    Stack,
    apply_body,
    apply_stack,
    resolve_cycles,
)

__all__ = ["TwoScaleModel", "TwoScaleShape", "measure_two_scale", "two_scale_shape"]

#: Attention counts as stable from the first cycle after which its distance to the last maps
#: (mean over layers and heads) stays at most this.
ATTENTION_TOL = 1e-2


class TwoScaleModel(Protocol):
    """A nested family with the pieces this runner drives (HrmTextLM is one)."""

    @property
    def loop_tree(self) -> Loop: ...

    def stack_layers(self, stack: str) -> Sequence[Any]: ...

    def stack_output(self, stack: str, hidden: Tensor) -> Tensor: ...

    def context(self, length: int, device: torch.device, token_type_ids: Tensor | None) -> Any: ...

    def run(
        self,
        input_ids: Tensor,
        *,
        cycles: Mapping[str, int] | None = ...,
        token_type_ids: Tensor | None = ...,
        probes: Sequence[NestedProbe] = ...,
        return_attn: bool | None = ...,
    ) -> Any: ...


@dataclass(frozen=True)
class TwoScaleShape:
    """The outer loop, the inner loop, and the fast and slow stacks of a two-scale tree."""

    outer: Loop
    inner: Loop
    fast: Stack
    slow: Stack


def two_scale_shape(tree: Loop) -> TwoScaleShape:
    """Read the two levels out of ``tree``; LoopscopeError for any other shape of tree."""
    body = tree.body
    ok = (
        len(body) == 2
        and isinstance(body[0], Loop)
        and isinstance(body[1], Stack)
        and len(body[0].body) == 1
        and isinstance(body[0].body[0], Stack)
    )
    if not ok:
        raise LoopscopeError(
            "the two-scale analyses need a loop tree OUTER × [INNER × [fast stack], slow "
            f"stack], got {tree}"
        )
    inner = body[0]
    assert isinstance(inner, Loop) and isinstance(inner.body[0], Stack)
    assert isinstance(body[1], Stack)
    return TwoScaleShape(tree, inner, inner.body[0], body[1])


@dataclass
class _LayerTap:
    """Per-layer streams and attention maps of one stack, keyed by the count of ``loop``, kept
    only where ``keep(site)`` holds (batch row 0)."""

    stack: str
    loop: str
    keep: Any
    wants_attention: bool = True
    hidden: dict[int, dict[int, Tensor]] = field(default_factory=dict)
    attn: dict[int, dict[int, Tensor]] = field(default_factory=dict)

    def observe(self, site: NestedSite, hidden: Tensor, attn: Tensor | None) -> None:
        if site.stack != self.stack or site.layer is None or not self.keep(site):
            return
        count = site.count(self.loop)
        assert count is not None
        self.hidden.setdefault(count, {})[site.layer] = _kept(hidden[0])
        if attn is not None:
            self.attn.setdefault(count, {})[site.layer] = _kept(attn[0])

    def attention(self) -> np.ndarray:
        """(cycles, layers, heads, T, T)."""
        return np.stack(
            [
                np.stack([a.numpy() for _, a in sorted(self.attn[c].items())])
                for c in sorted(self.attn)
            ]
        )

    def last_layers(self) -> np.ndarray:
        """(layers, T, D) at the last recorded cycle."""
        last = self.hidden[max(self.hidden)]
        return np.stack([h.numpy() for _, h in sorted(last.items())])


def _kept(x: Tensor) -> Tensor:
    """Detached, on the CPU, in float32 at least (float64 stays float64)."""
    return x.detach().to("cpu", torch.promote_types(x.dtype, torch.float32))


def _stack_summary(tap: _LayerTap, states: np.ndarray) -> StackSummary:
    attn = tap.attention()
    curve = attention_fixed_point_distances(attn).mean(axis=1)
    return StackSummary(
        degenerate_cosine=float(degeneracy(tap.last_layers()).min_cosine),
        limiting=dict(classify_limiting_behaviour(states).rates),
        attention_stable_from=attention_stabilised_from(curve, ATTENTION_TOL),
    )


def _with_entry(entry: Tensor, states: Tensor) -> np.ndarray:
    """The state a level entered with, then its states: (n + 1, T, D) of batch row 0."""
    return torch.cat([entry[None, 0], states[:, 0]]).numpy().astype(np.float64)


def _measure_prompt(
    model: TwoScaleModel,
    ids: Tensor,
    token_type_ids: Tensor | None,
    extend: int,
    fixed_point_iters: int,
    stability_iters: int,
) -> TwoScaleResult:
    shape = two_scale_shape(model.loop_tree)
    fast, slow = shape.fast.name, shape.slow.name
    h_name, l_name = shape.outer.name, shape.inner.name
    counts = resolve_cycles(model.loop_tree, None)
    h_count, l_count = counts[h_name], counts[l_name]
    ctx = model.context(ids.shape[1], ids.device, token_type_ids)

    # 1. trained counts: every state, and the inner fixed point of each H step.
    trained = NestedStateRecorder()
    with torch.no_grad():
        model.run(ids, token_type_ids=token_type_ids, probes=[trained])
    z_fast, z_slow = trained.trajectory(fast), trained.trajectory(slow)  # (H, L, B, T, D), (H, ...)
    slow_in_force = torch.cat([trained.initial(slow)[None], z_slow[:-1]])  # z_H during step h
    fast_entry = torch.cat([trained.initial(fast)[None], z_fast[:-1, -1]])  # z_L entering step h
    device = ids.device

    def inner_map(h: int) -> Any:
        held = slow_in_force[h].to(device)
        return lambda z: apply_stack(model, shape.fast, {fast: z, slow: held}, ctx)

    fixed_points, radii = [], []
    for h in range(h_count):
        step = inner_map(h)
        z = z_fast[h, -1].to(device)
        with torch.no_grad():
            for _ in range(fixed_point_iters):
                z = step(z)
        fixed_points.append(z[0].cpu().numpy().astype(np.float64))
        radii.append(spectral_radius(step, z, iters=stability_iters).radius)
    inner = level_steps(
        np.stack([_with_entry(fast_entry[h], z_fast[h]) for h in range(h_count)]),
        reference=np.stack(fixed_points),
    )

    def whole_step(x: Tensor) -> Tensor:
        out = apply_body(model, shape.outer, {slow: x[0], fast: x[1]}, ctx, counts)
        return torch.stack([out[slow], out[fast]])

    final = torch.stack([z_slow[-1], z_fast[-1, -1]]).to(device)
    outer_radius = spectral_radius(whole_step, final, iters=stability_iters).radius

    # 2. the outer loop extended: z_H across h, the slow stack's layers and attention.
    slow_tap = _LayerTap(slow, h_name, lambda site: True)
    longer = NestedStateRecorder()
    with torch.no_grad():
        model.run(
            ids,
            cycles={h_name: extend * h_count},
            token_type_ids=token_type_ids,
            probes=[longer, slow_tap],
        )
    slow_long = _with_entry(trained.initial(slow), longer.trajectory(slow))
    outer = level_steps(_with_entry(trained.initial(slow), z_slow), reference=slow_long[-1])

    # 3. the inner loop extended, in the last H step.
    last_h = h_count - 1
    fast_tap = _LayerTap(fast, l_name, lambda site: site.count(h_name) == last_h)
    deeper = NestedStateRecorder()
    with torch.no_grad():
        model.run(
            ids,
            cycles={l_name: extend * l_count},
            token_type_ids=token_type_ids,
            probes=[deeper, fast_tap],
        )
    deep_fast = deeper.trajectory(fast)[last_h]
    entry = trained.initial(fast) if last_h == 0 else deeper.trajectory(fast)[last_h - 1, -1]
    fast_long = _with_entry(entry, deep_fast)
    return TwoScaleResult(
        trained={h_name: h_count, l_name: l_count},
        inner=inner,
        outer=outer,
        inner_extended=_relative_steps(fast_long),
        outer_extended=_relative_steps(slow_long),
        inner_radius=np.asarray(radii, dtype=np.float64),
        outer_radius=float(outer_radius),
        stacks={
            fast: _stack_summary(fast_tap, fast_long[1:]),
            slow: _stack_summary(slow_tap, slow_long[1:]),
        },
    )


def _relative_steps(states: np.ndarray) -> np.ndarray:
    steps: LevelSteps = level_steps(states)
    return steps.relative


def measure_two_scale(
    model: TwoScaleModel,
    prompts: Sequence[Tensor],
    *,
    token_type_ids: Sequence[Tensor | None] | None = None,
    extend: int = 2,
    fixed_point_iters: int = 64,
    stability_iters: int = 20,
) -> TwoScaleResult:
    """Every two-scale measurement on each prompt (token ids (1, T)), pooled over prompts.
    ``extend`` is how many times the trained count each level is run for its extrapolation;
    ``fixed_point_iters`` extra inner iterations estimate each inner fixed point;
    ``stability_iters`` Jacobian-vector products bound each spectral radius estimate."""
    if extend < 2:
        raise LoopscopeError(
            f"extend must be at least 2 (run past the trained counts), got {extend}"
        )
    types = list(token_type_ids) if token_type_ids is not None else [None] * len(prompts)
    if len(types) != len(prompts):
        raise LoopscopeError("give one token_type_ids (or None) per prompt")
    results = []
    for ids, tt in zip(prompts, types):
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise LoopscopeError(
                f"each prompt must be token ids of shape (1, T), got {tuple(ids.shape)}"
            )
        results.append(_measure_prompt(model, ids, tt, extend, fixed_point_iters, stability_iters))
    return pool_two_scale(results)
