"""Prompts per second of batched tracing, side by side with one prompt at a time and with a
plain batched forward pass of the same model, in one run.

Runs over the same prompts, timed interleaved (medians of ``--repeats``, after a warm-up):

* plain     — ``model(ids, recurrences=R)`` on right-padded batches grouped by length, no probe;
* online    — the same batches feeding every prompt its own online probes (the dynamics
  reductions tracing keeps; fused attention);
* +stages   — online plus the stages-of-inference metrics (eager attention);
* one       — ``trace_prompts(..., batch_size=1)``: full capture written to disk, one prompt
  per forward pass;
* batched   — ``trace_prompts(..., batch_size=N)``, the same trace.

    python benchmarks/trace_scale.py                       # demo model, batch 8, on the CPU
    python benchmarks/trace_scale.py --prompts 8 --repeats 1 --recurrences 8   # a quick look
    python benchmarks/trace_scale.py --device cuda --huginn-shape    # the study's protocol

CPU targets (demo model, batch 8): batched ≥ 2× one-at-a-time; online ≤ 1.10× plain.
``--huginn-shape`` (CUDA only) builds random bf16 weights at Huginn-0125's shape (width 5280,
55 heads, (2, 4, 2), vocabulary 65,536), times the study's protocol — 256 prompts of ~150
tokens at 128 recurrences, traced as ``loopscope trace`` would (``--capture auto`` falls back
to summary capture there: full states would take ~250 GB) — and prints its time against the
FLOP lower bound at ``--peak-tflops`` (default 989: an H200's dense bf16 peak). GPU targets:
online ≤ 1.05× plain, full capture ≤ 1.15×, the whole run ≤ 2× the FLOP bound.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _demo import PROMPTS, demo_model  # noqa: E402

from loopscope.engine.contract import LoopedLM  # noqa: E402
from loopscope.trace.settings import PromptInput, TraceSettings  # noqa: E402

#: An H200 SXM's dense bf16 peak (TFLOP/s, no sparsity), the default of ``--peak-tflops``.
H200_BF16_DENSE_TFLOPS = 989.0
CPU_TARGETS = {"batched vs one-at-a-time": 2.0, "online probes vs plain forward": 1.10}
GPU_TARGETS = {"online": 1.05, "full": 1.15, "flop bound": 2.0}


# ----------------------------------------------------------------------------- inputs
def demo_prompts(count: int) -> list[PromptInput]:
    """The bundled problems, repeated to ``count``, tokenised for the demo model."""
    from loopscope.pipeline import prompt_inputs

    bundled = prompt_inputs(PROMPTS)
    return [bundled[i % len(bundled)] for i in range(count)]


def random_prompts(count: int, vocab: int, mean_tokens: int, seed: int = 0) -> list[PromptInput]:
    """``count`` prompts of seeded random ids, lengths spread ±20 tokens around the mean."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(mean_tokens - 20, mean_tokens + 21, (count,), generator=gen)
    return [
        PromptInput(f"random {i}", torch.randint(0, vocab, (int(n),), generator=gen).tolist())
        for i, n in enumerate(lengths)
    ]


def padded_batches(
    prompts: Sequence[PromptInput], batch: int, device: str
) -> list[tuple[Tensor, list[int]]]:
    """Right-padded (ids, lengths) batches, prompts grouped by length like batched tracing."""
    ordered = sorted(prompts, key=lambda p: len(p.ids))
    out = []
    for start in range(0, len(ordered), batch):
        group = ordered[start : start + batch]
        lengths = [len(p.ids) for p in group]
        ids = torch.zeros(len(group), max(lengths), dtype=torch.long)
        for row, p in enumerate(group):
            ids[row, : len(p.ids)] = torch.tensor(p.ids)
        out.append((ids.to(device), lengths))
    return out


