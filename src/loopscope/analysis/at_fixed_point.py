"""Measurements of a model at the fixed point of one prompt's run: the solved reference X*,
the spectral radii of the block map and of each block layer there, and the terms of the
attention-Lipschitz bound.

These need the model itself (they re-run layers or differentiate them), so they live apart
from the pure array analyses; the trace writer calls them once per prompt and stores what they
return. Each takes the :class:`~loopscope.engine.loop.RunSpec` of the run it measures, so it
retraces exactly the trajectory the trace recorded. ``ids`` is one prompt, shape (1, tokens).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import Tensor

from loopscope.core.errors import LoopscopeError
from loopscope.engine.contract import LoopedLM
from loopscope.engine.loop import RunSpec, block_step, prelude_output, run_probed


def _one_prompt(ids: Tensor) -> None:
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise LoopscopeError(
            f"measurements at the fixed point take one prompt, ids of shape (1, tokens); got "
            f"{tuple(ids.shape)}: call once per prompt"
        )


def solve_reference(
    model: LoopedLM,
    ids: Tensor,
    spec: RunSpec,
    *,
    tol: float,
    memory: int,
    beta: float,
    max_iter: int = 500,
) -> tuple[Tensor, dict[str, Any]]:
    """Per-layer fixed point (L, T, D) from the block map's fixed point z* = F(z*), found by
    Anderson acceleration (``memory`` past steps, relaxation ``beta``, relative residual
    ``tol``): one more recurrence from z* gives every layer's X*. Also returns how the solve
    went (applications of the block, residual, convergence flags)."""
    from loopscope.analysis.fixed_point import block_map, solve_fixed_point

    _one_prompt(ids)
    f, z0 = block_map(model, ids, init_state=spec.init_state, seed=spec.seed)
    result = solve_fixed_point(f, z0, tol=tol, max_iter=max_iter, memory=memory, beta=beta)
    layers = []
    with torch.no_grad():
        inputs, positions = prelude_output(model, ids)
        state = model.inject(result.state, inputs)
        for layer in model.block:
            state, _ = layer(state, positions)
            layers.append(state[0].float())
    info = {
        "method": result.method,
        "memory": memory,
        "beta": beta,
        "block_applications": result.iterations,
        "relative_residual": result.residual,
        "converged": result.converged,
        "drifting": result.drifting,
        "fell_back": result.fell_back,
    }
    return torch.stack(layers), info


def stability_at_fixed_point(
    model: LoopedLM, ids: Tensor, spec: RunSpec, *, iters: int
) -> dict[str, Any]:
    """Spectral radius of the whole block map and of each block layer's Jacobian at the
    approximate fixed point reached after ``spec.recurrences`` recurrences, each estimated
    with ``iters`` iterations (seeded from ``spec.seed``, so reruns agree)."""
    from loopscope.analysis.stability import spectral_radius

    _one_prompt(ids)
    with torch.no_grad():
        inputs, positions = prelude_output(model, ids)
    z_star = run_probed(model, ids, spec).state[0]
    x = inputs[0]

    def block_map(z: Tensor) -> Tensor:
        return block_step(model, z[None], x[None], positions)[0]

    whole = spectral_radius(block_map, z_star, iters=iters, seed=spec.seed)
    layer_inputs = [model.inject(z_star[None], x[None])]
    with torch.no_grad():
        for layer in list(model.block)[:-1]:
            layer_inputs.append(layer(layer_inputs[-1], positions)[0])
    per_layer = []
    for j, layer in enumerate(model.block):

        def layer_map(z: Tensor, layer: Any = layer) -> Tensor:
            return layer(z[None], positions)[0][0]

        est = spectral_radius(layer_map, layer_inputs[j][0], iters=iters, seed=spec.seed + j + 1)
        per_layer.append(asdict(est))
    return {"block": asdict(whole), "layers": per_layer}


def attention_bound_terms(
    model: LoopedLM,
    ids: Tensor,
    spec: RunSpec,
    block: np.ndarray,
    attn: np.ndarray,
    kept: list[int],
) -> list[dict[str, Any]] | None:
    """Per block layer, what the attention-Lipschitz bound ‖S(X_r) − S(X_{r−1})‖ ≤
    (B·κ/√d)·‖X_r − X_{r−1}‖ compares (the report's Proposition 4.2): the attention input's
    step norms ‖X_r − X_{r−1}‖_F, the attention maps' step norms (mean over heads), the input
    bound B (largest token norm of the attention input) and κ = max_h ‖W_Q^h W_Kᵀ^h‖₂.

    ``block`` is every layer's state at every recurrence (R, L, T, D) and ``attn`` the
    attention (len(kept), L, H, T, T) at recurrences ``kept``; only consecutive kept
    recurrences form a step. None when there is no step or the family hides its weights."""
    from loopscope.analysis.attention_dynamics import kappa_from_weights

    _one_prompt(ids)
    if block.ndim != 4:
        return None
    steps = [r for r in range(1, len(kept)) if kept[r] == kept[r - 1] + 1]
    if not steps or model.attention_weights(0) is None:
        return None
    with torch.no_grad():
        inputs, _ = prelude_output(model, ids)
        generator = torch.Generator(device=ids.device).manual_seed(spec.seed)
        mode = spec.init_state or model.meta.default_init_state
        init = model.initial_state(inputs, mode, generator, model.init_std)
    states = torch.from_numpy(block).to(inputs.device, inputs.dtype)
    terms = []
    for layer in range(model.meta.block_layers):
        weights = model.attention_weights(layer)
        assert weights is not None
        with torch.no_grad():
            x_in = [
                _layer_input(model, states, inputs[0], init[0], kept[r], layer)
                for r in range(len(kept))
            ]
            att_in = [weights.input_map(x[None])[0].float() for x in x_in]
        kappa = kappa_from_weights(
            weights.w_q.detach().float().cpu().numpy(),
            weights.w_k.detach().float().cpu().numpy(),
            weights.n_heads,
            weights.n_kv_heads,
        )
        terms.append(
            {
                "layer": layer,
                "recurrences": [kept[r] for r in steps],
                "input_steps": [float((att_in[r] - att_in[r - 1]).norm()) for r in steps],
                "attention_steps": [
                    float(
                        np.sqrt(
                            ((attn[r, layer] - attn[r - 1, layer]) ** 2).sum(axis=(-2, -1))
                        ).mean()
                    )
                    for r in steps
                ],
                "bound_B": float(max(float(a.norm(dim=-1).max()) for a in att_in)),
                "kappa": float(kappa.max()),
                "d_head": int(weights.w_q.shape[1] // weights.n_heads),
            }
        )
    return terms


def _layer_input(
    model: LoopedLM, states: Tensor, inputs: Tensor, init: Tensor, recurrence: int, layer: int
) -> Tensor:
    """The residual stream entering block ``layer`` at ``recurrence``, rebuilt from the
    captured states (layer 0 sees the injected state of the previous recurrence)."""
    if layer > 0:
        return states[recurrence, layer - 1]
    previous = (
        init if recurrence == 0 else model.recurrence_norm(states[recurrence - 1, -1][None])[0]
    )
    return model.inject(previous[None], inputs[None])[0]
