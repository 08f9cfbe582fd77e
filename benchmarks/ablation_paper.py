"""Cost of one paper-width random-init cell, the certificate's old and new JVP paths side by side,
and a projection of the paper preset's wall time from it.

A random-init cell (``loopscope ablate random-init``) builds its stack, runs R recurrences on
the prompt batch (keeping every block state), measures the states and certifies the last state
with a spectral-radius estimate of ``spectral_iters`` Jacobian-vector products. The old path
spends one forward-mode JVP (a full block forward plus its tangent) per product; the new one
builds the block's forward and backward graph at the last state once and takes every product
from it (``loopscope.analysis.stability.retained_jvp``). Both run here on the same cell in the
same process, at reduced recurrences and iterations so the run stays short:

    python benchmarks/ablation_paper.py                       # huginn, concat-linear, 12 layers
    python benchmarks/ablation_paper.py --threads 2 --recurrences 32 --spectral-iters 20

The projection scales the measured parts to the preset: build once, forward + state measures
× 128/R, certificate × 60/iters (an upper bound: the estimate stops early when it converges,
and the new path's one-off graph build is scaled too), and layers × block size/12 for the 4-
and 16-layer stacks. It is a projection from one cell, not a measurement of the sweep, and holds
for the threads and machine load of this run.

Measured on the project's 2-core machine, one thread, while three training jobs held the cores
at a higher priority (so wall seconds are inflated; CPU seconds and ratios carry over), at width
512 on a 12-layer huginn / concat-linear cell: a block forward recurrence costs 0.24 CPU s, a
forward-mode JVP 1.02 s (4.3 recurrences), a retained-forward product 0.29 s (1.2 recurrences,
after a 0.64 s graph build). Projected to the preset, per 12-layer cell on one unloaded core:
old 96 s (certificate 64%, forward 32%, state measures 3%, build 2%), new 53 s (forward 57%,
certificate 34%, state measures 5%, build 3%), 1.8x; the six study cells × 3 seeds at blocks
4/12/16 (54 cells): old 77 min, new 42 min on one core, less with ``--threads 2`` on two.
This script at its defaults (R = 16, 10 iterations) measured 2.1x wall old/new.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from loopscope.engine.loop import prelude_output  # noqa: E402
from loopscope.families.looplm import LoopLM  # noqa: E402
from loopscope.studies.ablation import random_init as ri  # noqa: E402
from loopscope.studies.ablation.measures import BlockStates, measure_states  # noqa: E402
from loopscope.studies.ablation.presets import RANDOM_INIT_PRESETS, RandomInitPreset  # noqa: E402

#: The study's cells: the norm schemes and injections its table compares.
STUDY_NORMS = ("pre", "huginn", "ouro")
STUDY_INJECTIONS = ("none", "concat-linear")


@dataclass(frozen=True)
class Seconds:
    """Wall-clock and process CPU seconds of one step. With one thread the CPU seconds are what
    the step costs an unloaded core, whatever else runs on the machine."""

    wall: float
    cpu: float

    def __sub__(self, other: Seconds) -> Seconds:
        return Seconds(self.wall - other.wall, self.cpu - other.cpu)

    def pick(self, clock: str) -> float:
        return self.wall if clock == "wall" else self.cpu


def now() -> Seconds:
    return Seconds(time.perf_counter(), time.process_time())


@dataclass(frozen=True)
class SharedParts:
    """The parts both paths share: building the stack, then the forward with every block state
    kept plus the state measures (both ∝ recurrences)."""

    build: Seconds
    forward_and_measures: Seconds


def shared_parts(cell: ri.Cell, preset: RandomInitPreset, ids: torch.Tensor) -> SharedParts:
    start = now()
    model = LoopLM(ri.cell_config(cell, preset))
    scheme = ri.cell_init(cell.norm, preset.init)
    if scheme != "identity-adapter":
        model.reset_parameters(cell.seed, scheme)
    model.eval()
    built = now()
    probe = BlockStates(preset.recurrences, cell.block)
    with torch.no_grad():
        model(ids, recurrences=preset.recurrences, probes=[probe])
        prelude_output(model, ids)
    measure_states(probe.stacked())
    return SharedParts(built - start, now() - built)


def timed_cell(
    cell: ri.Cell, preset: RandomInitPreset, ids: torch.Tensor, retain_forward: bool
) -> tuple[Seconds, ri.CellResult]:
    start = now()
    result = ri.measure_cell(cell, preset, ids, retain_forward=retain_forward)
    return now() - start, result


def projected_parts(
    shared: SharedParts,
    cell: Seconds,
    clock: str,
    bench: RandomInitPreset,
    full: RandomInitPreset,
) -> dict[str, float]:
    """Seconds of one cell's parts (same block size) at the full preset's recurrences and
    iterations: the certificate is what the cell took beyond the shared parts."""
    build, forward = shared.build.pick(clock), shared.forward_and_measures.pick(clock)
    certificate = max(cell.pick(clock) - build - forward, 0.0)
    return {
        "build": build,
        "forward + state measures": forward * full.recurrences / bench.recurrences,
        "certificate": certificate * full.spectral_iters / bench.spectral_iters,
    }


def grid_seconds(per_cell_12: float, blocks_seeds: dict[int, int]) -> float:
    """The study's six cells at each block size × its seed count, layers scaled from 12."""
    cells = len(STUDY_NORMS) * len(STUDY_INJECTIONS)
    return sum(per_cell_12 * block / 12 * cells * seeds for block, seeds in blocks_seeds.items())


