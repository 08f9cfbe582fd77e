"""Peak host memory of ``loopscope.load(dir, dtype=torch.bfloat16)`` on a full-size checkpoint.

The benchmark writes a random checkpoint of Huginn-0125's shape (width 5280, 55 heads, MLP 17920,
vocabulary 65536, (2, 4⊗r, 2) layers: about 3.5 B parameters, 7 GB in bf16) as sharded
safetensors into a temporary directory, one shard at a time from a seeded generator (so the
writer holds one shard at most), then loads it in a fresh Python process. That process
measures its own peak resident set (VmHWM; ``ru_maxrss`` is printed too but inherits the
parent's peak across exec) minus its resident set after importing torch and loopscope, i.e.
what loading added, and compares it with the checkpoint's size.
It then reads every page of every parameter, so weights that were mapped but not yet paged
in count too, and reports peak and resident memory after that. The directory is deleted.

    python benchmarks/load_memory.py                 # full size, bf16 checkpoint (~7 GB disk)
    python benchmarks/load_memory.py --scale 0.25    # quick run: widths × 0.25
    python benchmarks/load_memory.py --stored-dtype float32   # fp32 checkpoint cast to bf16

Target: peak load memory ≤ 1.3 × the checkpoint's size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.3
GIB = 1024**3

#: Huginn-0125's published configuration (the fields the raven loader reads).
HUGINN_CONFIG: dict[str, Any] = {
    "model_type": "huginn_raven",
    "architectures": ["RavenForCausalLM"],
    "n_embd": 5280,
    "n_heads": 55,
    "num_key_value_heads": 55,
    "intermediate_size": 17920,
    "vocab_size": 65536,
    "padded_vocab_size": 65536,
    "n_layers_in_prelude": 2,
    "n_layers_in_recurrent_block": 4,
    "n_layers_in_coda": 2,
    "mean_recurrence": 32,
    "block_size": 4096,
    "tie_embeddings": True,
    "bias": False,
    "qk_bias": True,
    "rope_base": 50000.0,
    "norm_eps": 1e-6,
    "test_time_noise": 0,
    "init_values": {"std": math.sqrt(2 / (5 * 5280)), "embed_scale": math.sqrt(5280)},
}


def scaled_config(scale: float) -> dict[str, Any]:
    """Huginn's config with head count, MLP width and vocabulary times ``scale`` (head size and
    layer counts kept), so a quick run has the same tensor names and layout."""
    config = json.loads(json.dumps(HUGINN_CONFIG))
    if scale == 1.0:
        return config
    if not 0 < scale <= 1:
        raise SystemExit(f"--scale must be in (0, 1], got {scale}")
    head_dim = HUGINN_CONFIG["n_embd"] // HUGINN_CONFIG["n_heads"]
    heads = max(1, round(HUGINN_CONFIG["n_heads"] * scale))
    width = heads * head_dim
    config.update(
        n_heads=heads,
        num_key_value_heads=heads,
        n_embd=width,
        intermediate_size=max(8, round(HUGINN_CONFIG["intermediate_size"] * scale)),
        vocab_size=max(256, round(HUGINN_CONFIG["vocab_size"] * scale)),
    )
    config["padded_vocab_size"] = config["vocab_size"]
    config["init_values"] = {"std": math.sqrt(2 / (5 * width)), "embed_scale": math.sqrt(width)}
    return config


# ----------------------------------------------------------------------------- writing
def tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor the checkpoint holds, from our own model built on the meta device (names and
    shapes exactly as the loader expects), plus Huginn's stored rotary table."""
    import torch

    from loopscope.families.raven import ROPE_TABLE, RavenLM, raven_config_from_dict

    c = raven_config_from_dict(config, "huginn")
    with torch.device("meta"):
        model = RavenLM(c)
    shapes = {name: tuple(shape) for name, shape in model.expected_tensors().items()}
    shapes[ROPE_TABLE] = (1, c.context_length, 1, c.head_dim // 2, 2)
    return shapes


def shard_plan(
    shapes: dict[str, tuple[int, ...]], itemsize: int, shard_bytes: int
) -> list[list[str]]:
    """Tensor names grouped in order into shards of at most ``shard_bytes`` (one tensor more
    than that gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def random_tensors(
    names: list[str], shapes: dict[str, tuple[int, ...]], dtype: Any, gen: Any, head_dim: int
) -> Iterator[tuple[str, Any]]:
    """Seeded stand-in weights: ones for norm gains, Huginn's rotary table, N(0, 0.02) else."""
    import torch

    for name in names:
        shape = shapes[name]
        if name == "freqs_cis":
            inv = 1.0 / (HUGINN_CONFIG["rope_base"] ** (torch.arange(0, head_dim, 2) / head_dim))
            angles = torch.outer(torch.arange(shape[1], dtype=torch.float32), inv)
            table = torch.stack([angles.cos(), angles.sin()], dim=-1)
            yield name, table[None, :, None].contiguous()
        elif ".norm_" in name or name.endswith("ln_f.weight"):
            yield name, torch.ones(shape, dtype=dtype)
        else:
            yield name, torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=gen)


