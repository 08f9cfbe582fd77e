"""The stand-alone stages report: load the model (and a feedforward reference), profile it,
classify its neurons, measure an intervention and write ``report.html`` and ``metrics.json``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loopscope.analysis.report_parts import Section
from loopscope.analysis.stages import NeuronClasses, StagesProfile
from loopscope.engine.contract import LoopedLM
from loopscope.engine.interventions import InterventionSpec, check_specs
from loopscope.families.tokenizers import model_tokenizer, tokenizer_or_bytes
from loopscope.report.html import ReportPaths, write_report
from loopscope.studies.stages.profile import (
    InterventionResult,
    as_specs,
    check_prompts,
    compare_intervention,
    neuron_classes_per_layer,
    stages_profile,
)
from loopscope.studies.stages.sections import check_metric_names, stages_sections, stages_verdict
from loopscope.trace.long_prompts import (
    DEFAULT_LONG_PROMPTS,
    FittedPrompts,
    fit_to_context,
    long_prompts_section,
    skipped_metrics,
)
from loopscope.trace.settings import PromptInput

__all__ = ["run_stages"]


def _resolve_prompts(
    prompts: str | Path | Sequence[PromptInput],
    limit: int | None,
    model: str | Path | LoopedLM | None = None,
) -> list[PromptInput]:
    """Prompt files are tokenised with the tokenizer of ``model`` (the one ``loopscope.load``
    attached to a model object; a name's own)."""
    if isinstance(prompts, (str, Path)):
        from loopscope.families.table import tokenizer_for
        from loopscope.pipeline import prompt_inputs

        if isinstance(model, LoopedLM):
            return prompt_inputs(prompts, limit=limit, tokenizer=model_tokenizer(model))
        tokenizer = tokenizer_for(model) if isinstance(model, (str, Path)) else None
        return prompt_inputs(prompts, limit=limit, tokenizer=tokenizer)
    chosen = list(prompts)
    return chosen[:limit] if limit is not None else chosen


Loader = Callable[[str | Path], LoopedLM]


def _loader_on(device: str | None, dtype: str | Any) -> Loader:
    """``loopscope.load`` on ``device`` in ``dtype`` (the defaults where None)."""

    def load(source: str | Path) -> LoopedLM:
        from loopscope.pipeline import load_keywords, resolve_model

        return resolve_model(str(source), **load_keywords(str(source), None, device, dtype))

    return load


def _fit(model: LoopedLM, inputs: list[PromptInput], mode: str) -> FittedPrompts:
    """The prompts that fit ``model``'s context under ``mode``, the others said aloud."""
    fitted = fit_to_context(
        inputs, model.meta.context_length, mode, bos=tokenizer_or_bytes(model).bos
    )
    for line in fitted.messages():
        print(line)
    return fitted


def _resolve(source: str | Path | LoopedLM, loader: Loader | None) -> LoopedLM:
    """A loaded model as is, else ``loader(source)`` (default ``loopscope.load``)."""
    if isinstance(source, LoopedLM):
        return source
    if loader is not None:
        return loader(source)
    from loopscope.pipeline import resolve_model

    return resolve_model(str(source))


def _looped_profile(
    model: LoopedLM,
    inputs: list[PromptInput],
    specs: list[InterventionSpec],
    recurrences: int,
    sink_threshold: float,
    seed: int,
    progress: bool,
) -> tuple[StagesProfile, InterventionResult | None]:
    """The model's profile, and the before/after comparison when ``specs`` are given (its
    "before" is then the profile: the plain runs are not repeated)."""
    if not specs:
        profile = stages_profile(
            model,
            inputs,
            recurrences=recurrences,
            sink_threshold=sink_threshold,
            seed=seed,
            progress=progress,
        )
        return profile, None
    result = compare_intervention(
        model,
        inputs,
        specs,
        recurrences=recurrences,
        sink_threshold=sink_threshold,
        seed=seed,
        progress=progress,
    )
    return result.before, result


def run_stages(
    model: str | Path | LoopedLM,
    prompts: str | Path | Sequence[PromptInput],
    out_dir: str | Path,
    *,
    reference: str | Path | LoopedLM | StagesProfile | None = None,
    recurrences: int | None = None,
    intervention: InterventionSpec | Sequence[InterventionSpec] | None = None,
    limit: int | None = None,
    sink_threshold: float = 0.3,
    show_metrics: Sequence[str] | None = None,
    seed: int = 0,
    progress: bool = True,
    loader: Loader | None = None,
    long_prompts: str = DEFAULT_LONG_PROMPTS,
    device: str | None = None,
    dtype: str | Any = None,
) -> ReportPaths:
    """Write a stand-alone stages report (``report.html``, ``figures/``, ``metrics.json``).

    ``model`` / ``reference`` are anything :func:`loopscope.load` accepts or a loaded model (the
    reference may also be a ready profile); the reference runs its own training recurrence
    count. ``intervention`` adds a before/after section; ``show_metrics`` limits figures and
    tables to some of the metrics. ``seed`` seeds a random initial state (for models that draw
    one); ``loader`` loads a model given by name (default :func:`loopscope.load`; the command
    line passes one with its device and dtype). Prompt files are tokenised with each named
    model's own tokenizer. ``long_prompts``: what becomes of a prompt longer than the
    context ("skip" and list it, "truncate" to its last tokens, or "error"; see
    :mod:`loopscope.trace.long_prompts`). ``device`` / ``dtype`` load the models given by name
    when no ``loader`` is given (defaults as :func:`loopscope.pipeline.trace`).
    """
    if loader is None and (device is not None or dtype is not None):
        loader = _loader_on(device, dtype)
    looped_model = _resolve(model, loader)
    fitted = _fit(looped_model, _resolve_prompts(prompts, limit, looped_model), long_prompts)
    inputs = fitted.kept
    check_prompts(inputs)
    n_rec = looped_model.meta.train_recurrences if recurrences is None else int(recurrences)
    specs = as_specs(intervention)
    if specs:
        check_specs(specs, looped_model.meta, n_rec)
    if show_metrics is not None:
        check_metric_names(show_metrics)
    looped, result = _looped_profile(
        looped_model, inputs, specs, n_rec, sink_threshold, seed, progress
    )

    notes: list[str] = []
    classes = neuron_classes_per_layer(looped_model, notes=notes)
    ref_profile: StagesProfile | None = None
    ref_classes: dict[str, NeuronClasses] | None = None
    if isinstance(reference, StagesProfile):
        ref_profile = reference
    elif reference is not None:
        ref_model = _resolve(reference, loader)
        ref_inputs = _fit(  # its own tokenizer and context
            ref_model, _resolve_prompts(prompts, limit, ref_model), long_prompts
        ).kept
        ref_profile = stages_profile(
            ref_model, ref_inputs, sink_threshold=sink_threshold, seed=seed, progress=progress
        )
        ref_classes = neuron_classes_per_layer(ref_model, notes=notes)
    sections, stage_metrics = stages_sections(
        looped,
        ref_profile,
        classes,
        result,
        reference_neuron_classes=ref_classes,
        notes=notes,
        show_metrics=show_metrics,
    )
    meta = looped_model.meta
    name = meta.name or meta.family
    layout = f"({meta.prelude_layers}, {meta.block_layers}⊗{n_rec}, {meta.coda_layers})"
    ref_text = ""
    if ref_profile is not None:
        ref_text = f"; feedforward reference {ref_profile.meta.get('model', 'given profile')}"
    return write_report(
        Path(out_dir),
        title=f"loopscope stages of inference — {name}",
        subtitle=(
            f"family {meta.family}, layout {layout}, {len(inputs)} prompts{ref_text}"
            + (f"; intervention {', '.join(s.label for s in specs)}" if specs else "")
        ),
        verdict=stages_verdict(looped, stage_metrics, show_metrics),
        sections=[*_skipped_section(fitted), *sections],
        metrics={
            "model": asdict(meta),
            "recurrences": n_rec,
            "stages": stage_metrics,
            **skipped_metrics(fitted.record()),
        },
        prompts=[p.text for p in inputs],
    )


def _skipped_section(fitted: FittedPrompts) -> list[Section]:
    section = long_prompts_section(fitted.record())
    return [] if section is None else [section]
