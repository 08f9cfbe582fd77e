"""The command line end to end on a tiny checkpoint, and its error messages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO_ROOT

from loopscope.cli.common import build_parser, one_line, run_options
from loopscope.cli.main import COMMANDS, main
from loopscope.cli.training import train_setup
from loopscope.core.errors import CheckpointError, LoopscopeError
from loopscope.data import DataFormatError, generate_problems, write_jsonl
from loopscope.engine.interventions import InterventionError
from loopscope.engine.loop import ContextLengthError
from loopscope.families.looplm import LoopConfig, LoopLM
from loopscope.trace.settings import TraceError
from loopscope.trace.store import TraceStore
from loopscope.training.checkpoints import save_checkpoint
from loopscope.training.config import TrainConfig
from loopscope.training.named_configs import get_config

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


# --------------------------------------------------------------------------- the command table

#: Each model-running command with the arguments it needs besides the common flags.
MODEL_COMMANDS: dict[str, list[str]] = {
    "demo": ["demo", "--out", "o"],
    "trace": ["trace", "m", "--prompts", "p", "--out", "o"],
    "analyze": ["analyze", "m", "--prompts", "p", "--out", "o"],
    "stages": ["stages", "m", "--prompts", "p", "--out", "o"],
    "adaptive": ["adaptive", "m", "--prompts", "p", "--out", "o"],
    "evaluate": ["evaluate", "m", "--prompts", "p", "--out", "o"],
    "ablate random-init": ["ablate", "random-init", "--out", "o"],
    "ablate trained": ["ablate", "trained", "--out", "o"],
    "train": ["train", "--config", "demo-looped"],
}


def test_help_lists_every_command_of_the_table_in_order(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    listing = capsys.readouterr().out
    names = [c.name for c in COMMANDS]
    expected = ["demo", "trace", "analyze", "report", "compare", "stages", "adaptive"]
    expected += ["evaluate", "ablate"]
    expected += ["train"]
    assert names == [*expected, "export", "convert-trace"]
    # a name longer than the help column stands on its own line, its help on the next
    listed = [re.search(rf"^    {re.escape(name)}\s", listing, re.MULTILINE) for name in names]
    positions = [match.start() if match else -1 for match in listed]
    assert -1 not in positions
    assert positions == sorted(positions)
    readme = (REPO_ROOT / "README.md").read_text()
    assert all(f"`loopscope {name}" in readme for name in names)


@pytest.mark.parametrize("command", sorted(MODEL_COMMANDS))
def test_every_model_running_command_takes_the_common_flags(command: str) -> None:
    flags = ["--device", "cpu", "--dtype", "float32", "--threads", "1", "--no-progress"]
    flags += ["--limit", "3"]
    args = build_parser(COMMANDS).parse_args([*MODEL_COMMANDS[command], *flags])
    assert args.command_path == command
    options = run_options(args)
    assert (options.device, options.dtype, options.threads) == ("cpu", "float32", 1)
    assert (options.limit, options.progress) == (3, False)
    assert options.build_dtype() == torch.float32


def test_defaults_are_cpu_and_float32_without_a_gpu(workspace: Path) -> None:
    args = build_parser(COMMANDS).parse_args(["trace", "demo", "--prompts", "p", "--out", "o"])
    options = run_options(args)
    assert options.device == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        assert options.load_dtype("demo") == torch.float32
    # tracing fits its batch to free memory unless told (--batch-size auto)
    assert (options.batch_size, options.batch_auto) == (None, True)
    assert (options.seed, options.limit) == (0, None)
    stages = build_parser(COMMANDS).parse_args(["stages", "demo", "--prompts", "p", "--out", "o"])
    assert (run_options(stages).batch_size, run_options(stages).batch_auto) == (1, False)


def test_dtype_reaches_the_loaded_model(workspace: Path) -> None:
    args = build_parser(COMMANDS).parse_args(
        [*trace_args(workspace, "--out", "o"), "--dtype", "float16", "--device", "cpu"]
    )
    model = run_options(args).load(args.model)
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_train_builds_in_the_dtype_and_uses_batch_size_and_seed() -> None:
    argv = ["train", "--config", "demo-looped", "--steps", "3", "--dtype", "bfloat16"]
    args = build_parser(COMMANDS).parse_args([*argv, "--batch-size", "2", "--seed", "5"])
    model, cfg = train_setup(args, run_options(args))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert (cfg.batch_size, cfg.seed, cfg.steps) == (2, 5, 3)
    plain = build_parser(COMMANDS).parse_args(["train", "--config", "demo-looped"])
    model, cfg = train_setup(plain, run_options(plain))
    named = get_config("demo-looped").train
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert (cfg.batch_size, cfg.seed, cfg.steps) == (named.batch_size, named.seed, named.steps)


def test_threads_sets_torch_threads(workspace: Path) -> None:
    before = torch.get_num_threads()
    try:
        args = trace_args(workspace, "--limit", "1", "--out", str(workspace / "threads"))
        assert main([*args, "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_limit_traces_only_the_first_prompts(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = workspace / "three.txt"
    prompts.write_text("one plus one\ntwo plus two\nthree plus three\n")
    args = trace_args(workspace, "--out", str(workspace / "limited"), "--limit", "2")
    args[3] = str(prompts)
    assert main(args) == 0
    assert "traced 2 prompts" in capsys.readouterr().out
    assert len(TraceStore(workspace / "limited")) == 2


def test_seed_reaches_the_trace_settings(workspace: Path) -> None:
    states = []
    for seed in ("1", "2"):
        out = workspace / f"seed-{seed}"
        args = trace_args(workspace, "--limit", "1", "--init-state", "random", "--out", str(out))
        assert main([*args, "--seed", seed]) == 0
        assert TraceStore(out).settings["seed"] == int(seed)
        states.append(np.array(TraceStore(out).prompt(0).block))
    assert not np.array_equal(states[0], states[1])


def test_no_progress_silences_the_adaptive_bar(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["adaptive", str(workspace / "looped"), "--prompts", str(workspace / "prompts.jsonl")]
    base += ["--recurrences", "3", "--batch-size", "1"]
    assert main([*base, "--out", str(workspace / "adaptive-bar")]) == 0
    assert "adaptive" in capsys.readouterr().err
    assert main([*base, "--out", str(workspace / "adaptive-quiet"), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_flags_a_command_cannot_honour_are_refused(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = trace_args(workspace, "--out", str(workspace / "refused"))
    stages = ["stages", str(workspace / "looped"), "--prompts", str(workspace / "prompts.jsonl")]
    assert main([*stages, "--out", str(workspace / "refused"), "--batch-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "loopscope stages does not take --batch-size 2" in err
    assert "one prompt per forward pass" in err
    assert not (workspace / "refused").exists()
    assert main(["train", "--config", "demo-looped", "--limit", "3"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main(["ablate", "trained", "--out", str(workspace / "t"), "--dtype", "float16"]) == 2
    assert "float32" in capsys.readouterr().err
    assert main([*args, "--batch-size", "0"]) == 2  # refused whatever the command
    assert main([*args, "--threads", "-1"]) == 2
    assert "--threads must be ≥ 0" in capsys.readouterr().err


def test_trace_takes_a_batch_size_and_refuses_it_with_ray(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = workspace / "batched"
    assert main([*trace_args(workspace, "--out", str(out)), "--batch-size", "2"]) == 0
    assert TraceStore(out).completed() == [0, 1]
    ray = trace_args(workspace, "--out", str(workspace / "ray"), "--ray", "auto")
    assert main([*ray, "--batch-size", "2"]) == 2
    assert "--batch-size is not supported with --ray" in capsys.readouterr().err


def test_device_is_checked_before_any_work(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = trace_args(workspace, "--out", str(workspace / "device"))
    assert main([*args, "--device", "toaster"]) == 2
    assert "not a torch device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*args, "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert main([*args, "--device", "cpu", "--limit", "1"]) == 0


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "error",
    [CheckpointError, DataFormatError, TraceError, InterventionError, ContextLengthError],
)
def test_user_fixable_errors_are_loopscope_errors(error: type[Exception]) -> None:
    assert issubclass(error, LoopscopeError) and issubclass(error, ValueError)


def test_errors_print_one_line_and_exit_2(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    long_prompt = workspace / "long.txt"
    long_prompt.write_text("x" * 500 + "\n")
    cases = {
        "cannot load": trace_args(workspace, "--out", str(workspace / "e1")),
        "has 2 block layers": [
            "stages",
            str(workspace / "looped"),
            "--prompts",
            str(workspace / "prompts.jsonl"),
            "--out",
            str(workspace / "e2"),
            "--intervene",
            "block.7.mlp",
        ],
        "shorten it": trace_args(workspace, "--out", str(workspace / "e3")),
    }
    cases["cannot load"][1] = str(workspace / "nowhere")
    cases["shorten it"][3] = str(long_prompt)
    for expected, argv in cases.items():
        assert main(argv) == 2, expected
        err = capsys.readouterr().err
        assert err.startswith("loopscope: error: ") and expected in err, err
        assert err.count("\n") == 1 and "Traceback" not in err


def test_one_line_joins_a_multi_line_message() -> None:
    assert one_line(LoopscopeError("first line\n  second line\n")) == "first line second line"
    assert one_line(KeyError("no such key")) == "no such key"


def test_a_malformed_command_line_is_one_line_with_status_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """argparse's own errors (a value of the wrong type, an unknown command) follow the same
    one-line, status-2 rule as every other loopscope error."""
    for argv in (["train", "--steps", "x"], ["no-such-command"], ["trace"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("loopscope: error:") and "\n" not in err, err
