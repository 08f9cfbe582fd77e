"""Trace + analyses + report in one go, the same from Python and from the CLI.

>>> import loopscope.pipeline as lp
>>> lp.analyze("demo", "prompts.jsonl", "out/", recurrences=64)   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from loopscope.data.prompt_format import PromptProtocol
from loopscope.engine.contract import LoopedLM
from loopscope.families.tokenizers import (
    TextTokenizer,
    byte_tokenizer,
    model_tokenizer,
    tokenizer_or_bytes,
)
from loopscope.report.html import ReportPaths, Section, write_report
from loopscope.report.trace_report import Thresholds, analyse_dynamics
from loopscope.trace.budget import DEFAULT_MAX_DISK
from loopscope.trace.long_prompts import (
    DEFAULT_LONG_PROMPTS,
    fit_to_context,
    long_prompts_section,
    skipped_metrics,
)
from loopscope.trace.plan import plan_trace
from loopscope.trace.protocol import protocol_inputs
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
    path: str | Path, *, limit: int | None = None, tokenizer: TextTokenizer | None = None
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
    protocol: PromptProtocol | None = None,
    batch_size: int | str = 1,
    device: str | None = None,
    dtype: str | Any = None,
    long_prompts: str = DEFAULT_LONG_PROMPTS,
    max_disk: int = DEFAULT_MAX_DISK,
) -> TraceStore:
    """Trace ``prompts`` through ``model`` into ``out_dir`` (resumable). ``load_options`` go
    to :func:`loopscope.load` (e.g. ``loop=(a, b)`` for a Hugging Face decoder); ``protocol``
    samples and renders a prompt file (format, system prompt), recorded in the trace;
    ``batch_size`` prompts run per forward pass (right-padded, grouped by length; each chunk
    equals the prompt traced alone, to rounding). ``device`` / ``dtype`` load a model given
    by name (default: the GPU when there is one, in the checkpoint's dtype there and float32
    on the CPU); a model object must already be there. ``long_prompts`` says what becomes of
    a prompt longer than the context ("skip", "truncate" or "error", see
    :mod:`loopscope.trace.long_prompts`); ``max_disk`` is the disk budget of
    ``capture="auto"`` (the default), which otherwise falls back to summary capture;
    ``batch_size="auto"`` fits the batch to free memory. The estimated disk size and peak
    memory are printed before tracing starts."""
    resolved = resolve_model(model, **load_keywords(model, load_options, device, dtype))
    # prompts given as ids were tokenised by the caller: a checkpoint without tokenizer files
    # can still trace them
    tokenizer = (tokenizer_or_bytes if isinstance(prompts, list) else model_tokenizer)(resolved)
    record = None
    if isinstance(prompts, list):
        inputs = prompts
    elif protocol is not None:
        inputs, record = protocol_inputs(model, prompts, protocol, limit=limit)
    else:
        inputs = prompt_inputs(prompts, limit=limit, tokenizer=tokenizer)
    fitted = fit_to_context(inputs, resolved.meta.context_length, long_prompts, bos=tokenizer.bos)
    plan = plan_trace(
        resolved, fitted.kept, settings or TraceSettings(), max_disk=max_disk, batch_size=batch_size
    )
    for line in fitted.messages() + plan.messages():
        print(line)
    return trace_prompts(
        resolved,
        fitted.kept,
        out_dir,
        plan.settings,
        tokenizer_name=tokenizer.name,
        bos=tokenizer.bos,
        progress=progress,
        protocol=record,
        batch_size=plan.batch_size,
        header_extra={**fitted.header(), **plan.header()},
    )


def load_keywords(
    model: str | LoopedLM,
    load_options: dict[str, Any] | None,
    device: str | None,
    dtype: str | Any,
) -> dict[str, Any]:
    """What :func:`loopscope.load` gets for a model given by name: ``load_options`` with the
    device and dtype filled in (given, else the defaults). A model object is checked against
    a device or dtype given instead, since it is used where it is."""
    from loopscope.core.errors import LoopscopeError
    from loopscope.families.table import as_torch_dtype, default_device, default_dtype

    options = dict(load_options or {})
    if isinstance(model, LoopedLM):
        first = next(model.parameters())
        wanted_dtype = None if dtype is None else as_torch_dtype(dtype)
        on_device = device is None or first.device.type == device.split(":")[0]
        if not on_device or wanted_dtype not in (None, first.dtype):
            raise LoopscopeError(
                f"the model object is on {first.device} in {first.dtype}, not on "
                f"{device or first.device} in {wanted_dtype or first.dtype}: move it first "
                "(model.to(device, dtype)), or pass the model's name to load it there"
            )
        return options
    chosen = options.get("device") or device or default_device()
    options["device"] = chosen
    given = options.get("dtype") if options.get("dtype") is not None else dtype
    options["dtype"] = default_dtype(model, chosen) if given is None else as_torch_dtype(given)
    return options


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
    recorded = {"protocol": store.header["protocol"]} if "protocol" in store.header else {}
    recorded.update(skipped_metrics(store.header.get("long_prompts")))  # trace/long_prompts.py
    metrics = {"model": meta, "dynamics": analysis.metrics, **recorded, **(extra_metrics or {})}
    skipped_section = long_prompts_section(store.header.get("long_prompts"))
    skipped = [] if skipped_section is None else [skipped_section]
    return write_report(
        Path(out_dir or trace_dir),
        title=title or f"loopscope report — {meta.get('name') or meta['family']}",
        subtitle=(
            f"family {meta['family']}, layout {layout}, trained with "
            f"{meta['train_recurrences']} recurrences; {len(store)} prompts traced"
        ),
        verdict=analysis.verdict,
        sections=skipped + analysis.sections + (extra_sections or []),
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
    protocol: PromptProtocol | None = None,
    batch_size: int | str = 1,
    load_options: dict[str, Any] | None = None,
    device: str | None = None,
    dtype: str | Any = None,
    long_prompts: str = DEFAULT_LONG_PROMPTS,
    max_disk: int = DEFAULT_MAX_DISK,
) -> ReportPaths:
    """Trace into ``out_dir/trace`` and write the report into ``out_dir`` (``batch_size``
    prompts per forward pass; the load options, ``device``, ``dtype``, ``long_prompts`` and
    ``max_disk`` as in :func:`trace`)."""
    out = Path(out_dir)
    chosen = replace(settings or TraceSettings(), recurrences=recurrences)
    store = trace(
        model,
        prompts,
        out / "trace",
        chosen,
        limit=limit,
        progress=progress,
        protocol=protocol,
        batch_size=batch_size,
        load_options=load_options,
        device=device,
        dtype=dtype,
        long_prompts=long_prompts,
        max_disk=max_disk,
    )
    return report(store.path, out, thresholds=thresholds)


def open_trace(path: str | Path, *, storage_options: dict[str, Any] | None = None) -> Any:
    """A trace (a ``loopscope trace`` directory, or a Zarr store at a path or an fsspec URL)
    as labelled ``xarray`` datasets: ``open_trace(d).block.sel(layer=2, recurrence=slice(0,
    8))``. Needs the ``xarray`` extra; see :mod:`loopscope.trace.open`."""
    from loopscope.trace.open import open_trace as open_labelled

    return open_labelled(path, storage_options=storage_options)


def open_analysis(
    trace_dir: str | Path,
    thresholds: Thresholds | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """Every measurement of a trace directory or Zarr store (a path or an fsspec URL;
    ``storage_options`` go to fsspec), kept in memory: ``verdict_frame`` and ``limiting_rates``
    as ``pandas.DataFrame``s, ``metrics``, and the report inline in a notebook
    (``_repr_html_``); see :mod:`loopscope.report.frames`."""
    from loopscope.report.frames import open_analysis as analyse

    return analyse(trace_dir, thresholds, storage_options=storage_options)
