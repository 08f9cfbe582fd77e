"""Stages-of-inference metrics (attention sinks and mixing, matrix entropy, residual norms,
massive activations, neuron classes), a streaming probe that collects them per site, and the
three views (realised depth, by recurrence, by layer) of the resulting profile.

Every metric function is pure and takes tensors with arbitrary leading batch dimensions; they
compute in float32 (half-precision inputs are promoted) so that bf16 traces give stable entropies.
Attention tensors are row-stochastic ``A[..., query, key]`` (causal, but nothing here requires it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from loopscope.engine.sites import Site

__all__ = [
    "METRICS",
    "MassiveActivations",
    "NeuronClasses",
    "StagesAccumulator",
    "StagesProfile",
    "colsum_concentration",
    "gram_entropy",
    "massive_activations",
    "massive_ratio",
    "matrix_entropy",
    "mixing_score",
    "neuron_classes",
    "residual_norm",
    "sink_rate",
    "sink_scores",
]

#: Metric names a :class:`StagesAccumulator` records, in the order figures draw them.
METRICS: tuple[str, ...] = (
    "colsum_concentration",
    "sink_rate",
    "sink_score",
    "mixing",
    "matrix_entropy",
    "residual_norm",
    "massive_ratio",
)

#: Metrics that need attention probabilities (NaN at sites observed without them).
ATTENTION_METRICS: frozenset[str] = frozenset(
    {"colsum_concentration", "sink_rate", "sink_score", "mixing"}
)
# StagesAccumulator lays its sums out in METRICS order with the attention metrics first.
assert set(METRICS[: len(ATTENTION_METRICS)]) == ATTENTION_METRICS

_TINY = 1e-12


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy (nats) along ``dim``; 0·log 0 = 0 so exact zeros (causal mask) are fine.

    ``entr`` (−p·log p, one unary kernel) equals ``−xlogy(p, p)`` bit for bit and is faster.
    """
    return torch.special.entr(p).sum(dim)


# --------------------------------------------------------------------------- attention metrics


def colsum_concentration(attn: torch.Tensor) -> torch.Tensor:
    """ColSum concentration ``C = 1 − H(ĉ)/log T`` with ``ĉ_j = Σ_i A_ij / T``.

    ``attn`` is (..., T, T); returns (...). C = 1 when all queries read one key (a sink), and is
    small when attention mass is spread over keys. For T = 1 the single key holds all mass by
    construction, so C is defined as 1 (``log T`` = 0 would otherwise divide by zero).
    """
    a = _f32(attn)
    t = a.shape[-1]
    if t == 1:
        return torch.ones(a.shape[:-2], dtype=a.dtype, device=a.device)
    c = a.sum(-2) / a.shape[-2]
    return 1.0 - _entropy(c) / math.log(t)


def sink_scores(attn: torch.Tensor) -> torch.Tensor:
    """Sink score of each key position: mean over queries of ``A[q, k]``; (..., T, T) → (..., T).

    Queries that cannot see key k (causal mask) count as zeros, as in the study's definition.
    """
    return _f32(attn).mean(-2)


def sink_rate(attn: torch.Tensor, threshold: float = 0.3, position: int | None = 0) -> torch.Tensor:
    """Fraction of heads whose sink score at ``position`` is ≥ ``threshold``.

    ``attn`` is (..., H, T, T); returns (...). ``position=None`` uses each head's largest sink
    score over all positions (a sink anywhere, not only at the first token / BOS).
    """
    s = sink_scores(attn)
    s = s.amax(-1) if position is None else s[..., position]
    return (s >= threshold).to(s.dtype).mean(-1)


def mixing_score(attn: torch.Tensor) -> torch.Tensor:
    """Mean over queries of the row entropy (nats) of A; (..., T, T) → (...).

    High = tokens mix many positions; 0 = every query attends to a single key. For uniform
    causal attention it is ``mean_i log(i + 1)``; it is not normalised, so compare equal T.
    """
    return _entropy(_f32(attn)).mean(-1)


# --------------------------------------------------------------------------- residual metrics


