"""Tracing: run a model over prompts and write one chunked, resumable trace directory.

Each prompt becomes one chunk (arrays are ``.npy`` so they open lazily with ``mmap_mode="r"``)::

    TRACE/prompt_00000/
        tokens.npy            (T,) token ids
        block.npy             (R, L, T, D) residual stream after each block layer  [full capture]
        prelude.npy, coda.npy (layers, T, D)                                       [full capture]
        attn.npy              (R, L, H, T, T) attention probabilities      [full capture + attn]
        summary.npz           online reductions (successive differences, norms, distances to
                              the fixed point, attention changes, divergent tokens)
        stages.json           stages-of-inference profile of this prompt
        logit_lens.npy        (R, T) top-1 token read out after each recurrence (a family that
                              cannot read out mid-run gets an empty logit_lens_unavailable.npy)
        stability.json        spectral radii at the fixed point (first prompts only)

A chunk is built under ``prompt_NNNNN.partial``, then made durable and renamed into place
(:mod:`loopscope.core.atomic`; a batch's chunks together, with one flush of the disk), so a
chunk that is visible is complete, even after ``kill -9`` or a power cut. An interrupted run
resumes at the first prompt without a finished chunk and rebuilds any ``.partial`` it meets;
a directory traced with another model or other settings is refused rather than mixed. A full
disk stops the run with one line naming the disk; the finished chunks stay, and rerunning
resumes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor

from loopscope.analysis.at_fixed_point import (
    attention_bound_terms,
    stability_at_fixed_point,
)
from loopscope.core.atomic import publish_directories, write_json, write_text, write_unpublished
from loopscope.engine.batching import run_in_microbatches
from loopscope.engine.contract import LoopedLM
from loopscope.engine.loop import EditPlan
from loopscope.engine.probes import DynamicsSummary
from loopscope.trace.batched import Measured, measure_batch
from loopscope.trace.long_prompts import too_long_error
from loopscope.trace.plan import concrete_settings, runtime_record
from loopscope.trace.settings import PromptInput, TraceError, TraceSettings
from loopscope.trace.store import (
    FORMAT,
    PARTIAL,
    TraceStore,
    chunk_name,
    chunk_paths,
    model_fingerprint,
    stored_states,
)

DIMS = {
    "tokens": ["token"],
    "block": ["recurrence", "layer", "token", "hidden"],
    "prelude": ["layer", "token", "hidden"],
    "coda": ["layer", "token", "hidden"],
    "attn": ["recurrence", "layer", "head", "query", "key"],
    "fixed_point": ["layer", "token", "hidden"],
}
#: Errors that mean the file system is full (a quota counts as full too).
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


# -- the directory ------------------------------------------------------------------------


def _open_trace_dir(out: Path, header: dict[str, Any]) -> None:
    """Create the directory or check that it holds a trace of the same model and settings."""
    meta_path = out / "trace.json"
    if meta_path.exists():
        existing = json.loads(meta_path.read_text())
        for key in ("format", "model", "settings", "prompts_sha256", "protocol"):
            if existing.get(key) != header.get(key):
                raise TraceError(
                    f"{out} already holds a trace with a different {key} "
                    f"({existing.get(key)!r} vs {header.get(key)!r}); choose another --out "
                    "directory, or delete it to start afresh"
                )
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json(meta_path, header)


def _prompts_digest(prompts: Sequence[PromptInput]) -> str:
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(json.dumps(p.ids).encode())
    return digest.hexdigest()[:16]


def trace_header(
    model: LoopedLM,
    prompts: Sequence[PromptInput],
    settings: TraceSettings,
    *,
    tokenizer_name: str = "byte",
    bos: bool = True,
    protocol: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Check the settings and prompts against the model and return the ``trace.json`` header
    (the same whether one process or many trace the prompts). ``extra`` entries (what was
    skipped, what ``auto`` chose) are recorded but not compared on resume."""
    settings.validate(model)
    if not prompts:
        raise TraceError("no prompts to trace: the prompt file is empty")
    for index, prompt in enumerate(prompts):
        if len(prompt.ids) > model.meta.context_length:
            raise too_long_error(index, len(prompt.ids), model.meta.context_length)
        if not prompt.ids:
            raise TraceError(f"prompt {index} is empty after tokenisation")
    return {
        "format": FORMAT,
        "model": model_fingerprint(model),
        "settings": asdict(settings),
        "tokenizer": {"name": tokenizer_name, "bos": bos},
        "prompts_sha256": _prompts_digest(prompts),
        "n_prompts": len(prompts),
        "dims": DIMS,
        **({} if protocol is None else {"protocol": protocol}),  # see trace/protocol.py
        **runtime_record(model),  # device and dtype, see trace/plan.py
        **(extra or {}),
    }


def open_trace(out: Path, header: dict[str, Any], prompts: Sequence[PromptInput]) -> None:
    """Create ``out`` (or check it holds the same trace) and write the prompt list."""
    with disk_full_stops(out, "the trace header"):
        _open_trace_dir(out, header)
        write_text(
            out / "prompts.jsonl",
            "".join(json.dumps({"text": p.text, "n_tokens": len(p.ids)}) + "\n" for p in prompts),
        )


