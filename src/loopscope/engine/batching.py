"""Memory-bounded runs: split work into micro-batches and shrink them when memory runs out.

Long recurrences, long prompts and attention recording all scale memory with the batch; the
largest batch that fits is hard to know in advance (it depends on the device, the dtype and
what else is resident). Rather than guess, try the requested size and halve it on every
out-of-memory error until it fits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

__all__ = ["MicrobatchOutOfMemoryError", "is_out_of_memory", "run_in_microbatches"]

T = TypeVar("T")
R = TypeVar("R")


class MicrobatchOutOfMemoryError(RuntimeError):
    """Even one item does not fit in memory. The message keeps "out of memory" so that callers
    which retry on out-of-memory errors (an outer micro-batcher, say) recognise it."""


def _oom_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = []
    for owner, name in ((torch, "OutOfMemoryError"), (torch.cuda, "OutOfMemoryError")):
        found = getattr(owner, name, None)
        if isinstance(found, type) and issubclass(found, BaseException):
            types.append(found)
    return tuple(types)


def is_out_of_memory(err: BaseException) -> bool:
    """True for torch's out-of-memory errors (CUDA or otherwise, whatever the torch version)
    and for a RuntimeError whose message says "out of memory" (CPU allocators, MPS, older
    torch)."""
    if isinstance(err, _oom_types()):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def _release_cached_memory() -> None:
    """Hand cached blocks back so the smaller retry can use them."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_in_microbatches(
    fn: Callable[[list[T]], Sequence[R]], items: Sequence[T], batch_size: int
) -> list[R]:
    """``fn`` applied to consecutive slices of ``items`` of at most ``batch_size``, results
    concatenated in the order of ``items``.

    On an out-of-memory error the slice size halves and the same slice is retried; the
    smaller size is then kept for the rest of the run (what did not fit once will not fit
    the next time either). ``fn`` must return one result per item. When a single item does
    not fit, :class:`MicrobatchOutOfMemoryError` is raised from the original error.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    results: list[R] = []
    size, start = batch_size, 0
    while start < len(items):
        chunk = list(items[start : start + size])
        try:
            out = fn(chunk)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            if size == 1:
                raise MicrobatchOutOfMemoryError(
                    f"out of memory on item {start} even with a batch of one (started at "
                    f"batch_size={batch_size}); shorten the prompt, run fewer recurrences, "
                    "record less, use a lower-precision dtype or a device with more memory"
                ) from err
            out = None  # the error (and the failed batch's tensors) is released here
        if out is None:
            _release_cached_memory()
            size = max(1, size // 2)
            continue
        if len(out) != len(chunk):
            raise ValueError(
                f"fn returned {len(out)} results for a batch of {len(chunk)} items; it must "
                "return exactly one result per item, in order"
            )
        results.extend(out)
        start += len(chunk)
    return results
