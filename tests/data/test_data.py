"""Tests for loopscope.data: tokenizer, synthetic problems, loaders and the text format."""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import DEMO_PROMPTS

from loopscope.data import (
    CONTEXT_BYTES,
    ByteTokenizer,
    DataFormatError,
    GSM8KExample,
    Problem,
    extract_final_answer,
    format_prompt,
    format_training_example,
    generate_problems,
    load_gsm8k_jsonl,
    load_hellaswag_jsonl,
    load_prompts,
    load_text_prompts,
    parse_model_answer,
    strip_calculator_annotations,
    write_jsonl,
)
from loopscope.data.synthetic import ANSWER_MAX_CHARS, MAX_STEPS, QUESTION_MAX_CHARS

ASSET = DEMO_PROMPTS
UNICODE_TEXTS = [
    "",
    "plain ascii",
    "naïve café — “quotes”",
    "日本語のテキスト",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷",
    "mixed\nlines\tand\x00nul",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and combining é",
]
_ANNOT = re.compile(r"<<(\d+)([-+*/])(\d+)=(\d+)>>")


# ---------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_tokenizer_round_trip_exact(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id == 257 and ids[-1] == tok.eos_id == 258
    assert all(0 <= i < 256 for i in ids[1:-1])
    assert len(ids) == len(text.encode("utf-8")) + 2
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, bos=False)) == text


def test_tokenizer_specials_and_properties() -> None:
    tok = ByteTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size, tok.name) == (
        256,
        257,
        258,
        259,
        "byte",
    )
    assert tok.encode("A", bos=False) == [65]
    ids = [tok.bos_id, 104, 105, tok.eos_id, tok.pad_id]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special=False) == "<bos>hi<eos><pad>"
    # a special between the bytes of one character must not glue them back together
    e_acute = list("é".encode())
    assert tok.decode([e_acute[0], tok.pad_id, e_acute[1]], skip_special=False) == (
        "\ufffd<pad>\ufffd"
    )
    assert tok.decode(torch.tensor([tok.bos_id, 120])) == "x"
    assert tok.decode([0xFF]) == "\ufffd"  # invalid UTF-8 is replaced, not raised
    with pytest.raises(ValueError, match="outside"):
        tok.decode([259])


def test_tokenizer_batch_right_padding() -> None:
    tok = ByteTokenizer()
    ids, mask = tok.encode_batch(["ab", "😀", ""])
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids.shape == mask.shape == (3, 5)  # BOS + 4 emoji bytes
    assert ids[0].tolist() == [257, 97, 98, 256, 256]
    assert mask[0].tolist() == [True, True, True, False, False]
    assert mask.sum(1).tolist() == [3, 5, 1]
    assert tok.decode(ids[1]) == "😀"
    padded, pmask = tok.encode_batch(["ab"], bos=False, pad_to=6)
    assert padded.tolist() == [[97, 98, 256, 256, 256, 256]]
    assert pmask.sum().item() == 2
    with pytest.raises(ValueError, match="pad_to"):
        tok.encode_batch(["abcdef"], pad_to=3)
    empty_ids, empty_mask = tok.encode_batch([])
    assert empty_ids.shape == empty_mask.shape == (0, 0)


# ---------------------------------------------------------------- synthetic


def _check_problem(p: Problem) -> None:
    """Every annotation's arithmetic is right, chained, and ends in the #### value."""
    annotations = _ANNOT.findall(p.answer)
    assert len(annotations) == p.steps, p.answer
    previous = None
    for a, op, b, c in annotations:
        x, y, z = int(a), int(b), int(c)
        if op == "/":
            assert y != 0 and x % y == 0, p.answer
            value = x // y
        else:
            value = {"+": x + y, "-": x - y, "*": x * y}[op]
        assert value == z and z >= 0, p.answer
        # each step uses the previous result as one operand (steps form a chain)
        if previous is not None:
            assert previous in (x, y), p.answer
        previous = z
    lines = p.answer.split("\n")
    assert lines[-1] == f"#### {p.final_answer}"
    assert previous == p.final_answer
    assert extract_final_answer(p.answer) == str(p.final_answer)
    # the visible result after each annotation repeats the annotation's result
    for a, op, b, c in annotations:
        assert f"{a}{op}{b}=<<{a}{op}{b}={c}>>{c}" in p.answer
    assert len(p.question) <= QUESTION_MAX_CHARS
    assert len(p.answer) <= ANSWER_MAX_CHARS
    example = format_training_example(p.question, p.answer)
    assert len(example.encode("utf-8")) + 2 <= CONTEXT_BYTES
    assert "<<" not in example and p.question.endswith("?")


