"""Where a recorded state comes from: the names every probe, trace and figure agree on.

A *site* is one layer application in realised depth: a prelude layer, a block layer at one
recurrence, or a coda layer. Hook names follow TransformerLens' habit of predictable strings:
``prelude.0``, ``block.2@r5`` (block layer 2 at recurrence 5), ``coda.1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch

Stage = Literal["prelude", "block", "coda"]


@dataclass(frozen=True)
class Site:
    """One layer application: ``stage``, its ``layer`` index within the stage, and the
    ``recurrence`` (0-based; always 0 for prelude and coda). ``depth`` is the position in
    realised depth (0 = first prelude layer) so sites sort in the order they ran."""

    stage: Stage
    layer: int
    recurrence: int
    depth: int

    @property
    def name(self) -> str:
        if self.stage == "block":
            return f"block.{self.layer}@r{self.recurrence}"
        return f"{self.stage}.{self.layer}"


class Probe(Protocol):
    """Anything the engine feeds states to while a forward pass runs.

    ``hidden`` is the residual stream after the layer, shape (batch, tokens, d_model);
    ``attn`` is the layer's attention probabilities (batch, heads, tokens, tokens) when the
    engine was asked for them, else None. Probes must not modify either tensor.
    """

    wants_attention: bool

    def observe(self, site: Site, hidden: torch.Tensor, attn: torch.Tensor | None) -> None: ...
