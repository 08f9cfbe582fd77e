"""The trained sweep's cells and what is measured on each.

The study's small models (2,k⊗4,2) for k ∈ {4, 8, 12} with / without injection and with /
without prelude-coda, plus a 12-layer feedforward model, trained on the synthetic task; then
evaluation, dynamics (trace + analyses, with a per-cell report) and a stage profile that the
outputs align against the feedforward model's. Each model starts from the preset's ``init``
(by default its norm scheme's family, as in the random-init sweep; recorded per cell).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loopscope.core.atomic import write_json
from loopscope.families.looplm import LoopConfig, LoopLM
from loopscope.studies.ablation.measures import StateMeasures, combine_measures, measure_states
from loopscope.studies.ablation.presets import (
    TrainedPreset,
    cell_init,
    checked_factors,
    unique_values,
)
from loopscope.studies.ablation.store import with_nan_floats
from loopscope.studies.ablation.verdict import verdict_of
from loopscope.training.config import TrainConfig


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
    norms, injections, blocks, seeds = checked_factors(preset)
    for norm in norms:
        cell_init(norm, preset.init)  # an unknown init is refused before any cell trains
    pcs = unique_values(preset.prelude_coda, "prelude-coda choice")
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
    direction: str = "—"  # the verdict's parts (older files: not recorded)
    magnitude: str = "—"
    norm_trend: str = "—"
    certificate: str = "—"
    init: str = "identity-adapter"  # older files, written before the choice, used this start

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrainedResult:
        return cls(**with_nan_floats(cls, data))


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
    from loopscope.trace.settings import TraceSettings

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
    v = verdict_of(m, radius, preset.rule)
    settled = dyn_metrics["fixed_point"]["settled"]
    rate = dyn_metrics["limiting_behaviour"]["last_layer"]["non_fixed_point_token_rate"]
    return {
        "verdict": v.label,
        "reason": v.reason,
        "direction": v.direction,
        "magnitude": v.magnitude,
        "norm_trend": v.norm_trend,
        "certificate": v.certificate,
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
    write_json(cell_dir / "stages.json", profile.to_dict(), indent=None)
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
    scheme = cell_init(cell.norm, preset.init)
    model = LoopLM(model_cfg)
    if scheme != "identity-adapter":
        model.reset_parameters(model_cfg.init_seed, scheme)
    result = train(model, train_cfg, cell_dir, device=device, progress=progress, log=log)
    model.eval()
    scores = _final_evaluation(result.history, train_cfg.steps) or evaluate(
        model, train_cfg, device=device
    )
    nan = float("nan")
    dyn: dict[str, Any] = {
        "verdict": "—",
        "reason": "feedforward: no recurrence",
        "direction": "—",
        "magnitude": "—",
        "norm_trend": "—",
        "certificate": "—",
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
        init=scheme,
        **dyn,
    )
