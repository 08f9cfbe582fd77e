"""Which tokenizer turns prompt text into ids for a given model: our byte tokenizer for our own
models, the checkpoint's own tokenizer (transformers' AutoTokenizer, local files only) for
published ones. The name and whether a BOS token was prepended go into the trace header."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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


def _is_looplm_dir(directory: Path) -> bool:
    from loopscope.checkpoint import read_config

    if not (directory / "config.json").exists():
        return False
    _, data = read_config(directory, "a model")
    return "block_layers" in data and "norm_scheme" in data


def tokenizer_for(source: str | Path) -> PromptTokenizer:
    """The tokenizer that belongs to ``source`` (anything ``loopscope.load`` accepts)."""
    from loopscope import _directory_of
    from loopscope.checkpoint import BUNDLED, CheckpointError

    if str(source) in BUNDLED:
        return byte_tokenizer()
    directory = _directory_of(str(source))
    if _is_looplm_dir(directory):
        return byte_tokenizer()
    if not any((directory / name).exists() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{directory} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy the "
            "model's tokenizer next to its weights"
        )
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise CheckpointError(
            f"{directory} needs its own tokenizer, which needs the hf extra: "
            "pip install 'loopscope[hf]'"
        ) from None
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    probe = tokenizer("a")["input_ids"]
    bos_id = tokenizer.bos_token_id
    adds_bos = bos_id is not None and bool(probe) and probe[0] == bos_id
    name = f"{type(tokenizer).__name__}:{directory.name}"
    return PromptTokenizer(name, adds_bos, lambda text: list(tokenizer(text)["input_ids"]))
