"""Training: it learns, it resumes exactly, its schedule and sampling mean what they say."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from loopscope.families.looplm import LoopConfig, LoopLM, load_looplm
from loopscope.training.config import TrainConfig, learning_rate, sample_recurrences
from loopscope.training.evaluation import evaluate
from loopscope.training.export import export_checkpoint
from loopscope.training.loop import TrainingDivergedError, train
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


def _quiet(_: str) -> None:
    pass


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
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
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
    assert float(lm_loss(logits, ids, mask)) == pytest.approx(math.log(10))


def test_export_writes_small_weights_and_a_model_card(tmp_path: Path) -> None:
    train(LoopLM(TINY), CFG, tmp_path / "run", progress=False, stop_after=2, log=_quiet)
    card = export_checkpoint(
        tmp_path / "run",
        tmp_path / "export",
        eval_problems=4,
        command="loopscope train --config tiny",
    )
    exported = tmp_path / "export"
    assert not (exported / "optimizer.safetensors").exists()
    assert (exported / "MODEL_CARD.md").read_text().count("loopscope train --config tiny") == 1
    assert card["steps"] == 2 and 0.0 <= float(str(card["held_out_accuracy"])) <= 1.0
    full = (tmp_path / "run" / "model.safetensors").stat().st_size
    assert (exported / "model.safetensors").stat().st_size < 0.6 * full
    load_looplm(exported)
