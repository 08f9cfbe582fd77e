"""``loopscope ablate random-init|trained``: the architecture ablations as one command each.

``ABLATE`` is the command group's row in the table of ``loopscope.cli.main``;
``python -m loopscope.cli.ablate`` runs the same rows on their own.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace

from loopscope.cli.common import Command, CommonFlags, RunOptions, run_cli
from loopscope.core.errors import LoopscopeError
from loopscope.nn.inits import INIT_SCHEMES, WEIGHT_KINDS, InitParts, parse_init_parts
from loopscope.nn.injection import INJECTIONS
from loopscope.nn.layers import NORM_SCHEMES

__all__ = ["ABLATE"]

#: ``--init`` choices, the same as ``loopscope.studies.ablation.presets.INIT_CHOICES`` (a test
#: checks it), kept here so that building the parser does not import the studies.
INIT_CHOICES = ("family", *INIT_SCHEMES)
#: The presets' names, as ``RANDOM_INIT_PRESETS`` and ``TRAINED_PRESETS`` hold them (a test
#: checks it), for the same reason.
RANDOM_INIT_PRESET_NAMES = ("quick", "paper")
TRAINED_PRESET_NAMES = ("quick", "cpu", "paper")


def _cmd_random_init(args: argparse.Namespace) -> int:
    from loopscope.studies.ablation.formatting import markdown_table
    from loopscope.studies.ablation.presets import random_init_preset
    from loopscope.studies.ablation.study import compare_with_study
    from loopscope.studies.ablation.sweeps import run_random_init

    options: RunOptions = args.options
    preset = random_init_preset(
        args.preset,
        seeds=args.seeds,
        block_sizes=args.block_sizes,
        norms=args.norms,
        injections=args.injections,
    )
    preset = replace(preset, init=_chosen_init(args, preset.init), init_parts=_init_parts(args))
    if args.recurrences is not None:
        if args.recurrences < 2:
            raise LoopscopeError(
                f"--recurrences must be ≥ 2 (the verdict compares the last step with the one "
                f"at R/2), got {args.recurrences}"
            )
        preset = replace(preset, recurrences=args.recurrences)
    for name in ("adapter_init_noise", "embed_init_std"):
        value = getattr(args, name)
        if value is None:
            continue
        if not value >= 0:
            flag = "--" + name.replace("_", "-")
            raise LoopscopeError(f"{flag} is a standard deviation: pass a value ≥ 0, got {value}")
        preset = replace(preset, **{name: value})
    if options.dtype is not None:
        preset = replace(preset, dtype=options.dtype)
    if options.limit is not None:
        preset = replace(preset, prompts=min(preset.prompts, options.limit))
    run = run_random_init(args.out, preset, device=options.device, progress=options.progress)
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


def _init_parts(args: argparse.Namespace) -> InitParts:
    """``--init-parts KIND=SCHEME ...``, validated (a clear error names the choices)."""
    try:
        return parse_init_parts(args.init_parts or ())
    except ValueError as err:
        raise LoopscopeError(f"--init-parts: {err}") from err


def _chosen_init(args: argparse.Namespace, preset_init: str) -> str:
    """``--init``, else the preset's; ``--adapter-init-noise`` / ``--embed-init-std`` set the
    identity-adapter start, so alone they choose it, and with another ``--init`` they are
    refused."""
    tuned = [
        "--" + name.replace("_", "-")
        for name in ("adapter_init_noise", "embed_init_std")
        if getattr(args, name, None) is not None
    ]
    if args.init is None:
        return "identity-adapter" if tuned else preset_init
    if tuned and args.init != "identity-adapter":
        raise LoopscopeError(
            f"{' and '.join(tuned)} set the identity-adapter start, not --init {args.init}; "
            "drop them or pass --init identity-adapter"
        )
    return str(args.init)


def _cmd_trained(args: argparse.Namespace) -> int:
    from loopscope.studies.ablation.presets import trained_preset
    from loopscope.studies.ablation.sweeps import run_trained

    options: RunOptions = args.options
    preset = trained_preset(
        args.preset,
        seeds=args.seeds,
        block_sizes=args.block_sizes,
        norms=args.norms,
        injections=args.injections,
    )
    preset = replace(preset, init=_chosen_init(args, preset.init))
    if options.batch_size is not None:
        preset = replace(preset, train=replace(preset.train, batch_size=options.batch_size))
    if options.limit is not None:
        preset = replace(preset, prompts=min(preset.prompts, options.limit))
    run = run_trained(args.out, preset, device=options.device, progress=options.progress)
    print(
        f"trained ablation ({preset.name}): {len(run.results)} cells, "
        f"{len(run.computed)} computed now in {run.seconds:.1f} s"
    )
    print(f"tables: {run.table_md}, {run.table_csv}")
    if run.report is not None:
        print(f"report: {run.report.html}")
    return 0


def _add_sweep_options(
    p: argparse.ArgumentParser, blocks_help: str, presets: Sequence[str], presets_help: str
) -> None:
    p.add_argument("--out", required=True, help="output directory; a rerun resumes there")
    p.add_argument("--preset", choices=tuple(presets), default="quick", help=presets_help)
    p.add_argument("--seeds", type=int, help="number of seeds (0..N-1)")
    p.add_argument("--block-sizes", dest="block_sizes", nargs="+", type=int, help=blocks_help)
    p.add_argument("--norms", nargs="+", choices=NORM_SCHEMES, help="norm schemes to include")
    p.add_argument("--injections", nargs="+", choices=INJECTIONS, help="injections to include")
    p.add_argument(
        "--init",
        choices=INIT_CHOICES,
        help="weight init of every cell: family (Huginn's scaled init for the huginn sandwich, "
        "Ouro's for the ouro sandwich, the retrofit models' Llama-style init for pre/post-norm), "
        "one scheme for all cells, or identity-adapter (LoopLM's own (Z+X)/√2 adapter start; "
        "implied by --adapter-init-noise / --embed-init-std). Default: the preset's, family "
        "except random-init --preset paper, which starts every cell from Huginn's init so that "
        "only the norm and the injection vary",
    )


def _add_random_init_options(p: argparse.ArgumentParser) -> None:
    _add_sweep_options(
        p,
        "block sizes (default 4 12 16)",
        RANDOM_INIT_PRESET_NAMES,
        "quick: width 64, minutes on a CPU; paper: the study's width 512 and 128 recurrences",
    )
    p.add_argument(
        "--adapter-init-noise",
        type=float,
        help="identity-adapter init: σ of the noise on concat-linear adapters' (Z+X)/√2 start "
        "(default 0.02, which "
        "contracts only below width ≈ 215; c/√width with c < 0.29 contracts at any width)",
    )
    p.add_argument(
        "--recurrences",
        type=int,
        help="recurrences of every run (default: the preset's, 64 quick, 128 paper); a slowly "
        "converging cell is judged again at a longer run",
    )
    p.add_argument(
        "--init-parts",
        dest="init_parts",
        nargs="+",
        metavar="KIND=SCHEME",
        help="draw these weight kinds as another scheme does, on top of --init (kinds: "
        f"{', '.join(WEIGHT_KINDS)}; schemes: huginn, ouro, retrofit), e.g. --init retrofit "
        "--init-parts embedding=huginn: which part of an init decides a verdict",
    )
    p.add_argument(
        "--embed-init-std",
        type=float,
        help="identity-adapter init: σ of the token embeddings, which are Z0 = X here (default "
        "0.02, about 0.02× a normalised stream)",
    )


def _add_trained_options(p: argparse.ArgumentParser) -> None:
    _add_sweep_options(
        p,
        "looped block sizes (default 4 8 12)",
        TRAINED_PRESET_NAMES,
        "quick: width 64, 300 steps; cpu: width 96, 500 steps, about 2-3 hours on 2 cores; "
        "paper: the study's width 512 and 20k steps (meant for a GPU)",
    )


_SEEDS = "the cells' seeds are 0..N-1; choose N with --seeds"
_INTERRUPTED = "interrupted; finished cells are saved and a rerun resumes"

RANDOM_INIT = Command(
    "random-init",
    "untrained looped stacks: norm × injection × block size × seed → fixed-point verdicts",
    _add_random_init_options,
    _cmd_random_init,
    common=CommonFlags(
        batch_size=None,
        batch_size_help="prompts per forward pass",
        seed=None,
        seed_help="seed of the cells",
        limit_help="only the first N bundled prompts (default: the preset's)",
        builds_model=True,
        refuses={"batch_size": "every cell runs its prompts as one batch", "seed": _SEEDS},
    ),
    interrupted=_INTERRUPTED,
)
TRAINED = Command(
    "trained",
    "train the study's small looped models and a feedforward twin, then compare them",
    _add_trained_options,
    _cmd_trained,
    common=CommonFlags(
        batch_size=None,
        batch_size_help="training sequences per step (default: the preset's)",
        seed=None,
        seed_help="seed of the cells",
        limit_help="only the first N bundled prompts analysed (default: the preset's)",
        builds_model=True,
        refuses={"seed": _SEEDS, "dtype": "its models train and are analysed in float32"},
    ),
    interrupted=_INTERRUPTED,
)
ABLATE = Command(
    "ablate",
    "architecture ablation sweeps (resumable)",
    subcommands=(RANDOM_INIT, TRAINED),
    interrupted=_INTERRUPTED,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``loopscope ablate ...`` with the main CLI's error handling."""
    return run_cli((ABLATE,), argv)


if __name__ == "__main__":
    sys.exit(main())
