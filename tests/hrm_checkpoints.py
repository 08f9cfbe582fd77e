"""Tiny random hrm_text checkpoints made with transformers' own HrmTextConfig and
HrmTextForCausalLM (the reference the hrm_text family is checked against).

The weights are drawn wider than transformers' initialiser (std 0.02) so that attention is far
from uniform and the prefix-LM mask changes the logits well above rounding; the stacks' RMS norms
have no weights, so ``z_L_init`` (zeros as initialised) is the one non-matrix tensor, and it is
perturbed so a loader that ignored it would fail the comparison.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TINY_HRM: dict[str, Any] = {
    "vocab_size": 61,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "head_dim": 8,
    "max_position_embeddings": 64,
    "H_cycles": 2,
    "L_cycles": 3,
}


def reference_model(seed: int = 0, **changes: Any) -> Any:
    """transformers' HrmTextForCausalLM with seeded weights (std 0.1 matrices, N(0, 1)
    z_L_init), in eval mode."""
    from transformers import HrmTextConfig, HrmTextForCausalLM

    torch.manual_seed(seed)
    model = HrmTextForCausalLM(HrmTextConfig(**{**TINY_HRM, **changes})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("z_L_init"):
                param.normal_()
            elif name.endswith("embed_tokens.weight"):
                param.normal_(std=0.02)  # times embedding_scale 50: unit-sized z_H
            else:
                param.normal_(std=0.1)
    return model


def save_reference(directory: Path, seed: int = 0, **changes: Any) -> Any:
    """``reference_model`` saved to ``directory`` as transformers writes it (safetensors)."""
    model = reference_model(seed, **changes)
    model.save_pretrained(str(directory), safe_serialization=True)
    return model


def reference_logits(
    model: Any, ids: torch.Tensor, n_h: int, n_l: int, token_type_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """transformers' logits at ``n_h`` H cycles and ``n_l`` L cycles: its forward reads the counts
    from the config on every call, so the same weights run at any count."""
    model.config.H_cycles, model.config.L_cycles = n_h, n_l
    with torch.no_grad():
        out = model(ids, token_type_ids=token_type_ids, use_cache=False)
    return out.logits.detach()


def save_word_tokenizer(directory: Path) -> list[str]:
    """A word-level tokenizer over the tiny vocabulary (``w0`` … ``w59`` and ``[UNK]``), saved
    beside the weights as transformers writes it; returns the words."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(TINY_HRM["vocab_size"] - 1)]
    vocab = {word: i for i, word in enumerate(words)} | {"[UNK]": len(words)}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(
        str(directory)
    )
    return words
