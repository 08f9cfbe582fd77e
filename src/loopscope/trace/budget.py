"""What a trace will cost before it runs: bytes on disk, peak device memory, a FLOP lower
bound on its time, and the batch size that fits in free memory.

Every estimate is a pure function of a :class:`ModelShape` (read off a loaded model, or
written down for a published one), the prompts' token counts and the trace settings, so the
command line can print them first and a study can be planned without loading anything.

- Disk: the arrays of a chunk are exact (``.npy`` header plus elements); the JSON and ``.npz``
  files are estimated per site (``tests/trace/test_budget.py`` checks the total against traces
  written on disk, within :data:`DISK_MARGIN`).
- Device memory: the weights plus the largest transient of one forward (attention scores,
  MLP activations, logits) and the probes' buffers; an estimate, not a bound.
- Time: the FLOPs of the matrix products and attention scores at the device's peak; no run
  can be faster, and a well-fed GPU runs within about 2× of it.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loopscope.trace.settings import TraceError, TraceSettings

#: Relative error of :func:`trace_bytes` against a trace written on disk that the tests allow.
DISK_MARGIN = 0.10
#: ``--max-disk`` default: 20 GB.
DEFAULT_MAX_DISK = 20 * 10**9
#: The share of free memory a chosen batch may fill (the rest absorbs fragmentation and
#: whatever the estimate misses).
HEADROOM = 0.8
MAX_AUTO_BATCH = 64
_NPY_HEADER = 128
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
#: stages.json holds about this many bytes per site (7 metrics, the site and its count).
_STAGES_BYTES_PER_SITE = 280
#: summary.npz: the zip entry of each array beyond its .npy bytes.
_NPZ_ENTRY = 130
#: stability.json per block layer: spectral radii, plus the attention-bound terms when the
#: states are stored.
_STABILITY_BYTES_PER_LAYER = {"full": 1400, "summary": 170}


def dtype_bytes(name: str) -> int:
    """Bytes per element of ``float32``, ``float16`` or ``bfloat16``."""
    if name not in _BYTES:
        raise TraceError(f"unknown dtype {name!r}; choose float32, float16 or bfloat16")
    return _BYTES[name]


@dataclass(frozen=True)
class ModelShape:
    """The sizes the estimates need. ``layer_params``: weights of one transformer layer
    (attention and MLP); ``inject_params``: weights applied once per recurrence to combine
    the state with the prelude output; ``mlp_width``: the MLP's hidden width;
    ``total_params``: every weight, embeddings included."""

    prelude_layers: int
    block_layers: int
    coda_layers: int
    d_model: int
    n_heads: int
    vocab_size: int
    mlp_width: int
    layer_params: int
    inject_params: int
    total_params: int
    dtype: str = "bfloat16"
    name: str = ""

    def layers_run(self, recurrences: int) -> int:
        """Layer applications in one forward: prelude, block × recurrences, coda."""
        return self.prelude_layers + recurrences * self.block_layers + self.coda_layers


def _params(module: Any) -> int:
    return sum(p.numel() for p in module.parameters()) if hasattr(module, "parameters") else 0


def shape_of(model: Any) -> ModelShape:
    """A loaded model's shape: its metadata, and parameter counts from its layers."""
    import torch

    meta = model.meta
    layers = [*model.prelude, *model.block, *model.coda]
    layer_params = max((_params(layer) for layer in layers), default=0)
    total = _params(model)
    embed = meta.vocab_size * meta.d_model
    rest = total - sum(_params(layer) for layer in layers)  # embeddings, injection, norms
    # untied input and output embeddings leave 2 × embed in the rest, tied ones 1 ×
    inject = rest - 2 * embed if rest >= 2 * embed else max(0, rest - embed)
    mlp = max(
        (
            max((p.shape[0] for p in layer.parameters() if p.ndim == 2), default=0)
            for layer in layers
            if hasattr(layer, "parameters")
        ),
        default=4 * meta.d_model,
    )
    first = next(model.parameters(), None)
    dtype = str(first.dtype).removeprefix("torch.") if first is not None else "float32"
    return ModelShape(
        meta.prelude_layers,
        meta.block_layers,
        meta.coda_layers,
        meta.d_model,
        meta.n_heads,
        meta.vocab_size,
        int(mlp),
        layer_params,
        inject,
        total,
        dtype if dtype in _BYTES else str(torch.float32).removeprefix("torch."),
        meta.name,
    )


