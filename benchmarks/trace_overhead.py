"""Cost of tracing with the online probes against a plain forward pass of the same model.

Three runs of the same engine over the same inputs, timed interleaved in one process (several
repeats, medians compared, so load from other processes hits all three alike):

* plain  — ``model(ids, recurrences=R)`` under no_grad, fused attention, no probe;
* online — the same with :class:`DynamicsProbe` (``track_attention=False``, so the fused
  attention path is kept), its ``result()`` included (that is where it meets the host);
* naive  — the same with a probe that copies every state to the host and keeps it in a list,
  what per-layer forward hooks calling ``.cpu()`` do (on a CPU model ``.cpu()`` would return
  the tensor itself, so the copy is forced: it stands for the host transfer).

    python benchmarks/trace_overhead.py                    # demo model, bundled prompts, R=32
    python benchmarks/trace_overhead.py --model runs/demo-looped --repeats 9
    python benchmarks/trace_overhead.py --device cuda --huginn-shape   # GPU, Huginn-0125 shape
    python benchmarks/trace_overhead.py --huginn-shape --scale 0.05 --batch 1 --tokens 64

Targets: online / plain ≤ 1.10 on CPU with the demo model; ≤ 1.05 on a GPU with a
Huginn-0125-shaped random bf16 model (width 5280, 55 heads, (2, 4⊗32, 2), batch 4 × 512).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from _demo import PROMPTS, demo_model  # noqa: E402

from loopscope.engine.contract import LoopedLM  # noqa: E402
from loopscope.engine.probes import DynamicsProbe  # noqa: E402
from loopscope.engine.sites import Site  # noqa: E402

CPU_TARGET, GPU_TARGET = 1.10, 1.05

#: Huginn-0125's published shape (the raven loader's defaults); vocabulary and MLP width too.
HUGINN_SHAPE: dict[str, Any] = {
    "model_type": "huginn_raven",
    "architectures": ["RavenForCausalLM"],
    "n_embd": 5280,
    "n_heads": 55,
    "intermediate_size": 17920,
    "padded_vocab_size": 65536,
    "n_layers_in_prelude": 2,
    "n_layers_in_recurrent_block": 4,
    "n_layers_in_coda": 2,
    "mean_recurrence": 32,
    "block_size": 4096,
    "tie_embeddings": True,
    "qk_bias": True,
    "rope_base": 50000.0,
    "norm_eps": 1e-6,
}


# ----------------------------------------------------------------------------- probes
class HostCopyProbe:
    """The naive baseline: every state (all sites, all stages) copied to host memory."""

    wants_attention = False

    def __init__(self) -> None:
        self.states: list[Tensor] = []

    def observe(self, site: Site, hidden: Tensor, attn: Tensor | None) -> None:
        self.states.append(hidden.detach().to("cpu", copy=True))


class PerRowDynamics:
    """One DynamicsProbe per batch row (the probe summarises one prompt), so a batched run is
    traced in full rather than only its first prompt."""

    def __init__(self, batch: int, recurrences: int, block_layers: int) -> None:
        self.rows = [DynamicsProbe(recurrences, block_layers) for _ in range(batch)]
        self.wants_attention = False

    def observe(self, site: Site, hidden: Tensor, attn: Tensor | None) -> None:
        for i, probe in enumerate(self.rows):
            probe.observe(site, hidden[i : i + 1], None)

    def result(self) -> list[Any]:
        return [probe.result() for probe in self.rows]


# ----------------------------------------------------------------------------- models
def huginn_config(scale: float) -> dict[str, Any]:
    """Huginn-0125's config with widths (not head size or layer counts) times ``scale``."""
    config = dict(HUGINN_SHAPE)
    if scale != 1.0:
        head_dim = HUGINN_SHAPE["n_embd"] // HUGINN_SHAPE["n_heads"]
        heads = max(1, round(HUGINN_SHAPE["n_heads"] * scale))
        config["n_heads"] = heads
        config["n_embd"] = heads * head_dim
        config["intermediate_size"] = max(16, round(HUGINN_SHAPE["intermediate_size"] * scale))
        config["padded_vocab_size"] = max(256, round(HUGINN_SHAPE["padded_vocab_size"] * scale))
    return config


def huginn_model(scale: float, dtype: torch.dtype, device: str) -> tuple[LoopedLM, str]:
    """A random RavenLM of Huginn-0125's shape, built directly in ``dtype`` on ``device``."""
    from loopscope.families.raven import RavenLM, raven_config_from_dict

    config = raven_config_from_dict(huginn_config(scale), "huginn", name="huginn-shaped")
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = RavenLM(config)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():  # embeddings at Huginn's init scale, not N(0, 1) times √d
        cast(torch.nn.Embedding, model.transformer["wte"]).weight.normal_(0.0, config.state_std)
    n = sum(p.numel() for p in model.parameters())
    what = (
        f"random Huginn-0125-shaped RavenLM (width {config.n_embd}, {config.n_heads} heads, "
        f"MLP {config.intermediate_size}, vocab {config.vocab_size}; {n / 1e9:.2f} B params, "
        f"{dtype})"
    )
    return model, what


