"""States captured outside loopscope (with nnsight, or plain forward hooks) laid out as a
loopscope trace lays out its ``block`` states, so every analysis runs on them unchanged.

A looped model runs each block layer once per recurrence; a tool that records a module's output
at each of its calls (nnsight's ``tracer.iter[:R]``) hands back, per recurrence, one output per
block layer: a ``(batch, token, hidden)`` tensor, or a tuple whose first item is one.
:func:`block_states` stacks them into the ``(recurrence, layer, token, hidden)`` float32 array
of ``block.npy``; :func:`labelled_block` pads prompts of different lengths into the ``xarray``
layout of ``open_trace(...).block``. Neither imports nnsight::

    with NNsight(model).trace(ids, recurrences=R) as tracer:
        outputs = list().save()
        for _ in tracer.iter[:R]:
            outputs.append([layer.output for layer in wrapped.block_stack])
    states = block_states(outputs)             # (R, L, T, D), row 0 of the batch
    successive_differences(states)             # any of loopscope.analysis.dynamics
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from loopscope.trace.settings import TraceError

__all__ = ["block_states", "labelled_block"]


def _first_tensor(output: Any) -> Any:
    """A module's output, or the first item of a tuple output (a layer returning extras)."""
    while isinstance(output, (tuple, list)):
        if not output:
            raise TraceError("a captured layer output is an empty tuple; capture its tensor")
        output = output[0]
    return output


def _as_numpy(value: Any) -> np.ndarray:
    detach = getattr(value, "detach", None)
    if detach is not None:  # a torch tensor: to the CPU, widened to float32 (bfloat16 too)
        value = detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def block_states(outputs: Sequence[Sequence[Any]], row: int = 0) -> np.ndarray:
    """``outputs[r][l]`` (block layer ``l``'s output at recurrence ``r``, batch first) as the
    ``(recurrence, layer, token, hidden)`` float32 array of batch row ``row``."""
    if not outputs or not all(len(layers) == len(outputs[0]) > 0 for layers in outputs):
        raise TraceError(
            "captured outputs must hold, for every recurrence, one output per block layer "
            f"(got {[len(layers) for layers in outputs]} layers per recurrence)"
        )
    rows = [[_as_numpy(_first_tensor(out)) for out in layers] for layers in outputs]
    shapes = {a.shape for layers in rows for a in layers}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise TraceError(
            f"captured outputs must all be (batch, token, hidden) arrays, got shapes {shapes}"
        )
    return np.stack([np.stack([a[row] for a in layers]) for layers in rows])


def labelled_block(states: Sequence[np.ndarray]) -> Any:
    """Per-prompt ``(recurrence, layer, token, hidden)`` arrays as one ``xarray.DataArray``
    (prompt, recurrence, layer, token, hidden), padded with NaN to the longest prompt, with the
    ``length`` coordinate, as ``open_trace(...).block`` holds a full trace's states."""
    import xarray as xr

    if not states:
        raise TraceError("labelled_block needs the states of at least one prompt")
    longest = max(s.shape[2] for s in states)
    padded = np.full((len(states), *states[0].shape[:2], longest, states[0].shape[3]), np.nan)
    for i, s in enumerate(states):
        padded[i, :, :, : s.shape[2]] = s
    r, n_layers, _, d = states[0].shape
    return xr.DataArray(
        padded.astype(np.float32),
        dims=("prompt", "recurrence", "layer", "token", "hidden"),
        coords={
            "prompt": range(len(states)),
            "recurrence": range(r),
            "layer": range(n_layers),
            "token": range(longest),
            "hidden": range(d),
            "length": ("prompt", [s.shape[2] for s in states]),
        },
        name="block",
    )
