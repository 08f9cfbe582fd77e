"""Input injection: how the prelude output X (the injected input e) enters the recurrent state
Z at the start of every recurrence. Each variant is its own small module, one class per piece
of maths, so a new variant is one class; every family builds its injection from these."""

from __future__ import annotations

from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

InjectionKind = Literal["none", "add", "concat-linear", "gated", "diagonal"]
INJECTIONS: tuple[InjectionKind, ...] = ("none", "add", "concat-linear", "gated", "diagonal")


class NoInjection(nn.Module):
    """The state just carries over (Ouro)."""

    def forward(self, state: Tensor, inputs: Tensor) -> Tensor:
        return state


class AddInjection(nn.Module):
    """Z + X."""

    def forward(self, state: Tensor, inputs: Tensor) -> Tensor:
        return state + inputs


class ConcatLinearInjection(nn.Module):
    """W·[Z; X] with W: (state + input width) → state width (Huginn's adapter, Parcae's
    "linear" injection). The input width defaults to the state's. LoopLM starts W at
    (Z + X)/√2 plus noise and a retrofit at a multiple of [I, I]; both set it after building."""

    def __init__(self, state_dim: int, input_dim: int | None = None, bias: bool = False) -> None:
        super().__init__()
        width = state_dim + (state_dim if input_dim is None else input_dim)
        self.adapter = nn.Linear(width, state_dim, bias=bias)

    def forward(self, state: Tensor, inputs: Tensor) -> Tensor:
        return cast(Tensor, self.adapter(torch.cat([state, inputs], dim=-1)))


class GatedInjection(nn.Module):
    """g·Z + (1 − g)·X with a learned sigmoid gate g = σ(W·[Z; X] + b)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.gate = nn.Linear(2 * d_model, d_model)

    def forward(self, state: Tensor, inputs: Tensor) -> Tensor:
        g = torch.sigmoid(self.gate(torch.cat([state, inputs], dim=-1)))
        return g * state + (1 - g) * inputs


class DiagonalDecayInjection(nn.Module):
    """LoopLM's stable diagonal recurrence: Z' = a ⊙ Z + W·X with a per-channel decay
    a = exp(−exp(log_rate)) in (0, 1), learned directly, so the injected linear recurrence can
    never blow up. Compare :class:`DiscretisedDiagonalInjection`, which learns a continuous-time
    rate and step instead."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.log_rate = nn.Parameter(torch.zeros(d_model))
        self.input_proj = nn.Linear(d_model, d_model, bias=False)

    def decay(self) -> Tensor:
        return torch.exp(-torch.exp(self.log_rate))

    def forward(self, state: Tensor, inputs: Tensor) -> Tensor:
        return self.decay().to(state.dtype) * state + self.input_proj(inputs)


class DiscretisedDiagonalInjection(nn.Module):
    """Parcae's injection, the zero-order-hold discretisation of ḣ = −A h + B e:

        h ← exp(−Δ·A) ⊙ h + Δ ⊙ (B e),   Δ = softplus(dt_bias),  A = exp(A_log),

    so the per-channel decay exp(−Δ·A) lies in (0, 1) and the input is scaled by the step Δ
    (unlike :class:`DiagonalDecayInjection`). ``B`` maps the input width to the state width."""

    def __init__(self, state_dim: int, input_dim: int) -> None:
        super().__init__()
        self.A_log = nn.Parameter(torch.zeros(state_dim))
        self.dt_bias = nn.Parameter(torch.zeros(state_dim))
        self.B = nn.Parameter(torch.zeros(state_dim, input_dim))

    def decay(self) -> Tensor:
        """Per-channel retention of the state, in (0, 1)."""
        return torch.exp(-F.softplus(self.dt_bias) * torch.exp(self.A_log))

    def forward(self, state: Tensor, inputs: Tensor) -> Tensor:
        dt = F.softplus(self.dt_bias)
        decay = torch.exp(-dt * torch.exp(self.A_log))
        return state * decay + dt * (inputs @ self.B.T)


def make_injection(kind: InjectionKind, d_model: int) -> nn.Module:
    """LoopLM's injection of ``kind`` at width ``d_model``."""
    if kind == "none":
        return NoInjection()
    if kind == "add":
        return AddInjection()
    if kind == "concat-linear":
        return ConcatLinearInjection(d_model)
    if kind == "gated":
        return GatedInjection(d_model)
    if kind == "diagonal":
        return DiagonalDecayInjection(d_model)
    raise ValueError(f"unknown injection {kind!r}; choose one of {INJECTIONS}")
