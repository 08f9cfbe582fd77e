"""Online probes: reductions computed on the device while states stream past, so a long run over
many prompts never holds every state in memory.

All probes keep 0-dim or per-token tensors on the model's device and synchronise with the host
only in ``result()``; that is what keeps tracing close to the cost of a plain forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from loopscope.engine.sites import Site


def _token_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Per-token cosine (batch, T) in fp32; cos(0, 0) = 1 like the offline analyses."""
    a32, b32 = a.float(), b.float()
    dot = (a32 * b32).sum(-1)
    na, nb = a32.norm(dim=-1), b32.norm(dim=-1)
    cos = dot / (na * nb).clamp_min(1e-30)
    both_zero = (na == 0) & (nb == 0)
    return torch.where(both_zero, torch.ones_like(cos), cos)


@dataclass
class DynamicsSummary:
    """Per-prompt online reductions, (R, L) arrays indexed [recurrence, block layer].

    ``step_norm[r]`` compares recurrence r with r−1 (row 0 is NaN); ``ref_*`` are distances to
    the reference fixed point when one was given; ``divergent`` flags tokens (T,) whose state
    was ever non-finite."""

    state_norm: np.ndarray
    step_norm: np.ndarray
    step_relative: np.ndarray
    step_cosine: np.ndarray
    ref_distance: np.ndarray | None
    ref_relative: np.ndarray | None
    ref_cosine: np.ndarray | None
    attn_step_norm: np.ndarray | None
    attn_ref_distance: np.ndarray | None
    divergent: np.ndarray


class DynamicsProbe:
    """Successive differences, norms, distances to a reference fixed point and attention
    changes, for every (recurrence, block layer), batch size 1.

    ``reference`` is the per-layer fixed point (L, T, D) from a previous long run;
    ``attn_reference`` likewise (L, H, T, T)."""

    def __init__(
        self,
        recurrences: int,
        block_layers: int,
        *,
        reference: Tensor | None = None,
        attn_reference: Tensor | None = None,
        track_attention: bool = False,
    ) -> None:
        self.shape = (recurrences, block_layers)
        self.reference = reference
        self.attn_reference = attn_reference
        self.wants_attention = track_attention or attn_reference is not None
        self._prev: dict[int, Tensor] = {}
        self._prev_attn: dict[int, Tensor] = {}
        self._rows: dict[str, list[Tensor]] = {}
        self._bad: Tensor | None = None

    def _put(self, key: str, value: Tensor) -> None:
        self._rows.setdefault(key, []).append(value.detach())

    def observe(self, site: Site, hidden: Tensor, attn: Tensor | None) -> None:
        if site.stage != "block":
            return
        h = hidden[0].detach()
        layer = site.layer
        finite = torch.isfinite(h).all(-1)
        self._bad = ~finite if self._bad is None else self._bad | ~finite
        h = torch.where(finite[:, None], h, torch.zeros_like(h))
        norm = h.float().norm()
        self._put("state_norm", norm)
        prev = self._prev.get(layer)
        if prev is None:
            nan = torch.full((), float("nan"), device=h.device)
            self._put("step_norm", nan)
            self._put("step_cosine", nan)
        else:
            self._put("step_norm", (h.float() - prev.float()).norm())
            self._put("step_cosine", _token_cosine(h, prev).mean())
        self._prev[layer] = h
        if self.reference is not None:
            ref = self.reference[layer]
            self._put("ref_distance", (h.float() - ref.float()).norm())
            self._put("ref_cosine", _token_cosine(h, ref).mean())
            self._put("ref_norm", ref.float().norm())
        if attn is not None:
            a = attn[0].detach().float()
            prev_a = self._prev_attn.get(layer)
            step = (a - prev_a).norm(dim=(-2, -1)).mean() if prev_a is not None else None
            self._put("attn_step", step if step is not None else torch.full((), float("nan")))
            self._prev_attn[layer] = a
            if self.attn_reference is not None:
                diff = a - self.attn_reference[layer].float()
                self._put("attn_ref", diff.norm(dim=(-2, -1)).mean())

    def _grid(self, key: str) -> np.ndarray | None:
        rows = self._rows.get(key)
        if not rows:
            return None
        values = torch.stack([r.float().cpu() for r in rows]).numpy()
        return values.reshape(self.shape).astype(np.float64)

    def result(self) -> DynamicsSummary:
        norm = self._grid("state_norm")
        step = self._grid("step_norm")
        cos = self._grid("step_cosine")
        if norm is None or step is None or cos is None:
            raise RuntimeError("DynamicsProbe saw no block layer; was it passed to the engine?")
        ref_distance = self._grid("ref_distance")
        ref_norm = self._grid("ref_norm")
        ref_relative = None
        if ref_distance is not None and ref_norm is not None:
            ref_relative = ref_distance / np.maximum(ref_norm, 1e-30)
        bad = self._bad.cpu().numpy() if self._bad is not None else np.zeros(0, bool)
        return DynamicsSummary(
            state_norm=norm,
            step_norm=step,
            step_relative=step / np.maximum(norm, 1e-30),
            step_cosine=cos,
            ref_distance=ref_distance,
            ref_relative=ref_relative,
            ref_cosine=self._grid("ref_cosine"),
            attn_step_norm=self._grid("attn_step"),
            attn_ref_distance=self._grid("attn_ref"),
            divergent=bad,
        )