# -- disk ---------------------------------------------------------------------------------


def _npy(elements: int, item: int) -> int:
    return _NPY_HEADER + elements * item


def chunk_bytes(
    shape: ModelShape, n_tokens: int, settings: TraceSettings, *, stability: bool = False
) -> int:
    """Bytes on disk of one prompt's chunk (see :mod:`loopscope.trace.writer` for its files)."""
    r, k = settings.recurrences, shape.block_layers
    state = dtype_bytes(settings.state_dtype) if settings.state_dtype in _BYTES else 4
    full = settings.capture == "full"
    # norms, steps, relative steps, cosines; attention steps; distances to X* (summary only)
    n_grids = 4 + int(settings.attention) + (0 if full else 3)
    grids = n_grids * (_npy(r * k, 8) + _NPZ_ENTRY) + _npy(n_tokens, 1) + _NPZ_ENTRY
    sites = shape.layers_run(r)
    total = _npy(n_tokens, 8) + grids + sites * _STAGES_BYTES_PER_SITE + 200
    total += _npy(r * n_tokens, 4)  # logit lens
    if stability:
        bound = full and settings.attention and settings.keeps_everything()
        total += _STABILITY_BYTES_PER_LAYER["full" if bound else "summary"] * k + 100
    if not full:
        return total
    kept_tokens = (
        n_tokens if settings.positions == "all" else len(settings.token_positions(n_tokens) or [])
    )
    kept_layers = k if settings.layers is None else len(settings.layers)
    kept_recurrences = r if settings.keep_recurrences is None else len(settings.keep_recurrences)
    d = shape.d_model
    total += _npy(kept_recurrences * kept_layers * kept_tokens * d, state)
    total += _npy(shape.prelude_layers * kept_tokens * d, state)
    total += _npy(shape.coda_layers * kept_tokens * d, state)
    if settings.keep_recurrences is not None:
        total += _npy(kept_recurrences, 8)
    if settings.attention:
        kept = len(settings.attention_kept())
        total += _npy(kept * k * shape.n_heads * kept_tokens * kept_tokens, state)
        total += _npy(kept, 8)
    return total


def trace_bytes(shape: ModelShape, lengths: Sequence[int], settings: TraceSettings) -> int:
    """Bytes on disk of a trace of prompts of ``lengths`` tokens (header and prompt list
    included)."""
    header = 2000 + sum(n + 40 for n in lengths)
    return header + sum(
        chunk_bytes(shape, n, settings, stability=i < settings.stability_prompts)
        for i, n in enumerate(lengths)
    )


# -- memory -------------------------------------------------------------------------------


def forward_bytes(shape: ModelShape, batch: int, n_tokens: int, settings: TraceSettings) -> int:
    """Device memory of one batched forward beyond the weights: the stream and the prelude
    output, one layer's MLP activations and attention scores, the logits, and the probes'
    buffers (fp32)."""
    act = dtype_bytes(shape.dtype)
    bt = batch * n_tokens
    stream = 6 * bt * shape.d_model * act
    mlp = 3 * bt * shape.mlp_width * act
    scores = 3 * batch * shape.n_heads * n_tokens * n_tokens * 4
    logits = 2 * bt * shape.vocab_size * 4
    probes = 3 * shape.block_layers * bt * shape.d_model * 4
    return stream + mlp + scores + logits + probes


def weight_bytes(shape: ModelShape) -> int:
    return shape.total_params * dtype_bytes(shape.dtype)


def peak_device_bytes(shape: ModelShape, batch: int, n_tokens: int, settings: TraceSettings) -> int:
    """Peak device memory of tracing batches of ``batch`` prompts of ``n_tokens`` tokens."""
    return weight_bytes(shape) + forward_bytes(shape, batch, n_tokens, settings)


def host_bytes_per_prompt(shape: ModelShape, n_tokens: int, settings: TraceSettings) -> int:
    """Host memory one prompt's captured states take until its chunk is written (what full
    capture keeps per batch row; summary capture keeps nothing)."""
    if settings.capture != "full":
        return 0
    return chunk_bytes(shape, n_tokens, settings)


