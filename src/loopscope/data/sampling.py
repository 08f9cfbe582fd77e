"""A seeded random subset of a prompt file (``--sample N --seed S``).

A study draws a fixed number of examples (256 GSM8K test questions, say) from a larger file. The
draw must be the same on every machine and every rerun, so it uses Python's own
``random.Random(seed)``, whose sampling of a range is specified by the language and does not
change between numpy or torch versions. The chosen examples are returned in file order, so a
trace of a sample reads like the file it came from.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

from loopscope.core.errors import LoopscopeError

__all__ = ["SampleError", "sample_indices", "sample_items"]

T = TypeVar("T")


class SampleError(LoopscopeError):
    """A sample that cannot be drawn (a size outside 1..the number of examples)."""


def sample_indices(
    available: int, size: int, seed: int, *, source: str = "the prompt file"
) -> list[int]:
    """``size`` distinct indices out of ``range(available)``, in increasing order, drawn with
    ``random.Random(seed)``: the same arguments give the same indices everywhere."""
    if size < 1:
        raise SampleError(f"--sample takes a number of examples ≥ 1, got {size}")
    if size > available:
        raise SampleError(
            f"--sample {size} asks for more examples than {source} holds ({available}); "
            f"pass --sample {available} or fewer"
        )
    return sorted(random.Random(seed).sample(range(available), size))


def sample_items(
    items: Sequence[T], size: int | None, seed: int, *, source: str = "the prompt file"
) -> list[T]:
    """``items`` itself when ``size`` is None, else the seeded subset of ``size`` of them in
    their original order."""
    if size is None:
        return list(items)
    return [items[i] for i in sample_indices(len(items), size, seed, source=source)]
