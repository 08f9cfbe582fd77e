"""Block applications to reach a relative residual of 1e-4: Anderson against plain iteration.

    python benchmarks/fixed_point.py [--model DIR] [--tol 1e-4] [--device cpu]

Measured side by side in one seeded run on
  (a) ``--model`` if given, else the bundled demo (else a fresh LoopLM of the demo config,
      said so in the output), one solve per bundled prompt;
  (b) random-init 12-layer stacks, width 128, no prelude/coda, 3 seeds, for the study's
      pre-norm + additive injection and, because that one has no finite fixed point (its
      stream grows linearly), for two bounded-state variants that do have one: Huginn's
      sandwich norm + additive injection, and pre-norm + concat-linear injection.
Columns: applications (calls of the block map) per method, their ratio, the relative
difference of the two states, 1 − per-token cosine between them, how far each lies from a tight
reference solve (Anderson, tol 1e-6; "-" for drifting maps, which have none), safeguard
fall-backs, and whether the solve is drifting (relative residual fell only because ‖z‖ grew).

Two Anderson settings are measured: the library default (memory 5, β = 1) and a setting for
slowly contracting maps (memory 20, over-relaxed β = 2), chosen on held-out seeds (10, 11, 20,
21, 22 of these stacks and demo prompts 4 and 6), never on the cases printed here. The
"krylov" column is the linearised GMRES bound (``krylov_bound``): the fewest applications
any Krylov method (Anderson, Broyden, Newton–Krylov) could need from the same start, so
plain / krylov is the largest speed-up any of them could show on that case, exactly so for an
affine map. "nonlin" says how far from affine the map is at the start (‖r0_linear − r0‖/‖r0‖):
the bound is a guide when it is small and says little when it is not (Huginn's sandwich
norm: nonlin 0.4 and a bound of 3 applications that no solver comes near).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from _demo import PROMPTS, demo_model
from torch import Tensor

from loopscope.analysis.figures_dynamics import plot_solver_convergence
from loopscope.analysis.fixed_point import (
    FixedPointResult,
    KrylovBound,
    block_map,
    krylov_bound,
    solve_fixed_point,
)
from loopscope.data import ByteTokenizer, load_prompts
from loopscope.families.looplm import LoopConfig, LoopLM
from loopscope.nn.injection import InjectionKind
from loopscope.nn.layers import NormScheme


def relative(a: Tensor, b: Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def one_minus_cos(a: Tensor, b: Tensor) -> float:
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    return float(1.0 - cos.mean())


TUNED_MEMORY, TUNED_BETA = 20, 2.0  # chosen on held-out seeds, see the module docstring


@dataclass
class Row:
    case: str
    plain: FixedPointResult
    anderson: FixedPointResult
    tuned: FixedPointResult
    reference: FixedPointResult | None
    bound: KrylovBound | None
    seconds: float

    def curves(self) -> dict[str, list[float]]:
        """Relative residual per application for each solver (the bound's is ‖r‖/‖z*‖)."""
        out = {
            "plain": self.plain.residuals,
            "Anderson m5 β1": self.anderson.residuals,
            "Anderson m20 β2": self.tuned.residuals,
        }
        if self.bound is not None:
            out["Krylov bound (GMRES, linearised)"] = self.bound.residuals
        return out

    def cells(self) -> list[str]:
        p, a, t, ref = self.plain, self.anderson, self.tuned, self.reference

        def err(r: FixedPointResult) -> str:
            return "-" if ref is None else f"{relative(r.state, ref.state):.1e}"

        def apps(r: FixedPointResult) -> str:
            return f"{r.iterations}" + ("" if r.converged else "*")

        krylov = self.bound.applications if self.bound else None
        return [
            self.case,
            apps(p),
            apps(a),
            apps(t),
            "-" if krylov is None else str(krylov),
            f"{p.iterations / a.iterations:.1f}x",
            f"{p.iterations / t.iterations:.1f}x",
            "-" if krylov is None else f"{p.iterations / krylov:.1f}x",
            "-" if self.bound is None else f"{self.bound.start_mismatch:.2f}",
            f"{relative(t.state, p.state):.1e}",
            f"{one_minus_cos(t.state, p.state):.1e}",
            err(p),
            err(a),
            err(t),
            f"{a.fell_back}/{t.fell_back}",
            f"{'y' if p.drifting else 'n'}/{'y' if a.drifting or t.drifting else 'n'}",
            f"{self.seconds:.1f}",
        ]


HEADER = [
    "case",
    "plain",
    "AA m5",
    "AA m20b2",
    "krylov",
    "ratio m5",
    "ratio m20b2",
    "max ratio",
    "nonlin",
    "rel diff",
    "1-cos",
    "plain err",
    "m5 err",
    "m20b2 err",
    "fell back",
    "drift p/a",
    "s",
]


def solve_both(
    case: str, f: Callable[[Tensor], Tensor], z0: Tensor, tol: float, max_iter: int
) -> Row:
    """Plain, default and tuned Anderson from the same z0, plus a tight reference solve and
    the Krylov bound at it (both skipped for drifting maps, which have no fixed point)."""
    start = time.perf_counter()
    plain = solve_fixed_point(f, z0, method="plain", tol=tol, max_iter=max_iter)
    anderson = solve_fixed_point(f, z0, method="anderson", tol=tol, max_iter=max_iter)
    tuned = solve_fixed_point(
        f, z0, method="anderson", tol=tol, max_iter=max_iter, memory=TUNED_MEMORY, beta=TUNED_BETA
    )
    reference, bound = None, None
    if not (plain.drifting or anderson.drifting):
        reference = solve_fixed_point(f, z0, method="anderson", tol=1e-6, max_iter=4000)
        bound = krylov_bound(f, z0, reference.state, tol=tol, max_steps=400)
    return Row(case, plain, anderson, tuned, reference, bound, time.perf_counter() - start)


def stack(scheme: NormScheme, injection: InjectionKind, seed: int) -> LoopLM:
    config = LoopConfig(
        name=f"{scheme}+{injection}",
        d_model=128,
        n_heads=4,
        prelude_layers=0,
        block_layers=12,
        coda_layers=0,
        train_recurrences=4,
        injection=injection,
        norm_scheme=scheme,
        init_state="zeros",
        init_seed=seed,
    )
    return LoopLM(config).eval()


STACKS: list[tuple[NormScheme, InjectionKind]] = [
    ("pre", "add"),
    ("huginn", "add"),
    ("pre", "concat-linear"),
]


def print_table(rows: list[Row]) -> None:
    table = [HEADER] + [r.cells() for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    for line in table:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))


