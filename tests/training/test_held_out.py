"""The model card's held-out accuracy: standard errors, the curve's bookkeeping, and answers
judged exactly as the uncached decoder's would be."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

import loopscope
from loopscope.data import ByteTokenizer, format_prompt, parse_model_answer
from loopscope.engine.generation import generate_greedy
from loopscope.training.config import TrainConfig
from loopscope.training.held_out import (
    HeldOutAccuracy,
    binomial_standard_error,
    held_out_accuracy,
    held_out_problems,
    plot_held_out,
    recurrence_gains,
)


def test_binomial_standard_error_has_its_closed_form() -> None:
    assert binomial_standard_error(0.5, 100) == pytest.approx(0.05)
    assert binomial_standard_error(0.2, 256) == pytest.approx(math.sqrt(0.16 / 256))
    assert binomial_standard_error(0.0, 10) == 0.0 and math.isnan(binomial_standard_error(0.5, 0))


def test_the_card_counts_hits_per_recurrence_and_difficulty() -> None:
    record = HeldOutAccuracy(
        recurrences=[1, 4, 8],
        train_recurrences=4,
        steps=[1, 1, 2, 2],
        correct={
            1: [True, False, False, False],
            4: [True, True, True, False],
            8: [True, True, True, True],
        },
    )
    card = record.to_card()
    assert card["held_out_recurrences"] == 4 and card["held_out_accuracy"] == 0.75
    assert card["held_out_accuracy_se"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    assert card["accuracy_vs_recurrences"]["8"]["accuracy"] == 1.0
    by_steps = card["accuracy_vs_recurrences_by_steps"]
    assert by_steps["1"]["1"]["accuracy"] == 0.5 and by_steps["2"]["1"]["accuracy"] == 0.0
    assert by_steps["2"]["4"]["problems"] == 2 and by_steps["2"]["4"]["accuracy"] == 0.5
    assert by_steps["2"]["4"]["se"] == pytest.approx(0.5 / math.sqrt(2))
    untrained_count = replace(record, train_recurrences=5)
    assert untrained_count.headline_recurrences == 4  # the nearest measured count, lower first
    plot_held_out({**card, "name": "m", "train_recurrences": 4}, twin={**card, "name": "ff"})


def test_answers_are_judged_as_the_uncached_decoder_would_judge_them() -> None:
    """Each problem's reference is set to what the uncached decoder answers (even rows) or
    left as it is (odd rows): the cached judge must mark exactly the rows that match. The
    bundled looped model writes numbers, so some rows do match."""
    model = loopscope.load("demo")
    tokenizer = ByteTokenizer()
    problems = held_out_problems(TrainConfig(max_problem_steps=2), 6)
    expected, edited = [], []
    for i, p in enumerate(problems):
        prompt = tokenizer.encode(format_prompt(p.question), bos=True)
        out = generate_greedy(
            model,
            prompt,
            recurrences=3,
            max_new_tokens=64,
            stop_id=tokenizer.eos_id,
            kv_cache=False,
        )
        parsed = parse_model_answer(tokenizer.decode(out.tokens))
        if i % 2 == 0 and parsed is not None and parsed.lstrip("-").isdigit():
            p = replace(p, final_answer=int(parsed))
        edited.append(p)
        expected.append(parsed == str(p.final_answer))
    assert any(expected), "the model wrote no number at all"
    record = held_out_accuracy(model, edited, [3], batch_size=4, max_new_tokens=64)
    assert record.correct[3] == expected
    assert record.steps == [p.steps for p in problems]


def test_recurrence_gains_read_each_difficulty_off_its_curve() -> None:
    def curve(values: dict[int, float]) -> dict[str, dict[str, float]]:
        return {str(r): {"accuracy": a, "se": 0.0, "problems": 100} for r, a in values.items()}

    card = {
        "train_recurrences": 4,
        "accuracy_vs_recurrences_by_steps": {
            "1": curve({1: 0.1, 2: 0.96, 3: 1.0, 4: 1.0, 8: 1.0}),
            "2": curve({1: 0.0, 2: 0.2, 3: 0.4, 4: 0.5, 8: 0.6}),
            "3": curve({1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0, 8: 0.0}),
        },
        "accuracy_vs_recurrences": curve({1: 0.05, 2: 0.5, 3: 0.6, 4: 0.7, 8: 0.75}),
    }
    easy, hard, impossible, overall = recurrence_gains(card)
    assert (easy.problems, easy.best, easy.best_at, easy.near_best_from) == ("1-step", 1.0, 3, 2)
    assert easy.late_gain == pytest.approx(1.0 - 0.96) and easy.past_training == 0.0
    assert (hard.best_at, hard.near_best_from) == (8, 8)  # 0.57 is 95% of 0.6: only R = 8
    assert hard.late_gain == pytest.approx(0.3) and hard.past_training == pytest.approx(0.1)
    assert impossible.near_best_from is None and impossible.best_at == 1
    assert overall.problems == "all" and overall.late_gain == pytest.approx(0.2)
    no_half = {**card, "train_recurrences": 1}
    assert recurrence_gains(no_half)[0].late_gain is None
