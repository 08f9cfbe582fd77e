"""How a looped model is trained, as data: the training configuration, its learning-rate
schedule and recurrence sampling, and seed derivation, shared by the training loop and held-out
evaluation."""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, fields
from typing import Any, Literal

RecurrenceSampling = Literal["constant", "huginn"]


LossKind = Literal["final", "all-recurrences"]


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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known: {sorted(known)}")
        return cls(**data)


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
