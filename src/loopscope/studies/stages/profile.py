"""Stage profiles of a model over prompts: streamed per prompt, pooled over a trace, with MLP
neuron classes and the before/after comparison of an intervention.

Profiles are streamed: a :class:`~loopscope.analysis.stages.StagesAccumulator` reduces every
layer's residual stream and attention to a few numbers while the engine runs, so no attention
matrix outlives its layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from loopscope.analysis.stages import NeuronClasses, StagesAccumulator, StagesProfile
from loopscope.analysis.stages import neuron_classes as classify_neurons
from loopscope.engine.contract import InitState, LoopedLM
from loopscope.engine.interventions import InterventionSpec, check_specs
from loopscope.engine.interventions import edit_plan as make_edit_plan
from loopscope.engine.loop import EditPlan
from loopscope.trace.settings import PromptInput, TraceError
from loopscope.trace.store import TraceStore

__all__ = [
    "InterventionResult",
    "as_specs",
    "check_prompts",
    "compare_intervention",
    "neuron_classes_per_layer",
    "pool_profiles",
    "pooled_profile_from_trace",
    "stages_profile",
]


def check_prompts(prompts: Sequence[PromptInput]) -> None:
    if not prompts:
        raise ValueError("no prompts: give at least one prompt (is the prompt file empty?)")
    for i, p in enumerate(prompts):
        if not p.ids:
            raise ValueError(f"prompt {i} has no tokens; remove it from the prompt file")


def _forward(
    model: LoopedLM,
    prompt: PromptInput,
    probe: StagesAccumulator,
    recurrences: int | None,
    plan: EditPlan | None,
    init_state: InitState | None,
    seed: int,
) -> Tensor:
    """One prompt (batch 1, eager attention) through the engine; returns its logits (T, V)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt.ids], device=device)
    out = model(
        ids,
        recurrences=recurrences,
        init_state=init_state,
        seed=seed,
        probes=[probe],
        return_attn=True,
        edit_plan=plan,
    )
    logits: Tensor = out.logits[0]
    return logits


def _profile_meta(model: LoopedLM, n_prompts: int, recurrences: int | None) -> dict[str, Any]:
    meta = model.meta
    return {
        "model": meta.name or meta.family,
        "n_prompts": n_prompts,
        "recurrences": meta.train_recurrences if recurrences is None else int(recurrences),
    }


@torch.no_grad()
def stages_profile(
    model: LoopedLM,
    prompts: Sequence[PromptInput],
    *,
    recurrences: int | None = None,
    edit_plan: EditPlan | None = None,
    sink_threshold: float = 0.3,
    init_state: InitState | None = None,
    seed: int = 0,
    progress: bool = True,
) -> StagesProfile:
    """Stage metrics per site, averaged over prompts (each prompt weighs the same).

    Prompts run one at a time (batch 1, so no padding leaks into the metrics) with eager
    attention; ``recurrences`` defaults to the model's training count, ``edit_plan`` applies an
    intervention (see :mod:`loopscope.engine.interventions`).
    """
    from tqdm.auto import tqdm

    check_prompts(prompts)
    model.eval()
    acc = StagesAccumulator(sink_threshold=sink_threshold)
    for prompt in tqdm(prompts, desc="stages", disable=not progress):
        _forward(model, prompt, acc, recurrences, edit_plan, init_state, seed)
    profile = acc.result()
    profile.meta.update(_profile_meta(model, len(prompts), recurrences))
    return profile


def pool_profiles(profiles: Sequence[StagesProfile]) -> StagesProfile:
    """Mean of per-prompt profiles over the same sites, each value weighted by its site count;
    NaN values (a metric not observed for that prompt) are left out of the mean."""
    if not profiles:
        raise ValueError("no profiles to pool")
    first = profiles[0]
    names = [s.name for s in first.sites]
    for i, p in enumerate(profiles[1:], 1):
        if [s.name for s in p.sites] != names:
            raise ValueError(
                f"profile {i} has other sites than profile 0 (different recurrences or model?); "
                "pool only profiles of one run"
            )
    weights = np.stack([p.counts for p in profiles]).astype(np.float64)  # (P, S)
    metrics: dict[str, np.ndarray] = {}
    for m in first.metrics:
        values = np.stack([p.metrics.get(m, np.full(len(names), np.nan)) for p in profiles])
        ok = np.isfinite(values) & (weights > 0)
        total = np.where(ok, weights, 0.0).sum(0)
        summed = np.where(ok, values * weights, 0.0).sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            metrics[m] = np.where(total > 0, summed / np.where(total > 0, total, 1.0), np.nan)
    meta = dict(first.meta)
    meta["n_prompts"] = len(profiles)
    return StagesProfile(
        sites=list(first.sites),
        metrics=metrics,
        counts=weights.sum(0).astype(np.int64),
        meta=meta,
    )


def pooled_profile_from_trace(store: TraceStore) -> StagesProfile:
    """The stages profile of a whole trace: the count-weighted mean of every traced prompt's
    ``stages.json``, i.e. the same numbers :func:`stages_profile` gives for those prompts."""
    profiles = [StagesProfile.from_dict(p.stages) for p in store]
    if not profiles:
        raise TraceError(f"{store.path} holds no finished prompts; trace some first")
    pooled = pool_profiles(profiles)
    pooled.meta.setdefault("model", store.meta.get("name") or store.meta.get("family"))
    pooled.meta["recurrences"] = store.settings.get("recurrences")
    return pooled


# --------------------------------------------------------------------------- neuron classes


