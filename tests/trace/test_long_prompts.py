"""A prompt longer than the model's context is skipped and listed, truncated to its last tokens,
or refused, as ``long_prompts`` says; the run goes on over the others."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loopscope.engine.loop import ContextLengthError
from loopscope.families.checkpoint import bundled_model_dir
from loopscope.trace.long_prompts import fit_to_context, last_tokens, long_prompts_section
from loopscope.trace.settings import PromptInput, TraceError, TraceSettings

#: The bundled demo model reads bytes; its context is this many of them.
DEMO_CONTEXT = json.loads((bundled_model_dir("demo-looped") / "config.json").read_text())[
    "context_length"
]
LONG_QUESTION = "A farmer counts " + "cows and sheep in the field, " * 40 + "how many legs total?"
SHORT = ["What is 2 plus 3?", "Tom has 5 apples and eats 2. How many are left?"]
QUICK = TraceSettings(recurrences=3, attention=False, stability_prompts=0)


def _prompt_file(tmp_path: Path) -> Path:
    assert len(LONG_QUESTION.encode()) == 1196 > DEMO_CONTEXT
    path = tmp_path / "prompts.jsonl"
    rows = [SHORT[0], LONG_QUESTION, SHORT[1]]
    path.write_text("".join(json.dumps({"question": q, "answer": "#### 1"}) + "\n" for q in rows))
    return path


def _prompts(*lengths: int) -> list[PromptInput]:
    return [PromptInput(f"p{i}", list(range(1, n + 1))) for i, n in enumerate(lengths)]


def test_skip_leaves_long_prompts_out_and_lists_them() -> None:
    fitted = fit_to_context(_prompts(3, 9, 4), 5, "skip", bos=True)
    assert [len(p.ids) for p in fitted.kept] == [3, 4]
    assert [(p.index, p.n_tokens, p.cut) for p in fitted.skipped] == [(1, 9, 0)]
    assert fitted.record()["skipped"][0]["n_tokens"] == 9
    assert fitted.messages() == [
        "skipped prompt 1: 9 tokens > the model's context of 5 (--long-prompts truncate keeps "
        "its last tokens instead)"
    ]


def test_truncate_keeps_the_bos_and_the_last_tokens() -> None:
    assert last_tokens([0, 1, 2, 3, 4, 5, 6], 4, bos=True) == [0, 4, 5, 6]
    assert last_tokens([0, 1, 2, 3, 4, 5, 6], 4, bos=False) == [3, 4, 5, 6]
    assert last_tokens([0, 1, 2], 4, bos=True) == [0, 1, 2]
    fitted = fit_to_context(_prompts(3, 9), 5, "truncate", bos=True)
    assert fitted.kept[1].ids == [1, 6, 7, 8, 9]
    assert [(p.index, p.n_tokens, p.cut) for p in fitted.truncated] == [(1, 9, 4)]


def test_error_names_the_prompt_its_length_the_context_and_the_fix() -> None:
    with pytest.raises(ContextLengthError, match="prompt 1 has 9 tokens .* context is 5.*skip"):
        fit_to_context(_prompts(3, 9), 5, "error", bos=True)
    with pytest.raises(ContextLengthError, match="every one of the 2 prompts"):
        fit_to_context(_prompts(7, 9), 5, "skip", bos=True)
    with pytest.raises(TraceError, match="long_prompts must be one of"):
        fit_to_context(_prompts(3), 5, "drop", bos=True)


def test_prompts_that_all_fit_add_no_report_section() -> None:
    fitted = fit_to_context(_prompts(3, 4), 5, "skip", bos=True)
    assert fitted.kept and not fitted.skipped and not fitted.truncated
    assert long_prompts_section(fitted.record()) is None


def test_analyze_skips_a_question_longer_than_the_demo_context(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from loopscope.pipeline import analyze

    paths = analyze(
        "demo", _prompt_file(tmp_path), tmp_path / "out", recurrences=3, settings=QUICK,
        progress=False,
    )  # fmt: skip
    assert "skipped prompt 1:" in capsys.readouterr().out
    metrics = json.loads(paths.metrics_json.read_text())
    (skipped,) = metrics["skipped_prompts"]
    assert skipped["index"] == 1 and skipped["n_tokens"] > DEMO_CONTEXT
    assert skipped["context"] == DEMO_CONTEXT
    assert metrics["truncated_prompts"] == []
    html = paths.html.read_text()
    assert "Skipped and truncated prompts" in html and str(skipped["n_tokens"]) in html
    trace = json.loads((tmp_path / "out" / "trace" / "trace.json").read_text())
    assert trace["n_prompts"] == 2  # the run went on over the two that fit


def test_analyze_truncates_to_the_last_tokens_and_says_how_many(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from loopscope.pipeline import analyze
    from loopscope.trace.store import TraceStore

    paths = analyze(
        "demo", _prompt_file(tmp_path), tmp_path / "out", recurrences=3, settings=QUICK,
        progress=False, long_prompts="truncate",
    )  # fmt: skip
    metrics = json.loads(paths.metrics_json.read_text())
    (cut,) = metrics["truncated_prompts"]
    assert cut["index"] == 1 and cut["n_tokens"] - cut["cut"] == DEMO_CONTEXT
    assert f"cut its first {cut['cut']} of {cut['n_tokens']} tokens" in capsys.readouterr().out
    store = TraceStore(tmp_path / "out" / "trace")
    tokens = store.prompt(1).tokens.tolist()
    ending = list(f"{LONG_QUESTION}\nA:".encode())  # the GSM8K prompt ends with the question
    assert len(tokens) == DEMO_CONTEXT and tokens[1:] == ending[-(DEMO_CONTEXT - 1) :]
    assert tokens[0] == store.prompt(0).tokens[0]  # the BOS stays first
    assert metrics["skipped_prompts"] == []


def test_analyze_error_mode_keeps_todays_refusal(tmp_path: Path) -> None:
    from loopscope.pipeline import analyze

    message = rf"prompt 1 has \d+ tokens .* context is {DEMO_CONTEXT}"
    with pytest.raises(ContextLengthError, match=message):
        analyze(
            "demo", _prompt_file(tmp_path), tmp_path / "out", recurrences=3, settings=QUICK,
            progress=False, long_prompts="error",
        )  # fmt: skip


def test_stages_skips_and_lists_a_long_prompt(tmp_path: Path) -> None:
    from loopscope.studies.stages import run_stages

    paths = run_stages("demo", _prompt_file(tmp_path), tmp_path / "stages", progress=False)
    metrics = json.loads(paths.metrics_json.read_text())
    assert [p["index"] for p in metrics["skipped_prompts"]] == [1]
    assert metrics["stages"]["looped"]["meta"]["n_prompts"] == 2  # the two that fit
    assert "Skipped and truncated prompts" in paths.html.read_text()
    with pytest.raises(ContextLengthError, match="prompt 1 has"):
        run_stages(
            "demo", _prompt_file(tmp_path), tmp_path / "e", progress=False, long_prompts="error"
        )
