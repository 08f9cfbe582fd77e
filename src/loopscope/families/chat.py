"""The tokenizer a prompt is rendered with: our byte tokenizer for our own models, the
checkpoint's own tokenizer and chat template (through the Hugging Face gate in
:mod:`loopscope.families.hub`) for published ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loopscope.data.prompt_format import Messages, PromptCodec, byte_codec
from loopscope.families.table import family_of, resolve_directory

__all__ = ["checkpoint_codec", "codec_for"]


def codec_for(source: str | Path) -> PromptCodec:
    """The codec of anything ``loopscope.load`` accepts."""
    directory = resolve_directory(source)
    if family_of(directory).tokenizer == "byte":
        return byte_codec()
    return checkpoint_codec(directory)


def checkpoint_codec(directory: Path) -> PromptCodec:
    """The tokenizer shipped in ``directory`` (local files only, no remote code) as a codec."""
    from loopscope.families.hub import auto_tokenizer, chat_template_of, render_chat_template
    from loopscope.families.tokenizers import TOKENIZER_FILES

    if not any((directory / name).exists() for name in TOKENIZER_FILES):
        from loopscope.core.errors import CheckpointError

        raise CheckpointError(
            f"{directory} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy the "
            "model's tokenizer next to its weights"
        )
    tokenizer: Any = auto_tokenizer(directory)
    template = chat_template_of(tokenizer)

    def render(messages: Messages) -> str:
        return render_chat_template(tokenizer, messages)

    return PromptCodec(
        name=f"{type(tokenizer).__name__}:{directory.name}",
        encode=lambda text: list(tokenizer(text)["input_ids"]),
        encode_plain=lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"]),
        pad_id=tokenizer.pad_token_id,
        pad_text=tokenizer.pad_token,
        chat_template=template,
        render_chat=render if template is not None else None,
    )
