"""Greedy generation with the per-recurrence key/value cache against generation without it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import FIXTURES, HF_VOCAB, tiny_hf_model, tiny_inkling, tiny_trace_config
from hrm_checkpoints import save_reference
from tolerances import forward_depth, forward_tolerance, magnitude, widest_sum

import loopscope
from loopscope.core.errors import LoopscopeError
from loopscope.data import ByteTokenizer, format_prompt, load_gsm8k_jsonl
from loopscope.engine.contract import LoopedLM
from loopscope.engine.generation import (
    Generation,
    GenerationUnsupportedError,
    KVCacheUnsupportedError,
    generate_greedy,
    generate_greedy_batch,
    random_state_is_prefix_stable,
)
from loopscope.engine.loop import run_loop
from loopscope.families.hf_retrofit import RetrofitLM, feedforward_hf
from loopscope.families.hrm_text import load_hrm_text
from loopscope.families.inkling2 import Inkling2LoopLM
from loopscope.families.looplm import LoopLM
from loopscope.families.parcae import load_parcae
from loopscope.nn.kv_cache import KVCache
from loopscope.studies.demo import bundled_prompts_path


@pytest.fixture(scope="module")
def demo_model() -> LoopLM:
    model = loopscope.load("demo")
    assert isinstance(model, LoopLM)
    return model


def _prompts() -> list[list[int]]:
    """Bundled problems of different lengths and a one-token prompt (BOS alone)."""
    tokenizer = ByteTokenizer()
    problems = load_gsm8k_jsonl(bundled_prompts_path())
    texts = [format_prompt(problems[i].question) for i in (2, 4)]
    prompts = [tokenizer.encode(text, bos=True) for text in texts]
    prompts.append([tokenizer.bos_id])
    assert len({len(p) for p in prompts}) == len(prompts)
    return prompts


def _both(model: LoopedLM, prompt: list[int], **options: Any) -> tuple[Generation, Generation]:
    """The same greedy generation with the key/value cache and without it."""
    cached = generate_greedy(model, prompt, kv_cache=True, keep_logits=True, **options)
    full = generate_greedy(model, prompt, kv_cache=False, keep_logits=True, **options)
    return cached, full


def _assert_logits_agree(model: LoopedLM, cached: Generation, full: Generation, r: int) -> None:
    assert len(cached.step_logits) == len(full.step_logits)
    for step, (a, b) in enumerate(zip(cached.step_logits, full.step_logits)):
        # The cached step sums attention over the same keys in another kernel shape: the two
        # differ by rounding only, over the pass's depth.
        tol = forward_tolerance(
            torch.float32, magnitude(b), forward_depth(model.meta, r), widest_sum(model)
        )
        gap = float((a - b).abs().max())
        assert gap <= tol, f"step {step}: logits differ by {gap} > {tol}"


@pytest.mark.parametrize("recurrences", [1, 4, 9])
def test_cached_generation_gives_the_uncached_tokens(demo_model: LoopLM, recurrences: int) -> None:
    """Several recurrence counts, one past the training count (4), prompts of three lengths."""
    tokenizer = ByteTokenizer()
    for prompt in _prompts():
        cached, full = _both(
            demo_model, prompt, recurrences=recurrences, max_new_tokens=20, stop_id=tokenizer.eos_id
        )
        assert cached.tokens == full.tokens
        assert cached.stopped == full.stopped
        assert len(cached.tokens) >= 1
        _assert_logits_agree(demo_model, cached, full, recurrences)


def test_the_prefill_step_is_the_uncached_forward_bit_for_bit(demo_model: LoopLM) -> None:
    """An empty cache runs the same kernels as no cache: the first step's logits are equal."""
    prompt = _prompts()[0]
    cached, full = _both(demo_model, prompt, recurrences=6, max_new_tokens=1)
    assert torch.equal(cached.step_logits[0], full.step_logits[0])


