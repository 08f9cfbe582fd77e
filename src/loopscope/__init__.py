"""loopscope: take looped (recurrent-depth) language models apart.

``loopscope.load(source)`` returns a model of any supported family; calling it with
``model(input_ids, recurrences=R, init_state=..., seed=S)`` returns an output with ``.logits``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"

__all__ = ["load", "__version__"]


def load(source: str | Path, *, dtype: Any = None, device: str = "cpu") -> Any:
    """Load a model: ``"demo"`` / ``"demo-feedforward"`` (bundled), or a local checkpoint
    directory. Weights are read from safetensors only."""
    import torch

    from loopscope.checkpoint import BUNDLED, CheckpointError, bundled_model_dir, load_looplm

    dtype = dtype or torch.float32
    name = str(source)
    if name in BUNDLED:
        return load_looplm(bundled_model_dir(name), dtype=dtype, device=device)
    path = Path(name).expanduser()
    if path.is_dir():
        return load_looplm(path, dtype=dtype, device=device)
    raise CheckpointError(
        f"cannot load {name!r}: not a bundled model ({', '.join(sorted(BUNDLED))}) and not a "
        "local directory"
    )