# ----------------------------------------------------------------------------- timing
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], device: str) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call, the device drained on both sides."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def medians(
    runs: dict[str, Callable[[], None]], repeats: int, device: str
) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) per run; runs interleaved within each repeat, after one warm-up."""
    for fn in runs.values():
        fn()
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn, device))
    return {
        k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
        for k, v in times.items()
    }


def make_runs(
    model: LoopedLM, batches: Sequence[Tensor], recurrences: int
) -> dict[str, Callable[[], None]]:
    """The three configurations over the same inputs."""
    layers = model.meta.block_layers

    def plain() -> None:
        with torch.no_grad():
            for ids in batches:
                model(ids, recurrences=recurrences)

    def online() -> None:
        with torch.no_grad():
            for ids in batches:
                probe: Any = (
                    DynamicsProbe(recurrences, layers)
                    if ids.shape[0] == 1
                    else PerRowDynamics(ids.shape[0], recurrences, layers)
                )
                model(ids, recurrences=recurrences, probes=[probe])
                probe.result()

    def naive() -> None:
        with torch.no_grad():
            for ids in batches:
                model(ids, recurrences=recurrences, probes=[HostCopyProbe()])

    return {"plain": plain, "online": online, "naive": naive}


def inputs(args: argparse.Namespace, model: LoopedLM, device: str) -> tuple[list[Tensor], str]:
    """Bundled prompts one at a time (demo), or seeded random tokens (Huginn shape)."""
    if args.huginn_shape:
        gen = torch.Generator().manual_seed(0)
        vocab = model.meta.vocab_size
        ids = torch.randint(0, vocab, (args.batch, args.tokens), generator=gen).to(device)
        return [ids], f"random tokens, batch {args.batch} × {args.tokens}"
    from loopscope.pipeline import prompt_inputs

    prompts = prompt_inputs(args.prompts, limit=args.limit)
    lengths = [len(p.ids) for p in prompts]
    batches = [torch.tensor([p.ids], device=device) for p in prompts]
    what = (
        f"{len(prompts)} prompts from {Path(args.prompts).name}, one at a time "
        f"({min(lengths)}-{max(lengths)} tokens)"
    )
    return batches, what


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint dir or bundled name (default: the demo)")
    ap.add_argument("--prompts", default=str(PROMPTS))
    ap.add_argument("--limit", type=int, help="only the first N prompts")
    ap.add_argument("--recurrences", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--huginn-shape", action="store_true", help="random Huginn-0125-shaped model")
    ap.add_argument("--scale", type=float, default=1.0, help="Huginn widths × this (smoke runs)")
    ap.add_argument("--batch", type=int, default=4, help="Huginn shape: batch size")
    ap.add_argument("--tokens", type=int, default=512, help="Huginn shape: tokens per row")
    ap.add_argument("--dtype", default="bfloat16", help="Huginn shape: parameter dtype")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if args.huginn_shape:
        model, what = huginn_model(args.scale, getattr(torch, args.dtype), device)
    else:
        model, what = demo_model(args.model)
        model = model.to(device)
    model.eval()
    batches, inputs_what = inputs(args, model, device)
    target = GPU_TARGET if device.startswith("cuda") else CPU_TARGET
    print(f"model: {what}")
    print(f"layout {model.meta.layout} with {args.recurrences} recurrences; device {device}")
    print(
        f"inputs: {inputs_what}; threads {torch.get_num_threads()}; "
        f"{args.repeats} repeats interleaved, median"
    )
    t = medians(make_runs(model, batches, args.recurrences), args.repeats, device)
    labels = {
        "plain": "plain forward (a)",
        "online": "online DynamicsProbe (b)",
        "naive": "naive copy-to-host (c)",
    }
    for name, (wall, cpu) in t.items():
        print(f"  {labels[name]:28s} wall {1000 * wall:9.1f} ms   cpu {1000 * cpu:9.1f} ms")
    plain, online, naive = t["plain"], t["online"], t["naive"]
    verdict = "meets" if online[0] / plain[0] <= target else "misses"
    print(
        f"online / plain (b/a) = {online[0] / plain[0]:.3f}x wall, "
        f"{online[1] / plain[1]:.3f}x process CPU ({verdict} the {target:.2f}x target)"
    )
    print(
        f"naive  / plain (c/a) = {naive[0] / plain[0]:.3f}x wall, "
        f"{naive[1] / plain[1]:.3f}x process CPU"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
