"""HellaSwag in its released JSONL layout: lines parse, malformed lines name the file, the
line and the field, and the prompt loader tells HellaSwag from GSM8K and plain text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import DEMO_PROMPTS

from loopscope.data.loaders import (
    DataFormatError,
    load_hellaswag_jsonl,
    load_prompt_records,
    load_prompts,
)


def _line(**changes: Any) -> dict[str, Any]:
    """A line with every field of the released layout (text written for this test)."""
    record: dict[str, Any] = {
        "ind": 41,
        "activity_label": "Washing a bicycle",
        "ctx_a": "A woman sprays water over the frame of a bicycle.",
        "ctx_b": "she",
        "ctx": "A woman sprays water over the frame of a bicycle. she",
        "split": "val",
        "split_type": "indomain",
        "label": 2,
        "endings": [
            "rides it into the lake.",
            "paints the wheels green.",
            "scrubs the chain with a brush.",
            "sells it to a neighbour.",
        ],
        "source_id": "test~synthetic-0001",
    }
    record.update(changes)
    return {k: v for k, v in record.items() if v is not _DROP}


_DROP = object()


def _write(path: Path, *records: dict[str, Any] | str) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_real_layout_lines_parse(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "hs.jsonl",
        _line(),
        _line(ind=42, ctx=_DROP, ctx_b="the bicycle", label="1", split="test"),
        _line(ind=43, label=None, split="test"),
    )
    first, second, third = load_hellaswag_jsonl(path)
    assert first.ctx == "A woman sprays water over the frame of a bicycle. she"
    assert (first.label, first.ind, first.split) == (2, 41, "val")
    assert first.activity_label == "Washing a bicycle"
    assert (first.ctx_a, first.ctx_b) == (
        "A woman sprays water over the frame of a bicycle.",
        "she",
    )
    assert first.endings[2] == "scrubs the chain with a brush."
    # without "ctx", the context is ctx_a + " " + ctx_b
    assert second.ctx == "A woman sprays water over the frame of a bicycle. the bicycle"
    assert second.label == 1 and second.split == "test"
    assert third.label is None


def test_prompt_loader_detects_hellaswag_and_uses_the_context(tmp_path: Path) -> None:
    path = _write(tmp_path / "hs.jsonl", _line(), "", _line(ind=7, ctx="Two dogs run."))
    records = load_prompt_records(path)
    assert [r.kind for r in records] == ["hellaswag", "hellaswag"]
    assert [r.line for r in records] == [1, 3]
    assert load_prompts(path) == [
        "A woman sprays water over the frame of a bicycle. she",
        "Two dogs run.",
    ]
    assert [r.content for r in records] == [r.raw for r in records]
    gsm = load_prompt_records(DEMO_PROMPTS)
    assert {r.kind for r in gsm} == {"gsm8k"}
    assert gsm[0].raw == f"Q: {gsm[0].content}\nA:"
    text = tmp_path / "plain.txt"
    text.write_text("first prompt\n\n second one \n")
    assert [(r.kind, r.line, r.raw) for r in load_prompt_records(text)] == [
        ("text", 1, "first prompt"),
        ("text", 3, " second one "),
    ]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"endings": _DROP}, "endings"),
        ({"endings": ["only one"]}, "endings"),
        ({"label": 4}, "label"),
        ({"label": True}, "label"),
        ({"ind": "41"}, "ind"),
        ({"split": 3}, "split"),
        ({"activity_label": ["x"]}, "activity_label"),
        ({"ctx": _DROP, "ctx_a": 5}, "ctx_a"),
        ({"ctx": _DROP, "ctx_a": _DROP}, "ctx"),
        ({"ctx": 12}, "ctx"),
    ],
)
def test_malformed_lines_name_file_line_and_field(
    tmp_path: Path, changes: dict[str, Any], field: str
) -> None:
    path = _write(tmp_path / "bad.jsonl", _line(), _line(ind=2), _line(**changes))
    # a prompt file may hold contexts alone, so only the full loader needs the endings
    loaders = (
        [load_hellaswag_jsonl]
        if changes == {"endings": _DROP}
        else [
            load_hellaswag_jsonl,
            load_prompts,
        ]
    )
    for load in loaders:
        with pytest.raises(DataFormatError) as caught:
            load(path)
        err = caught.value
        assert (err.path, err.line) == (str(path), 3)
        assert str(err).startswith(f"{path} line 3: ")
        assert f'"{field}"' in err.problem


def test_broken_json_names_its_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.jsonl", _line(), '{"ctx": "cut off', _line())
    with pytest.raises(DataFormatError, match=r"bad\.jsonl line 2: malformed JSON"):
        load_hellaswag_jsonl(path)
    with pytest.raises(DataFormatError, match=r"bad\.jsonl line 2: malformed JSON"):
        load_prompts(path)
