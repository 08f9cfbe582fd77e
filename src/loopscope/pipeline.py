"""Trace + analyses + report in one go, the same from Python and from the CLI.

>>> import loopscope.pipeline as lp
>>> lp.analyze("demo", "prompts.jsonl", "out/", recurrences=64)   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from loopscope.engine.contract import LoopedLM
from loopscope.families.table import tokenizer_for
from loopscope.families.tokenizers import PromptTokenizer, byte_tokenizer
from loopscope.report.html import ReportPaths, Section, write_report
from loopscope.report.trace_report import Thresholds, analyse_dynamics
from loopscope.trace.settings import PromptInput, TraceSettings
from loopscope.trace.store import TraceStore
from loopscope.trace.writer import trace_prompts


def resolve_model(source: str | LoopedLM, **load_options: Any) -> LoopedLM:
    """A loaded model as is, else ``loopscope.load(source, **load_options)``."""
    if isinstance(source, LoopedLM):
        return source
    import loopscope

    model: LoopedLM = loopscope.load(source, **load_options)
    return model


def prompt_inputs(
    path: str | Path, *, limit: int | None = None, tokenizer: PromptTokenizer | None = None
) -> list[PromptInput]:
    """Prompts from a GSM8K / HellaSwag JSONL or a text file, tokenised for the model (our
    byte tokenizer unless another is given)."""
    from loopscope.data import load_prompts

    texts = load_prompts(path)
    if limit is not None:
        texts = texts[:limit]
    chosen = tokenizer or byte_tokenizer()
    return [PromptInput(text, chosen.encode(text)) for text in texts]


def trace(
    model: str | LoopedLM,
    prompts: str | Path | list[PromptInput],
    out_dir: str | Path,
    settings: TraceSettings | None = None,
    *,
    limit: int | None = None,
    progress: bool = True,
    load_options: dict[str, Any] | None = None,
) -> TraceStore:
    """Trace ``prompts`` through ``model`` into ``out_dir`` (resumable). ``load_options`` go
    to :func:`loopscope.load` (e.g. ``loop=(a, b)`` for a Hugging Face decoder)."""
    resolved = resolve_model(model, **(load_options or {}))
    tokenizer = byte_tokenizer() if isinstance(model, LoopedLM) else tokenizer_for(model)
    inputs = (
        prompts
        if isinstance(prompts, list)
        else prompt_inputs(prompts, limit=limit, tokenizer=tokenizer)
    )
    return trace_prompts(
        resolved,
        inputs,
        out_dir,
        settings or TraceSettings(),
        tokenizer_name=tokenizer.name,
        bos=tokenizer.bos,
        progress=progress,
    )


def report(
    trace_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    thresholds: Thresholds | None = None,
    extra_sections: list[Section] | None = None,
    extra_metrics: dict[str, Any] | None = None,
    title: str | None = None,
) -> ReportPaths:
    """Analyse a trace and write ``report.html``, ``figures/`` and ``metrics.json``."""
    store = TraceStore(trace_dir)
    analysis = analyse_dynamics(store, thresholds)
    meta = store.meta
    layout = (
        f"({meta['prelude_layers']}, {meta['block_layers']}⊗{store.settings['recurrences']}, "
        f"{meta['coda_layers']})"
    )
    metrics = {"model": meta, "dynamics": analysis.metrics, **(extra_metrics or {})}
    return write_report(
        Path(out_dir or trace_dir),
        title=title or f"loopscope report — {meta.get('name') or meta['family']}",
        subtitle=(
            f"family {meta['family']}, layout {layout}, trained with "
            f"{meta['train_recurrences']} recurrences; {len(store)} prompts traced"
        ),
        verdict=analysis.verdict,
        sections=analysis.sections + (extra_sections or []),
        metrics=metrics,
        prompts=[store.texts[i] for i in store.completed()],
    )


def analyze(
    model: str | LoopedLM,
    prompts: str | Path | list[PromptInput],
    out_dir: str | Path,
    *,
    recurrences: int = 128,
    settings: TraceSettings | None = None,
    limit: int | None = None,
    thresholds: Thresholds | None = None,
    progress: bool = True,
) -> ReportPaths:
    """Trace into ``out_dir/trace`` and write the report into ``out_dir``."""
    out = Path(out_dir)
    chosen = replace(settings or TraceSettings(), recurrences=recurrences)
    store = trace(model, prompts, out / "trace", chosen, limit=limit, progress=progress)
    return report(store.path, out, thresholds=thresholds)
