"""Held-out exact-answer accuracy of a trained model against test-time recurrences, as its
model card reports it.

A looped model is worth shipping when extra recurrences buy accuracy, so the card measures
accuracy at several recurrence counts (not only the training one), on enough problems for the
binomial standard error to separate two models, and split by problem difficulty (steps), since
harder problems are the ones that should gain from depth. Answers are decoded greedily with the
per-recurrence key/value cache and read as training's held-out accuracy reads them
(:func:`loopscope.data.parse_model_answer`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from loopscope.data.synthetic import Problem
from loopscope.training.config import TrainConfig, derive_seed

__all__ = [
    "CARD_RECURRENCES",
    "HeldOutAccuracy",
    "RecurrenceGain",
    "binomial_standard_error",
    "held_out_accuracy",
    "held_out_problems",
    "plot_held_out",
    "recurrence_gains",
]

#: Recurrence counts a looped model's card measures: below, at and well past a training depth
#: of 4 (a feedforward model is measured once).
CARD_RECURRENCES = (1, 2, 3, 4, 6, 8, 16, 32)


def binomial_standard_error(accuracy: float, n: int) -> float:
    """√(p(1−p)/n): the spread of an accuracy measured on ``n`` independent problems."""
    return math.sqrt(accuracy * (1.0 - accuracy) / n) if n > 0 else float("nan")


def held_out_problems(cfg: TrainConfig, n: int) -> list[Problem]:
    """The first ``n`` problems of the held-out stream training evaluates on (evaluation seed,
    the training step range): never trained on, the same for every model of that config."""
    from loopscope.data import generate_problems

    return generate_problems(
        n,
        seed=derive_seed("eval", cfg.eval_seed, 0),
        min_steps=cfg.min_problem_steps,
        max_steps=cfg.max_problem_steps,
    )


@dataclass(frozen=True)
class HeldOutAccuracy:
    """Which held-out problems were answered exactly, at each recurrence count."""

    recurrences: list[int]
    train_recurrences: int
    steps: list[int]  # per problem: its number of calculation steps (its difficulty)
    correct: dict[int, list[bool]]  # per recurrence count, per problem

    @property
    def problems(self) -> int:
        return len(self.steps)

    def accuracy(self, recurrences: int, steps: int | None = None) -> tuple[float, int]:
        """(accuracy, problems counted) at ``recurrences``, over problems of ``steps`` steps
        (every problem when None)."""
        hits = [c for c, s in zip(self.correct[recurrences], self.steps) if steps in (None, s)]
        return (sum(hits) / len(hits) if hits else float("nan")), len(hits)

    def to_card(self) -> dict[str, Any]:
        """The card's fields: headline accuracy at the training count with its standard error,
        and the curve overall and by difficulty."""
        head, n = self.accuracy(self.headline_recurrences)
        return {
            "held_out_problems": n,
            "held_out_accuracy": head,
            "held_out_accuracy_se": binomial_standard_error(head, n),
            "held_out_recurrences": self.headline_recurrences,
            "accuracy_vs_recurrences": {
                str(r): self._point(self.accuracy(r)) for r in self.recurrences
            },
            "accuracy_vs_recurrences_by_steps": {
                str(s): {str(r): self._point(self.accuracy(r, s)) for r in self.recurrences}
                for s in sorted(set(self.steps))
            },
        }

    @property
    def headline_recurrences(self) -> int:
        """The recurrence count the headline accuracy is quoted at: the training count when it
        was measured, else the nearest measured one."""
        return min(self.recurrences, key=lambda r: (abs(r - self.train_recurrences), r))

    @staticmethod
    def _point(measured: tuple[float, int]) -> dict[str, float | int]:
        accuracy, n = measured
        return {"accuracy": accuracy, "se": binomial_standard_error(accuracy, n), "problems": n}


def held_out_accuracy(
    model: Any,
    problems: Sequence[Problem],
    recurrences: Sequence[int],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 96,
    progress: bool = False,
) -> HeldOutAccuracy:
    """Answer every problem greedily at every recurrence count (KV cache on) and mark which
    answers are exactly the reference's final number."""
    from loopscope.data import ByteTokenizer, format_prompt, parse_model_answer
    from loopscope.engine.generation import generate_at_recurrences

    tokenizer = ByteTokenizer()
    prompts = [tokenizer.encode(format_prompt(p.question), bos=True) for p in problems]
    correct: dict[int, list[bool]] = {r: [] for r in recurrences}
    answers = generate_at_recurrences(
        model,
        prompts,
        recurrences,
        batch_size=batch_size,
        desc="held-out accuracy",
        progress=progress,
        max_new_tokens=max_new_tokens,
        stop_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
    )
    for r, index, out in answers:
        parsed = parse_model_answer(tokenizer.decode(out.tokens))
        correct[r].append(parsed == str(problems[index].final_answer))
    return HeldOutAccuracy(
        recurrences=list(recurrences),
        train_recurrences=model.meta.train_recurrences,
        steps=[p.steps for p in problems],
        correct=correct,
    )


