"""Export a trained checkpoint for shipping: weights without optimizer state, cast to a small
dtype, evaluated again on held-out problems, with a model card saying how it was made."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from loopscope.core import atomic
from loopscope.core.errors import CheckpointError
from loopscope.families.looplm import load_looplm


def export_checkpoint(
    source: str | Path,
    destination: str | Path,
    *,
    dtype: torch.dtype = torch.float16,
    eval_problems: int = 256,
    recurrences: Sequence[int] | None = None,
    command: str = "",
    train_seconds: float | None = None,
    progress: bool = False,
) -> dict[str, object]:
    """Copy a trained checkpoint without optimizer state, weights cast to ``dtype`` (small
    enough to ship), then evaluate the exported weights on held-out problems and write a model
    card (``MODEL_CARD.md``, ``card.json`` and the accuracy figure) saying how it was made and
    how well it does at each test-time recurrence count (``recurrences``; default
    :data:`~loopscope.training.held_out.CARD_RECURRENCES` for a looped model, one count for a
    feedforward one). ``train_seconds`` stands in for a run that did not record its wall time."""
    from dataclasses import replace

    from loopscope.training.checkpoints import recorded_train_seconds, save_checkpoint
    from loopscope.training.config import TrainConfig
    from loopscope.training.evaluation import evaluate
    from loopscope.training.held_out import (
        CARD_RECURRENCES,
        held_out_accuracy,
        held_out_problems,
        plot_held_out,
    )

    src, dst = Path(source), Path(destination)
    missing = [n for n in ("train_config.json", "trainer_state.json") if not (src / n).exists()]
    if missing:
        raise CheckpointError(
            f"{src} has no {' or '.join(missing)}, so it is not a training directory: export "
            "takes the --out directory of `loopscope train`"
        )
    if eval_problems < 1:
        raise CheckpointError(f"--eval-problems must be ≥ 1, got {eval_problems}")
    model = load_looplm(src)
    train_cfg = TrainConfig.from_dict(json.loads((src / "train_config.json").read_text()))
    state = json.loads((src / "trainer_state.json").read_text())
    save_checkpoint(dst, model, train_cfg, dtype=dtype)
    exported = load_looplm(dst)
    loss = evaluate(exported, replace(train_cfg, eval_problems=eval_problems, accuracy_problems=0))[
        "eval_loss"
    ]
    counts = recurrences or ((1,) if exported.config.is_feedforward else CARD_RECURRENCES)
    accuracy = held_out_accuracy(
        exported, held_out_problems(train_cfg, eval_problems), counts, progress=progress
    )
    size = (dst / "model.safetensors").stat().st_size
    seconds = recorded_train_seconds(src) if train_seconds is None else train_seconds
    card: dict[str, object] = {
        "name": exported.config.name,
        "layout": exported.meta.layout,
        "parameters": exported.num_parameters(),
        "steps": state["step"],
        "train_seed": train_cfg.seed,
        "eval_seed": train_cfg.eval_seed,
        "train_recurrences": exported.meta.train_recurrences,
        "recurrence_sampling": train_cfg.recurrence_sampling,
        "problem_steps": [train_cfg.min_problem_steps, train_cfg.max_problem_steps],
        "context_length": exported.meta.context_length,
        "held_out_loss": loss,
        **accuracy.to_card(),
        "weights_dtype": str(dtype).removeprefix("torch."),
        "size_bytes": size,
        "command": command,
        "train_seconds": seconds,
        "torch": torch.__version__,
        "history": state["history"],
    }
    atomic.write_json(dst / "card.json", card)
    atomic.write_text(dst / "MODEL_CARD.md", _card_markdown(card))
    figure = plot_held_out(card)
    atomic.write_with(dst / CARD_FIGURE, lambda name: figure.savefig(name, dpi=100, format="png"))
    return card


def _recurrence_text(card: dict[str, object]) -> str:
    """How the card's model was run during training, in words."""
    count = card["train_recurrences"]
    if count == 1:
        return "no recurrence"
    if card["recurrence_sampling"] == "constant":
        return f"a constant {count} recurrences"
    return f"recurrences sampled ({card['recurrence_sampling']}) around a mean of {count}"


#: The card's accuracy-against-recurrences figure, next to its weights.
CARD_FIGURE = "accuracy_vs_recurrences.png"


def _card_markdown(card: dict[str, object]) -> str:
    curve = card["accuracy_vs_recurrences"]
    assert isinstance(curve, dict)
    rows = "".join(
        f"| {r} | {100 * p['accuracy']:.1f}% ± {100 * p['se']:.1f} |\n" for r, p in curve.items()
    )
    seconds = card["train_seconds"]
    wall = f"{float(str(seconds)) / 60:.0f} minutes" if seconds is not None else "not recorded"
    return (
        f"# {card['name']}\n\n"
        f"Layout {card['layout']}, {card['parameters']:,} parameters, weights stored as "
        f"{card['weights_dtype']} ({int(str(card['size_bytes'])) / 1e6:.2f} MB), context "
        f"{card['context_length']} bytes.\n\n"
        f"Trained with loopscope's own command:\n\n    {card['command']}\n\n"
        f"for {card['steps']} steps (training data seed {card['train_seed']}, "
        f"{_recurrence_text(card)}, wall time {wall}), then exported.\n\n"
        f"Held-out evaluation of the exported weights on {card['held_out_problems']} synthetic "
        f"problems (evaluation seed {card['eval_seed']}, never trained on): loss "
        f"{float(str(card['held_out_loss'])):.4f} nats/byte, exact-answer accuracy "
        f"{100 * float(str(card['held_out_accuracy'])):.1f}% ± "
        f"{100 * float(str(card['held_out_accuracy_se'])):.1f} (binomial standard error; "
        f"greedy decoding at {card['held_out_recurrences']} recurrences).\n\n"
        "| recurrences | accuracy ± s.e. |\n|---|---|\n" + rows + "\n"
        f"![accuracy against recurrences]({CARD_FIGURE})\n\n"
        f"torch {card['torch']}.\n"
    )
