"""Greedy generation at a chosen recurrence count, with or without a per-recurrence KV cache.

Without a cache every new token is one full forward over the prompt and what has been generated
so far (quadratic in the length, but it works for every family: it is just the engine's
forward). With a cache (:class:`loopscope.nn.kv_cache.KVCache`, one slot per prelude layer,
per block layer *and recurrence*, and per coda layer) the prompt runs once and each new token
then runs through the depth alone, attending to the cached keys and values of the earlier
tokens at the same layer application. Both give the same tokens. Every family that generates
takes a cache slot in its layers (``supports_kv_cache``): LoopLM, Ouro, raven, Parcae, the
Hugging Face retrofits and feedforward decoders and Inkling-2's loop, the last two on the SDPA
and eager attention paths (another path refuses the cache, naming ``--no-kv-cache``). A random
initial state drawn for the whole sequence at once (Huginn's, Parcae's) is refused too, since a
cached token would keep a draw that the full forward redraws as the text grows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from loopscope.core.errors import LoopscopeError
from loopscope.engine.contract import InitState, LoopedLM
from loopscope.engine.loop import run_loop
from loopscope.nn.kv_cache import KVCache, RowLayout

__all__ = [
    "Generation",
    "GenerationUnsupportedError",
    "KVCacheUnsupportedError",
    "generate_greedy",
    "generate_greedy_batch",
    "supports_kv_cache",
]


class KVCacheUnsupportedError(LoopscopeError):
    """A generation the key/value cache cannot serve: an attention path without one, or a
    random initial state that is redrawn as the text grows."""


class GenerationUnsupportedError(LoopscopeError):
    """A model this single-loop generation cannot drive at all (nested loops)."""


@dataclass(frozen=True)
class Generation:
    """Greedy continuation of one prompt: the new ``tokens`` (the stop token excluded) and,
    when kept, the last-position logits (vocab,) of every step, float32 on the CPU."""

    tokens: list[int]
    stopped: bool
    step_logits: list[Tensor] = field(default_factory=list)


def supports_kv_cache(model: LoopedLM) -> bool:
    """Whether ``model``'s layers take a key/value cache slot."""
    return bool(getattr(model, "supports_kv_cache", False))


#: The lengths over which :func:`check_kv_cache` tries a random initial state up front (each
#: generation then checks its own lengths exactly).
PREFIX_CHECK_LENGTH = 8


def check_kv_cache(model: LoopedLM, init_state: InitState | None = None, seed: int = 0) -> None:
    """Refuse a cached generation on a family without a cache, or from a random initial state
    that is redrawn as the text grows, naming the way out."""
    _check_supported(model)
    if (init_state or model.meta.default_init_state) != "random":
        return
    device = next(model.parameters()).device
    last = min(PREFIX_CHECK_LENGTH, model.meta.context_length)
    if not random_state_is_prefix_stable(model, 1, last, seed, device):
        raise _redrawn_state_refusal(model)


def check_generates(model: LoopedLM) -> None:
    """Refuse a model with nested loops (HRM-Text): generation drives the single-loop engine,
    which cannot run it, with or without a cache."""
    if getattr(model, "loop_tree", None) is not None:
        raise GenerationUnsupportedError(
            f"{model.meta.name or model.meta.family} ({model.meta.family}) runs nested loops, "
            "which greedy generation (and so `loopscope evaluate`, with or without "
            "--no-kv-cache) cannot drive; analyse it with `loopscope analyze` (its two-scale "
            "study) instead"
        )


def _check_supported(model: LoopedLM) -> None:
    check_generates(model)
    if not supports_kv_cache(model):
        raise KVCacheUnsupportedError(
            f"the {model.meta.family} family ({model.meta.name or model.meta.family}) has no "
            "key/value cache on this path; generate without one (kv_cache=False, or "
            "--no-kv-cache on the command line), which runs a full forward per new token"
        )


def _redrawn_state_refusal(model: LoopedLM) -> KVCacheUnsupportedError:
    return KVCacheUnsupportedError(
        f"the {model.meta.family} family draws its random initial state for the whole "
        "sequence at once, so each token's draw changes as the text grows and a key/value "
        "cache cannot give the tokens of a full forward; generate without the cache "
        "(kv_cache=False, or --no-kv-cache), or from another initial state"
    )


def random_state_is_prefix_stable(
    model: LoopedLM, first: int, last: int, seed: int, device: torch.device
) -> bool:
    """Whether the seeded random initial state of every length from ``first`` to ``last``
    is the first rows of the longest one. A cache keeps each token's state from the step it
    arrived, a full forward redraws every token's state each step, so the two agree only when
    the draw is stable under extension (Huginn's is not: it draws for the whole sequence at
    once, so every position's draw depends on the length)."""

    def draw(length: int) -> Tensor:
        like = torch.empty(1, length, model.meta.d_model, device=device)
        generator = torch.Generator(device=device).manual_seed(seed)
        return model.initial_state(like, "random", generator, model.init_std)

    whole = draw(last)
    return all(torch.equal(draw(n), whole[:, :n]) for n in range(first, last))


