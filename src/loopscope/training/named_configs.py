"""Named model configurations (litgpt-style): one place that says what ``demo-looped`` or the
study's ``(2,8⊗4,2)`` model is, for training, ablations and ``loopscope.load``."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from loopscope.core.errors import LoopscopeError
from loopscope.families.looplm import LoopConfig
from loopscope.training.config import TrainConfig


class UnknownConfigError(LoopscopeError, KeyError):
    """A config name that is not in the registry (a KeyError too, as a failed lookup)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class NamedConfig:
    model: LoopConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    description: str = ""


def _study(name: str, block: int, injection: bool = False) -> NamedConfig:
    """The study's small trained models: width 512, 4 heads, constant 4 recurrences, final-output
    loss, pre-norm, trained 20k steps of batch 32 at learning rate 3e-4."""
    model = LoopConfig(
        name=name,
        d_model=512,
        n_heads=4,
        prelude_layers=2,
        block_layers=block,
        coda_layers=2,
        train_recurrences=4,
        injection="add" if injection else "none",
        init_state="zeros" if injection else "prelude",
        norm_scheme="pre",
        context_length=384,
    )
    train = TrainConfig(steps=20000, batch_size=32, lr=3e-4, warmup_steps=500)
    return NamedConfig(model, train, f"study model (2,{block}⊗4,2), width 512")


_DEMO_TRAIN = TrainConfig(
    steps=3000,
    batch_size=16,
    lr=3e-3,
    min_lr=3e-4,
    warmup_steps=100,
    eval_every=1000,
    eval_problems=64,
    accuracy_problems=24,
    max_problem_steps=2,
    checkpoint_every=100,
)
#: Bytes of context of the bundled pair: the longest real GSM8K test question fits with its
#: prompt frame (RoPE positions, so the context costs nothing until it is used).
_DEMO_CONTEXT = 1024


def _demo_looped_model(name: str, train_recurrences: int = 4) -> LoopConfig:
    """The bundled looped architecture: (2,4⊗l,2) pre-norm with concat-linear injection (the
    retrofitted models' design) at width 112, fewer parameters than the 12-layer twin."""
    return LoopConfig(
        name=name,
        d_model=112,
        n_heads=4,
        prelude_layers=2,
        block_layers=4,
        coda_layers=2,
        train_recurrences=train_recurrences,
        injection="concat-linear",
        init_state="zeros",
        norm_scheme="pre",
        context_length=_DEMO_CONTEXT,
    )


REGISTRY: dict[str, NamedConfig] = {
    "demo-looped": NamedConfig(
        _demo_looped_model("demo-looped"),
        replace(
            _DEMO_TRAIN,
            recurrence_sampling="huginn",
            mean_recurrences=4,
            max_recurrences=12,
            backprop_depth=4,
        ),
        "(2,4⊗l,2) pre-norm with concat-linear injection (the retrofitted models' design), "
        "width 112 (fewer parameters than the 12-layer twin), trained on Huginn-style sampled "
        "recurrences (mean 4, at most 12, gradients through the last 4); 69.1% held out, the "
        "same at every recurrence count, so the bundled model is demo-looped-constant",
    ),
    "demo-looped-constant": NamedConfig(
        _demo_looped_model("demo-looped-constant"),
        _DEMO_TRAIN,
        "the bundled looped model (loopscope.load('demo')): demo-looped's architecture trained "
        "as the study trains its models, a constant 4 recurrences with gradients through all "
        "of them and the loss on the final output",
    ),
    "demo-looped-deep": NamedConfig(
        _demo_looped_model("demo-looped-deep", train_recurrences=6),
        _DEMO_TRAIN,
        "demo-looped-constant trained at a constant 6 recurrences instead of 4 (the same "
        "parameters and data); 71.5% held out at R=6, no better than the 4-recurrence model: "
        "it too has its accuracy by R=4 and gains nothing past it",
    ),
    "demo-feedforward": NamedConfig(
        LoopConfig(
            name="demo-feedforward",
            d_model=96,
            n_heads=4,
            prelude_layers=0,
            block_layers=12,
            coda_layers=0,
            train_recurrences=1,
            injection="none",
            init_state="prelude",
            norm_scheme="pre",
            context_length=_DEMO_CONTEXT,
        ),
        _DEMO_TRAIN,
        "bundled demo twin: 12-layer feedforward, width 96, the same data and steps",
    ),
    "smoke-tiny": NamedConfig(
        LoopConfig(
            name="smoke-tiny",
            d_model=32,
            n_heads=2,
            prelude_layers=1,
            block_layers=1,
            coda_layers=1,
            train_recurrences=2,
            injection="concat-linear",
            init_state="zeros",
            norm_scheme="pre",
            context_length=128,
        ),
        TrainConfig(
            steps=200,
            batch_size=4,
            lr=3e-3,
            min_lr=3e-4,
            warmup_steps=10,
            eval_every=100,
            eval_problems=8,
            accuracy_problems=1,
            max_problem_steps=1,
            checkpoint_every=10,
        ),
        "smoke test: width 32, (1,1⊗2,1), 200 steps that checkpoint every 10; seconds on one "
        "CPU thread, for checking that training runs and resumes",
    ),
    "study-2-4x4-2": _study("study-2-4x4-2", 4),
    "study-2-8x4-2": _study("study-2-8x4-2", 8),
    "study-2-12x4-2": _study("study-2-12x4-2", 12),
    "study-2-4x4-2-inject": _study("study-2-4x4-2-inject", 4, injection=True),
    "study-feedforward-12": NamedConfig(
        LoopConfig(
            name="study-feedforward-12",
            d_model=512,
            n_heads=4,
            prelude_layers=0,
            block_layers=12,
            coda_layers=0,
            train_recurrences=1,
            injection="none",
            init_state="prelude",
            norm_scheme="pre",
            context_length=384,
        ),
        TrainConfig(steps=20000, batch_size=32, lr=3e-4, warmup_steps=500),
        "study feedforward reference: 12 layers, width 512",
    ),
}


def get_config(name: str) -> NamedConfig:
    """Look a named config up, with the list of names in the error."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownConfigError(
            f"no config named {name!r}; known configs: {', '.join(sorted(REGISTRY))}"
        ) from None
