"""Text → ids for a model: our byte tokenizer for our own models, the checkpoint's own
tokenizer (through the Hugging Face gate: local files only, no remote code) for published
ones. The name and whether a BOS token was prepended go into the trace header."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from loopscope.core.errors import CheckpointError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class PromptTokenizer:
    """Text → ids for one model family, with the facts a trace records."""

    name: str
    bos: bool
    encode: Callable[[str], list[int]]


class TextTokenizer(Protocol):
    """What tracing needs of a tokenizer: a name and BOS flag for the trace header, and
    ``encode``. Both :class:`PromptTokenizer` and :class:`DeferredTokenizer` are one."""

    @property
    def name(self) -> str: ...

    @property
    def bos(self) -> bool: ...

    def encode(self, text: str) -> list[int]: ...


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


class DeferredTokenizer:
    """A checkpoint's own tokenizer, read from ``directory`` on first use: reading it imports
    the Hugging Face libraries, which a model loaded only to run on ids never needs, and a
    checkpoint without tokenizer files is refused only when its tokenizer is asked for."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @cached_property
    def resolved(self) -> PromptTokenizer:
        return checkpoint_tokenizer(self.directory)

    @property
    def name(self) -> str:
        return self.resolved.name

    @property
    def bos(self) -> bool:
        return self.resolved.bos

    def encode(self, text: str) -> list[int]:
        return self.resolved.encode(text)


#: The attribute ``loopscope.load`` sets on every model it returns (``model.tokenizer`` stays
#: what a Hugging Face family puts there: the library's own tokenizer object).
TOKENIZER_ATTRIBUTE = "prompt_tokenizer"


def attach_tokenizer(model: Any, tokenizer: TextTokenizer) -> None:
    """Keep ``tokenizer`` on ``model`` so whoever is handed the model tokenises as it must."""
    setattr(model, TOKENIZER_ATTRIBUTE, tokenizer)


def model_tokenizer(model: Any) -> TextTokenizer:
    """The tokenizer ``loopscope.load`` attached to ``model``; our byte tokenizer for a model
    built in Python (our own families use it)."""
    attached: TextTokenizer | None = getattr(model, TOKENIZER_ATTRIBUTE, None)
    return attached if attached is not None else byte_tokenizer()


def tokenizer_or_bytes(model: Any) -> TextTokenizer:
    """:func:`model_tokenizer`, or the byte tokenizer when the checkpoint ships none: what
    records how prompts given as ids were made (they were never tokenised here)."""
    tokenizer = model_tokenizer(model)
    try:
        tokenizer.bos  # noqa: B018 - reads a deferred tokenizer's files
    except CheckpointError:
        return byte_tokenizer()
    return tokenizer
