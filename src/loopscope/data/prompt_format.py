"""How a prompt record becomes the exact text and ids a model is traced on.

Two formats (``--format``):

- ``raw``: the documented plain layout for models without a chat template (our byte-level
  ones): the system prompt, a blank line, then the prompt as the file gives it
  (``"Q: <question>\\nA:"`` for GSM8K). With no system prompt this is the prompt alone, exactly
  what loopscope always traced. The ids are the tokenizer's encoding of that text, with the
  BOS it adds.
- ``chat``: the checkpoint's own chat template, given a system message (when there is one)
  and the prompt's bare content as the user message, with the generation prompt added. The ids
  are the tokenizer's encoding of the rendered text without added special tokens (the
  template writes its own), which is how a chat model sees its input.

A padded system prompt (``long-persona-padded``) keeps the length of its text and drops its
content: the text is measured in tokens (without special tokens) and replaced by that many pad
ids. The rendered text shows the pad token's text in its place; for the byte tokenizer the pad
token is id 256, written ``<pad>``.

This module is pure: the tokenizer arrives as a :class:`PromptCodec` (built for a checkpoint by
``loopscope.families.chat``), so nothing here reads a checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from loopscope.core.errors import LoopscopeError
from loopscope.data.loaders import PromptRecord, load_prompt_records
from loopscope.data.sampling import sample_items
from loopscope.data.system_prompts import SystemPrompt, variant

__all__ = [
    "FORMATS",
    "FormatError",
    "PromptCodec",
    "PromptProtocol",
    "RenderedPrompt",
    "byte_codec",
    "chosen_format",
    "plain_layout",
    "prepare_prompts",
    "protocol_record",
    "render_prompt",
    "render_prompts",
    "system_ids",
]

FORMATS = ("raw", "chat")
#: Stands in for a padded system prompt while the layout is rendered; never reaches a model.
_MARKER = "\u2063loopscope-system-prompt\u2063"

Messages = list[dict[str, str]]


class FormatError(LoopscopeError):
    """A prompt that cannot be rendered as asked (no chat template, no pad token...)."""


@dataclass(frozen=True)
class PromptCodec:
    """What rendering needs from a tokenizer.

    ``encode`` adds the tokenizer's own special tokens (its BOS), ``encode_plain`` adds none;
    ``pad_id``/``pad_text`` are the pad token (None when it has none); ``chat_template`` is the
    template's source (None when it has none) and ``render_chat`` renders a message list with
    it, the generation prompt added."""

    name: str
    encode: Callable[[str], list[int]]
    encode_plain: Callable[[str], list[int]]
    pad_id: int | None
    pad_text: str | None
    chat_template: str | None = None
    render_chat: Callable[[Messages], str] | None = None


@dataclass(frozen=True)
class RenderedPrompt:
    """One prompt as the model gets it: the file line it came from, the exact rendered text
    (pad runs shown as the pad token's text) and the ids."""

    line: int
    text: str
    ids: list[int]


def byte_codec() -> PromptCodec:
    """Our byte tokenizer: BOS prepended by ``encode``, pad id 256 written ``<pad>``, no chat
    template."""
    from loopscope.data.tokenizer import ByteTokenizer

    tokenizer = ByteTokenizer()
    return PromptCodec(
        name="byte",
        encode=lambda text: tokenizer.encode(text, bos=True),
        encode_plain=lambda text: tokenizer.encode(text, bos=False),
        pad_id=tokenizer.pad_id,
        pad_text="<pad>",
    )


def chosen_format(requested: str | None, codec: PromptCodec) -> str:
    """``--format``: the one asked for, else ``chat`` when the tokenizer has a template and
    ``raw`` when it has none."""
    if requested is None:
        return "chat" if codec.chat_template else "raw"
    if requested not in FORMATS:
        raise FormatError(f"--format must be one of {', '.join(FORMATS)}, got {requested!r}")
    if requested == "chat" and codec.render_chat is None:
        raise FormatError(
            f"--format chat: the tokenizer {codec.name} has no chat template; use --format raw "
            "(the plain layout: system prompt, blank line, question)"
        )
    return requested


def plain_layout(prompt: str, system: str | None) -> str:
    """The raw layout: ``system``, a blank line, then ``prompt``; ``prompt`` alone without a
    system prompt."""
    return prompt if system is None else f"{system}\n\n{prompt}"


def system_ids(system: SystemPrompt, codec: PromptCodec) -> list[int]:
    """The ids the system prompt's own text contributes, no special tokens added: the
    encoding of its text, or for a padded prompt as many pad ids as that encoding has."""
    if system.text is None:
        return []
    ids = codec.encode_plain(system.text)
    if not system.padded:
        return ids
    return [_pad_id(system, codec)] * len(ids)


def _pad_id(system: SystemPrompt, codec: PromptCodec) -> int:
    if codec.pad_id is None or codec.pad_text is None:
        raise FormatError(
            f"system prompt {system.name}: the tokenizer {codec.name} has no pad token, so a "
            "padded system prompt cannot be built; choose another variant"
        )
    return codec.pad_id


def _messages(system: str | None, content: str) -> Messages:
    head = [] if system is None else [{"role": "system", "content": system}]
    return [*head, {"role": "user", "content": content}]


def _layout(record: PromptRecord, system: str | None, fmt: str, codec: PromptCodec) -> str:
    if fmt == "raw":
        return plain_layout(record.raw, system)
    assert codec.render_chat is not None, "chosen_format checks the template"
    return codec.render_chat(_messages(system, record.content))


def _padded(
    record: PromptRecord, system: SystemPrompt, fmt: str, codec: PromptCodec
) -> RenderedPrompt:
    """The layout rendered around a marker, the marker replaced by the pad run."""
    pad_id = _pad_id(system, codec)
    assert codec.pad_text is not None
    count = len(system_ids(system, codec))
    pieces = _layout(record, _MARKER, fmt, codec).split(_MARKER)
    if len(pieces) != 2:
        raise FormatError(
            f"system prompt {system.name}: the chat template of {codec.name} does not copy the "
            "system message into the prompt unchanged, so a padded system prompt has no place; "
            "choose another variant"
        )
    before, after = pieces
    head = codec.encode(before) if fmt == "raw" else codec.encode_plain(before)
    ids = head + [pad_id] * count + codec.encode_plain(after)
    return RenderedPrompt(record.line, before + codec.pad_text * count + after, ids)


def render_prompt(
    record: PromptRecord, system: SystemPrompt, fmt: str, codec: PromptCodec
) -> RenderedPrompt:
    """``record`` in format ``fmt`` ("raw" or "chat", see :func:`chosen_format`) with
    ``system``, tokenised by ``codec``."""
    if system.padded:
        return _padded(record, system, fmt, codec)
    text = _layout(record, system.text, fmt, codec)
    ids = codec.encode(text) if fmt == "raw" else codec.encode_plain(text)
    return RenderedPrompt(record.line, text, ids)


def render_prompts(
    records: Sequence[PromptRecord], system: SystemPrompt, fmt: str, codec: PromptCodec
) -> list[RenderedPrompt]:
    return [render_prompt(record, system, fmt, codec) for record in records]


def protocol_record(
    *,
    source: str,
    fmt: str,
    codec: PromptCodec,
    system: SystemPrompt,
    lines: Sequence[int],
    sample: dict[str, int] | None,
) -> dict[str, Any]:
    """What a trace header records about how its prompts were chosen and rendered."""
    return {
        "source": source,
        "format": fmt,
        "template": codec.chat_template if fmt == "chat" else None,
        "system": system.record(),
        "pad_id": codec.pad_id if system.padded else None,
        "sample": sample,
        "lines": list(lines),
    }


@dataclass(frozen=True)
class PromptProtocol:
    """How a run picks and renders its prompts: ``format`` (None: chat when the tokenizer has
    a template, else raw), the system prompt, and a seeded sample of ``sample`` examples (None:
    every one)."""

    format: str | None = None
    system: SystemPrompt = field(default_factory=lambda: variant("none"))
    sample: int | None = None
    seed: int = 0


def prepare_prompts(
    path: str | os.PathLike[str],
    protocol: PromptProtocol,
    codec: PromptCodec,
    *,
    limit: int | None = None,
) -> tuple[list[RenderedPrompt], dict[str, Any] | None]:
    """The prompts of ``path`` sampled, cut to ``limit`` and rendered under ``protocol``, and
    the record a trace header keeps of that. The record is None for the plain run (raw format,
    no system prompt, no sample), whose prompts are exactly what loopscope always traced."""
    fmt = chosen_format(protocol.format, codec)
    records = sample_items(
        load_prompt_records(path), protocol.sample, protocol.seed, source=os.fspath(path)
    )
    if limit is not None:
        records = records[:limit]
    rendered = render_prompts(records, protocol.system, fmt, codec)
    if fmt == "raw" and protocol.system.is_empty and protocol.sample is None:
        return rendered, None
    sample = None if protocol.sample is None else {"size": protocol.sample, "seed": protocol.seed}
    record = protocol_record(
        source=os.path.abspath(path),
        fmt=fmt,
        codec=codec,
        system=protocol.system,
        lines=[r.line for r in rendered],
        sample=sample,
    )
    return rendered, record