def print_projection(
    paths: dict[str, Seconds],
    shared: SharedParts,
    clock: str,
    block: int,
    bench: RandomInitPreset,
    full: RandomInitPreset,
) -> None:
    for name, cell in paths.items():
        parts = projected_parts(shared, cell, clock, bench, full)
        total = sum(parts.values())
        shares = ", ".join(f"{part} {100 * t / total:.0f}%" for part, t in parts.items())
        per_cell = total * 12 / block
        all_blocks = grid_seconds(per_cell, {4: 3, 12: 3, 16: 3})
        twelve_first = grid_seconds(per_cell, {4: 1, 12: 3, 16: 1})
        print(f"  {name}: cell parts {shares}")
        print(
            f"  {name}: 12-layer cell {per_cell / 60:.1f} min; study cells × 3 seeds at blocks "
            f"4/12/16: {all_blocks / 60:.0f} min; 12 × 3 seeds + 4 and 16 × 1 seed: "
            f"{twelve_first / 60:.0f} min"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recurrences", type=int, default=16)
    p.add_argument("--spectral-iters", type=int, default=10)
    p.add_argument("--block", type=int, default=12)
    p.add_argument("--norm", default="huginn", choices=STUDY_NORMS)
    p.add_argument("--injection", default="concat-linear", choices=STUDY_INJECTIONS)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    full = RANDOM_INIT_PRESETS["paper"]
    bench = replace(full, recurrences=args.recurrences, spectral_iters=args.spectral_iters)
    cell = ri.Cell(args.norm, args.injection, args.block, 0)
    ids, _ = ri.bundled_prompt_ids(bench.prompts, bench.prompt_tokens)
    print(
        f"cell {cell.key}: width {bench.d_model}, {bench.prompts}×{bench.prompt_tokens} tokens, "
        f"R = {bench.recurrences}, {bench.spectral_iters} spectral iterations, "
        f"{threads} torch threads"
    )
    shared = shared_parts(cell, bench, ids)
    old_s, old = timed_cell(cell, bench, ids, retain_forward=False)
    new_s, new = timed_cell(cell, bench, ids, retain_forward=True)
    paths = {"old": old_s, "new": new_s}
    print(
        f"  build {shared.build.wall:.1f} s, forward + state measures "
        f"{shared.forward_and_measures.wall:.1f} s (wall)"
    )
    for name, secs in (("old (a forward-mode JVP per product)", old_s), ("new", new_s)):
        print(f"  {name:38s} cell {secs.wall:6.1f} s wall, {secs.cpu:6.1f} s CPU")
    print(f"  ratio old/new: {old_s.wall / new_s.wall:.2f}x wall, {old_s.cpu / new_s.cpu:.2f}x CPU")
    drift = abs(new.radius - old.radius) / max(abs(old.radius), 1e-30)
    same = (old.verdict, old.certificate) == (new.verdict, new.certificate)
    print(
        f"  radius old {old.radius:.6f}, new {new.radius:.6f} (relative difference {drift:.1e}); "
        f"verdicts {'agree' if same else 'DIFFER'}: {new.verdict}, certificate {new.certificate}"
    )
    print(
        f"PROJECTION (not a measurement) to R = {full.recurrences}, {full.spectral_iters} "
        f"iterations, from wall seconds at {threads} threads and this run's machine load:"
    )
    print_projection(paths, shared, "wall", args.block, bench, full)
    if threads == 1:
        print(
            "PROJECTION (not a measurement) from CPU seconds, i.e. one unloaded core; on 2 "
            "cores with --threads 2 the wall time is at best half of these:"
        )
        print_projection(paths, shared, "cpu", args.block, bench, full)
    return 0


if __name__ == "__main__":
    sys.exit(main())
