"""Batched measurement: the passes that trace a right-padded batch of prompts.

Each prompt's probes are fed its own rows (:class:`~loopscope.engine.probes.PerRowProbes`),
so every prompt's measurements equal those of the prompt traced alone (to rounding) and no
pad position enters one; :mod:`loopscope.trace.writer` writes them into one chunk per prompt.
A batch of one feeds its probes directly, exactly as tracing one prompt always has."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from loopscope.analysis.at_fixed_point import solve_reference
from loopscope.engine.contract import LoopedLM
from loopscope.engine.loop import EditPlan, run_probed
from loopscope.engine.probes import CaptureProbe, DynamicsProbe, DynamicsSummary, PerRowProbes
from loopscope.trace.plan import torch_state_dtype
from loopscope.trace.settings import PromptInput, TraceSettings

#: The token id that right-pads shorter prompts of a batch: any valid id does (pad positions
#: never reach a real one), and 0 is valid in every vocabulary.
PAD_ID = 0


@dataclass
class Measured:
    """What the batched passes measured for one prompt (before its chunk is written)."""

    summary: DynamicsSummary
    stages: dict[str, Any]
    lens: np.ndarray | None  # None: the family has no read-out between recurrences
    capture: CaptureProbe | None
    solved: tuple[Tensor, dict[str, Any]] | None


def padded_ids(prompts: Sequence[PromptInput], device: torch.device) -> tuple[Tensor, list[int]]:
    """(B, T_max) token ids, each prompt right-padded with :data:`PAD_ID`, and their lengths."""
    lengths = [len(p.ids) for p in prompts]
    ids = torch.full((len(prompts), max(lengths)), PAD_ID, dtype=torch.int64, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, : lengths[row]] = torch.tensor(prompt.ids, dtype=torch.int64, device=device)
    return ids, lengths


def _run_rows(
    model: LoopedLM,
    ids: Tensor,
    lengths: list[int],
    settings: TraceSettings,
    rows: Sequence[Sequence[Any]],
    edit_plan: EditPlan | None,
    attention: bool | None,
    whole_batch: Sequence[Any] = (),
) -> None:
    """One pass over the batch feeding each prompt's probes its own rows (a single prompt
    feeds them directly, exactly as tracing one prompt always has); ``whole_batch`` probes
    see the padded batch itself and cut their rows themselves."""
    if len(rows) == 1:
        probes, batch_lengths = [*rows[0], *whole_batch], None
    elif not any(rows):
        probes, batch_lengths = list(whole_batch), lengths
    else:
        probes, batch_lengths = [PerRowProbes(rows, lengths), *whole_batch], lengths
    run_probed(
        model,
        ids,
        settings.run,
        probes,
        attention=attention,
        edit_plan=edit_plan,
        lengths=batch_lengths,
    )


def _capture_probe(settings: TraceSettings, length: int) -> CaptureProbe | None:
    if settings.capture != "full":
        return None
    return CaptureProbe(
        positions=settings.token_positions(length),
        layers=settings.layers,
        recurrences=settings.keep_recurrences,
        attention=settings.attention,
        attention_recurrences=settings.attention_kept(),
        dtype=torch_state_dtype(settings.state_dtype),
    )


def measure_batch(
    model: LoopedLM,
    prompts: Sequence[PromptInput],
    settings: TraceSettings,
    edit_plan: EditPlan | None,
) -> list[Measured]:
    """Every batched measurement of ``prompts``: the main pass (online summaries, stages,
    logit lens, captured states) and, for a summary-only trace, the passes that measure
    distances to the fixed point. Anderson's fixed point is solved per prompt alone."""
    from loopscope.analysis.measures.logit_lens import LogitLensProbe, lens_readable
    from loopscope.analysis.stages import StagesAccumulator
    from loopscope.analysis.stages_batch import BatchStagesAccumulator

    device = next(model.parameters()).device
    ids, lengths = padded_ids(prompts, device)
    captures = [_capture_probe(settings, n) for n in lengths]
    single = len(prompts) == 1
    stages = [StagesAccumulator()] if single else []
    batch_stages = None if single else BatchStagesAccumulator(lengths)
    dynamics = DynamicsProbe(
        settings.recurrences,
        model.meta.block_layers,
        track_attention=settings.attention,
        lengths=None if single else lengths,
    )
    # the logit lens reads the whole padded batch in one pass (its coda layers may need the
    # batch's own token ids, Parcae's value embeddings do); a single prompt reads it alone
    lens = None
    if lens_readable(model):
        lens = LogitLensProbe(model, lengths=None if len(prompts) == 1 else lengths)
    if single:  # the probes, in the order a single prompt's probes always ran in
        row = [dynamics, stages[0], *([] if lens is None else [lens])]
        row += [] if captures[0] is None else [captures[0]]
        _run_rows(model, ids, lengths, settings, [row], edit_plan, settings.attention)
    else:  # the online reductions read every row in one pass; captures take their own rows
        rows = [[c] if c is not None else [] for c in captures]
        whole = [p for p in (dynamics, batch_stages, lens) if p is not None]
        _run_rows(model, ids, lengths, settings, rows, edit_plan, settings.attention, whole)
    summaries = dynamics.rows()
    solved: list[tuple[Tensor, dict[str, Any]] | None] = [None] * len(prompts)
    if settings.fixed_point == "anderson":
        solved = [
            solve_reference(
                model,
                torch.tensor([p.ids], device=device),
                settings.run,
                tol=settings.fixed_point_tol,
                memory=settings.fixed_point_memory,
                beta=settings.fixed_point_beta,
            )
            for p in prompts
        ]
    if settings.capture == "summary":
        summaries = _second_pass(model, ids, lengths, settings, edit_plan, solved)
    lenses: list[np.ndarray | None] = [None] * len(prompts) if lens is None else [*lens.rows()]
    profiles = [s.result() for s in stages] if batch_stages is None else batch_stages.results()
    return [
        Measured(summary, profile.to_dict(), top1, capture, fixed)
        for summary, profile, top1, capture, fixed in zip(
            summaries, profiles, lenses, captures, solved
        )
    ]