def _output_projection(layer: Any) -> Tensor | None:
    """The MLP's output projection (D, F) of a layer, whatever the family calls it."""
    for obj in (layer, getattr(layer, "layer", None)):  # raven wraps its first coda layer
        mlp = getattr(obj, "mlp", None)
        for name in ("down", "proj"):
            linear = getattr(mlp, name, None)
            weight = getattr(linear, "weight", None)
            if isinstance(weight, Tensor) and weight.dim() == 2:
                return weight
    return None


def _final_norm_gain(model: LoopedLM) -> Tensor | None:
    norm = getattr(model, "final_norm", None)
    weight = getattr(norm, "weight", None)
    if isinstance(weight, Tensor):
        return weight
    getter = getattr(model, "final_norm_weight", None)
    if callable(getter):
        gain = getter()
        return gain if isinstance(gain, Tensor) else None
    return None


@torch.no_grad()
def neuron_classes_per_layer(
    model: LoopedLM,
    *,
    notes: list[str] | None = None,
    kurtosis_threshold: float = 10.0,
    skew_threshold: float = 1.0,
) -> dict[str, NeuronClasses]:
    """Prediction / suppression neurons of every MLP, keyed ``prelude.0``, ``block.2``,
    ``coda.1`` in depth order (a block layer is one set of weights, however often it runs).

    The final norm's gain is folded into the unembedding when the model has one. Layers without
    a recognisable MLP output projection (and models without an unembedding) are skipped and a
    sentence saying so is appended to ``notes``. The thresholds are those of
    :func:`~loopscope.analysis.stages.neuron_classes`.
    """
    out: dict[str, NeuronClasses] = {}
    name = model.meta.name or model.meta.family
    try:
        unembed = model.unembedding()
    except NotImplementedError:
        if notes is not None:
            notes.append(f"{name} exposes no unembedding, so neurons were not classified.")
        return out
    gain = _final_norm_gain(model)
    skipped: list[str] = []
    for stage, layers in (("prelude", model.prelude), ("block", model.block), ("coda", model.coda)):
        for i, layer in enumerate(layers):
            w_out = _output_projection(layer)
            if w_out is None or w_out.shape[0] != unembed.shape[1]:
                skipped.append(f"{stage}.{i}")
                continue
            out[f"{stage}.{i}"] = classify_neurons(
                w_out,
                unembed,
                kurtosis_threshold=kurtosis_threshold,
                skew_threshold=skew_threshold,
                final_norm_weight=gain,
            )
    if skipped and notes is not None:
        notes.append(
            f"{name}: no MLP output projection (mlp.down / mlp.proj) found in "
            f"{', '.join(skipped)}; those layers were not classified."
        )
    return out


# --------------------------------------------------------------------------- interventions


@dataclass
class InterventionResult:
    """Stage profiles without and with an intervention on the same prompts, and how much the
    model's output moved: ``kl`` is the mean over prompts and positions of
    KL(p_before ‖ p_after) of the next-token distributions (nats), ``top1_agreement`` the
    fraction of positions whose most likely next token is unchanged."""

    specs: list[str]
    before: StagesProfile
    after: StagesProfile
    kl: float
    top1_agreement: float
    per_prompt_kl: list[float] = field(default_factory=list)


def as_specs(
    intervention: InterventionSpec | Sequence[InterventionSpec] | None,
) -> list[InterventionSpec]:
    if intervention is None:
        return []
    if isinstance(intervention, InterventionSpec):
        return [intervention]
    return list(intervention)


@torch.no_grad()
def compare_intervention(
    model: LoopedLM,
    prompts: Sequence[PromptInput],
    specs: InterventionSpec | Sequence[InterventionSpec],
    *,
    recurrences: int | None = None,
    sink_threshold: float = 0.3,
    init_state: InitState | None = None,
    seed: int = 0,
    progress: bool = True,
) -> InterventionResult:
    """Run every prompt twice, plainly and with ``specs`` applied, streaming both profiles and
    comparing the logits prompt by prompt (nothing but the two accumulators is kept)."""
    from tqdm.auto import tqdm

    chosen = as_specs(specs)
    if not chosen:
        raise ValueError("no intervention given; pass at least one InterventionSpec")
    check_prompts(prompts)
    n_rec = model.meta.train_recurrences if recurrences is None else int(recurrences)
    check_specs(chosen, model.meta, n_rec)
    plan = make_edit_plan(chosen)
    model.eval()
    acc_before = StagesAccumulator(sink_threshold=sink_threshold)
    acc_after = StagesAccumulator(sink_threshold=sink_threshold)
    kls: list[float] = []
    agree = 0
    tokens = 0
    for prompt in tqdm(prompts, desc="intervene", disable=not progress):
        before = _forward(model, prompt, acc_before, n_rec, None, init_state, seed).float()
        after = _forward(model, prompt, acc_after, n_rec, plan, init_state, seed).float()
        logp, logq = before.log_softmax(-1), after.log_softmax(-1)
        kl = (logp.exp() * (logp - logq)).sum(-1)  # (T,)
        kls.append(float(kl.mean()))
        agree += int((before.argmax(-1) == after.argmax(-1)).sum())
        tokens += before.shape[0]
    meta = _profile_meta(model, len(prompts), n_rec)
    p_before, p_after = acc_before.result(), acc_after.result()
    p_before.meta.update(meta)
    p_after.meta.update(meta, intervention=[s.label for s in chosen])
    return InterventionResult(
        specs=[s.label for s in chosen],
        before=p_before,
        after=p_after,
        kl=float(np.mean(kls)),
        top1_agreement=agree / tokens,
        per_prompt_kl=kls,
    )