@torch.no_grad()
def generate_greedy(
    model: LoopedLM,
    prompt: Sequence[int],
    *,
    recurrences: int | None = None,
    max_new_tokens: int = 96,
    stop_id: int | None = None,
    kv_cache: bool = True,
    init_state: InitState | None = None,
    seed: int = 0,
    keep_logits: bool = False,
) -> Generation:
    """Greedily continue ``prompt`` (token ids) for at most ``max_new_tokens`` tokens, stopping
    at ``stop_id`` or at the model's context length, running ``recurrences`` recurrences
    (default: the training count) for every token.

    ``kv_cache=True`` decodes incrementally (see the module docstring); False runs a full
    forward per token, which every family can do. ``keep_logits`` keeps each step's logits, so
    the two can be compared."""
    if not prompt:
        raise LoopscopeError("the prompt is empty: give at least one token (e.g. BOS)")
    check_generates(model)
    if kv_cache:  # the random state is checked below, over this generation's own lengths
        _check_supported(model)
    device = next(model.parameters()).device
    context = model.meta.context_length
    longest = min(context, len(prompt) + max_new_tokens)
    mode = init_state or model.meta.default_init_state
    if (
        kv_cache
        and mode == "random"
        and not random_state_is_prefix_stable(model, len(prompt), longest, seed, device)
    ):
        raise _redrawn_state_refusal(model)
    ids = list(prompt)
    cache = KVCache() if kv_cache else None
    pending = torch.tensor([ids], dtype=torch.long, device=device)
    tokens: list[int] = []
    kept: list[Tensor] = []
    stopped = False
    while len(tokens) < max_new_tokens and len(ids) < context:
        run_ids = pending if cache is not None else torch.tensor([ids], device=device)
        out = run_loop(
            model,
            run_ids,
            recurrences=recurrences,
            init_state=init_state,
            seed=seed,
            kv_cache=cache,
        )
        last = out.logits[0, -1]
        if keep_logits:
            kept.append(last.float().cpu())
        token = int(last.argmax())
        if token == stop_id:
            stopped = True
            break
        tokens.append(token)
        ids.append(token)
        pending = torch.tensor([[token]], dtype=torch.long, device=device)
    return Generation(tokens=tokens, stopped=stopped, step_logits=kept)


@torch.no_grad()
def generate_greedy_batch(
    model: LoopedLM,
    prompts: Sequence[Sequence[int]],
    *,
    recurrences: int | None = None,
    max_new_tokens: int = 96,
    stop_id: int | None = None,
    kv_cache: bool = True,
    init_state: InitState | None = None,
    seed: int = 0,
    pad_id: int = 0,
) -> list[Generation]:
    """:func:`generate_greedy` of several prompts at once, the same tokens for each.

    With the cache the prompts are right-padded into one prefill, then every row decodes its
    next token in the same pass, at its own position, never attending to its padding
    (:class:`loopscope.nn.kv_cache.RowLayout`). Prompts run one at a time instead without the
    cache, from a random initial state (drawn per prompt), or when the longest prompt plus
    ``max_new_tokens`` would not fit the context (rows would then stop at different steps)."""
    mode = init_state or model.meta.default_init_state
    longest = max((len(p) for p in prompts), default=0)
    one_by_one = (
        not kv_cache
        or mode == "random"
        or len(prompts) < 2
        or longest + max_new_tokens > model.meta.context_length
    )
    if one_by_one:
        return [
            generate_greedy(
                model,
                p,
                recurrences=recurrences,
                max_new_tokens=max_new_tokens,
                stop_id=stop_id,
                kv_cache=kv_cache,
                init_state=init_state,
                seed=seed,
            )
            for p in prompts
        ]
    _check_supported(model)
    if min(len(p) for p in prompts) == 0:
        raise LoopscopeError("a prompt is empty: give at least one token (e.g. BOS)")
    device = next(model.parameters()).device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        ids[row, : len(p)] = torch.tensor(list(p), device=device)
    cache = KVCache()
    out = run_loop(model, ids, recurrences=recurrences, init_state=init_state, kv_cache=cache)
    last = out.logits[torch.arange(len(prompts), device=device), lengths - 1]
    visible = torch.arange(longest, device=device)[None, :] < lengths[:, None]
    cache.rows = RowLayout(visible, lengths.clone())
    tokens: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    for step in range(max_new_tokens):
        chosen = last.argmax(dim=-1)
        for row, token in enumerate(chosen.tolist()):
            if stopped[row]:
                continue
            if token == stop_id:
                stopped[row] = True
            else:
                tokens[row].append(token)
        if all(stopped) or step == max_new_tokens - 1:
            break
        out = run_loop(
            model, chosen[:, None], recurrences=recurrences, init_state=init_state, kv_cache=cache
        )
        cache.rows = cache.rows.advanced()
        last = out.logits[:, -1]
    return [Generation(tokens=t, stopped=s) for t, s in zip(tokens, stopped)]


def generate_at_recurrences(
    model: LoopedLM,
    prompts: Sequence[Sequence[int]],
    recurrences: Sequence[int],
    *,
    batch_size: int,
    desc: str,
    progress: bool = False,
    **options: Any,
) -> Iterator[tuple[int, int, Generation]]:
    """Every prompt answered at every recurrence count, ``batch_size`` prompts per
    :func:`generate_greedy_batch` call (``options`` passed on), with one progress bar over the
    batches: yields (recurrences, prompt index, generation) in that order, so each caller only
    reads its own answers."""
    from tqdm.auto import tqdm

    step = max(1, batch_size)
    jobs = [(r, first) for r in recurrences for first in range(0, len(prompts), step)]
    for r, first in tqdm(jobs, desc=desc, disable=not progress):
        outs = generate_greedy_batch(model, prompts[first : first + step], recurrences=r, **options)
        for index, out in enumerate(outs, first):
            yield r, index, out
