"""Tolerances for comparing floating-point results, derived from the arithmetic instead of fitted
to one machine.

Two evaluations of one formula can round differently: torch picks its CPU kernels at start-up
(AVX-512, AVX2 or portable scalar code, see ``ATEN_CPU_CAPABILITY``), and so do MKL and oneDNN;
a fused kernel sums in another order than an eager one; a reference implementation orders its
operations its own way. Storing a result x in a type with machine epsilon ε =
``torch.finfo(dtype).eps`` rounds it to nearest, an error of at most ε/2·|x|.

**A sum of n terms** is rounded n times. In the worst case every rounding goes the same way and
the error is n·ε/2·|x|. That needs n rounding errors of one sign, which round-to-nearest on
varied data does not produce, so we use the random-rounding bound instead: n independent,
zero-mean errors each at most ε/2·|x| exceed λ·√n·ε/2·|x| with probability at most
2·exp(−λ²/2) (Hoeffding's inequality). With λ = 7 that is 5e-11 per compared element, so
among the million or so elements the whole suite compares, one fails by chance with probability
below 1e-4. Two evaluations that each err this way differ by at most twice the bound, λ·√n·ε·|x|.

**Depth.** A forward pass of L layers in sequence (prelude, block layers times recurrences,
coda, head) rounds L·(n + 1) times: the widest sum of n terms and the stored output in each
layer. A pre-norm residual layer carries the error of its input on with a gain near one, and
the roundings of different layers are as independent as those inside one sum, so all of them
add up as one random walk: ``forward_tolerance`` = λ·√(L·(n + 1))·ε·|x|.

**A narrower copy of a model** (bfloat16 weights against a float32 reference) is different:
rounding the weights is one fixed perturbation, and a looped model applies the same perturbed
block at every recurrence, so its effects add coherently, in proportion to L rather than √L.
One layer's output y = Σ wⱼxⱼ with weights and inputs rounded errs by Σ wⱼxⱼ(δⱼ + ηⱼ), |δⱼ|,
|ηⱼ| ≤ ε/2: independent over the n terms, this is at most λ·ε·√(Σ(wⱼxⱼ)²) ≈ λ·ε·|y| for
terms of random sign. CPU kernels accumulate half-precision sums in float32, whose own rounding
is negligible next to that. So ``cast_tolerance`` = λ·L·ε·|x|.

|x| is the largest magnitude among the values compared: the error of a result is set by the
size of the terms that made it, not by the result itself (which may cancel to near zero), so a
per-element relative tolerance would be wrong near zero and a norm-wise one is used instead.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, cast

import numpy as np
import torch

CONFIDENCE = 7.0  # λ above: 2·exp(−λ²/2) ≈ 5e-11 chance of a false failure per element


class LayerCounts(Protocol):
    """The part of a family's ``FamilyMeta`` that fixes a forward pass's depth."""

    prelude_layers: int
    block_layers: int
    coda_layers: int


FloatType = torch.dtype | type[np.floating] | np.dtype


def eps(dtype: FloatType) -> float:
    """Machine epsilon: the gap between 1 and the next number of ``dtype`` (torch or numpy)."""
    if isinstance(dtype, torch.dtype):
        return float(torch.finfo(dtype).eps)
    return float(np.finfo(dtype).eps)


def magnitude(*values: torch.Tensor | np.ndarray | float) -> float:
    """Largest finite absolute value among the values compared (|x| of the module docstring)."""
    largest = 0.0
    for value in values:
        array = value.detach().double() if isinstance(value, torch.Tensor) else value
        finite = np.abs(np.asarray(array, dtype=np.float64))
        finite = finite[np.isfinite(finite)]
        if finite.size:
            largest = max(largest, float(finite.max()))
    return largest


def rounding_tolerance(dtype: FloatType, magnitude: float, terms: int = 1) -> float:
    """|difference| between two evaluations of one sum of ``terms`` terms (or one short
    expression of that many rounded operations) of size ``magnitude``: λ·√n·ε·|x|."""
    return CONFIDENCE * math.sqrt(terms) * eps(dtype) * magnitude


def forward_tolerance(dtype: FloatType, magnitude: float, depth: int, terms: int) -> float:
    """|difference| between two evaluations, in ``dtype``, of a ``depth``-layer computation
    whose widest sum has ``terms`` terms, that differ only in rounding: λ·√(L·(n+1))·ε·|x|."""
    return CONFIDENCE * math.sqrt(depth * (terms + 1)) * eps(dtype) * magnitude


def cast_tolerance(dtype: FloatType, magnitude: float, depth: int) -> float:
    """|difference| between a ``depth``-layer model run with its weights in ``dtype`` and its
    float32 reference: the weights' rounding repeats at every layer, λ·L·ε·|x|."""
    return CONFIDENCE * depth * eps(dtype) * magnitude


def forward_depth(meta: LayerCounts, recurrences: int) -> int:
    """Layers a pass of ``recurrences`` recurrences runs in sequence, the head included."""
    return meta.prelude_layers + recurrences * meta.block_layers + meta.coda_layers + 1


def widest_sum(model: torch.nn.Module) -> int:
    """Terms in the longest dot product of a forward pass: the widest input of any weight
    matrix (attention sums over positions and head dimensions are shorter in these tests)."""
    return max(p.shape[-1] for p in model.parameters() if p.dim() == 2)


def model_tolerance(model: torch.nn.Module, expected: torch.Tensor, recurrences: int) -> float:
    """``forward_tolerance`` for a family model's pass of ``recurrences`` recurrences, compared
    with ``expected``: its own dtype, depth from its meta (the whole pass, so an upper bound for
    a state inside it), sums from its weights."""
    dtype = next(model.parameters()).dtype
    depth = forward_depth(cast(Any, model).meta, recurrences)
    return forward_tolerance(dtype, magnitude(expected), depth, widest_sum(model))


def truncated_normal_tolerance(dtype: FloatType, std: float, cut: float = 3.0) -> float:
    """|difference| between two CPUs' draws, from one seeded generator, of a normal truncated at
    ±``cut``·``std`` (``torch.nn.init.trunc_normal_``). The generator's uniforms are bitwise
    the same everywhere, but the draw maps them to y = a + (b − a)·u, which AVX builds compute
    with a fused multiply-add and the portable build with two roundings: y differs by up to ε.
    The draw is std·√2·erfinv(y), and erfinv's slope (√π/2)·exp(erfinv(y)²) is at most
    (√π/2)·exp(cut²/2) inside the cut, so |Δ| ≤ std·√(π/2)·exp(cut²/2)·ε, plus a rounding of
    each of the two products that follow (ε·cut·std)."""
    slope = math.sqrt(math.pi / 2) * math.exp(cut * cut / 2)
    return (slope + cut) * std * eps(dtype)