# ----------------------------------------------------------------------------- runs
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def forward_runs(
    model: LoopedLM, batches: list[tuple[Tensor, list[int]]], recurrences: int
) -> dict[str, Callable[[], None]]:
    """plain, online and online + stages over the same padded batches, each batch's probes
    reading every row in one pass as batched tracing does (every prompt's own summaries)."""
    from loopscope.analysis.stages_batch import BatchStagesAccumulator
    from loopscope.engine.probes import DynamicsProbe

    layers = model.meta.block_layers

    def online(lengths: list[int]) -> list[Any]:
        return [DynamicsProbe(recurrences, layers, lengths=lengths)]

    def staged(lengths: list[int]) -> list[Any]:
        return [*online(lengths), BatchStagesAccumulator(lengths)]

    def run(probes_of: Callable[[list[int]], list[Any]] | None, attention: bool) -> None:
        with torch.no_grad():
            for ids, lengths in batches:
                if probes_of is None:
                    model(ids, recurrences=recurrences)
                    continue
                probes = probes_of(lengths)
                model(
                    ids,
                    recurrences=recurrences,
                    probes=probes,
                    return_attn=attention,
                    lengths=lengths,
                )
                for probe in probes:
                    probe.rows() if isinstance(probe, DynamicsProbe) else probe.results()

    return {
        "plain": lambda: run(None, False),
        "online": lambda: run(online, False),
        "stages": lambda: run(staged, True),
    }


def trace_run(
    model: LoopedLM, prompts: list[PromptInput], settings: TraceSettings, batch: int
) -> Callable[[], None]:
    """``trace_prompts`` into a fresh temporary directory (removed after), batch ``batch``."""
    from loopscope.trace.writer import trace_prompts

    def run() -> None:
        with tempfile.TemporaryDirectory(prefix="trace-scale-") as out:
            trace_prompts(model, prompts, out, settings, progress=False, batch_size=batch)

    return run


