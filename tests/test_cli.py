"""The command line end to end on a tiny checkpoint, and its error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loopscope.cli.main import main
from loopscope.data import generate_problems, write_jsonl
from loopscope.families.looplm import LoopConfig, LoopLM
from loopscope.training.config import TrainConfig
from loopscope.training.loop import save_checkpoint

TINY = LoopConfig(
    name="tiny-cli",
    d_model=16,
    n_heads=2,
    prelude_layers=1,
    block_layers=2,
    coda_layers=1,
    train_recurrences=2,
    context_length=384,
    injection="concat-linear",
)


def trace_args(workspace: Path, *extra: str) -> list[str]:
    """``loopscope trace`` of the tiny looped model for 4 recurrences, quietly, plus ``extra``."""
    return [
        "trace",
        str(workspace / "looped"),
        "--prompts",
        str(workspace / "prompts.jsonl"),
        "--recurrences",
        "4",
        "--no-progress",
        "--stability-prompts",
        "0",
        *extra,
    ]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    save_checkpoint(root / "looped", LoopLM(TINY), TrainConfig())
    feedforward = TINY.with_(
        name="tiny-ff",
        prelude_layers=0,
        coda_layers=0,
        block_layers=4,
        train_recurrences=1,
        injection="none",
        init_state="prelude",
    )
    save_checkpoint(root / "ff", LoopLM(feedforward), TrainConfig())
    write_jsonl(generate_problems(2, seed=3, max_steps=1), root / "prompts.jsonl")
    return root


def test_analyze_writes_report_and_metrics(workspace: Path) -> None:
    out = workspace / "analyze"
    code = main(
        [
            "analyze",
            str(workspace / "looped"),
            "--prompts",
            str(workspace / "prompts.jsonl"),
            "--recurrences",
            "6",
            "--out",
            str(out),
            "--no-progress",
            "--stability-prompts",
            "1",
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dynamics"]["prompts"] == 2
    assert (out / "figures" / "fixed_point.png").exists()
    assert main(["report", str(out / "trace"), "--out", str(workspace / "again")]) == 0
    assert (workspace / "again" / "report.html").exists()


def test_trace_resumes_and_refuses_another_model(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = trace_args(workspace, "--out", str(workspace / "trace"))
    assert main(args) == 0
    assert main(args) == 0  # nothing left to do: resumes past both prompts
    other = args.copy()
    other[1] = str(workspace / "ff")
    assert main(other) == 2
    assert "different model" in capsys.readouterr().err


def test_stages_against_feedforward_reference(workspace: Path) -> None:
    out = workspace / "stages"
    code = main(
        [
            "stages",
            str(workspace / "looped"),
            "--prompts",
            str(workspace / "prompts.jsonl"),
            "--reference",
            str(workspace / "ff"),
            "--recurrences",
            "3",
            "--out",
            str(out),
            "--no-progress",
            "--intervene",
            "block.0.mlp:zero",
        ]
    )
    assert code == 0
    assert (out / "report.html").exists()


def test_adaptive_writes_table(workspace: Path) -> None:
    out = workspace / "adaptive"
    code = main(
        [
            "adaptive",
            str(workspace / "looped"),
            "--prompts",
            str(workspace / "prompts.jsonl"),
            "--recurrences",
            "6",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert "criterion" in (out / "adaptive.md").read_text()


def test_errors_name_the_problem(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = workspace / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "#### 1"}\n{"question": \n')
    code = main(
        [
            "trace",
            str(workspace / "looped"),
            "--prompts",
            str(bad),
            "--out",
            str(workspace / "bad-trace"),
            "--no-progress",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "line 2" in err
    assert main(["train", "--config", "no-such-config"]) == 2
    assert "known configs" in capsys.readouterr().err
    assert (
        main(
            [
                "trace",
                str(workspace / "nowhere"),
                "--prompts",
                str(workspace / "prompts.jsonl"),
                "--out",
                str(workspace / "x"),
            ]
        )
        == 2
    )
    assert "cannot load" in capsys.readouterr().err
    assert (
        main(
            [
                "trace",
                str(workspace / "looped"),
                "--prompts",
                str(workspace / "prompts.jsonl"),
                "--out",
                str(workspace / "y"),
                "--layers",
                "9",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "unknown block layer index" in capsys.readouterr().err


def test_trace_solves_the_reference_with_the_chosen_anderson_settings(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = trace_args(
        workspace, "--limit", "1", "--capture", "summary", "--fixed-point", "anderson"
    )
    out = workspace / "aa-trace"
    tuned = ["--anderson-memory", "20", "--anderson-beta", "2", "--fixed-point-tol", "1e-4"]
    assert main([*base, "--out", str(out), *tuned]) == 0
    info = json.loads(next(out.rglob("fixed_point.json")).read_text())
    assert (info["memory"], info["beta"]) == (20, 2.0)
    assert info["converged"] and info["relative_residual"] <= 1e-4
    assert main([*base, "--out", str(workspace / "aa-bad"), "--anderson-beta", "0"]) == 2
    assert "fixed_point_beta" in capsys.readouterr().err
    assert main([*base, "--out", str(workspace / "aa-bad2"), "--anderson-memory", "0"]) == 2
    assert "fixed_point_memory" in capsys.readouterr().err
