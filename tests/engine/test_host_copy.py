"""Captured states reach the host without stalling a GPU (pinned buffers, non-blocking copies,
one synchronisation when read), and on the CPU are the very copies they always were."""

from __future__ import annotations

import pytest
import torch

from loopscope.engine.cache import ActivationCache
from loopscope.engine.host_copy import HostStager
from loopscope.engine.probes import CaptureProbe


def test_cpu_copies_are_bit_identical_and_independent() -> None:
    source = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    for dtype in (None, torch.float32, torch.float16, torch.bfloat16):
        stager = HostStager(torch.device("cpu"), dtype)
        copy = stager.copy(source)
        expected = source.to(device="cpu", dtype=dtype, copy=True)
        assert copy.dtype == expected.dtype and torch.equal(copy, expected)
        assert copy.data_ptr() != source.data_ptr()  # a copy: later edits cannot reach it
        stager.settle()  # nothing in flight: a no-op


def test_capture_on_the_cpu_matches_a_plain_cache(tiny_trace_model: torch.nn.Module) -> None:
    ids = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(1))
    capture = CaptureProbe(dtype=torch.float16)
    plain = ActivationCache(dtype=torch.float16)
    with torch.no_grad():
        tiny_trace_model(ids, recurrences=3, probes=[capture, plain])
    assert list(capture) == list(plain)
    for name in plain:
        assert torch.equal(capture[name], plain[name])
    assert capture.stage_array("block").shape[2] == 3  # every batch row kept


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_copies_land_in_pinned_memory_and_equal_blocking_copies() -> None:
    source = torch.randn(4, 64, 32, device="cuda")
    stager = HostStager(torch.device("cpu"), torch.float16)
    copy = stager.copy(source)
    assert copy.is_pinned() and copy.device.type == "cpu"
    stager.settle()
    assert torch.equal(copy, source.to(torch.float16).cpu())
