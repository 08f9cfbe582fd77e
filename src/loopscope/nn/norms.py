"""RMS norms in the two roundings the families need, and the norm factory of LoopLM.

Both normalise in fp32. They differ in where the result is cast back to the input's dtype:
:class:`RMSNorm` applies the gain in fp32 and casts last (our LoopLM), while
:class:`RMSNormCastBeforeGain` casts first and applies the gain in the input's dtype, as the
published checkpoints' own code does (Huginn, Ouro, Parcae). In fp32 the two agree exactly; in
bf16 they round differently, so each family uses the one its weights were trained with.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

NormType = Literal["rms", "layer"]


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain; the gain is applied in fp32, before the cast
    back to the input's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class RMSNormCastBeforeGain(nn.Module):
    """RMS norm as published checkpoints compute it: normalise in fp32, cast back to the
    input's dtype, then apply the gain."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def make_norm(kind: NormType, dim: int, eps: float) -> nn.Module:
    if kind == "rms":
        return RMSNorm(dim, eps)
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"unknown norm type {kind!r}; use 'rms' or 'layer'")
