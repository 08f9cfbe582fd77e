"""The ``loopscope`` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

Handler = Callable[[argparse.Namespace], int]


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from loopscope.families.looplm import LoopLM
    from loopscope.training.loop import train
    from loopscope.training.named_configs import get_config

    named = get_config(args.config)
    cfg = named.train
    overrides = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "seed")}
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if args.threads:
        torch.set_num_threads(args.threads)
    model = LoopLM(named.model)
    out = Path(args.out or f"runs/{args.config}")
    print(f"training {args.config}: {model.num_parameters():,} parameters → {out}")
    result = train(model, cfg, out, device=args.device, progress=not args.no_progress)
    last = result.history[-1] if result.history else {}
    print(f"done: {result.steps_done} steps; last evaluation {last}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from loopscope.studies.demo import run_demo

    return run_demo(Path(args.out), recurrences=args.recurrences, quick=args.quick)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a named config on the synthetic reasoning task")
    p.add_argument("--config", required=True, help="a name from the registry, e.g. demo-looped")
    p.add_argument("--out", help="checkpoint directory (default runs/CONFIG); resumes if present")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_cmd_train)


def _cmd_export(args: argparse.Namespace) -> int:
    import torch

    from loopscope.training.export import export_checkpoint

    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    card = export_checkpoint(
        args.source,
        args.destination,
        dtype=dtype[args.dtype],
        eval_problems=args.eval_problems,
        command=args.train_command,
    )
    print(
        f"exported {card['name']} ({card['size_bytes']} bytes): held-out loss "
        f"{card['held_out_loss']:.4f}, accuracy {card['held_out_accuracy']:.3f}"
    )
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a trained checkpoint (no optimizer) + model card")
    p.add_argument("source")
    p.add_argument("destination")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    p.add_argument("--eval-problems", type=int, default=64)
    p.add_argument("--train-command", default="", help="the command that trained it, for the card")
    p.set_defaults(handler=_cmd_export)


def _cmd_adaptive(args: argparse.Namespace) -> int:
    from loopscope.studies.adaptive import run_adaptive_cli

    return run_adaptive_cli(
        args.model,
        args.prompts,
        args.out,
        args.recurrences,
        device=args.device,
        batch_size=args.batch_size,
    )


def _add_adaptive(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "adaptive", help="per-token exit criteria: recurrences used vs agreement with full depth"
    )
    p.add_argument("model")
    p.add_argument("--prompts", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--recurrences", type=int, default=64, help="full depth to compare against")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.set_defaults(handler=_cmd_adaptive)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on the bundled models and prompts")
    p.add_argument("--out", default="loopscope-demo", help="output directory for the report")
    p.add_argument("--recurrences", type=int, default=64, help="long-run recurrences")
    p.add_argument("--quick", action="store_true", help="fewer prompts and recurrences")
    p.set_defaults(handler=_cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loopscope", description="Take looped (recurrent-depth) language models apart."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_export, _add_adaptive, _add_demo):
        add(sub)
    from loopscope.cli.ablate import add_ablate_command
    from loopscope.cli.analysis import add_analysis_commands
    from loopscope.cli.stages import add_stages_command

    add_analysis_commands(sub)
    add_stages_command(sub)
    add_ablate_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("interrupted; finished work is saved and a rerun resumes", file=sys.stderr)
        return 130
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"loopscope {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