def choose_batch_size(
    free_bytes: int, per_prompt_bytes: int, *, cap: int = MAX_AUTO_BATCH, headroom: float = HEADROOM
) -> int:
    """The most prompts per forward whose memory fits in ``headroom`` × ``free_bytes``
    (at least 1, at most ``cap``)."""
    if per_prompt_bytes <= 0:
        return cap
    return max(1, min(cap, int(free_bytes * headroom) // per_prompt_bytes))


def free_memory_bytes(device: str) -> int:
    """Free memory where tracing will allocate: the GPU's (``torch.cuda.mem_get_info``), else
    the host's available RAM (psutil when installed, else ``os.sysconf``)."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    return host_free_bytes()


def host_free_bytes() -> int:
    try:
        psutil = importlib.import_module("psutil")  # optional: not a dependency
        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30  # a platform that will not say: assume 4 GiB


# -- time ---------------------------------------------------------------------------------


def forward_flops(shape: ModelShape, lengths: Sequence[int], recurrences: int) -> float:
    """Multiply-add FLOPs (2 per multiply-add) of one forward over each prompt: every layer's
    weights once per token and application, the injection once per recurrence, the head, and
    causal attention scores (QKᵀ and the weighted sum: 2·D·T² per layer)."""
    per_token = (
        shape.layers_run(recurrences) * shape.layer_params
        + recurrences * shape.inject_params
        + shape.vocab_size * shape.d_model
    )
    total = 0.0
    for n in lengths:
        total += 2.0 * n * per_token + shape.layers_run(recurrences) * 2.0 * shape.d_model * n * n
    return total


def flop_seconds(flops: float, peak_tflops: float) -> float:
    """The lower bound on wall time: ``flops`` at the device's peak."""
    if not peak_tflops > 0:
        raise TraceError(f"the device's peak must be > 0 TFLOP/s, got {peak_tflops}")
    return flops / (peak_tflops * 1e12)


# -- the plan printed before tracing --------------------------------------------------------


@dataclass(frozen=True)
class CaptureChoice:
    """What ``--capture auto`` chose and why."""

    requested: str
    chosen: str
    full_bytes: int
    max_disk: int

    @property
    def fell_back(self) -> bool:
        return self.requested == "auto" and self.chosen == "summary"

    def message(self) -> str:
        if self.fell_back:
            return (
                f"capture auto: full states would take {gigabytes(self.full_bytes)} on disk, "
                f"over --max-disk {gigabytes(self.max_disk)}; keeping online summaries only "
                "(--capture summary). Raise --max-disk, or keep fewer --layers, "
                "--keep-recurrences or --positions, to store states"
            )
        return f"capture {self.chosen}" + (
            " (auto: the states fit)" if self.requested == "auto" else ""
        )

    def record(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "chosen": self.chosen,
            "estimated_full_bytes": self.full_bytes,
            "max_disk": self.max_disk,
        }


def choose_capture(
    shape: ModelShape, lengths: Sequence[int], settings: TraceSettings, max_disk: int
) -> CaptureChoice:
    """Full capture when its estimated size fits under ``max_disk``, else summary capture;
    an explicit ``full`` or ``summary`` is kept as given."""
    from dataclasses import replace

    full = trace_bytes(shape, lengths, replace(settings, capture="full"))
    if settings.capture != "auto":
        return CaptureChoice(settings.capture, settings.capture, full, max_disk)
    chosen = "full" if full <= max_disk else "summary"
    return CaptureChoice("auto", chosen, full, max_disk)


def default_state_dtype(model_dtype: str) -> str:
    """float32 states for a float32 model, float16 for any other (half the disk, and exact
    for bfloat16 values in float16's range)."""
    return "float32" if model_dtype == "float32" else "float16"


def gigabytes(n: float) -> str:
    """``n`` bytes as a short human figure (GB = 10⁹ bytes, like disks are sold)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_bytes(text: str) -> int:
    """A size as the command line takes it: ``20GB``, ``500MB``, ``1.5TB``, ``8GiB`` or a
    number of bytes."""
    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGTIB")
    unit = cleaned[len(number) :]
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise TraceError(
            f"cannot read the size {text!r}; write it like 20GB, 500MB, 8GiB or in bytes"
        ) from None
    if not value > 0:
        raise TraceError(f"a disk budget must be > 0, got {text!r}")
    return int(value)
