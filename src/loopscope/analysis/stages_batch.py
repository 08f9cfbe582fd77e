"""The stages-of-inference metrics of every prompt of a right-padded batch, in one pass per site.

:class:`~loopscope.analysis.stages.StagesAccumulator` reduces one prompt (or equal-length
prompts, pooled); fed row by row, a batch of B prompts costs B times its kernel calls at every
layer application. :class:`BatchStagesAccumulator` computes the same metrics for all rows at
once, each row over its own real tokens only: pad positions are zeroed before any reduction
(so a non-finite pad cannot reach a sum), means divide by the row's own length, and a pad
token adds exact zeros to a Gram matrix (only zero eigenvalues, which carry no entropy) and to
the column and row entropies of attention. Each row's profile equals the prompt's own to
rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from loopscope.analysis.stages import (
    _TINY,
    ATTENTION_METRICS,
    METRICS,
    StagesProfile,
    _entropy,
    _f32,
)
from loopscope.engine.sites import Site


def _eigenvalues(gram: Tensor) -> Tensor:
    """``torch.linalg.eigvalsh``, on the host with one intra-op thread: on Gram matrices this
    small LAPACK's threads only add cost (measured ~25%), and on a loaded machine their
    waiting stalls each call by orders of magnitude (the thread count is restored after)."""
    threads = torch.get_num_threads()
    if gram.device.type != "cpu" or threads == 1:
        return torch.linalg.eigvalsh(gram)
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigvalsh(gram)
    finally:
        torch.set_num_threads(threads)


class BatchStagesAccumulator:
    """Per-row stage metrics of a right-padded batch; ``lengths[i]`` real tokens in row i.

    The probe sees the whole padded batch (B, T, D) and (B, H, T, T); :meth:`results` gives
    one :class:`StagesProfile` per row, as a :class:`StagesAccumulator` fed that row alone
    would. Sums stay on the device until :meth:`results`."""

    wants_attention: bool = True

    def __init__(
        self,
        lengths: Sequence[int],
        sink_threshold: float = 0.3,
        sink_position: int | None = 0,
        row_normalize_entropy: bool = False,
    ) -> None:
        self.lengths = [int(n) for n in lengths]
        self.sink_threshold = sink_threshold
        self.sink_position = sink_position
        self.row_normalize_entropy = row_normalize_entropy
        # per site: (len(METRICS), B) float64 values, and whether attention was observed
        self._values: dict[Site, Tensor] = {}
        self._attention: dict[Site, bool] = {}
        self._masks: dict[tuple[int, torch.device], tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    def _mask(self, tokens: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(B, T) validity, (B,) lengths as float32, (B,) log-lengths (1 where T_i = 1) and
        (B,) whether a row is a single token (its normalised entropy is defined as 0)."""
        key = (tokens, device)
        if key not in self._masks:
            n = torch.tensor(self.lengths, device=device)
            valid = torch.arange(tokens, device=device)[None, :] < n[:, None]
            logs = [math.log(t) if t > 1 else 1.0 for t in self.lengths]
            self._masks[key] = (
                valid,
                n.to(torch.float32),
                torch.tensor(logs, dtype=torch.float64, device=device).float(),
                n == 1,
            )
        return self._masks[key]

    def _matrix_entropy(self, x: Tensor, logs: Tensor, single: Tensor) -> Tensor:
        """Normalised matrix entropy of each row's (T_i, D) states; pads are zero rows."""
        if self.row_normalize_entropy:
            x = x / x.norm(dim=-1, keepdim=True).clamp_min(_TINY)
        xg = x.double() if x.device.type != "mps" else x
        gram = xg @ xg.mT if x.shape[-2] <= x.shape[-1] else xg.mT @ xg
        finite = (gram * 0).sum((-2, -1)) == 0  # x·0 is NaN exactly for a non-finite x
        gram = torch.where(finite[..., None, None], gram, torch.zeros_like(gram))
        ev = _eigenvalues(gram).clamp_min(0.0)
        p = ev / ev.sum(-1, keepdim=True).clamp_min(_TINY)
        h = _entropy(p).to(x.dtype)
        h = torch.where(finite, h, torch.full_like(h, float("nan")))
        return torch.where(single, torch.zeros_like(h), h / logs)

    def _massive_ratio(self, x: Tensor, n: Tensor) -> Tensor:
        """max|a| / lower median |a| over each row's real T_i·D entries."""
        a = x.abs().flatten(-2)  # pads are 0: never above a real entry's magnitude
        d = x.shape[-1]
        if a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64):
            flat = a.numpy()
            medians = [
                np.partition(flat[i, : t * d], (t * d - 1) // 2)[(t * d - 1) // 2]
                for i, t in enumerate(self.lengths)
            ]
            median = torch.from_numpy(np.asarray(medians, dtype=flat.dtype))
        else:  # pads sort last as +inf; each row's lower median sits at its own rank
            valid = torch.arange(a.shape[-1], device=a.device)[None, :] < (n[:, None] * d)
            ranked = a.masked_fill(~valid, float("inf")).sort(-1).values
            k = ((n * d).long() - 1) // 2
            median = ranked.gather(-1, k[:, None])[:, 0]
        return a.amax(-1) / median.clamp_min(_TINY)

    def _attention_values(self, attn: Tensor, valid: Tensor, n: Tensor) -> list[Tensor]:
        """ColSum concentration, sink rate, sink score and mixing per row, (B,) each, over
        each row's real (T_i, T_i) block of every head."""
        pair = valid[:, None, :, None] & valid[:, None, None, :]
        a = _f32(attn.detach()).masked_fill(~pair, 0.0)  # (B, H, T, T)
        s = a.sum(-2) / n[:, None, None]  # (B, H, T): sink scores, 0 at pad keys
        logs = torch.log(n.double()).float()[:, None]
        col = torch.where(n[:, None] > 1, 1.0 - _entropy(s) / logs, torch.ones_like(logs))
        at = s.amax(-1) if self.sink_position is None else s[..., self.sink_position]
        rate = (at >= self.sink_threshold).to(s.dtype).mean(-1)
        mixing = (_entropy(a).sum(-1) / n[:, None]).mean(-1)
        return [col.mean(-1), rate, s[..., 0].mean(-1), mixing]

    @torch.no_grad()
    def observe(self, site: Site, hidden: Tensor, attn: Tensor | None) -> None:
        if hidden.shape[0] != len(self.lengths):
            raise RuntimeError(
                f"BatchStagesAccumulator holds {len(self.lengths)} rows but the batch has "
                f"{hidden.shape[0]}"
            )
        valid, n, logs, single = self._mask(hidden.shape[1], hidden.device)
        x = _f32(hidden.detach()).masked_fill(~valid[..., None], 0.0)  # (B, T, D)
        values = [
            self._matrix_entropy(x, logs, single),
            x.norm(dim=-1).sum(-1) / n,
            self._massive_ratio(x, n),
        ]
        if attn is not None:
            values = self._attention_values(attn, valid, n) + values
        stacked = torch.stack(values).double()  # (k, B)
        current = self._values.get(site)
        if current is None:
            current = torch.zeros((len(METRICS), len(self.lengths)), dtype=torch.float64)
            current = current.to(stacked.device)
            self._values[site] = current
        current[len(METRICS) - stacked.shape[0] :] += stacked
        self._attention[site] = self._attention.get(site, False) or attn is not None

    def results(self) -> list[StagesProfile]:
        """One profile per row, each as its prompt alone gives; one device→host transfer."""
        sites = sorted(self._values, key=lambda s: s.depth)
        host = (
            torch.stack([self._values[s] for s in sites]).cpu().numpy()
            if sites
            else np.zeros((0, len(METRICS), len(self.lengths)))
        )  # (sites, metrics, B)
        seen = np.array(
            [[self._attention[s] or m not in ATTENTION_METRICS for m in METRICS] for s in sites],
            dtype=bool,
        ).reshape(len(sites), len(METRICS))
        meta = {
            "sink_threshold": self.sink_threshold,
            "sink_position": self.sink_position,
            "row_normalize_entropy": self.row_normalize_entropy,
        }
        profiles = []
        for row in range(len(self.lengths)):
            values = np.where(seen, host[:, :, row], np.nan)
            metrics = {m: values[:, j].astype(np.float64) for j, m in enumerate(METRICS)}
            counts = np.ones(len(sites), dtype=np.int64)
            profiles.append(StagesProfile(list(sites), metrics, counts, dict(meta)))
        return profiles