class CaptureProbe:
    """Copies chosen states (and attention) to the host for a full-capture trace.

    ``positions`` selects token positions (None = all); ``layers`` selects block layers
    (None = all); ``recurrences`` selects recurrences (None = all); attention is kept only at
    ``attention_recurrences`` (None = all) because it is T² per head."""

    def __init__(
        self,
        *,
        positions: Sequence[int] | None = None,
        layers: Sequence[int] | None = None,
        recurrences: Sequence[int] | None = None,
        attention: bool = False,
        attention_recurrences: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.positions = None if positions is None else list(positions)
        self.layers = None if layers is None else set(layers)
        self.recurrences = None if recurrences is None else set(recurrences)
        self.wants_attention = attention
        self.attention_recurrences = (
            None if attention_recurrences is None else set(attention_recurrences)
        )
        self.dtype = dtype
        self.states: dict[Site, Tensor] = {}
        self.attn: dict[Site, Tensor] = {}

    def _keeps(self, site: Site) -> bool:
        if site.stage != "block":
            return True
        layer_ok = self.layers is None or site.layer in self.layers
        rec_ok = self.recurrences is None or site.recurrence in self.recurrences
        return layer_ok and rec_ok

    def observe(self, site: Site, hidden: Tensor, attn: Tensor | None) -> None:
        if not self._keeps(site):
            return
        h = hidden[0].detach()
        if self.positions is not None:
            h = h[self.positions]
        self.states[site] = h.to(self.dtype).cpu()
        keep_attn = (
            self.attention_recurrences is None or site.recurrence in self.attention_recurrences
        )
        if attn is not None and site.stage == "block" and keep_attn:
            a = attn[0].detach()
            if self.positions is not None:
                a = a[:, self.positions][:, :, self.positions]
            self.attn[site] = a.to(self.dtype).cpu()

    def stage_array(self, stage: str) -> np.ndarray:
        """(layers, T, D) for prelude/coda; (R, L, T, D) for the block."""
        sites = sorted((s for s in self.states if s.stage == stage), key=lambda s: s.depth)
        if not sites:
            return np.zeros((0,), np.float32)
        stacked = torch.stack([self.states[s] for s in sites]).float().numpy()
        if stage != "block":
            return stacked
        return _to_grid(sites, stacked)

    def attention_array(self) -> np.ndarray | None:
        sites = sorted(self.attn, key=lambda s: s.depth)
        if not sites:
            return None
        return _to_grid(sites, torch.stack([self.attn[s] for s in sites]).float().numpy())


def _to_grid(sites: list[Site], stacked: np.ndarray) -> np.ndarray:
    recs = sorted({s.recurrence for s in sites})
    layers = sorted({s.layer for s in sites})
    return stacked.reshape(len(recs), len(layers), *stacked.shape[1:])
