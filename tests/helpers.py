"""Helpers the test files share: where things live in the repository, a tiny looped model
configuration, seeded prompt sets and edited copies of the reference checkpoints.

Plain functions live here (importable from any test folder, since pytest puts ``tests/`` on the
path); pytest fixtures built on them live in ``conftest.py``."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from loopscope.families.looplm import LoopConfig
from loopscope.trace.settings import PromptInput

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCE_PACKAGE = REPO_ROOT / "src" / "loopscope"
FIXTURES = REPO_ROOT / "tests" / "fixtures"
DEMO_PROMPTS = SOURCE_PACKAGE / "assets" / "prompts" / "demo.jsonl"

TINY_TRACE_CONFIG = LoopConfig(
    name="tiny-trace",
    vocab_size=259,
    d_model=16,
    n_heads=2,
    prelude_layers=1,
    block_layers=2,
    coda_layers=1,
    train_recurrences=3,
    context_length=24,
    injection="concat-linear",
    norm_scheme="huginn",
)
"""The looped model the trace and measurement tests run: every part of the engine in use
(prelude, a two-layer block, coda, an injection, the sandwich norm), small enough to trace in
milliseconds."""


def tiny_trace_config(**changes: Any) -> LoopConfig:
    """``TINY_TRACE_CONFIG`` with some fields changed."""
    return replace(TINY_TRACE_CONFIG, **changes)


def random_prompts(count: int, seed: int, first_length: int = 5) -> list[PromptInput]:
    """``count`` prompts of random byte ids, the i-th ``first_length + i`` tokens long, so
    that no two prompts share a length."""
    generator = torch.Generator().manual_seed(seed)
    return [
        PromptInput(
            f"prompt {i}",
            torch.randint(0, 256, (first_length + i,), generator=generator).tolist(),
        )
        for i in range(count)
    ]


def quiet(_: str) -> None:
    """A log callback that prints nothing."""


def made_with_this_torch(fixture: Path) -> bool:
    """Torch's CPU random streams differ between releases, so a seeded draw can only be compared
    bit for bit with the reference's draw under the torch version that made the fixture."""
    made_with = json.loads((fixture / "reference.json").read_text())["torch"]
    return bool(made_with.split("+")[0] == torch.__version__.split("+")[0])


def edited_checkpoint(
    source: Path,
    tmp: Path,
    edit: Callable[[dict[str, torch.Tensor]], object],
    config_change: dict[str, Any] | None = None,
    prefix: str = "checkpoint",
) -> Path:
    """A fresh copy of the checkpoint directory ``source`` under ``tmp``, with its tensors passed
    through ``edit`` (which changes the dict in place) and its config fields updated by
    ``config_change``; nothing else of ``source`` is copied."""
    out = tmp / f"{prefix}-{len(list(tmp.iterdir()))}"
    out.mkdir()
    config = {**json.loads((source / "config.json").read_text()), **(config_change or {})}
    (out / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(source / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(out / "model.safetensors"))
    return out


# ----------------------------------------------------------- tiny Hugging Face decoders
HF_VOCAB = 100
"""The vocabulary of the tiny Hugging Face decoders below."""


def tiny_hf_config(model_type: str) -> Any:
    """The config of a tiny (4-layer, width 32) Hugging Face decoder of ``model_type``."""
    import transformers

    small = {
        "hidden_size": 32,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "vocab_size": HF_VOCAB,
        "max_position_embeddings": 64,
    }
    if model_type == "llama":
        return transformers.LlamaConfig(**small)
    if model_type == "qwen2":
        return transformers.Qwen2Config(**small)
    if model_type == "olmo2":
        return transformers.Olmo2Config(**small)
    if model_type == "gpt2":
        return transformers.GPT2Config(
            n_embd=32,
            n_layer=4,
            n_head=4,
            vocab_size=HF_VOCAB,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        )
    raise AssertionError(model_type)


def tiny_hf_model(model_type: str, seed: int = 0) -> Any:
    """A random tiny model; weights scaled up so attention is far from uniform."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        tiny_hf_config(model_type), attn_implementation="sdpa"
    )
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=generator) * 0.15)
    return model.eval()


def tiny_inkling() -> Any:
    """Eight layers, attention-residual blocks of two, layers [2, 6) looped (two inner
    blocks, so the messages carry a completed block), both attention kinds, a small MoE."""
    import transformers

    config = transformers.Inkling2LoopTextConfig(
        vocab_size=128,
        unpadded_vocab_size=120,
        hidden_size=32,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        swa_num_attention_heads=4,
        swa_num_key_value_heads=2,
        swa_head_dim=8,
        sliding_window_size=4,
        d_rel=4,
        rel_extent=16,
        log_scaling_n_floor=4,
        moe_intermediate_size=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_layers_per_attn_res_block=2,
        loop_layer_index_start=2,
        loop_layer_index_end=6,
        loop_num_passes=3,
        loop_gate_rank=8,
        layer_types=["hybrid_sliding", "hybrid"] * 4,
        eos_token_id=None,
    )
    torch.manual_seed(0)
    model = transformers.Inkling2LoopForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the learned queries start at zero: move them off it
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.3)
    return model
