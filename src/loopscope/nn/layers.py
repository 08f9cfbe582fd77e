"""Transformer building blocks: the causal attention core every family calls, and LoopLM's
attention, MLPs and block layer with its four optional norms (norms live in
:mod:`loopscope.nn.norms`, rotary embeddings in :mod:`loopscope.nn.rotary`).

A block layer computes ``X̂ = n2(X + a·Attn(n1(X)))`` and ``X' = n4(X̂ + a·MLP(n3(X̂)))``; which of
n1..n4 exist is the *norm scheme*. Ouro's sandwich puts n2/n4 on the branch outputs instead of
the stream. Every layer can return its attention probabilities (an eager path) and otherwise
uses PyTorch's fused scaled-dot-product attention.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loopscope.nn.kv_cache import KVSlot, cached_attention, rotate_new
from loopscope.nn.norms import NormType, make_norm
from loopscope.nn.rotary import RotaryTable

NormScheme = Literal["pre", "post", "huginn", "ouro"]
MLPType = Literal["gated", "plain"]
Component = Literal["attn", "mlp"]

#: An edit rewrites a branch output (``component`` is "attn" or "mlp") before it joins the
#: residual stream; interventions (zero, replace, any callable) are edits.
Edit = Callable[[Component, Tensor], Tensor]

NORM_SCHEMES: tuple[NormScheme, ...] = ("pre", "post", "huginn", "ouro")


def causal_attention_probs(q: Tensor, k: Tensor) -> Tensor:
    """Row-stochastic causal attention probabilities, (batch, heads, T, T), in fp32."""
    t = q.shape[-2]
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(mask, float("-inf")).softmax(dim=-1)


def causal_attention(
    q: Tensor, k: Tensor, v: Tensor, return_attn: bool
) -> tuple[Tensor, Tensor | None]:
    """Causal attention over (batch, heads, T, head_dim) queries and (batch, kv_heads, T,
    head_dim) keys/values (grouped-query when kv_heads < heads). With ``return_attn`` it takes
    the eager path and also returns the probabilities, else PyTorch's fused kernel.

    Every family's attention goes through here so the eager path means the same everywhere."""
    probs: Tensor | None = None
    n_heads, n_kv = q.shape[1], k.shape[1]
    # 0 · NaN is NaN: without this a diverged later token would poison every earlier one
    # through the masked (zero-probability) entries of the causal product, on both paths. The
    # diverged token stays diverged through its residual stream; finite V is untouched.
    v = torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)  # where(isfinite(v), v, 0)
    if return_attn:
        group = n_heads // n_kv
        if group > 1:
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        probs = causal_attention_probs(q, k)
        out = probs.to(v.dtype) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_kv != n_heads)
    return out, probs


def rotary_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rotary: RotaryTable,
    return_attn: bool,
    kv: KVSlot | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Rotate queries and keys, then :func:`causal_attention` over the whole sequence; with a
    key/value cache slot ``kv``, the new tokens are rotated at the positions that follow the
    cached ones and attend to those too (:func:`loopscope.nn.kv_cache.cached_attention`)."""
    if kv is None:
        q, k = rotary.apply(q), rotary.apply(k)
        return causal_attention(q, k, v, return_attn)
    if return_attn:
        raise ValueError("attention probabilities are not kept with a key/value cache")
    q, k = rotate_new(rotary, q, kv), rotate_new(rotary, k, kv)
    return cached_attention(q, k, v, kv), None


class Attention(nn.Module):
    """Multi-head causal self-attention with rotary positions."""

    def __init__(self, d_model: int, n_heads: int, bias: bool = False) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(
        self,
        x: Tensor,
        rotary: RotaryTable,
        return_attn: bool = False,
        kv: KVSlot | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out, probs = rotary_attention(q, k, v, rotary, return_attn, kv)
        return self.proj(out.transpose(1, 2).reshape(b, t, d)), probs


class MLP(nn.Module):
    """Gated (SwiGLU) or plain (GELU) feed-forward branch; ``down`` is the output projection
    whose columns the neuron-class analysis projects onto the unembedding."""

    def __init__(self, d_model: int, hidden: int, kind: MLPType) -> None:
        super().__init__()
        self.kind = kind
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.gate = nn.Linear(d_model, hidden, bias=False) if kind == "gated" else None
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is not None:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x)))


def _norm_slots(scheme: NormScheme) -> tuple[bool, bool, bool, bool]:
    """Which of n1..n4 a scheme uses: pre-norm normalises the branch inputs (n1, n3), post-norm
    the stream after each branch joins it (n2, n4); Huginn's and Ouro's sandwiches use all four
    (Ouro's n2 / n4 on the branch outputs rather than on the stream)."""
    return {
        "pre": (True, False, True, False),
        "post": (False, True, False, True),
        "huginn": (True, True, True, True),
        "ouro": (True, True, True, True),
    }[scheme]


class BlockLayer(nn.Module):
    """One transformer layer with the norm scheme as data, not as separate classes."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        mlp_hidden: int,
        *,
        scheme: NormScheme,
        norm_type: NormType,
        mlp_type: MLPType,
        residual_scale: float = 1.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if scheme not in NORM_SCHEMES:
            raise ValueError(f"unknown norm scheme {scheme!r}; choose one of {NORM_SCHEMES}")
        self.scheme = scheme
        self.residual_scale = residual_scale
        slots = _norm_slots(scheme)
        self.norms = nn.ModuleList(
            [make_norm(norm_type, d_model, eps) if used else nn.Identity() for used in slots]
        )
        self.attn = Attention(d_model, n_heads)
        self.mlp = MLP(d_model, mlp_hidden, mlp_type)

    def forward(
        self,
        x: Tensor,
        rotary: RotaryTable,
        *,
        return_attn: bool = False,
        edit: Edit | None = None,
        kv: KVSlot | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``kv``: this layer application's key/value cache slot when decoding incrementally
        (the new tokens of ``x`` follow the cached ones); None runs over the whole sequence."""
        n1, n2, n3, n4 = self.norms
        a, probs = self.attn(n1(x), rotary, return_attn, kv)
        if self.scheme == "ouro":
            a = n2(a)
        if edit is not None:
            a = edit("attn", a)
        h = x + self.residual_scale * a
        if self.scheme != "ouro":
            h = n2(h)
        m = self.mlp(n3(h))
        if self.scheme == "ouro":
            m = n4(m)
        if edit is not None:
            m = edit("mlp", m)
        out = h + self.residual_scale * m
        if self.scheme != "ouro":
            out = n4(out)
        return out, probs
