"""Write and read throughput, and bytes on disk, of the Zarr trace store against the ``.npy``
trace layout, on the demo trace and on a wide random looped model.

For each model: trace the prompts once into a ``.npy`` directory, then time, as medians of
``--repeats``,

* write — ``convert_trace`` into a fresh local Zarr store (the ``.npy`` side is the trace
  itself: its write is the tracing, so only its bytes are compared);
* read  — every stored block state of every prompt into memory, through ``TraceStore`` for
  ``.npy`` and ``xarray.open_zarr(...)["block"].values`` for Zarr;

and print MB/s, bytes on disk and the ratios Zarr / ``.npy``.

    python benchmarks/trace_store.py                      # demo model + width 2048, CPU
    python benchmarks/trace_store.py --prompts 2 --recurrences 4 --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _demo import PROMPTS, demo_model  # noqa: E402

from loopscope.engine.contract import LoopedLM  # noqa: E402
from loopscope.families.looplm import LoopConfig, LoopLM  # noqa: E402
from loopscope.pipeline import prompt_inputs  # noqa: E402
from loopscope.trace.settings import TraceSettings  # noqa: E402
from loopscope.trace.store import TraceStore  # noqa: E402
from loopscope.trace.writer import trace_prompts  # noqa: E402
from loopscope.trace.zarr_store import convert_trace  # noqa: E402


def wide_model(width: int) -> LoopLM:
    """A random looped model of the demo's layout at ``width`` (heads of 128)."""
    config = LoopConfig(
        name=f"wide-{width}",
        vocab_size=259,
        d_model=width,
        n_heads=max(1, width // 128),
        prelude_layers=1,
        block_layers=2,
        coda_layers=1,
        train_recurrences=4,
        context_length=256,
    )
    return LoopLM(config).eval()


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def median_seconds(work: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_npy(trace: Path) -> int:
    return sum(int(np.asarray(p.block).sum() != 0) for p in TraceStore(trace))


def read_zarr(store: Path) -> int:
    import xarray as xr

    return int(np.isfinite(xr.open_zarr(store)["block"].values).sum() != 0)


def measure(name: str, model: LoopedLM, args: argparse.Namespace, scratch: Path) -> None:
    prompts = prompt_inputs(PROMPTS, limit=args.prompts)
    settings = TraceSettings(recurrences=args.recurrences, capture="full", stability_prompts=0)
    trace = scratch / f"{name}-npy"
    trace_prompts(model, prompts, trace, settings, progress=False)
    stores = iter(range(args.repeats + 1))

    def write() -> None:
        convert_trace(trace, scratch / f"{name}-{next(stores)}.zarr")

    write_s = median_seconds(write, args.repeats)
    store = scratch / f"{name}-0.zarr"
    npy_bytes, zarr_bytes = disk_bytes(trace), disk_bytes(store)
    npy_read = median_seconds(lambda: read_npy(trace), args.repeats)
    zarr_read = median_seconds(lambda: read_zarr(store), args.repeats)
    mb = npy_bytes / 1e6
    print(f"{name}: {len(prompts)} prompts, {args.recurrences} recurrences")
    ratio = zarr_bytes / npy_bytes
    print(f"  bytes   npy {npy_bytes:>12,}  zarr {zarr_bytes:>12,}  zarr/npy {ratio:.2f}")
    print(f"  write   zarr {mb / write_s:8.1f} MB/s (of .npy data)")
    print(
        f"  read    npy {mb / npy_read:8.1f} MB/s  zarr {mb / zarr_read:8.1f} MB/s  "
        f"zarr/npy time {zarr_read / npy_read:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--recurrences", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=2048, help="0 skips the wide model")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="trace-store-") as tmp:
        model, _ = demo_model()
        measure("demo", model, args, Path(tmp))
        if args.width:
            measure(f"width-{args.width}", wide_model(args.width), args, Path(tmp))


if __name__ == "__main__":
    main()
