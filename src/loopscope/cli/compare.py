"""``loopscope compare RUN_A RUN_B [...] --out DIR``: one page setting analysed runs side by
side (see :mod:`loopscope.report.compare`)."""

from __future__ import annotations

import argparse

from loopscope.cli.common import Command

__all__ = ["COMPARE"]


def _add_compare_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="directories `loopscope analyze` wrote (two or more)")
    p.add_argument("--out", required=True, help="directory for report.html and metrics.json")
    p.add_argument(
        "--names", help="comma-separated names of the runs on the page (default: directory names)"
    )


def _cmd_compare(args: argparse.Namespace) -> int:
    from loopscope.report.compare import write_comparison

    names = None if args.names is None else [n.strip() for n in args.names.split(",")]
    paths = write_comparison(args.runs, args.out, names=names)
    print(f"report: {paths.html}\nmetrics: {paths.metrics_json}")
    return 0


COMPARE = Command(
    "compare",
    "one report page comparing two or more analysed runs",
    _add_compare_options,
    _cmd_compare,
)
