"""``loopscope demo``: the whole pipeline on the bundled models and prompts, offline."""

from __future__ import annotations

import argparse
from pathlib import Path

from loopscope.cli.common import Command, CommonFlags, RunOptions

__all__ = ["DEMO"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from loopscope.studies.demo import run_demo

    options: RunOptions = args.options
    return run_demo(
        Path(args.out),
        recurrences=args.recurrences,
        quick=args.quick,
        limit=options.limit,
        seed=options.seed or 0,
        progress=options.progress,
        loader=options.load,
        batch_size=options.batch_size or 1,
    )


def _add_demo_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="loopscope-demo", help="output directory for the report")
    p.add_argument("--recurrences", type=int, default=64, help="long-run recurrences")
    p.add_argument("--quick", action="store_true", help="fewer prompts and recurrences")


DEMO = Command(
    "demo",
    "run the whole pipeline on the bundled models and prompts",
    _add_demo_options,
    _cmd_demo,
    common=CommonFlags(
        seed_help="seed of torch and of any random initial state",
        limit_help="only the first N bundled problems (default 8, or 4 with --quick)",
        batch_size_help="prompts per forward pass while tracing (the stages profile runs one "
        "at a time)",
    ),
)
