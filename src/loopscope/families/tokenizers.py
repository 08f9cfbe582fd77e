"""Text → ids for a model: our byte tokenizer for our own models, the checkpoint's own
tokenizer (through the Hugging Face gate: local files only, no remote code) for published
ones. The name and whether a BOS token was prepended go into the trace header."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loopscope.core.errors import CheckpointError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class PromptTokenizer:
    """Text → ids for one model family, with the facts a trace records."""

    name: str
    bos: bool
    encode: Callable[[str], list[int]]


def byte_tokenizer() -> PromptTokenizer:
    from loopscope.data import ByteTokenizer

    tokenizer = ByteTokenizer()
    return PromptTokenizer("byte", True, lambda text: tokenizer.encode(text, bos=True))


def checkpoint_tokenizer(directory: Path) -> PromptTokenizer:
    """The tokenizer shipped in ``directory``, with whether it prepends BOS."""
    from loopscope.families.hub import auto_tokenizer

    if not any((directory / name).exists() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{directory} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy the "
            "model's tokenizer next to its weights"
        )
    tokenizer = auto_tokenizer(directory)
    probe = tokenizer("a")["input_ids"]
    bos_id = tokenizer.bos_token_id
    adds_bos = bos_id is not None and bool(probe) and probe[0] == bos_id
    name = f"{type(tokenizer).__name__}:{directory.name}"
    return PromptTokenizer(name, adds_bos, lambda text: list(tokenizer(text)["input_ids"]))
