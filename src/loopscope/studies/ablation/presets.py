"""What each sweep runs: the named presets (``quick`` for a CPU, ``paper`` at the study's
width), their narrowing from the command line, the validation of grid factors both sweeps share,
and the bundled prompts both sweeps run on.

A preset's grid factors (norms, injections, block sizes, seeds, …) may change between runs into
one output directory; every other field defines the measurement, is saved in the sweep header
and must match when the directory is reopened.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from loopscope.core.errors import LoopscopeError
from loopscope.nn.inits import INIT_SCHEMES, InitParts, InitScheme
from loopscope.nn.injection import INJECTIONS
from loopscope.nn.layers import NORM_SCHEMES
from loopscope.report.html import to_jsonable
from loopscope.studies.ablation.verdict import VerdictRule
from loopscope.training.config import TrainConfig

_PROMPTS = "demo.jsonl"


def bundled_prompts_path() -> Path:
    """The prompts shipped inside the package, which both sweeps run on."""
    return Path(str(resources.files("loopscope") / "assets" / "prompts" / _PROMPTS))


def _measurement(preset: RandomInitPreset | TrainedPreset, grid: set[str]) -> dict[str, Any]:
    """The fields of ``preset`` outside its grid: what makes two runs' cells comparable."""
    return {
        f.name: to_jsonable(getattr(preset, f.name)) for f in fields(preset) if f.name not in grid
    }


@dataclass(frozen=True)
class RandomInitPreset:
    """Everything a random-init sweep needs. Grid factors (``norms`` … ``seeds``) may change
    between runs into one directory; the other fields define the measurement and may not."""

    name: str
    d_model: int
    n_heads: int
    recurrences: int
    prompts: int
    prompt_tokens: int
    spectral_iters: int
    seeds: int = 3
    block_sizes: tuple[int, ...] = (4, 12, 16)
    norms: tuple[str, ...] = NORM_SCHEMES
    injections: tuple[str, ...] = INJECTIONS
    init_recurrences: int = 4
    mlp_ratio: float = 4.0
    dtype: str = "float32"
    residual_scale: float = 1.0
    adapter_init_noise: float = 0.02  # LoopConfig.adapter_init_noise: σ on the (Z+X)/√2 start
    embed_init_std: float = 0.02  # LoopConfig.embed_init_std: σ of the token embeddings (= Z0 = X)
    rule: VerdictRule = field(default_factory=VerdictRule)
    #: ``family`` (each cell as its norm scheme's family trains) or one scheme of
    #: :mod:`loopscope.nn.inits` for every cell; the two fields above apply to
    #: ``identity-adapter`` only.
    init: str = "family"
    #: weight kinds drawn as another scheme draws them, on top of every cell's ``init``
    #: (:func:`loopscope.nn.inits.parse_init_parts`; not with ``identity-adapter``)
    init_parts: InitParts = ()

    def measurement(self) -> dict[str, Any]:
        """The fields that make two runs' cells comparable (saved in the sweep header; no init
        parts is left out, so directories written before they existed still reopen)."""
        grid = {"seeds", "block_sizes", "norms", "injections", "name"}
        return _measurement(self, grid if self.init_parts else grid | {"init_parts"})


RANDOM_INIT_PRESETS: dict[str, RandomInitPreset] = {
    # Sized for 180 cells in < 10 min on 2 CPU cores (measured).
    "quick": RandomInitPreset(
        name="quick",
        d_model=64,
        n_heads=4,
        recurrences=64,
        prompts=3,
        prompt_tokens=24,
        spectral_iters=20,
    ),
    # The study's width (512, 4 heads as its trained models) and its 128-recurrence runs.
    # A 12-layer cell costs ≈ 53 CPU s on one core (benchmarks/ablation_paper.py): the 128
    # recurrences ≈ 57%, the certificate's 60 JVPs from one retained forward pass ≈ 34%; the
    # study's six cells × 3 seeds × blocks 4/12/16 project to ≈ 42 min on one unloaded core.
    # One init for every cell (Huginn's, whose code the sandwich and the concat-linear adapter
    # come from), so that only the norm scheme and the injection vary between cells, as in a
    # controlled ablation. The pre-norm stacks have no random init of their own: the retrofitted
    # models start from pretrained Llama weights, so ``family`` gives them Llama's generic
    # N(0, 0.02²), under which pre-norm + concat-linear does not converge at this width.
    "paper": RandomInitPreset(
        name="paper",
        d_model=512,
        n_heads=4,
        recurrences=128,
        prompts=4,
        prompt_tokens=64,
        spectral_iters=60,
        init="huginn",
    ),
}


