"""How a looped model is trained, as data: the training configuration, its learning-rate
schedule and recurrence sampling, and seed derivation, shared by the training loop and held-out
evaluation."""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

from loopscope.core.errors import LoopscopeError
from loopscope.data.synthetic import MAX_STEPS

RecurrenceSampling = Literal["constant", "huginn"]


LossKind = Literal["final", "all-recurrences"]

#: The command-line flag that sets a field, named in its error so the fix is obvious.
_FLAGS = {"steps": "--steps", "batch_size": "--batch-size", "lr": "--lr", "seed": "--seed"}
#: Fields that count something (≥ 1) or may be zero (≥ 0); the rest are checked by type only.
_AT_LEAST_ONE = (
    "steps",
    "batch_size",
    "max_recurrences",
    "min_problem_steps",
    "eval_every",
    "eval_problems",
    "checkpoint_every",
)
_AT_LEAST_ZERO = ("warmup_steps", "accuracy_problems")
_OPTIONAL_AT_LEAST_ONE = ("mean_recurrences", "backprop_depth")


class TrainConfigError(LoopscopeError):
    """A training setting that cannot be run (wrong type, out of range, unknown name)."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and data settings; saved beside every checkpoint."""

    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    recurrence_sampling: RecurrenceSampling = "constant"
    mean_recurrences: int | None = None
    max_recurrences: int = 64
    backprop_depth: int | None = None
    loss: LossKind = "final"
    seed: int = 0
    eval_seed: int = 1
    min_problem_steps: int = 1
    max_problem_steps: int = 3
    eval_every: int = 100
    eval_problems: int = 64
    accuracy_problems: int = 16
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        for name in _AT_LEAST_ONE:
            _check_int(name, getattr(self, name), minimum=1)
        for name in _AT_LEAST_ZERO:
            _check_int(name, getattr(self, name), minimum=0)
        for name in _OPTIONAL_AT_LEAST_ONE:
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1, optional=True)
        _check_int("seed", self.seed)
        _check_int("eval_seed", self.eval_seed)
        _check_float("lr", self.lr, positive=True)
        _check_float("min_lr", self.min_lr)
        _check_float("weight_decay", self.weight_decay)
        _check_float("grad_clip", self.grad_clip, positive=True)
        _check_choice("recurrence_sampling", self.recurrence_sampling, RecurrenceSampling)
        _check_choice("loss", self.loss, LossKind)
        _check_int("max_problem_steps", self.max_problem_steps, minimum=self.min_problem_steps)
        if self.max_problem_steps > MAX_STEPS:
            raise TrainConfigError(
                f"training config: max_problem_steps must be ≤ {MAX_STEPS} (the longest "
                f"synthetic problems), got {self.max_problem_steps}"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """A config from its saved form (``train_config.json``); unknown fields are refused."""
        if not isinstance(data, dict):
            raise TrainConfigError(
                f"a training config is a JSON object of fields, got {type(data).__name__}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainConfigError(f"unknown TrainConfig fields {unknown}; known: {sorted(known)}")
        return cls(**data)


def _what(name: str) -> str:
    flag = _FLAGS.get(name)
    return f"{name} ({flag})" if flag else name


def _check_int(
    name: str, value: Any, *, minimum: int | None = None, optional: bool = False
) -> None:
    """An int (not a bool: True is not a count), at least ``minimum`` when given."""
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "a whole number or null" if optional else "a whole number"
        raise TrainConfigError(f"training config: {_what(name)} must be {kind}, got {value!r}")
    if minimum is not None and value < minimum:
        raise TrainConfigError(f"training config: {_what(name)} must be ≥ {minimum}, got {value}")


def _check_float(name: str, value: Any, *, positive: bool = False) -> None:
    """A finite number, > 0 when ``positive`` and ≥ 0 otherwise."""
    ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok_type or not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else "≥ 0"
        raise TrainConfigError(
            f"training config: {_what(name)} must be a finite number {bound}, got {value!r}"
        )


def _check_choice(name: str, value: Any, kind: Any) -> None:
    choices = get_args(kind)
    if value not in choices:
        raise TrainConfigError(
            f"training config: {name} must be one of {', '.join(choices)}; got {value!r}"
        )


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def sample_recurrences(step: int, cfg: TrainConfig, train_recurrences: int) -> int:
    """Recurrences for one step: constant, or Huginn's Poisson-lognormal with the given mean
    (heavy right tail so the model sees long runs sometimes), seeded by (seed, step)."""
    if cfg.recurrence_sampling == "constant":
        return train_recurrences
    mean = cfg.mean_recurrences or train_recurrences
    rng = random.Random(derive_seed("recurrences", cfg.seed, step))
    sigma = 0.5
    rate = rng.lognormvariate(math.log(mean) - sigma**2 / 2, sigma)
    return int(min(max(_poisson(rng, rate), 1), cfg.max_recurrences))


def _poisson(rng: random.Random, rate: float) -> int:
    """Knuth's Poisson sampler for small rates, normal approximation for large ones."""
    if rate > 30:
        return max(0, round(rng.gauss(rate, math.sqrt(rate))))
    limit, k, prod = math.exp(-rate), 0, rng.random()
    while prod > limit:
        k += 1
        prod *= rng.random()
    return k


def derive_seed(stream: str, seed: int, index: int) -> int:
    """A 63-bit seed for item ``index`` of a named stream: training and evaluation data can
    never collide, whatever the step count."""
    digest = hashlib.sha256(f"{stream}:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