#: A difficulty "has its accuracy" from the fewest recurrences reaching this share of its best.
NEAR_BEST = 0.95


@dataclass(frozen=True)
class RecurrenceGain:
    """What extra test-time recurrences buy one difficulty, read off its accuracy curve:
    ``late_gain`` is accuracy at the training depth T minus accuracy at the largest measured
    count ≤ T/2 (the second half of the trained depth); ``past_training`` the best accuracy
    past T minus accuracy at T (None when a count is not measured)."""

    problems: str
    best: float
    best_at: int
    near_best_from: int | None
    late_gain: float | None
    past_training: float | None


def recurrence_gains(card: dict[str, Any]) -> list[RecurrenceGain]:
    """One :class:`RecurrenceGain` per difficulty of a looped model's card, then all
    problems together: harder problems that need more recurrences show it here."""
    trained = int(card["train_recurrences"])
    curves = [(f"{k}-step", v) for k, v in card["accuracy_vs_recurrences_by_steps"].items()]
    curves.append(("all", card["accuracy_vs_recurrences"]))
    return [_gain(name, curve, trained) for name, curve in curves]


def _gain(name: str, curve: dict[str, dict[str, float]], trained: int) -> RecurrenceGain:
    acc = {int(r): float(v["accuracy"]) for r, v in curve.items()}
    best_at = max(sorted(acc), key=lambda r: acc[r])  # the fewest recurrences on a tie
    near = [r for r in sorted(acc) if acc[r] >= NEAR_BEST * acc[best_at]]
    half = [r for r in acc if r <= trained / 2]
    past = [acc[r] for r in acc if r > trained]
    at_trained = acc.get(trained)
    return RecurrenceGain(
        problems=name,
        best=acc[best_at],
        best_at=best_at,
        near_best_from=near[0] if acc[best_at] > 0 else None,
        late_gain=None if at_trained is None or not half else at_trained - acc[max(half)],
        past_training=None if at_trained is None or not past else max(past) - at_trained,
    )


def plot_held_out(card: dict[str, Any], twin: dict[str, Any] | None = None) -> Figure:
    """Two panels from a card: accuracy against recurrences with ±1 standard error (the
    feedforward twin's accuracy as a band when given), and the curve by difficulty."""
    fig = Figure(figsize=(10.0, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    overall, by_steps = fig.subplots(1, 2, sharey=True)
    _curve(overall, card["accuracy_vs_recurrences"], f"{card['name']} (all problems)", "C0")
    if twin is not None:
        acc, se = float(twin["held_out_accuracy"]), float(twin["held_out_accuracy_se"])
        overall.axhspan(acc - se, acc + se, color="tab:orange", alpha=0.2)
        overall.axhline(acc, color="tab:orange", label=f"{twin['name']} (feedforward)")
    for i, (steps, curve) in enumerate(card["accuracy_vs_recurrences_by_steps"].items()):
        _curve(by_steps, curve, f"{steps}-step problems", f"C{i + 2}")
    trained = card.get("train_recurrences")
    for ax, title in ((overall, "Held-out accuracy"), (by_steps, "By difficulty")):
        if trained:
            sampled = card.get("recurrence_sampling", "constant") != "constant"
            label = "training mean" if sampled else "trained at"
            ax.axvline(trained, color="tab:gray", linestyle="--", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("test-time recurrences")
        ax.set_title(title)
        ax.legend(fontsize="small")
    overall.set_ylabel(f"exact-answer accuracy ({card['held_out_problems']} problems, ±1 s.e.)")
    return fig


def _curve(ax: Any, curve: dict[str, dict[str, float]], label: str, color: str) -> None:
    xs = [int(r) for r in curve]
    ys = [curve[r]["accuracy"] for r in curve]
    errs = [curve[r]["se"] for r in curve]
    ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label, color=color)
