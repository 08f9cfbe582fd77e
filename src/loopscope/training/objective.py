"""What training minimises: batches of synthetic problems, byte encoding with loss masks, and
the language-model loss (final output or every recurrence)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from loopscope.training.config import TrainConfig, derive_seed


def batch_for_step(
    step: int, cfg: TrainConfig, context_length: int, seed: int | None = None
) -> tuple[Tensor, Tensor]:
    """Token ids (batch, T) and a loss mask for training step ``step``; deterministic."""
    from loopscope.data import ByteTokenizer, format_training_example, generate_problems

    problems = generate_problems(
        cfg.batch_size,
        seed=derive_seed("train", cfg.seed if seed is None else seed, step),
        min_steps=cfg.min_problem_steps,
        max_steps=cfg.max_problem_steps,
    )
    texts = [format_training_example(p.question, p.answer) for p in problems]
    return encode_texts(texts, context_length, ByteTokenizer())


def encode_texts(texts: list[str], context_length: int, tokenizer: Any) -> tuple[Tensor, Tensor]:
    """Right-padded ids with BOS and EOS, truncated to the context; mask marks real tokens."""
    rows = [tokenizer.encode(t, bos=True, eos=True)[:context_length] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = True
    return ids, mask


def lm_loss(logits: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """Next-token cross-entropy over real (unpadded) target positions."""
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100
    )


def training_loss(
    model: Any, ids: Tensor, mask: Tensor, recurrences: int, cfg: TrainConfig
) -> Tensor:
    out = model(
        ids,
        recurrences=recurrences,
        grad_depth=cfg.backprop_depth,
        exit_every_recurrence=cfg.loss == "all-recurrences",
    )
    if cfg.loss == "all-recurrences":
        losses = [lm_loss(lg, ids, mask) for lg in out.recurrence_logits]
        return torch.stack(losses).mean()
    return lm_loss(out.logits, ids, mask)
