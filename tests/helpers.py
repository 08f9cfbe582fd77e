"""Helpers the test files share: where things live in the repository, a tiny looped model
configuration, seeded prompt sets and edited copies of the reference checkpoints.

Plain functions live here (importable from any test folder, since pytest puts ``tests/`` on the
path); pytest fixtures built on them live in ``conftest.py``."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from loopscope.families.looplm import LoopConfig
from loopscope.trace.settings import PromptInput

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCE_PACKAGE = REPO_ROOT / "src" / "loopscope"
FIXTURES = REPO_ROOT / "tests" / "fixtures"
DEMO_PROMPTS = SOURCE_PACKAGE / "assets" / "prompts" / "demo.jsonl"

TINY_TRACE_CONFIG = LoopConfig(
    name="tiny-trace",
    vocab_size=259,
    d_model=16,
    n_heads=2,
    prelude_layers=1,
    block_layers=2,
    coda_layers=1,
    train_recurrences=3,
    context_length=24,
    injection="concat-linear",
    norm_scheme="huginn",
)
"""The looped model the trace and measurement tests run: every part of the engine in use
(prelude, a two-layer block, coda, an injection, the sandwich norm), small enough to trace in
milliseconds."""


def tiny_trace_config(**changes: Any) -> LoopConfig:
    """``TINY_TRACE_CONFIG`` with some fields changed."""
    return replace(TINY_TRACE_CONFIG, **changes)


def random_prompts(count: int, seed: int, first_length: int = 5) -> list[PromptInput]:
    """``count`` prompts of random byte ids, the i-th ``first_length + i`` tokens long, so
    that no two prompts share a length."""
    generator = torch.Generator().manual_seed(seed)
    return [
        PromptInput(
            f"prompt {i}",
            torch.randint(0, 256, (first_length + i,), generator=generator).tolist(),
        )
        for i in range(count)
    ]


def quiet(_: str) -> None:
    """A log callback that prints nothing."""


def made_with_this_torch(fixture: Path) -> bool:
    """Torch's CPU random streams differ between releases, so a seeded draw can only be compared
    bit for bit with the reference's draw under the torch version that made the fixture."""
    made_with = json.loads((fixture / "reference.json").read_text())["torch"]
    return bool(made_with.split("+")[0] == torch.__version__.split("+")[0])


def edited_checkpoint(
    source: Path,
    tmp: Path,
    edit: Callable[[dict[str, torch.Tensor]], object],
    config_change: dict[str, Any] | None = None,
    prefix: str = "checkpoint",
) -> Path:
    """A fresh copy of the checkpoint directory ``source`` under ``tmp``, with its tensors passed
    through ``edit`` (which changes the dict in place) and its config fields updated by
    ``config_change``; nothing else of ``source`` is copied."""
    out = tmp / f"{prefix}-{len(list(tmp.iterdir()))}"
    out.mkdir()
    config = {**json.loads((source / "config.json").read_text()), **(config_change or {})}
    (out / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(source / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(out / "model.safetensors"))
    return out
