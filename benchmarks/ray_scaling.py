"""Throughput of tracing sharded over Ray: 2 single-threaded workers against 1.

The same prompts (the bundled demo prompts, cycled to ``--prompts N``) are traced through the
bundled demo model by ``loopscope.trace.sharding.trace_distributed`` on a local Ray cluster of
``num_cpus=2``, with at most 1 and then at most 2 shards running at once (same shard size),
each into a fresh directory. Every worker uses one torch thread. Workers load the model once
(a warm-up trace first, not timed), so what is compared is tracing, not start-up. Runs are
interleaved over ``--repeats`` and the best wall time of each kind is kept (the least disturbed
by other processes on a shared machine); the 1-minute load averages are printed, and so are the
CPU cores the whole Ray process tree actually obtained during each best run (CPU seconds of the
driver and its descendants over wall seconds, from /proc): on a busy machine the ratio cannot
exceed what the scheduler grants, and that column tells the two apart.

    python benchmarks/ray_scaling.py                     # 24 prompts, R=32, 3 repeats
    python benchmarks/ray_scaling.py --prompts 48 --repeats 5

Target: throughput(2 workers) / throughput(1 worker) ≥ 1.6 on 2 otherwise idle cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from loopscope.pipeline import prompt_inputs  # noqa: E402
from loopscope.trace.settings import PromptInput, TraceSettings  # noqa: E402
from loopscope.trace.sharding import trace_distributed  # noqa: E402

PROMPTS = ROOT / "src" / "loopscope" / "assets" / "prompts" / "demo.jsonl"
TARGET = 1.6


def cycled_prompts(n: int) -> list[PromptInput]:
    base = prompt_inputs(PROMPTS)
    return [base[i % len(base)] for i in range(n)]


def tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process and its live descendants (raylet, GCS, Ray
    workers); NaN where /proc is not there."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid = int(stat.parent.name)
        parents[pid] = int(fields[1])
        used[pid] = (int(fields[11]) + int(fields[12])) / tick
    if not used:
        return float("nan")
    tree = {os.getpid()}
    grew = True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return sum(used.get(pid, 0.0) for pid in tree)


def timed_trace(
    prompts: list[PromptInput], settings: TraceSettings, workers: int, shard_size: int
) -> tuple[float, float]:
    """Wall seconds to trace every prompt into a fresh directory, and the CPU cores the Ray
    process tree obtained meanwhile."""
    out = Path(tempfile.mkdtemp(prefix=f"ray-scaling-{workers}w-"))
    try:
        cpu = tree_cpu_seconds()
        start = time.perf_counter()
        store = trace_distributed(
            "demo", prompts, out, settings, workers=workers, shard_size=shard_size, progress=False
        )
        wall = time.perf_counter() - start
        cores = (tree_cpu_seconds() - cpu) / wall
        assert len(store) == len(prompts)
        return wall, cores
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    import ray

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=24, help="how many prompts to trace")
    ap.add_argument("--recurrences", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    settings = TraceSettings(recurrences=args.recurrences, stability_prompts=0)
    prompts = cycled_prompts(args.prompts)
    env = {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env}
    )
    try:
        timed_trace(prompts[:4], settings, 2, 1)  # both workers load the model
        load_before = os.getloadavg()[0]
        walls: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
        for _ in range(args.repeats):
            for workers in (1, 2):
                walls[workers].append(timed_trace(prompts, settings, workers, args.shard_size))
        load_after = os.getloadavg()[0]
    finally:
        ray.shutdown()
    tokens = sum(len(p.ids) for p in prompts)
    print(
        f"demo model, {len(prompts)} prompts ({tokens} tokens), R={args.recurrences}, "
        f"shard size {args.shard_size}, local Ray cluster num_cpus=2, 1 torch thread per worker"
    )
    print(f"1-min load average: {load_before:.2f} before, {load_after:.2f} after (2 cores)")
    best = {w: min(v) for w, v in walls.items()}
    for workers, (wall, cores) in best.items():
        runs = ", ".join(f"{t:.2f}" for t, _ in walls[workers])
        print(
            f"  {workers} worker{'s' if workers > 1 else ' '}: best {wall:6.2f} s "
            f"({len(prompts) / wall:5.2f} prompts/s, {cores:.2f} cores obtained; runs {runs} s)"
        )
    ratio = best[1][0] / best[2][0]
    verdict = "meets" if ratio >= TARGET else "misses"
    print(f"throughput 2 workers / 1 worker = {ratio:.2f}x ({verdict} the {TARGET}x target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
