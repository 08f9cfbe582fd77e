"""The two resumable sweeps as one call each: compute the cells not yet on disk, then write
the tables and report (or keep those on disk when nothing changed)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from loopscope.studies.ablation.presets import RandomInitPreset, TrainedPreset, bundled_prompts_path
from loopscope.studies.ablation.random_init import (
    CellResult,
    bundled_prompt_ids,
    random_init_grid,
    run_cell,
)
from loopscope.studies.ablation.random_init_outputs import write_random_init_outputs
from loopscope.studies.ablation.store import CellStore, SweepRun, finish_sweep, write_result
from loopscope.studies.ablation.trained import TrainedResult, run_trained_cell, trained_grid
from loopscope.studies.ablation.trained_outputs import write_trained_outputs


def run_random_init(
    out_dir: str | Path,
    preset: RandomInitPreset,
    *,
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> SweepRun:
    """Run (or resume) the random-init sweep into ``out_dir`` and write ``table.md``,
    ``table.csv``, ``report.html`` (+ ``figures/``, ``metrics.json``) and ``cells/*.json``."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    grid = random_init_grid(preset)
    ids, texts = bundled_prompt_ids(preset.prompts, preset.prompt_tokens)
    store = CellStore(out_dir, {"kind": "random-init", **preset.measurement()})
    todo = [c for c in grid if not store.done(c.key)]
    if len(todo) < len(grid):
        log(f"resuming: {len(grid) - len(todo)} of {len(grid)} cells already done in {out_dir}")
    computed: list[str] = []
    for cell in tqdm(todo, desc="random-init cells", disable=not progress):
        result = run_cell(cell, preset, ids, device=device)
        if result.error:
            log(f"cell {cell.key} failed and is recorded as not stable: {result.error}")
        store.save_json(cell.key, result.to_json())
        computed.append(cell.key)
    results = [CellResult.from_json(store.load_json(c.key)) for c in grid]
    elapsed = time.perf_counter() - start
    out = Path(out_dir)
    return finish_sweep(
        out,
        [c.key for c in grid],
        results,
        computed,
        elapsed,
        lambda: write_random_init_outputs(out, results, preset, elapsed, texts),
    )


def run_trained(
    out_dir: str | Path,
    preset: TrainedPreset,
    *,
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> SweepRun:
    """Run (or resume) the trained sweep: every cell trains into ``out/cells/NAME`` (training
    resumes by itself), and ``cells/NAME/result.json`` marks a cell finished."""
    from loopscope.pipeline import prompt_inputs

    start = time.perf_counter()
    out = Path(out_dir)
    grid = trained_grid(preset)
    prompts = prompt_inputs(bundled_prompts_path(), limit=preset.prompts)
    store = CellStore(out, {"kind": "trained", **preset.measurement()})
    computed: list[str] = []
    for cell in grid:
        cell_dir = store.cell_dir(cell.name)
        done = cell_dir / "result.json"
        if done.exists():
            continue
        log(f"cell {cell.name}: training and analysing")
        cell_dir.mkdir(parents=True, exist_ok=True)
        result = run_trained_cell(
            cell, preset, cell_dir, prompts, device=device, progress=progress, log=log
        )
        write_result(done, asdict(result))
        computed.append(cell.name)
    results = [
        TrainedResult.from_json(json.loads((store.cell_dir(c.name) / "result.json").read_text()))
        for c in grid
    ]
    elapsed = time.perf_counter() - start
    return finish_sweep(
        out,
        [c.name for c in grid],
        results,
        computed,
        elapsed,
        lambda: write_trained_outputs(out, results, preset, elapsed),
    )
