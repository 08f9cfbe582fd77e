"""Recurrences saved by per-token exit criteria at ≥ 99% top-1 agreement with full depth.

    python benchmarks/adaptive.py [--model DIR] [--recurrences 64] [--out DIR] [--device cpu]

Runs ``--model`` if given, else the bundled demo (else a fresh LoopLM of the demo config,
said so in the output) over the bundled prompts for 64 recurrences, sweeps every exit criterion
over its default thresholds and prints, per criterion, the largest fraction of recurrences saved
by a threshold that keeps ≥ 99% top-1 agreement, next to the oracle (exit each token as soon as
its top-1 never changes again). Exits are simulated from the one full-depth run (see
``loopscope.studies.adaptive``). Deterministic: zero initial state, no sampling.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _demo import PROMPTS, demo_model

from loopscope.data import ByteTokenizer, load_prompts
from loopscope.studies.adaptive import adaptive_depth_sweep, plot_adaptive, recurrences_saved_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model to use instead of the bundled demo")
    parser.add_argument("--recurrences", type=int, default=64)
    parser.add_argument("--agreement", type=float, default=0.99)
    parser.add_argument("--out", help="also write adaptive.md / .csv / .png here")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)

    model, source = demo_model(args.model, args.device)
    tokenizer = ByteTokenizer()
    texts = load_prompts(PROMPTS)
    ids = [torch.tensor(tokenizer.encode(t, bos=True)) for t in texts]
    start = time.perf_counter()
    result = adaptive_depth_sweep(model, ids, max_recurrences=args.recurrences)
    seconds = time.perf_counter() - start
    print(
        f"model: {source}; {result.n_prompts} prompts, {result.n_tokens} tokens, "
        f"{args.recurrences} recurrences ({seconds:.1f} s)\n"
    )
    print(result.to_markdown(agreement=args.agreement))
    saved = recurrences_saved_at(result, agreement=args.agreement)
    target = f"≥ {args.agreement:.0%} top-1 agreement"
    print(f"recurrences saved at {target} (full depth {args.recurrences}):")
    for crit, frac in saved.items():
        print(f"  {crit:8s} {frac:6.1%}  ({(1 - frac) * args.recurrences:.1f} recurrences used)")
    oracle = result.oracle_saved_fraction
    print(f"  {'oracle':8s} {oracle:6.1%}  ({result.oracle_mean_recurrences:.1f} recurrences used)")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "adaptive.md").write_text(result.to_markdown(agreement=args.agreement))
        (out / "adaptive.csv").write_text(result.to_csv())
        plot_adaptive(result, agreement=args.agreement).savefig(out / "adaptive.png", dpi=120)
        print(f"wrote {out}/adaptive.md, adaptive.csv, adaptive.png")


if __name__ == "__main__":
    main()
