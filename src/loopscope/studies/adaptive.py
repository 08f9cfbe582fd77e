"""Adaptive depth: how many recurrences each token really needs, under each exit criterion.

One full-depth run per prompt records, after every recurrence r, what each exit criterion
reads: the recurrent state (for latent convergence), the output distribution (for Huginn's KL
criterion, entropy and argmax stability) and, when the model has one, an Ouro-style exit gate.
For a criterion and a threshold, token t exits at the first recurrence where the criterion
holds (else at full depth) and uses that recurrence's logits. We then report the mean number of
recurrences used, the fraction saved, top-1 agreement with the full-depth output and the mean
KL(full ‖ exited).

**Simulated exit, not re-run.** Exiting token t at recurrence r means taking its logits at r
from the full run. In a looped transformer later tokens attend to earlier tokens' states *at the
same recurrence*, so a real per-token exit (where an exited token's state stops changing) would
also perturb the tokens after it; the full run ignores that. The simulation is exact for the
exited token's own output and for models without cross-token mixing, and it is how Huginn's
paper evaluates per-token exit with KV-cache reuse; it is not exact for the other tokens.

Criteria (``threshold`` meaning; ``<``/``≥`` are strict as written, so threshold 0 never fires
for the "below ε" criteria and every token runs to full depth):

- ``latent``: ‖h_r − h_{r−1}‖ / ‖h_r‖ < ε per token, h = the state after the recurrence (the
  last block layer's output, after the model's per-recurrence norm, if any).
- ``cosine``: 1 − cos(h_r, h_{r−1}) < ε.
- ``kl``: KL(p_{r−1} ‖ p_r) < ε between successive output distributions (Huginn).
- ``entropy``: |H(p_r) − H(p_{r−1})| < ε.
- ``argmax``: the top-1 token has not changed for n successive recurrences (threshold n ≥ 1).
- ``gate``: Ouro-style learned exit: with λ_r = σ(gate logit at r), exit once the cumulative
  exit probability 1 − ∏_{j≤r}(1 − λ_j) ≥ q. Used only when the model defines
  ``exit_gate_logits(state) -> (B, T)``; our LoopLM has no gate, so it is skipped there.

The change criteria need a previous recurrence, so their earliest exit is after 2 recurrences.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import NDArray
from torch import Tensor

from loopscope.engine.batching import run_in_microbatches
from loopscope.engine.sites import Site

__all__ = [
    "CRITERIA",
    "DEFAULT_CRITERIA",
    "AdaptiveResult",
    "AdaptiveRow",
    "RecurrenceSignals",
    "adaptive_depth_sweep",
    "collect_signals",
    "exit_recurrences",
    "plot_adaptive",
    "recurrences_saved_at",
    "write_adaptive",
    "signals_from_tensors",
    "sweep_signals",
]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]

#: Threshold grids used when none are given, log-spaced. They reach far down because a
#: pre-norm model with additive injection converges only algebraically (its direction like
#: 1/r), so successive KL and 1 − cos shrink like 1/r⁴ rather than geometrically.
DEFAULT_CRITERIA: dict[str, list[float]] = {
    "latent": [0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4],
    "cosine": [1e-2, 1e-3, 1e-4, 1e-5, 3e-6, 1e-6, 3e-7, 1e-7, 1e-8],
    "kl": [1e-2, 1e-3, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7, 1e-7, 1e-8],
    "entropy": [1e-2, 1e-3, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 1e-7, 1e-8],
    "argmax": [1, 2, 4, 8, 12, 16, 24, 32],
    "gate": [0.5, 0.7, 0.9, 0.95, 0.99],
}


@dataclass(frozen=True)
class RecurrenceSignals:
    """Per recurrence r (0-based: r = after r+1 recurrences) and token, everything the exit
    criteria and the evaluation read, for one prompt. All arrays are (R, T); change signals
    are +inf at r = 0 (nothing to compare with)."""

    latent_change: FloatArray
    cosine_change: FloatArray
    kl_step: FloatArray
    entropy_change: FloatArray
    argmax: IntArray
    kl_to_full: FloatArray
    gate_cdf: FloatArray | None = None

    @property
    def recurrences(self) -> int:
        return int(self.argmax.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.argmax.shape[1])

    @property
    def agrees(self) -> BoolArray:
        """(R, T) top-1 at r equals top-1 at full depth."""
        return np.asarray(self.argmax == self.argmax[-1:], dtype=np.bool_)


# --------------------------------------------------------------------------- signals


def _change_signals(states: Tensor) -> tuple[FloatArray, FloatArray]:
    """Relative change and 1 − cosine between successive states (R, T, D), +inf at r = 0."""
    h = states.to(torch.float64)
    prev, cur = h[:-1], h[1:]
    diff = torch.linalg.vector_norm(cur - prev, dim=-1)
    norm = torch.linalg.vector_norm(cur, dim=-1)
    rel = torch.where(norm > 0, diff / norm.clamp_min(1e-300), torch.where(diff > 0, np.inf, 0.0))
    prev_norm = torch.linalg.vector_norm(prev, dim=-1)
    dot = (cur * prev).sum(-1)
    both = (norm > 0) & (prev_norm > 0)
    cos = torch.where(both, dot / (norm * prev_norm).clamp_min(1e-300), (norm == prev_norm) * 1.0)
    first = torch.full((1, h.shape[1]), np.inf, dtype=torch.float64, device=h.device)
    latent = torch.cat([first, rel]).cpu().numpy()
    cosine = torch.cat([first, (1.0 - cos).clamp_min(0.0)]).cpu().numpy()
    return latent, cosine


def _distribution_signals(
    logits: Tensor,
) -> tuple[FloatArray, FloatArray, IntArray, FloatArray]:
    """Successive KL(p_{r−1} ‖ p_r), |ΔH|, argmax and KL(p_R ‖ p_r) from logits (R, T, V),
    one recurrence at a time in float64 so peak memory stays at a few (T, V) arrays."""
    n_rec, n_tok = logits.shape[0], logits.shape[1]
    final = torch.log_softmax(logits[-1].to(torch.float64), dim=-1)
    p_final = final.exp()
    kl_step = np.full((n_rec, n_tok), np.inf)
    ent_change = np.full((n_rec, n_tok), np.inf)
    kl_full = np.empty((n_rec, n_tok))
    argmax = np.empty((n_rec, n_tok), dtype=np.int64)
    prev_lp: Tensor | None = None
    prev_h: Tensor | None = None
    for r in range(n_rec):
        lp = torch.log_softmax(logits[r].to(torch.float64), dim=-1)
        p = lp.exp()
        h = -(p * lp).sum(-1)
        argmax[r] = lp.argmax(-1).cpu().numpy()
        kl_full[r] = (p_final * (final - lp)).sum(-1).clamp_min(0.0).cpu().numpy()
        if prev_lp is not None and prev_h is not None:
            kl = (prev_lp.exp() * (prev_lp - lp)).sum(-1).clamp_min(0.0)
            kl_step[r] = kl.cpu().numpy()
            ent_change[r] = (h - prev_h).abs().cpu().numpy()
        prev_lp, prev_h = lp, h
    return kl_step, ent_change, argmax, kl_full


def _gate_cdf(gate_logits: Tensor) -> FloatArray:
    """Cumulative exit probability 1 − ∏_{j≤r} (1 − σ(g_j)) over recurrences (R, T)."""
    log_stay = torch.nn.functional.logsigmoid(-gate_logits.to(torch.float64))
    return (1.0 - torch.cumsum(log_stay, dim=0).exp()).cpu().numpy()


def signals_from_tensors(
    states: Tensor, logits: Tensor, gate_logits: Tensor | None = None
) -> RecurrenceSignals:
    """Signals of one prompt from its per-recurrence states (R, T, D), logits (R, T, V) and
    optional exit-gate logits (R, T)."""
    if states.dim() != 3 or logits.dim() != 3:
        raise ValueError(
            f"states must be (R, T, D) and logits (R, T, V); got {tuple(states.shape)} and "
            f"{tuple(logits.shape)}"
        )
    if states.shape[:2] != logits.shape[:2]:
        raise ValueError(
            f"states {tuple(states.shape)} and logits {tuple(logits.shape)} disagree on "
            "(recurrences, tokens)"
        )
    if gate_logits is not None and gate_logits.shape != states.shape[:2]:
        raise ValueError(
            f"gate logits must be (R, T) = {tuple(states.shape[:2])}, got "
            f"{tuple(gate_logits.shape)}"
        )
    latent, cosine = _change_signals(states)
    kl_step, ent_change, argmax, kl_full = _distribution_signals(logits)
    return RecurrenceSignals(
        latent_change=latent,
        cosine_change=cosine,
        kl_step=kl_step,
        entropy_change=ent_change,
        argmax=argmax,
        kl_to_full=kl_full,
        gate_cdf=None if gate_logits is None else _gate_cdf(gate_logits),
    )


class _LastBlockLayer:
    """Probe that keeps the residual stream after the last block layer at every recurrence."""

    wants_attention = False

    def __init__(self, last_layer: int) -> None:
        self.last_layer = last_layer
        self.states: list[Tensor] = []

    def observe(self, site: Site, hidden: Tensor, attn: Tensor | None) -> None:
        if site.stage == "block" and site.layer == self.last_layer:
            self.states.append(hidden.detach())


def _gate_fn(model: Any) -> Callable[[Tensor], Tensor] | None:
    gate = getattr(model, "exit_gate_logits", None)
    return gate if callable(gate) else None


def _as_prompt(ids: Tensor, index: int) -> Tensor:
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(
            f"prompt {index} must be a non-empty 1-D tensor of token ids (or shape (1, T)), "
            f"got shape {tuple(ids.shape)}"
        )
    return ids.long()


def collect_signals(
    model: Any,
    prompts_ids: Sequence[Tensor],
    max_recurrences: int,
    *,
    init_state: str | None = None,
    seed: int = 0,
) -> list[RecurrenceSignals]:
    """Run ``prompts_ids`` together (right-padded: causal attention keeps real tokens blind to
    the padding after them) for ``max_recurrences`` and return each prompt's signals.

    A random initial state is drawn for the padded batch, so with ``init_state="random"`` the
    draws depend on how prompts are batched.
    """
    prompts = [_as_prompt(p, i) for i, p in enumerate(prompts_ids)]
    device = next(model.parameters()).device
    lengths = [len(p) for p in prompts]
    ids = torch.zeros(len(prompts), max(lengths), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p.to(device)
    probe = _LastBlockLayer(model.meta.block_layers - 1)
    gate = _gate_fn(model)
    with torch.no_grad():
        out = model(
            ids,
            recurrences=max_recurrences,
            init_state=init_state,
            seed=seed,
            probes=[probe],
            exit_every_recurrence=True,
        )
        states = torch.stack([model.recurrence_norm(s) for s in probe.states])  # (R, B, T, D)
        logits = torch.stack(out.recurrence_logits)  # (R, B, T, V)
        gates = torch.stack([gate(s) for s in states]) if gate is not None else None
    return [
        signals_from_tensors(
            states[:, i, :n], logits[:, i, :n], None if gates is None else gates[:, i, :n]
        )
        for i, n in enumerate(lengths)
    ]


# --------------------------------------------------------------------------- criteria


def _argmax_run(argmax: IntArray) -> IntArray:
    """(R, T) number of successive recurrences, ending at r, over which the top-1 held."""
    run = np.zeros(argmax.shape, dtype=np.int64)
    for r in range(1, argmax.shape[0]):
        run[r] = np.where(argmax[r] == argmax[r - 1], run[r - 1] + 1, 0)
    return run


def _below(name: str) -> Callable[[RecurrenceSignals, float], BoolArray]:
    def fires(s: RecurrenceSignals, eps: float) -> BoolArray:
        return np.asarray(getattr(s, name) < eps, dtype=np.bool_)

    return fires


def _argmax_stable(s: RecurrenceSignals, n: float) -> BoolArray:
    if n < 1 or n != int(n):
        raise ValueError(f"argmax threshold is a whole number of recurrences ≥ 1, got {n}")
    return np.asarray(_argmax_run(s.argmax) >= n, dtype=np.bool_)


def _gate_reached(s: RecurrenceSignals, q: float) -> BoolArray:
    if s.gate_cdf is None:
        raise ValueError(
            "the gate criterion needs a model with exit_gate_logits(state) -> (B, T); this "
            "model has none — drop 'gate' from criteria"
        )
    return np.asarray(s.gate_cdf >= q, dtype=np.bool_)


#: Criterion name → (signals, threshold) → (R, T) "may exit here".
CRITERIA: dict[str, Callable[[RecurrenceSignals, float], BoolArray]] = {
    "latent": _below("latent_change"),
    "cosine": _below("cosine_change"),
    "kl": _below("kl_step"),
    "entropy": _below("entropy_change"),
    "argmax": _argmax_stable,
    "gate": _gate_reached,
}


def exit_recurrences(signals: RecurrenceSignals, criterion: str, threshold: float) -> IntArray:
    """(T,) 0-based recurrence at which each token exits: the first where ``criterion`` holds
    at ``threshold``, else the last (full depth). Recurrences used = this + 1."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose from {sorted(CRITERIA)}")
    fires = CRITERIA[criterion](signals, threshold)
    fires[-1] = True  # full depth is always an exit
    return np.asarray(fires.argmax(axis=0), dtype=np.int64)


