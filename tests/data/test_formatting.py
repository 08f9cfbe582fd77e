"""The raw layout and the system prompts on our byte tokenizer: system prompt, blank line,
question; the padded persona is pad id 256 only, as many as the persona has bytes; a plain run
is exactly what loopscope always traced."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import DEMO_PROMPTS

from loopscope.data import ByteTokenizer, load_prompts
from loopscope.data.loaders import load_prompt_records
from loopscope.data.prompt_format import (
    FormatError,
    PromptProtocol,
    byte_codec,
    chosen_format,
    plain_layout,
    prepare_prompts,
    render_prompt,
    system_ids,
)
from loopscope.data.system_prompts import (
    LONG_PERSONA,
    SHORT_MATH,
    VARIANTS,
    SystemPromptError,
    parse_variants,
    resolve_system,
    variant,
)

BYTES = ByteTokenizer()


def test_plain_run_is_unchanged() -> None:
    rendered, record = prepare_prompts(DEMO_PROMPTS, PromptProtocol(), byte_codec(), limit=3)
    assert record is None
    texts = load_prompts(DEMO_PROMPTS)[:3]
    assert [r.text for r in rendered] == texts
    assert [r.ids for r in rendered] == [BYTES.encode(t, bos=True) for t in texts]


def test_raw_layout_is_system_blank_line_question() -> None:
    assert plain_layout("Q: 2+2?\nA:", None) == "Q: 2+2?\nA:"
    assert plain_layout("Q: 2+2?\nA:", "Be exact.") == "Be exact.\n\nQ: 2+2?\nA:"
    record = load_prompt_records(DEMO_PROMPTS)[0]
    prompt = render_prompt(record, variant("short-math"), "raw", byte_codec())
    assert prompt.text == f"{SHORT_MATH}\n\n{record.raw}"
    assert prompt.ids == [BYTES.BOS, *f"{SHORT_MATH}\n\n{record.raw}".encode()]
    assert prompt.line == 1


def test_padded_persona_is_pad_ids_as_long_as_the_persona() -> None:
    codec = byte_codec()
    persona = system_ids(variant("long-persona"), codec)
    padded = system_ids(variant("long-persona-padded"), codec)
    assert persona == list(LONG_PERSONA.encode("utf-8"))
    assert padded == [ByteTokenizer.PAD] * len(persona)
    record = load_prompt_records(DEMO_PROMPTS)[0]
    full = render_prompt(record, variant("long-persona"), "raw", codec)
    blank = render_prompt(record, variant("long-persona-padded"), "raw", codec)
    tail = list(f"\n\n{record.raw}".encode())
    assert blank.ids == [BYTES.BOS, *[BYTES.PAD] * len(persona), *tail]
    assert len(blank.ids) == len(full.ids)
    assert blank.text == "<pad>" * len(persona) + f"\n\n{record.raw}"


def test_the_long_persona_is_several_hundred_words_and_short_math_one_sentence() -> None:
    assert 250 <= len(LONG_PERSONA.split()) <= 450
    assert SHORT_MATH.count(".") == 1 and SHORT_MATH.endswith(".")
    assert VARIANTS == ("none", "long-persona", "long-persona-padded", "short-math")


def test_system_text_file_or_name(tmp_path: Path) -> None:
    assert resolve_system(None).is_empty and resolve_system("none").is_empty
    assert resolve_system("short-math") == variant("short-math")
    assert resolve_system("You add numbers.").text == "You add numbers."
    file = tmp_path / "system.txt"
    file.write_text("Line one.\nLine two.\n")
    from_file = resolve_system(f"@{file}")
    assert from_file.text == "Line one.\nLine two." and from_file.name == f"file:{file}"
    with pytest.raises(SystemPromptError, match="no such file"):
        resolve_system(f"@{tmp_path / 'missing.txt'}")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(SystemPromptError, match="is empty"):
        resolve_system(f"@{tmp_path / 'empty.txt'}")


def test_variant_lists() -> None:
    assert [s.name for s in parse_variants("none, short-math")] == ["none", "short-math"]
    with pytest.raises(SystemPromptError, match="unknown system-prompt variant 'longer'"):
        parse_variants("none,longer")
    with pytest.raises(SystemPromptError, match="more than once"):
        parse_variants("none,none")


def test_byte_tokenizer_has_no_chat_template() -> None:
    codec = byte_codec()
    assert chosen_format(None, codec) == "raw"
    with pytest.raises(FormatError, match="no chat template; use --format raw"):
        chosen_format("chat", codec)
    with pytest.raises(FormatError, match="--format must be one of raw, chat"):
        chosen_format("markdown", codec)


def test_protocol_record_names_format_system_and_lines() -> None:
    protocol = PromptProtocol(system=variant("long-persona-padded"))
    rendered, record = prepare_prompts(DEMO_PROMPTS, protocol, byte_codec(), limit=2)
    assert record is not None
    assert record["format"] == "raw" and record["template"] is None
    assert record["system"] == {"name": "long-persona-padded", "text": LONG_PERSONA, "padded": True}
    assert record["pad_id"] == ByteTokenizer.PAD
    assert record["lines"] == [1, 2] and record["sample"] is None
    assert record["source"] == str(DEMO_PROMPTS.resolve())
    assert len(rendered) == 2
