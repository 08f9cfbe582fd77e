"""The cost estimates printed before tracing: bytes on disk against traces really written, FLOPs
and batch sizes on inputs with a known answer, and ``capture="auto"`` falling back."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import TINY_TRACE_CONFIG, random_prompts

import loopscope
from loopscope.families.looplm import LoopLM
from loopscope.trace.budget import (
    DISK_MARGIN,
    ModelShape,
    choose_batch_size,
    choose_capture,
    flop_seconds,
    forward_flops,
    parse_bytes,
    peak_device_bytes,
    shape_of,
    trace_bytes,
)
from loopscope.trace.plan import plan_trace
from loopscope.trace.settings import TraceError, TraceSettings
from loopscope.trace.writer import trace_prompts

SETTINGS = [
    TraceSettings(recurrences=8, capture="full", state_dtype="float32"),
    TraceSettings(recurrences=8, capture="summary"),
    TraceSettings(
        recurrences=12, capture="full", state_dtype="float16", positions="last", layers=[0]
    ),
    TraceSettings(
        recurrences=6,
        capture="full",
        state_dtype="bfloat16",
        keep_recurrences=[0, 5],
        attention=False,
        stability_prompts=0,
    ),
]


def _bytes_on_disk(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"{s.capture}-{s.state_dtype}")
def test_estimated_size_matches_a_trace_on_disk(
    tiny_trace_model: LoopLM, settings: TraceSettings, tmp_path: Path
) -> None:
    prompts = random_prompts(4, seed=1)
    trace_prompts(tiny_trace_model, prompts, tmp_path, settings, progress=False)
    real = _bytes_on_disk(tmp_path)
    estimate = trace_bytes(shape_of(tiny_trace_model), [len(p.ids) for p in prompts], settings)
    assert abs(estimate - real) <= DISK_MARGIN * real, (estimate, real)


def test_estimated_size_of_the_demo_model_with_full_states(tmp_path: Path) -> None:
    demo = loopscope.load("demo")
    prompts = random_prompts(2, seed=2, first_length=60)
    settings = TraceSettings(recurrences=10, capture="full", stability_prompts=1)
    trace_prompts(demo, prompts, tmp_path, settings, progress=False)
    real = _bytes_on_disk(tmp_path)
    estimate = trace_bytes(shape_of(demo), [len(p.ids) for p in prompts], settings)
    assert abs(estimate - real) <= DISK_MARGIN * real, (estimate, real)


def test_shape_of_counts_layers_injection_and_embeddings(tiny_trace_model: LoopLM) -> None:
    shape = shape_of(tiny_trace_model)
    d = TINY_TRACE_CONFIG.d_model
    assert (shape.prelude_layers, shape.block_layers, shape.coda_layers) == (1, 2, 1)
    assert shape.total_params == sum(p.numel() for p in tiny_trace_model.parameters())
    assert shape.inject_params == 2 * d * d + d  # the concat-linear adapter and its bias
    assert shape.dtype == "float32"


def _hand_shape() -> ModelShape:
    return ModelShape(1, 2, 1, 4, 2, 10, 16, 100, 8, 1000, "float32")


def test_flops_of_a_shape_computed_by_hand() -> None:
    # 6 layer applications × 100 weights + 2 injections × 8 + head 10 × 4 = 656 per token;
    # 2 FLOPs each over 3 tokens, plus attention 6 layers × 2 · 4 · 3²
    assert forward_flops(_hand_shape(), [3], 2) == 2 * 3 * 656 + 6 * 2 * 4 * 9
    assert forward_flops(_hand_shape(), [3, 3], 2) == 2 * forward_flops(_hand_shape(), [3], 2)
    assert flop_seconds(2e12, 1.0) == 2.0
    with pytest.raises(TraceError, match="peak"):
        flop_seconds(1.0, 0.0)


def test_batch_size_fills_the_free_memory_it_is_given() -> None:
    assert choose_batch_size(1000, 100) == 8  # 80% of 1000 bytes, 100 bytes a prompt
    assert choose_batch_size(1000, 100, headroom=1.0) == 10
    assert choose_batch_size(10, 100) == 1  # never below one prompt
    assert choose_batch_size(10**12, 100, cap=16) == 16
    shape = _hand_shape()
    settings = TraceSettings(recurrences=4)
    one = peak_device_bytes(shape, 1, 8, settings)
    two = peak_device_bytes(shape, 2, 8, settings)
    assert two - one == one - peak_device_bytes(shape, 0, 8, settings) > 0  # linear in batch


def test_auto_capture_falls_back_to_summary_over_the_disk_budget(
    tiny_trace_model: LoopLM,
) -> None:
    shape, lengths = shape_of(tiny_trace_model), [5, 6, 7]
    settings = TraceSettings(recurrences=8, capture="auto")
    full = trace_bytes(shape, lengths, replace(settings, capture="full"))
    roomy = choose_capture(shape, lengths, settings, max_disk=full)
    assert roomy.chosen == "full" and not roomy.fell_back
    tight = choose_capture(shape, lengths, settings, max_disk=full - 1)
    assert tight.chosen == "summary" and tight.fell_back
    assert "over --max-disk" in tight.message()
    assert tight.record() == {
        "requested": "auto",
        "chosen": "summary",
        "estimated_full_bytes": full,
        "max_disk": full - 1,
    }
    explicit = choose_capture(shape, lengths, replace(settings, capture="full"), max_disk=1)
    assert explicit.chosen == "full"  # asked for by name: kept


def test_plan_resolves_auto_state_dtype_from_the_model_dtype(tiny_trace_model: LoopLM) -> None:
    prompts = random_prompts(2, seed=0)
    settings = TraceSettings(recurrences=4)
    assert plan_trace(tiny_trace_model, prompts, settings).settings.state_dtype == "float32"
    half = LoopLM(TINY_TRACE_CONFIG).to(torch.bfloat16)
    plan = plan_trace(half, prompts, settings)
    assert plan.settings.state_dtype == "float16" and plan.settings.capture == "full"
    kept = plan_trace(half, prompts, replace(settings, state_dtype="bfloat16"))
    assert kept.settings.state_dtype == "bfloat16"
    assert any("estimated trace size on disk" in line for line in plan.messages())
    auto = plan_trace(tiny_trace_model, prompts, settings, batch_size="auto")
    assert 1 <= auto.batch_size <= len(prompts) and "auto" in auto.batch_note


def test_sizes_are_read_as_people_write_them() -> None:
    assert parse_bytes("20GB") == 20 * 10**9
    assert parse_bytes("500 MB") == 500 * 10**6
    assert parse_bytes("8GiB") == 8 * 2**30
    assert parse_bytes("1.5tb") == 1_500_000_000_000
    assert parse_bytes("4096") == 4096
    for bad in ("lots", "0GB", "12XB"):
        with pytest.raises(TraceError, match="size|> 0"):
            parse_bytes(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_peak_device_memory_estimate_on_cuda(tmp_path: Path) -> None:
    demo = loopscope.load("demo", device="cuda", dtype=torch.bfloat16)
    prompts = random_prompts(4, seed=3, first_length=100)
    settings = TraceSettings(recurrences=16, capture="full", stability_prompts=0)
    torch.cuda.reset_peak_memory_stats()
    trace_prompts(demo, prompts, tmp_path, settings, progress=False, batch_size=4)
    real = torch.cuda.max_memory_allocated()
    estimate = peak_device_bytes(shape_of(demo), 4, 103, settings)
    assert 0.25 * estimate <= real <= 2 * estimate, (estimate, real)