def gram_entropy(gram: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of the normalised eigenvalues of Gram matrices (..., n, n) → (...).

    A diverged state (NaN/Inf) has no spectrum: its entropy is NaN instead of failing the run
    (x·0 is NaN exactly for a non-finite x, a cheaper test than ``isfinite().all()``)."""
    finite = (gram * 0).sum((-2, -1)) == 0
    gram = torch.where(finite[..., None, None], gram, torch.zeros_like(gram))
    ev = torch.linalg.eigvalsh(gram).clamp_min(0.0)
    p = ev / ev.sum(-1, keepdim=True).clamp_min(_TINY)
    return torch.where(finite, _entropy(p), torch.full_like(finite, math.nan, dtype=ev.dtype))


def matrix_entropy(
    residual: torch.Tensor, normalize: bool = True, row_normalize: bool = False
) -> torch.Tensor:
    """Matrix-based (von Neumann) entropy of the token-by-hidden residual matrix.

    ``residual`` is (..., T, D); returns (...). The eigenvalues of the Gram matrix X Xᵀ (the
    squared singular values of X) are divided by their sum (the trace) and their Shannon entropy
    is taken. Rank-1 X gives 0; T orthogonal equal-norm rows give log T (1 when ``normalize``,
    which divides by log T; with D < T the maximum is log D / log T).

    Decisions: rows are *not* centred (the mean direction, where massive activations live, is
    part of what compresses) and by default *not* L2-normalised, so a token with a massive norm
    (a BOS sink) dominates the spectrum — this is the mechanism linking massive activations to
    compression valleys. ``row_normalize=True`` measures only directional diversity instead.
    For T = 1 the entropy is 0 (one eigenvalue); normalised it is defined as 0 too.
    """
    x = _f32(residual)
    if row_normalize:
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(_TINY)
    # Eigenvalues of the smaller Gram side in float64: a massive token makes the spectrum span
    # many orders of magnitude, which float32 Gram eigenvalues would blur (MPS has no float64).
    xg = x.double() if x.device.type != "mps" else x
    gram = xg @ xg.mT if x.shape[-2] <= x.shape[-1] else xg.mT @ xg
    h = gram_entropy(gram).to(x.dtype)
    t = x.shape[-2]
    if normalize:
        h = h / math.log(t) if t > 1 else torch.zeros_like(h)
    return h


def residual_norm(hidden: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the per-token L2 norm; (..., T, D) → (...)."""
    return _f32(hidden).norm(dim=-1).mean(-1)


def massive_ratio(hidden: torch.Tensor) -> torch.Tensor:
    """Largest |activation| over the (T, D) matrix divided by the median |activation|.

    (..., T, D) → (...). Massive activations (Sun et al. 2024) show up as ratios in the
    hundreds to thousands; a Gaussian stream gives single digits. The median is the lower median
    of T·D values and is clamped away from zero.
    """
    a = _f32(hidden).abs().flatten(-2)
    return a.amax(-1) / _lower_median(a).clamp_min(_TINY)


def _lower_median(a: torch.Tensor) -> torch.Tensor:
    """``a.median(-1).values`` (the lower median). On CPU numpy's introselect picks the same
    element about ten times faster than torch.median, which matters in a per-layer probe. Rows
    holding NaN may differ (torch gives NaN); callers here divide max|a| by it, which is NaN then
    anyway."""
    if a.device.type != "cpu" or a.requires_grad or a.dtype not in (torch.float32, torch.float64):
        return a.median(-1).values
    k = (a.shape[-1] - 1) // 2
    part = np.partition(a.numpy(), k, axis=-1)[..., k]
    return torch.from_numpy(np.ascontiguousarray(part))


@dataclass(frozen=True)
class MassiveActivations:
    """``ratio`` = max|a| / median|a|; ``top_values`` are the signed activations with the
    ``top_k`` largest magnitudes, at ``indices`` = (token, dim) pairs, largest first."""

    ratio: float
    median_abs: float
    top_values: list[float]
    indices: list[tuple[int, int]]


def massive_activations(hidden: torch.Tensor, top_k: int = 3) -> MassiveActivations:
    """Locate the largest activations of one (T, D) residual matrix (one prompt, one site)."""
    if hidden.dim() != 2:
        raise ValueError(f"massive_activations expects (T, D), got shape {tuple(hidden.shape)}")
    h = _f32(hidden).detach()
    flat = h.flatten()
    a = flat.abs()
    med = float(a.median().clamp_min(_TINY))
    k = min(top_k, flat.numel())
    top = torch.topk(a, k)
    d = h.shape[1]
    idx = [(int(i) // d, int(i) % d) for i in top.indices.tolist()]
    return MassiveActivations(
        ratio=float(top.values[0]) / med if k else float("nan"),
        median_abs=med,
        top_values=[float(v) for v in flat[top.indices].tolist()],
        indices=idx,
    )


# --------------------------------------------------------------------------- neuron classes


@dataclass(frozen=True)
class NeuronClasses:
    """Prediction / suppression neurons of one MLP (Gurnee et al. 2024, "Universal neurons").

    ``kurtosis`` (excess) and ``skew`` are per neuron (F,) of its vocabulary projection
    ``W_U w_out[:, f]``; a neuron is *prediction* when kurtosis > threshold and skew > skew
    threshold, *suppression* when kurtosis > threshold and skew < −skew threshold.
    """

    prediction_fraction: float
    suppression_fraction: float
    kurtosis: np.ndarray
    skew: np.ndarray
    kurtosis_threshold: float
    skew_threshold: float

    @property
    def prediction(self) -> np.ndarray:
        """Boolean mask (F,) of prediction neurons."""
        return (self.kurtosis > self.kurtosis_threshold) & (self.skew > self.skew_threshold)

    @property
    def suppression(self) -> np.ndarray:
        """Boolean mask (F,) of suppression neurons."""
        return (self.kurtosis > self.kurtosis_threshold) & (self.skew < -self.skew_threshold)


def neuron_classes(
    w_out: torch.Tensor,
    unembed: torch.Tensor,
    kurtosis_threshold: float = 10.0,
    skew_threshold: float = 1.0,
    final_norm_weight: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> NeuronClasses:
    """Classify MLP neurons by the shape of their direct effect on the logits.

    ``w_out`` is the down/output projection (D, F) (a ``nn.Linear(F, D).weight``), ``unembed``
    is (V, D). Each neuron's V-vector of logit effects is reduced to its skew and *excess*
    kurtosis (Gaussian → 0): a heavy positive tail boosts a few tokens (prediction), a heavy
    negative tail suppresses a few (suppression). The defaults (excess kurtosis > 10, |skew| > 1)
    are conservative: a Gaussian projection never passes, a few-token spike always does.
    ``final_norm_weight`` (D,), if given, is folded into the unembedding (the norm's gain sits
    between the residual stream and W_U). Moments are shift-invariant, so the unembedding need
    not be centred. Neurons are processed ``chunk_size`` at a time to bound memory (V×chunk).
    """
    if w_out.dim() != 2 or unembed.dim() != 2 or unembed.shape[1] != w_out.shape[0]:
        raise ValueError(
            f"need w_out (D, F) and unembed (V, D); got {tuple(w_out.shape)}, "
            f"{tuple(unembed.shape)}"
        )
    u = unembed.detach().float()
    if final_norm_weight is not None:
        u = u * final_norm_weight.detach().float().to(u.device)
    w = w_out.detach().float().to(u.device)
    kurts, skews = [], []
    for start in range(0, w.shape[1], chunk_size):
        proj = u @ w[:, start : start + chunk_size]  # (V, chunk)
        z = proj - proj.mean(0, keepdim=True)
        var = z.square().mean(0).clamp_min(_TINY)
        skews.append((z.pow(3).mean(0) / var.pow(1.5)).cpu())
        kurts.append((z.pow(4).mean(0) / var.square() - 3.0).cpu())
    kurt = torch.cat(kurts).numpy().astype(np.float64)
    skew = torch.cat(skews).numpy().astype(np.float64)
    heavy = kurt > kurtosis_threshold
    n = max(len(kurt), 1)
    return NeuronClasses(
        prediction_fraction=float((heavy & (skew > skew_threshold)).sum() / n),
        suppression_fraction=float((heavy & (skew < -skew_threshold)).sum() / n),
        kurtosis=kurt,
        skew=skew,
        kurtosis_threshold=kurtosis_threshold,
        skew_threshold=skew_threshold,
    )


# --------------------------------------------------------------------------- profile + views

Curve = tuple[np.ndarray, np.ndarray]


def _relative(n: int) -> np.ndarray:
    """Relative depth of n evenly spaced layers on [0, 1] (a single layer sits at 0)."""
    return np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(n)


@dataclass
class StagesProfile:
    """Per-site averages of the stage metrics, sites sorted by realised depth.

    ``metrics[name]`` has one value per site (NaN where the metric was never observed, e.g.
    attention metrics without attention); ``counts`` is the number of prompts averaged per site.
    """

    sites: list[Site]
    metrics: dict[str, np.ndarray]
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        order = sorted(range(len(self.sites)), key=lambda i: self.sites[i].depth)
        self.sites = [self.sites[i] for i in order]
        self.metrics = {k: np.asarray(v, dtype=np.float64)[order] for k, v in self.metrics.items()}
        if len(self.counts) == len(order):
            self.counts = np.asarray(self.counts, dtype=np.int64)[order]
        else:
            self.counts = np.zeros(len(order), dtype=np.int64)

    @property
    def metric_names(self) -> list[str]:
        return list(self.metrics)

    @property
    def recurrences(self) -> list[int]:
        """The block recurrences present, ascending."""
        return sorted({s.recurrence for s in self.sites if s.stage == "block"})

    @property
    def block_layers(self) -> list[int]:
        """The unique block layer indices present, ascending."""
        return sorted({s.layer for s in self.sites if s.stage == "block"})

    def _idx(self, pred: Any) -> np.ndarray:
        return np.array([i for i, s in enumerate(self.sites) if pred(s)], dtype=np.int64)

    def by_depth(self, metric: str) -> Curve:
        """No grouping: (realised depth of each site, value)."""
        return np.array([s.depth for s in self.sites], dtype=np.float64), self.metrics[metric]

    def stage_curve(self, metric: str, stage: str) -> Curve:
        """(layer index, value) for the prelude or coda (or all block sites) in depth order."""
        idx = self._idx(lambda s: s.stage == stage)
        layers = np.array([self.sites[i].layer for i in idx], dtype=np.float64)
        return layers, self.metrics[metric][idx]

    def by_recurrence(self, metric: str) -> dict[int, Curve]:
        """One curve per block pass: recurrence → (relative depth in [0, 1], value).

        Relative depth of block layer l in a k-layer block is l / (k − 1) (0 when k = 1).
        Prelude and coda are not passes and are left out; get them with :meth:`stage_curve`.
        """
        k = len(self.block_layers)
        out: dict[int, Curve] = {}
        for r in self.recurrences:
            idx = self._idx(lambda s, r=r: s.stage == "block" and s.recurrence == r)
            idx = idx[np.argsort([self.sites[i].layer for i in idx], kind="stable")]
            layers = np.array([self.sites[i].layer for i in idx], dtype=np.float64)
            x = layers / (k - 1) if k > 1 else np.zeros(len(idx))
            out[r] = (x, self.metrics[metric][idx])
        return out

    def by_layer(self, metric: str) -> dict[int, Curve]:
        """One curve per unique block layer: layer → (recurrence, value)."""
        out: dict[int, Curve] = {}
        for layer in self.block_layers:
            idx = self._idx(lambda s, lay=layer: s.stage == "block" and s.layer == lay)
            idx = idx[np.argsort([self.sites[i].recurrence for i in idx], kind="stable")]
            recs = np.array([self.sites[i].recurrence for i in idx], dtype=np.float64)
            out[layer] = (recs, self.metrics[metric][idx])
        return out

    def as_single_pass(self, metric: str) -> Curve:
        """The whole profile as one pass: (relative depth in [0, 1], value) over all sites in
        depth order — how a feedforward reference is compared with one recurrence."""
        v = self.metrics[metric]
        return _relative(len(v)), v

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (NaN → None)."""

        def clean(a: np.ndarray) -> list[float | None]:
            return [None if not np.isfinite(x) else float(x) for x in a]

        return {
            "sites": [
                {"stage": s.stage, "layer": s.layer, "recurrence": s.recurrence, "depth": s.depth}
                for s in self.sites
            ],
            "metrics": {k: clean(v) for k, v in self.metrics.items()},
            "counts": [int(c) for c in self.counts],
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StagesProfile:
        sites = [
            Site(stage=s["stage"], layer=s["layer"], recurrence=s["recurrence"], depth=s["depth"])
            for s in d["sites"]
        ]
        metrics = {
            k: np.array([np.nan if x is None else x for x in v], dtype=np.float64)
            for k, v in d["metrics"].items()
        }
        counts = np.asarray(d.get("counts", []), dtype=np.int64)
        return cls(sites=sites, metrics=metrics, counts=counts, meta=dict(d.get("meta", {})))


# --------------------------------------------------------------------------- streaming probe


class StagesAccumulator:
    """Probe that reduces every observed (hidden, attn) to per-site metric sums on the fly.

    Each call adds one value per batch item (prompt) for every metric; attention metrics are
    first averaged over heads. Sums stay on the input's device (no host sync per call) and no
    hidden state or attention matrix is retained. Assumes an *unpadded* batch: every item's T
    tokens are real (run B = 1 or equal-length prompts); padding would leak into the column sums
    and the Gram spectrum.

    The per-call work is fused for speed (this probe runs at every layer application): the
    attention metrics share one column-mean of A, and all metrics of a call are added to the
    site's float64 sum vector in one operation. The values equal those of the metric functions.
    """

    wants_attention: bool = True

    def __init__(
        self,
        sink_threshold: float = 0.3,
        sink_position: int | None = 0,
        row_normalize_entropy: bool = False,
    ) -> None:
        self.sink_threshold = sink_threshold
        self.sink_position = sink_position
        self.row_normalize_entropy = row_normalize_entropy
        self.reset()

    def reset(self) -> None:
        # Per site: a float64 vector of sums in METRICS order (attention metrics first), and
        # 0-dim views of it for the metrics observed so far (what result() reads).
        self._buffers: dict[Site, torch.Tensor] = {}
        self._sums: dict[Site, dict[str, torch.Tensor]] = {}
        self._counts: dict[Site, dict[str, int]] = {}

    def _attention_values(self, a: torch.Tensor) -> list[torch.Tensor]:
        """ColSum concentration, sink rate, sink score and mixing, each (B,), from (B, H, T, T).

        Same arithmetic as the metric functions, sharing the column mean ĉ = sink scores.
        """
        t = a.shape[-1]
        s = a.mean(-2)  # (B, H, T): column sums / T = sink scores
        if t == 1:
            col = torch.ones(s.shape[:-1], dtype=s.dtype, device=s.device)
        else:
            col = 1.0 - _entropy(s) / math.log(t)
        at = s.amax(-1) if self.sink_position is None else s[..., self.sink_position]
        rate = (at >= self.sink_threshold).to(s.dtype).mean(-1)
        mixing = _entropy(a).mean(-1).mean(-1)
        return [col.mean(-1), rate, s[..., 0].mean(-1), mixing]

    @torch.no_grad()
    def observe(self, site: Site, hidden: torch.Tensor, attn: torch.Tensor | None) -> None:
        h = hidden.reshape(-1, *hidden.shape[-2:])  # (B, T, D)
        values = [
            matrix_entropy(h, True, self.row_normalize_entropy),
            residual_norm(h),
            massive_ratio(h),
        ]
        names = METRICS[len(ATTENTION_METRICS) :]
        if attn is not None:
            a = _f32(attn.detach()).reshape(-1, *attn.shape[-3:])  # (B, H, T, T)
            values = self._attention_values(a) + values
            names = METRICS
        total = torch.stack(values).detach().double().sum(-1)  # (k,) sums over the batch
        buf = self._buffers.get(site)
        if buf is None:
            buf = torch.zeros(len(METRICS), dtype=torch.float64, device=total.device)
            self._buffers[site] = buf
        (buf if len(names) == len(METRICS) else buf[len(METRICS) - len(names) :]).add_(total)
        sums = self._sums.setdefault(site, {})
        counts = self._counts.setdefault(site, {})
        offset = len(METRICS) - len(names)
        for i, name in enumerate(names):
            if name not in sums:
                sums[name] = buf[offset + i]
            counts[name] = counts.get(name, 0) + h.shape[0]

    def result(self) -> StagesProfile:
        """Average per site; one device→host transfer for all sites."""
        sites = sorted(self._sums, key=lambda s: s.depth)
        host = (
            torch.stack([self._buffers[s] for s in sites]).cpu().numpy()
            if sites
            else np.zeros((0, len(METRICS)))
        )
        metrics = {
            m: np.array(
                [
                    host[i, j] / self._counts[s][m] if m in self._sums[s] else np.nan
                    for i, s in enumerate(sites)
                ],
                dtype=np.float64,
            )
            for j, m in enumerate(METRICS)
        }
        counts = np.array([max(self._counts[s].values(), default=0) for s in sites])
        meta = {
            "sink_threshold": self.sink_threshold,
            "sink_position": self.sink_position,
            "row_normalize_entropy": self.row_normalize_entropy,
        }
        return StagesProfile(sites=sites, metrics=metrics, counts=counts, meta=meta)
