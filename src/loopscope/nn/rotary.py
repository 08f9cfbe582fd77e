"""Rotary position embeddings, shared by every family: the frequency recipe (:class:`RopeSpec`)
and the per-length cos/sin tables (:class:`RotaryTable`) in the two channel pairings that
published checkpoints use.

* ``pairs``: adjacent channels (2i, 2i+1) are rotated together, in fp32 (Huginn, Parcae);
* ``half``: channel i is rotated with channel i + head_dim/2 ("rotate-half"), in the input's
  dtype (Hugging Face's convention: Llama, OLMo-2, Ouro, and our own LoopLM).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

RopeStyle = Literal["pairs", "half"]

#: The name published checkpoints give a stored rotary table (Huginn, Parcae): a tensor
#: (1, T, 1, head_dim/2, 2) holding (cos, sin), used as is when present.
ROPE_TABLE = "freqs_cis"


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding: channel pairing, base, and Llama-3 frequency scaling (None = plain)."""

    style: RopeStyle
    base: float
    scaling: tuple[tuple[str, float], ...] | None = None

    def inv_freq(self, head_dim: int, device: torch.device | None = None) -> Tensor:
        """Per-pair angular frequencies (head_dim/2,), float32, computed on ``device``."""
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
        inv = 1.0 / (self.base**exponents)
        if self.scaling is None:
            return inv
        return llama3_scaled(inv, dict(self.scaling))


def llama3_scaled(inv: Tensor, s: dict[str, float]) -> Tensor:
    """Llama-3 context extension: long wavelengths are slowed by ``factor``, short ones kept, the
    band between blended linearly in 1/wavelength."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv
    slowed = torch.where(wavelength > old_context / low, inv / factor, inv)
    blend = (old_context / wavelength - low) / (high - low)
    blended = (1 - blend) * slowed / factor + blend * slowed
    in_band = ~(wavelength < old_context / high) & ~(wavelength > old_context / low)
    return torch.where(in_band, blended, slowed)


class RotaryTable:
    """Rotary cos/sin tables (float32) for a number of positions, in one of the two pairings."""

    def __init__(self, style: RopeStyle, angles: Tensor) -> None:
        self.style = style
        self.cos = angles.cos()
        self.sin = angles.sin()

    @classmethod
    def from_table(cls, table: Tensor) -> RotaryTable:
        """From a stored ``freqs_cis`` (1, T, 1, head_dim/2, 2) = (cos, sin), adjacent pairs."""
        rope = cls.__new__(cls)
        rope.style = "pairs"
        rope.cos = table[0, :, 0, :, 0].float()
        rope.sin = table[0, :, 0, :, 1].float()
        return rope

    def apply(self, x: Tensor, offset: int = 0) -> Tensor:
        """Rotate ``x`` of shape (batch, heads, T, head_dim) whose first token sits at position
        ``offset`` (non-zero when decoding with a key/value cache)."""
        t = x.shape[-2]
        cos = self.cos[offset : offset + t].to(x.device)
        sin = self.sin[offset : offset + t].to(x.device)
        return self._rotate(x, cos, sin)

    def apply_at(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate one new token per row, ``x`` (batch, heads, 1, head_dim), row b sitting at
        position ``positions[b]`` (a batch of prompts of different lengths being decoded)."""
        index = positions.to(self.cos.device)
        cos = self.cos[index].to(x.device)[:, None, None, :]
        sin = self.sin[index].to(x.device)[:, None, None, :]
        return self._rotate(x, cos, sin)

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """The rotation itself, ``cos``/``sin`` broadcasting against (…, T, head_dim/2)."""
        if self.style == "pairs":  # adjacent channels (2i, 2i+1), computed in fp32
            pairs = x.float().unflatten(-1, (-1, 2))
            a, b = pairs[..., 0], pairs[..., 1]
            out = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
            return out.type_as(x)
        # rotate-half in x's dtype: x·cos + (−x₂, x₁)·sin, each half written in place (a − b·s
        # is a + (−b)·s exactly, so this equals the concatenated formula bit for bit)
        cos2 = torch.cat([cos, cos], dim=-1).to(x.dtype)
        sin_half = sin.to(x.dtype)
        half = x.shape[-1] // 2
        first, second = x[..., :half], x[..., half:]
        out = x * cos2
        out[..., :half] -= second * sin_half
        out[..., half:] += first * sin_half
        return out
