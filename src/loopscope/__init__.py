"""loopscope: take looped (recurrent-depth) language models apart.

``loopscope.load(source)`` returns a model of any supported family; calling it with
``model(input_ids, recurrences=R, init_state=..., seed=S)`` returns an output with ``.logits``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"

__all__ = ["load", "__version__"]


def _directory_of(source: str) -> Path:
    """A local directory, or a hub id resolved in the local Hugging Face cache (never online)."""
    from loopscope.checkpoint import CheckpointError

    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if source.count("/") == 1 and not path.exists():
        from loopscope.families.hf import resolve_hf_directory

        try:
            return resolve_hf_directory(source)
        except ImportError:
            raise CheckpointError(
                f"{source!r} looks like a hub id; resolving it in the local Hugging Face cache "
                "needs the hf extra: pip install 'loopscope[hf]'"
            ) from None
    raise CheckpointError(
        f"cannot load {source!r}: not a bundled model (demo, demo-feedforward), not a local "
        "directory and not a hub id like 'org/name'"
    )


def load(source: str | Path, *, dtype: Any = None, device: str = "cpu", **kwargs: Any) -> Any:
    """Load a model of any family: ``"demo"`` / ``"demo-feedforward"`` (bundled), a local
    checkpoint directory, or a hub id already in the local cache. The family is detected from
    ``config.json``; weights are read from safetensors only and no code shipped with a
    checkpoint ever runs. Extra keyword arguments go to the family loader (e.g. ``loop=(a, b)``
    and ``recurrences`` for a retrofitted Hugging Face decoder)."""
    import torch

    from loopscope.checkpoint import (
        BUNDLED,
        CheckpointError,
        bundled_model_dir,
        load_looplm,
        read_config,
    )

    dtype = dtype or torch.float32
    name = str(source)
    if name in BUNDLED:
        return load_looplm(bundled_model_dir(name), dtype=dtype, device=device)
    directory = _directory_of(name)
    config_path, config = read_config(directory, "a model")
    from loopscope.families.raven import is_raven_config, load_raven

    if is_raven_config(config):
        return load_raven(directory, dtype=dtype, device=device)
    from loopscope.families.ouro import is_ouro_config, load_ouro
    from loopscope.families.parcae import is_parcae_config, load_parcae

    if is_ouro_config(config):
        return load_ouro(directory, dtype=dtype, device=device)
    if is_parcae_config(config):
        return load_parcae(directory, dtype=dtype, device=device)
    if "block_layers" in config and "norm_scheme" in config:
        return load_looplm(directory, dtype=dtype, device=device)
    from loopscope.families.hf import is_hf_decoder_config

    if is_hf_decoder_config(config):
        from loopscope.families.hf import load_hf

        return load_hf(directory, dtype=dtype, device=device, **kwargs)
    raise CheckpointError(
        f"{config_path}: unknown model family (model_type {config.get('model_type')!r}); "
        "supported: loopscope LoopLM, raven (Huginn-0125 and the retrofitted-recurrence "
        "models), ouro (Ouro-1.4B/2.6B), parcae (SandyResearch/parcae-*), Hugging Face "
        "decoders (llama, mistral, qwen2, qwen3, olmo2, gpt2, "
        "inkling2_loop)"
    )
