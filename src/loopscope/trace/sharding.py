"""Tracing sharded over Ray workers: the same trace as one process, written by many.

The driver groups the prompts still to trace into shards of consecutive prompt indices and
runs one Ray task per shard. Each task loads the model itself from its source string
(``loopscope.load(source)``: "demo", a checkpoint directory, …; the model object is never
shipped), uses one CPU thread (``num_cpus=1``) or one GPU, and writes its chunks, keyed by the
global prompt index, under ``TRACE/shards/shard_<first>-<last>/``. Readers
(:class:`~loopscope.trace.store.TraceStore`) merge the shards lazily into one trace, so the result
equals what :func:`~loopscope.trace.writer.trace_prompts` writes in one process, bit for bit.

Fault tolerance is Ray's: a worker that dies mid-shard has its task retried
(``max_retries``) on another or a fresh worker, which skips the chunks the dead one finished;
a chunk is written under ``*.partial`` and renamed when complete, so half-written chunks are
never seen. Rerunning skips every finished prompt, hence every finished shard.

Ray is an optional extra (``pip install 'loopscope[ray]'``) imported only here, inside the
functions; every worker must see ``out_dir`` (one machine, or a shared file system) and have
loopscope installed. Workers that share no disk write one Zarr store at a URL instead:
:func:`loopscope.trace.zarr_shards.trace_distributed_zarr`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from loopscope.engine.contract import LoopedLM
from loopscope.families.checkpoint import BUNDLED
from loopscope.trace.long_prompts import fit_to_context, record_messages
from loopscope.trace.plan import concrete_settings
from loopscope.trace.settings import PromptInput, TraceError, TraceSettings
from loopscope.trace.store import SHARDS_DIR, TraceStore, chunk_name, chunk_paths, model_fingerprint
from loopscope.trace.writer import open_trace, trace_header, trace_one

RAY_MISSING = "tracing with --ray needs Ray, an optional extra: pip install 'loopscope[ray]'"
ATTEMPTS_LOG = "attempts.jsonl"


@dataclass(frozen=True)
class Shard:
    """Consecutive prompt indices traced by one Ray task into ``shards/<name>``."""

    indices: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"shard_{self.indices[0]:05d}-{self.indices[-1]:05d}"


@dataclass(frozen=True)
class FailOnce:
    """Test hook standing in for a crash: the worker tracing the shard that holds prompt
    ``prompt`` exits abruptly (``os._exit``, no clean-up) after finishing ``after`` prompts of
    it — once; the file ``marker`` records that it happened."""

    prompt: int
    after: int
    marker: str


def plan_shards(n_prompts: int, finished: set[int], shard_size: int) -> list[Shard]:
    """The prompts not yet finished, in index order, cut into shards of ``shard_size``."""
    if shard_size < 1:
        raise TraceError(f"shard_size must be ≥ 1, got {shard_size}")
    todo = [i for i in range(n_prompts) if i not in finished]
    return [Shard(tuple(todo[k : k + shard_size])) for k in range(0, len(todo), shard_size)]


def default_shard_size(n_todo: int, workers: int) -> int:
    """About four shards per worker: small enough to balance load and to lose little to a
    crash, large enough that per-task overhead stays small."""
    return max(1, math.ceil(n_todo / (4 * workers)))


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ImportError(RAY_MISSING) from None
    return ray


# -- worker side ---------------------------------------------------------------------------

_WORKER_MODELS: dict[tuple[str, str], tuple[LoopedLM, dict[str, Any]]] = {}


def _worker_model(source: str, device: str) -> tuple[LoopedLM, dict[str, Any]]:
    """The model and its fingerprint, loaded once per worker process (tasks reuse it)."""
    import torch

    if device == "cpu":
        torch.set_num_threads(1)
    key = (source, device)
    if key not in _WORKER_MODELS:
        import loopscope

        model: LoopedLM = loopscope.load(source, device=device)
        model.eval()
        _WORKER_MODELS[key] = (model, model_fingerprint(model))
    return _WORKER_MODELS[key]


def _prepare(
    source: str,
    prompts: list[PromptInput],
    settings: TraceSettings,
    tokenizer_name: str,
    bos: bool,
    device: str,
    long_prompts: str = "error",
) -> tuple[dict[str, Any], list[PromptInput]]:
    """Ray task: the trace header and the prompts that fit the context (``long_prompts``, see
    trace/long_prompts.py), computed where the model lives (the driver never loads it)."""
    model, _ = _worker_model(source, device)
    fitted = fit_to_context(prompts, model.meta.context_length, long_prompts, bos=bos)
    settings = concrete_settings(model, fitted.kept, settings)  # "auto" values: trace/plan.py
    header = trace_header(
        model, fitted.kept, settings, tokenizer_name=tokenizer_name, bos=bos, extra=fitted.header()
    )
    return header, fitted.kept


def _trace_shard(
    source: str,
    device: str,
    fingerprint: dict[str, Any],
    shard_dir: str,
    items: list[tuple[int, PromptInput]],
    settings: TraceSettings,
    fail_once: FailOnce | None,
) -> list[int]:
    """Ray task: trace one shard's prompts that have no finished chunk yet (a retry after a
    crash picks up where the dead worker stopped). Returns the indices it traced."""
    model, found = _worker_model(source, device)
    if found != fingerprint:
        raise TraceError(
            f"worker pid {os.getpid()} loaded another model from {source!r} than the trace "
            "header records; every worker must see the same checkpoint"
        )
    out = Path(shard_dir)
    out.mkdir(parents=True, exist_ok=True)
    todo = [(i, p) for i, p in items if not (out / chunk_name(i)).is_dir()]
    with (out / ATTEMPTS_LOG).open("a") as log:
        log.write(json.dumps({"pid": os.getpid(), "todo": [i for i, _ in todo]}) + "\n")
    hook = fail_once if fail_once and fail_once.prompt in {i for i, _ in items} else None
    traced: list[int] = []
    for index, prompt in todo:
        if hook is not None and len(traced) == hook.after and not Path(hook.marker).exists():
            Path(hook.marker).write_text(json.dumps({"pid": os.getpid(), "before": index}))
            os._exit(1)
        trace_one(model, prompt, out, index, settings)
        traced.append(index)
    return traced


# -- driver side ---------------------------------------------------------------------------


def connect(address: str | None = None, *, workers: int | None = None) -> bool:
    """Join the Ray session this process already has, else the cluster at ``address``, else
    (``None`` or "local") start a local one with ``workers`` CPUs. True when this call started
    or joined a cluster (and the caller should ``ray.shutdown()`` after)."""
    ray = _import_ray()
    if ray.is_initialized():
        return False
    if address in (None, "", "local"):
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    return True


def _cluster_plan(ray: Any, workers: int | None, use_gpu: bool | None) -> tuple[int, str]:
    """How many shards run at once and on which device kind."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    gpu = gpus > 0 if use_gpu is None else use_gpu
    if gpu and gpus == 0:
        raise TraceError("use_gpu=True but the Ray cluster has no GPU; drop it to trace on CPUs")
    capacity = gpus if gpu else int(resources.get("CPU", 1))
    chosen = workers if workers is not None else max(1, capacity)
    if chosen < 1:
        raise TraceError(f"workers must be ≥ 1, got {chosen}")
    return chosen, "cuda" if gpu else "cpu"