def medians(runs: dict[str, Callable[[], None]], repeats: int, device: str) -> dict[str, float]:
    """Median wall seconds per run, runs interleaved within each repeat, after one warm-up."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


# ----------------------------------------------------------------------------- report
def ratio_lines(seconds: dict[str, float], n_prompts: int, n_one: int) -> list[str]:
    """The ratios, one per line; ``batched vs one-at-a-time`` compares prompts/s."""
    per_s = {k: (n_one if k == "one" else n_prompts) / v for k, v in seconds.items()}
    lines = [f"{k:>8}: {v:8.3f} s  {per_s[k]:8.2f} prompts/s" for k, v in seconds.items()]
    lines += [
        f"batched vs one-at-a-time: {per_s['batched'] / per_s['one']:.2f}x",
        f"online probes vs plain forward: {seconds['online'] / seconds['plain']:.2f}x",
        f"full capture vs plain forward: {seconds['batched'] / seconds['plain']:.2f}x",
        f"stages metrics cost: {seconds['stages'] / seconds['online']:.2f}x the online probes",
    ]
    return lines


def run_demo(args: argparse.Namespace) -> None:
    model, what = demo_model(args.model, device=args.device)
    model.eval()
    prompts = demo_prompts(args.prompts)
    settings = TraceSettings(
        recurrences=args.recurrences, capture="full", attention=False, stability_prompts=0
    )
    runs = forward_runs(model, padded_batches(prompts, args.batch, args.device), args.recurrences)
    one = prompts  # the same prompts: a subset of other lengths would bias prompts/s
    runs["one"] = trace_run(model, one, settings, 1)
    runs["batched"] = trace_run(model, prompts, settings, args.batch)
    print(f"model: {what}; {len(prompts)} prompts, batch {args.batch}, R={args.recurrences}")
    seconds = medians(runs, args.repeats, args.device)
    for line in ratio_lines(seconds, len(prompts), len(one)):
        print(line)
    print(f"CPU targets: {CPU_TARGETS}")


def run_huginn(args: argparse.Namespace) -> None:
    """The study's protocol at Huginn-0125's shape (CUDA only)."""
    if not args.device.startswith("cuda") or not torch.cuda.is_available():
        raise SystemExit(
            "--huginn-shape needs a CUDA device (a 3.5 B-parameter bf16 model at 128 "
            "recurrences): run it on a GPU with --device cuda"
        )
    from trace_overhead import huginn_model

    from loopscope.trace.budget import flop_seconds, forward_flops, shape_of
    from loopscope.trace.plan import plan_trace
    from loopscope.trace.writer import trace_prompts

    model, what = huginn_model(1.0, torch.bfloat16, args.device)
    model.eval()
    prompts = random_prompts(args.prompts, model.meta.vocab_size, args.tokens)
    protocol = TraceSettings(recurrences=args.recurrences)  # auto capture, as the CLI runs it
    plan = plan_trace(model, prompts, protocol, batch_size=args.batch)
    batch = plan.batch_size
    print(f"model: {what}\n{len(prompts)} prompts of ~{args.tokens} tokens, R={args.recurrences}")
    for line in plan.messages():
        print(line)
    # the ratios on a subset (full states of 256 prompts would not fit on the disk)
    few = prompts[: args.subset]
    full = TraceSettings(
        recurrences=args.recurrences, capture="full", attention=False, stability_prompts=0
    )
    runs = forward_runs(model, padded_batches(few, batch, args.device), args.recurrences)
    one = few[: max(1, len(few) // 4)]
    runs["one"] = trace_run(model, one, full, 1)
    runs["batched"] = trace_run(model, few, full, batch)
    seconds = medians(runs, args.repeats, args.device)
    for line in ratio_lines(seconds, len(few), len(one)):
        print(line)
    # the whole protocol, once
    with tempfile.TemporaryDirectory(prefix="trace-scale-protocol-") as out:
        sync(args.device)
        start = time.perf_counter()
        trace_prompts(model, prompts, out, plan.settings, progress=False, batch_size=batch)
        sync(args.device)
        wall = time.perf_counter() - start
    passes = 1 if plan.settings.capture == "full" else 2  # summary: find X*, then measure
    flops = passes * forward_flops(shape_of(model), [len(p.ids) for p in prompts], args.recurrences)
    bound = flop_seconds(flops, args.peak_tflops)
    print(f"protocol ({plan.settings.capture} capture, {passes} passes): {wall:.1f} s")
    print(f"FLOP lower bound at {args.peak_tflops:g} TFLOP/s: {bound:.1f} s ({flops:.3g} FLOP)")
    print(f"protocol vs FLOP bound: {wall / bound:.2f}x")
    print(f"GPU targets: {GPU_TARGETS}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint (default: the bundled demo)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, help="default 16 (demo), 256 (--huginn-shape)")
    parser.add_argument("--batch", default="8", help="prompts per forward, or auto")
    parser.add_argument("--recurrences", type=int, help="default 32 (demo), 128 (Huginn)")
    parser.add_argument("--repeats", type=int, help="default 3 (demo), 1 (--huginn-shape)")
    parser.add_argument("--huginn-shape", action="store_true")
    parser.add_argument("--tokens", type=int, default=150, help="--huginn-shape: mean length")
    parser.add_argument(
        "--subset", type=int, default=16, help="--huginn-shape: prompts the ratios are timed on"
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=H200_BF16_DENSE_TFLOPS,
        help="the device's dense peak for the FLOP bound (default 989: H200 bf16)",
    )
    args = parser.parse_args(argv)
    args.batch = args.batch if args.batch == "auto" else int(args.batch)
    if args.huginn_shape:
        args.prompts = args.prompts or 256
        args.recurrences = args.recurrences or 128
        args.repeats = args.repeats or 1
        run_huginn(args)
        return
    if args.batch == "auto":
        raise SystemExit("--batch auto is for --huginn-shape; give the demo a number")
    args.prompts = args.prompts or 16
    args.recurrences = args.recurrences or 32
    args.repeats = args.repeats or 3
    run_demo(args)


if __name__ == "__main__":
    main()