@pytest.mark.parametrize(
    ("init_state", "injection", "scheme"),
    [("random", "concat-linear", "huginn"), ("prelude", "gated", "ouro"), ("zeros", "add", "pre")],
)
def test_cached_generation_matches_on_other_architectures(
    init_state: str, injection: str, scheme: str
) -> None:
    """Random weights, every initial state (a seeded random one included), to the end of the
    context (24 tokens): the cache stops exactly where the full forward does."""
    model = LoopLM(
        tiny_trace_config(injection=injection, norm_scheme=scheme, init_state=init_state)
    ).eval()
    for length in (1, 5, 11):
        prompt = list(range(40, 40 + length))
        cached, full = _both(model, prompt, recurrences=5, max_new_tokens=64, seed=3)
        assert cached.tokens == full.tokens
        assert len(cached.tokens) == model.meta.context_length - length
        _assert_logits_agree(model, cached, full, 5)


def test_a_cache_serves_one_recurrence_count_only(tiny_trace_model: LoopLM) -> None:
    cache = KVCache()
    ids = torch.tensor([[5, 6, 7]])
    run_loop(tiny_trace_model, ids, recurrences=3, kv_cache=cache)
    assert cache.tokens == 3
    with pytest.raises(LoopscopeError, match="filled with 3 recurrences"):
        run_loop(tiny_trace_model, ids[:, :1], recurrences=4, kv_cache=cache)


def test_a_cache_refuses_attention_maps(tiny_trace_model: LoopLM) -> None:
    with pytest.raises(LoopscopeError, match="plain decoding only"):
        run_loop(tiny_trace_model, torch.tensor([[5, 6]]), return_attn=True, kv_cache=KVCache())


def test_the_cache_counts_against_the_context(tiny_trace_model: LoopLM) -> None:
    cache = KVCache()
    run_loop(tiny_trace_model, torch.zeros(1, 24, dtype=torch.long), kv_cache=cache)
    with pytest.raises(LoopscopeError, match="context of 24"):
        run_loop(tiny_trace_model, torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)


def test_a_family_without_a_cache_is_refused_and_generates_without_one() -> None:
    """A Hugging Face decoder on an attention path whose masks loopscope does not build for
    new tokens (flex attention) refuses the cache, naming the way out, and still generates."""
    model = RetrofitLM(tiny_hf_model("llama"), attn_implementation="flex_attention")
    with pytest.raises(KVCacheUnsupportedError, match="retrofit-llama.*--no-kv-cache"):
        generate_greedy(model, [1, 2, 3], max_new_tokens=2)
    with pytest.raises(LoopscopeError, match="retrofit-llama.*no key/value cache"):
        run_loop(model, torch.tensor([[1, 2, 3]]), kv_cache=KVCache())
    out = generate_greedy(model, [1, 2, 3], max_new_tokens=2, kv_cache=False)
    with torch.no_grad():
        logits = run_loop(model, torch.tensor([[1, 2, 3]])).logits
    assert out.tokens[0] == int(logits[0, -1].argmax())


@pytest.mark.parametrize(
    ("checkpoint", "init_state"),
    [
        (FIXTURES / "ouro" / "checkpoint", None),
        (FIXTURES / "raven" / "huginn" / "checkpoint", "zeros"),
        (FIXTURES / "raven" / "retro_llama" / "checkpoint", "zeros"),
        (FIXTURES / "raven" / "retro_olmo" / "checkpoint", "prelude"),
    ],
    ids=["ouro", "huginn", "retro-llama", "retro-olmo"],
)
def test_published_families_generate_the_same_with_their_cache(
    checkpoint: Path, init_state: str | None
) -> None:
    """Ouro and the raven layouts (Huginn's sandwich, the llama and OLMo-2 retrofits), past
    their training depth, on their reference checkpoints; the raven ones from a fixed initial
    state, since their random one is refused with a cache (next test)."""
    model = loopscope.load(checkpoint)
    r = model.meta.train_recurrences + 2
    for prompt in ([3], [5, 9, 2, 7, 11]):
        cached, full = _both(
            model,
            prompt,
            recurrences=r,
            max_new_tokens=8,
            init_state=init_state,
        )
        assert cached.tokens == full.tokens and len(cached.tokens) == 8
        _assert_logits_agree(model, cached, full, r)


def test_a_random_state_that_is_redrawn_per_length_refuses_the_cache() -> None:
    """Huginn draws its random state for the whole sequence, so a token's state changes as the
    text grows: a cache could not give the full forward's tokens, so it is refused."""
    model = loopscope.load(FIXTURES / "raven" / "huginn" / "checkpoint")
    assert model.meta.default_init_state == "random"
    assert not random_state_is_prefix_stable(model, 2, 6, 0, torch.device("cpu"))
    with pytest.raises(KVCacheUnsupportedError, match="whole\nsequence|--no-kv-cache"):
        generate_greedy(model, [5, 9], max_new_tokens=4)
    assert len(generate_greedy(model, [5, 9], max_new_tokens=4, kv_cache=False).tokens) == 4
    assert random_state_is_prefix_stable(LoopLM(tiny_trace_config()), 2, 24, 0, torch.device("cpu"))


