"""The random-init cell's certificate from one retained forward pass: the cell measured with
it equals the cell measured with a forward-mode JVP per product (the same verdict and parts,
the radius to float32 round-off)."""

from __future__ import annotations

from dataclasses import asdict, replace

import pytest

from loopscope.studies.ablation.presets import RANDOM_INIT_PRESETS
from loopscope.studies.ablation.random_init import Cell, bundled_prompt_ids, measure_cell

SMALL = replace(
    RANDOM_INIT_PRESETS["quick"],
    d_model=32,
    n_heads=2,
    recurrences=8,
    prompts=2,
    prompt_tokens=10,
    spectral_iters=8,
)


@pytest.mark.parametrize(
    "cell",
    [Cell("pre", "none", 2, 0), Cell("huginn", "concat-linear", 3, 1), Cell("ouro", "none", 2, 2)],
    ids=lambda c: c.key,
)
def test_cell_is_the_same_with_the_retained_forward(cell: Cell) -> None:
    ids, _ = bundled_prompt_ids(SMALL.prompts, SMALL.prompt_tokens)
    slow = asdict(measure_cell(cell, SMALL, ids, retain_forward=False))
    fast = asdict(measure_cell(cell, SMALL, ids, retain_forward=True))
    assert fast.pop("radius") == pytest.approx(slow.pop("radius"), rel=1e-5)
    fast.pop("seconds"), slow.pop("seconds")
    assert fast == slow  # everything else, curves included, is computed before the certificate
