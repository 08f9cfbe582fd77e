"""Ablation sweeps: the grid covers every cell once, a rerun skips finished cells, a diverging
or failing cell is recorded as not stable without stopping the sweep, the verdict rule gives
the known answer on constructed dynamics, and the trained mini grid runs end to end."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tolerances import rounding_tolerance

from loopscope.cli.ablate import INIT_CHOICES as cli_init_choices
from loopscope.cli.ablate import main as ablate_main
from loopscope.nn.injection import INJECTIONS
from loopscope.nn.layers import NORM_SCHEMES
from loopscope.studies.ablation.measures import measure_states
from loopscope.studies.ablation.presets import (
    INIT_CHOICES,
    RANDOM_INIT_PRESETS,
    TRAINED_PRESETS,
    random_init_preset,
)
from loopscope.studies.ablation.random_init import Cell, CellResult, random_init_grid, run_cell
from loopscope.studies.ablation.random_init_outputs import factor_summary
from loopscope.studies.ablation.study import compare_with_study
from loopscope.studies.ablation.sweeps import run_random_init, run_trained
from loopscope.studies.ablation.verdict import (
    NOT_STABLE,
    STABLE_DEGENERATE,
    STABLE_DISTINCT,
    VerdictRule,
    judge,
)
from loopscope.training.config import TrainConfig

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
RULE = VerdictRule()


def _silent(_: str) -> None:
    pass


# --------------------------------------------------------------------------- the grid


def test_quick_grid_enumerates_every_cell_exactly_once() -> None:
    preset = random_init_preset("quick")
    grid = random_init_grid(preset)
    expected = set(itertools.product(NORM_SCHEMES, INJECTIONS, (4, 12, 16), range(3)))
    assert len(grid) == 4 * 5 * 3 * 3 == 180
    assert {(c.norm, c.injection, c.block, c.seed) for c in grid} == expected
    assert len({c.key for c in grid}) == 180  # one file name per cell


def test_narrowed_grid_and_bad_factors_are_explained() -> None:
    preset = random_init_preset("quick", seeds=2, block_sizes=[12], norms=["pre", "ouro"])
    assert len(random_init_grid(preset)) == 2 * 5 * 1 * 2
    with pytest.raises(ValueError, match="twice"):
        random_init_preset("quick", norms=["pre", "pre"])
    with pytest.raises(ValueError, match="unknown norm 'sandwich'"):
        random_init_preset("quick", norms=["sandwich"])
    with pytest.raises(ValueError, match="≥ 2"):
        random_init_preset("quick", block_sizes=[1, 4])
    with pytest.raises(ValueError, match="seeds must be ≥ 1"):
        random_init_preset("quick", seeds=0)
    with pytest.raises(ValueError, match="unknown preset"):
        random_init_preset("huge")


# --------------------------------------------------------------------------- verdict rule


def _fixed_points(distinct: bool) -> torch.Tensor:
    """Per-layer fixed points (L=2, T=3, D=4): orthogonal directions or one shared point."""
    p0 = torch.tensor([[1.0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]])
    p1 = torch.tensor([[0.0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]]) if distinct else p0
    return torch.stack([p0, p1])


def _converging(distinct: bool, rate: float = 0.5, recurrences: int = 40) -> torch.Tensor:
    """X[r, l] = X*[l] + rate^r · E: geometric convergence, (R, L, B=1, T, D)."""
    star = _fixed_points(distinct)
    noise = torch.ones_like(star)
    return torch.stack([star + rate**r * noise for r in range(recurrences)])[:, :, None]


def _verdict(states: torch.Tensor, radius: float = float("nan")) -> tuple[str, str]:
    m = measure_states(states)
    return judge(
        finite=m.finite,
        last_step=m.last_step,
        trend=m.trend,
        radius=radius,
        min_cosine=m.min_cosine,
        rule=RULE,
        first_bad_recurrence=m.first_bad_recurrence,
    )


def test_verdict_rule_on_constructed_dynamics() -> None:
    assert _verdict(_converging(distinct=True))[0] == STABLE_DISTINCT
    assert _verdict(_converging(distinct=False))[0] == STABLE_DEGENERATE
    # Settled, but an expanding Jacobian is no attractor.
    verdict, reason = _verdict(_converging(distinct=True), radius=1.5)
    assert verdict == NOT_STABLE and "expanding" in reason
    # A contraction at rate 0.9 after 40 steps still moves by ~0.9^39 ≈ 2e-2 > 1e-3, shrinking.
    verdict, reason = _verdict(_converging(distinct=True, rate=0.9))
    assert verdict == NOT_STABLE and "still shrinking" in reason

    # Constant-speed rotation: every step is the same size → drifting.
    angles = torch.arange(40, dtype=torch.float32) * 0.1
    circle = torch.stack([angles.cos(), angles.sin(), torch.zeros(40), torch.zeros(40)], -1)
    rotating = circle[:, None, None, None, :].expand(40, 2, 1, 3, 4).clone()
    verdict, reason = _verdict(rotating)
    assert verdict == NOT_STABLE and "not shrinking" in reason
    # each relative step (about 0.1 rad) is a norm over 12 unit-RMS entries, off by λ√12·ε;
    # the trend is a ratio of two of them
    trend = 2 * rounding_tolerance(torch.float32, 1.0, 12) / 0.1
    assert measure_states(rotating).trend == pytest.approx(1.0, abs=trend)

    broken = _converging(distinct=True)
    broken[7, 1, 0, 2, 3] = float("nan")
    verdict, reason = _verdict(broken)
    assert verdict == NOT_STABLE and "non-finite" in reason and "recurrence 7" in reason


def test_measures_are_scale_free_and_see_linear_growth() -> None:
    # X_t = (t+1)·c + d: the norm doubles from R/2 to R, the direction settles as 1/t².
    c = _fixed_points(distinct=True)
    d = torch.randn(c.shape, generator=torch.Generator().manual_seed(0))
    growing = torch.stack([(t + 1) * c + d for t in range(64)])[:, :, None]
    m = measure_states(growing)
    assert m.norm_growth == pytest.approx(2.0, rel=0.05)
    assert m.raw_last_step == pytest.approx(1 / 64, rel=0.1)  # raw step ~ 1/t
    assert m.last_step < m.raw_last_step / 10  # the direction moves far less
    assert m.distance_curve[-1] == 0.0
    scaled = measure_states(growing * 1000.0)
    # ×1000 rounds every entry; the relative step, a norm over 12 entries, moves by λ√12·ε
    rel = rounding_tolerance(torch.float32, 1.0, 12) / m.last_step
    assert scaled.last_step == pytest.approx(m.last_step, rel=rel)


# --------------------------------------------------------------------------- sweeps


def test_random_init_sweep_resumes_skipping_finished_cells(tmp_path: Path) -> None:
    first = run_random_init(tmp_path, TINY, progress=False, log=_silent)
    keys = ["pre-none-k2-s0", "huginn-none-k2-s0"]
    assert first.computed == keys
    files = {k: tmp_path / "cells" / f"{k}.json" for k in keys}
    kept = files["huginn-none-k2-s0"]
    kept_stamp, kept_text = kept.stat().st_mtime_ns, kept.read_text()
    files["pre-none-k2-s0"].unlink()  # as if the sweep was killed before this cell finished

    second = run_random_init(tmp_path, TINY, progress=False, log=_silent)
    assert second.computed == ["pre-none-k2-s0"]
    assert kept.stat().st_mtime_ns == kept_stamp and kept.read_text() == kept_text
    assert [r.cell.key for r in second.results] == keys
    assert run_random_init(tmp_path, TINY, progress=False, log=_silent).computed == []

    csv_rows = (tmp_path / "table.csv").read_text().splitlines()
    assert len(csv_rows) == 3 and csv_rows[0].startswith("norm,injection,block")
    assert "| pre | none | 2 |" in (tmp_path / "table.md").read_text()
    assert "curves_pre" in (tmp_path / "report.html").read_text()
    with pytest.raises(ValueError, match="different settings.*recurrences"):
        run_random_init(tmp_path, replace(TINY, recurrences=6), progress=False, log=_silent)


def test_diverging_cell_is_not_stable_and_the_sweep_continues(tmp_path: Path) -> None:
    # In float16 a 10⁶ residual scale overflows a pre-norm stream (nothing renormalises it),
    # while Huginn's sandwich renormalises after every branch and stays finite. At LoopLM's own
    # init, that is: 10⁶ × a branch of Huginn's own (larger) init passes float16's 65504 before
    # the sandwich norm can act.
    preset = replace(
        TINY, dtype="float16", residual_scale=1e6, recurrences=32, init="identity-adapter"
    )
    run = run_random_init(tmp_path, preset, progress=False, log=_silent)
    by_key = {r.cell.key: r for r in run.results}
    pre, huginn = by_key["pre-none-k2-s0"], by_key["huginn-none-k2-s0"]
    assert not pre.finite and pre.verdict == NOT_STABLE and "non-finite" in pre.reason
    assert huginn.finite and math.isfinite(huginn.last_step) and math.isfinite(huginn.radius)
    saved = json.loads((tmp_path / "cells" / "pre-none-k2-s0.json").read_text())
    assert saved["verdict"] == NOT_STABLE and saved["last_step"] is None
    assert (tmp_path / "report.html").exists()


def test_a_cell_that_raises_is_recorded_with_its_error() -> None:
    bad_ids = torch.tensor([[1, 2, 300, 4, 5, 6, 7, 8]])  # 300 is outside the byte vocabulary
    result = run_cell(Cell("pre", "none", 2, 0), TINY, bad_ids)
    assert result.verdict == NOT_STABLE and result.error is not None
    assert "token ids must lie" in result.reason
    back = CellResult.from_json(json.loads(json.dumps(result.to_json())))
    assert back.error == result.error and math.isnan(back.last_step) and back.step_curve == []


# --------------------------------------------------------------------------- the study


def _result(norm: str, injection: str, verdict: str, step: float, cos: float) -> CellResult:
    return CellResult(
        cell=Cell(norm, injection, 12, 0),
        verdict=verdict,
        reason="",
        last_step=step,
        trend=0.3,
        raw_last_step=step,
        min_cosine=cos,
        radius=0.9,
        radius_converged=True,
        norm_growth=1.0,
        injection_ratio=0.5,
        finite=True,
        distance_curve=[1.0, 0.5, 0.0],
        step_curve=[0.5, step],
        d_model=64,
        recurrences=64,
        seconds=0.1,
    )


def test_compare_with_study_and_factor_summary_use_this_runs_numbers() -> None:
    results = [
        _result("pre", "concat-linear", STABLE_DISTINCT, 1e-5, 0.8),
        _result("pre", "none", STABLE_DEGENERATE, 1e-4, 0.999),
        _result("huginn", "concat-linear", STABLE_DEGENERATE, 2e-4, 0.995),
        _result("huginn", "none", STABLE_DEGENERATE, 3e-4, 0.999),
        _result("ouro", "none", NOT_STABLE, 0.2, 0.6),
        _result("ouro", "concat-linear", NOT_STABLE, 0.3, 0.5),
    ]
    table = compare_with_study(results)
    rows = {row[0]: row for row in table.rows}
    assert [r[0] for r in table.rows] == [
        "pre + none",
        "pre + concat-linear",
        "huginn + none",
        "huginn + concat-linear",
        "ouro + none",
        "ouro + concat-linear",
    ]
    agree = {name: row[6] for name, row in rows.items()}
    assert agree == {
        "pre + none": "yes",
        "pre + concat-linear": "yes",
        "huginn + none": "no",  # the study: not stable
        "huginn + concat-linear": "yes",  # the study: "stable", either kind
        "ouro + none": "yes",
        "ouro + concat-linear": "yes",
    }
    assert "last step 3.0e-04" in str(rows["huginn + none"][7])

    summary = factor_summary(results)
    assert len(summary) == 2  # norm and injection vary; block size does not
    assert summary[0].startswith("Normalisation — pre: 1/2 stable distinct, 1/2 stable degenerate")
    assert "ouro changes stable-distinct cells from 1/2 to 0/2" in summary[0]


# --------------------------------------------------------------------------- trained grid


def test_trained_mini_grid_runs_end_to_end_and_resumes(tmp_path: Path) -> None:
    preset = replace(
        TRAINED_PRESETS["quick"],
        d_model=16,
        n_heads=2,
        train=TrainConfig(
            steps=3,
            batch_size=2,
            warmup_steps=1,
            eval_every=3,
            eval_problems=2,
            accuracy_problems=1,
            checkpoint_every=100,
            max_problem_steps=1,
        ),
        trace_recurrences=4,
        prompts=1,
        stability_iters=3,
        block_sizes=(2,),
        injections=("none",),
        prelude_coda=(True,),
        feedforward_layers=2,
    )
    run = run_trained(tmp_path, preset, progress=False, log=_silent)
    looped_name, ff_name = "2-2x4-2-none-pre-s0", "ff2-pre-s0"
    assert run.computed == [looped_name, ff_name]
    looped, ff = run.results
    assert looped.steps == 3 and looped.verdict in (NOT_STABLE, STABLE_DEGENERATE, STABLE_DISTINCT)
    assert ff.feedforward and ff.verdict == "—"
    assert looped.init == ff.init == "retrofit"  # pre-norm cells start as the retrofit models
    assert looped.direction != "—" and ff.direction == "—"
    assert 0.0 <= looped.eval_accuracy <= 1.0 and math.isfinite(looped.eval_loss)
    cell_dir = tmp_path / "cells" / looped_name
    assert (cell_dir / "report" / "report.html").exists()
    assert (cell_dir / "model.safetensors").exists()
    report = (tmp_path / "report.html").read_text()
    assert looped_name in report and "stage alignment" in report.lower()

    # Killed after training the feedforward cell, before its analyses finished.
    (tmp_path / "cells" / ff_name / "result.json").unlink()
    looped_stamp = (cell_dir / "result.json").stat().st_mtime_ns
    messages: list[str] = []
    again = run_trained(tmp_path, preset, progress=False, log=messages.append)
    assert again.computed == [ff_name]
    assert any("resuming from step 3" in m for m in messages)  # no step trained twice
    assert (cell_dir / "result.json").stat().st_mtime_ns == looped_stamp
    assert again.results[1].eval_loss == pytest.approx(ff.eval_loss)


def test_cli_runs_a_narrowed_random_init_sweep(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = ablate_main(
        [
            "ablate", "random-init", "--out", str(tmp_path), "--norms", "post",
            "--injections", "gated", "--block-sizes", "2", "--seeds", "1", "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    assert "1 cells, 1 computed" in capsys.readouterr().out
    assert ablate_main(["ablate", "random-init", "--out", str(tmp_path), "--seeds", "0"]) == 2


def test_cli_random_init_takes_the_adapter_and_embedding_init(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "ablate", "random-init", "--out", str(tmp_path), "--norms", "pre",
        "--injections", "concat-linear", "--block-sizes", "2", "--seeds", "1", "--no-progress",
    ]  # fmt: skip
    assert ablate_main([*args, "--adapter-init-noise", "0", "--embed-init-std", "1"]) == 0
    header = json.loads((tmp_path / "sweep.json").read_text())
    assert (header["adapter_init_noise"], header["embed_init_std"]) == (0.0, 1.0)
    capsys.readouterr()
    # Another init is another measurement: the directory refuses it instead of mixing cells.
    assert ablate_main(args) == 2
    assert "adapter_init_noise" in capsys.readouterr().err
    assert ablate_main([*args, "--adapter-init-noise", "-0.1"]) == 2
    assert "--adapter-init-noise is a standard deviation" in capsys.readouterr().err
    assert ablate_main([*args, "--embed-init-std", "-1"]) == 2
    assert "--embed-init-std is a standard deviation" in capsys.readouterr().err


# --------------------------------------------------------------------------- init schemes


def test_each_cell_starts_from_its_familys_init_and_records_it(tmp_path: Path) -> None:
    preset = replace(TINY, norms=("pre", "huginn", "ouro"))
    run = run_random_init(tmp_path, preset, progress=False, log=_silent)
    inits = {r.cell.norm: r.init for r in run.results}
    assert inits == {"pre": "retrofit", "huginn": "huginn", "ouro": "ouro"}
    saved = json.loads((tmp_path / "cells" / "huginn-none-k2-s0.json").read_text())
    assert saved["init"] == "huginn"
    assert saved["direction"] in ("converged", "still shrinking", "not shrinking")
    assert "| huginn | none | 2 | huginn |" in (tmp_path / "table.md").read_text()
    assert json.loads((tmp_path / "sweep.json").read_text())["init"] == "family"

    # A cell written before the init was recorded reads back as LoopLM's own start.
    old = {k: v for k, v in saved.items() if k not in ("init", "direction", "norm_curve")}
    back = CellResult.from_json(old)
    assert back.init == "identity-adapter" and back.direction == "—" and back.norm_curve == []


def test_one_init_for_every_cell_and_unknown_inits_are_refused(tmp_path: Path) -> None:
    run = run_random_init(tmp_path, replace(TINY, init="ouro"), progress=False, log=_silent)
    assert {r.init for r in run.results} == {"ouro"}
    with pytest.raises(ValueError, match="unknown init 'xavier'"):
        random_init_grid(replace(TINY, init="xavier"))


def test_paper_preset_starts_every_cell_from_huginns_init(tmp_path: Path) -> None:
    # the study's width holds the init fixed across cells; other presets keep the family inits
    assert random_init_preset("paper").init == "huginn"
    assert random_init_preset("quick").init == "family"
    args = [
        "ablate", "random-init", "--preset", "paper", "--out", str(tmp_path), "--norms", "pre",
        "--injections", "none", "--block-sizes", "2", "--seeds", "1", "--limit", "1",
        "--recurrences", "2", "--no-progress",
    ]  # fmt: skip
    assert ablate_main(args) == 0
    assert json.loads((tmp_path / "sweep.json").read_text())["init"] == "huginn"
    assert json.loads((tmp_path / "cells" / "pre-none-k2-s0.json").read_text())["init"] == "huginn"
    family = [*args[:5], str(tmp_path / "family"), *args[6:], "--init", "family"]
    assert ablate_main(family) == 0
    cell = json.loads((tmp_path / "family" / "cells" / "pre-none-k2-s0.json").read_text())
    assert cell["init"] == "retrofit"


def test_cli_init_flag_and_its_conflicts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "ablate", "random-init", "--out", str(tmp_path), "--norms", "pre",
        "--injections", "concat-linear", "--block-sizes", "2", "--seeds", "1", "--no-progress",
    ]  # fmt: skip
    assert cli_init_choices == INIT_CHOICES
    assert ablate_main([*args, "--init", "huginn"]) == 0
    assert json.loads((tmp_path / "sweep.json").read_text())["init"] == "huginn"
    cell = json.loads((tmp_path / "cells" / "pre-concat-linear-k2-s0.json").read_text())
    assert cell["init"] == "huginn"
    capsys.readouterr()
    assert ablate_main([*args, "--init", "huginn", "--adapter-init-noise", "0.1"]) == 2
    assert "pass --init identity-adapter" in capsys.readouterr().err


def test_cli_init_parts_are_applied_recorded_and_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "ablate", "random-init", "--norms", "pre", "--injections", "concat-linear",
        "--block-sizes", "2", "--seeds", "1", "--no-progress",
    ]  # fmt: skip
    out = tmp_path / "parts"
    mixed = [*args, "--out", str(out), "--init", "retrofit", "--init-parts", "embedding=huginn"]
    assert ablate_main(mixed) == 0
    assert json.loads((out / "sweep.json").read_text())["init_parts"] == [["embedding", "huginn"]]
    cell = json.loads((out / "cells" / "pre-concat-linear-k2-s0.json").read_text())
    assert cell["init"] == "retrofit+embedding=huginn"
    assert "embedding weights as in huginn" in (out / "table.md").read_text()
    plain = tmp_path / "plain"
    assert ablate_main([*args, "--out", str(plain), "--init", "retrofit"]) == 0
    assert "init_parts" not in json.loads((plain / "sweep.json").read_text())
    other = json.loads((plain / "cells" / "pre-concat-linear-k2-s0.json").read_text())
    # the embedding (Z0 = X) is the only difference, and it changes what the stack does
    assert other["init"] == "retrofit" and other["injection_ratio"] != cell["injection_ratio"]
    capsys.readouterr()
    assert ablate_main([*args, "--out", str(out), "--init-parts", "embedding=xavier"]) == 2
    assert "--init-parts: init part 'embedding=xavier' is not KIND=SCHEME" in (
        capsys.readouterr().err
    )
    longer = tmp_path / "longer"
    assert ablate_main([*args, "--out", str(longer), "--recurrences", "24"]) == 0
    assert json.loads((longer / "sweep.json").read_text())["recurrences"] == 24
    longer_cell = json.loads((longer / "cells" / "pre-concat-linear-k2-s0.json").read_text())
    assert len(longer_cell["norm_curve"]) == 24 and len(longer_cell["step_curve"]) == 23
    capsys.readouterr()
    assert ablate_main([*args, "--out", str(longer), "--recurrences", "1"]) == 2
    assert "--recurrences must be ≥ 2" in capsys.readouterr().err
    refused = [*args, "--out", str(tmp_path / "x"), "--init", "identity-adapter"]
    assert ablate_main([*refused, "--init-parts", "embedding=huginn"]) == 2
    assert "identity-adapter is LoopLM's own start" in capsys.readouterr().err
