"""Chat templates through the Hugging Face gate: a tokenizer with a Jinja template, built here,
renders each prompt exactly as its template does, system prompt included; the padded system
prompt is pad ids only, as long as the persona; the trace records the template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jinja2
import pytest
from helpers import FIXTURES

from loopscope.data.loaders import load_prompt_records
from loopscope.data.prompt_format import (
    FormatError,
    PromptProtocol,
    prepare_prompts,
    render_prompt,
    system_ids,
)
from loopscope.data.system_prompts import LONG_PERSONA, SHORT_MATH, resolve_system, variant
from loopscope.families.chat import checkpoint_codec, codec_for

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]


def _words(persona: bool) -> list[str]:
    text = " ".join([LONG_PERSONA if persona else "", SHORT_MATH, "How many apples are left ?"])
    return sorted({w for w in text.replace(".", " . ").replace(",", " , ").split()})


def _raw_tokenizer(persona: bool = True) -> Any:
    """Word level over the prompts' words (with the persona's words, or few enough ids for
    the 128-token vocabulary of the Ouro reference checkpoint)."""
    vocab = {w: i for i, w in enumerate(["[UNK]", *_words(persona)])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    return tok


def write_chat_tokenizer(
    directory: Path, *, template: str | None = TEMPLATE, persona: bool = True
) -> Path:
    """A word-level tokenizer with ``<pad>`` and, unless None, ``template`` as its chat
    template, saved the way a checkpoint ships it."""
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_raw_tokenizer(persona),
        unk_token="[UNK]",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIALS[3:],
    )
    if template is not None:
        fast.chat_template = template
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(directory)
    return directory


def _expected(messages: list[dict[str, str]]) -> str:
    """The template rendered by Jinja itself, outside transformers."""
    return jinja2.Template(TEMPLATE).render(
        messages=messages, bos_token="<s>", add_generation_prompt=True
    )


@pytest.fixture
def prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    lines = [
        {"question": "How many apples are left ?", "answer": "#### 3"},
        {"question": "Solve the problem .", "answer": "#### 1"},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_rendered_prompt_is_exactly_the_template_output(tmp_path: Path, prompt_file: Path) -> None:
    codec = checkpoint_codec(write_chat_tokenizer(tmp_path / "tok"))
    assert codec.chat_template == TEMPLATE
    raw = _raw_tokenizer()
    system = resolve_system("short-math")
    rendered, record = prepare_prompts(prompt_file, PromptProtocol(system=system), codec)
    for prompt, question in zip(
        rendered, ["How many apples are left ?", "Solve the problem ."], strict=True
    ):
        expected = _expected(
            [{"role": "system", "content": SHORT_MATH}, {"role": "user", "content": question}]
        )
        assert prompt.text == expected
        assert prompt.ids == raw.encode(expected, add_special_tokens=False).ids
        assert "[UNK]" not in raw.decode(prompt.ids, skip_special_tokens=False)
    assert record is not None
    assert record["format"] == "chat"  # the default when the tokenizer has a template
    assert record["template"] == TEMPLATE
    assert record["system"] == {"name": "short-math", "text": SHORT_MATH, "padded": False}
    # no system prompt: no system message at all
    plain, _ = prepare_prompts(prompt_file, PromptProtocol(), codec)
    assert plain[0].text == _expected([{"role": "user", "content": "How many apples are left ?"}])


def test_padded_persona_is_pad_ids_as_long_as_the_persona(tmp_path: Path) -> None:
    codec = checkpoint_codec(write_chat_tokenizer(tmp_path / "tok"))
    persona = system_ids(variant("long-persona"), codec)
    padded = system_ids(variant("long-persona-padded"), codec)
    assert len(persona) > 200  # several hundred tokens
    assert len(padded) == len(persona)
    assert set(padded) == {codec.pad_id} and codec.pad_id is not None
    assert codec.pad_id not in persona

    record = load_prompt_records(_one_question(tmp_path))[0]
    full = render_prompt(record, variant("long-persona"), "chat", codec)
    blank = render_prompt(record, variant("long-persona-padded"), "chat", codec)
    head = codec.encode_plain("<s><|system|>")
    tail = codec.encode_plain("</s><|user|>How many apples are left ?</s><|assistant|>")
    assert blank.ids == head + [codec.pad_id] * len(persona) + tail
    assert len(blank.ids) == len(full.ids)
    assert blank.text == _expected(
        [
            {"role": "system", "content": "<pad>" * len(persona)},
            {"role": "user", "content": "How many apples are left ?"},
        ]
    )


def _one_question(tmp_path: Path) -> Path:
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"question": "How many apples are left ?", "answer": "#### 3"}))
    return path


def test_without_a_template_the_default_is_raw(tmp_path: Path, prompt_file: Path) -> None:
    codec = checkpoint_codec(write_chat_tokenizer(tmp_path / "tok", template=None))
    assert codec.chat_template is None
    rendered, record = prepare_prompts(prompt_file, PromptProtocol(system=variant("none")), codec)
    assert record is None  # the plain run: exactly what loopscope always traced
    assert rendered[0].text == "Q: How many apples are left ?\nA:"
    with pytest.raises(FormatError, match="no chat template; use --format raw"):
        prepare_prompts(prompt_file, PromptProtocol(format="chat"), codec)
    with_system, _ = prepare_prompts(
        prompt_file, PromptProtocol(system=variant("short-math")), codec
    )
    assert with_system[0].text == f"{SHORT_MATH}\n\nQ: How many apples are left ?\nA:"


def test_a_traced_checkpoint_records_template_system_and_rendered_text(
    tmp_path: Path, prompt_file: Path
) -> None:
    """The Ouro reference checkpoint with the chat tokenizer beside it, traced end to end."""
    import loopscope.pipeline as lp
    from loopscope.trace.settings import TraceError, TraceSettings

    checkpoint = tmp_path / "ouro"
    shutil.copytree(FIXTURES / "ouro" / "checkpoint", checkpoint)
    write_chat_tokenizer(checkpoint, persona=False)
    assert codec_for(checkpoint).chat_template == TEMPLATE
    protocol = PromptProtocol(system=variant("short-math"))
    settings = TraceSettings(recurrences=2, attention=False, stability_prompts=0)
    store = lp.trace(
        str(checkpoint), prompt_file, tmp_path / "t", settings, progress=False, protocol=protocol
    )
    header = json.loads((store.path / "trace.json").read_text())
    assert header["protocol"]["template"] == TEMPLATE
    assert header["protocol"]["system"]["text"] == SHORT_MATH
    assert header["protocol"]["lines"] == [1, 2]
    expected = _expected(
        [
            {"role": "system", "content": SHORT_MATH},
            {"role": "user", "content": "How many apples are left ?"},
        ]
    )
    assert store.texts[0] == expected
    assert (
        store.prompt(0).tokens.tolist()
        == _raw_tokenizer(False).encode(expected, add_special_tokens=False).ids
    )
    # another rendering of the same prompts is refused, never mixed into this directory
    with pytest.raises(TraceError, match="different"):
        lp.trace(
            str(checkpoint),
            prompt_file,
            tmp_path / "t",
            settings,
            progress=False,
            protocol=PromptProtocol(format="raw", system=variant("short-math")),
        )


def test_a_loaded_model_renders_with_its_own_tokenizer(
    tmp_path: Path, tiny_trace_model: Any
) -> None:
    import loopscope
    from loopscope.trace.protocol import source_codec

    checkpoint = tmp_path / "ouro"
    shutil.copytree(FIXTURES / "ouro" / "checkpoint", checkpoint)
    write_chat_tokenizer(checkpoint, persona=False)
    assert source_codec(loopscope.load(str(checkpoint))).chat_template == TEMPLATE
    assert source_codec(tiny_trace_model).name == "byte"  # built in Python: our byte tokenizer
