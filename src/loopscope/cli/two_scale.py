"""``loopscope analyze`` on a nested-loop model (hrm_text): the two-scale study instead of a
single-loop trace, with the checkpoint's own tokenizer."""

from __future__ import annotations

import argparse

from loopscope.cli.common import RunOptions
from loopscope.core.errors import LoopscopeError
from loopscope.studies.two_scale import analyze_two_scale, is_nested_source

__all__ = ["analyze_nested"]


def analyze_nested(args: argparse.Namespace) -> int | None:
    """Run the two-scale study when ``args.model`` has nested loops (exit status 0), else
    None so the caller traces as usual. Trace-only flags that would change the result are
    refused rather than ignored."""
    if not is_nested_source(args.model):
        return None
    unsupported = [
        flag
        for flag, given in (
            ("--ray", getattr(args, "ray", None) is not None),
            ("--loop", getattr(args, "loop", None) is not None),
            ("--injection", getattr(args, "injection", None) is not None),
            ("--system-variants", getattr(args, "system_variants", None) is not None),
        )
        if given
    ]
    if unsupported:
        raise LoopscopeError(
            f"{args.model} has nested loops (hrm_text), analysed by the two-scale study, which "
            f"does not take {', '.join(unsupported)}; drop them"
        )
    options: RunOptions = args.options
    print(
        f"{args.model} has nested loops: running the two-scale study (each level at 2× its "
        "trained count; --recurrences and the trace flags do not apply, no trace is written)"
    )
    paths = analyze_two_scale(
        args.model,
        args.prompts,
        args.out,
        limit=options.limit,
        device=options.device,
        dtype=options.load_dtype(args.model),
    )
    print(f"report: {paths.html}\nmetrics: {paths.metrics_json}")
    return 0
