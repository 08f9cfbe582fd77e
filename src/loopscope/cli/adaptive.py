"""``loopscope adaptive``: per-token exit criteria, recurrences used against agreement with the
full-depth output."""

from __future__ import annotations

import argparse

from loopscope.cli.common import Command, CommonFlags, RunOptions

__all__ = ["ADAPTIVE"]


def _cmd_adaptive(args: argparse.Namespace) -> int:
    import torch

    from loopscope.data import load_prompts
    from loopscope.families.table import tokenizer_for
    from loopscope.studies.adaptive import adaptive_depth_sweep, write_adaptive

    options: RunOptions = args.options
    model = options.load(args.model)
    texts = load_prompts(args.prompts)[: options.limit]
    tokenizer = tokenizer_for(args.model)
    ids = [torch.tensor(tokenizer.encode(text), dtype=torch.long) for text in texts]
    result = adaptive_depth_sweep(
        model,
        ids,
        max_recurrences=args.recurrences,
        seed=options.seed or 0,
        batch_size=options.batch_size or 1,
        progress=options.progress,
    )
    write_adaptive(result, args.out)
    print(result.to_markdown())
    return 0


def _add_adaptive_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="'demo', 'demo-feedforward' or a checkpoint directory")
    p.add_argument("--prompts", required=True, help="GSM8K/HellaSwag JSONL or a .txt file")
    p.add_argument("--out", required=True, help="directory for adaptive.md, .csv and .png")
    p.add_argument("--recurrences", type=int, default=64, help="full depth to compare against")


ADAPTIVE = Command(
    "adaptive",
    "per-token exit criteria: recurrences used vs agreement with full depth",
    _add_adaptive_options,
    _cmd_adaptive,
    common=CommonFlags(
        batch_size=8,
        batch_size_help="prompts per forward pass (right-padded; halved on out-of-memory)",
        seed_help="seed of the random initial state when the model draws one",
    ),
)
