"""Architecture ablations as one command each (SPEC §3, issue 6).

Two sweeps, each a grid of *cells* that are computed one at a time, saved as one JSON file per
cell (written atomically) and skipped when a rerun finds them, so a killed sweep resumes:

- **random-init**: untrained looped stacks with no prelude and no coda (the "prelude output" is
  the token embedding) over norm scheme × injection × block size × seed, run for R recurrences
  on the bundled prompts. Weights use LoopLM's own init: N(0, 0.02) everywhere, attention and MLP
  output projections N(0, 0.02/√(2·depth)) with depth = block size × ``init_recurrences`` (4, the
  study's training count), concat-linear adapters (Z + X)/√2 plus N(0, 0.02) noise. The state
  starts from X (``init_state="prelude"``) in every cell, so cells differ only in whether and how
  X is re-injected. Init scale decides a lot here (see the study comparison in the report).
- **trained**: the study's small models (2,k⊗4,2) for k ∈ {4, 8, 12} with / without injection
  and with / without prelude-coda, plus a 12-layer feedforward, trained on the synthetic task;
  then evaluation, dynamics (trace + analyses, with a per-cell report) and stages alignment
  against the feedforward model.

**Verdict rule** (one rule for both sweeps; thresholds in :class:`VerdictRule`). States are
compared after per-token RMS normalisation, i.e. by direction: every reader of the stream (the
next layer's pre-norm, the final norm) is scale-free, and a pre-norm stack whose state grows
along a settled direction must not count as moving just because its norm grows.

1. *not stable* if any state is NaN/Inf (or the cell raised: the reason says which);
2. *not stable* if the last relative step ‖n_R − n_{R−1}‖/‖n_R‖ (max over layers and prompts)
   exceeds ``tol_step`` — the reason says whether it was still shrinking (slow convergence) or
   not (drift / cycling);
3. *not stable* if the block's Jacobian spectral radius at the last state exceeds
   1 + ``radius_margin`` (an expanding fixed point is not an attractor, however small the step);
4. otherwise *stable, degenerate* when min over l of cos(X*[0], X*[l]) ≥ ``degenerate_cosine``
   (all block layers collapsed onto one point) and *stable, distinct* below.

The thresholds default to those of :class:`loopscope.report.trace_report.Thresholds`
(settled step 1e-3, degenerate cosine 0.99), so a sweep and a single-model report agree.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import itertools
import json
import math
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure
from torch import Tensor

from loopscope.analysis.dynamics import degeneracy
from loopscope.analysis.stability import spectral_radius
from loopscope.engine.loop import block_step, prelude_output
from loopscope.engine.sites import Site
from loopscope.families.looplm import LoopConfig, LoopLM
from loopscope.nn.injection import INJECTIONS
from loopscope.nn.layers import NORM_SCHEMES
from loopscope.report.html import Figure, ReportPaths, Section, Table, to_jsonable, write_report
from loopscope.training.config import TrainConfig

__all__ = [
    "NOT_STABLE",
    "RANDOM_INIT_PRESETS",
    "STABLE_DEGENERATE",
    "STABLE_DISTINCT",
    "STUDY_VERDICTS",
    "TRAINED_PRESETS",
    "VERDICTS",
    "Cell",
    "CellResult",
    "CellStore",
    "GroupSummary",
    "RandomInitPreset",
    "StateMeasures",
    "SweepRun",
    "TrainedCell",
    "TrainedPreset",
    "TrainedResult",
    "VerdictRule",
    "bundled_prompt_ids",
    "cell_config",
    "compare_with_study",
    "factor_summary",
    "judge",
    "measure_cell",
    "measure_states",
    "random_init_grid",
    "random_init_preset",
    "run_cell",
    "run_random_init",
    "run_trained",
    "summarise_groups",
    "trained_configs",
    "trained_grid",
    "trained_preset",
]

STABLE_DISTINCT = "stable, distinct"
STABLE_DEGENERATE = "stable, degenerate"
NOT_STABLE = "not stable"
#: Most conservative first: ties between seeds resolve to the earlier one.
VERDICTS: tuple[str, ...] = (NOT_STABLE, STABLE_DEGENERATE, STABLE_DISTINCT)
_SHORT = {STABLE_DISTINCT: "distinct", STABLE_DEGENERATE: "degenerate", NOT_STABLE: "not stable"}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_PROMPTS = "demo.jsonl"


def _bundled_prompts_path() -> Path:
    return Path(str(resources.files("loopscope") / "assets" / "prompts" / _PROMPTS))


# =========================================================================== verdict rule


@dataclass(frozen=True)
class VerdictRule:
    """Thresholds of the verdict (see the module docstring). ``shrinking_trend``: a last step
    below this fraction of the step at R/2 counts as "still shrinking" in the reason text."""

    tol_step: float = 1e-3
    radius_margin: float = 0.02
    degenerate_cosine: float = 0.99
    shrinking_trend: float = 0.5

    def describe(self) -> str:
        return (
            f"not stable if any state is NaN/Inf, if the last relative step of the "
            f"RMS-normalised state (max over layers and prompts) exceeds {self.tol_step:g}, or if "
            f"the block's Jacobian spectral radius at the last state exceeds "
            f"1 + {self.radius_margin:g}; otherwise stable, degenerate when the min cosine "
            f"between layer 0's fixed point and every other layer's is ≥ "
            f"{self.degenerate_cosine:g}, else stable, distinct"
        )


def judge(
    *,
    finite: bool,
    last_step: float,
    trend: float,
    radius: float,
    min_cosine: float,
    rule: VerdictRule,
    first_bad_recurrence: int | None = None,
) -> tuple[str, str]:
    """(verdict, reason) for one cell's measurements under ``rule``."""
    if not finite:
        where = "" if first_bad_recurrence is None else f" from recurrence {first_bad_recurrence}"
        return NOT_STABLE, f"states became non-finite (NaN/Inf){where}"
    if not math.isfinite(last_step):
        return NOT_STABLE, "no finite step to judge"
    if last_step > rule.tol_step:
        if math.isfinite(trend) and trend < rule.shrinking_trend:
            how = f"still shrinking (×{trend:.2f} over the second half): converging too slowly"
        else:
            how = f"not shrinking (×{trend:.2f} over the second half): drifting or cycling"
        return NOT_STABLE, f"last step {last_step:.1e} > {rule.tol_step:g}, {how}"
    if math.isfinite(radius) and radius > 1.0 + rule.radius_margin:
        return NOT_STABLE, f"settled but the block Jacobian is expanding (ρ = {radius:.3f})"
    rho = f", ρ = {radius:.3f}" if math.isfinite(radius) else ""
    if math.isfinite(min_cosine) and min_cosine >= rule.degenerate_cosine:
        return STABLE_DEGENERATE, (
            f"settled (last step {last_step:.1e}{rho}); layers' fixed points collapse "
            f"(min cos {min_cosine:.4f} ≥ {rule.degenerate_cosine:g})"
        )
    return STABLE_DISTINCT, (
        f"settled (last step {last_step:.1e}{rho}); distinct layer fixed points "
        f"(min cos {min_cosine:.4f})"
    )


# =========================================================================== state measures


