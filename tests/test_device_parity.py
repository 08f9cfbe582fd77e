"""Every family on an accelerator, in float32 and bfloat16, against the same model on the CPU.

With CUDA the "device" is the GPU. Without it (or with ``LOOPSCOPE_PARITY_DEVICE=cpu``) the
same comparisons run with the CPU as the device: float32 against itself, and bfloat16 against
the float32 reference, which is the half-precision check on its own and keeps these tests
honest on every machine. ``tools/gpu_checks.sh`` runs them on a GPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from family_zoo import FAMILIES
from tolerances import cast_tolerance, forward_depth, forward_tolerance, magnitude, widest_sum

from loopscope.engine.contract import LoopedLM
from loopscope.trace.settings import PromptInput, TraceSettings
from loopscope.trace.store import TraceStore
from loopscope.trace.writer import trace_prompts

DEVICE = os.environ.get("LOOPSCOPE_PARITY_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
#: Inkling-2's tiny model expands rounding about fivefold per pass (see the batched tests), so
#: every family runs two recurrences here: a parity check, not a stability one.
RECURRENCES = 2
LENGTHS = (7, 4, 6)


def _ids(model: LoopedLM, length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.meta.vocab_size, (length,), generator=gen).tolist()


def _logits(model: LoopedLM, ids: list[int], device: str) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor([ids], device=device), recurrences=RECURRENCES)
    return out.logits.float().cpu()


def _tolerance(model: LoopedLM, dtype: torch.dtype, reference: torch.Tensor) -> float:
    depth = forward_depth(model.meta, RECURRENCES)
    size = magnitude(reference)
    if dtype == torch.float32:  # another device's kernels: rounding in another order
        return forward_tolerance(torch.float32, size, depth, widest_sum(model))
    return cast_tolerance(dtype, size, depth)  # narrower weights: one coherent perturbation


#: Inkling-2 keeps its router and convolutions in float32 (transformers'
#: ``_keep_in_fp32_modules_strict``): ``from_pretrained(dtype=)``, which ``loopscope.load`` uses,
#: honours that, and the plain ``.to(bfloat16)`` these tests cast with does not.
CASTS = [
    pytest.param(name, dtype, id=f"{name}-{label}")
    for name in FAMILIES
    for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))
    if not (name == "inkling2" and dtype == torch.bfloat16)
]


@pytest.mark.parametrize(("name", "dtype"), CASTS)
def test_each_family_on_the_device_gives_the_cpu_logits(name: str, dtype: torch.dtype) -> None:
    reference = FAMILIES[name]().eval()
    moved = FAMILIES[name]().eval().to(device=DEVICE, dtype=dtype)
    for seed, length in enumerate(LENGTHS):
        ids = _ids(reference, length, seed)
        want, got = _logits(reference, ids, "cpu"), _logits(moved, ids, DEVICE)
        assert torch.isfinite(got).all(), f"{name}: non-finite logits on {DEVICE} in {dtype}"
        tol = _tolerance(reference, dtype, want)
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=tol, err_msg=name)


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "inkling2"])
def test_a_batched_trace_on_the_device_records_what_the_cpu_does(name: str, tmp_path: Path) -> None:
    reference = FAMILIES[name]().eval()
    moved = FAMILIES[name]().eval().to(device=DEVICE)
    prompts = [PromptInput(f"p{i}", _ids(reference, n, 10 + i)) for i, n in enumerate(LENGTHS)]
    settings = TraceSettings(recurrences=RECURRENCES, capture="full", stability_prompts=0)
    stores = {}
    for where, model in (("cpu", reference), (DEVICE, moved)):
        out = tmp_path / f"trace-{where}"
        trace_prompts(model, prompts, out, settings, progress=False, batch_size=len(prompts))
        stores[where] = TraceStore(out)
    assert stores[DEVICE].header["runtime"]["device"].startswith(DEVICE.split(":")[0])
    depth = forward_depth(reference.meta, RECURRENCES)
    for index in range(len(prompts)):
        want_chunk, got_chunk = stores["cpu"].prompt(index), stores[DEVICE].prompt(index)
        pairs = {"block states": (want_chunk.block, got_chunk.block)}
        pairs |= {key: (value, got_chunk.summary[key]) for key, value in want_chunk.summary.items()}
        for what, (want, got) in pairs.items():
            want, got = np.asarray(want, np.float64), np.asarray(got, np.float64)
            tol = forward_tolerance(torch.float32, magnitude(want), depth, widest_sum(reference))
            np.testing.assert_allclose(
                got, want, rtol=0, atol=tol, err_msg=f"{name} prompt {index}: {what}"
            )