def write_checkpoint(
    directory: Path, config: dict[str, Any], dtype_name: str, shard_bytes: int, seed: int
) -> int:
    """Write config.json, the shards and their index; returns the weights' size in bytes."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, dtype_name)
    shapes = tensor_shapes(config)
    head_dim = config["n_embd"] // config["n_heads"]
    shards = shard_plan(shapes, torch.empty((), dtype=dtype).element_size(), shard_bytes)
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = dict(random_tensors(names, shapes, dtype, gen, head_dim))
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        del tensors
        weight_map.update(dict.fromkeys(names, file))
        total += (directory / file).stat().st_size
        print(f"  wrote {file} ({(directory / file).stat().st_size / GIB:.2f} GiB)", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (directory / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype_name}))
    return total


# ----------------------------------------------------------------------------- measuring
def _status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, RssAnon, RssFile, …) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _peak_kib() -> int:
    """Peak resident set of this process image (VmHWM). ``ru_maxrss`` is not used for the
    verdict: Linux carries the parent's peak into it across fork + exec, so a child started by
    a writer that held 2 GiB would report at least that."""
    return _status_kib("VmHWM")


def _ru_maxrss_kib() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux


def touch_every_page(model: Any) -> float:
    """Read one element per 4 KiB page of every parameter (no copies), so mapped weights are
    paged in and counted; returns a checksum so the reads cannot be skipped."""
    total = 0.0
    for p in model.parameters():
        flat = p.detach().reshape(-1)
        step = max(1, 4096 // flat.element_size())
        total += float(flat[::step].float().sum())
    return total


def child(directory: str, dtype_name: str) -> None:
    """Runs in a fresh process: load, measure, print one JSON line."""
    import torch

    import loopscope
    import loopscope.families.raven  # noqa: F401 - imported before the baseline is taken

    baseline = _status_kib("VmRSS")
    base_split = {"anon": _status_kib("RssAnon"), "file": _status_kib("RssFile")}
    peak_before = _peak_kib()
    ru_before = _ru_maxrss_kib()
    start = time.perf_counter()
    model = loopscope.load(directory, dtype=getattr(torch, dtype_name))
    seconds = time.perf_counter() - start
    after_load = {
        "peak": _peak_kib(),
        "ru_maxrss": _ru_maxrss_kib(),
        "rss": _status_kib("VmRSS"),
        "anon": _status_kib("RssAnon"),
        "file": _status_kib("RssFile"),
    }
    touch_every_page(model)
    after_touch = {
        "peak": _peak_kib(),
        "rss": _status_kib("VmRSS"),
        "anon": _status_kib("RssAnon"),
        "file": _status_kib("RssFile"),
    }
    dtypes: dict[str, int] = {}
    for p in model.parameters():
        dtypes[str(p.dtype)] = dtypes.get(str(p.dtype), 0) + p.numel()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    print(
        json.dumps(
            {
                "baseline_kib": baseline,
                "baseline_split": base_split,
                "peak_before_kib": peak_before,
                "ru_maxrss_before_kib": ru_before,
                "after_load": after_load,
                "after_touch": after_touch,
                "load_seconds": seconds,
                "param_bytes": params,
                "param_dtypes": dtypes,
            }
        )
    )


def measure(directory: Path, dtype_name: str) -> dict[str, Any]:
    """Load ``directory`` in a fresh interpreter and return its measurements."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(directory)]
    proc = subprocess.run(
        [*cmd, "--dtype", dtype_name], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"loading failed in the child process:\n{proc.stderr}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _grown(m: dict[str, Any], stage: str, key: str) -> float:
    """GiB by which a resident-set field grew from the baseline to ``stage``."""
    return (m[stage][key] - m["baseline_split"][key]) * 1024 / GIB


def report(size: int, m: dict[str, Any]) -> float:
    """Print the measurements; returns peak memory (load, then every weight read) / checkpoint
    size. VmHWM only grows, so the peak after reading covers the load as well."""
    kib = 1024
    base = m["baseline_kib"]
    load_peak = (m["after_load"]["peak"] - base) * kib
    peak = (m["after_touch"]["peak"] - base) * kib
    ratio = peak / size
    print(f"checkpoint size             {size / GIB:8.2f} GiB ({size:,} bytes)")
    print(f"loaded parameters           {m['param_bytes'] / GIB:8.2f} GiB {m['param_dtypes']}")
    print(f"child RSS after imports     {base * kib / GIB:8.2f} GiB (baseline, subtracted below)")
    print(f"load time                   {m['load_seconds']:8.1f} s")
    print(f"peak during load            {load_peak / GIB:8.2f} GiB = {load_peak / size:.3f} x")
    print(
        f"  (ru_maxrss - baseline: {(m['after_load']['ru_maxrss'] - base) * kib / GIB:.2f} GiB; "
        f"ru_maxrss was already {m['ru_maxrss_before_kib'] * kib / GIB:.2f} GiB before loading, "
        "the parent's peak carried across exec, so VmHWM is used)"
    )
    for stage, label in (("after_load", "after load"), ("after_touch", "after reading weights")):
        print(
            f"  resident growth {label:22s} anonymous {_grown(m, stage, 'anon'):6.2f} GiB, "
            f"file-mapped {_grown(m, stage, 'file'):6.2f} GiB"
        )
    verdict = "meets" if ratio <= TARGET else "misses"
    print(
        f"peak load memory (load + every weight paged in) {peak / GIB:.2f} GiB = {ratio:.3f} x "
        f"checkpoint ({verdict} the {TARGET} x target)"
    )
    print(
        f"  = {peak / m['param_bytes']:.3f} x the loaded parameters' size "
        "(differs from the above when the checkpoint is stored in another dtype)"
    )
    return ratio


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="widths × this (quick runs)")
    ap.add_argument("--stored-dtype", default="bfloat16", help="dtype written to the checkpoint")
    ap.add_argument("--dtype", default="bfloat16", help="dtype passed to loopscope.load")
    ap.add_argument("--shard-gib", type=float, default=2.0, help="shard size (GiB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp", help="parent directory for the temporary checkpoint")
    ap.add_argument("--child", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.dtype)
        return 0
    sys.path.insert(0, str(ROOT / "src"))
    config = scaled_config(args.scale)
    directory = Path(tempfile.mkdtemp(prefix="huginn-shaped-", dir=args.tmp))
    try:
        print(
            f"writing a random Huginn-0125-shaped checkpoint (scale {args.scale}: width "
            f"{config['n_embd']}, {config['n_heads']} heads, MLP {config['intermediate_size']}, "
            f"vocab {config['vocab_size']}) in {args.stored_dtype} to {directory}",
            flush=True,
        )
        start = time.perf_counter()
        size = write_checkpoint(
            directory, config, args.stored_dtype, int(args.shard_gib * GIB), args.seed
        )
        print(
            f"  written in {time.perf_counter() - start:.0f} s; writer peak RSS "
            f"{_peak_kib() / 1024**2:.2f} GiB",
            flush=True,
        )
        print(f"loading it in a fresh process: loopscope.load(dir, dtype=torch.{args.dtype})")
        start = time.perf_counter()
        measured = measure(directory, args.dtype)
        print(f"  child finished in {time.perf_counter() - start:.0f} s")
        report(size, measured)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