@dataclass(frozen=True)
class StateMeasures:
    """Scale-free dynamics of one run. ``step_curve`` (R−1,): relative step of the per-token
    RMS-normalised state, max over layers and prompts; ``distance_curve`` (R,): relative
    distance of the normalised state to its last value X*, mean over layers and prompts;
    ``raw_last_step``: the last step of the raw (unnormalised) state; ``min_cosine``: the
    degeneracy measure, mean over prompts; ``norm_growth``: ‖X_R‖/‖X_{R/2}‖ of the last layer
    (≈ 2 when the state grows linearly, ≈ 1 when it is bounded)."""

    finite: bool
    first_bad_recurrence: int | None
    step_curve: np.ndarray
    distance_curve: np.ndarray
    raw_last_step: float
    min_cosine: float
    norm_growth: float

    @property
    def last_step(self) -> float:
        return float(self.step_curve[-1]) if self.step_curve.size else float("nan")

    @property
    def trend(self) -> float:
        """Last step / step at R/2: ≈ 1 for a constant drift, ≪ 1 for convergence."""
        c = self.step_curve
        if c.size < 2:
            return float("nan")
        mid, last = float(c[(c.size - 1) // 2]), float(c[-1])
        if mid > 0:
            return last / mid
        return 0.0 if last == 0 else float("inf")


def _unit_tokens(x: Tensor) -> Tensor:
    """Per-token RMS normalisation in float32 (a zero token stays zero)."""
    x = x.float()
    return x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-30)


def measure_states(states: Tensor) -> StateMeasures:
    """Measures of block states (R, L, B, T, D): recurrence, block layer, prompt, token, hidden.

    Non-finite states short-circuit: the curves are NaN and ``first_bad_recurrence`` says where
    it happened. Works one layer at a time so the normalised copy stays 1/L of the input.
    """
    if states.dim() != 5:
        raise ValueError(f"states must be (R, L, B, T, D), got shape {tuple(states.shape)}")
    r_count, n_layers, batch = states.shape[:3]
    if r_count < 4:
        raise ValueError(f"need at least 4 recurrences to judge convergence, got {r_count}")
    finite_r = torch.isfinite(states).flatten(1).all(dim=1)
    if not bool(finite_r.all()):
        nan = float("nan")
        return StateMeasures(
            finite=False,
            first_bad_recurrence=int((~finite_r).nonzero()[0, 0]),
            step_curve=np.full(r_count - 1, nan),
            distance_curve=np.full(r_count, nan),
            raw_last_step=nan,
            min_cosine=nan,
            norm_growth=nan,
        )
    steps = torch.zeros(r_count - 1, n_layers, batch)
    dist = torch.zeros(r_count, n_layers, batch)
    for layer in range(n_layers):
        n = _unit_tokens(states[:, layer])  # (R, B, T, D)
        norms = n.flatten(2).norm(dim=-1).clamp_min(1e-30)  # (R, B)
        steps[:, layer] = (n[1:] - n[:-1]).flatten(2).norm(dim=-1).cpu() / norms[1:].cpu()
        dist[:, layer] = (n - n[-1:]).flatten(2).norm(dim=-1).cpu() / norms[-1:].cpu()
    last, prev = states[-1].float(), states[-2].float()  # (L, B, T, D)
    raw = (last - prev).flatten(2).norm(dim=-1) / last.flatten(2).norm(dim=-1).clamp_min(1e-30)
    mid = states[r_count // 2, -1].float().flatten(1).norm(dim=-1).clamp_min(1e-30)
    growth = states[-1, -1].float().flatten(1).norm(dim=-1) / mid
    fixed = states[-1].float().cpu().numpy()  # (L, B, T, D)
    min_cos = [degeneracy(fixed[:, b]).min_cosine for b in range(batch)]
    return StateMeasures(
        finite=True,
        first_bad_recurrence=None,
        step_curve=steps.amax(dim=(1, 2)).double().numpy(),
        distance_curve=dist.mean(dim=(1, 2)).double().numpy(),
        raw_last_step=float(raw.max()),
        min_cosine=float(np.mean(min_cos)),
        norm_growth=float(growth.mean()),
    )


def combine_measures(parts: Sequence[StateMeasures]) -> StateMeasures:
    """Pool per-prompt measures the way :func:`measure_states` pools a batch: steps by max,
    distances, cosines and growth by mean; any non-finite prompt makes the pool non-finite."""
    if not parts:
        raise ValueError("no measures to combine")
    bad = [p for p in parts if not p.finite]
    if bad:
        return bad[0]
    return StateMeasures(
        finite=True,
        first_bad_recurrence=None,
        step_curve=np.max(np.stack([p.step_curve for p in parts]), axis=0),
        distance_curve=np.mean(np.stack([p.distance_curve for p in parts]), axis=0),
        raw_last_step=max(p.raw_last_step for p in parts),
        min_cosine=float(np.mean([p.min_cosine for p in parts])),
        norm_growth=float(np.mean([p.norm_growth for p in parts])),
    )


class _BlockStates:
    """Probe keeping every block state (batch kept) of one run; the engine never mutates a
    state after handing it over, so references suffice."""

    wants_attention = False

    def __init__(self, recurrences: int, layers: int) -> None:
        self.rows: list[list[Tensor | None]] = [[None] * layers for _ in range(recurrences)]

    def observe(self, site: Site, hidden: Tensor, attn: Tensor | None) -> None:
        if site.stage == "block":
            self.rows[site.recurrence][site.layer] = hidden.detach()

    def stacked(self) -> Tensor:
        rows = []
        for r, row in enumerate(self.rows):
            if any(h is None for h in row):
                raise RuntimeError(f"recurrence {r} was not observed completely")
            rows.append(torch.stack([h for h in row if h is not None]))
        return torch.stack(rows)


# =========================================================================== random-init grid


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

    def measurement(self) -> dict[str, Any]:
        """The fields that make two runs' cells comparable (saved in the sweep header)."""
        grid = {"seeds", "block_sizes", "norms", "injections", "name"}
        return {
            f.name: to_jsonable(getattr(self, f.name)) for f in fields(self) if f.name not in grid
        }


RANDOM_INIT_PRESETS: dict[str, RandomInitPreset] = {
    # Sized for 180 cells in < 10 min on 2 CPU cores (measured; see the issue report).
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
    "paper": RandomInitPreset(
        name="paper",
        d_model=512,
        n_heads=4,
        recurrences=128,
        prompts=4,
        prompt_tokens=64,
        spectral_iters=60,
    ),
}


def _unique(values: Iterable[Any], factor: str, allowed: Sequence[Any] | None = None) -> tuple:
    seen: list[Any] = []
    for v in values:
        if allowed is not None and v not in allowed:
            raise ValueError(f"unknown {factor} {v!r}; choose from {', '.join(map(str, allowed))}")
        if v in seen:
            raise ValueError(f"{factor} lists {v!r} twice; give every value once")
        seen.append(v)
    if not seen:
        raise ValueError(f"no {factor} given; name at least one")
    return tuple(seen)


def _check_seeds(seeds: int) -> int:
    if seeds < 1:
        raise ValueError(f"--seeds must be ≥ 1, got {seeds}")
    return seeds


def _check_blocks(blocks: Iterable[int], minimum: int) -> tuple[int, ...]:
    out = _unique(blocks, "block size")
    small = [b for b in out if b < minimum]
    if small:
        raise ValueError(
            f"block sizes {small} are too small: the degeneracy check compares block layers, so "
            f"give block sizes ≥ {minimum}"
        )
    return out


PresetT = TypeVar("PresetT", "RandomInitPreset", "TrainedPreset")


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
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(presets)}")
    preset = presets[name]
    return replace(
        preset,
        seeds=_check_seeds(preset.seeds if seeds is None else seeds),
        block_sizes=_check_blocks(block_sizes or preset.block_sizes, 2),
        norms=_unique(norms or preset.norms, "norm", NORM_SCHEMES),
        injections=_unique(injections or preset.injections, "injection", INJECTIONS),
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
    """Every cell of the preset's grid exactly once, norm-major (the table's order)."""
    norms = _unique(preset.norms, "norm", NORM_SCHEMES)
    injections = _unique(preset.injections, "injection", INJECTIONS)
    blocks = _check_blocks(preset.block_sizes, 2)
    seeds = range(_check_seeds(preset.seeds))
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

    texts = load_prompts(_bundled_prompts_path())
    if not 1 <= count <= len(texts):
        raise ValueError(f"prompts must lie in 1..{len(texts)} (bundled prompts), got {count}")
    tokenizer = ByteTokenizer()
    rows = [tokenizer.encode(t, bos=True) for t in texts[:count]]
    short = min(len(r) for r in rows)
    if tokens < 2 or tokens > short:
        raise ValueError(
            f"prompt_tokens must lie in 2..{short} (the shortest of the first {count} bundled "
            f"prompts), got {tokens}"
        )
    return torch.tensor([r[:tokens] for r in rows]), texts[:count]


# --------------------------------------------------------------------------- one cell


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

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = to_jsonable(asdict(self))
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CellResult:
        values = dict(data)
        values["cell"] = Cell(**values["cell"])
        for f in fields(cls):
            if f.type == "float" and values.get(f.name) is None:
                values[f.name] = float("nan")
        for name in ("distance_curve", "step_curve"):
            values[name] = [float("nan") if v is None else float(v) for v in values[name]]
        return cls(**values)


def _rms(x: Tensor) -> float:
    return float(x.float().pow(2).mean().sqrt())


def _block_radius(model: LoopLM, ids: Tensor, z_star: Tensor, iters: int, seed: int) -> Any:
    """Spectral radius of the whole-batch block map at ``z_star`` (block-diagonal over prompts,
    so this is the max over prompts), always in float32."""
    m32 = model if next(model.parameters()).dtype == torch.float32 else copy.deepcopy(model).float()
    with torch.no_grad():
        x, positions = prelude_output(m32, ids)

    def block_map(z: Tensor) -> Tensor:
        return block_step(m32, z, x, positions)

    return spectral_radius(block_map, z_star.float(), iters=iters, seed=seed)


def measure_cell(
    cell: Cell, preset: RandomInitPreset, ids: Tensor, *, device: str = "cpu"
) -> CellResult:
    """Build the cell's stack, run R recurrences on the prompt batch, measure and judge."""
    start = time.perf_counter()
    dtype = _DTYPES[preset.dtype]
    model = LoopLM(cell_config(cell, preset)).to(device=device, dtype=dtype).eval()
    ids = ids.to(device)
    probe = _BlockStates(preset.recurrences, cell.block)
    with torch.no_grad():
        out = model(ids, recurrences=preset.recurrences, probes=[probe])
        inputs, _ = prelude_output(model, ids)
    m = measure_states(probe.stacked())
    radius, converged = float("nan"), False
    if m.finite:
        est = _block_radius(model, ids, out.state, preset.spectral_iters, cell.seed)
        radius, converged = est.radius, est.converged
    verdict, reason = judge(
        finite=m.finite,
        last_step=m.last_step,
        trend=m.trend,
        radius=radius,
        min_cosine=m.min_cosine,
        rule=preset.rule,
        first_bad_recurrence=m.first_bad_recurrence,
    )
    ratio = _rms(inputs) / max(_rms(out.state), 1e-30) if m.finite else float("nan")
    return CellResult(
        cell=cell,
        verdict=verdict,
        reason=reason,
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
        )


# --------------------------------------------------------------------------- resume store


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class CellStore:
    """``ROOT/sweep.json`` (what was measured, checked on every reopen) and one file per
    finished cell ``ROOT/cells/KEY.json``, each written by atomic rename: a killed sweep leaves
    only whole files, and a rerun skips exactly those cells."""

    def __init__(self, root: str | Path, header: Mapping[str, Any]) -> None:
        self.root = Path(root)
        self.cells = self.root / "cells"
        self.cells.mkdir(parents=True, exist_ok=True)
        head = self.root / "sweep.json"
        wanted = to_jsonable(dict(header))
        if head.exists():
            existing = json.loads(head.read_text())
            diff = sorted(
                k for k in set(existing) | set(wanted) if existing.get(k) != wanted.get(k)
            )
            if diff:
                raise ValueError(
                    f"{self.root} holds a sweep with different settings ({', '.join(diff)}); "
                    "use another --out directory, or delete it to start afresh"
                )
        else:
            _atomic_write(head, json.dumps(wanted, indent=2, sort_keys=True))

    def path(self, key: str) -> Path:
        return self.cells / f"{key}.json"

    def done(self, key: str) -> bool:
        return self.path(key).exists()

    def load_json(self, key: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.path(key).read_text())
        return data

    def save_json(self, key: str, data: Mapping[str, Any]) -> None:
        text = json.dumps(to_jsonable(dict(data)), indent=1, allow_nan=False)
        _atomic_write(self.path(key), text)


@dataclass
class SweepRun:
    """What a sweep did: every result of its grid, the keys computed by this call (the rest
    were found on disk), the wall time of this call and where the report went."""

    results: list[Any]
    computed: list[str]
    seconds: float
    report: ReportPaths | None
    table_md: Path
    table_csv: Path


def run_random_init(
    out_dir: str | Path,
    preset: RandomInitPreset,
    *,
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> SweepRun:
    """Run (or resume) the random-init sweep into ``out_dir`` and write ``table.md``,
    ``table.csv``, ``report.html`` (+ ``figures/``, ``metrics.json``) and ``cells/*.json``."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    grid = random_init_grid(preset)
    ids, texts = bundled_prompt_ids(preset.prompts, preset.prompt_tokens)
    store = CellStore(out_dir, {"kind": "random-init", **preset.measurement()})
    todo = [c for c in grid if not store.done(c.key)]
    if len(todo) < len(grid):
        log(f"resuming: {len(grid) - len(todo)} of {len(grid)} cells already done in {out_dir}")
    computed: list[str] = []
    for cell in tqdm(todo, desc="random-init cells", disable=not progress):
        result = run_cell(cell, preset, ids, device=device)
        if result.error:
            log(f"cell {cell.key} failed and is recorded as not stable: {result.error}")
        store.save_json(cell.key, result.to_json())
        computed.append(cell.key)
    results = [CellResult.from_json(store.load_json(c.key)) for c in grid]
    elapsed = time.perf_counter() - start
    out, keys = Path(out_dir), [c.key for c in grid]
    if not computed and _outputs_current(out, keys):
        return SweepRun(results, computed, elapsed, _existing_report(out), *_tables(out))
    md, csv_path, paths = write_random_init_outputs(out, results, preset, elapsed, texts)
    _mark_outputs(out, keys)
    return SweepRun(results, computed, elapsed, paths, md, csv_path)


def _tables(out: Path) -> tuple[Path, Path]:
    return out / "table.md", out / "table.csv"


def _outputs_current(out: Path, keys: Sequence[str]) -> bool:
    """True when the tables and report on disk describe exactly these finished cells, so a
    rerun that computed nothing need not redraw them (figures are the slow part)."""
    mark = out / "outputs.json"
    needed = [out / "report.html", *_tables(out), mark]
    if not all(p.exists() for p in needed):
        return False
    return bool(json.loads(mark.read_text()).get("cells") == list(keys))


def _mark_outputs(out: Path, keys: Sequence[str]) -> None:
    _atomic_write(out / "outputs.json", json.dumps({"cells": list(keys)}, indent=1))


def _existing_report(out: Path) -> ReportPaths:
    figures = sorted((out / "figures").glob("*")) if (out / "figures").is_dir() else []
    return ReportPaths(html=out / "report.html", metrics_json=out / "metrics.json", figures=figures)


# --------------------------------------------------------------------------- aggregation


def _mean_sd(values: Iterable[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std())


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

    @property
    def unanimous(self) -> bool:
        return max(self.counts.values()) == self.n

    def counts_text(self) -> str:
        return "/".join(
            str(self.counts[v]) for v in (STABLE_DISTINCT, STABLE_DEGENERATE, NOT_STABLE)
        )


def summarise_groups(results: Sequence[CellResult]) -> list[GroupSummary]:
    """Pool seeds per (norm, injection, block), in the order the cells first appear."""
    groups: dict[tuple[str, str, int], list[CellResult]] = {}
    for r in results:
        groups.setdefault((r.cell.norm, r.cell.injection, r.cell.block), []).append(r)
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
                last_step=_mean_sd(r.last_step for r in rs),
                trend=_mean_sd(r.trend for r in rs)[0],
                min_cosine=_mean_sd(r.min_cosine for r in rs),
                radius=_mean_sd(r.radius for r in rs),
                norm_growth=_mean_sd(r.norm_growth for r in rs)[0],
                injection_ratio=_mean_sd(r.injection_ratio for r in rs)[0],
                d_model=rs[0].d_model,
                recurrences=rs[0].recurrences,
                adapter_init_noise=rs[0].adapter_init_noise,
                embed_init_std=rs[0].embed_init_std,
            )
        )
    return out


def _pm(pair: tuple[float, float], fmt: str) -> str:
    mean, sd = pair
    if not math.isfinite(mean):
        return "—"
    return f"{mean:{fmt}} ± {sd:{fmt}}"


def _num(x: float, fmt: str) -> str:
    return f"{x:{fmt}}" if math.isfinite(x) else "—"


GROUP_COLUMNS = [
    "norm",
    "injection",
    "block",
    "verdict",
    "seeds distinct/degenerate/not stable",
    "last step",
    "min cos",
    "ρ(block)",
    "‖X‖ growth",
    "input/state RMS",
]


def _group_row(g: GroupSummary) -> list[str]:
    verdict = (
        g.verdict
        + ("" if g.unanimous else " (split)")
        + (f", {g.errors} errors" if g.errors else "")
    )
    return [
        g.norm,
        g.injection,
        str(g.block),
        verdict,
        g.counts_text(),
        _pm(g.last_step, ".1e"),
        _pm(g.min_cosine, ".4f"),
        _pm(g.radius, ".3f"),
        _num(g.norm_growth, ".2f"),
        _num(g.injection_ratio, ".2g"),
    ]


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table ('|' in cells escaped)."""

    def esc(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(c) for c in columns) + " |"]
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    lines.extend("| " + " | ".join(esc(c) for c in row) + " |" for row in rows)
    return "\n".join(lines) + "\n"


def _group_csv(groups: Sequence[GroupSummary]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([
        "norm", "injection", "block", "seeds", "verdict", "n_stable_distinct",
        "n_stable_degenerate", "n_not_stable", "n_errors", "last_step_mean", "last_step_sd",
        "step_trend_mean", "min_cosine_mean", "min_cosine_sd", "radius_mean", "radius_sd",
        "norm_growth_mean", "injection_ratio_mean",
    ])  # fmt: skip
    for g in groups:
        writer.writerow([
            g.norm, g.injection, g.block, g.n, g.verdict, g.counts[STABLE_DISTINCT],
            g.counts[STABLE_DEGENERATE], g.counts[NOT_STABLE], g.errors, *g.last_step, g.trend,
            *g.min_cosine, *g.radius, g.norm_growth, g.injection_ratio,
        ])  # fmt: skip
    return buf.getvalue()


# --------------------------------------------------------------------------- the study


#: SPEC §3, random-initialised 12-layer stacks (no prelude/coda, 3 seeds). Keys: (norm, injected).
#: "stable" (Huginn + injection) does not say whether the fixed points are distinct.
STUDY_VERDICTS: dict[tuple[str, bool], str] = {
    ("pre", True): STABLE_DISTINCT,
    ("pre", False): STABLE_DEGENERATE,
    ("huginn", True): "stable",
    ("huginn", False): NOT_STABLE,
    ("ouro", True): NOT_STABLE,
    ("ouro", False): NOT_STABLE,
}


def _agrees(ours: str, study: str) -> bool:
    return ours.startswith("stable") if study == "stable" else ours == study


def _explain(g: GroupSummary, study: str, rule: VerdictRule) -> str:
    """Why our verdict differs from the study's, from this run's numbers."""
    notes: list[str] = []
    step, _ = g.last_step
    mc, _ = g.min_cosine
    rho, _ = g.radius
    if not g.unanimous:
        notes.append(f"seeds split ({g.counts_text()} distinct/degenerate/not stable)")
    if _agrees(g.verdict, study):
        return "; ".join(notes) or "—"
    if g.errors:
        notes.append(f"{g.errors} seed(s) raised (see cells/*.json)")
    if g.verdict == NOT_STABLE and study != NOT_STABLE:
        if math.isfinite(step) and step > rule.tol_step:
            if math.isfinite(g.trend) and g.trend < rule.shrinking_trend:
                notes.append(
                    f"threshold/length: still converging at R={g.recurrences} (last step "
                    f"{step:.1e} > {rule.tol_step:g}, ×{g.trend:.2f} over the second half); more "
                    "recurrences or a looser tol_step would accept it"
                )
            else:
                notes.append(
                    f"keeps moving at R={g.recurrences} (last step {step:.1e}, ×{g.trend:.2f} "
                    "over the second half)"
                )
        if math.isfinite(g.norm_growth) and 1.5 < g.norm_growth <= 3.0:
            notes.append(
                f"the state grows linearly (‖X‖ ×{g.norm_growth:.2f} from R/2 to R), so its "
                "direction settles only algebraically (~1/t), not geometrically"
            )
        elif math.isfinite(g.norm_growth) and g.norm_growth > 3.0:
            notes.append(f"the state's norm blows up (×{g.norm_growth:.3g} from R/2 to R)")
        if g.injection == "concat-linear" and g.norm == "pre":
            sigma = g.adapter_init_noise
            noise = sigma * math.sqrt(g.d_model)
            notes.append(
                f"scale/init: LoopLM's adapter starts as I/√2 on [Z; X] plus N(0, {sigma:g}) "
                f"noise, whose Z-block has spectral radius ≈ {sigma:g}·√{g.d_model}, so the "
                f"unnormalised linear recurrence has radius ≈ 0.71 + {noise:.2f} = "
                f"{2**-0.5 + noise:.2f} at this width (--adapter-init-noise sets σ)"
            )
        if math.isfinite(rho) and rho > 1 + rule.radius_margin:
            notes.append(f"block Jacobian expanding (ρ = {rho:.3f})")
        weak = math.isfinite(g.injection_ratio) and g.injection_ratio < 0.1
        if g.injection != "none" and g.norm != "pre" and weak:
            notes.append(
                f"scale/init: the injected embedding is only {g.injection_ratio:.2g}× the "
                f"state's RMS (N(0, {g.embed_init_std:g}) embeddings against a normalised "
                "stream), too weak to pin the state at random init (--embed-init-std sets it)"
            )
        if study == STABLE_DEGENERATE and math.isfinite(mc) and mc >= rule.degenerate_cosine:
            notes.append(f"its layers have already collapsed (min cos {mc:.4f}), as the study saw")
    elif g.verdict == STABLE_DEGENERATE and study == STABLE_DISTINCT:
        notes.append(
            f"threshold/scale: settled, but min cos {mc:.4f} ≥ {rule.degenerate_cosine:g}; the "
            f"layers' fixed points do differ (1 − cos = {1 - mc:.1e}), yet at width "
            f"{g.d_model} with depth-scaled output projections each layer moves the state "
            "only a little at init"
        )
    elif g.verdict == STABLE_DISTINCT and study == STABLE_DEGENERATE:
        notes.append(f"min cos {mc:.4f} < {rule.degenerate_cosine:g}: layers stay apart here")
    elif g.verdict.startswith("stable") and study == NOT_STABLE:
        notes.append(
            f"settled at R={g.recurrences} (last step {step:.1e} ≤ {rule.tol_step:g}, "
            f"ρ = {rho:.3f}): at width {g.d_model} and this init the instability did not "
            "appear within the run (scale/seeds)"
        )
    return "; ".join(notes) or "—"


def compare_with_study(
    results: Sequence[CellResult],
    *,
    block: int = 12,
    norms: Sequence[str] = ("pre", "huginn", "ouro"),
    injections: Sequence[str] = ("none", "concat-linear"),
    rule: VerdictRule | None = None,
) -> Table:
    """Our verdicts for the 12-layer cells the study reports (SPEC §3) beside the study's, with
    the reason for every difference computed from this run's numbers."""
    rule = rule or VerdictRule()
    groups = {(g.norm, g.injection, g.block): g for g in summarise_groups(results)}
    rows: list[list[Any]] = []
    for norm in norms:
        for injection in injections:
            g = groups.get((norm, injection, block))
            study = STUDY_VERDICTS.get((norm, injection != "none"), "—")
            if g is None:
                rows.append([f"{norm} + {injection}", "not run", "—", "—", "—", study, "—", "—"])
                continue
            rows.append([
                f"{norm} + {injection}",
                f"{g.verdict} ({g.counts_text()})",
                _pm(g.last_step, ".1e"),
                _pm(g.min_cosine, ".4f"),
                _pm(g.radius, ".3f"),
                study,
                "yes" if _agrees(g.verdict, study) else "no",
                _explain(g, study, rule),
            ])  # fmt: skip
    return Table(
        title=f"{block}-layer random-init stacks: ours vs the study (SPEC §3)",
        columns=[
            "stack",
            "ours (seeds distinct/degenerate/not stable)",
            "last step",
            "min cos",
            "ρ(block)",
            "study",
            "agree",
            "why they differ",
        ],
        rows=rows,
        note=f"Verdict rule: {rule.describe()}.",
    )


# --------------------------------------------------------------------------- factor summary


def _geomean(values: Iterable[float]) -> float:
    arr = np.asarray([v for v in values if math.isfinite(v) and v > 0], dtype=np.float64)
    return float(np.exp(np.log(arr).mean())) if arr.size else float("nan")


def _level_stats(rs: Sequence[CellResult]) -> dict[str, Any]:
    verdicts = [r.verdict for r in rs]
    return {
        "n": len(rs),
        "distinct": verdicts.count(STABLE_DISTINCT),
        "degenerate": verdicts.count(STABLE_DEGENERATE),
        "unstable": verdicts.count(NOT_STABLE),
        "step": _geomean(r.last_step for r in rs),
        "radius": _mean_sd(r.radius for r in rs)[0],
    }


def _ratio_text(new: float, old: float) -> str:
    if not (math.isfinite(new) and math.isfinite(old)) or old == 0:
        return "—"
    return f"×{new / old:.2g}"


def factor_summary(results: Sequence[CellResult]) -> list[str]:
    """One paragraph per factor (norm, injection, block size): what each level did and how it
    changed things against the first level, with numbers from ``results``."""
    factors: list[tuple[str, str, Callable[[Cell], Any]]] = [
        ("Normalisation", "norm", lambda c: c.norm),
        ("Injection", "injection", lambda c: c.injection),
        ("Block size", "block size", lambda c: c.block),
    ]
    paragraphs = []
    for title, noun, key in factors:
        levels: dict[Any, list[CellResult]] = {}
        for r in results:
            levels.setdefault(key(r.cell), []).append(r)
        if len(levels) < 2:
            continue
        stats = {lv: _level_stats(rs) for lv, rs in levels.items()}
        parts = [
            f"{lv}: {s['distinct']}/{s['n']} stable distinct, {s['degenerate']}/{s['n']} stable "
            f"degenerate, {s['unstable']}/{s['n']} not stable (geometric-mean last step "
            f"{s['step']:.1e}, mean ρ {_num(s['radius'], '.3f')})"
            for lv, s in stats.items()
        ]
        base, *others = list(stats)
        b = stats[base]
        changes = [
            f"{lv} changes stable-distinct cells from {b['distinct']}/{b['n']} to "
            f"{s['distinct']}/{s['n']}, stable cells of either kind from "
            f"{b['n'] - b['unstable']}/{b['n']} to {s['n'] - s['unstable']}/{s['n']}, and the "
            f"geometric-mean last step {_ratio_text(s['step'], b['step'])} "
            f"({b['step']:.1e} → {s['step']:.1e})"
            for lv, s in ((lv, stats[lv]) for lv in others)
        ]
        paragraphs.append(
            f"{title} — "
            + "; ".join(parts)
            + f". Against {noun} {base}: "
            + "; ".join(changes)
            + "."
        )
    return paragraphs


# --------------------------------------------------------------------------- figures


def _curve_figure(results: Sequence[CellResult], norm: str, injections: Sequence[str]) -> MplFigure:
    """Distance to X* (top) and relative step (bottom) per injection for one norm scheme; one
    line per block size (mean over seeds), the band spans the seeds (min..max)."""
    cols = len(injections)
    fig = MplFigure(figsize=(3.4 * cols, 5.6))
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.09, top=0.93, wspace=0.4, hspace=0.35)
    FigureCanvasAgg(fig)
    axes = [[fig.add_subplot(2, cols, row * cols + j + 1) for j in range(cols)] for row in (0, 1)]
    blocks = sorted({r.cell.block for r in results})
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for j, injection in enumerate(injections):
        for row, attr, label in (
            (0, "distance_curve", "‖n_t − n*‖/‖n*‖"),
            (1, "step_curve", "relative step"),
        ):
            ax: Axes = axes[row][j]
            plotted = False
            for i, block in enumerate(blocks):
                curves = [
                    np.asarray(getattr(r, attr), dtype=np.float64)
                    for r in results
                    if (r.cell.norm, r.cell.injection, r.cell.block) == (norm, injection, block)
                    and r.finite
                    and len(getattr(r, attr))
                ]
                if not curves:
                    continue
                arr = np.stack(curves)
                if attr == "distance_curve":
                    arr = arr[:, :-1]  # the last point is 0 by construction
                x = np.arange(arr.shape[1]) + (1 if attr == "step_curve" else 0)
                arr = np.where(arr > 0, arr, np.nan)
                with np.errstate(all="ignore"), _quiet():
                    mean = np.nanmean(arr, axis=0)
                    lo, hi = np.nanmin(arr, axis=0), np.nanmax(arr, axis=0)
                colour = colours[i % len(colours)]
                ax.plot(x, mean, color=colour, label=f"k={block}")
                ax.fill_between(x, lo, hi, color=colour, alpha=0.2, linewidth=0)
                plotted = True
            if plotted:
                ax.set_yscale("log")
            if row == 0:
                ax.set_title(f"{norm} + {injection}", fontsize=9)
            ax.set_xlabel("recurrence", fontsize=8)
            ax.set_ylabel(label, fontsize=8)
            ax.tick_params(labelsize=7)
            if plotted and j == 0 and row == 0:
                ax.legend(fontsize=7)
    return fig


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence numpy's all-NaN-slice warnings (bands over a single seed, empty pools)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        yield


# --------------------------------------------------------------------------- writers


def _counts_table(groups: Sequence[GroupSummary]) -> Table:
    rows: list[list[Any]] = [
        [f"{g.norm} + {g.injection}, k={g.block}", g.verdict, g.counts_text()] for g in groups
    ]
    return Table(
        "Verdict per stack", ["stack", "verdict", "seeds distinct/degenerate/not stable"], rows
    )


def write_random_init_outputs(
    out: Path,
    results: Sequence[CellResult],
    preset: RandomInitPreset,
    elapsed: float,
    prompts: Sequence[str],
) -> tuple[Path, Path, ReportPaths]:
    """``table.md``, ``table.csv`` and the HTML report of a random-init sweep."""
    groups = summarise_groups(results)
    rows = [_group_row(g) for g in groups]
    rule = preset.rule
    summary = factor_summary(results)
    has_12 = any(r.cell.block == 12 for r in results)
    comparison = compare_with_study(results, rule=rule) if has_12 else None
    cell_seconds = sum(r.seconds for r in results)
    finite = [r for r in results if math.isfinite(r.radius)]
    radius_note = (
        f"Block spectral radius: {len(finite)} of {len(results)} cells have an estimate; "
        f"{sum(r.radius_converged for r in finite)} of them reached the Arnoldi residual "
        f"≤ 1e-4·ρ within {preset.spectral_iters} Jacobian-vector products (the others are "
        "one-cycle Ritz estimates)."
    )
    setup = (
        f"Preset {preset.name}: width {preset.d_model}, {preset.n_heads} heads, "
        f"{preset.recurrences} recurrences, {preset.prompts} bundled prompts cut to "
        f"{preset.prompt_tokens} tokens (one batch), block spectral radius from "
        f"{preset.spectral_iters} Jacobian-vector products, {preset.dtype}. No prelude, no coda; "
        f"Z0 = X = the token embedding in every cell. LoopLM's init: N(0, 0.02) weights, output "
        f"projections N(0, 0.02/√(2·k·{preset.init_recurrences})), token embeddings "
        f"N(0, {preset.embed_init_std:g}), concat-linear adapter (Z + X)/√2 + "
        f"N(0, {preset.adapter_init_noise:g}) noise, gate biases 0, diagonal decay exp(−e^{{−1}})."
    )
    md = [
        "# Random-init ablation\n",
        setup + "\n",
        f"Verdict rule: {rule.describe()}.\n",
        f"{len(results)} cells; {cell_seconds:.0f} s of cell time in all; this call took "
        f"{elapsed:.0f} s.\n",
        radius_note + "\n",
        "## Summary\n",
        *[p + "\n" for p in summary],
        "## All stacks (mean ± sd over seeds)\n",
        markdown_table(GROUP_COLUMNS, rows),
    ]
    if comparison is not None:
        md += [
            "## 12-layer stacks against the study\n",
            markdown_table(comparison.columns, [[str(c) for c in r] for r in comparison.rows]),
        ]
    md_path, csv_path = out / "table.md", out / "table.csv"
    _atomic_write(md_path, "\n".join(md))
    _atomic_write(csv_path, _group_csv(groups))

    norms = list(dict.fromkeys(r.cell.norm for r in results))
    injections = list(dict.fromkeys(r.cell.injection for r in results))
    figures = [
        Figure(
            f"curves_{norm}",
            f"{norm} norm: distance to the last state (top) and relative step (bottom) of the "
            "RMS-normalised state; line = mean over seeds, band = min..max over seeds.",
            _curve_figure(results, norm, injections),
        )
        for norm in norms
    ]
    table = Table(
        "All stacks (mean ± sd over seeds)",
        GROUP_COLUMNS,
        [list(r) for r in rows],
        note="‖X‖ growth: norm of the last layer's state at R over R/2 (≈2: linear growth); "
        "input/state RMS: RMS of the injected X over the final state's.",
    )
    sections = [
        Section(
            "Summary", text="\n\n".join(summary) or "One level per factor: nothing to compare."
        ),
    ]
    if comparison is not None:
        sections.append(
            Section(
                "Against the study",
                text=(
                    "The study's verdicts (SPEC §3) for 12-layer stacks beside ours; where they "
                    "differ, the reason is computed from this run (scale: our width and init; "
                    "seeds: how the seeds split; thresholds: tol_step and the degeneracy cosine)."
                ),
                tables=[comparison],
            )
        )
    sections += [
        Section("All stacks", tables=[table]),
        Section("Curves", figures=figures),
        Section("Method", text=f"{setup}\n\nVerdict rule: {rule.describe()}.\n\n{radius_note}"),
    ]
    metrics = {
        "preset": asdict(preset),
        "cells": len(results),
        "cell_seconds": cell_seconds,
        "elapsed_seconds": elapsed,
        "groups": [asdict(g) for g in groups],
        "summary": summary,
    }
    paths = write_report(
        out,
        title="loopscope ablation — random-init looped stacks",
        subtitle=f"{len(results)} cells ({len(groups)} stacks × seeds); " + setup,
        verdict=comparison or _counts_table(groups),
        sections=sections,
        metrics=metrics,
        prompts=list(prompts),
    )
    return md_path, csv_path, paths


# =========================================================================== trained grid


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

    def measurement(self) -> dict[str, Any]:
        grid = {"block_sizes", "injections", "prelude_coda", "norms", "seeds", "name"}
        return {
            f.name: to_jsonable(getattr(self, f.name)) for f in fields(self) if f.name not in grid
        }


def _paper_train() -> TrainConfig:
    from loopscope.training.named_configs import get_config

    return get_config("study-2-4x4-2").train


TRAINED_PRESETS: dict[str, TrainedPreset] = {
    # A few CPU hours at most: width 64 and 300 steps on 1–2-step problems (SPEC §3 uses 512
    # and 20k steps); enough for the dynamics and stages to be measured, not for accuracy.
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


@dataclass(frozen=True)
class TrainedCell:
    """One trained model: a looped (p, k⊗4, c) with p = c = 2 or 0, or the feedforward twin."""

    block: int
    injection: str
    prelude_coda: bool
    norm: str
    seed: int
    feedforward: bool = False

    @property
    def name(self) -> str:
        if self.feedforward:
            return f"ff{self.block}-{self.norm}-s{self.seed}"
        p = 2 if self.prelude_coda else 0
        return f"{p}-{self.block}x4-{p}-{self.injection}-{self.norm}-s{self.seed}"

    @property
    def layout(self) -> str:
        if self.feedforward:
            return f"feedforward {self.block}"
        p = 2 if self.prelude_coda else 0
        sub = "_I" if self.injection != "none" else ""
        return f"({p},{self.block}⊗4,{p}){sub}"


def trained_grid(preset: TrainedPreset) -> list[TrainedCell]:
    """Looped cells (norm × block × injection × prelude-coda × seed), then one feedforward
    reference per norm and seed."""
    norms = _unique(preset.norms, "norm", NORM_SCHEMES)
    blocks = _check_blocks(preset.block_sizes, 2)
    injections = _unique(preset.injections, "injection", INJECTIONS)
    pcs = _unique(preset.prelude_coda, "prelude-coda choice")
    seeds = range(_check_seeds(preset.seeds))
    looped = [
        TrainedCell(k, inj, pc, norm, seed)
        for norm, k, inj, pc, seed in itertools.product(norms, blocks, injections, pcs, seeds)
    ]
    ff = [
        TrainedCell(preset.feedforward_layers, "none", False, norm, seed, feedforward=True)
        for norm, seed in itertools.product(norms, seeds)
    ]
    return looped + ff


def trained_configs(cell: TrainedCell, preset: TrainedPreset) -> tuple[LoopConfig, TrainConfig]:
    """Model and training configs of a cell, from the registry's study configs."""
    from loopscope.training.named_configs import get_config

    base = get_config("study-feedforward-12" if cell.feedforward else "study-2-4x4-2").model
    p = 0 if cell.feedforward or not cell.prelude_coda else 2
    model = base.with_(
        name=cell.name,
        d_model=preset.d_model,
        n_heads=preset.n_heads,
        prelude_layers=p,
        block_layers=cell.block,
        coda_layers=p,
        train_recurrences=1 if cell.feedforward else base.train_recurrences,
        injection=cell.injection,
        init_state="prelude" if cell.injection == "none" else "zeros",
        norm_scheme=cell.norm,
        context_length=preset.context_length,
        init_seed=cell.seed,
    )
    return model, replace(preset.train, seed=cell.seed)


@dataclass(frozen=True)
class TrainedResult:
    """One trained cell's numbers (``cells/NAME/result.json``)."""

    name: str
    layout: str
    block: int
    injection: str
    prelude_coda: bool
    norm: str
    seed: int
    feedforward: bool
    parameters: int
    steps: int
    eval_loss: float
    eval_accuracy: float
    verdict: str
    reason: str
    last_step: float
    trend: float
    min_cosine: float
    radius: float
    converged_layers: int | None
    non_fixed_point_rate: float
    stages: bool
    note: str
    seconds: float

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrainedResult:
        values = dict(data)
        for f in fields(cls):
            if f.type == "float" and values.get(f.name) is None:
                values[f.name] = float("nan")
        return cls(**values)


def _final_evaluation(
    history: Sequence[Mapping[str, float]], steps: int
) -> dict[str, float] | None:
    """The evaluation ``train`` already made at the last step, if any."""
    if history and int(history[-1].get("step", -1)) == steps and "eval_loss" in history[-1]:
        return {
            "eval_loss": history[-1]["eval_loss"],
            "eval_accuracy": history[-1]["eval_accuracy"],
        }
    return None


def _trace_measures(store: Any) -> StateMeasures:
    parts = []
    for prompt in store:
        block = prompt.block
        if block is None:
            raise ValueError(f"{prompt.path} has no block states (trace with capture='full')")
        states = torch.tensor(np.asarray(block, dtype=np.float32))  # a copy: traces are mmapped
        parts.append(measure_states(states[:, :, None]))
    return combine_measures(parts)


def _dynamics(
    model: LoopLM, cell_dir: Path, prompts: Sequence[Any], preset: TrainedPreset, progress: bool
) -> dict[str, Any]:
    """Trace + per-cell dynamics report; our measures and verdict from the traced states."""
    from loopscope import pipeline
    from loopscope.trace.writer import TraceSettings

    settings = TraceSettings(
        recurrences=preset.trace_recurrences,
        attention=True,
        attention_recurrences=8,
        stability_prompts=1,
        stability_iters=preset.stability_iters,
    )
    store = pipeline.trace(model, list(prompts), cell_dir / "trace", settings, progress=progress)
    paths = pipeline.report(store.path, cell_dir / "report")
    dyn_metrics = json.loads(paths.metrics_json.read_text())["dynamics"]
    m = _trace_measures(store)
    stability = dyn_metrics.get("stability") or {}
    radius = stability.get("block_radius")
    radius = float("nan") if radius is None else float(radius)
    verdict, reason = judge(
        finite=m.finite,
        last_step=m.last_step,
        trend=m.trend,
        radius=radius,
        min_cosine=m.min_cosine,
        rule=preset.rule,
        first_bad_recurrence=m.first_bad_recurrence,
    )
    settled = dyn_metrics["fixed_point"]["settled"]
    rate = dyn_metrics["limiting_behaviour"]["last_layer"]["non_fixed_point_token_rate"]
    return {
        "verdict": verdict,
        "reason": reason,
        "last_step": m.last_step,
        "trend": m.trend,
        "min_cosine": m.min_cosine,
        "radius": radius,
        "converged_layers": int(sum(bool(s) for s in settled)),
        "non_fixed_point_rate": float("nan") if rate is None else float(rate),
    }


def _stages(model: LoopLM, cell_dir: Path, prompts: Sequence[Any]) -> str:
    """Stage profile at the training recurrence count into ``stages.json``; returns a note
    ('' when done) because the stages pipeline may be missing in a partial install."""
    try:
        from loopscope.studies.stages import stages_profile
    except ImportError as err:
        return f"stages skipped: loopscope.studies.stages unavailable ({err})"
    profile = stages_profile(model, list(prompts), progress=False)
    _atomic_write(cell_dir / "stages.json", json.dumps(profile.to_dict()))
    return ""


def run_trained_cell(
    cell: TrainedCell,
    preset: TrainedPreset,
    cell_dir: Path,
    prompts: Sequence[Any],
    *,
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainedResult:
    """Train (resuming inside ``cell_dir``), evaluate, trace + analyse, profile stages."""
    from loopscope.training.evaluation import evaluate
    from loopscope.training.loop import train

    start = time.perf_counter()
    model_cfg, train_cfg = trained_configs(cell, preset)
    model = LoopLM(model_cfg)
    result = train(model, train_cfg, cell_dir, device=device, progress=progress, log=log)
    model.eval()
    scores = _final_evaluation(result.history, train_cfg.steps) or evaluate(
        model, train_cfg, device=device
    )
    nan = float("nan")
    dyn: dict[str, Any] = {
        "verdict": "—",
        "reason": "feedforward: no recurrence",
        "last_step": nan,
        "trend": nan,
        "min_cosine": nan,
        "radius": nan,
        "converged_layers": None,
        "non_fixed_point_rate": nan,
    }
    if not cell.feedforward:
        dyn = _dynamics(model, cell_dir, prompts, preset, progress)
    note = _stages(model, cell_dir, prompts)
    return TrainedResult(
        name=cell.name,
        layout=cell.layout,
        block=cell.block,
        injection=cell.injection,
        prelude_coda=cell.prelude_coda,
        norm=cell.norm,
        seed=cell.seed,
        feedforward=cell.feedforward,
        parameters=model.num_parameters(),
        steps=result.steps_done,
        eval_loss=float(scores["eval_loss"]),
        eval_accuracy=float(scores["eval_accuracy"]),
        stages=not note,
        note=note,
        seconds=time.perf_counter() - start,
        **dyn,
    )


def stage_alignment_scores(
    out: Path, results: Sequence[TrainedResult]
) -> dict[str, dict[str, float]]:
    """name → {"pearson", "dtw"}: mean over stage metrics and block passes of the alignment of
    each looped cell's passes with the feedforward cell of the same norm and seed."""
    from loopscope.analysis.alignment import alignment_summary, stage_alignment
    from loopscope.analysis.stages import StagesProfile

    def profile(name: str) -> StagesProfile | None:
        path = out / "cells" / name / "stages.json"
        return StagesProfile.from_dict(json.loads(path.read_text())) if path.exists() else None

    refs = {(r.norm, r.seed): r.name for r in results if r.feedforward}
    scores: dict[str, dict[str, float]] = {}
    for r in results:
        ref_name = refs.get((r.norm, r.seed))
        if r.feedforward or ref_name is None:
            continue
        looped, ref = profile(r.name), profile(ref_name)
        if looped is None or ref is None:
            continue
        summary = alignment_summary(stage_alignment(looped, ref))
        with _quiet():
            pearson = float(np.nanmean([s["pearson"] for s in summary.values()] or [np.nan]))
            dtw = float(np.nanmean([s["dtw_distance"] for s in summary.values()] or [np.nan]))
        scores[r.name] = {"pearson": pearson, "dtw": dtw, "reference": ref_name}  # type: ignore[dict-item]
    return scores


def _trained_levels(
    results: Sequence[TrainedResult],
    align: Mapping[str, Mapping[str, Any]],
    key: Callable[[TrainedResult], Any],
) -> dict[Any, dict[str, float]]:
    levels: dict[Any, list[TrainedResult]] = {}
    for r in results:
        if not r.feedforward:
            levels.setdefault(key(r), []).append(r)
    out = {}
    for lv, rs in levels.items():
        out[lv] = {
            "n": len(rs),
            "accuracy": _mean_sd(r.eval_accuracy for r in rs)[0],
            "loss": _mean_sd(r.eval_loss for r in rs)[0],
            "stable": sum(r.verdict.startswith("stable") for r in rs),
            "step": _geomean(r.last_step for r in rs),
            "radius": _mean_sd(r.radius for r in rs)[0],
            "align": _mean_sd(float(align[r.name]["pearson"]) for r in rs if r.name in align)[0],
        }
    return out


def trained_factor_summary(
    results: Sequence[TrainedResult], align: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    """One paragraph per factor of the trained sweep, numbers from this run."""
    paragraphs = []
    factors: list[tuple[str, Callable[[TrainedResult], Any]]] = [
        ("Block size", lambda r: f"k={r.block}"),
        ("Injection", lambda r: r.injection),
        ("Prelude/coda", lambda r: "with prelude/coda" if r.prelude_coda else "without"),
    ]
    for title, key in factors:
        stats = _trained_levels(results, align, key)
        if len(stats) < 2:
            continue
        parts = [
            f"{lv}: accuracy {s['accuracy']:.2f}, eval loss {s['loss']:.3f}, "
            f"{s['stable']}/{s['n']} stable, geometric-mean last step {s['step']:.1e}, mean ρ "
            f"{_num(s['radius'], '.3f')}, stage alignment {_num(s['align'], '.2f')}"
            for lv, s in stats.items()
        ]
        base, *others = list(stats)
        b = stats[base]
        changes = [
            f"{lv} moves accuracy by {s['accuracy'] - b['accuracy']:+.2f}, eval loss by "
            f"{s['loss'] - b['loss']:+.3f}, stage alignment by "
            f"{_num(s['align'] - b['align'], '+.2f')} and the last step "
            f"{_ratio_text(s['step'], b['step'])}"
            for lv, s in ((lv, stats[lv]) for lv in others)
        ]
        paragraphs.append(
            f"{title} — " + "; ".join(parts) + f". Against {base}: " + "; ".join(changes) + "."
        )
    ff = [r for r in results if r.feedforward]
    looped = [r for r in results if not r.feedforward]
    if ff and looped:
        fa = _mean_sd(r.eval_accuracy for r in ff)[0]
        la = _mean_sd(r.eval_accuracy for r in looped)[0]
        paragraphs.append(
            f"Looped vs feedforward — mean accuracy of the looped models {la:.2f} against "
            f"{fa:.2f} for the {ff[0].block}-layer feedforward model; eval loss "
            f"{_mean_sd(r.eval_loss for r in looped)[0]:.3f} against "
            f"{_mean_sd(r.eval_loss for r in ff)[0]:.3f}."
        )
    return paragraphs


TRAINED_COLUMNS = [
    "cell",
    "layout",
    "accuracy",
    "eval loss",
    "verdict",
    "last step",
    "min cos",
    "ρ(block)",
    "settled layers",
    "stage alignment (Pearson)",
    "stage DTW",
]


def _trained_row(r: TrainedResult, align: Mapping[str, Mapping[str, Any]]) -> list[str]:
    a = align.get(r.name, {})
    return [
        r.name,
        r.layout,
        f"{r.eval_accuracy:.2f}",
        f"{r.eval_loss:.3f}",
        r.verdict,
        _num(r.last_step, ".1e"),
        _num(r.min_cosine, ".4f"),
        _num(r.radius, ".3f"),
        "—" if r.converged_layers is None else f"{r.converged_layers}/{r.block}",
        _num(float(a.get("pearson", float("nan"))), ".2f"),
        _num(float(a.get("dtw", float("nan"))), ".2f"),
    ]


def write_trained_outputs(
    out: Path, results: Sequence[TrainedResult], preset: TrainedPreset, elapsed: float
) -> tuple[Path, Path, ReportPaths]:
    """``table.md``, ``table.csv`` and the comparison report of a trained sweep."""
    align = stage_alignment_scores(out, results)
    rows = [_trained_row(r, align) for r in results]
    summary = trained_factor_summary(results, align)
    notes = sorted({r.note for r in results if r.note})
    t = preset.train
    setup = (
        f"Preset {preset.name}: width {preset.d_model}, {preset.n_heads} heads, "
        f"{', '.join(preset.norms)} norm, constant 4 training recurrences, final-output loss; "
        f"{t.steps} steps of batch "
        f"{t.batch_size}, lr {t.lr:g}, problems of {t.min_problem_steps}–{t.max_problem_steps} "
        f"steps. Dynamics: {preset.trace_recurrences} recurrences on {preset.prompts} bundled "
        f"prompts; stages at the training recurrence count against the feedforward model."
    )
    md = [
        "# Trained ablation\n",
        setup + "\n",
        f"Verdict rule: {preset.rule.describe()}.\n",
        *[n + "\n" for n in notes],
        "## Summary\n",
        *[p + "\n" for p in summary],
        "## Cells\n",
        markdown_table(TRAINED_COLUMNS, rows),
    ]
    md_path, csv_path = out / "table.md", out / "table.csv"
    _atomic_write(md_path, "\n".join(md))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*(f.name for f in fields(TrainedResult)), "stage_pearson", "stage_dtw"])
    for r in results:
        a = align.get(r.name, {})
        writer.writerow(
            [
                *(getattr(r, f.name) for f in fields(TrainedResult)),
                a.get("pearson", ""),
                a.get("dtw", ""),
            ]
        )
    _atomic_write(csv_path, buf.getvalue())
    table = Table("Trained cells", TRAINED_COLUMNS, [list(r) for r in rows], note=" ".join(notes))
    links = "\n".join(
        f"{r.name}: cells/{r.name}/report/report.html" for r in results if not r.feedforward
    )
    sections = [
        Section(
            "Summary", text="\n\n".join(summary) or "One level per factor: nothing to compare."
        ),
        Section(
            "Per-cell dynamics reports",
            text="Each looped cell has its own full dynamics report:\n\n" + links,
        ),
        Section("Method", text=setup + "\n\n" + f"Verdict rule: {preset.rule.describe()}."),
    ]
    paths = write_report(
        out,
        title="loopscope ablation — trained looped models",
        subtitle=f"{len(results)} trained cells; " + setup,
        verdict=table,
        sections=sections,
        metrics={
            "preset": asdict(preset),
            "elapsed_seconds": elapsed,
            "results": [asdict(r) for r in results],
            "stage_alignment": align,
            "summary": summary,
        },
    )
    return md_path, csv_path, paths


def run_trained(
    out_dir: str | Path,
    preset: TrainedPreset,
    *,
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> SweepRun:
    """Run (or resume) the trained sweep: every cell trains into ``out/cells/NAME`` (training
    resumes by itself), and ``cells/NAME/result.json`` marks a cell finished."""
    from loopscope.pipeline import prompt_inputs

    start = time.perf_counter()
    out = Path(out_dir)
    grid = trained_grid(preset)
    prompts = prompt_inputs(_bundled_prompts_path(), limit=preset.prompts)
    CellStore(out, {"kind": "trained", **preset.measurement()})
    computed: list[str] = []
    for cell in grid:
        cell_dir = out / "cells" / cell.name
        done = cell_dir / "result.json"
        if done.exists():
            continue
        log(f"cell {cell.name}: training and analysing")
        cell_dir.mkdir(parents=True, exist_ok=True)
        result = run_trained_cell(
            cell, preset, cell_dir, prompts, device=device, progress=progress, log=log
        )
        _atomic_write(done, json.dumps(to_jsonable(asdict(result)), indent=1, allow_nan=False))
        computed.append(cell.name)
    results = [
        TrainedResult.from_json(json.loads((out / "cells" / c.name / "result.json").read_text()))
        for c in grid
    ]
    elapsed = time.perf_counter() - start
    names = [c.name for c in grid]
    if not computed and _outputs_current(out, names):
        return SweepRun(results, computed, elapsed, _existing_report(out), *_tables(out))
    md, csv_path, paths = write_trained_outputs(out, results, preset, elapsed)
    _mark_outputs(out, names)
    return SweepRun(results, computed, elapsed, paths, md, csv_path)
