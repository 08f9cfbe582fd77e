"""Training checkpoints that survive ``kill -9`` and a full disk.

A training directory holds two kinds of files:

* the model as ``loopscope.load`` reads it (``model.safetensors``, ``config.json``,
  ``train_config.json``) and ``trainer_state.json`` (step and evaluation history, which
  ``loopscope export`` reads); and
* ``resume/state.safetensors``: everything a rerun resumes from (weights, optimizer state, step,
  history and both configs) in one file, so a rerun can never pair the weights of one step with
  the optimizer state of another.

Every file goes through :mod:`loopscope.core.atomic` (temporary file, fsync, rename), the resume
snapshot first. A kill at any moment therefore leaves a whole, self-consistent snapshot (the old
one or the new one), and a failed write (a full disk) leaves the previous snapshot as it was and
raises :class:`CheckpointWriteError` saying which step a rerun resumes from.
"""

from __future__ import annotations

import errno
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from loopscope.core import atomic
from loopscope.core.errors import CheckpointError
from loopscope.training.config import TrainConfig

SNAPSHOT = Path("resume") / "state.safetensors"
SNAPSHOT_FORMAT = "loopscope-training-state-1"
#: Files a training run writes at the top of its directory (their stale temporaries are removed).
EXPORTED = ("model.safetensors", "config.json", "train_config.json", "trainer_state.json")
#: Training wall time, kept apart from ``trainer_state.json`` so that a resumed run's state
#: stays byte-identical to an uninterrupted one's (wall time never is).
TRAIN_TIME = "train_time.json"
#: Written by loopscope before the resume snapshot existed; still read when no snapshot is there.
LEGACY_OPTIMIZER = "optimizer.safetensors"


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (full disk, no permission); the last whole one stays."""


def model_tensors(model: torch.nn.Module) -> dict[str, Tensor]:
    """State dict without tied duplicates (safetensors refuses shared storage)."""
    seen: set[int] = set()
    tensors: dict[str, Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor
    return tensors


def _cpu(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def _save_tensors(
    path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    cpu = _cpu(tensors)
    atomic.write_with(path, lambda name: save_file(cpu, name, metadata=metadata))


def save_checkpoint(
    out_dir: Path, model: Any, train_cfg: TrainConfig, dtype: torch.dtype | None = None
) -> None:
    """``model.safetensors`` + ``config.json`` (+ ``train_config.json``), written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = model_tensors(model)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    _save_tensors(out_dir / "model.safetensors", tensors)
    atomic.write_text(out_dir / "config.json", model.config.to_json())
    atomic.write_text(out_dir / "train_config.json", json.dumps(asdict(train_cfg), indent=2))


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"{index}.{key}"] = torch.as_tensor(value)
    return tensors


def _restore_optimizer(optimizer: torch.optim.Optimizer, flat: dict[str, Tensor]) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for name, value in flat.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    full = optimizer.state_dict()
    full["state"] = state
    optimizer.load_state_dict(full)


def _trainer_state(cfg: TrainConfig, step: int, history: list[dict[str, float]]) -> dict[str, Any]:
    return {"step": step, "history": history, "train_config": asdict(cfg)}


def recorded_train_seconds(out: Path) -> float | None:
    """Wall seconds spent training the run in ``out`` so far, summed over resumed sessions
    (None for a run written before this was recorded)."""
    path = out / TRAIN_TIME
    if not path.exists():
        return None
    return float(json.loads(path.read_text())["train_seconds"])


def _write_failed(out: Path, step: int, resumable: int, err: OSError) -> CheckpointWriteError:
    """The error for a failed checkpoint write: what failed, the fix, and where a rerun starts."""
    full = err.errno in (errno.ENOSPC, errno.EDQUOT)
    fix = "free disk space (or pass another --out)" if full else f"make {out} writable"
    start = (
        f"it resumes from step {resumable}, the last checkpoint written whole"
        if resumable
        else "no checkpoint was written whole yet, so it starts afresh"
    )
    where = f" ({err.filename})" if err.filename else ""
    return CheckpointWriteError(
        f"cannot write the step-{step} checkpoint into {out}: {err.strerror or err}{where}. "
        f"Then {fix} and rerun the same command: {start}"
    )