def _unwrap(ray: Any, err: Exception, what: str, retries: int) -> Exception:
    """Bad input raised inside a task comes back as itself; a worker lost beyond the retries
    becomes a TraceError that says how to resume."""
    if isinstance(err, ray.exceptions.RayTaskError) and isinstance(
        err.cause, (TraceError, ValueError)
    ):
        cause: Exception = err.cause
        return cause
    return TraceError(
        f"{what} failed after {retries} retries ({type(err).__name__}: {str(err)[:300]}); "
        "run the same command again to resume: finished prompts are kept"
    )


def trace_distributed(
    source: str,
    prompts: Sequence[PromptInput],
    out_dir: str | Path,
    settings: TraceSettings,
    *,
    address: str | None = None,
    workers: int | None = None,
    shard_size: int | None = None,
    use_gpu: bool | None = None,
    max_retries: int = 3,
    tokenizer_name: str = "byte",
    bos: bool = True,
    progress: bool = True,
    fail_once: FailOnce | None = None,
    long_prompts: str = "error",
) -> TraceStore:
    """Trace ``prompts`` through the model at ``source`` into ``out_dir``, sharded over Ray
    workers (at most ``workers`` shards at once; default one per GPU, else one per CPU).
    ``long_prompts`` says what becomes of a prompt longer than the context (see
    :mod:`loopscope.trace.long_prompts`; here "error" unless told, as before).

    Uses the Ray session this process has, else connects to ``address`` or starts a local
    cluster (shut down again at the end). Resumable like :func:`trace_prompts`, and a trace
    started by either can be finished by the other."""
    if not isinstance(source, str):
        raise TraceError(
            "trace_distributed needs the model's source string ('demo', a checkpoint "
            "directory, …), which every worker loads itself; a model object is not shipped"
        )
    ray = _import_ray()
    # Workers need not share the driver's working directory: hand them absolute paths.
    local = Path(source).expanduser()
    if source not in BUNDLED and local.exists():
        source = str(local.resolve())
    started = connect(address, workers=workers)
    try:
        return _run(
            ray,
            source,
            list(prompts),
            Path(out_dir).expanduser().resolve(),
            settings,
            workers=workers,
            shard_size=shard_size,
            use_gpu=use_gpu,
            max_retries=max_retries,
            tokenizer_name=tokenizer_name,
            bos=bos,
            progress=progress,
            fail_once=fail_once,
            long_prompts=long_prompts,
        )
    finally:
        if started:
            ray.shutdown()


