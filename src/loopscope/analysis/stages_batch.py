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
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

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
    gram_entropy,
)
from loopscope.engine.sites import Site


def _row_grams(x: Tensor, lengths: Sequence[int]) -> list[Tensor]:
    """Each row's Gram matrix over its own tokens, on its smaller side: T_i × T_i, or D × D
    for a row longer than the width (its pads are zero rows and add nothing). Both sides have
    the same nonzero eigenvalues, so a row much shorter than the batch's longest costs its own
    T_i³ in the eigensolver, as it does alone. Float64, as in ``matrix_entropy`` (MPS has none)."""
    xg = x.double() if x.device.type != "mps" else x
    width = x.shape[-1]
    return [
        xg[i, :t] @ xg[i, :t].mT if t <= width else xg[i].mT @ xg[i] for i, t in enumerate(lengths)
    ]


#: Bytes of Gram matrices one eigensolver call takes: the solver copies its input, and a stack
#: that stays in cache solves ~2x faster than one of a hundred megabytes.
SOLVER_CALL_BYTES = 2**20


def _spectral_entropies(grams: Sequence[Tensor]) -> Tensor:
    """Shannon entropy (nats) of each Gram's normalised eigenvalues, NaN for a non-finite one
    (a diverged state has no spectrum); Grams of one size share batched solver calls."""
    out = torch.empty(len(grams), dtype=grams[0].dtype, device=grams[0].device)
    by_size: dict[int, list[int]] = {}
    for i, gram in enumerate(grams):
        by_size.setdefault(gram.shape[-1], []).append(i)
    for size, same_size in by_size.items():
        per_call = max(1, SOLVER_CALL_BYTES // (size * size * grams[0].element_size()))
        for start in range(0, len(same_size), per_call):
            rows = same_size[start : start + per_call]
            stacked = torch.stack([grams[i] for i in rows])
            out[torch.tensor(rows, device=out.device)] = gram_entropy(stacked)
    return out


def _balanced_bins(costs: Sequence[float], bins: int) -> list[list[int]]:
    """Indices split into at most ``bins`` non-empty groups of near-equal total cost (largest
    first, each to the lightest group), each group in index order."""
    loads = [0.0] * bins
    groups: list[list[int]] = [[] for _ in range(bins)]
    for i in sorted(range(len(costs)), key=lambda k: -costs[k]):
        lightest = loads.index(min(loads))
        loads[lightest] += costs[i]
        groups[lightest].append(i)
    return [sorted(g) for g in groups if g]


class _HostSolvers:
    """Worker threads that each run single-threaded LAPACK: on Gram matrices this small,
    LAPACK's own threads only add cost (measured ~25%) and on a loaded machine their waiting
    stalls each call by orders of magnitude, while independent rows split across threads use
    every core (eigvalsh releases the GIL; each row's result is the same on any thread)."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._owner = (0, 0)  # (pid, workers) the pool was made for: a forked child remakes it

    def pool(self, workers: int) -> ThreadPoolExecutor:
        if self._pool is None or self._owner != (os.getpid(), workers):
            self._pool = ThreadPoolExecutor(
                workers, thread_name_prefix="loopscope-eigvalsh", initializer=_one_thread
            )
            self._owner = (os.getpid(), workers)
        return self._pool

    def entropies(self, grams: Sequence[Tensor]) -> Tensor:
        """:func:`_spectral_entropies` of host Grams, spread over ``torch.get_num_threads()``
        single-threaded workers (on the calling thread, single-threaded, when that is 1)."""
        workers = min(torch.get_num_threads(), len(grams))
        if workers <= 1:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return _spectral_entropies(grams)
            finally:
                torch.set_num_threads(threads)
        bins = _balanced_bins([float(g.shape[-1]) ** 3 for g in grams], workers)
        parts = self.pool(workers).map(_spectral_entropies, [[grams[i] for i in b] for b in bins])
        out = torch.empty(len(grams), dtype=grams[0].dtype)
        for rows, values in zip(bins, parts):
            out[torch.tensor(rows)] = values
        return out


def _one_thread() -> None:
    torch.set_num_threads(1)


_HOST_SOLVERS = _HostSolvers()


def _normalised(h: Tensor, logs: Tensor, single: Tensor) -> Tensor:
    """Entropies divided by each row's log T_i; a single-token row's is 0 by definition."""
    return torch.where(single, torch.zeros_like(h), h / logs)


#: Bytes of host Gram matrices a :class:`BatchStagesAccumulator` holds before solving them.
PENDING_GRAM_BYTES = 128 * 2**20


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
        # host Grams whose entropies are not solved yet: (site, per-row Grams, logs, single)
        self._pending: list[tuple[Site, list[Tensor], Tensor, Tensor]] = []
        self._pending_bytes = 0

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

    def _matrix_entropy(self, site: Site, x: Tensor, logs: Tensor, single: Tensor) -> Tensor:
        """Normalised matrix entropy of each row's (T_i, D) states (pads are zero rows), or,
        on the host, zeros now and the entropies added at the next :meth:`_solve_pending`:
        Grams of many sites solved together spread over every core."""
        if self.row_normalize_entropy:
            x = x / x.norm(dim=-1, keepdim=True).clamp_min(_TINY)
        grams = _row_grams(x, self.lengths)
        if x.device.type == "cpu":
            self._pending.append((site, grams, logs, single))
            self._pending_bytes += sum(g.numel() * g.element_size() for g in grams)
            return torch.zeros(len(self.lengths), dtype=x.dtype)
        return _normalised(_spectral_entropies(grams).to(x.dtype), logs, single)

    def _solve_pending(self) -> None:
        """Add the deferred matrix entropies of every pending site to its values."""
        if not self._pending:
            return
        grams = [g for _, site_grams, _, _ in self._pending for g in site_grams]
        h = _HOST_SOLVERS.entropies(grams).to(torch.float32).split(len(self.lengths))
        row = METRICS.index("matrix_entropy")
        for (site, _, logs, single), site_h in zip(self._pending, h):
            self._values[site][row] += _normalised(site_h, logs, single).double()
        self._pending.clear()
        self._pending_bytes = 0

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
            self._matrix_entropy(site, x, logs, single),
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
        if self._pending_bytes > PENDING_GRAM_BYTES:
            self._solve_pending()

    def results(self) -> list[StagesProfile]:
        """One profile per row, each as its prompt alone gives; one device→host transfer."""
        self._solve_pending()
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
