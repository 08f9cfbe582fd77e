"""Training small looped models on the synthetic reasoning task.

Constant or Huginn-style sampled recurrences, truncated backprop depth, loss on the final
output or summed over recurrences (Ouro), AdamW with warmup + cosine, periodic held-out loss and
exact-answer accuracy, safetensors checkpoints, and resume after interruption: the batch of step
s is a pure function of (seed, s), so a resumed run sees exactly the data it would have seen and
ends with the same weights, bit for bit (checkpoints: see training/checkpoints.py).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loopscope.core.errors import LoopscopeError
from loopscope.training.checkpoints import (
    CheckpointWriteError,
    load_training_state,
    recorded_train_seconds,
    remove_stale_temporaries,
    save_checkpoint,
    save_training_state,
)
from loopscope.training.config import TrainConfig, learning_rate, sample_recurrences
from loopscope.training.objective import batch_for_step, training_loss

#: ``save_checkpoint`` lives in training.checkpoints; it is offered here too, where the
#: training loop that writes checkpoints is.
__all__ = ["TrainResult", "TrainingDivergedError", "save_checkpoint", "train"]


class TrainingDivergedError(LoopscopeError, RuntimeError):
    """The loss became NaN/Inf (a RuntimeError too, as the run cannot go on)."""


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
    earlier_seconds = (recorded_train_seconds(out) or 0.0) if start else 0.0
    session_start = time.monotonic()

    def seconds() -> float:
        return earlier_seconds + time.monotonic() - session_start

    ctx = model.meta.context_length
    bar = tqdm(
        total=cfg.steps, initial=start, disable=not progress, desc=f"train {model.meta.name}"
    )
    step = saved = start
    last_save = time.monotonic()
    previous_handler = _stop_on_sigterm()
    write_failed = False
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
                save_training_state(
                    out,
                    model,
                    optimizer,
                    cfg,
                    step,
                    history,
                    resumable=saved,
                    train_seconds=seconds(),
                )
                saved, last_save = step, time.monotonic()
    except CheckpointWriteError:
        write_failed = True  # the disk refused once; the error says where a rerun resumes
        raise
    finally:
        bar.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        if step > saved and not write_failed:
            save_training_state(
                out, model, optimizer, cfg, step, history, resumable=saved, train_seconds=seconds()
            )
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


def _maybe_resume(
    out: Path,
    model: Any,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    log: Callable[[str], None],
) -> tuple[int, list[dict[str, float]]]:
    """Start from the resume snapshot in ``out`` when there is one (step 0 otherwise), after
    removing the temporary files a killed write may have left there."""
    if not out.is_dir():
        return 0, []
    remove_stale_temporaries(out)
    resumed = load_training_state(out, model, optimizer, cfg)
    if resumed is None:
        return 0, []
    log(f"resuming from step {resumed[0]} in {out}")
    return resumed
