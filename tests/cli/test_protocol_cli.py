"""The prompt-protocol flags end to end on the bundled looped model: ``--sample``/``--seed``,
``--system``, ``--format``, ``--system-variants`` on ``analyze``, and ``loopscope compare``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import DEMO_PROMPTS

from loopscope.cli.main import main
from loopscope.data.system_prompts import SHORT_MATH

FAST = ["--recurrences", "4", "--stability-prompts", "1", "--no-progress"]


def _trace(out: Path, *extra: str) -> int:
    return main(["trace", "demo", "--prompts", str(DEMO_PROMPTS), "--out", str(out), *FAST, *extra])


def _header(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / "trace.json").read_text()))


def test_sample_is_reproducible_and_recorded(tmp_path: Path) -> None:
    assert _trace(tmp_path / "a", "--sample", "3", "--seed", "4") == 0
    assert _trace(tmp_path / "b", "--sample", "3", "--seed", "4") == 0
    assert _trace(tmp_path / "c", "--sample", "3", "--seed", "5") == 0
    lines = [_header(tmp_path / d)["protocol"]["lines"] for d in "abc"]
    assert lines[0] == lines[1] and lines[0] != lines[2] and len(lines[0]) == 3
    questions = [json.loads(line)["question"] for line in DEMO_PROMPTS.read_text().splitlines()]
    texts = [
        json.loads(t)["text"] for t in (tmp_path / "a" / "prompts.jsonl").read_text().splitlines()
    ]
    assert texts == [f"Q: {questions[n - 1]}\nA:" for n in lines[0]]
    # the same directory with another sample is refused, never mixed
    assert _trace(tmp_path / "a", "--sample", "3", "--seed", "5") == 2


def test_plain_trace_records_no_protocol(tmp_path: Path) -> None:
    assert _trace(tmp_path / "plain", "--limit", "1") == 0
    assert "protocol" not in _header(tmp_path / "plain")


def test_bad_protocol_flags_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _trace(tmp_path / "x", "--sample", "99") == 2
    assert "--sample 99 asks for more examples than" in capsys.readouterr().err
    assert _trace(tmp_path / "x", "--format", "chat") == 2
    assert "no chat template; use --format raw" in capsys.readouterr().err
    assert _trace(tmp_path / "x", "--system", "@" + str(tmp_path / "nope.txt")) == 2
    assert "no such file" in capsys.readouterr().err
    assert _trace(tmp_path / "x", "--system-variants", "none,longer") == 2
    assert "unknown system-prompt variant 'longer'" in capsys.readouterr().err
    assert _trace(tmp_path / "x", "--system", "short-math", "--ray") == 2
    assert "--system not supported with --ray" in capsys.readouterr().err


def test_system_from_a_file(tmp_path: Path) -> None:
    system = tmp_path / "system.txt"
    system.write_text("Answer with one number.\n")
    assert _trace(tmp_path / "t", "--limit", "1", "--system", f"@{system}") == 0
    header = _header(tmp_path / "t")
    assert header["protocol"]["system"]["text"] == "Answer with one number."
    text = json.loads((tmp_path / "t" / "prompts.jsonl").read_text().splitlines()[0])["text"]
    assert text.startswith("Answer with one number.\n\nQ: ")


def test_analyze_variants_side_by_side_then_compare(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "variants"
    args = ["analyze", "demo", "--prompts", str(DEMO_PROMPTS), "--out", str(out), *FAST]
    assert main([*args, "--sample", "4", "--seed", "2", "--limit", "2",
                 "--system-variants", "none,short-math"]) == 0  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["variants"]) == ["none", "short-math"]
    none, short = metrics["variants"]["none"], metrics["variants"]["short-math"]
    assert none["protocol"]["lines"] == short["protocol"]["lines"]  # the same prompts
    assert none["protocol"]["system"]["text"] is None
    assert short["protocol"]["system"]["text"] == SHORT_MATH
    for entry in (none, short):
        assert entry["prompts"] == 2
        assert 0.0 <= entry["non_fixed_point_token_rate"] <= 1.0
        assert 0.0 <= entry["non_fixed_point_example_rate"] <= 1.0
    page = (out / "report.html").read_text()
    assert "System-prompt variants side by side" in page
    for name in ("none", "short-math"):
        sub = json.loads((out / name / "metrics.json").read_text())
        assert sub["protocol"]["system"]["name"] == name
        assert (out / name / "report.html").is_file()
    capsys.readouterr()
    compared = tmp_path / "compare"
    assert (
        main(["compare", str(out / "none"), str(out / "short-math"), "--out", str(compared)]) == 0
    )
    assert list(json.loads((compared / "metrics.json").read_text())["runs"]) == [
        "none",
        "short-math",
    ]
    assert main(["compare", str(out / "none"), "--out", str(compared)]) == 2
    assert "two or more" in capsys.readouterr().err
    assert main(["compare", str(out), str(out / "none"), "--out", str(compared)]) == 2
    assert "page of system-prompt variants" in capsys.readouterr().err