@contextmanager
def disk_full_stops(out: Path, what: str) -> Iterator[None]:
    """Turn a full disk while writing ``what`` into a :class:`TraceError` that names the disk
    and says that a rerun resumes (finished chunks are complete and kept)."""
    try:
        yield
    except OSError as err:
        if err.errno not in _DISK_FULL:
            raise
        raise TraceError(
            f"no space left on the disk holding {out} (file system mounted at "
            f"{_mount_point(out)}) while writing {what}; free space there or pass another "
            "--out, then run the same command again to resume: finished prompts are kept"
        ) from err


def _mount_point(path: Path) -> Path:
    """The mount point of the file system that holds ``path``."""
    current = path.resolve()
    while not current.exists():
        current = current.parent
    while not os.path.ismount(current) and current != current.parent:
        current = current.parent
    return current


# -- tracing ------------------------------------------------------------------------------


def trace_prompts(
    model: LoopedLM,
    prompts: Sequence[PromptInput],
    out_dir: str | Path,
    settings: TraceSettings,
    *,
    tokenizer_name: str = "byte",
    bos: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
    edit_plan: EditPlan | None = None,
    batch_size: int = 1,
    protocol: dict[str, Any] | None = None,
    header_extra: dict[str, Any] | None = None,
) -> TraceStore:
    """Trace every prompt into ``out_dir`` (resuming where a previous run stopped).

    ``edit_plan`` applies interventions while tracing (per token: the same edit reaches every
    row of a batch); ``stop_after`` ends after that many new prompts (what an interrupted run
    looks like, for tests). ``batch_size`` prompts run per forward pass, grouped by length to
    limit padding; every chunk equals the prompt traced alone (to rounding), the batch size is
    not part of the trace's identity (a run resumed with another one continues the same trace),
    and a batch that runs out of memory is split and retried."""
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TraceError(f"batch_size must be an integer ≥ 1, got {batch_size!r}")
    settings = concrete_settings(model, prompts, settings)  # "auto" values, see trace/plan.py
    header = trace_header(
        model,
        prompts,
        settings,
        tokenizer_name=tokenizer_name,
        bos=bos,
        protocol=protocol,
        extra=header_extra,
    )
    if edit_plan is not None and settings.fixed_point == "anderson":
        raise TraceError("fixed_point='anderson' cannot be combined with interventions yet")
    out = Path(out_dir)
    open_trace(out, header, prompts)
    finished = chunk_paths(out)
    todo = [i for i in range(len(prompts)) if i not in finished]
    if stop_after is not None:
        todo = todo[: max(0, stop_after)]
    model.eval()
    bar = tqdm(
        total=len(prompts), initial=len(prompts) - len(todo), disable=not progress, desc="trace"
    )
    try:
        if batch_size == 1:
            for index in todo:
                trace_one(model, prompts[index], out, index, settings, edit_plan)
                bar.update(1)
        else:
            _trace_in_batches(model, prompts, todo, out, settings, edit_plan, batch_size, bar)
    finally:
        bar.close()
    return TraceStore(out)


def _trace_in_batches(
    model: LoopedLM,
    prompts: Sequence[PromptInput],
    todo: Sequence[int],
    out: Path,
    settings: TraceSettings,
    edit_plan: EditPlan | None,
    batch_size: int,
    bar: Any,
) -> None:
    """Trace ``todo`` (prompt indices) in batches of prompts of similar length; a batch that
    runs out of memory is halved and retried (:func:`run_in_microbatches`), skipping the
    prompts whose chunks the failed attempt had already finished."""
    by_length = sorted(todo, key=lambda i: (len(prompts[i].ids), i))

    def run(indices: list[int]) -> list[None]:
        pending = [i for i in indices if not (out / chunk_name(i)).exists()]
        if pending:
            trace_batch(model, [prompts[i] for i in pending], out, pending, settings, edit_plan)
        bar.update(len(pending))
        return [None] * len(indices)

    run_in_microbatches(run, by_length, batch_size)


def trace_one(
    model: LoopedLM,
    prompt: PromptInput,
    out: Path,
    index: int,
    settings: TraceSettings,
    edit_plan: EditPlan | None = None,
) -> None:
    """Trace one prompt into the finished chunk ``out/prompt_NNNNN``."""
    trace_batch(model, [prompt], out, [index], settings, edit_plan)


def trace_batch(
    model: LoopedLM,
    prompts: Sequence[PromptInput],
    out: Path,
    indices: Sequence[int],
    settings: TraceSettings,
    edit_plan: EditPlan | None = None,
) -> None:
    """Trace ``prompts`` in one right-padded batch, then write each into its chunk
    ``out/prompt_NNNNN`` (``indices``: their places in the prompt list), each built under a
    temporary name (removed again if anything fails) and published only once complete."""
    if len(prompts) != len(indices) or not prompts:
        raise ValueError(f"{len(prompts)} prompts for {len(indices)} chunk indices")
    measured = measure_batch(model, prompts, settings, edit_plan)
    built: list[tuple[Path, Path]] = []
    try:
        for prompt, index, result in zip(prompts, indices, measured):
            partial = out / (chunk_name(index) + PARTIAL)
            with disk_full_stops(out, f"prompt {index}"):
                if partial.exists():
                    shutil.rmtree(partial)  # left by a run killed while writing it
                partial.mkdir()
                try:
                    _write_chunk(model, prompt, partial, index, settings, result)
                except BaseException:
                    shutil.rmtree(partial, ignore_errors=True)
                    raise
            built.append((partial, out / chunk_name(index)))
    finally:  # the chunks finished before a failure are kept
        _publish_chunks(out, built)


