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

from loopscope.core.errors import CheckpointError

PICKLE_NAMES = ("pytorch_model.bin", "model.pt", "model.pth", "consolidated.00.pth")
BUNDLED = {
    "demo": "demo-looped",
    "demo-looped": "demo-looped",
    "demo-feedforward": "demo-feedforward",
}


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
