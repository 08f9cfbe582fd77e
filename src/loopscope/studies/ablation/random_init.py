"""The random-init sweep's cells and their measurement.

Untrained looped stacks with no prelude and no coda (the "prelude output" is the token
embedding) over norm scheme × injection × block size × seed, run for R recurrences on the
bundled prompts. Weights start as the preset's ``init`` says (:mod:`loopscope.nn.inits`): by
default ``family``, i.e. each cell as the family with its norm scheme is trained — Huginn's
scaled init for the Huginn sandwich, Ouro's for the Ouro sandwich, and the retrofit models'
(Llama-style layers, PyTorch-default adapter) for pre- and post-norm. ``identity-adapter`` is
LoopLM's own start (concat-linear adapters (Z + X)/√2 plus noise). The effective depth of the
depth-scaled formulas is block size × ``init_recurrences`` (4, the study's training count).
The state starts from X (``init_state="prelude"``) in every cell, so cells differ only in
whether and how X is re-injected. Init scale decides a lot here (see the study comparison).
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from loopscope.analysis.stability import spectral_radius
from loopscope.core.errors import LoopscopeError
from loopscope.engine.loop import block_step, prelude_output
from loopscope.families.looplm import LoopConfig, LoopLM
from loopscope.nn.inits import init_name
from loopscope.report.html import to_jsonable
from loopscope.studies.ablation.formatting import group_by, mean_sd
from loopscope.studies.ablation.measures import BlockStates, measure_states
from loopscope.studies.ablation.presets import (
    RandomInitPreset,
    bundled_prompts_path,
    cell_init,
    checked_factors,
)
from loopscope.studies.ablation.store import with_nan_floats
from loopscope.studies.ablation.verdict import (
    NOT_STABLE,
    STABLE_DEGENERATE,
    STABLE_DISTINCT,
    VERDICTS,
    verdict_of,
)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, order=True)
class Cell:
    """One random-init stack: norm scheme, injection, block size and init seed."""

    norm: str
    injection: str
    block: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.norm}-{self.injection}-k{self.block}-s{self.seed}"


def random_init_grid(preset: RandomInitPreset) -> list[Cell]:
    """Every cell of the preset's grid exactly once, norm-major (the table's order); an unknown
    ``init`` is refused here, before any cell runs."""
    norms, injections, blocks, seeds = checked_factors(preset)
    for norm in norms:
        if cell_init(norm, preset.init) == "identity-adapter" and preset.init_parts:
            raise LoopscopeError(
                "--init-parts replace weight kinds of a family scheme; identity-adapter is "
                "LoopLM's own start: pass --init family, huginn, ouro or retrofit"
            )
    return [Cell(*combo) for combo in itertools.product(norms, injections, blocks, seeds)]


def cell_config(cell: Cell, preset: RandomInitPreset) -> LoopConfig:
    """The LoopLM of a random-init cell: no prelude, no coda, Z0 = X = the embedding."""
    return LoopConfig(
        name=f"random-{cell.key}",
        d_model=preset.d_model,
        n_heads=preset.n_heads,
        prelude_layers=0,
        block_layers=cell.block,
        coda_layers=0,
        train_recurrences=preset.init_recurrences,
        injection=cell.injection,  # type: ignore[arg-type]
        norm_scheme=cell.norm,  # type: ignore[arg-type]
        init_state="prelude",
        mlp_ratio=preset.mlp_ratio,
        residual_scale=preset.residual_scale,
        context_length=max(384, preset.prompt_tokens),
        init_seed=cell.seed,
        adapter_init_noise=preset.adapter_init_noise,
        embed_init_std=preset.embed_init_std,
    )


def bundled_prompt_ids(count: int, tokens: int) -> tuple[Tensor, list[str]]:
    """The first ``count`` bundled prompts, byte-encoded with BOS and cut to ``tokens`` tokens,
    as one unpadded batch (count, tokens); and their texts."""
    from loopscope.data import ByteTokenizer, load_prompts

    texts = load_prompts(bundled_prompts_path())
    if not 1 <= count <= len(texts):
        raise LoopscopeError(f"prompts must lie in 1..{len(texts)} (bundled prompts), got {count}")
    tokenizer = ByteTokenizer()
    rows = [tokenizer.encode(t, bos=True) for t in texts[:count]]
    short = min(len(r) for r in rows)
    if tokens < 2 or tokens > short:
        raise LoopscopeError(
            f"prompt_tokens must lie in 2..{short} (the shortest of the first {count} bundled "
            f"prompts), got {tokens}"
        )
    return torch.tensor([r[:tokens] for r in rows]), texts[:count]


@dataclass(frozen=True)
class CellResult:
    """Everything measured for one cell (one JSON file). ``error`` is set when the cell raised;
    it is then recorded as not stable with the error as the reason."""

    cell: Cell
    verdict: str
    reason: str
    last_step: float
    trend: float
    raw_last_step: float
    min_cosine: float
    radius: float
    radius_converged: bool
    norm_growth: float
    injection_ratio: float
    finite: bool
    distance_curve: list[float]
    step_curve: list[float]
    d_model: int
    recurrences: int
    seconds: float
    error: str | None = None
    adapter_init_noise: float = 0.02  # the init the cell was measured at (older files: 0.02)
    embed_init_std: float = 0.02
    init: str = "identity-adapter"  # older files, written before the choice, used this start
    direction: str = "—"  # the verdict's parts (older files: not recorded)
    magnitude: str = "—"
    norm_trend: str = "—"
    certificate: str = "—"
    direction_cosine: float = float("nan")
    norm_exponent: float = float("nan")
    norm_curve: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = to_jsonable(asdict(self))
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CellResult:
        values = with_nan_floats(cls, data)
        values["cell"] = Cell(**values["cell"])
        for name in ("distance_curve", "step_curve", "norm_curve"):
            values[name] = [float("nan") if v is None else float(v) for v in values.get(name, [])]
        return cls(**values)


def _rms(x: Tensor) -> float:
    return float(x.float().pow(2).mean().sqrt())


def _block_radius(
    model: LoopLM, ids: Tensor, z_star: Tensor, iters: int, seed: int, retain_forward: bool = True
) -> Any:
    """Spectral radius of the whole-batch block map at ``z_star`` (block-diagonal over prompts,
    so this is the max over prompts), always in float32. ``retain_forward``: every JVP from one
    retained forward pass at ``z_star`` (the same products to round-off, several times faster
    at the paper width than a forward-mode JVP per product)."""
    m32 = model if next(model.parameters()).dtype == torch.float32 else copy.deepcopy(model).float()
    with torch.no_grad():
        x, positions = prelude_output(m32, ids)

    def block_map(z: Tensor) -> Tensor:
        return block_step(m32, z, x, positions)

    return spectral_radius(
        block_map, z_star.float(), iters=iters, seed=seed, retain_forward=retain_forward
    )


def measure_cell(
    cell: Cell,
    preset: RandomInitPreset,
    ids: Tensor,
    *,
    device: str = "cpu",
    retain_forward: bool = True,
) -> CellResult:
    """Build the cell's stack, run R recurrences on the prompt batch, measure and judge.
    ``retain_forward=False`` takes the certificate's JVPs one forward-mode pass each (the
    slower path, the same radius to round-off; benchmarks/ablation_paper.py compares them)."""
    start = time.perf_counter()
    dtype = _DTYPES[preset.dtype]
    scheme = cell_init(cell.norm, preset.init)
    model = LoopLM(cell_config(cell, preset))
    if scheme != "identity-adapter":
        model.reset_parameters(cell.seed, scheme, preset.init_parts)
    model = model.to(device=device, dtype=dtype).eval()
    ids = ids.to(device)
    probe = BlockStates(preset.recurrences, cell.block)
    with torch.no_grad():
        out = model(ids, recurrences=preset.recurrences, probes=[probe])
        inputs, _ = prelude_output(model, ids)
    m = measure_states(probe.stacked())
    radius, converged = float("nan"), False
    if m.finite:
        est = _block_radius(model, ids, out.state, preset.spectral_iters, cell.seed, retain_forward)
        radius, converged = est.radius, est.converged
    v = verdict_of(m, radius, preset.rule)
    ratio = _rms(inputs) / max(_rms(out.state), 1e-30) if m.finite else float("nan")
    return CellResult(
        cell=cell,
        verdict=v.label,
        reason=v.reason,
        last_step=m.last_step,
        trend=m.trend,
        raw_last_step=m.raw_last_step,
        min_cosine=m.min_cosine,
        radius=radius,
        radius_converged=converged,
        norm_growth=m.norm_growth,
        injection_ratio=ratio,
        finite=m.finite,
        distance_curve=[float(v) for v in m.distance_curve],
        step_curve=[float(v) for v in m.step_curve],
        d_model=preset.d_model,
        recurrences=preset.recurrences,
        seconds=time.perf_counter() - start,
        adapter_init_noise=preset.adapter_init_noise,
        embed_init_std=preset.embed_init_std,
        init=init_name(scheme, preset.init_parts),
        direction=v.direction,
        magnitude=v.magnitude,
        norm_trend=v.norm_trend,
        certificate=v.certificate,
        direction_cosine=m.direction_cosine,
        norm_exponent=m.norm_exponent,
        norm_curve=[float(x) for x in m.norm_curve],
    )


def run_cell(
    cell: Cell, preset: RandomInitPreset, ids: Tensor, *, device: str = "cpu"
) -> CellResult:
    """:func:`measure_cell`, but a cell whose numerics fail (torch/numpy raising on overflow,
    a singular solve, …) is recorded as not stable with the error, so the sweep goes on."""
    start = time.perf_counter()
    try:
        return measure_cell(cell, preset, ids, device=device)
    except (RuntimeError, ValueError, ArithmeticError, np.linalg.LinAlgError) as err:
        nan = float("nan")
        message = f"{type(err).__name__}: {err}"
        return CellResult(
            cell=cell,
            verdict=NOT_STABLE,
            reason=f"the cell raised {message}",
            last_step=nan,
            trend=nan,
            raw_last_step=nan,
            min_cosine=nan,
            radius=nan,
            radius_converged=False,
            norm_growth=nan,
            injection_ratio=nan,
            finite=False,
            distance_curve=[],
            step_curve=[],
            d_model=preset.d_model,
            recurrences=preset.recurrences,
            seconds=time.perf_counter() - start,
            error=message,
            adapter_init_noise=preset.adapter_init_noise,
            embed_init_std=preset.embed_init_std,
            init=init_name(cell_init(cell.norm, preset.init), preset.init_parts),
        )


# --------------------------------------------------------------------------- seeds pooled


def _majority(verdicts: Sequence[str]) -> str:
    counts = Counter(verdicts)
    return max(VERDICTS, key=lambda v: (counts[v], -VERDICTS.index(v)))


@dataclass(frozen=True)
class GroupSummary:
    """One (norm, injection, block) row: seeds pooled as mean ± standard deviation."""

    norm: str
    injection: str
    block: int
    n: int
    counts: dict[str, int]
    verdict: str
    errors: int
    last_step: tuple[float, float]
    trend: float
    min_cosine: tuple[float, float]
    radius: tuple[float, float]
    norm_growth: float
    injection_ratio: float
    d_model: int
    recurrences: int
    adapter_init_noise: float = 0.02
    embed_init_std: float = 0.02
    init: str = "identity-adapter"
    direction: str = "—"
    magnitude: str = "—"
    norm_trend: str = "—"
    certificate: str = "—"
    direction_cosine: float = float("nan")
    norm_exponent: float = float("nan")

    @property
    def unanimous(self) -> bool:
        return max(self.counts.values()) == self.n

    def counts_text(self) -> str:
        return "/".join(
            str(self.counts[v]) for v in (STABLE_DISTINCT, STABLE_DEGENERATE, NOT_STABLE)
        )


def pooled_part(values: Sequence[str]) -> str:
    """The most common value of a verdict part over seeds, with the split when they differ."""
    counts = Counter(values)
    top, n = counts.most_common(1)[0]
    return top if n == len(values) else f"{top} ({n}/{len(values)})"


def summarise_groups(results: Sequence[CellResult]) -> list[GroupSummary]:
    """Pool seeds per (norm, injection, block), in the order the cells first appear."""
    groups = group_by(results, lambda r: (r.cell.norm, r.cell.injection, r.cell.block))
    out = []
    for (norm, injection, block), rs in groups.items():
        verdicts = [r.verdict for r in rs]
        out.append(
            GroupSummary(
                norm=norm,
                injection=injection,
                block=block,
                n=len(rs),
                counts={v: verdicts.count(v) for v in VERDICTS},
                verdict=_majority(verdicts),
                errors=sum(r.error is not None for r in rs),
                last_step=mean_sd(r.last_step for r in rs),
                trend=mean_sd(r.trend for r in rs)[0],
                min_cosine=mean_sd(r.min_cosine for r in rs),
                radius=mean_sd(r.radius for r in rs),
                norm_growth=mean_sd(r.norm_growth for r in rs)[0],
                injection_ratio=mean_sd(r.injection_ratio for r in rs)[0],
                d_model=rs[0].d_model,
                recurrences=rs[0].recurrences,
                adapter_init_noise=rs[0].adapter_init_noise,
                embed_init_std=rs[0].embed_init_std,
                init=pooled_part([r.init for r in rs]),
                direction=pooled_part([r.direction for r in rs]),
                magnitude=pooled_part([r.magnitude for r in rs]),
                norm_trend=pooled_part([r.norm_trend for r in rs]),
                certificate=pooled_part([r.certificate for r in rs]),
                direction_cosine=min((r.direction_cosine for r in rs), key=_nan_last),
                norm_exponent=mean_sd(r.norm_exponent for r in rs)[0],
            )
        )
    return out


def _nan_last(x: float) -> float:
    """Sort key putting NaN after every number (so ``min`` skips it when it can)."""
    return x if math.isfinite(x) else math.inf
