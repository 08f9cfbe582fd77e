"""``loopscope train`` (a named config on the synthetic reasoning task) and ``loopscope export``
(a trained checkpoint without optimizer state, with a model card)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from loopscope.cli.common import DTYPES, Command, CommonFlags, RunOptions, torch_dtype

if TYPE_CHECKING:
    from loopscope.families.looplm import LoopLM
    from loopscope.training.config import TrainConfig

__all__ = ["EXPORT", "TRAIN", "train_setup"]


def train_setup(args: argparse.Namespace, options: RunOptions) -> tuple[LoopLM, TrainConfig]:
    """The model (built in ``--dtype``) and the training config (``--steps``, ``--lr``,
    ``--batch-size`` and ``--seed`` over the named config's) that ``loopscope train`` runs."""
    from loopscope.families.looplm import LoopLM
    from loopscope.training.named_configs import get_config

    named = get_config(args.config)
    overrides = {"steps": args.steps, "lr": args.lr}
    overrides.update(batch_size=options.batch_size, seed=options.seed)
    cfg = replace(named.train, **{k: v for k, v in overrides.items() if v is not None})
    return LoopLM(named.model).to(dtype=options.build_dtype()), cfg


def _cmd_train(args: argparse.Namespace) -> int:
    from loopscope.training.loop import train

    options: RunOptions = args.options
    model, cfg = train_setup(args, options)
    out = Path(args.out or f"runs/{args.config}")
    print(f"training {args.config}: {model.num_parameters():,} parameters → {out}")
    result = train(model, cfg, out, device=options.device, progress=options.progress)
    last = result.history[-1] if result.history else {}
    print(f"done: {result.steps_done} steps; last evaluation {last}")
    return 0


def _add_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="a name from the registry, e.g. demo-looped")
    p.add_argument("--out", help="checkpoint directory (default runs/CONFIG); resumes if present")
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float)


def _cmd_export(args: argparse.Namespace) -> int:
    from loopscope.cli.evaluate import recurrence_list
    from loopscope.training.export import export_checkpoint

    card = export_checkpoint(
        args.source,
        args.destination,
        dtype=torch_dtype(args.dtype),
        eval_problems=args.eval_problems,
        recurrences=None if args.recurrences is None else recurrence_list(args.recurrences),
        command=args.train_command,
        train_seconds=args.train_seconds,
        progress=True,
    )
    print(
        f"exported {card['name']} ({card['size_bytes']} bytes): held-out loss "
        f"{card['held_out_loss']:.4f}, accuracy {card['held_out_accuracy']:.3f} ± "
        f"{card['held_out_accuracy_se']:.3f} on {card['held_out_problems']} problems"
    )
    return 0


def _add_export_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("source")
    p.add_argument("destination")
    p.add_argument("--dtype", choices=DTYPES, default="float16", help="dtype of the saved weights")
    p.add_argument(
        "--eval-problems", type=int, default=256, help="held-out problems the card measures"
    )
    p.add_argument(
        "--recurrences",
        default=None,
        help="comma-separated test-time recurrence counts for the card's accuracy curve "
        "(default 1,2,3,4,6,8,16,32 for a looped model, 1 for a feedforward one)",
    )
    p.add_argument("--train-command", default="", help="the command that trained it, for the card")
    p.add_argument(
        "--train-seconds",
        type=float,
        default=None,
        help="training wall time for the card, for a run that did not record it",
    )


TRAIN = Command(
    "train",
    "train a named config on the synthetic reasoning task",
    _add_train_options,
    _cmd_train,
    common=CommonFlags(
        batch_size=None,
        batch_size_help="training sequences per step (default: the config's)",
        seed=None,
        seed_help="seed of the training data and recurrence sampling (default: the config's)",
        builds_model=True,
        refuses={"limit": "it trains on generated problems; set how many with --steps"},
    ),
)
EXPORT = Command(
    "export",
    "export a trained checkpoint (no optimizer) + model card",
    _add_export_options,
    _cmd_export,
)
