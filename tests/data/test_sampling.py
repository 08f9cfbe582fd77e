"""``--sample N --seed S``: a seeded subset of a prompt file, reproducible, recorded by line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import DEMO_PROMPTS

from loopscope.data.loaders import load_prompt_records
from loopscope.data.prompt_format import PromptProtocol, byte_codec, prepare_prompts
from loopscope.data.sampling import SampleError, sample_indices, sample_items


def test_same_seed_same_indices_other_seed_other_indices() -> None:
    first = sample_indices(1000, 256, seed=7)
    assert first == sample_indices(1000, 256, seed=7)
    assert first != sample_indices(1000, 256, seed=8)
    assert len(set(first)) == 256 and first == sorted(first)
    assert all(0 <= i < 1000 for i in first)


def test_the_draw_is_pinned() -> None:
    """The draw is Python's ``random.Random(seed).sample``, specified by the language: these
    values must never change, or a study's sample would silently change with it."""
    assert sample_indices(16, 4, seed=0) == [0, 6, 12, 15]
    assert sample_indices(16, 4, seed=1) == [4, 9, 12, 13]


def test_whole_file_and_bad_sizes() -> None:
    assert sample_indices(5, 5, seed=3) == [0, 1, 2, 3, 4]
    assert sample_items(["a", "b"], None, seed=0) == ["a", "b"]
    with pytest.raises(SampleError, match=r"--sample 6 .*holds \(5\).*--sample 5 or fewer"):
        sample_indices(5, 6, seed=0)
    with pytest.raises(SampleError, match="≥ 1"):
        sample_indices(5, 0, seed=0)


def test_sample_of_a_prompt_file_records_its_lines(tmp_path: Path) -> None:
    records = load_prompt_records(DEMO_PROMPTS)
    protocol = PromptProtocol(sample=5, seed=11)
    rendered, record = prepare_prompts(DEMO_PROMPTS, protocol, byte_codec())
    again, record_again = prepare_prompts(DEMO_PROMPTS, protocol, byte_codec())
    assert record is not None and record == record_again
    assert [r.ids for r in rendered] == [r.ids for r in again]
    lines = record["lines"]
    assert lines == [r.line for r in rendered] and len(lines) == 5
    assert record["sample"] == {"size": 5, "seed": 11}
    by_line = {r.line: r.raw for r in records}
    assert [r.text for r in rendered] == [by_line[line] for line in lines]
    other, other_record = prepare_prompts(
        DEMO_PROMPTS, PromptProtocol(sample=5, seed=12), byte_codec()
    )
    assert other_record is not None and other_record["lines"] != lines
    # the line numbers are the file's own (1-based), blank lines counted
    padded = tmp_path / "gaps.jsonl"
    text_lines = DEMO_PROMPTS.read_text().splitlines()
    padded.write_text("\n\n".join(text_lines) + "\n")
    _, gap_record = prepare_prompts(padded, protocol, byte_codec())
    assert gap_record is not None
    assert gap_record["lines"] == [2 * line - 1 for line in lines]
    assert json.loads(text_lines[lines[0] - 1])["question"] in rendered[0].text


def test_sample_larger_than_the_file_names_it() -> None:
    with pytest.raises(SampleError, match=rf"--sample 99 .*{DEMO_PROMPTS.name} holds \(16\)"):
        prepare_prompts(DEMO_PROMPTS, PromptProtocol(sample=99), byte_codec())
