"""``loopscope evaluate`` end to end on the bundled demo model, and its answer parsing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from helpers import DEMO_PROMPTS, FIXTURES

from loopscope.cli.main import main
from loopscope.data import load_gsm8k_jsonl
from loopscope.engine.generation import KVCacheUnsupportedError
from loopscope.families.checkpoint import bundled_model_dir
from loopscope.families.parcae import load_parcae
from loopscope.studies.evaluate import (
    OUTPUT_FILES,
    byte_codec,
    evaluate_accuracy,
    judge_answer,
)


def _evaluate(out: Path, *extra: str) -> int:
    return main(
        [
            "evaluate",
            "demo",
            "--prompts",
            str(DEMO_PROMPTS),
            "--recurrences",
            "1,4,6",
            "--limit",
            "4",
            "--max-new-tokens",
            "12",
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ]
    )


def _answers(out: Path) -> list[dict[str, object]]:
    lines = (out / "answers.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_evaluate_writes_accuracy_per_recurrence_count(tmp_path: Path) -> None:
    started = time.perf_counter()
    assert _evaluate(tmp_path / "cached") == 0
    for name in OUTPUT_FILES:
        assert (tmp_path / "cached" / name).stat().st_size > 0
    metrics = json.loads((tmp_path / "cached" / "metrics.json").read_text())
    bundled = json.loads((bundled_model_dir("demo-looped") / "card.json").read_text())["name"]
    assert metrics["model"] == bundled and metrics["problems"] == 4
    assert metrics["kv_cache"] is True and metrics["max_new_tokens"] == 12
    assert 0 < metrics["seconds"] < time.perf_counter() - started
    answers = _answers(tmp_path / "cached")
    assert [(a["recurrences"], a["problem"]) for a in answers] == [
        (r, i) for r in (1, 4, 6) for i in range(4)
    ]
    references = [p.final_answer for p in load_gsm8k_jsonl(DEMO_PROMPTS)[:4]]
    for r in ("1", "4", "6"):
        hits = [bool(a["correct"]) for a in answers if str(a["recurrences"]) == r]
        assert metrics["accuracy"][r] == sum(hits) / 4
    for a in answers:
        assert a["reference"] == references[int(str(a["problem"]))]
        assert 1 <= int(str(a["new_tokens"])) <= 12
        assert (a["parsed"], a["correct"]) == judge_answer(str(a["generated"]), a["reference"])
    table = (tmp_path / "cached" / "accuracy.md").read_text()
    assert "| recurrences | correct | problems | accuracy |" in table
    assert (tmp_path / "cached" / "accuracy.svg").read_text().lstrip().startswith("<?xml")


def test_evaluate_writes_the_same_answers_without_the_cache_and_one_at_a_time(
    tmp_path: Path,
) -> None:
    assert _evaluate(tmp_path / "cached") == 0
    assert _evaluate(tmp_path / "full", "--no-kv-cache") == 0
    assert _answers(tmp_path / "cached") == _answers(tmp_path / "full")
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert metrics["kv_cache"] is False
    assert _evaluate(tmp_path / "one", "--batch-size", "1") == 0
    assert _answers(tmp_path / "one") == _answers(tmp_path / "cached")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--recurrences", "1,x"], "--recurrences takes whole numbers"),
        (["--recurrences", "0,2"], "distinct counts ≥ 1"),
        (["--recurrences", "2,2"], "distinct counts ≥ 1"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be ≥ 1"),
        (["--batch-size", "0"], "--batch-size must be ≥ 1"),
    ],
)
def test_evaluate_refuses_bad_flags_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert _evaluate(tmp_path, *extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_evaluate_names_what_a_checkpoint_lacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The fixture checkpoints ship no tokenizer; Parcae's random initial state depends on
    the text's length, so its default start cannot be decoded with the key/value cache."""
    parcae = str(FIXTURES / "parcae" / "checkpoint")
    base = ["evaluate", parcae, "--prompts", str(DEMO_PROMPTS), "--out", str(tmp_path)]
    assert main([*base, "--limit", "1", "--no-progress"]) == 2
    assert "no tokenizer files" in capsys.readouterr().err
    model = load_parcae(FIXTURES / "parcae" / "checkpoint")
    with pytest.raises(KVCacheUnsupportedError, match="parcae.*--no-kv-cache"):
        evaluate_accuracy(model, load_gsm8k_jsonl(DEMO_PROMPTS)[:1], byte_codec(), [1])


@pytest.mark.parametrize(
    ("generated", "reference", "parsed", "correct"),
    [
        (" Lena has 8*12=96 marbles.\nThat is 96*2=192.\n#### 192", "192", "192", True),
        (" He reads 15*3=15 pages.\n#### 124", "76", "124", False),
        (" It costs 1,200 dollars.\n#### 1,200", "1200", "1200", True),
        (" It takes 3.0 hours.", "3", "3", True),
        (" She has 5 and 7 more, so 12\nQ: Tom has 9 apples", "12", "12", True),
        (" She has many marbles.", "4", None, False),
        (" #### 16\n#### 17", "16", "16", True),
    ],
)
def test_answers_are_read_as_documented(
    generated: str, reference: str, parsed: str | None, correct: bool
) -> None:
    """The number after '####', else the last number before any new 'Q:', commas and a zero
    fraction dropped; no number is wrong."""
    assert judge_answer(generated, reference) == (parsed, correct)
