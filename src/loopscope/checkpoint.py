"""Loading checkpoints safely: safetensors only (never pickle, never code shipped with weights),
with errors that list exactly which tensors are missing, unexpected or mis-shaped."""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from loopscope.families.looplm import LoopConfig, LoopLM

PICKLE_NAMES = ("pytorch_model.bin", "model.pt", "model.pth", "consolidated.00.pth")
BUNDLED = {
    "demo": "demo-looped",
    "demo-looped": "demo-looped",
    "demo-feedforward": "demo-feedforward",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked, with what to do about it."""


def read_config(directory: str | Path, what: str) -> tuple[Path, dict[str, Any]]:
    """``directory/config.json`` parsed: (its path, its object). Every loader starts here, so
    a missing, malformed or non-object config.json gets one clear error naming the file;
    ``what`` completes "is this ... checkpoint directory?" (e.g. "a raven")."""
    config_path = Path(directory) / "config.json"
    if not config_path.exists():
        raise CheckpointError(
            f"{Path(directory)} has no config.json; is this {what} checkpoint directory?"
        )
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{config_path} is not valid JSON (line {err.lineno}, column {err.colno}: "
            f"{err.msg}); repair it or copy the checkpoint's config.json again"
        ) from None
    if not isinstance(raw, dict):
        raise CheckpointError(
            f"{config_path} must hold a JSON object of config fields, got {type(raw).__name__}"
        )
    return config_path, raw


def bundled_model_dir(name: str) -> Path:
    """Directory of a model shipped inside the package."""
    folder = BUNDLED[name]
    return Path(str(resources.files("loopscope") / "assets" / "models" / folder))


def weight_files(directory: Path) -> list[Path]:
    """The checkpoint's safetensors files: those the shard index names, else every one present.
    A directory with only pickle files is refused: unpickling can run arbitrary code."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({directory / f for f in weight_map.values()})
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise CheckpointError(f"{index} names shards that are not there: {', '.join(absent)}")
        return files
    files = sorted(f for f in directory.glob("*.safetensors") if f.name != "optimizer.safetensors")
    if files:
        return files
    pickles = sorted(
        {n for n in PICKLE_NAMES if (directory / n).exists()}
        | {f.name for pattern in ("*.bin", "*.pt", "*.pth") for f in directory.glob(pattern)}
    )
    if pickles:
        raise CheckpointError(
            f"{directory} holds only pickle-format weights ({', '.join(pickles)}); loopscope never "
            "unpickles checkpoints because unpickling can run arbitrary code. Convert them once "
            "with safetensors (e.g. `safetensors.torch.save_file(torch.load(path, "
            "weights_only=True), 'model.safetensors')`) and load the directory again"
        )
    raise CheckpointError(f"{directory} contains no *.safetensors weights")


def read_tensors(
    source: Path | Sequence[Path],
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    *,
    exact: Collection[str] = (),
) -> dict[str, Tensor]:
    """Every tensor of a checkpoint directory (or of the given files), cast to ``dtype`` one at
    a time as it is read, so a bf16 load never holds an fp32 copy. Tensors named in ``exact``
    are copied uncast: a view into the memory map would keep its whole shard resident."""
    files = weight_files(source) if isinstance(source, Path) else list(source)
    tensors: dict[str, Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device=str(device)) as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensor = handle.get_tensor(key)
                if key in exact:
                    tensor = tensor.clone()
                elif dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                tensors[key] = tensor
    return tensors


def check_tensors(expected: dict[str, torch.Size], found: dict[str, Tensor], source: str) -> None:
    """Raise one error naming every missing, unexpected and mis-shaped tensor."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k])}"
        for k in set(expected) & set(found)
        if tuple(found[k].shape) != tuple(expected[k])
    )
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {', '.join(unexpected)}")
        if misshaped:
            parts.append(f"mis-shaped tensors: {'; '.join(misshaped)}")
        raise CheckpointError(
            f"{source} does not match its config.json — "
            + " | ".join(parts)
            + ". Check that config.json belongs to these weights."
        )


def expected_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    """Parameter names and shapes, one name per shared (tied) tensor."""
    seen: set[int] = set()
    shapes: dict[str, torch.Size] = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        shapes[name] = tensor.shape
    return shapes


def load_looplm(
    directory: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> LoopLM:
    """Load one of our checkpoints (``config.json`` + ``model.safetensors``)."""
    path = Path(directory)
    config_path, raw = read_config(path, "a loopscope")
    try:
        config = LoopConfig.from_dict(raw)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{config_path}: {err}") from err
    model = LoopLM(config)
    tensors = read_tensors(path, dtype=torch.float32)
    check_tensors(expected_shapes(model), tensors, str(path))
    model.load_state_dict(tensors, strict=False)
    model.eval()
    return model.to(device=device, dtype=dtype)


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

    from loopscope.evaluation import evaluate
    from loopscope.training import TrainConfig, save_checkpoint

    src, dst = Path(source), Path(destination)
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
    (dst / "card.json").write_text(json.dumps(card, indent=2))
    (dst / "MODEL_CARD.md").write_text(_card_markdown(card))
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
