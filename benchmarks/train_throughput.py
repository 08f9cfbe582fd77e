"""Training tokens/s of the looped demo model against a feedforward model of the same realised
depth (same FLOPs per token), measured side by side in one run and printed as a ratio.

    python benchmarks/train_throughput.py [--steps 6] [--threads 2]

Target: looped / feedforward ≥ 0.9 (recurrence should cost nothing beyond its layers).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from loopscope.families.looplm import LoopLM
from loopscope.training.named_configs import get_config
from loopscope.training.objective import batch_for_step, training_loss


def step_seconds(model: LoopLM, steps: int, cfg_name: str) -> tuple[float, int]:
    """Median seconds per optimizer step and tokens per step, on fixed batches."""
    named = get_config(cfg_name)
    cfg = named.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids, mask = batch_for_step(0, cfg, model.meta.context_length)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = training_loss(model, ids, mask, model.meta.train_recurrences, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), int(mask.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    looped_cfg = get_config("demo-looped").model.with_(train_recurrences=4)
    depth = looped_cfg.prelude_layers + 4 * looped_cfg.block_layers + looped_cfg.coda_layers
    ff_cfg = get_config("demo-feedforward").model.with_(block_layers=depth, name="ff-same-depth")
    looped, ff = LoopLM(looped_cfg), LoopLM(ff_cfg)
    # Interleave the two so machine noise hits both alike.
    rounds = [
        (
            step_seconds(looped, args.steps, "demo-looped"),
            step_seconds(ff, args.steps, "demo-feedforward"),
        )
        for _ in range(3)
    ]
    looped_s = statistics.median(r[0][0] for r in rounds)
    ff_s = statistics.median(r[1][0] for r in rounds)
    tokens = rounds[0][0][1]
    print(f"realised depth {depth} layers, width {looped_cfg.d_model}, {tokens} tokens per step")
    print(f"looped (2,{looped_cfg.block_layers}⊗4,2): {tokens / looped_s:,.0f} tokens/s")
    print(f"feedforward {depth} layers:   {tokens / ff_s:,.0f} tokens/s")
    print(f"ratio looped/feedforward throughput: {ff_s / looped_s:.3f} (target ≥ 0.9)")


if __name__ == "__main__":
    main()