@dataclass(frozen=True)
class TrainedPreset:
    """The trained sweep: model width, the training recipe and the analysis settings."""

    name: str
    d_model: int
    n_heads: int
    train: TrainConfig
    trace_recurrences: int
    prompts: int
    stability_iters: int
    block_sizes: tuple[int, ...] = (4, 8, 12)
    injections: tuple[str, ...] = ("none", "add")
    prelude_coda: tuple[bool, ...] = (True, False)
    norms: tuple[str, ...] = ("pre",)
    seeds: int = 1
    feedforward_layers: int = 12
    context_length: int = 384
    rule: VerdictRule = field(default_factory=VerdictRule)
    #: ``family`` or one scheme of :mod:`loopscope.nn.inits`, as for the random-init sweep
    init: str = "family"

    def measurement(self) -> dict[str, Any]:
        """The fields that make two runs' cells comparable (saved in the sweep header)."""
        grid = {"block_sizes", "injections", "prelude_coda", "norms", "seeds", "name"}
        return _measurement(self, grid)


def _paper_train() -> TrainConfig:
    from loopscope.training.named_configs import get_config

    return get_config("study-2-4x4-2").train


TRAINED_PRESETS: dict[str, TrainedPreset] = {
    # A few CPU hours at most: width 64 and 300 steps on 1–2-step problems (the study trains
    # at width 512 for 20k steps); enough to measure the dynamics and stages, not accuracy.
    "quick": TrainedPreset(
        name="quick",
        d_model=64,
        n_heads=4,
        train=TrainConfig(
            steps=300,
            batch_size=16,
            lr=3e-3,
            min_lr=3e-4,
            warmup_steps=30,
            eval_every=300,
            eval_problems=32,
            accuracy_problems=16,
            checkpoint_every=50,
            max_problem_steps=2,
        ),
        trace_recurrences=64,
        prompts=4,
        stability_iters=20,
    ),
    # The study's grid at the scale of a 2-core CPU: width 96 and 500 steps of batch 16 on
    # 1–2-step problems, pre-norm, constant 4 recurrences, final-output loss. Projected from
    # measured training-step times (≈ 50 ms per layer-step at width 96 on one thread; the grid
    # realises 420 layers per step) to about 2 hours of training on 2 cores, plus the traces.
    "cpu": TrainedPreset(
        name="cpu",
        d_model=96,
        n_heads=4,
        train=TrainConfig(
            steps=500,
            batch_size=16,
            lr=3e-3,
            min_lr=3e-4,
            warmup_steps=40,
            eval_every=500,
            eval_problems=64,
            accuracy_problems=32,
            checkpoint_every=50,
            max_problem_steps=2,
        ),
        trace_recurrences=64,
        prompts=8,
        stability_iters=20,
    ),
    # The study's recipe (registry study-* configs): width 512, 4 heads, constant 4 recurrences,
    # final-output loss; meant for a GPU.
    "paper": TrainedPreset(
        name="paper",
        d_model=512,
        n_heads=4,
        train=_paper_train(),
        trace_recurrences=128,
        prompts=16,
        stability_iters=60,
    ),
}


# --------------------------------------------------------------------------- grid factors

#: The init each norm scheme's own family trains with; norms without a family (pre, post) get
#: the retrofit models' init, which starts from a pre-norm Llama/OLMo.
FAMILY_INITS: dict[str, InitScheme] = {"huginn": "huginn", "ouro": "ouro"}
#: ``--init`` choices: ``family`` picks per cell by norm scheme, the rest apply to every cell.
INIT_CHOICES: tuple[str, ...] = ("family", *INIT_SCHEMES)


