"""``loopscope evaluate``: exact-answer accuracy by greedy decoding at each recurrence count."""

from __future__ import annotations

import argparse

from loopscope.cli.common import Command, CommonFlags, RunOptions
from loopscope.core.errors import LoopscopeError

__all__ = ["EVALUATE"]


def recurrence_list(text: str) -> list[int]:
    """``--recurrences 1,2,4``: distinct counts ≥ 1, kept in the order given."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise LoopscopeError(
            f"--recurrences takes whole numbers separated by commas (e.g. 1,2,4,8), got {text!r}"
        ) from None
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts):
        raise LoopscopeError(
            f"--recurrences needs distinct counts ≥ 1 separated by commas, got {text!r}"
        )
    return counts


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from loopscope.data import load_gsm8k_jsonl
    from loopscope.studies.evaluate import codec_for, evaluate_accuracy, write_evaluation

    options: RunOptions = args.options
    if args.max_new_tokens < 1:
        raise LoopscopeError(f"--max-new-tokens must be ≥ 1, got {args.max_new_tokens}")
    recurrences = recurrence_list(args.recurrences)
    problems = load_gsm8k_jsonl(args.prompts)[: options.limit]
    model = options.load(args.model)
    result = evaluate_accuracy(
        model,
        problems,
        codec_for(args.model),
        recurrences,
        max_new_tokens=args.max_new_tokens,
        kv_cache=not args.no_kv_cache,
        seed=options.seed or 0,
        progress=options.progress,
        batch_size=options.batch_size or 1,
    )
    paths = write_evaluation(result, args.out)
    print(result.to_markdown())
    cache = "without" if args.no_kv_cache else "with"
    print(f"{len(problems)} problems, {result.seconds:.1f} s of generation {cache} the KV cache")
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def _add_evaluate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="'demo', 'demo-feedforward' or a checkpoint directory")
    p.add_argument(
        "--prompts", required=True, help="GSM8K-layout JSONL ('question' and '#### N' answer)"
    )
    p.add_argument(
        "--recurrences", default="1,2,4,8,16,32", help="counts to evaluate at, e.g. 1,2,4,8"
    )
    p.add_argument("--max-new-tokens", type=int, default=96, help="longest answer (default 96)")
    p.add_argument(
        "--no-kv-cache",
        action="store_true",
        help="a full forward per new token instead of the per-recurrence key/value cache "
        "(slower; also for a random initial state drawn for the whole text, or an attention "
        "path other than SDPA or eager, which the cache refuses)",
    )
    p.add_argument("--out", default="loopscope-evaluate", help="output directory")


EVALUATE = Command(
    "evaluate",
    "exact-answer accuracy against recurrences, by greedy decoding",
    _add_evaluate_options,
    _cmd_evaluate,
    common=CommonFlags(
        seed_help="seed of the random initial state when the model draws one",
        batch_size=16,
        batch_size_help="problems decoded together with the KV cache (right-padded; the "
        "same answers as one at a time)",
        limit_help="only the first N problems",
    ),
)
