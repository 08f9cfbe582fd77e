"""Online probes: reductions computed on the device while states stream past, so a long run over
many prompts never holds every state in memory.

Probes keep their reductions (and DynamicsProbe a bounded buffer of recent states) on the
model's device and synchronise with the host only in ``result()``; that, and few kernels per
state, is what keeps tracing close to the cost of a plain forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import Tensor

from loopscope.engine.cache import ActivationCache
from loopscope.engine.sites import Probe, Site, Stage


def _cosine_from(dot: Tensor, na: Tensor, nb: Tensor) -> Tensor:
    """Per-token cosine from the dot product and the two norms; cos(0, 0) = 1 like the offline
    analyses (norms are ≥ 0, so both are 0 exactly when na + nb = 0)."""
    cos = dot / (na * nb).clamp_min(1e-30)
    return torch.where((na + nb) == 0, 1.0, cos)


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
    ``attn_reference`` likewise (L, H, T, T).

    With ``lengths`` (each row's real token count in a right-padded batch) the probe reads the
    whole batch at once, every reduction per row over its own tokens (pad positions are zeroed
    before any reduction and never flagged divergent), and :meth:`rows` gives each prompt's
    summary as the prompt alone gives it, to rounding: the same kernels serve every row, which
    is what makes a batch cheaper than its prompts one by one. ``reference`` is then one
    (L, T_i, D) fixed point per row.

    States are copied into one fp32 buffer of a few recurrences (as many as fit in
    ``chunk_elements``, at least one) and every metric is reduced over the whole chunk at once:
    a few kernels per chunk instead of a few dozen per layer, because kernel launches, not
    arithmetic, are what tracing a small model costs. The buffer and the previous recurrence's
    states are all the probe holds, so memory stays bounded however many recurrences run."""

    #: Upper bound on buffered state entries (fp32): 2 MiB, or one recurrence if that is more.
    chunk_elements = 1 << 19

    def __init__(
        self,
        recurrences: int,
        block_layers: int,
        *,
        reference: Tensor | Sequence[Tensor] | None = None,
        attn_reference: Tensor | None = None,
        track_attention: bool = False,
        lengths: Sequence[int] | None = None,
    ) -> None:
        self.shape = (recurrences, block_layers)
        self.lengths = None if lengths is None else [int(n) for n in lengths]
        if self.lengths is not None and attn_reference is not None:
            raise ValueError("a batched DynamicsProbe (lengths=) takes no attn_reference")
        self._valid: Tensor | None = None  # (B, T) real positions of a padded batch
        self._counts: Tensor | None = None  # (B,) real token counts, float32
        if self.lengths is not None and reference is not None:
            reference = _padded_reference(reference, self.lengths)
        self.reference = cast("Tensor | None", reference)
        self.attn_reference = attn_reference
        self.wants_attention = track_attention or attn_reference is not None
        # slot ``_prev_slot``: the last recurrence before the chunk (masked); the chunk fills
        # slots ``_start``.. (1..k, then the last one is copied to slot 0; with k = 1 the two
        # slots swap roles instead, which saves that copy for models too big to chunk)
        self._buf: Tensor | None = None  # (k + 1, L, T, D) fp32
        self._token_norm: Tensor | None = None  # (k + 1, L, T)
        self._have_prev = False
        self._prev_slot, self._start = 0, 1
        self._filled = 0  # complete recurrences in the chunk
        self._layer = 0  # next block layer expected
        self._recurrences_seen = 0
        self._ref: tuple[Tensor, Tensor, Tensor] | None = None  # (ref32, token norms, norms)
        self._prev_attn: dict[int, Tensor] = {}
        self._rows: dict[str, list[Tensor]] = {}
        self._nan_if_bad: Tensor | None = None  # (T,): NaN for tokens ever non-finite, else 0

    def _put(self, key: str, value: Tensor) -> None:
        self._rows.setdefault(key, []).append(value.detach())

    def observe(self, site: Site, hidden: Tensor, attn: Tensor | None) -> None:
        if site.stage != "block":
            return
        h = hidden[0].detach() if self.lengths is None else hidden.detach()
        layer, n_layers = site.layer, self.shape[1]
        if layer != self._layer:
            raise RuntimeError(
                f"DynamicsProbe got block layer {layer} where it expected layer {self._layer} of "
                f"{n_layers}; construct it with block_layers=model.meta.block_layers"
            )
        buf = self._buf
        if buf is None or buf.shape[2:] != h.shape or buf.device != h.device:
            buf = self._allocate(h)
        buf[self._start + self._filled, layer].copy_(h)
        if layer + 1 < n_layers:
            self._layer = layer + 1
        else:
            self._layer = 0
            self._filled += 1
            self._recurrences_seen += 1
            full = self._filled == buf.shape[0] - 1
            if full or self._recurrences_seen == self.shape[0]:
                self._flush()
        if attn is not None:
            self._observe_attention(layer, attn)

    def _allocate(self, h: Tensor) -> Tensor:
        """Buffers for as many recurrences of ``h``-shaped states as fit the chunk budget."""
        n_layers = self.shape[1]
        per_recurrence = max(1, n_layers * h.numel())
        k = max(1, min(self.shape[0], self.chunk_elements // per_recurrence))
        self._buf = torch.empty((k + 1, n_layers, *h.shape), dtype=torch.float32, device=h.device)
        self._token_norm = torch.empty(self._buf.shape[:-1], dtype=torch.float32, device=h.device)
        self._have_prev = False
        self._prev_slot, self._start = 0, 1
        if self.lengths is not None:
            if len(self.lengths) != h.shape[0]:
                raise RuntimeError(
                    f"DynamicsProbe holds {len(self.lengths)} row lengths but the batch has "
                    f"{h.shape[0]} rows"
                )
            counts = torch.tensor(self.lengths, device=h.device)
            self._valid = torch.arange(h.shape[1], device=h.device)[None, :] < counts[:, None]
            self._counts = counts.to(torch.float32)
        return self._buf

    def _token_mean(self, values: Tensor) -> Tensor:
        """Mean over the token axis (the last): over a row's real tokens in a padded batch."""
        if self._valid is None or self._counts is None:
            return values.mean(-1)
        return torch.where(self._valid, values, 0.0).sum(-1) / self._counts

    def _flush(self) -> None:
        """All metrics of the buffered recurrences; non-finite tokens are zeroed first (per
        layer) and remembered as divergent."""
        buf, token_norm, n = self._buf, self._token_norm, self._filled
        if buf is None or token_norm is None or n == 0:
            return
        p, c = self._prev_slot, self._start  # p = c − 1, or the other slot when k = 1
        states = buf[c : c + n]  # (n, L, T, D)
        # x·0 is ±0 for finite x and NaN for ±inf/NaN, so a token's sum of x·0 is 0 exactly when
        # all its entries are finite (on the host ~10x cheaper than isfinite().all(-1))
        zero_sums = (states * 0).sum(-1)  # (n, L, [B,] T): ±0 or NaN
        if self._valid is not None:  # a pad position is never divergent
            zero_sums.masked_fill_(~self._valid, 0.0)
        finite = zero_sums == 0
        nan_if_bad = zero_sums.sum((0, 1))
        self._nan_if_bad = nan_if_bad if self._nan_if_bad is None else self._nan_if_bad + nan_if_bad
        if self._valid is not None:  # pads are zeroed, whatever they hold
            states.masked_fill_((~finite | ~self._valid)[..., None], 0.0)
        # on the host a branch is free and skips the masking pass in the usual all-finite case;
        # on an accelerator it would wait for the device, so the mask is always applied there
        elif states.device.type != "cpu" or not bool(finite.all()):
            states.masked_fill_(~finite[..., None], 0.0)
        torch.linalg.vector_norm(states, dim=-1, out=token_norm[c : c + n])
        state_norm = torch.linalg.vector_norm(states, dim=(-2, -1))  # (n, L[, B])
        self._put("state_norm", state_norm)
        lo = 0 if self._have_prev else 1  # the run's first recurrence has no predecessor
        if lo:
            nan = torch.full_like(state_norm[:1], float("nan"))
            self._put("step_norm", nan)
            self._put("step_cosine", nan)
        if n > lo:  # recurrence i of the chunk against its predecessor
            cur, prev = buf[c + lo : c + n], buf[p + lo : p + n]
            self._put("step_norm", torch.linalg.vector_norm(cur - prev, dim=(-2, -1)))
            dot = (cur * prev).sum(-1)
            cos = _cosine_from(dot, token_norm[c + lo : c + n], token_norm[p + lo : p + n])
            self._put("step_cosine", self._token_mean(cos))
        if self.reference is not None:
            ref, ref_token_norm, _ = self._reference(states.device)
            self._put("ref_distance", torch.linalg.vector_norm(states - ref, dim=(-2, -1)))
            dot = (states * ref).sum(-1)
            cos = _cosine_from(dot, token_norm[c : c + n], ref_token_norm)
            self._put("ref_cosine", self._token_mean(cos))
        if buf.shape[0] == 2:
            self._prev_slot, self._start = c, p
        else:
            buf[0].copy_(buf[n])
            token_norm[0].copy_(token_norm[n])
        self._have_prev = True
        self._filled = 0

    def _reference(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """The reference in fp32 on ``device`` with its per-token and per-layer norms, once."""
        if self._ref is None or self._ref[0].device != device:
            assert self.reference is not None
            ref = self.reference.detach().to(device=device, dtype=torch.float32)
            norms = (
                torch.linalg.vector_norm(ref, dim=-1),
                torch.linalg.vector_norm(ref, dim=(-2, -1)),
            )
            self._ref = (ref, *norms)
        return self._ref

    def _observe_attention(self, layer: int, attn: Tensor) -> None:
        if self._valid is not None:  # each row's real (T_i, T_i) block of every head
            pair = self._valid[:, None, :, None] & self._valid[:, None, None, :]
            a = attn.detach().float().masked_fill(~pair, 0.0)
            prev_a = self._prev_attn.get(layer)
            if prev_a is None:
                change = torch.full(a.shape[:1], float("nan"), device=a.device)
            else:
                change = (a - prev_a).norm(dim=(-2, -1)).mean(-1)
            self._put("attn_step", change)
            self._prev_attn[layer] = a
            return
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
        values = torch.cat([r.float().reshape(-1) for r in rows]).cpu().numpy()
        return values.reshape(self.shape).astype(np.float64)

    def rows(self) -> list[DynamicsSummary]:
        """Per row of a padded batch (``lengths`` given), its summary over its real tokens."""
        if self.lengths is None:
            return [self.result()]
        self._check_complete()
        batch = len(self.lengths)
        grids: dict[str, np.ndarray | None] = {}
        for key in ("state_norm", "step_norm", "step_cosine", "ref_distance", "ref_cosine"):
            grids[key] = self._batch_grid(key, batch)
        grids["attn_step"] = self._batch_grid("attn_step", batch)
        ref_norm = None if self._ref is None else self._ref[2].cpu().numpy().astype(np.float64)
        bad = None if self._nan_if_bad is None else torch.isnan(self._nan_if_bad).cpu().numpy()
        out = []
        for row, length in enumerate(self.lengths):
            picked = {k: None if v is None else v[..., row] for k, v in grids.items()}
            out.append(
                self._summary(
                    picked,
                    None if ref_norm is None else ref_norm[:, row],
                    np.zeros(0, bool) if bad is None else bad[row, :length],
                )
            )
        return out

    def _batch_grid(self, key: str, batch: int) -> np.ndarray | None:
        """(R, L, B) of a batched probe's records under ``key``, or None."""
        rows = self._rows.get(key)
        if not rows:
            return None
        values = torch.cat([r.float().reshape(-1, batch) for r in rows]).cpu().numpy()
        return values.reshape(*self.shape, batch).astype(np.float64)

    def _check_complete(self) -> None:
        if self._layer:
            raise RuntimeError(
                f"DynamicsProbe saw {self._layer} block layers of a recurrence of "
                f"{self.shape[1]}; construct it with block_layers=model.meta.block_layers"
            )
        self._flush()  # a run shorter than ``recurrences`` (reshaping will say so)

    def _summary(
        self, grids: dict[str, np.ndarray | None], ref_norm: np.ndarray | None, bad: np.ndarray
    ) -> DynamicsSummary:
        norm, step, cos = grids["state_norm"], grids["step_norm"], grids["step_cosine"]
        if norm is None or step is None or cos is None:
            raise RuntimeError("DynamicsProbe saw no block layer; was it passed to the engine?")
        ref_distance = grids["ref_distance"]
        ref_relative = None
        if ref_distance is not None and ref_norm is not None:
            ref_relative = ref_distance / np.maximum(ref_norm[None, :], 1e-30)
        return DynamicsSummary(
            state_norm=norm,
            step_norm=step,
            step_relative=step / np.maximum(norm, 1e-30),
            step_cosine=cos,
            ref_distance=ref_distance,
            ref_relative=ref_relative,
            ref_cosine=grids["ref_cosine"],
            attn_step_norm=grids.get("attn_step"),
            attn_ref_distance=grids.get("attn_ref"),
            divergent=bad,
        )

    def result(self) -> DynamicsSummary:
        if self.lengths is not None:
            raise RuntimeError("a batched DynamicsProbe (lengths=) gives its summaries by rows()")
        if self._layer:
            raise RuntimeError(
                f"DynamicsProbe saw {self._layer} block layers of a recurrence of "
                f"{self.shape[1]}; construct it with block_layers=model.meta.block_layers"
            )
        self._flush()  # a run shorter than ``recurrences`` (reshaping below will say so)
        norm = self._grid("state_norm")
        step = self._grid("step_norm")
        cos = self._grid("step_cosine")
        if norm is None or step is None or cos is None:
            raise RuntimeError("DynamicsProbe saw no block layer; was it passed to the engine?")
        ref_distance = self._grid("ref_distance")
        ref_relative = None
        if ref_distance is not None and self._ref is not None:
            ref_norm = self._ref[2].cpu().numpy().astype(np.float64)[None, :]
            ref_relative = ref_distance / np.maximum(ref_norm, 1e-30)
        bad = np.zeros(0, bool)
        if self._nan_if_bad is not None:
            bad = torch.isnan(self._nan_if_bad).cpu().numpy()
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


def _padded_reference(references: Tensor | Sequence[Tensor], lengths: list[int]) -> Tensor:
    """Per-row fixed points (L, T_i, D) as one (L, B, T_max, D) tensor, zero at pads."""
    if isinstance(references, Tensor):
        raise ValueError("a batched DynamicsProbe (lengths=) takes one reference per row")
    if len(references) != len(lengths):
        raise ValueError(f"{len(references)} references for {len(lengths)} rows")
    first = references[0]
    padded = first.new_zeros((first.shape[0], len(lengths), max(lengths), first.shape[-1]))
    for row, (ref, length) in enumerate(zip(references, lengths)):
        padded[:, row, :length] = ref.detach()
    return padded


class CaptureProbe(ActivationCache):
    """Copies chosen states (and attention) to the host for a full-capture trace, every batch
    row kept.

    ``positions`` selects token positions (None = all); ``layers`` selects block layers
    (None = all); ``recurrences`` selects recurrences (None = all); prelude and coda layers
    are always kept. Attention is kept only at block sites of ``attention_recurrences``
    (None = all) because it is T² per head."""

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
        self.layers = None if layers is None else set(layers)
        self.recurrences = None if recurrences is None else set(recurrences)
        self.attention_recurrences = (
            None if attention_recurrences is None else set(attention_recurrences)
        )
        super().__init__(
            self._keeps_site,
            attention=self._keeps_attention_at if attention else False,
            positions=positions,
            dtype=dtype,
            device="cpu",
        )

    def _keeps_site(self, site: Site) -> bool:
        if site.stage != "block":
            return True
        layer_ok = self.layers is None or site.layer in self.layers
        rec_ok = self.recurrences is None or site.recurrence in self.recurrences
        return layer_ok and rec_ok

    def _keeps_attention_at(self, site: Site) -> bool:
        rec_ok = self.attention_recurrences is None or site.recurrence in self.attention_recurrences
        return site.stage == "block" and rec_ok

    @property
    def states(self) -> dict[Site, Tensor]:
        """Kept states by site, (batch, T, D) each."""
        return dict(self.items())

    @property
    def attn(self) -> dict[Site, Tensor]:
        """Kept attention by site, (batch, H, T, T) each."""
        return {s: self.attention(s) for s in self.attention_sites()}

    def stage_array(self, stage: Stage) -> np.ndarray:
        """(layers, batch, T, D) for prelude/coda; (R, L, batch, T, D) for the block; shape
        (0,) when the stage kept nothing (a model without prelude, say)."""
        if not self.sites(stage):
            return np.zeros((0,), np.float32)
        return self.stage(stage).float().numpy()

    def attention_array(self) -> np.ndarray | None:
        """(R, L, batch, H, T, T) block attention, or None when none was kept."""
        if not self.attention_sites():
            return None
        return self.attention_stage("block").float().numpy()


class PerRowProbes:
    """Feeds every row of a right-padded batch, cut to that row's real length, to the probes
    of its own prompt, so each prompt's probes see exactly the (1, T_i, D) states and
    (1, H, T_i, T_i) attention of the prompt run alone and no pad position enters a metric.

    Why this is exact: every family is causal, so a real token never attends to a later (pad)
    position, rotary positions start at 0 in every row, and norms, injections and exit gates
    act per token; the real positions of the batch compute what the prompt alone computes (up
    to the rounding of a differently shaped matrix product)."""

    def __init__(self, rows: Sequence[Sequence[Probe]], lengths: Sequence[int]) -> None:
        if len(rows) != len(lengths):
            raise ValueError(f"{len(rows)} probe rows for {len(lengths)} lengths")
        self.rows = [list(probes) for probes in rows]
        self.lengths = [int(n) for n in lengths]
        self.wants_attention = any(p.wants_attention for probes in self.rows for p in probes)

    def observe(self, site: Site, hidden: Tensor, attn: Tensor | None) -> None:
        if hidden.shape[0] != len(self.rows):
            raise RuntimeError(
                f"PerRowProbes holds probes for {len(self.rows)} rows but the batch has "
                f"{hidden.shape[0]}"
            )
        for row, (probes, length) in enumerate(zip(self.rows, self.lengths)):
            h = hidden[row : row + 1, :length]
            a = None if attn is None else attn[row : row + 1, :, :length, :length]
            for probe in probes:
                probe.observe(site, h, a if probe.wants_attention else None)
