"""loopscope: take looped (recurrent-depth) language models apart.

``loopscope.load(source)`` returns a model of any supported family; calling it with
``model(input_ids, recurrences=R, init_state=..., seed=S)`` returns an output with ``.logits``.

The package is layered in the order data flows, each folder importing only from the folders
before it: ``core`` → ``nn``, ``data`` → ``engine`` → ``families`` → ``analysis`` → ``trace`` →
``report`` → ``pipeline`` → ``training`` → ``studies`` → ``cli``. ``docs/DESIGN.md`` in the
repository describes each layer. Importing ``loopscope`` itself loads none of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"

__all__ = ["load", "open_analysis", "open_trace", "__version__"]

#: Notebook entry points offered at the top level for convenience. They live in
#: ``loopscope.pipeline`` (above the analysis and trace layers, which themselves call
#: ``loopscope.load``), so the root resolves them on first use by name instead of importing
#: upward; ``tests/test_layout.py`` checks that this table names only pipeline functions.
FACADE: dict[str, str] = {"open_trace": "loopscope.pipeline", "open_analysis": "loopscope.pipeline"}


def __getattr__(name: str) -> Any:
    """``loopscope.open_trace`` and ``loopscope.open_analysis``, resolved on first use."""
    if name in FACADE:
        import importlib

        return getattr(importlib.import_module(FACADE[name]), name)
    raise AttributeError(f"module 'loopscope' has no attribute {name!r}")


def load(source: str | Path, *, dtype: Any = None, device: str = "cpu", **kwargs: Any) -> Any:
    """Load a model of any family: ``"demo"`` / ``"demo-feedforward"`` (bundled), a local
    checkpoint directory, or a hub id already in the local cache. The family is detected from
    ``config.json`` by the table in ``loopscope.families.table``; weights are read from
    safetensors only and no code shipped with a checkpoint ever runs. Extra keyword arguments
    go to the family loader (e.g. ``loop=(a, b)`` and ``recurrences`` for a retrofitted Hugging
    Face decoder); a family that cannot use one refuses it by name. The model keeps the
    tokenizer of its checkpoint as ``model.prompt_tokenizer`` (the byte tokenizer for our own
    models; a published checkpoint's own, read on first use), so every pipeline entry point
    handed the model object tokenises prompts as the model expects."""
    from loopscope.families.table import load as load_family

    return load_family(source, dtype=dtype, device=device, **kwargs)