def test_a_cache_extended_by_several_tokens_at_once_matches_the_full_forward(
    tiny_trace_model: LoopLM,
) -> None:
    """Chunked prefill: the new tokens see the cached ones and each other causally."""
    ids = torch.tensor([[7, 3, 9, 12, 40, 41, 5, 6, 60]])
    full = run_loop(tiny_trace_model, ids, recurrences=4).logits
    cache = KVCache()
    first = run_loop(tiny_trace_model, ids[:, :4], recurrences=4, kv_cache=cache).logits
    second = run_loop(tiny_trace_model, ids[:, 4:7], recurrences=4, kv_cache=cache).logits
    third = run_loop(tiny_trace_model, ids[:, 7:], recurrences=4, kv_cache=cache).logits
    assert cache.tokens == 9
    chunked = torch.cat([first, second, third], dim=1)
    tol = forward_tolerance(
        torch.float32,
        magnitude(full),
        forward_depth(tiny_trace_model.meta, 4),
        widest_sum(tiny_trace_model),
    )
    assert float((chunked - full).detach().abs().max()) <= tol
    assert torch.equal(first, run_loop(tiny_trace_model, ids[:, :4], recurrences=4).logits)


@pytest.mark.parametrize(
    ("checkpoint", "init_state"),
    [
        ("demo", None),
        (FIXTURES / "ouro" / "checkpoint", None),
        (FIXTURES / "raven" / "retro_olmo" / "checkpoint", "zeros"),
    ],
    ids=["looplm", "ouro", "retro-olmo"],
)
def test_a_padded_batch_generates_what_each_prompt_generates_alone(
    checkpoint: str | Path, init_state: str | None
) -> None:
    """Prompts of different lengths decoded together, each at its own position and blind to
    its padding: the tokens of one-at-a-time generation without the cache, past the training
    depth (rotate-half and adjacent-pair rotary, grouped-query attention)."""
    model = loopscope.load(checkpoint)
    r = model.meta.train_recurrences + 3
    if checkpoint == "demo":
        prompts, stop = _prompts(), ByteTokenizer().eos_id
    else:
        prompts, stop = [[3], [5, 9, 2, 7, 11], [8, 1]], None
    options: dict[str, Any] = {"recurrences": r, "max_new_tokens": 12, "stop_id": stop}
    options["init_state"] = init_state
    batch = generate_greedy_batch(model, prompts, **options)
    alone = [generate_greedy(model, p, kv_cache=False, **options) for p in prompts]
    assert [g.tokens for g in batch] == [g.tokens for g in alone]
    assert [g.stopped for g in batch] == [g.stopped for g in alone]
    assert all(g.tokens for g in batch)


# ------------------------------------------------------------- the other families' caches
#: Prompts of three lengths for the tiny Hugging Face decoders and Parcae (vocab ≥ 100).
FAMILY_PROMPTS = ([3], [5, 9, 2, 7, 11, 4, 6, 8], [8, 1])


def _assert_cache_matches(
    model: LoopedLM, recurrences: tuple[int, ...], logits: bool = True, **options: Any
) -> None:
    """For every recurrence count: each prompt alone gives the uncached tokens (and, with
    ``logits``, logits equal up to rounding), the prefill is the uncached forward bit for bit,
    and the prompts decoded as one padded batch give each prompt's uncached tokens."""
    for r in recurrences:
        alone = []
        for prompt in FAMILY_PROMPTS:
            cached, full = _both(model, prompt, recurrences=r, max_new_tokens=10, **options)
            assert cached.tokens == full.tokens and len(cached.tokens) == 10, (r, prompt)
            assert torch.equal(cached.step_logits[0], full.step_logits[0])
            if logits:
                _assert_logits_agree(model, cached, full, r)
            alone.append(full.tokens)
        batch = generate_greedy_batch(
            model, FAMILY_PROMPTS, recurrences=r, max_new_tokens=10, **options
        )
        assert [g.tokens for g in batch] == alone, r


