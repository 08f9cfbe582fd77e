"""The one engine that drives recurrences for every model family.

It runs embed → prelude → initial state → R × {inject, block layers, recurrence norm} → coda →
head, and hands the residual stream after every layer (and, on request, its attention
probabilities) to probes. Training uses the same loop with truncated backpropagation and,
optionally, logits after every recurrence (Ouro-style loss).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from loopscope.core.errors import LoopscopeError
from loopscope.engine.sites import Probe, Site
from loopscope.nn.kv_cache import KVCache
from loopscope.nn.layers import Edit

if TYPE_CHECKING:
    from loopscope.engine.contract import InitState, LoopedLM

#: Chooses the edit (intervention) for a site, or None to leave it alone.
EditPlan = Callable[[Site], "Edit | None"]


@dataclass
class LoopOutput:
    """Result of a forward pass: ``logits`` (batch, T, vocab) and the final block ``state``.

    ``recurrence_logits`` holds the logits read out after every recurrence when asked for
    (``exit_every_recurrence=True``)."""

    logits: Tensor
    state: Tensor
    recurrences: int
    recurrence_logits: list[Tensor] = field(default_factory=list)


class InitStateError(LoopscopeError):
    """An initial state the family cannot start from."""


class ContextLengthError(LoopscopeError):
    """A prompt is longer than the model's context."""


def _check_inputs(model: LoopedLM, input_ids: Tensor, recurrences: int, cached: int = 0) -> None:
    if input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must have shape (batch, tokens), got {tuple(input_ids.shape)}; "
            "add a batch dimension with input_ids[None]"
        )
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: give at least one token")
    length = input_ids.shape[1] + cached
    if length > model.meta.context_length:
        raise ContextLengthError(
            f"prompt has {length} tokens but {model.meta.name or model.meta.family} has a "
            f"context of {model.meta.context_length}; shorten the prompt or pass "
            f"max_tokens={model.meta.context_length} to truncate"
        )
    if recurrences < 1:
        raise ValueError(f"recurrences must be ≥ 1, got {recurrences}")


def _run_layers(
    layers: Sequence[Any],
    hidden: Tensor,
    positions: Any,
    sites: Sequence[Site],
    probes: Sequence[Probe],
    want_attn: bool,
    edit_plan: EditPlan | None,
    kv_cache: KVCache | None = None,
) -> Tensor:
    for layer, site in zip(layers, sites):
        edit = edit_plan(site) if edit_plan is not None else None
        if kv_cache is None:
            hidden, attn = layer(hidden, positions, return_attn=want_attn, edit=edit)
        else:  # only families that declare supports_kv_cache take the keyword
            hidden, attn = layer(
                hidden, positions, return_attn=want_attn, edit=edit, kv=kv_cache.slot(site)
            )
        for probe in probes:
            probe.observe(site, hidden, attn if probe.wants_attention else None)
    return hidden


def _check_init_state(model: LoopedLM, mode: str, allow_any: bool) -> None:
    supported = model.supported_init_states
    if mode in supported or allow_any:
        return
    raise InitStateError(
        f"{model.meta.name or model.meta.family} does not support init_state={mode!r}; "
        f"choose one of {', '.join(supported)}, or pass allow_any_init_state=True to run "
        "it anyway as an experiment"
    )


def stage_sites(
    model: LoopedLM, recurrences: int
) -> tuple[list[Site], list[list[Site]], list[Site]]:
    """Every site of a run in realised-depth order: prelude, block per recurrence, coda."""
    meta = model.meta
    p, k, c = meta.prelude_layers, meta.block_layers, meta.coda_layers
    prelude = [Site("prelude", i, 0, i) for i in range(p)]
    block = [[Site("block", j, r, p + r * k + j) for j in range(k)] for r in range(recurrences)]
    coda = [Site("coda", i, 0, p + recurrences * k + i) for i in range(c)]
    return prelude, block, coda


