"""The plan of a trace, settled before the first forward pass: the ``auto`` settings made
concrete (how states are stored, whether they are stored at all), what the trace will cost,
and the facts of the run that ``trace.json`` records without making them part of the trace's
identity (the device).

``state_dtype="auto"`` stores float32 states for a float32 model and float16 for any other;
``capture="auto"`` keeps full states when their estimated size fits under ``max_disk`` and
summary capture otherwise. The concrete choices go into the settings in ``trace.json`` (so a
resumed run must make the same ones), and what ``auto`` decided goes under ``capture``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from loopscope.engine.contract import LoopedLM
from loopscope.trace.budget import (
    DEFAULT_MAX_DISK,
    MAX_AUTO_BATCH,
    CaptureChoice,
    ModelShape,
    choose_batch_size,
    choose_capture,
    default_state_dtype,
    forward_bytes,
    free_memory_bytes,
    gigabytes,
    host_bytes_per_prompt,
    host_free_bytes,
    peak_device_bytes,
    shape_of,
    trace_bytes,
)
from loopscope.trace.settings import PromptInput, TraceError, TraceSettings
from loopscope.trace.store import model_dtype


@dataclass(frozen=True)
class TracePlan:
    """Concrete settings, what ``auto`` capture chose, and the estimates printed first."""

    settings: TraceSettings
    capture: CaptureChoice
    shape: ModelShape
    disk_bytes: int
    peak_bytes: int
    batch_size: int
    batch_note: str = ""

    def messages(self) -> list[str]:
        """What the command line prints before tracing."""
        s = self.settings
        return [
            *([self.batch_note] if self.batch_note else []),
            self.capture.message(),
            f"estimated trace size on disk: {gigabytes(self.disk_bytes)} "
            f"({s.capture} capture, states in {s.state_dtype})",
            f"estimated peak device memory: {gigabytes(self.peak_bytes)} "
            f"(batch of {self.batch_size}, {self.shape.dtype} weights)",
        ]

    def header(self) -> dict[str, Any]:
        """What ``trace.json`` records of the plan (not compared on resume): what ``auto``
        capture weighed, when it fell back to summary capture (the settings say the rest)."""
        return {"capture": self.capture.record()} if self.capture.fell_back else {}


def resolved_state_dtype(settings: TraceSettings, model: LoopedLM) -> str:
    if settings.state_dtype != "auto":
        return settings.state_dtype
    return default_state_dtype(model_dtype(model))


def plan_trace(
    model: LoopedLM,
    prompts: Sequence[PromptInput],
    settings: TraceSettings,
    *,
    max_disk: int = DEFAULT_MAX_DISK,
    batch_size: int | str = 1,
) -> TracePlan:
    """Make ``settings``' ``auto`` values concrete for ``model`` and ``prompts`` and estimate
    the trace's cost. ``batch_size="auto"`` becomes the most prompts per forward that fit in
    free memory (:func:`auto_batch_size`)."""
    shape = shape_of(model)
    lengths = [len(p.ids) for p in prompts]
    stored = replace(settings, state_dtype=resolved_state_dtype(settings, model))
    choice = choose_capture(shape, lengths, stored, max_disk)
    concrete = replace(stored, capture=choice.chosen)
    longest = max(lengths, default=1)
    note = ""
    if batch_size == "auto":
        batch_size, note = auto_batch_size(
            shape, longest, concrete, model_device(model), n_prompts=len(lengths)
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TraceError(f"batch_size must be 'auto' or an integer ≥ 1, got {batch_size!r}")
    return TracePlan(
        concrete,
        choice,
        shape,
        trace_bytes(shape, lengths, concrete),
        peak_device_bytes(shape, batch_size, longest, concrete),
        batch_size,
        note,
    )


def model_device(model: LoopedLM) -> str:
    first = next(model.parameters(), None)
    return str(first.device) if first is not None else "cpu"


def auto_batch_size(
    shape: ModelShape, longest: int, settings: TraceSettings, device: str, *, n_prompts: int
) -> tuple[int, str]:
    """The batch size ``auto`` stands for (never more than the ``n_prompts`` to trace), and
    the line that says why: what one more prompt of the longest length costs on the device
    (the weights are loaded already), and, with full capture, in host memory until its chunk
    is written."""
    free = free_memory_bytes(device)
    cap = max(1, min(MAX_AUTO_BATCH, n_prompts))
    batch = choose_batch_size(free, forward_bytes(shape, 1, longest, settings), cap=cap)
    where = "device" if device.startswith("cuda") else "host"
    note = f"batch size {batch} (auto: {gigabytes(free)} free {where} memory"
    host = host_bytes_per_prompt(shape, longest, settings)
    if host:
        host_free = host_free_bytes()
        by_host = choose_batch_size(host_free, host, cap=cap)
        if by_host < batch:
            batch = by_host
            note = f"batch size {batch} (auto: {gigabytes(host_free)} free host memory"
        note += f"; captured states take {gigabytes(host)} a prompt"
    return batch, note + ")"


def concrete_settings(
    model: LoopedLM, prompts: Sequence[PromptInput], settings: TraceSettings
) -> TraceSettings:
    """``settings`` with ``auto`` made concrete (default ``max_disk``); settings without
    ``auto`` come back unchanged (what a direct call of the trace writer relies on)."""
    if settings.capture != "auto" and settings.state_dtype != "auto":
        return settings
    return plan_trace(model, prompts, settings).settings


def runtime_record(model: LoopedLM) -> dict[str, Any]:
    """The device and dtype the trace ran in, for ``trace.json``'s ``runtime`` entry (the
    dtype is also part of the model fingerprint; the device is not)."""
    return {"runtime": {"device": model_device(model), "dtype": model_dtype(model)}}


def per_prompt_host_bytes(plan: TracePlan, n_tokens: int) -> int:
    return host_bytes_per_prompt(plan.shape, n_tokens, plan.settings)


def torch_state_dtype(state_dtype: str) -> Any:
    """The torch dtype captured states are copied in (``auto`` resolved before)."""
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(state_dtype, torch.float32)