def test_generator_deterministic_and_seed_sensitive() -> None:
    a = generate_problems(50, seed=123)
    assert a == generate_problems(50, seed=123)
    assert a != generate_problems(50, seed=124)
    assert generate_problems(10, seed=123) == a[:10]  # a prefix does not depend on n
    assert len({p.question for p in a}) > 40


def test_generator_does_not_touch_global_rng() -> None:
    import random

    random.seed(7)
    before = random.random()
    random.seed(7)
    generate_problems(5, seed=0)
    assert random.random() == before


def test_generated_arithmetic_is_correct_at_every_difficulty() -> None:
    problems = generate_problems(600, seed=0, min_steps=1, max_steps=MAX_STEPS)
    for p in problems:
        _check_problem(p)
    assert {p.steps for p in problems} == set(range(1, MAX_STEPS + 1))


@pytest.mark.parametrize(("lo", "hi"), [(1, 1), (2, 3), (4, 4)])
def test_step_counts_respected(lo: int, hi: int) -> None:
    problems = generate_problems(60, seed=5, min_steps=lo, max_steps=hi)
    assert {p.steps for p in problems} == set(range(lo, hi + 1))
    for p in problems:
        _check_problem(p)


def test_generator_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        generate_problems(3, seed=0, min_steps=0)
    with pytest.raises(ValueError):
        generate_problems(3, seed=0, min_steps=3, max_steps=2)
    with pytest.raises(ValueError):
        generate_problems(3, seed=0, max_steps=MAX_STEPS + 1)
    assert generate_problems(0, seed=0) == []


def test_write_jsonl_round_trips_through_loader(tmp_path: Path) -> None:
    problems = generate_problems(8, seed=9)
    path = tmp_path / "gen.jsonl"
    write_jsonl(problems, path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [set(r) for r in rows] == [{"question", "answer"}] * 8
    loaded = load_gsm8k_jsonl(path)
    assert [ex.question for ex in loaded] == [p.question for p in problems]
    assert [ex.final_answer for ex in loaded] == [str(p.final_answer) for p in problems]


def test_bundled_demo_prompts_match_documented_command() -> None:
    expected = generate_problems(16, seed=20261128, min_steps=1, max_steps=3)
    lines = ASSET.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [
        {"question": p.question, "answer": p.answer} for p in expected
    ]
    assert len(load_prompts(ASSET)) == 16


# ---------------------------------------------------------------- formatting


def test_formatting() -> None:
    assert format_prompt("How many?") == "Q: How many?\nA:"
    answer = "Tom has 3*4=<<3*4=12>>12 apples.\n#### 12"
    assert strip_calculator_annotations(answer) == "Tom has 3*4=12 apples.\n#### 12"
    assert format_training_example("How many?", answer) == (
        "Q: How many?\nA: Tom has 3*4=12 apples.\n#### 12"
    )
    assert extract_final_answer("so\n#### 1,234") == "1234"
    assert extract_final_answer("#### -5") == "-5"
    assert extract_final_answer("no marker 12") is None


def test_parse_model_answer() -> None:
    assert parse_model_answer(" 3*4=12 apples.\n#### 12") == "12"
    assert parse_model_answer(" He has 5+7=12, then 1,500 left.") == "1500"
    assert parse_model_answer(" The answer is 12.") == "12"
    assert parse_model_answer(" 7 apples\nQ: Ann has 99 pears") == "7"  # a new example is cut
    assert parse_model_answer(" 12.0 dollars") == "12"
    assert parse_model_answer(" no numbers here") is None


# ---------------------------------------------------------------- loaders


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _gsm(q: str, a: str) -> str:
    return json.dumps({"question": q, "answer": a})


def test_load_gsm8k_good_file_skips_blank_lines(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "g.jsonl",
        [_gsm("Q1?", "Mia has 2+3=<<2+3=5>>5.\n#### 5"), "", "   ", _gsm("Q2?", "x\n#### 1,000")],
    )
    examples = load_gsm8k_jsonl(path)
    assert examples == [
        GSM8KExample("Q1?", "Mia has 2+3=<<2+3=5>>5.\n#### 5", "5", "Mia has 2+3=5.\n#### 5"),
        GSM8KExample("Q2?", "x\n#### 1,000", "1000", "x\n#### 1,000"),
    ]


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "prompts.jsonl",
        [_gsm("a?", "#### 1"), _gsm("b?", "#### 2"), '{"question": "c?", "answer": '],
    )
    for loader in (load_gsm8k_jsonl, load_prompts):
        with pytest.raises(DataFormatError) as info:
            loader(path)
        message = str(info.value)
        assert "prompts.jsonl" in message and "line 3" in message
        assert "malformed JSON" in message
        assert info.value.line == 3


