"""The two-scale study of a nested model (HRM-Text): prompts in, report.html, figures and
metrics.json out.

A nested model has no single-loop trace (its loops are ``h × [l × [L-stack], H-stack]``), so
this study runs the model itself: every state at the trained counts, each level extended past
its trained count, and the stability certificates of both levels
(:mod:`loopscope.analysis.two_scale_run`); the report has one section showing both scales,
one figure each, and ``metrics.json`` holds a ``two_scale`` entry per level.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from loopscope.analysis.report_parts import Table
from loopscope.analysis.two_scale import two_scale_metrics, two_scale_section, two_scale_verdict
from loopscope.analysis.two_scale_run import measure_two_scale
from loopscope.core.errors import LoopscopeError
from loopscope.engine.contract import LoopedLM
from loopscope.families.tokenizers import model_tokenizer
from loopscope.pipeline import load_keywords, prompt_inputs, resolve_model
from loopscope.report.html import ReportPaths, write_report
from loopscope.trace.settings import PromptInput

__all__ = ["NESTED_FAMILIES", "analyze_two_scale", "is_nested", "is_nested_source"]


def is_nested(model: Any) -> bool:
    """Whether ``model`` declares a loop tree (and so runs on the nested engine)."""
    return getattr(model, "loop_tree", None) is not None


def _checked_inputs(model: LoopedLM, inputs: list[PromptInput]) -> list[PromptInput]:
    if not inputs:
        raise LoopscopeError("no prompts to analyse: give a prompt file with at least one prompt")
    limit = model.meta.context_length
    for i, prompt in enumerate(inputs):
        if not prompt.ids:
            raise LoopscopeError(f"prompt {i} has no tokens; remove it from the prompt file")
        if len(prompt.ids) > limit:
            raise LoopscopeError(
                f"prompt {i} has {len(prompt.ids)} tokens but {model.meta.name} has a context "
                f"of {limit}; shorten it or remove it from the prompt file"
            )
    return inputs


def analyze_two_scale(
    model: str | LoopedLM,
    prompts: str | Path | list[PromptInput],
    out_dir: str | Path,
    *,
    limit: int | None = None,
    extend: int = 2,
    stability_iters: int = 20,
    instruction_prompts: bool = False,
    load_options: dict[str, Any] | None = None,
    device: str | None = None,
    dtype: str | Any = None,
) -> ReportPaths:
    """Measure both loops of a nested ``model`` on ``prompts`` (a prompt file, encoded with the
    checkpoint's tokenizer, or prompt inputs) and write the report into ``out_dir``.
    ``extend`` runs each level that many times its trained count; ``stability_iters`` bounds
    the Jacobian-vector products of each spectral radius. ``instruction_prompts`` marks every
    prompt token as instruction (``token_type_ids`` 1: one bidirectional block, as a prefix LM
    reads its instruction); by default every token is causal."""
    resolved = resolve_model(model, **load_keywords(model, load_options, device, dtype))
    if not is_nested(resolved):
        raise LoopscopeError(
            f"{resolved.meta.name or resolved.meta.family} has one loop; the two-scale study "
            "needs a nested model (hrm_text). Use `loopscope analyze` for single-loop models"
        )
    if isinstance(prompts, list):
        inputs = prompts
    else:
        inputs = prompt_inputs(prompts, limit=limit, tokenizer=model_tokenizer(resolved))
    inputs = _checked_inputs(resolved, inputs)
    where = next(resolved.parameters()).device
    ids = [torch.tensor([p.ids], device=where) for p in inputs]
    types = [torch.ones_like(x) for x in ids] if instruction_prompts else None
    result = measure_two_scale(
        resolved,  # type: ignore[arg-type]
        ids,
        token_type_ids=types,
        extend=extend,
        stability_iters=stability_iters,
    )
    verdict = two_scale_verdict(result)
    meta = resolved.meta
    counts = " × ".join(f"{name}={n}" for name, n in result.trained.items())
    return write_report(
        Path(out_dir),
        title=f"loopscope two-scale report — {meta.name or meta.family}",
        subtitle=(
            f"family {meta.family}, nested loops trained at {counts}; {len(inputs)} prompts, "
            f"each level also run {extend}× its trained count"
        ),
        verdict=Table("Verdict", ["level", "verdict"], [[k, v] for k, v in verdict.items()]),
        sections=[two_scale_section(result)],
        metrics={
            "model": asdict(meta),
            "two_scale": {
                **two_scale_metrics(result),
                "attention": "instruction (bidirectional)" if instruction_prompts else "causal",
            },
        },
        prompts=[p.text for p in inputs],
    )


#: Families whose loops nest: ``loopscope analyze`` runs this study for them.
NESTED_FAMILIES = frozenset({"hrm_text"})


def is_nested_source(source: str | Path) -> bool:
    """Whether ``source`` (anything ``loopscope.load`` accepts) names a nested-loop family;
    False when it cannot be resolved (the ordinary path then reports why)."""
    from loopscope.families.table import family_of, resolve_directory

    try:
        return family_of(resolve_directory(source)).name in NESTED_FAMILIES
    except LoopscopeError:
        return False
