"""``loopscope ablate random-init|trained``: the architecture ablations as one command each.

``add_ablate_command(sub)`` plugs into the main parser; ``python -m loopscope.cli.ablate`` runs
the same command on its own.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace

from loopscope.nn.injection import INJECTIONS
from loopscope.nn.layers import NORM_SCHEMES


def _setup_threads(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def _cmd_random_init(args: argparse.Namespace) -> int:
    from loopscope.studies.ablation import (
        compare_with_study,
        markdown_table,
        random_init_preset,
        run_random_init,
    )

    _setup_threads(args)
    preset = random_init_preset(
        args.preset,
        seeds=args.seeds,
        block_sizes=args.block_sizes,
        norms=args.norms,
        injections=args.injections,
    )
    for name in ("adapter_init_noise", "embed_init_std"):
        value = getattr(args, name)
        if value is None:
            continue
        if not value >= 0:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} is a standard deviation: pass a value ≥ 0, got {value}")
        preset = replace(preset, **{name: value})
    run = run_random_init(args.out, preset, device=args.device, progress=not args.no_progress)
    print(
        f"random-init ablation ({preset.name}): {len(run.results)} cells, "
        f"{len(run.computed)} computed now in {run.seconds:.1f} s"
    )
    if any(r.cell.block == 12 for r in run.results):
        table = compare_with_study(run.results, rule=preset.rule)
        print(markdown_table(table.columns, [[str(c) for c in row] for row in table.rows]))
    print(f"tables: {run.table_md}, {run.table_csv}")
    if run.report is not None:
        print(f"report: {run.report.html}")
    return 0


def _cmd_trained(args: argparse.Namespace) -> int:
    from loopscope.studies.ablation import run_trained, trained_preset

    _setup_threads(args)
    preset = trained_preset(
        args.preset,
        seeds=args.seeds,
        block_sizes=args.block_sizes,
        norms=args.norms,
        injections=args.injections,
    )
    run = run_trained(args.out, preset, device=args.device, progress=not args.no_progress)
    print(
        f"trained ablation ({preset.name}): {len(run.results)} cells, "
        f"{len(run.computed)} computed now in {run.seconds:.1f} s"
    )
    print(f"tables: {run.table_md}, {run.table_csv}")
    if run.report is not None:
        print(f"report: {run.report.html}")
    return 0


def _common(p: argparse.ArgumentParser, blocks_help: str) -> None:
    p.add_argument("--out", required=True, help="output directory; a rerun resumes there")
    p.add_argument(
        "--preset",
        choices=("quick", "paper"),
        default="quick",
        help="quick: small width, CPU-sized; paper: the study's width (meant for a GPU)",
    )
    p.add_argument("--seeds", type=int, help="number of seeds (0..N-1)")
    p.add_argument("--block-sizes", dest="block_sizes", nargs="+", type=int, help=blocks_help)
    p.add_argument("--norms", nargs="+", choices=NORM_SCHEMES, help="norm schemes to include")
    p.add_argument("--injections", nargs="+", choices=INJECTIONS, help="injections to include")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_ablate_command(sub: argparse._SubParsersAction) -> None:
    """Add ``ablate random-init`` and ``ablate trained`` to the ``loopscope`` parser."""
    p = sub.add_parser("ablate", help="architecture ablation sweeps (resumable)")
    kinds = p.add_subparsers(dest="ablation", required=True)
    r = kinds.add_parser(
        "random-init",
        help="untrained looped stacks: norm × injection × block size × seed → fixed-point verdicts",
    )
    _common(r, "block sizes (default 4 12 16)")
    r.add_argument(
        "--adapter-init-noise",
        type=float,
        help="σ of the noise on concat-linear adapters' (Z+X)/√2 start (default 0.02, which "
        "contracts only below width ≈ 215; c/√width with c < 0.29 contracts at any width)",
    )
    r.add_argument(
        "--embed-init-std",
        type=float,
        help="σ of the token embeddings, which are Z0 = X here (default 0.02, about 0.02× a "
        "normalised stream)",
    )
    r.set_defaults(handler=_cmd_random_init)
    t = kinds.add_parser(
        "trained",
        help="train the study's small looped models and a feedforward twin, then compare them",
    )
    _common(t, "looped block sizes (default 4 8 12)")
    t.set_defaults(handler=_cmd_trained)


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point with the main CLI's error handling."""
    parser = argparse.ArgumentParser(prog="loopscope")
    sub = parser.add_subparsers(dest="command", required=True)
    add_ablate_command(sub)
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
        return code
    except KeyboardInterrupt:
        print("interrupted; finished cells are saved and a rerun resumes", file=sys.stderr)
        return 130
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as err:
        print(f"loopscope ablate: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
