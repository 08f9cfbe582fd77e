"""CLI subcommands that trace and analyse: ``trace``, ``analyze``, ``report``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from loopscope.trace.writer import TraceSettings, TraceStore


def _settings(args: argparse.Namespace) -> TraceSettings:
    positions: str | list[int] = args.positions
    if args.positions not in ("all", "last"):
        try:
            positions = [int(p) for p in args.positions.split(",")]
        except ValueError:
            raise ValueError(
                f"--positions must be 'all', 'last' or comma-separated ints, got {args.positions!r}"
            ) from None
    layers = None if args.layers is None else [int(x) for x in args.layers.split(",")]
    kept = None
    if args.keep_recurrences is not None:
        kept = [int(x) for x in args.keep_recurrences.split(",")]
    return TraceSettings(
        recurrences=args.recurrences,
        init_state=args.init_state,
        seed=args.seed,
        positions=positions,
        layers=layers,
        keep_recurrences=kept,
        capture=args.capture,
        attention=not args.no_attention,
        stability_prompts=args.stability_prompts,
        fixed_point=args.fixed_point,
        fixed_point_tol=args.fixed_point_tol,
        fixed_point_memory=args.anderson_memory,
        fixed_point_beta=args.anderson_beta,
    )


def _load_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--loop A:B`` and ``--injection`` for retrofitting a Hugging Face decoder."""
    options: dict[str, Any] = {}
    if args.loop is not None:
        try:
            start, stop = (int(x) for x in args.loop.split(":"))
        except ValueError:
            raise ValueError(
                f"--loop must look like A:B (layers A..B-1), got {args.loop!r}"
            ) from None
        options["loop"] = (start, stop)
    if args.injection is not None:
        options["injection"] = args.injection
    return options


def _add_trace_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="'demo', 'demo-feedforward' or a checkpoint directory")
    p.add_argument("--prompts", required=True, help="GSM8K/HellaSwag JSONL or a .txt file")
    p.add_argument("--recurrences", type=int, default=128)
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument("--init-state", choices=["zeros", "random", "prelude"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--positions", default="all", help="all | last | comma-separated indices")
    p.add_argument("--layers", help="block layers to keep, comma-separated (default all)")
    p.add_argument(
        "--keep-recurrences",
        help="recurrences whose states are stored, comma-separated (default all)",
    )
    p.add_argument("--capture", choices=["full", "summary"], default="full")
    p.add_argument("--no-attention", action="store_true")
    p.add_argument("--stability-prompts", type=int, default=2)
    p.add_argument(
        "--fixed-point",
        choices=["last", "anderson"],
        default="last",
        help="reference X*: the last recurrence's state, or solved by Anderson acceleration",
    )
    p.add_argument(
        "--fixed-point-tol",
        type=float,
        default=1e-5,
        help="with --fixed-point anderson: stop at relative residual ‖F(z)−z‖/‖F(z)‖ ≤ this",
    )
    p.add_argument(
        "--anderson-memory",
        type=int,
        default=5,
        help="with --fixed-point anderson: past steps mixed (20 suits slowly contracting maps)",
    )
    p.add_argument(
        "--anderson-beta",
        type=float,
        default=1.0,
        help="with --fixed-point anderson: relaxation of each step (2 suits slowly contracting "
        "pre-norm maps; 1 is safer for sandwich and Ouro norms)",
    )
    p.add_argument(
        "--loop", help="Hugging Face decoders: loop layers A..B-1, written A:B (default: none)"
    )
    p.add_argument(
        "--injection",
        choices=["none", "add", "concat-linear"],
        help="Hugging Face decoders with --loop: how the prelude output enters each recurrence",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="shard the prompts over Ray workers: a local cluster, or the one at ADDRESS "
        "(e.g. 'auto'); needs pip install 'loopscope[ray]'",
    )
    p.add_argument("--workers", type=int, help="with --ray: shards traced at once")


def _run_trace(args: argparse.Namespace, out: str | Path) -> TraceStore:
    """One process, or sharded over Ray workers with ``--ray`` (only then is Ray imported)."""
    if args.ray is None:
        if args.workers is not None:
            raise ValueError("--workers only applies with --ray; add --ray or drop --workers")
        from loopscope.pipeline import trace

        return trace(
            args.model,
            args.prompts,
            out,
            _settings(args),
            limit=args.limit,
            progress=not args.no_progress,
            load_options=_load_options(args),
        )
    if _load_options(args):
        raise ValueError("--loop and --injection are not supported with --ray yet; drop --ray")
    from loopscope.families.table import tokenizer_for
    from loopscope.pipeline import prompt_inputs
    from loopscope.trace.sharding import trace_distributed

    tokenizer = tokenizer_for(args.model)
    try:
        return trace_distributed(
            args.model,
            prompt_inputs(args.prompts, limit=args.limit, tokenizer=tokenizer),
            out,
            _settings(args),
            address=args.ray,
            workers=args.workers,
            tokenizer_name=tokenizer.name,
            bos=tokenizer.bos,
            progress=not args.no_progress,
        )
    except ImportError as err:
        raise RuntimeError(str(err)) from None


def _cmd_trace(args: argparse.Namespace) -> int:
    store = _run_trace(args, args.out)
    print(f"traced {len(store)} prompts into {store.path}")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from loopscope.pipeline import report

    out = Path(args.out)
    store = _run_trace(args, out / "trace")
    paths = report(store.path, out)
    print(f"report: {paths.html}\nmetrics: {paths.metrics_json}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from loopscope.pipeline import report

    paths = report(args.trace_dir, args.out)
    print(f"report: {paths.html}\nmetrics: {paths.metrics_json}")
    return 0


def add_analysis_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="record every layer at every recurrence into a trace")
    _add_trace_options(p)
    p.set_defaults(handler=_cmd_trace)
    p = sub.add_parser("analyze", help="trace, then write the HTML report and metrics.json")
    _add_trace_options(p)
    p.set_defaults(handler=_cmd_analyze)
    p = sub.add_parser("report", help="write the report of an existing trace")
    p.add_argument("trace_dir")
    p.add_argument("--out", help="output directory (default: the trace directory)")
    p.set_defaults(handler=_cmd_report)
