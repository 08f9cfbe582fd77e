"""The flags that set what a trace costs: ``--long-prompts``, ``--capture auto`` with
``--max-disk``, ``--state-dtype``, ``--batch-size auto`` and ``--dtype``, on the demo model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from loopscope.cli.main import main
from loopscope.families.checkpoint import bundled_model_dir

LONG_QUESTION = "A farmer counts " + "cows and sheep in the field, " * 40 + "how many legs total?"
DEMO_CONTEXT = json.loads((bundled_model_dir("demo-looped") / "config.json").read_text())[
    "context_length"
]


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    """Two short GSM8K questions around one longer than the demo model's context."""
    assert len(LONG_QUESTION.encode()) == 1196 > DEMO_CONTEXT
    path = tmp_path / "prompts.jsonl"
    rows = ["What is 2 plus 3?", LONG_QUESTION, "Tom has 5 apples and eats 2. How many left?"]
    path.write_text("".join(json.dumps({"question": q, "answer": "#### 1"}) + "\n" for q in rows))
    return path


def _trace(prompts: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "trace", "demo", "--prompts", str(prompts), "--out", str(out), "--recurrences", "3",
            "--stability-prompts", "0", "--no-attention", "--no-progress", *extra,
        ]
    )  # fmt: skip


def test_long_prompts_are_skipped_by_default_and_the_run_goes_on(
    prompts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _trace(prompts, tmp_path / "t") == 0
    out = capsys.readouterr().out
    assert "skipped prompt 1:" in out and "traced 2 prompts" in out
    header = json.loads((tmp_path / "t" / "trace.json").read_text())
    assert [p["index"] for p in header["long_prompts"]["skipped"]] == [1]


def test_truncate_and_error_modes(
    prompts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _trace(prompts, tmp_path / "t", "--long-prompts", "truncate") == 0
    assert "truncated prompt 1: cut its first" in capsys.readouterr().out
    assert _trace(prompts, tmp_path / "e", "--long-prompts", "error") == 2
    err = capsys.readouterr().err
    assert "prompt 1 has" in err and f"context is {DEMO_CONTEXT}" in err and "--long-prompts" in err


def test_capture_auto_falls_back_to_summary_under_a_tiny_max_disk(
    prompts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _trace(prompts, tmp_path / "t", "--max-disk", "10kB") == 0
    out = capsys.readouterr().out
    assert "keeping online summaries only" in out and "estimated trace size on disk" in out
    header = json.loads((tmp_path / "t" / "trace.json").read_text())
    assert header["settings"]["capture"] == "summary"
    assert header["capture"]["requested"] == "auto" and header["capture"]["max_disk"] == 10**4
    assert not (tmp_path / "t" / "prompt_00000" / "block.npy").exists()
    assert _trace(prompts, tmp_path / "roomy") == 0  # the default 20 GB: states kept
    assert "capture full (auto: the states fit)" in capsys.readouterr().out
    assert (tmp_path / "roomy" / "prompt_00000" / "block.npy").exists()


def test_state_dtype_and_model_dtype_flags(
    prompts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _trace(prompts, tmp_path / "h", "--state-dtype", "float16") == 0
    assert np.load(tmp_path / "h" / "prompt_00000" / "block.npy").dtype == np.float16
    assert _trace(prompts, tmp_path / "b", "--dtype", "bfloat16", "--device", "cpu") == 0
    header = json.loads((tmp_path / "b" / "trace.json").read_text())
    assert header["runtime"] == {"device": "cpu", "dtype": "bfloat16"}
    assert header["settings"]["state_dtype"] == "float16"  # auto, for a bfloat16 model
    assert "states in float16" in capsys.readouterr().out


def test_batch_size_auto_is_resolved_and_printed(
    prompts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _trace(prompts, tmp_path / "t", "--batch-size", "auto") == 0
    assert "batch size 2 (auto:" in capsys.readouterr().out  # two prompts fit
    with pytest.raises(SystemExit) as bad:  # argparse: one line, status 2
        _trace(prompts, tmp_path / "x", "--batch-size", "lots")
    assert bad.value.code == 2
    assert "whole number or auto" in capsys.readouterr().err
