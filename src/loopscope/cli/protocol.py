"""The prompt-protocol flags of ``loopscope trace`` and ``analyze``: ``--format``,
``--system``, ``--sample`` (with ``--seed``) and ``--system-variants``.

``--system-variants none,long-persona,...`` traces the same prompts once per named system
prompt, each into ``OUT/<variant>/`` (``analyze`` writes each variant's own report there), and
``analyze`` then writes ``OUT/report.html`` and ``OUT/metrics.json`` setting the variants side
by side (see :mod:`loopscope.report.compare`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from loopscope.core.errors import LoopscopeError
from loopscope.data.prompt_format import FORMATS, PromptProtocol
from loopscope.data.system_prompts import VARIANTS, parse_variants, resolve_system

__all__ = [
    "add_protocol_flags",
    "analyze_variants",
    "protocol_from_args",
    "refuse_protocol_with_ray",
    "trace_variants",
]

#: Traces prompts for ``args`` into a directory (``loopscope.cli.analysis._run_trace``).
TraceRunner = Callable[[argparse.Namespace, Path], object]


def add_protocol_flags(p: argparse.ArgumentParser) -> None:
    """Add the prompt-protocol flags to a tracing command."""
    group = p.add_argument_group("prompt protocol")
    group.add_argument(
        "--format",
        choices=FORMATS,
        help="raw: the prompt as the file gives it (after the system prompt and a blank line); "
        "chat: the checkpoint's own chat template (default: chat when the tokenizer has a "
        "template, else raw)",
    )
    group.add_argument(
        "--system",
        metavar="TEXT|@FILE|NAME",
        help=f"system prompt: literal text, @FILE for a file's text, or a variant "
        f"({', '.join(VARIANTS)}); default none",
    )
    group.add_argument(
        "--sample",
        type=int,
        metavar="N",
        help="trace a random subset of N prompts of the file, drawn with --seed "
        "(the same seed gives the same lines, recorded in the trace)",
    )
    group.add_argument(
        "--system-variants",
        metavar="NAMES",
        help=f"trace the same prompts once per system-prompt variant, comma-separated "
        f"({','.join(VARIANTS)}), each into OUT/NAME; analyze sets them side by side",
    )


def protocol_from_args(args: argparse.Namespace) -> PromptProtocol:
    """The protocol ``args`` ask for (``--seed`` seeds the sample)."""
    seed = getattr(args.options, "seed", None) if hasattr(args, "options") else None
    return PromptProtocol(
        format=args.format,
        system=resolve_system(args.system),
        sample=args.sample,
        seed=seed or 0,
    )


def refuse_protocol_with_ray(args: argparse.Namespace) -> None:
    """``--ray`` traces the prompts as the file gives them (raw, no system prompt, no sample)."""
    given = [
        flag
        for flag, value in (
            ("--format", args.format),
            ("--system", args.system),
            ("--sample", args.sample),
            ("--system-variants", args.system_variants),
        )
        if value is not None
    ]
    if given:
        raise LoopscopeError(
            f"{', '.join(given)} not supported with --ray yet (Ray workers trace the raw "
            "prompts); drop --ray or those flags"
        )


def _variant_args(args: argparse.Namespace, name: str) -> argparse.Namespace:
    if args.system is not None:
        raise LoopscopeError(
            "--system and --system-variants both set the system prompt; give only one"
        )
    return argparse.Namespace(**{**vars(args), "system": name, "system_variants": None})


def trace_variants(args: argparse.Namespace, out: Path, run_trace: TraceRunner) -> list[Path]:
    """Trace every variant of ``--system-variants`` into ``out/<name>/trace``; returns the
    variant directories in the order given."""
    directories = []
    for system in parse_variants(args.system_variants):
        directory = out / system.name
        run_trace(_variant_args(args, system.name), directory / "trace")
        directories.append(directory)
    return directories


def analyze_variants(args: argparse.Namespace, run_trace: TraceRunner) -> int:
    """``analyze --system-variants``: each variant traced and reported in its own directory,
    then the side-by-side page and metrics in ``--out``."""
    from loopscope.pipeline import report
    from loopscope.report.compare import write_variants_report

    out = Path(args.out)
    directories = trace_variants(args, out, run_trace)
    for directory in directories:
        report(directory / "trace", directory)
    paths = write_variants_report(directories, out)
    print(f"report: {paths.html}\nmetrics: {paths.metrics_json}")
    return 0