def save_training_state(
    out: Path,
    model: Any,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    step: int,
    history: list[dict[str, float]],
    *,
    resumable: int,
    train_seconds: float | None = None,
) -> None:
    """Write the resume snapshot of ``step``, then the loadable model and ``trainer_state.json``.

    ``resumable`` is the step of the snapshot already on disk, named in the error if this write
    fails (an OSError becomes :class:`CheckpointWriteError`; the old snapshot is untouched)."""
    state = _trainer_state(cfg, step, history)
    tensors = {f"model.{k}": v for k, v in model_tensors(model).items()}
    tensors.update({f"optimizer.{k}": v for k, v in _optimizer_tensors(optimizer).items()})
    metadata = {
        "format": SNAPSHOT_FORMAT,
        "trainer_state": json.dumps(state),
        "model_config": model.config.to_json(),
    }
    try:
        (out / SNAPSHOT).parent.mkdir(parents=True, exist_ok=True)
        _save_tensors(out / SNAPSHOT, tensors, metadata)
    except OSError as err:
        raise _write_failed(out, step, resumable, err) from err
    try:
        save_checkpoint(out, model, cfg)
        atomic.write_text(out / "trainer_state.json", json.dumps(state, indent=2))
        if train_seconds is not None:
            atomic.write_json(out / TRAIN_TIME, {"step": step, "train_seconds": train_seconds})
    except OSError as err:
        raise _write_failed(out, step, step, err) from err


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete the temporary files a killed write left behind (``.NAME.*.tmp`` of the files a
    run writes); they are never read, only waste space. Returns what was removed."""
    removed: list[Path] = []
    written = (*EXPORTED, TRAIN_TIME)
    for directory, names in ((out, written), ((out / SNAPSHOT).parent, (SNAPSHOT.name,))):
        for name in names:
            for stale in directory.glob(f".{name}.*.tmp"):
                stale.unlink(missing_ok=True)
                removed.append(stale)
    return removed


def _same_configuration(
    out: Path, model: Any, cfg: TrainConfig, model_config: Any, train_config: Any
) -> None:
    ours = json.loads(model.config.to_json()), json.loads(json.dumps(asdict(cfg)))
    if (model_config, train_config) != ours:
        raise CheckpointError(
            f"{out} holds a checkpoint of a different configuration; use another --out "
            "directory or delete it to start afresh"
        )


def _read_snapshot(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    """Metadata and tensors of a resume snapshot, or CheckpointError if it is not one."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"{path} cannot be read as a resume snapshot ({err}); loopscope writes it whole or "
            f"not at all, so it was changed by something else: delete {path.parent} to resume "
            "from the loadable model files instead, or delete the directory to start afresh"
        ) from None
    if metadata.get("format") != SNAPSHOT_FORMAT or "trainer_state" not in metadata:
        raise CheckpointError(
            f"{path} is not a loopscope resume snapshot (format {metadata.get('format')!r}); "
            f"delete {path.parent} or choose another --out"
        )
    return metadata, tensors


def load_training_state(
    out: Path, model: Any, optimizer: torch.optim.Optimizer, cfg: TrainConfig
) -> tuple[int, list[dict[str, float]]] | None:
    """Restore ``model`` and ``optimizer`` from the resume snapshot in ``out``; (step, history),
    or None when there is none. A snapshot of another configuration is refused."""
    path = out / SNAPSHOT
    if not path.exists():
        return _load_legacy_state(out, model, optimizer, cfg)
    metadata, tensors = _read_snapshot(path)
    state = json.loads(metadata["trainer_state"])
    _same_configuration(
        out, model, cfg, json.loads(metadata.get("model_config", "null")), state["train_config"]
    )
    weights = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    moments = {
        k.removeprefix("optimizer."): v for k, v in tensors.items() if k.startswith("optimizer.")
    }
    model.load_state_dict(weights, strict=False)
    _restore_optimizer(optimizer, moments)
    return int(state["step"]), list(state["history"])


def _load_legacy_state(
    out: Path, model: Any, optimizer: torch.optim.Optimizer, cfg: TrainConfig
) -> tuple[int, list[dict[str, float]]] | None:
    """A directory from before the resume snapshot: weights, optimizer and trainer state in
    three files (read only when all three are there)."""
    state_path, optimizer_path = out / "trainer_state.json", out / LEGACY_OPTIMIZER
    if not (state_path.exists() and optimizer_path.exists()):
        return None
    state = json.loads(state_path.read_text())
    saved_model = json.loads((out / "config.json").read_text())
    _same_configuration(out, model, cfg, saved_model, state["train_config"])
    model.load_state_dict(load_file(str(out / "model.safetensors")), strict=False)
    _restore_optimizer(optimizer, load_file(str(optimizer_path)))
    return int(state["step"]), list(state["history"])
