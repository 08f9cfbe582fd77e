"""Export a trained checkpoint for shipping: weights without optimizer state, cast to a small
dtype, evaluated again on held-out problems, with a model card saying how it was made."""

from __future__ import annotations

import json
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
    eval_problems: int = 64,
    command: str = "",
) -> dict[str, object]:
    """Copy a trained checkpoint without optimizer state, weights cast to ``dtype`` (small
    enough to ship), then evaluate the exported weights on held-out problems and write a model
    card (``MODEL_CARD.md`` + ``card.json``) saying how it was made and how well it does."""
    from dataclasses import replace

    from loopscope.training.checkpoints import save_checkpoint
    from loopscope.training.config import TrainConfig
    from loopscope.training.evaluation import evaluate

    src, dst = Path(source), Path(destination)
    missing = [n for n in ("train_config.json", "trainer_state.json") if not (src / n).exists()]
    if missing:
        raise CheckpointError(
            f"{src} has no {' or '.join(missing)}, so it is not a training directory: export "
            "takes the --out directory of `loopscope train`"
        )
    model = load_looplm(src)
    train_cfg = TrainConfig.from_dict(json.loads((src / "train_config.json").read_text()))
    state = json.loads((src / "trainer_state.json").read_text())
    save_checkpoint(dst, model, train_cfg, dtype=dtype)
    exported = load_looplm(dst)
    held_out = evaluate(
        exported, replace(train_cfg, eval_problems=eval_problems, accuracy_problems=eval_problems)
    )
    size = (dst / "model.safetensors").stat().st_size
    card: dict[str, object] = {
        "name": exported.config.name,
        "layout": exported.meta.layout,
        "parameters": exported.num_parameters(),
        "steps": state["step"],
        "train_seed": train_cfg.seed,
        "eval_seed": train_cfg.eval_seed,
        "held_out_problems": eval_problems,
        "held_out_loss": held_out["eval_loss"],
        "held_out_accuracy": held_out["eval_accuracy"],
        "weights_dtype": str(dtype).removeprefix("torch."),
        "size_bytes": size,
        "command": command,
        "torch": torch.__version__,
        "history": state["history"],
    }
    atomic.write_json(dst / "card.json", card)
    atomic.write_text(dst / "MODEL_CARD.md", _card_markdown(card))
    return card


def _card_markdown(card: dict[str, object]) -> str:
    return (
        f"# {card['name']}\n\n"
        f"Layout {card['layout']}, {card['parameters']:,} parameters, weights stored as "
        f"{card['weights_dtype']} ({int(str(card['size_bytes'])) / 1e6:.2f} MB).\n\n"
        f"Trained with loopscope's own command:\n\n    {card['command']}\n\n"
        f"for {card['steps']} steps (training data seed {card['train_seed']}), then exported.\n\n"
        f"Held-out evaluation of the exported weights on {card['held_out_problems']} synthetic "
        f"problems (evaluation seed {card['eval_seed']}, never trained on): loss "
        f"{float(str(card['held_out_loss'])):.4f} nats/byte, exact-answer accuracy "
        f"{100 * float(str(card['held_out_accuracy'])):.1f}% (greedy decoding).\n\n"
        f"torch {card['torch']}.\n"
    )
