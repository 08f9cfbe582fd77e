"""Cost of a stages-of-inference pass against a plain forward pass of the same model.

The stages pass is what :func:`loopscope.studies.stages.stages_profile` does per prompt: the
engine with eager attention (probabilities materialised) feeding a StagesAccumulator. The plain
pass is the same engine with PyTorch's fused attention and no probes. Both run over the same
prompts (batch 1) in the same process, interleaved, several times; medians are compared.

    python benchmarks/stages_overhead.py                 # demo model, bundled prompts
    python benchmarks/stages_overhead.py --threads 1 --breakdown
    python benchmarks/stages_overhead.py --model runs/demo-looped --repeats 7

Target: ratio ≤ 1.5 on CPU. Measured on the project's 2-core machine with ``--threads 1``:
2.09x on the bundled demo (width 96), 1.15x on an untrained ``study-2-4x4-2`` (width 512,
``--model`` a saved checkpoint, ``--limit 8``). The metrics cost about the same per layer
application whatever the width (the float64 eigendecomposition behind the matrix entropy,
the entropy of every attention row, eager attention), so they weigh heavily only on tiny
models. ``--breakdown`` prints the per-metric cost.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from _demo import PROMPTS, demo_model  # noqa: E402

from loopscope.analysis import stages as st  # noqa: E402
from loopscope.engine.contract import LoopedLM  # noqa: E402
from loopscope.engine.probes import CaptureProbe  # noqa: E402
from loopscope.pipeline import prompt_inputs  # noqa: E402
from loopscope.trace.settings import PromptInput  # noqa: E402

TARGET = 1.5


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_plain(model: LoopedLM, ids: list[torch.Tensor], recurrences: int) -> None:
    with torch.no_grad():
        for x in ids:
            model(x, recurrences=recurrences)
    sync(ids[0].device)


def run_eager(model: LoopedLM, ids: list[torch.Tensor], recurrences: int) -> None:
    """Engine with eager attention but no probe: the part of the overhead that is not metrics."""
    with torch.no_grad():
        for x in ids:
            model(x, recurrences=recurrences, return_attn=True)
    sync(ids[0].device)


def run_stages(model: LoopedLM, ids: list[torch.Tensor], recurrences: int) -> None:
    acc = st.StagesAccumulator()
    with torch.no_grad():
        for x in ids:
            model(x, recurrences=recurrences, probes=[acc], return_attn=True)
    acc.result()  # one device→host transfer: also waits for the device


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def medians(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) time per run, interleaving runs within each repeat so that drift and
    other processes' load hit every run alike."""
    for fn in runs.values():  # warm-up: allocator, rotary tables, kernels
        fn()
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    return {
        k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
        for k, v in times.items()
    }


def breakdown(model: LoopedLM, prompts: list[PromptInput], recurrences: int, repeats: int) -> None:
    """Time each metric on captured states of every site (as the accumulator calls them)."""
    per_prompt: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
    device = next(model.parameters()).device
    for p in prompts:
        cap = CaptureProbe(attention=True)
        with torch.no_grad():
            model(
                torch.tensor([p.ids], device=device),
                recurrences=recurrences,
                probes=[cap],
                return_attn=True,
            )
        per_prompt.append(
            (
                [h.to(device) for h in cap.states.values()],
                [a.to(device) for a in cap.attn.values()],
            )
        )
    metric_fns: dict[str, Callable[[Any], Any]] = {
        "matrix_entropy": lambda h: st.matrix_entropy(h),
        "residual_norm": st.residual_norm,
        "massive_ratio": st.massive_ratio,
        "colsum_concentration": lambda a: st.colsum_concentration(a).mean(-1),
        "sink_rate": lambda a: st.sink_rate(a),
        "sink_score": lambda a: st.sink_scores(a)[..., 0].mean(-1),
        "mixing": lambda a: st.mixing_score(a).mean(-1),
    }
    print("per-metric time over all sites and prompts (median of repeats):")
    for name, fn in metric_fns.items():
        on_attn = name in st.ATTENTION_METRICS

        def run(fn: Callable[[Any], Any] = fn, on_attn: bool = on_attn) -> None:
            for states, attns in per_prompt:
                for t in attns if on_attn else states:
                    fn(t).double().sum()
            sync(device)

        wall, cpu = medians({name: run}, repeats)[name]
        print(f"  {name:22s} wall {1000 * wall:8.1f} ms   cpu {1000 * cpu:8.1f} ms")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint dir or bundled name (default: the demo)")
    ap.add_argument("--prompts", default=str(PROMPTS))
    ap.add_argument("--limit", type=int, help="only the first N prompts")
    ap.add_argument("--recurrences", type=int, help="default: the model's training count")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--breakdown", action="store_true", help="also time each metric")
    ap.add_argument("--device", default="cpu", help="cpu (the target) or cuda")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, what = demo_model(args.model)
    model.eval().to(args.device)
    recurrences = args.recurrences or model.meta.train_recurrences
    prompts = prompt_inputs(args.prompts, limit=args.limit)
    ids = [torch.tensor([p.ids], device=args.device) for p in prompts]
    lengths = [len(p.ids) for p in prompts]
    print(f"model: {what}; layout {model.meta.layout} with {recurrences} recurrences")
    print(
        f"prompts: {len(prompts)} from {args.prompts} ({min(lengths)}-{max(lengths)} tokens); "
        f"device {args.device}; threads {torch.get_num_threads()}; {args.repeats} repeats, median"
    )
    t = medians(
        {
            "plain (fused attention)": lambda: run_plain(model, ids, recurrences),
            "eager attention, no probe": lambda: run_eager(model, ids, recurrences),
            "stages (eager + accumulator)": lambda: run_stages(model, ids, recurrences),
        },
        args.repeats,
    )
    for name, (wall, cpu) in t.items():
        print(f"  {name:30s} wall {1000 * wall:8.1f} ms   cpu {1000 * cpu:8.1f} ms")
    stages, plain = t["stages (eager + accumulator)"], t["plain (fused attention)"]
    ratio = stages[0] / plain[0]
    verdict = "meets" if ratio <= TARGET else "misses"
    print(f"stages / plain = {ratio:.2f}x wall-clock ({verdict} the {TARGET}x target)")
    print(
        f"stages / plain = {stages[1] / plain[1]:.2f}x process CPU time "
        "(robust to other processes' load when --threads 1)"
    )
    if args.breakdown:
        breakdown(model, prompts, recurrences, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
