"""A sweep's cells as one DataFrame: one row per finished cell with its factors, verdict
parts, label and scalar measures, equal to what the sweep itself returned (random-init) or to
a hand-made cell file (trained)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from loopscope.core.errors import LoopscopeError
from loopscope.studies.ablation.frames import PARTS, cells_frame
from loopscope.studies.ablation.presets import RANDOM_INIT_PRESETS
from loopscope.studies.ablation.store import CellStore, write_result
from loopscope.studies.ablation.sweeps import run_random_init
from loopscope.studies.ablation.trained import TrainedResult

pd = pytest.importorskip("pandas")

TINY = replace(
    RANDOM_INIT_PRESETS["quick"],
    d_model=16,
    n_heads=2,
    recurrences=8,
    prompts=2,
    prompt_tokens=8,
    spectral_iters=4,
    seeds=1,
    block_sizes=(2,),
    norms=("pre", "huginn"),
    injections=("none",),
)


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def test_a_random_init_sweep_has_one_row_per_cell_as_the_sweep_measured_it(
    tmp_path: Path,
) -> None:
    run = run_random_init(tmp_path, TINY, progress=False, log=lambda _: None)
    frame = cells_frame(tmp_path)
    assert frame.attrs["kind"] == "random-init" and frame.index.name == "cell"
    assert frame.index.tolist() == sorted(r.cell.key for r in run.results)
    assert frame.columns[:10].tolist() == [
        "norm", "injection", "block", "seed", "init", *PARTS, "label",
    ]  # fmt: skip
    assert "distance_curve" not in frame.columns and "verdict" not in frame.columns
    for result in run.results:
        row = frame.loc[result.cell.key]
        assert (row["norm"], row["injection"], row["block"], row["seed"]) == (
            result.cell.norm, result.cell.injection, result.cell.block, result.cell.seed,
        )  # fmt: skip
        assert row["label"] == result.verdict and row["reason"] == result.reason
        assert [row[p] for p in PARTS] == [
            result.direction, result.magnitude, result.norm_trend, result.certificate,
        ]  # fmt: skip
        for name in ("last_step", "raw_last_step", "min_cosine", "radius", "norm_exponent"):
            assert _same(row[name], getattr(result, name)), name


def _trained(name: str, verdict: str, radius: float) -> TrainedResult:
    return TrainedResult(
        name=name,
        layout="(2,2⊗4,2)_I",
        block=2,
        injection="add",
        prelude_coda=True,
        norm="pre",
        seed=0,
        feedforward=False,
        parameters=1234,
        steps=10,
        eval_loss=1.5,
        eval_accuracy=0.25,
        verdict=verdict,
        reason="because",
        last_step=1e-4,
        trend=0.2,
        min_cosine=0.5,
        radius=radius,
        converged_layers=3,
        non_fixed_point_rate=0.0,
        stages=True,
        note="",
        seconds=1.0,
        direction="converged",
        magnitude="moving",
        norm_trend="linear",
        certificate="not measured",
    )


def test_a_trained_sweep_reads_back_its_cell_files_nan_included(tmp_path: Path) -> None:
    CellStore(tmp_path, {"kind": "trained"})
    cells = [_trained("2-2x4-2-add-pre-s1", "not stable", math.nan)]
    cells.append(_trained("2-2x4-2-add-pre-s0", "stable, distinct", 0.9))
    for cell in cells:
        (tmp_path / "cells" / cell.name).mkdir()
        write_result(tmp_path / "cells" / cell.name / "result.json", asdict(cell))
    (tmp_path / "cells" / "2-2x4-2-add-pre-s2").mkdir()  # a cell still training: no row
    frame = cells_frame(tmp_path)
    assert frame.index.tolist() == ["2-2x4-2-add-pre-s0", "2-2x4-2-add-pre-s1"]
    assert frame.columns[:8].tolist() == [
        "layout", "block", "injection", "prelude_coda", "norm", "seed", "feedforward", "init",
    ]  # fmt: skip
    assert frame.loc["2-2x4-2-add-pre-s0", "label"] == "stable, distinct"
    assert frame.loc["2-2x4-2-add-pre-s0", "radius"] == 0.9
    assert math.isnan(frame.loc["2-2x4-2-add-pre-s1", "radius"])  # stored as null
    assert frame.loc["2-2x4-2-add-pre-s1", "norm_trend"] == "linear"
    assert frame.loc["2-2x4-2-add-pre-s0", "eval_accuracy"] == 0.25
    assert json.loads((tmp_path / "sweep.json").read_text())["kind"] == "trained"


def test_a_directory_without_a_sweep_is_named(tmp_path: Path) -> None:
    with pytest.raises(LoopscopeError, match="no sweep.json"):
        cells_frame(tmp_path)
