"""The prompts a trace runs under a prompt protocol (format, system prompt, seeded sample),
as trace inputs, with the record its header keeps (see
:mod:`loopscope.data.prompt_format`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from loopscope.core.errors import LoopscopeError
from loopscope.data.prompt_format import PromptCodec, PromptProtocol, byte_codec, prepare_prompts
from loopscope.engine.contract import LoopedLM
from loopscope.trace.settings import PromptInput

__all__ = ["protocol_inputs", "source_codec"]


def source_codec(model: str | Path | LoopedLM) -> PromptCodec:
    """The codec of a model source. A model object is rendered for with the tokenizer
    ``loopscope.load`` attached to it (the checkpoint's own, read from its directory), or our
    byte tokenizer when it has none (a model built in Python), as
    :func:`loopscope.pipeline.trace` tokenises."""
    from loopscope.families.chat import checkpoint_codec, codec_for
    from loopscope.families.tokenizers import TOKENIZER_ATTRIBUTE, DeferredTokenizer

    if not isinstance(model, LoopedLM):
        return codec_for(model)
    attached = getattr(model, TOKENIZER_ATTRIBUTE, None)
    if attached is None or attached.name == "byte":
        return byte_codec()
    if isinstance(attached, DeferredTokenizer):
        return checkpoint_codec(attached.directory)
    raise LoopscopeError(
        f"the model object carries the tokenizer {attached.name}, which cannot render a chat "
        "template or a system prompt here; pass the model's name or directory instead"
    )


def protocol_inputs(
    model: str | Path | LoopedLM,
    path: str | os.PathLike[str],
    protocol: PromptProtocol,
    *,
    limit: int | None = None,
) -> tuple[list[PromptInput], dict[str, Any] | None]:
    """Trace inputs of ``path`` under ``protocol`` and the header record (None for a plain
    run, whose trace is then exactly what it always was)."""
    rendered, record = prepare_prompts(path, protocol, source_codec(model), limit=limit)
    return [PromptInput(r.text, r.ids) for r in rendered], record