def test_missing_field_and_missing_final_answer(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.jsonl", [_gsm("a?", "#### 1"), json.dumps({"question": "b?"})])
    with pytest.raises(DataFormatError, match=r'p\.jsonl line 2: missing field "answer"'):
        load_gsm8k_jsonl(path)
    # prompts need only the question
    assert load_prompts(path) == ["Q: a?\nA:", "Q: b?\nA:"]

    path = _write(tmp_path / "n.jsonl", ["", _gsm("a?", "the answer is 4")])
    with pytest.raises(DataFormatError, match=r"n\.jsonl line 2: .*####"):
        load_gsm8k_jsonl(path)

    path = _write(tmp_path / "t.jsonl", [json.dumps({"question": 3, "answer": "#### 3"})])
    with pytest.raises(DataFormatError, match='"question" must be a string'):
        load_gsm8k_jsonl(path)

    path = _write(tmp_path / "l.jsonl", ["[1, 2]"])
    with pytest.raises(DataFormatError, match="line 1: expected a JSON object"):
        load_gsm8k_jsonl(path)


def test_empty_files(tmp_path: Path) -> None:
    for name in ("e.jsonl", "e.txt", "e.json"):
        path = tmp_path / name
        path.write_text("\n  \n", encoding="utf-8")
        loaders: list[Callable[[Path], object]] = [load_prompts]
        loaders += [load_text_prompts] if name.endswith(".txt") else [load_gsm8k_jsonl]
        for loader in loaders:
            with pytest.raises(DataFormatError, match="empty file") as info:
                loader(path)
            assert name in str(info.value)


def test_error_is_value_error_and_picklable(tmp_path: Path) -> None:
    err = DataFormatError(tmp_path / "x.jsonl", 4, "bad")
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.line == 4 and str(err).endswith("x.jsonl line 4: bad")


def test_invalid_utf8_reports_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine\n\xff\xfe broken\n")
    with pytest.raises(DataFormatError, match=r"bad\.txt line 2: not valid UTF-8"):
        load_text_prompts(path)


def test_hellaswag_parsing(tmp_path: Path) -> None:
    endings = ["runs.", "jumps.", "sits.", "eats."]
    path = _write(
        tmp_path / "hs.jsonl",
        [
            json.dumps({"ctx": "A dog", "endings": endings, "label": 2, "activity_label": "Pets"}),
            json.dumps({"ctx_a": "A man is outside.", "ctx_b": "he", "endings": endings}),
            json.dumps({"ctx_a": "Only a.", "ctx_b": "", "endings": endings, "label": "1"}),
        ],
    )
    examples = load_hellaswag_jsonl(path)
    assert [ex.ctx for ex in examples] == ["A dog", "A man is outside. he", "Only a."]
    assert [ex.label for ex in examples] == [2, None, 1]
    assert examples[0].endings == endings and examples[0].activity_label == "Pets"
    assert load_prompts(path) == ["A dog", "A man is outside. he", "Only a."]

    bad_label = _write(
        tmp_path / "b.jsonl", [json.dumps({"ctx": "x", "endings": endings, "label": 4})]
    )
    with pytest.raises(
        DataFormatError, match=r"b\.jsonl line 1: \"label\" must be an index 0\.\.3"
    ):
        load_hellaswag_jsonl(bad_label)
    no_endings = _write(tmp_path / "c.jsonl", [json.dumps({"ctx": "x", "label": 0})])
    with pytest.raises(DataFormatError, match='missing field "endings"'):
        load_hellaswag_jsonl(no_endings)
    no_ctx = _write(tmp_path / "d.jsonl", [json.dumps({"endings": endings})])
    with pytest.raises(DataFormatError, match='missing field "ctx"'):
        load_hellaswag_jsonl(no_ctx)


def test_load_prompts_dispatch(tmp_path: Path) -> None:
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n  indented stays \r\n{not json}\n", encoding="utf-8")
    assert load_prompts(txt) == ["first prompt", "  indented stays ", "{not json}"]
    assert load_text_prompts(txt) == load_prompts(txt)

    gsm = _write(tmp_path / "g.data", [_gsm("How many?", "#### 3")])  # suffix does not matter
    assert load_prompts(gsm) == [format_prompt("How many?")]

    unknown = _write(tmp_path / "u.jsonl", [json.dumps({"text": "hi"})])
    with pytest.raises(DataFormatError, match=r"u\.jsonl line 1: unknown JSONL format"):
        load_prompts(unknown)
    plain = _write(tmp_path / "plain.md", ["just text"])
    with pytest.raises(DataFormatError, match=r"plain\.md line 1: unknown prompt format.*\.txt"):
        load_prompts(plain)