def cell_init(norm: str, choice: str) -> InitScheme:
    """The init scheme of a cell with norm scheme ``norm`` under the sweep's ``choice``."""
    if choice == "family":
        return FAMILY_INITS.get(norm, "retrofit")
    if choice not in INIT_SCHEMES:
        raise LoopscopeError(f"unknown init {choice!r}; choose from {', '.join(INIT_CHOICES)}")
    return choice


def unique_values(
    values: Iterable[Any], factor: str, allowed: Sequence[Any] | None = None
) -> tuple[Any, ...]:
    """``values`` as a tuple, refused when one is unknown or given twice, or none is given."""
    seen: list[Any] = []
    for v in values:
        if allowed is not None and v not in allowed:
            raise LoopscopeError(
                f"unknown {factor} {v!r}; choose from {', '.join(map(str, allowed))}"
            )
        if v in seen:
            raise LoopscopeError(f"{factor} lists {v!r} twice; give every value once")
        seen.append(v)
    if not seen:
        raise LoopscopeError(f"no {factor} given; name at least one")
    return tuple(seen)


def _check_seeds(seeds: int) -> int:
    if seeds < 1:
        raise LoopscopeError(f"--seeds must be ≥ 1, got {seeds}")
    return seeds


def _check_blocks(blocks: Iterable[int], minimum: int) -> tuple[int, ...]:
    out = unique_values(blocks, "block size")
    small = [b for b in out if b < minimum]
    if small:
        raise LoopscopeError(
            f"block sizes {small} are too small: the degeneracy check compares block layers, so "
            f"give block sizes ≥ {minimum}"
        )
    return out


PresetT = TypeVar("PresetT", RandomInitPreset, TrainedPreset)


def checked_factors(
    preset: RandomInitPreset | TrainedPreset,
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...], range]:
    """The grid factors both sweeps share, validated: (norms, injections, block sizes, seeds)."""
    norms = unique_values(preset.norms, "norm", NORM_SCHEMES)
    injections = unique_values(preset.injections, "injection", INJECTIONS)
    blocks = _check_blocks(preset.block_sizes, 2)
    return norms, injections, blocks, range(_check_seeds(preset.seeds))


def _narrowed(
    presets: Mapping[str, PresetT],
    name: str,
    seeds: int | None,
    block_sizes: Sequence[int] | None,
    norms: Sequence[str] | None,
    injections: Sequence[str] | None,
) -> PresetT:
    """Preset ``name`` with its grid factors narrowed, each narrowing validated."""
    if name not in presets:
        raise LoopscopeError(f"unknown preset {name!r}; choose from {', '.join(presets)}")
    preset = presets[name]
    return replace(
        preset,
        seeds=_check_seeds(preset.seeds if seeds is None else seeds),
        block_sizes=_check_blocks(block_sizes or preset.block_sizes, 2),
        norms=unique_values(norms or preset.norms, "norm", NORM_SCHEMES),
        injections=unique_values(injections or preset.injections, "injection", INJECTIONS),
    )


def random_init_preset(
    name: str,
    *,
    seeds: int | None = None,
    block_sizes: Sequence[int] | None = None,
    norms: Sequence[str] | None = None,
    injections: Sequence[str] | None = None,
) -> RandomInitPreset:
    """A named preset with the grid factors optionally narrowed (validated)."""
    return _narrowed(RANDOM_INIT_PRESETS, name, seeds, block_sizes, norms, injections)


def trained_preset(
    name: str,
    *,
    seeds: int | None = None,
    block_sizes: Sequence[int] | None = None,
    norms: Sequence[str] | None = None,
    injections: Sequence[str] | None = None,
) -> TrainedPreset:
    """A named trained preset with the grid factors optionally narrowed (validated)."""
    return _narrowed(TRAINED_PRESETS, name, seeds, block_sizes, norms, injections)
