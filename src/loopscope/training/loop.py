"""Training small looped models on the synthetic reasoning task.

Constant or Huginn-style sampled recurrences, truncated backprop depth, loss on the final
output or summed over recurrences (Ouro), AdamW with warmup + cosine, periodic held-out loss and
exact-answer accuracy, safetensors checkpoints, and resume after interruption: the batch of step
s is a pure function of (seed, s), so a resumed run sees exactly the data it would have seen.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from loopscope.core import atomic
from loopscope.training.config import TrainConfig, learning_rate, sample_recurrences
from loopscope.training.objective import batch_for_step, training_loss


class TrainingDivergedError(RuntimeError):
    """The loss became NaN/Inf."""


# -- checkpoints --------------------------------------------------------------------------


def _atomic_save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic.write_with(path, lambda name: save_file(cpu, name))


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


def save_checkpoint(
    out_dir: Path, model: Any, train_cfg: TrainConfig, dtype: torch.dtype | None = None
) -> None:
    """``model.safetensors`` + ``config.json`` (+ ``train_config.json``), written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = model_tensors(model)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    _atomic_save_tensors(tensors, out_dir / "model.safetensors")
    atomic.write_text(out_dir / "config.json", model.config.to_json())
    atomic.write_text(out_dir / "train_config.json", json.dumps(asdict(train_cfg), indent=2))


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"{index}.{key}"] = torch.as_tensor(value)
    return tensors


def _load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    flat = load_file(str(path))
    state: dict[int, dict[str, Tensor]] = {}
    for name, value in flat.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    full = optimizer.state_dict()
    full["state"] = state
    optimizer.load_state_dict(full)


@dataclass
class TrainResult:
    out_dir: Path
    steps_done: int
    history: list[dict[str, float]]
    resumed_from: int


def train(
    model: Any,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    progress: bool = True,
    stop_after: int | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train ``model`` (a LoopLM) and checkpoint into ``out_dir``; resumes if a checkpoint of a
    previous run of the same config is there. ``stop_after`` ends early after that many new
    steps (used to test resumption)."""
    from tqdm.auto import tqdm

    from loopscope.training.evaluation import evaluate

    out = Path(out_dir)
    torch.manual_seed(cfg.seed)
    model.to(device)
    optimizer = torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95)
    )
    start, history = _maybe_resume(out, model, optimizer, cfg, log)
    ctx = model.meta.context_length
    bar = tqdm(
        total=cfg.steps, initial=start, disable=not progress, desc=f"train {model.meta.name}"
    )
    step = start
    last_save = time.monotonic()
    previous_handler = _stop_on_sigterm()
    try:
        while step < cfg.steps and (stop_after is None or step - start < stop_after):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, cfg)
            ids, mask = batch_for_step(step, cfg, ctx)
            ids, mask = ids.to(device), mask.to(device)
            model.train()
            loss = training_loss(
                model, ids, mask, sample_recurrences(step, cfg, model.meta.train_recurrences), cfg
            )
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"loss became {loss.item()} at step {step}; lower --lr (now {cfg.lr}) or "
                    "set backprop_depth; the last good checkpoint is kept in " + str(out)
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % cfg.eval_every == 0 or step == cfg.steps:
                record = {"step": float(step), "train_loss": float(loss.item())}
                record.update(evaluate(model, cfg, device=device))
                history.append(record)
                log(json.dumps(record))
            if step % cfg.checkpoint_every == 0 or time.monotonic() - last_save > 120:
                _save_state(out, model, optimizer, cfg, step, history)
                last_save = time.monotonic()
    finally:
        bar.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        if step > start:
            _save_state(out, model, optimizer, cfg, step, history)
    return TrainResult(out, step, history, start)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _stop_on_sigterm() -> Any:
    """Turn SIGTERM (how schedulers and `kill` stop jobs) into KeyboardInterrupt so the last
    finished step is checkpointed; returns the previous handler (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _save_state(
    out: Path,
    model: Any,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    step: int,
    history: list[dict[str, float]],
) -> None:
    save_checkpoint(out, model, cfg)
    _atomic_save_tensors(_optimizer_tensors(optimizer), out / "optimizer.safetensors")
    state = {"step": step, "history": history, "train_config": asdict(cfg)}
    atomic.write_text(out / "trainer_state.json", json.dumps(state, indent=2))


def _maybe_resume(
    out: Path,
    model: Any,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    log: Callable[[str], None],
) -> tuple[int, list[dict[str, float]]]:
    state_path = out / "trainer_state.json"
    if not state_path.exists():
        return 0, []
    state = json.loads(state_path.read_text())
    saved_model = json.loads((out / "config.json").read_text())
    if saved_model != json.loads(model.config.to_json()) or state["train_config"] != asdict(cfg):
        raise ValueError(
            f"{out} holds a checkpoint of a different configuration; use another --out "
            "directory or delete it to start afresh"
        )
    model.load_state_dict(load_file(str(out / "model.safetensors")), strict=False)
    _load_optimizer(optimizer, out / "optimizer.safetensors")
    log(f"resuming from step {state['step']} in {out}")
    return int(state["step"]), list(state["history"])
