"""``loopscope stages``: the stages-of-inference report of one model, optionally against a
feedforward reference and with interventions."""

from __future__ import annotations

import argparse

from loopscope.analysis.stages import METRICS
from loopscope.cli.common import Command, CommonFlags, RunOptions
from loopscope.core.errors import LoopscopeError
from loopscope.engine.interventions import SYNTAX
from loopscope.trace.long_prompts import DEFAULT_LONG_PROMPTS, LONG_PROMPT_MODES

__all__ = ["STAGES"]

_INTERVENE_HELP = (
    f"intervention {SYNTAX}; RECURRENCES is a comma list with ranges (0-3,7), omitted = all; "
    "ACTION is zero (default), scale=F or replace=F. Repeat for several."
)


def _cmd_stages(args: argparse.Namespace) -> int:
    from loopscope.engine.interventions import parse_intervention
    from loopscope.studies.stages import run_stages

    options: RunOptions = args.options
    if args.recurrences is not None and args.recurrences < 1:
        raise LoopscopeError(f"--recurrences must be ≥ 1, got {args.recurrences}")
    specs = [parse_intervention(text) for text in args.intervene or []]
    shown = None if args.metrics is None else [m.strip() for m in args.metrics.split(",")]
    paths = run_stages(
        args.model,
        args.prompts,
        args.out,
        reference=args.reference,
        recurrences=args.recurrences,
        intervention=specs or None,
        limit=options.limit,
        sink_threshold=args.sink_threshold,
        show_metrics=shown,
        seed=options.seed or 0,
        progress=options.progress,
        loader=options.load,
        long_prompts=args.long_prompts,
    )
    print(f"report: {paths.html}\nmetrics: {paths.metrics_json}")
    return 0


def _add_stages_options(p: argparse.ArgumentParser) -> None:
    """``loopscope stages MODEL --prompts FILE --out DIR [options]``."""
    p.add_argument("model", help="'demo', 'demo-feedforward' or a checkpoint directory")
    p.add_argument("--prompts", required=True, help="GSM8K/HellaSwag JSONL or a .txt file")
    p.add_argument("--out", required=True, help="output directory for the report")
    p.add_argument("--reference", help="feedforward model to align with (same forms as MODEL)")
    p.add_argument(
        "--recurrences", type=int, help="recurrences to run (default: the training count)"
    )
    p.add_argument(
        "--intervene",
        action="extend",
        nargs="+",
        metavar="SPEC",
        help=_INTERVENE_HELP,
    )
    p.add_argument(
        "--sink-threshold",
        dest="sink_threshold",
        type=float,
        default=0.3,
        help="sink score at which a head counts as a sink (default 0.3)",
    )
    p.add_argument(
        "--long-prompts",
        choices=LONG_PROMPT_MODES,
        default=DEFAULT_LONG_PROMPTS,
        help="a prompt longer than the model's context: skip it and list it in the report "
        "(default), truncate it to its last tokens, or stop with an error",
    )
    p.add_argument(
        "--metrics",
        help="comma-separated metrics to draw (default all): " + ", ".join(METRICS),
    )


STAGES = Command(
    "stages",
    "stages-of-inference report: sinks, mixing, compression, alignment, neurons",
    _add_stages_options,
    _cmd_stages,
    common=CommonFlags(
        seed_help="seed of the random initial state when the model draws one",
        refuses={
            "batch_size": "it profiles one prompt per forward pass, so no padding "
            "enters the stage metrics"
        },
    ),
)
