"""The ablate command offers exactly the presets the studies define (kept as names in the CLI so
that building the parser does not import the studies)."""

from __future__ import annotations

from dataclasses import fields

from loopscope.cli.ablate import RANDOM_INIT_PRESET_NAMES, TRAINED_PRESET_NAMES
from loopscope.studies.ablation.presets import (
    RANDOM_INIT_PRESETS,
    TRAINED_PRESETS,
    trained_preset,
)


def test_cli_preset_names_are_the_studies_presets() -> None:
    assert tuple(RANDOM_INIT_PRESETS) == RANDOM_INIT_PRESET_NAMES
    assert tuple(TRAINED_PRESETS) == TRAINED_PRESET_NAMES


def test_the_cpu_preset_is_the_study_grid_at_cpu_scale() -> None:
    """The study's trained grid: (2,k⊗4,2) for k = 4, 8, 12 with and without injection and
    prelude/coda against a 12-layer feedforward model; pre-norm, constant 4 recurrences,
    final-output loss."""
    cpu, paper = trained_preset("cpu"), trained_preset("paper")
    grid = ("block_sizes", "injections", "prelude_coda", "norms", "feedforward_layers")
    assert all(getattr(cpu, name) == getattr(paper, name) for name in grid)
    assert cpu.block_sizes == (4, 8, 12) and cpu.norms == ("pre",)
    assert cpu.train.recurrence_sampling == "constant" and cpu.train.loss == "final"
    assert cpu.d_model < paper.d_model and cpu.train.steps < paper.train.steps
    assert {f.name for f in fields(cpu)} == {f.name for f in fields(paper)}
