"""``loopscope analyze`` on an hrm_text checkpoint directory, end to end: the checkpoint's own
tokenizer encodes the prompts and the two-scale study writes the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hrm_checkpoints import save_reference, save_word_tokenizer

from loopscope.cli.main import main
from loopscope.core.errors import LoopscopeError
from loopscope.families.hrm_text import NestedOnlyError, load_hrm_text
from loopscope.pipeline import trace
from loopscope.trace.settings import PromptInput


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("hrm_cli")
    save_reference(directory, seed=2)
    save_word_tokenizer(directory)
    return directory


def test_analyze_runs_the_two_scale_study(checkpoint: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w1 w2 w3 w4\nw5 w6 w7\n")
    out = tmp_path / "out"
    assert main(["analyze", str(checkpoint), "--prompts", str(prompts), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"]["family"] == "hrm_text"
    assert metrics["two_scale"]["prompts"] == 2
    assert set(metrics["two_scale"]["verdict"]) == {"inner", "outer"}
    html = (out / "report.html").read_text()
    assert "w1 w2 w3 w4" in html and "Two timescales" in html
    assert not (out / "trace").exists()


def test_trace_only_flags_are_refused(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w1 w2\n")
    args = ["analyze", str(checkpoint), "--prompts", str(prompts), "--out", str(tmp_path / "o")]
    assert main([*args, "--loop", "0:1"]) == 2
    assert "does not take --loop" in capsys.readouterr().err


def test_the_single_loop_trace_refuses_a_nested_model(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(NestedOnlyError, match="nested loops") as caught:
        trace(load_hrm_text(checkpoint), [PromptInput("w1 w2", [1, 2])], tmp_path / "trace")
    assert isinstance(caught.value, LoopscopeError)