def _publish_chunks(out: Path, built: list[tuple[Path, Path]]) -> None:
    """Make a batch's finished chunks durable and visible together (one flush for all)."""
    if not built:
        return
    with disk_full_stops(out, f"prompts {', '.join(p.name for _, p in built)}"):
        try:
            publish_directories(built)
        except BaseException:
            for partial, _ in built:
                shutil.rmtree(partial, ignore_errors=True)
            raise


def _save_array(path: Path, array: np.ndarray) -> None:
    """``np.save`` into an unpublished chunk (by file handle: numpy would append ``.npy`` to a
    name)."""
    write_unpublished(path, lambda fh: np.save(fh, array))


def _save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` of ``arrays`` into an unpublished chunk."""
    save_npz: Any = np.savez  # numpy's stub mistypes **arrays
    write_unpublished(path, lambda fh: save_npz(fh, **arrays))


def _save_json(path: Path, data: Any) -> None:
    """JSON (indented as every loopscope JSON file) into an unpublished chunk."""
    text = json.dumps(data, indent=2).encode("utf-8")

    def save(fh: BinaryIO) -> None:
        fh.write(text)

    write_unpublished(path, save)


def _only_row(array: np.ndarray, batch_axis: int) -> np.ndarray:
    """The one batch row of a captured array (each prompt has its own capture); an empty
    stage (shape (0,), a model without prelude say) stays as it is."""
    if array.ndim <= batch_axis:
        return array
    return np.take(array, 0, axis=batch_axis)


def _write_chunk(
    model: LoopedLM,
    prompt: PromptInput,
    chunk: Path,
    index: int,
    settings: TraceSettings,
    measured: Measured,
) -> None:
    """Every file of one prompt's chunk, each written into ``chunk`` as soon as it is known;
    the stability records are measured on the prompt alone."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt.ids], device=device)
    keep = settings.token_positions(len(prompt.ids))
    _save_array(chunk / "tokens.npy", np.asarray(prompt.ids, dtype=np.int64))
    if measured.solved is not None:
        reference = measured.solved[0].float().cpu().numpy()
        if settings.layers is not None:
            reference = reference[settings.layers]
        if keep is not None:
            reference = reference[:, keep]
        _save_array(chunk / "fixed_point.npy", reference)
        _save_json(chunk / "fixed_point.json", measured.solved[1])
    block = attn = None
    capture = measured.capture
    if capture is not None:
        for stage in ("prelude", "block", "coda"):
            array = _only_row(capture.stage_array(stage), 2 if stage == "block" else 1)
            _save_array(chunk / f"{stage}.npy", stored_states(array, settings.state_dtype))
            block = array if stage == "block" else block
        if settings.keep_recurrences is not None:
            kept = np.asarray(sorted(settings.keep_recurrences))
            _save_array(chunk / "block_recurrences.npy", kept)
        captured_attn = capture.attention_array()
        if captured_attn is not None:
            attn = _only_row(captured_attn, 2)
            _save_array(chunk / "attn.npy", stored_states(attn, settings.state_dtype))
            _save_array(chunk / "attn_recurrences.npy", np.asarray(settings.attention_kept()))
    _save_arrays(chunk / "summary.npz", _summary_arrays(measured.summary))
    _save_json(chunk / "stages.json", measured.stages)
    if measured.lens is not None:
        _save_array(chunk / "logit_lens.npy", measured.lens)
    else:  # the family reads out only at the end of a run; the report says so
        _save_array(chunk / "logit_lens_unavailable.npy", np.zeros(0, np.int32))
    if index < settings.stability_prompts:
        record = stability_at_fixed_point(model, ids, settings.run, iters=settings.stability_iters)
        if capture is not None:
            record["attention_bound"] = _attention_bound(model, ids, settings, block, attn)
        _save_json(chunk / "stability.json", record)


def _summary_arrays(summary: DynamicsSummary) -> dict[str, np.ndarray]:
    return {k: v for k, v in asdict(summary).items() if v is not None}


def _attention_bound(
    model: LoopedLM,
    ids: Tensor,
    settings: TraceSettings,
    block: np.ndarray | None,
    attn: np.ndarray | None,
) -> list[dict[str, Any]] | None:
    """The attention-bound terms, when the chunk stores every layer, token and recurrence
    (rebuilding a layer's input needs the previous layer's full state)."""
    if block is None or attn is None or not settings.keeps_everything():
        return None
    return attention_bound_terms(model, ids, settings.run, block, attn, settings.attention_kept())