def _final_layer_states(
    model: LoopedLM,
    ids: Tensor,
    lengths: list[int],
    settings: TraceSettings,
    edit_plan: EditPlan | None,
) -> list[Tensor]:
    """Per prompt, the per-layer states (L, T, D) at the last recurrence: the approximate
    fixed point X*."""
    captures = [CaptureProbe(recurrences=[settings.recurrences - 1]) for _ in lengths]
    _run_rows(model, ids, lengths, settings, [[c] for c in captures], edit_plan, None)
    return [torch.from_numpy(c.stage_array("block")[0, :, 0]).to(ids.device) for c in captures]


def _second_pass(
    model: LoopedLM,
    ids: Tensor,
    lengths: list[int],
    settings: TraceSettings,
    edit_plan: EditPlan | None,
    solved: Sequence[tuple[Tensor, dict[str, Any]] | None],
) -> list[DynamicsSummary]:
    """Distances to the fixed point without storing states: one pass finds each prompt's X*
    (unless it was solved for), the next measures every recurrence against it."""
    if all(s is not None for s in solved):
        references = [s[0] for s in solved if s is not None]
    else:
        references = _final_layer_states(model, ids, lengths, settings, edit_plan)
    single = len(lengths) == 1
    probe = DynamicsProbe(
        settings.recurrences,
        model.meta.block_layers,
        reference=references[0] if single else references,
        track_attention=settings.attention,
        lengths=None if single else lengths,
    )
    rows: list[list[Any]] = [[probe]] if single else [[] for _ in lengths]
    whole = [] if single else [probe]
    _run_rows(model, ids, lengths, settings, rows, edit_plan, settings.attention, whole)
    return probe.rows()
