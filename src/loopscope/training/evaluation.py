"""Held-out evaluation of our trained models: loss and exact-answer accuracy by greedy decoding."""

from __future__ import annotations

from typing import Any

import torch

from loopscope.training.config import TrainConfig, derive_seed
from loopscope.training.objective import encode_texts, lm_loss


@torch.no_grad()
def greedy_generate(
    model: Any,
    prompts: list[list[int]],
    *,
    max_new_tokens: int = 96,
    stop_id: int | None = None,
    pad_id: int = 0,
    recurrences: int | None = None,
    device: str = "cpu",
) -> list[list[int]]:
    """Greedy continuations of a batch of prompts, right-padded: causal attention means the
    padding after a row's last token never influences it, so one batched forward per new token
    serves every row (no KV cache: the engine stays the only forward path)."""
    model.eval()
    context = model.meta.context_length
    rows = [list(p) for p in prompts]
    done = [False] * len(rows)
    generated: list[list[int]] = [[] for _ in rows]
    for _ in range(max_new_tokens):
        active = [i for i, d in enumerate(done) if not d and len(rows[i]) < context]
        if not active:
            break
        width = max(len(rows[i]) for i in active)
        ids = torch.full((len(active), width), pad_id, dtype=torch.long)
        for row, i in enumerate(active):
            ids[row, : len(rows[i])] = torch.tensor(rows[i])
        logits = model(ids.to(device), recurrences=recurrences).logits
        for row, i in enumerate(active):
            token = int(logits[row, len(rows[i]) - 1].argmax())
            if token == stop_id:
                done[i] = True
                continue
            rows[i].append(token)
            generated[i].append(token)
        for i in active:
            done[i] = done[i] or len(rows[i]) >= context
    return generated


@torch.no_grad()
def evaluate(
    model: Any, cfg: TrainConfig, *, device: str = "cpu", recurrences: int | None = None
) -> dict[str, float]:
    """Held-out loss on ``cfg.eval_problems`` problems and exact-answer accuracy on the first
    ``cfg.accuracy_problems`` of them (problems from ``cfg.eval_seed``, never trained on)."""
    from loopscope.data import (
        ByteTokenizer,
        format_prompt,
        format_training_example,
        generate_problems,
        parse_model_answer,
    )

    tokenizer = ByteTokenizer()
    problems = generate_problems(
        cfg.eval_problems,
        seed=derive_seed("eval", cfg.eval_seed, 0),
        min_steps=cfg.min_problem_steps,
        max_steps=cfg.max_problem_steps,
    )
    model.eval()
    losses = []
    for start in range(0, len(problems), 16):
        chunk = problems[start : start + 16]
        ids, mask = encode_texts(
            [format_training_example(p.question, p.answer) for p in chunk],
            model.meta.context_length,
            tokenizer,
        )
        logits = model(ids.to(device), recurrences=recurrences).logits
        losses.append(float(lm_loss(logits, ids.to(device), mask.to(device))) * len(chunk))
    n_acc = min(cfg.accuracy_problems, len(problems))
    subset = problems[:n_acc]
    outputs = greedy_generate(
        model,
        [tokenizer.encode(format_prompt(p.question), bos=True) for p in subset],
        stop_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        recurrences=recurrences,
        device=device,
    )
    correct = sum(
        int(parse_model_answer(tokenizer.decode(out)) == str(p.final_answer))
        for p, out in zip(subset, outputs)
    )
    model.train()
    return {
        "eval_loss": sum(losses) / len(problems),
        "eval_accuracy": correct / max(n_acc, 1),
    }