def _oracle_exit(signals: RecurrenceSignals) -> IntArray:
    """(T,) earliest recurrence from which the top-1 never changes again: the least depth any
    criterion could use at 100% agreement."""
    stays = np.flip(np.cumprod(np.flip(signals.agrees, axis=0), axis=0), axis=0).astype(bool)
    return np.asarray(stays.argmax(axis=0), dtype=np.int64)


def _evaluate(signals: RecurrenceSignals, exits: IntArray) -> tuple[float, float, float]:
    """(mean recurrences used, top-1 agreement, mean KL(full ‖ exited)) for one prompt."""
    tokens = np.arange(signals.tokens)
    used = float(np.mean(exits + 1))
    agree = float(np.mean(signals.agrees[exits, tokens]))
    kl = float(np.mean(signals.kl_to_full[exits, tokens]))
    return used, agree, kl


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class AdaptiveRow:
    """One (criterion, threshold): means over prompts of per-token means."""

    criterion: str
    threshold: float
    mean_recurrences: float
    saved_fraction: float
    top1_agreement: float
    mean_kl: float


_COLUMNS = (
    "criterion",
    "threshold",
    "mean_recurrences",
    "saved_fraction",
    "top1_agreement",
    "mean_kl",
)


@dataclass(frozen=True)
class AdaptiveResult:
    """The sweep: ``rows`` (the table), the depth it ran to, how much data, the oracle (exit
    as soon as the top-1 never changes again) and criteria that were skipped, with why."""

    rows: list[AdaptiveRow]
    max_recurrences: int
    n_prompts: int
    n_tokens: int
    oracle_mean_recurrences: float
    model_name: str = ""
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def oracle_saved_fraction(self) -> float:
        return 1.0 - self.oracle_mean_recurrences / self.max_recurrences

    def criteria(self) -> list[str]:
        return list(dict.fromkeys(row.criterion for row in self.rows))

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(_COLUMNS)
        for row in self.rows:
            writer.writerow(
                [
                    row.criterion,
                    f"{row.threshold:g}",
                    f"{row.mean_recurrences:.4f}",
                    f"{row.saved_fraction:.4f}",
                    f"{row.top1_agreement:.4f}",
                    f"{row.mean_kl:.6g}",
                ]
            )
        return buf.getvalue()

    def to_markdown(self, agreement: float = 0.99) -> str:
        name = self.model_name or "model"
        lines = [
            f"# Adaptive depth: {name}",
            "",
            f"{self.n_prompts} prompts, {self.n_tokens} tokens, full depth "
            f"{self.max_recurrences} recurrences. Oracle (exit once the top-1 never changes "
            f"again): {self.oracle_mean_recurrences:.2f} recurrences "
            f"({self.oracle_saved_fraction:.1%} saved).",
            "",
            "Exits are simulated from one full-depth run: an exited token reads its logits at "
            "the exit recurrence, later tokens still attend to its full-depth states (Huginn's "
            "evaluation with KV reuse; not exact for looped transformers).",
            "",
            f"## Recurrences saved at ≥ {agreement:.0%} top-1 agreement",
            "",
            "| criterion | saved | best threshold |",
            "| --- | ---: | ---: |",
        ]
        for crit in self.criteria():
            best = _best_row(self, crit, agreement)
            thr = "—" if best is None else f"{best.threshold:g}"
            saved = 0.0 if best is None else best.saved_fraction
            lines.append(f"| {crit} | {saved:.1%} | {thr} |")
        for crit, why in self.skipped.items():
            lines.append(f"| {crit} | skipped | {why} |")
        lines += [
            "",
            "## All thresholds",
            "",
            "| criterion | threshold | mean recurrences | saved | top-1 agreement | mean KL |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in self.rows:
            lines.append(
                f"| {row.criterion} | {row.threshold:g} | {row.mean_recurrences:.2f} | "
                f"{row.saved_fraction:.1%} | {row.top1_agreement:.4f} | {row.mean_kl:.3g} |"
            )
        return "\n".join(lines) + "\n"


def _best_row(result: AdaptiveResult, criterion: str, agreement: float) -> AdaptiveRow | None:
    ok = [r for r in result.rows if r.criterion == criterion and r.top1_agreement >= agreement]
    return max(ok, key=lambda r: r.saved_fraction) if ok else None


def recurrences_saved_at(result: AdaptiveResult, agreement: float = 0.99) -> dict[str, float]:
    """Per criterion, the largest fraction of recurrences saved by a threshold whose top-1
    agreement is ≥ ``agreement`` (0.0 when none reaches it: full depth always agrees)."""
    out: dict[str, float] = {}
    for crit in result.criteria():
        best = _best_row(result, crit, agreement)
        out[crit] = 0.0 if best is None else best.saved_fraction
    return out


def _check_criteria(
    criteria: Mapping[str, Sequence[float]], has_gate: bool
) -> dict[str, list[float]]:
    unknown = sorted(set(criteria) - set(CRITERIA))
    if unknown:
        raise ValueError(f"unknown criteria {unknown}; choose from {sorted(CRITERIA)}")
    if "gate" in criteria and not has_gate:
        raise ValueError(
            "criterion 'gate' needs a model with exit_gate_logits(state) -> (B, T); this model "
            "has none — leave 'gate' out"
        )
    return {name: [float(t) for t in thresholds] for name, thresholds in criteria.items()}


def sweep_signals(
    signals: Sequence[RecurrenceSignals],
    criteria: Mapping[str, Sequence[float]],
    *,
    model_name: str = "",
    skipped: Mapping[str, str] | None = None,
) -> AdaptiveResult:
    """The sweep over recorded signals (one per prompt): every (criterion, threshold) row."""
    if not signals:
        raise ValueError("no prompts: give at least one prompt's signals")
    depth = signals[0].recurrences
    if any(s.recurrences != depth for s in signals):
        raise ValueError("all prompts' signals must cover the same number of recurrences")
    rows = []
    for crit, thresholds in criteria.items():
        for thr in thresholds:
            per_prompt = np.array([_evaluate(s, exit_recurrences(s, crit, thr)) for s in signals])
            used, agree, kl = per_prompt.mean(axis=0)
            rows.append(AdaptiveRow(crit, thr, float(used), 1.0 - float(used) / depth, agree, kl))
    oracle = float(np.mean([np.mean(_oracle_exit(s) + 1) for s in signals]))
    return AdaptiveResult(
        rows=rows,
        max_recurrences=depth,
        n_prompts=len(signals),
        n_tokens=sum(s.tokens for s in signals),
        oracle_mean_recurrences=oracle,
        model_name=model_name,
        skipped=dict(skipped or {}),
    )


def adaptive_depth_sweep(
    model: Any,
    prompts_ids: Sequence[Tensor],
    *,
    max_recurrences: int,
    criteria: Mapping[str, Sequence[float]] | None = None,
    init_state: str | None = None,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = False,
) -> AdaptiveResult:
    """Sweep exit criteria over thresholds on ``prompts_ids`` (1-D token-id tensors).

    ``criteria``: name → thresholds (default :data:`DEFAULT_CRITERIA`, without ``gate`` when
    the model has no exit gate). Prompts run ``batch_size`` at a time, halving on
    out-of-memory errors; ``progress`` shows a bar over the prompts.
    """
    from tqdm.auto import tqdm

    if not prompts_ids:
        raise ValueError("no prompts: give at least one tensor of token ids")
    if max_recurrences < 2:
        raise ValueError(f"max_recurrences must be ≥ 2 to exit early at all, got {max_recurrences}")
    has_gate = _gate_fn(model) is not None
    skipped: dict[str, str] = {}
    if criteria is None:
        criteria = dict(DEFAULT_CRITERIA)
        if not has_gate:
            del criteria["gate"]
            skipped["gate"] = "model has no exit_gate_logits"
    chosen = _check_criteria(criteria, has_gate)
    with tqdm(total=len(prompts_ids), desc="adaptive", disable=not progress) as bar:

        def batch_signals(batch: list[Tensor]) -> list[RecurrenceSignals]:
            found = collect_signals(model, batch, max_recurrences, init_state=init_state, seed=seed)
            bar.update(len(batch))
            return found

        signals = run_in_microbatches(batch_signals, list(prompts_ids), batch_size)
    name = getattr(getattr(model, "meta", None), "name", "") or type(model).__name__
    return sweep_signals(signals, chosen, model_name=name, skipped=skipped)


# --------------------------------------------------------------------------- figure and files


def plot_adaptive(result: AdaptiveResult, agreement: float = 0.99) -> Figure:
    """Top-1 agreement against mean recurrences used, one line per criterion, with the oracle
    and the target agreement marked."""
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for crit in result.criteria():
        rows = sorted(
            (r for r in result.rows if r.criterion == crit), key=lambda r: r.mean_recurrences
        )
        ax.plot(
            [r.mean_recurrences for r in rows],
            [r.top1_agreement for r in rows],
            marker="o",
            markersize=3,
            label=crit,
        )
    ax.axhline(agreement, color="tab:gray", linestyle=":", linewidth=1, label=f"{agreement:.0%}")
    ax.axvline(
        result.oracle_mean_recurrences, color="black", linestyle="--", linewidth=1, label="oracle"
    )
    ax.set_xlim(0, result.max_recurrences + 1)
    ax.set_xlabel("mean recurrences used")
    ax.set_ylabel("top-1 agreement with full depth")
    ax.set_title(f"Adaptive depth ({result.model_name}, full depth {result.max_recurrences})")
    ax.legend(fontsize="small")
    return fig


def write_adaptive(result: AdaptiveResult, out_dir: str | Path) -> list[Path]:
    """Write ``adaptive.md`` (the table), ``adaptive.csv`` and ``adaptive.png`` into
    ``out_dir``, each atomically; returns their paths."""
    from loopscope.core.atomic import write_text, write_with

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "adaptive.md", out / "adaptive.csv", out / "adaptive.png"]
    write_text(paths[0], result.to_markdown())
    write_text(paths[1], result.to_csv())
    figure = plot_adaptive(result)
    write_with(paths[2], lambda name: figure.savefig(name, dpi=120, format="png"))
    return paths