def summary(label: str, rows: list[Row]) -> None:
    def ratios(pick: Callable[[Row], int | None]) -> str:
        values = [r.plain.iterations / n for r in rows if (n := pick(r))]
        if not values:
            return "-"
        return f"min {min(values):.1f}x mean {sum(values) / len(values):.1f}x"

    diffs = [relative(r.tuned.state, r.plain.state) for r in rows]
    drift = sum(r.plain.drifting or r.anderson.drifting for r in rows)
    print(
        f"{label}: plain / Anderson m5 {ratios(lambda r: r.anderson.iterations)}; "
        f"m20b2 {ratios(lambda r: r.tuned.iterations)}; "
        f"Krylov bound {ratios(lambda r: r.bound.applications if r.bound else None)} "
        f"(target ≥ 3x); rel diff m20b2 vs plain max {max(diffs):.1e} (target ≤ 1e-3); "
        f"drifting {drift}/{len(rows)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model to use instead of the bundled demo")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--max-iter", type=int, default=20000)
    parser.add_argument("--prompts", type=int, default=4, help="bundled prompts for (a)")
    parser.add_argument("--tokens", type=int, default=64, help="random tokens per stack prompt")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--figure", help="also save residual-per-application curves (first case of each group)"
    )
    names = [f"{scheme}+{injection}" for scheme, injection in STACKS]
    parser.add_argument(
        "--stacks",
        nargs="*",
        choices=names,
        default=names,
        help="stack cases for (b) (pre+add is slow: plain iteration never settles)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)

    model, source = demo_model(args.model, args.device)
    print(f"(a) demo model: {source}; tol {args.tol:g}, max {args.max_iter} applications")
    print("    (* = not converged within max-iter)")
    tokenizer = ByteTokenizer()
    rows_a = []
    for i, text in enumerate(load_prompts(PROMPTS)[: args.prompts]):
        ids = torch.tensor([tokenizer.encode(text, bos=True)], device=args.device)
        f, z0 = block_map(model, ids)
        rows_a.append(
            solve_both(f"demo prompt {i} ({ids.shape[1]} tok)", f, z0, args.tol, args.max_iter)
        )
    print_table(rows_a)
    summary("(a) demo", rows_a)

    print(f"\n(b) random 12-layer stacks, width 128, {args.tokens} random tokens, seeds 0-2")
    rows_b: dict[str, list[Row]] = {}
    cases = [case for case in STACKS if f"{case[0]}+{case[1]}" in args.stacks]
    for scheme, injection in cases:
        key = f"{scheme}+{injection}"
        for seed in range(3):
            net = stack(scheme, injection, seed).to(args.device)
            gen = torch.Generator().manual_seed(seed)
            ids = torch.randint(0, 256, (1, args.tokens), generator=gen).to(args.device)
            f, z0 = block_map(net, ids)
            rows_b.setdefault(key, []).append(
                solve_both(f"{key} seed {seed}", f, z0, args.tol, args.max_iter)
            )
    print_table([r for rows in rows_b.values() for r in rows])
    for key, rows in rows_b.items():
        summary(f"(b) {key}", rows)
    if args.figure:
        firsts = rows_a[:1] + [rows[0] for rows in rows_b.values()]
        figure = plot_solver_convergence({r.case: r.curves() for r in firsts}, tol=args.tol)
        figure.savefig(args.figure, dpi=120)
        print(f"\nfigure: {args.figure}")
    print(
        "\nDrifting maps (pre-norm + additive injection) have no finite fixed point: the stream\n"
        "grows by a bounded step every recurrence, so the relative residual falls like 1/k.\n"
        "Anderson meets the tolerance by jumping far out along the ray, at a point (and in a\n"
        "direction) the tolerance does not pin down: its ratio there is not a speed-up."
    )


if __name__ == "__main__":
    main()
