"""The commands that trace and analyse: ``loopscope trace``, ``analyze`` and ``report``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from loopscope.cli.common import Command, CommonFlags, RunOptions
from loopscope.cli.protocol import (
    add_protocol_flags,
    analyze_variants,
    protocol_from_args,
    refuse_protocol_with_ray,
    trace_variants,
)
from loopscope.core.errors import LoopscopeError
from loopscope.trace.budget import DEFAULT_MAX_DISK, parse_bytes
from loopscope.trace.long_prompts import DEFAULT_LONG_PROMPTS, LONG_PROMPT_MODES
from loopscope.trace.settings import TraceSettings
from loopscope.trace.store import TraceStore

__all__ = ["ANALYZE", "REPORT", "TRACE"]


def _int_list(flag: str, text: str) -> list[int]:
    """Comma-separated whole numbers given to ``flag``, or an error naming the flag."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise LoopscopeError(
            f"{flag} takes comma-separated whole numbers (e.g. 0,2,5), got {text!r}"
        ) from None


def _settings(args: argparse.Namespace, options: RunOptions) -> TraceSettings:
    positions: str | list[int] = args.positions
    if args.positions not in ("all", "last"):
        try:
            positions = [int(p) for p in args.positions.split(",")]
        except ValueError:
            raise LoopscopeError(
                f"--positions must be 'all', 'last' or comma-separated ints, got {args.positions!r}"
            ) from None
    layers = None if args.layers is None else _int_list("--layers", args.layers)
    kept = None
    if args.keep_recurrences is not None:
        kept = _int_list("--keep-recurrences", args.keep_recurrences)
    return TraceSettings(
        recurrences=args.recurrences,
        init_state=args.init_state,
        seed=options.seed or 0,
        positions=positions,
        layers=layers,
        keep_recurrences=kept,
        capture=args.capture,
        state_dtype=args.state_dtype,
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
            raise LoopscopeError(
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
    p.add_argument("--init-state", choices=["zeros", "random", "prelude"])
    p.add_argument("--positions", default="all", help="all | last | comma-separated indices")
    p.add_argument("--layers", help="block layers to keep, comma-separated (default all)")
    p.add_argument(
        "--keep-recurrences",
        help="recurrences whose states are stored, comma-separated (default all)",
    )
    p.add_argument(
        "--capture",
        choices=["auto", "full", "summary"],
        default="auto",
        help="full: store every state; summary: online reductions only; auto (default): full "
        "when the estimated trace fits under --max-disk, else summary",
    )
    p.add_argument(
        "--max-disk",
        type=parse_bytes,
        default=DEFAULT_MAX_DISK,
        help="disk budget of --capture auto, e.g. 20GB, 500MB or bytes (default 20GB)",
    )
    p.add_argument(
        "--state-dtype",
        choices=["auto", "float16", "bfloat16", "float32"],
        default="auto",
        help="how stored states are kept on disk (default: float32 for a float32 model, "
        "float16 otherwise)",
    )
    p.add_argument(
        "--long-prompts",
        choices=LONG_PROMPT_MODES,
        default=DEFAULT_LONG_PROMPTS,
        help="a prompt longer than the model's context: skip it and list it in the report "
        "(default), truncate it to its last tokens, or stop with an error",
    )
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
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="shard the prompts over Ray workers: a local cluster, or the one at ADDRESS "
        "(e.g. 'auto'); needs pip install 'loopscope[ray]'",
    )
    p.add_argument("--workers", type=int, help="with --ray: shards traced at once")
    add_protocol_flags(p)


def _ray_use_gpu(args: argparse.Namespace) -> bool | None:
    """``--device`` for Ray workers: cuda puts one on each GPU, cpu keeps them off the GPUs,
    none given leaves it to the cluster (GPUs when it has some). ``--dtype`` and
    ``--threads`` are refused: every worker loads its own model in float32 and runs one CPU
    thread."""
    if args.dtype is not None:
        raise LoopscopeError(
            "--dtype is not supported with --ray yet (workers load in float32); drop --dtype"
        )
    if args.threads:
        raise LoopscopeError(
            "--threads does not apply with --ray (every CPU worker runs one thread); drop it"
        )
    if args.device is None:
        return None
    if args.device not in ("cpu", "cuda"):
        raise LoopscopeError(
            f"--device {args.device} with --ray: Ray places the workers, so give cuda or cpu"
        )
    return args.device == "cuda"


def _run_trace(args: argparse.Namespace, out: str | Path) -> TraceStore:
    """One process, or sharded over Ray workers with ``--ray`` (only then is Ray imported)."""
    options: RunOptions = args.options
    if args.ray is None:
        if args.workers is not None:
            raise LoopscopeError("--workers only applies with --ray; add --ray or drop --workers")
        from loopscope.pipeline import trace

        load_options = _load_options(args)
        return trace(
            args.model,
            args.prompts,
            out,
            _settings(args, options),
            limit=options.limit,
            progress=options.progress,
            protocol=protocol_from_args(args),
            batch_size="auto" if options.batch_auto else (options.batch_size or 1),
            long_prompts=args.long_prompts,
            max_disk=args.max_disk,
            load_options={
                **load_options,
                "dtype": options.load_dtype(args.model),
                "device": options.device,
            },
        )
    refuse_protocol_with_ray(args)
    if (options.batch_size or 1) != 1:
        raise LoopscopeError(
            "--batch-size is not supported with --ray yet (each worker traces one prompt per "
            "forward pass); drop --batch-size or --ray"
        )
    if _load_options(args):
        raise LoopscopeError("--loop and --injection are not supported with --ray yet; drop --ray")
    if args.max_disk != DEFAULT_MAX_DISK:
        raise LoopscopeError(
            "--max-disk is not supported with --ray yet (the workers use the default 20GB "
            "budget for --capture auto); drop --max-disk, or choose --capture full or summary"
        )
    from loopscope.families.table import tokenizer_for
    from loopscope.pipeline import prompt_inputs
    from loopscope.trace.sharding import trace_distributed

    use_gpu = _ray_use_gpu(args)
    tokenizer = tokenizer_for(args.model)
    try:
        return trace_distributed(
            args.model,
            prompt_inputs(args.prompts, limit=options.limit, tokenizer=tokenizer),
            out,
            _settings(args, options),
            address=args.ray,
            workers=args.workers,
            use_gpu=use_gpu,
            tokenizer_name=tokenizer.name,
            bos=tokenizer.bos,
            progress=options.progress,
            long_prompts=args.long_prompts,
        )
    except ImportError as err:
        raise RuntimeError(str(err)) from None


def _add_trace_command_options(p: argparse.ArgumentParser) -> None:
    _add_trace_options(p)
    p.add_argument(
        "--zarr",
        metavar="STORE",
        help="also write the finished trace as a Zarr v3 store there (a path or an fsspec URL), "
        "as `loopscope convert-trace` does",
    )


def _cmd_trace(args: argparse.Namespace) -> int:
    if args.system_variants is not None:
        if args.zarr is not None:
            raise ValueError("--zarr writes one store; convert each variant's trace instead")
        for directory in trace_variants(args, Path(args.out), _run_trace):
            print(f"traced {directory.name} into {directory / 'trace'}")
        return 0
    store = _run_trace(args, args.out)
    print(f"traced {len(store)} prompts into {store.path}")
    if args.zarr is not None:
        from loopscope.trace.zarr_store import convert_trace

        print(f"zarr store: {convert_trace(store.path, args.zarr, overwrite=True)}")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from loopscope.cli.two_scale import analyze_nested  # nested loops: the two-scale study

    nested = analyze_nested(args)
    if nested is not None:
        return nested
    if args.system_variants is not None:
        return analyze_variants(args, _run_trace)
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


def _add_report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace_dir")
    p.add_argument("--out", help="output directory (default: the trace directory)")


#: Tracing runs ``--batch-size`` prompts per forward pass (right-padded, grouped by length).
TRACE_FLAGS = CommonFlags(
    seed_help="seed of the random initial state (--init-state random, or a model that draws one)",
    batch_size="auto",
    batch_size_help="prompts per forward pass (right-padded, grouped by length; split when "
    "memory runs out; every prompt's trace equals tracing it alone); auto: as many as fit in "
    "free memory, printed",
)

TRACE = Command(
    "trace",
    "record every layer at every recurrence into a trace",
    _add_trace_command_options,
    _cmd_trace,
    common=TRACE_FLAGS,
)
ANALYZE = Command(
    "analyze",
    "trace, then write the HTML report and metrics.json",
    _add_trace_options,
    _cmd_analyze,
    common=TRACE_FLAGS,
)
REPORT = Command(
    "report", "write the report of an existing trace", _add_report_options, _cmd_report
)
