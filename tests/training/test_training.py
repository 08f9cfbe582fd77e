"""Training: it learns, it resumes exactly, its schedule and sampling mean what they say."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import quiet as _quiet
from safetensors.torch import load_file, save_file
from tolerances import rounding_tolerance

from loopscope.core.errors import CheckpointError, LoopscopeError
from loopscope.families.looplm import LoopConfig, LoopLM, load_looplm
from loopscope.training.config import (
    TrainConfig,
    TrainConfigError,
    learning_rate,
    sample_recurrences,
)
from loopscope.training.evaluation import evaluate
from loopscope.training.export import export_checkpoint
from loopscope.training.loop import TrainingDivergedError, save_checkpoint, train
from loopscope.training.named_configs import UnknownConfigError, get_config
from loopscope.training.objective import lm_loss

TINY = LoopConfig(
    name="tiny-train",
    d_model=32,
    n_heads=2,
    prelude_layers=1,
    block_layers=1,
    coda_layers=1,
    train_recurrences=2,
    context_length=256,
    injection="concat-linear",
)
CFG = TrainConfig(
    steps=8,
    batch_size=4,
    lr=3e-3,
    min_lr=3e-4,
    warmup_steps=2,
    eval_every=4,
    eval_problems=8,
    accuracy_problems=1,
    max_problem_steps=1,
    checkpoint_every=4,
)


def test_training_lowers_held_out_loss(tmp_path: Path) -> None:
    model = LoopLM(TINY)
    before = evaluate(model, CFG)["eval_loss"]
    result = train(model, CFG, tmp_path / "run", progress=False, log=_quiet)
    after = result.history[-1]["eval_loss"]
    assert after < before - 0.5, (before, after)
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_interrupted_training_resumes_to_the_same_weights(tmp_path: Path) -> None:
    straight = LoopLM(TINY)
    train(straight, CFG, tmp_path / "straight", progress=False, log=_quiet)

    first = LoopLM(TINY)
    partial = train(first, CFG, tmp_path / "resumed", progress=False, stop_after=5, log=_quiet)
    assert partial.steps_done == 5
    state = json.loads((tmp_path / "resumed" / "trainer_state.json").read_text())
    assert state["step"] == 5
    second = LoopLM(TINY)  # a fresh process would start from a fresh model like this
    resumed = train(second, CFG, tmp_path / "resumed", progress=False, log=_quiet)
    assert resumed.resumed_from == 5 and resumed.steps_done == 8
    for (name, a), (_, b) in zip(straight.state_dict().items(), second.state_dict().items()):
        # the same kernels on the same inputs in one process: a resume repeats the arithmetic
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert [h["step"] for h in resumed.history] == [4.0, 8.0]


def test_resume_refuses_a_different_config(tmp_path: Path) -> None:
    train(LoopLM(TINY), CFG, tmp_path / "run", progress=False, stop_after=1, log=_quiet)
    other = TrainConfig(**{**CFG.__dict__, "lr": 1e-4})
    with pytest.raises(ValueError, match="different configuration"):
        train(LoopLM(TINY), other, tmp_path / "run", progress=False, log=_quiet)


def test_divergence_is_reported_and_checkpoint_kept(tmp_path: Path) -> None:
    wild = TrainConfig(
        **{
            **CFG.__dict__,
            "lr": 1e12,
            "warmup_steps": 1,
            "grad_clip": 1e12,
            "steps": 30,
            "eval_every": 100,
        }
    )
    with pytest.raises(TrainingDivergedError, match="lower --lr"):
        train(
            LoopLM(TINY.with_(norm_scheme="post")),
            wild,
            tmp_path / "run",
            progress=False,
            log=_quiet,
        )
    assert (tmp_path / "run" / "trainer_state.json").exists()


def test_schedule_warms_up_then_decays_to_min() -> None:
    cfg = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert learning_rate(0, cfg) == pytest.approx(0.1)
    assert learning_rate(9, cfg) == pytest.approx(1.0)
    assert learning_rate(10, cfg) == pytest.approx(1.0)
    assert learning_rate(55, cfg) == pytest.approx(0.55)
    assert learning_rate(100, cfg) == pytest.approx(0.1)


def test_huginn_recurrence_sampling_is_seeded_bounded_and_has_the_mean() -> None:
    cfg = TrainConfig(recurrence_sampling="huginn", mean_recurrences=8, max_recurrences=40)
    draws = [sample_recurrences(s, cfg, 4) for s in range(2000)]
    assert draws == [sample_recurrences(s, cfg, 4) for s in range(2000)]
    assert min(draws) >= 1 and max(draws) <= 40
    assert abs(sum(draws) / len(draws) - 8) < 0.5
    assert sample_recurrences(3, TrainConfig(), 4) == 4


def test_lm_loss_ignores_padding() -> None:
    logits = torch.zeros(1, 4, 10)
    ids = torch.tensor([[1, 2, 3, 0]])
    mask = torch.tensor([[True, True, True, False]])
    loss = rounding_tolerance(torch.float32, 1.0, 3 + 3)  # log-sum-exp, then a mean of 3
    assert float(lm_loss(logits, ids, mask)) == pytest.approx(math.log(10), rel=loss)


def test_export_writes_small_weights_and_a_model_card(tmp_path: Path) -> None:
    train(LoopLM(TINY), CFG, tmp_path / "run", progress=False, stop_after=2, log=_quiet)
    card = export_checkpoint(
        tmp_path / "run",
        tmp_path / "export",
        eval_problems=4,
        recurrences=[1, 2, 4],
        command="loopscope train --config tiny",
    )
    exported = tmp_path / "export"
    assert not (exported / "optimizer.safetensors").exists()
    markdown = (exported / "MODEL_CARD.md").read_text()
    assert markdown.count("loopscope train --config tiny") == 1
    assert "| 4 |" in markdown and "accuracy_vs_recurrences.png" in markdown
    assert (exported / "accuracy_vs_recurrences.png").stat().st_size > 1000
    assert card["steps"] == 2 and 0.0 <= float(str(card["held_out_accuracy"])) <= 1.0
    assert card["held_out_problems"] == 4 and card["held_out_recurrences"] == 2  # trained at 2
    assert set(card["accuracy_vs_recurrences"]) == {"1", "2", "4"}  # type: ignore[arg-type]
    assert float(str(card["train_seconds"])) > 0  # recorded by the training loop
    full = (tmp_path / "run" / "model.safetensors").stat().st_size
    assert (exported / "model.safetensors").stat().st_size < 0.6 * full
    load_looplm(exported)


def test_bad_training_settings_are_named_with_their_flag() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"steps": 0}, r"steps \(--steps\) must be ≥ 1"),
        ({"batch_size": "4"}, r"batch_size \(--batch-size\) must be a whole number"),
        ({"lr": float("nan")}, r"lr \(--lr\) must be a finite number > 0"),
        ({"eval_every": 0}, "eval_every must be ≥ 1"),
        ({"loss": "mean"}, "loss must be one of final, all-recurrences"),
        ({"max_problem_steps": 99}, "max_problem_steps must be ≤"),
    ]
    for change, message in cases:
        with pytest.raises(TrainConfigError, match=message):
            replace(CFG, **change)
    with pytest.raises(TrainConfigError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({**asdict(CFG), "stepz": 3})
    assert TrainConfig.from_dict(asdict(CFG)) == CFG


def test_an_unknown_config_name_is_a_loopscope_error() -> None:
    with pytest.raises(UnknownConfigError, match="known configs: .*smoke-tiny") as info:
        get_config("nope")
    assert isinstance(info.value, LoopscopeError) and isinstance(info.value, KeyError)
    assert str(info.value).startswith("no config named 'nope'")  # not quoted as KeyError does


def test_export_refuses_a_directory_that_is_not_a_training_run(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "plain", LoopLM(TINY), CFG)
    (tmp_path / "plain" / "train_config.json").unlink()
    with pytest.raises(CheckpointError, match="no train_config.json or trainer_state.json"):
        export_checkpoint(tmp_path / "plain", tmp_path / "export")


def test_resume_reads_only_the_snapshot_never_the_exported_files(tmp_path: Path) -> None:
    """The loadable model files may lag the snapshot (a kill between the two writes) or be
    damaged; a resumed run still ends with the weights of an uninterrupted one."""
    straight = LoopLM(TINY)
    train(straight, CFG, tmp_path / "straight", progress=False, log=_quiet)
    run = tmp_path / "run"
    train(LoopLM(TINY), CFG, run, progress=False, stop_after=5, log=_quiet)
    (run / "model.safetensors").write_bytes(b"damaged")
    (run / "optimizer.safetensors").write_bytes(b"not read either")
    resumed = LoopLM(TINY)
    assert train(resumed, CFG, run, progress=False, log=_quiet).resumed_from == 5
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_directory_from_before_the_snapshot_still_resumes(tmp_path: Path) -> None:
    """Older runs kept weights, optimizer state and step in three files; they resume too."""
    straight = LoopLM(TINY)
    train(straight, CFG, tmp_path / "straight", progress=False, log=_quiet)
    run = tmp_path / "run"
    train(LoopLM(TINY), CFG, run, progress=False, stop_after=5, log=_quiet)
    snapshot = load_file(str(run / "resume" / "state.safetensors"))
    moments = {k.removeprefix("optimizer."): v for k, v in snapshot.items() if "optimizer." in k}
    save_file(moments, str(run / "optimizer.safetensors"))
    shutil.rmtree(run / "resume")
    resumed = LoopLM(TINY)
    assert train(resumed, CFG, run, progress=False, log=_quiet).resumed_from == 5
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
