"""Input injection: how the prelude output X enters the recurrent state Z at the start of every
recurrence (SPEC §1). Each variant is its own small module so a new one is one class."""

from __future__ import annotations

from typing import Literal

import torch
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
    """W·[Z; X] with W: 2D → D (Huginn's adapter). Initialised so that W·[Z; X] ≈ (Z + X)/√2
    plus noise, which keeps both paths open at the start of training."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.adapter = nn.Linear(2 * d_model, d_model, bias=False)

    def forward(self, state: Tensor, inputs: Tensor) -> Tensor:
        return self.adapter(torch.cat([state, inputs], dim=-1))


class GatedInjection(nn.Module):
    """g·Z + (1 − g)·X with a learned sigmoid gate g = σ(W·[Z; X] + b)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.gate = nn.Linear(2 * d_model, d_model)

    def forward(self, state: Tensor, inputs: Tensor) -> Tensor:
        g = torch.sigmoid(self.gate(torch.cat([state, inputs], dim=-1)))
        return g * state + (1 - g) * inputs


class DiagonalInjection(nn.Module):
    """Parcae-style stable diagonal recurrence: Z' = a ⊙ Z + B·X with a = exp(−exp(log_rate)) in
    (0, 1) per channel, so the injected linear recurrence can never blow up."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.log_rate = nn.Parameter(torch.zeros(d_model))
        self.input_proj = nn.Linear(d_model, d_model, bias=False)

    def decay(self) -> Tensor:
        return torch.exp(-torch.exp(self.log_rate))

    def forward(self, state: Tensor, inputs: Tensor) -> Tensor:
        return self.decay().to(state.dtype) * state + self.input_proj(inputs)


def make_injection(kind: InjectionKind, d_model: int) -> nn.Module:
    if kind == "none":
        return NoInjection()
    if kind == "add":
        return AddInjection()
    if kind == "concat-linear":
        return ConcatLinearInjection(d_model)
    if kind == "gated":
        return GatedInjection(d_model)
    if kind == "diagonal":
        return DiagonalInjection(d_model)
    raise ValueError(f"unknown injection {kind!r}; choose one of {INJECTIONS}")