def test_parcae_generates_the_same_with_its_cache() -> None:
    """Parcae's reference checkpoint (value embeddings, q/k norms after adjacent-pair rotary,
    grouped-query prelude and coda), below and past its training depth (8), from zeros and
    from the prelude output."""
    model = load_parcae(FIXTURES / "parcae" / "checkpoint")
    assert model.supports_kv_cache
    assert any(getattr(call, "ve_key", None) is not None for call in model.block)
    for init_state in ("zeros", "prelude"):
        _assert_cache_matches(model, (1, 3, 10), init_state=init_state)


def test_parcae_refuses_the_cache_from_its_length_dependent_random_state() -> None:
    """Parcae's truncated-normal draw depends on the sequence length, so its default random
    state cannot be cached (the refusal names the way out), and generates without it."""
    model = load_parcae(FIXTURES / "parcae" / "checkpoint")
    assert model.meta.default_init_state == "random"
    with pytest.raises(KVCacheUnsupportedError, match="--no-kv-cache"):
        generate_greedy(model, [5, 9], max_new_tokens=2)
    assert len(generate_greedy(model, [5, 9], max_new_tokens=2, kv_cache=False).tokens) == 2


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "olmo2", "gpt2"])
def test_hf_feedforward_and_retrofit_generate_the_same_with_their_cache(model_type: str) -> None:
    """transformers' own decoders, unlooped and with their middle layers looped (prelude and
    coda around the block), SDPA and eager: rotate-half rotary, grouped-query attention and
    GPT-2's learned positions, which a cached token looks up at its own position."""
    hf = tiny_hf_model(model_type)
    for attention in ("sdpa", "eager"):
        feedforward = feedforward_hf(hf, attn_implementation=attention)
        looped = RetrofitLM(
            hf, loop=(1, 3), recurrences=2, injection="add", attn_implementation=attention
        )
        assert feedforward.supports_kv_cache and looped.supports_kv_cache
        _assert_cache_matches(feedforward, (1, 3))
        _assert_cache_matches(looped, (1, 2, 5))


def _tiny_mistral(window: int) -> Any:
    import transformers

    config = transformers.MistralConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=HF_VOCAB,
        max_position_embeddings=64,
        sliding_window=window,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=generator) * 0.15)
    return model.eval()


def test_a_sliding_window_decoder_generates_the_same_with_its_cache() -> None:
    """Mistral with a window of three tokens: a cached token sees only the keys of its window
    (counted in positions, so a padded row's window skips its padding)."""
    hf = _tiny_mistral(3)
    for attention in ("sdpa", "eager"):
        model = RetrofitLM(
            hf, loop=(1, 3), recurrences=2, injection="add", attn_implementation=attention
        )
        assert {getattr(layer, "kind", None) for layer in model.block} == {"sliding_attention"}
        _assert_cache_matches(model, (1, 4))


def test_inkling2_loop_generates_the_same_with_its_cache() -> None:
    """Inkling-2's loop (attention sinks, relative position biases, short convolutions whose
    past inputs the cache keeps, messages between passes), sliding and full attention layers,
    a window of four shorter than the text: at several pass counts, alone and batched.

    Tokens and the prefill only: its recurrent messages amplify rounding differences pass
    after pass beyond a rounding bound on the logits."""
    model = Inkling2LoopLM(tiny_inkling())
    assert model.supports_kv_cache
    _assert_cache_matches(model, (1, 3, 5), logits=False)


def test_a_nested_loop_model_is_refused_with_or_without_the_cache(tmp_path: Path) -> None:
    """HRM-Text runs two nested loops, which the single-loop generation cannot drive: both
    ways are refused up front, pointing to its own analysis, rather than failing inside."""
    save_reference(tmp_path, seed=0)
    model = load_hrm_text(tmp_path)
    for kv_cache in (True, False):
        with pytest.raises(GenerationUnsupportedError, match="nested loops.*loopscope analyze"):
            generate_greedy(model, [1, 2, 3], max_new_tokens=2, kv_cache=kv_cache)
        with pytest.raises(GenerationUnsupportedError, match="nested loops"):
            generate_greedy_batch(model, [[1, 2], [3]], max_new_tokens=2, kv_cache=kv_cache)
