"""Copies of device tensors into host memory that do not stall the device.

A blocking ``.cpu()`` after every layer makes the GPU wait for each copy, which costs a
Huginn-shaped model several times a plain forward. Copying into page-locked (pinned) host
buffers with ``non_blocking=True`` lets the copies run behind the compute; one
synchronisation, when the copies are first read, settles them all. On the CPU there is nothing
to overlap and :class:`HostStager` makes the very copies it always made.
"""

from __future__ import annotations

import torch
from torch import Tensor


class HostStager:
    """Copies tensors to ``device`` in ``dtype``; from a CUDA tensor to the host, through a
    pinned buffer without waiting, settled by :meth:`settle` (once per forward: every copy
    runs on the stream that computed its tensor, so the last event covers them all)."""

    def __init__(self, device: torch.device | None, dtype: torch.dtype | None) -> None:
        self.device = device
        self.dtype = dtype
        self._pending: torch.cuda.Event | None = None

    def copy(self, tensor: Tensor) -> Tensor:
        source = tensor.detach()
        to_host = self.device is not None and self.device.type == "cpu"
        if not (to_host and source.is_cuda):
            return source.to(device=self.device, dtype=self.dtype, copy=True)
        # cast on the device first: half the bytes to move when the copy is narrower
        cast = source if self.dtype is None else source.to(self.dtype)
        buffer = torch.empty(cast.shape, dtype=cast.dtype, pin_memory=True)
        buffer.copy_(cast, non_blocking=True)
        if self._pending is None:
            self._pending = torch.cuda.Event()
        self._pending.record(torch.cuda.current_stream(source.device))
        return buffer

    def settle(self) -> None:
        """Wait for the copies in flight (a no-op when there are none, as on the CPU)."""
        if self._pending is not None:
            self._pending.synchronize()
            self._pending = None