def run_loop(
    model: LoopedLM,
    input_ids: Tensor,
    *,
    recurrences: int | None = None,
    init_state: InitState | None = None,
    seed: int = 0,
    probes: Sequence[Probe] = (),
    return_attn: bool | None = None,
    edit_plan: EditPlan | None = None,
    grad_depth: int | None = None,
    exit_every_recurrence: bool = False,
    allow_any_init_state: bool = False,
    lengths: Sequence[int] | None = None,
    kv_cache: KVCache | None = None,
) -> LoopOutput:
    """Run ``model`` for ``recurrences`` passes of its block (default: its training count).

    An ``init_state`` outside the family's ``supported_init_states`` is refused unless
    ``allow_any_init_state=True``: a family without injection (Ouro) only makes sense from the
    embeddings, and starting elsewhere silently gives different logits.

    ``grad_depth`` truncates backpropagation to the last that many recurrences (Huginn's
    training); ``exit_every_recurrence`` also reads logits out after every recurrence.
    ``lengths`` gives each row's real token count in a right-padded batch (see
    :func:`padded_initial_state`). ``kv_cache``: decode incrementally, ``input_ids`` being the
    tokens that follow the ones already in the cache (see :mod:`loopscope.engine.generation`).
    """
    meta = model.meta
    n_rec = meta.train_recurrences if recurrences is None else int(recurrences)
    cached = 0 if kv_cache is None else kv_cache.tokens
    _check_inputs(model, input_ids, n_rec, cached)
    mode = init_state or meta.default_init_state
    _check_init_state(model, mode, allow_any_init_state)
    want_attn = any(p.wants_attention for p in probes) if return_attn is None else return_attn
    if kv_cache is not None:
        _check_cacheable(model, kv_cache, n_rec, want_attn or exit_every_recurrence, lengths)
    positions = model.positions(cached + input_ids.shape[1], input_ids.device)
    prelude_sites, block_sites, coda_sites = stage_sites(model, n_rec)

    if kv_cache is None:
        hidden = model.embed(input_ids)
    else:  # the new tokens only, at the positions that follow the cached ones
        hidden = model.embed_at(
            input_ids, kv_cache.token_positions(input_ids.shape[1], input_ids.device)
        )
    inputs = _run_layers(
        model.prelude, hidden, positions, prelude_sites, probes, want_attn, edit_plan, kv_cache
    )
    generator = None
    if mode == "random":
        generator = torch.Generator(device=inputs.device).manual_seed(seed)
    if lengths is not None and mode == "random":
        state = padded_initial_state(model, inputs, mode, seed, lengths)
    elif kv_cache is not None and mode == "random":  # the new positions of the whole draw
        whole = inputs.new_empty(inputs.shape[0], cached + inputs.shape[1], inputs.shape[2])
        state = model.initial_state(whole, mode, generator, model.init_std)[:, cached:]
    else:
        state = model.initial_state(inputs, mode, generator, model.init_std)

    first_grad = 0 if grad_depth is None else max(0, n_rec - grad_depth)
    recurrence_logits: list[Tensor] = []
    for r in range(n_rec):
        no_grad = r < first_grad and torch.is_grad_enabled()
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            state = model.inject(state, inputs)
            state = _run_layers(
                model.block,
                state,
                positions,
                block_sites[r],
                probes,
                want_attn,
                edit_plan,
                kv_cache,
            )
            state = model.recurrence_norm(state)
        if no_grad:
            state = state.detach()
        if exit_every_recurrence and r < n_rec - 1:
            recurrence_logits.append(
                model.head(
                    _run_layers(model.coda, state, positions, coda_sites, (), False, edit_plan)
                )
            )

    out = _run_layers(
        model.coda, state, positions, coda_sites, probes, want_attn, edit_plan, kv_cache
    )
    logits = model.head(out)
    if kv_cache is not None:
        kv_cache.tokens = cached + input_ids.shape[1]
    if exit_every_recurrence:
        recurrence_logits.append(logits)
    return LoopOutput(
        logits=logits, state=state, recurrences=n_rec, recurrence_logits=recurrence_logits
    )