def _run(
    ray: Any,
    source: str,
    prompts: list[PromptInput],
    out: Path,
    settings: TraceSettings,
    *,
    workers: int | None,
    shard_size: int | None,
    use_gpu: bool | None,
    max_retries: int,
    tokenizer_name: str,
    bos: bool,
    progress: bool,
    fail_once: FailOnce | None,
    long_prompts: str = "error",
) -> TraceStore:
    from tqdm.auto import tqdm

    concurrency, device = _cluster_plan(ray, workers, use_gpu)
    options = {"num_cpus": 1, "num_gpus": 1 if device == "cuda" else 0}
    prepare = ray.remote(_prepare).options(max_retries=max_retries, **options)
    try:
        header, prompts = ray.get(
            prepare.remote(source, prompts, settings, tokenizer_name, bos, device, long_prompts)
        )
        for line in record_messages(header.get("long_prompts", {})):
            print(line)
    except ray.exceptions.RayError as err:
        raise _unwrap(ray, err, f"loading {source!r} on a worker", max_retries) from None
    open_trace(out, header, prompts)
    chosen = header["settings"]  # the worker made "auto" values concrete
    settings = replace(settings, capture=chosen["capture"], state_dtype=chosen["state_dtype"])
    finished = set(chunk_paths(out))
    n_todo = len(prompts) - len(finished & set(range(len(prompts))))
    size = shard_size or default_shard_size(n_todo, concurrency)
    shards = plan_shards(len(prompts), finished, size)
    task = ray.remote(_trace_shard).options(max_retries=max_retries, **options)
    bar = tqdm(total=len(prompts), initial=len(prompts) - n_todo, disable=not progress)
    running: dict[Any, Shard] = {}
    failures: list[Exception] = []
    pending = list(shards)
    try:
        while pending or running:
            while pending and len(running) < concurrency:
                shard = pending.pop(0)
                items = [(i, prompts[i]) for i in shard.indices]
                shard_dir = str(out / SHARDS_DIR / shard.name)
                ref = task.remote(
                    source, device, header["model"], shard_dir, items, settings, fail_once
                )
                running[ref] = shard
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                shard = running.pop(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as err:
                    failures.append(_unwrap(ray, err, f"shard {shard.name}", max_retries))
                bar.update(len(shard.indices))
    finally:
        bar.close()
    if failures:
        raise failures[0]
    return TraceStore(out)