def _check_cacheable(
    model: LoopedLM,
    kv_cache: KVCache,
    recurrences: int,
    extra_outputs: bool,
    lengths: Sequence[int] | None,
) -> None:
    """Refuse a key/value cache where it cannot give the uncached result."""
    name = model.meta.name or model.meta.family
    if not getattr(model, "supports_kv_cache", False):
        raise LoopscopeError(
            f"the {model.meta.family} family ({name}) has no key/value cache; generate "
            "without one (kv_cache=None, or --no-kv-cache on the command line)"
        )
    if kv_cache.recurrences is None:
        kv_cache.recurrences = recurrences
    if kv_cache.recurrences != recurrences:
        raise LoopscopeError(
            f"this key/value cache was filled with {kv_cache.recurrences} recurrences, not "
            f"{recurrences}: start a new cache for another recurrence count"
        )
    if extra_outputs or lengths is not None:
        raise LoopscopeError(
            "a key/value cache serves plain decoding only: drop attention maps, per-recurrence "
            "exits and padded batches (lengths) when passing kv_cache"
        )


def padded_initial_state(
    model: LoopedLM, inputs: Tensor, mode: InitState, seed: int, lengths: Sequence[int]
) -> Tensor:
    """Z0 of a right-padded batch, each row drawn as if its prompt ran alone.

    Why: a seeded random state drawn with the batch's shape (B, T_max, D) is not the
    (1, T_i, D) draw the prompt gets alone (the generator's stream is laid out over the whole
    shape), so each row restarts the generator from ``seed``, draws for its real length and
    is padded with zeros (pad positions never reach a real token: every family is causal)."""
    if len(lengths) != inputs.shape[0] or not all(1 <= n <= inputs.shape[1] for n in lengths):
        raise ValueError(
            f"lengths {list(lengths)} do not fit a batch of {inputs.shape[0]} rows of "
            f"{inputs.shape[1]} tokens: give each row's real token count, 1..{inputs.shape[1]}"
        )
    rows = []
    for row, length in enumerate(lengths):
        generator = torch.Generator(device=inputs.device).manual_seed(seed)
        drawn = model.initial_state(inputs[row : row + 1, :length], mode, generator, model.init_std)
        rows.append(torch.nn.functional.pad(drawn, (0, 0, 0, inputs.shape[1] - length)))
    return torch.cat(rows)


@dataclass(frozen=True)
class RunSpec:
    """What fixes a run's trajectory: the recurrence count, the initial state (None: the
    family's default) and the seed of a random initial state. Every pass that must retrace the
    same run (a second pass against the fixed point, a stability check) shares one spec."""

    recurrences: int
    init_state: InitState | None = None
    seed: int = 0


def run_probed(
    model: LoopedLM,
    input_ids: Tensor,
    spec: RunSpec,
    probes: Sequence[Probe] = (),
    *,
    attention: bool | None = None,
    edit_plan: EditPlan | None = None,
    lengths: Sequence[int] | None = None,
) -> LoopOutput:
    """One gradient-free forward pass of ``spec`` feeding ``probes``: the engine call every
    measurement pass makes. ``attention`` forces attention probabilities on or off (None: when
    a probe wants them); eager attention is not bit-identical to the fused kernel, so passes
    that must agree with each other pass the same value. ``lengths``: each row's real token
    count when ``input_ids`` is a right-padded batch of prompts."""
    with torch.no_grad():
        out: LoopOutput = model(
            input_ids,
            recurrences=spec.recurrences,
            init_state=spec.init_state,
            seed=spec.seed,
            probes=probes,
            return_attn=attention,
            edit_plan=edit_plan,
            lengths=lengths,
        )
    return out


def block_step(model: LoopedLM, state: Tensor, inputs: Tensor, positions: Any) -> Tensor:
    """One recurrence as a map Z ↦ F(Z; X): the function whose fixed points and Jacobian the
    dynamics analyses study."""
    state = model.inject(state, inputs)
    for layer in model.block:
        state, _ = layer(state, positions)
    return model.recurrence_norm(state)


def prelude_output(model: LoopedLM, input_ids: Tensor) -> tuple[Tensor, Any]:
    """The injected input X (prelude output) and the position tables for a prompt."""
    positions = model.positions(input_ids.shape[1], input_ids.device)
    hidden = model.embed(input_ids)
    for layer in model.prelude:
        hidden, _ = layer(hidden, positions)
    return hidden, positions
