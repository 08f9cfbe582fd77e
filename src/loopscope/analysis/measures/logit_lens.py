"""Logit lens: from which recurrence on does the model already predict what it finally predicts?

After every recurrence r the state is read out as if the run stopped there — the per-recurrence
norm, the coda and the head applied to it — and each token's top-1 prediction is compared with
the one after the last recurrence. A trace stores neither the coda nor the head, so the
read-outs cannot be made from stored states afterwards: :class:`LogitLensProbe` records each
token's top-1 prediction per recurrence while tracing (``logit_lens.npy``, (R, T) token ids,
-1 where the read-out was not finite), for full and lean traces alike.

Pooled over prompts token by token: the agreement at recurrence r is the fraction of all
tokens (with a finite final read-out) whose top-1 prediction there is the final one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure
from numpy.typing import ArrayLike, NDArray
from torch import Tensor

from loopscope.analysis.numerics import FloatArray
from loopscope.analysis.registry import (
    Measurement,
    Need,
    PromptView,
    Results,
    Source,
    TraceFacts,
    register,
)
from loopscope.analysis.report_parts import Figure
from loopscope.engine.sites import Site

if TYPE_CHECKING:
    from loopscope.engine.contract import LoopedLM

#: The chunk file the probe's record is saved as (``<name>.npy``).
ARRAY = "logit_lens"
#: The chunk file saved instead (an empty array) when the model's family declares that its
#: state cannot be read out between recurrences (``LoopedLM.readout_between_recurrences``).
UNAVAILABLE = "logit_lens_unavailable"


def lens_readable(model: LoopedLM) -> bool:
    """Whether tracing ``model`` records the logit lens (its family reads out mid-run)."""
    return bool(getattr(model, "readout_between_recurrences", True))


class LogitLensProbe:
    """Reads the state out after every recurrence (per-recurrence norm, coda, head;
    interventions not applied) and keeps each token's top-1 prediction on the device until
    :meth:`result`.

    Without ``lengths`` it reads batch row 0 (one prompt). With ``lengths`` (each row's real
    token count in a right-padded batch) it reads every row in one pass — the coda is causal,
    so a row's real positions read out what the prompt alone does — and :meth:`rows` cuts each
    row to its real tokens, so pad positions never enter a record."""

    wants_attention = False

    def __init__(self, model: LoopedLM, lengths: Sequence[int] | None = None) -> None:
        if not lens_readable(model):
            raise ValueError(
                f"the {model.meta.family} family declares readout_between_recurrences=False: "
                "its state cannot be read out between recurrences, so it has no logit lens"
            )
        self.model = model
        self.last_layer = model.meta.block_layers - 1
        self.lengths = None if lengths is None else [int(n) for n in lengths]
        self._top1: list[Tensor] = []
        self._positions: Any = None

    def observe(self, site: Site, hidden: Tensor, attn: Tensor | None) -> None:
        if site.stage != "block" or site.layer != self.last_layer:
            return
        with torch.no_grad():
            batch = hidden.detach() if self.lengths is not None else hidden[:1].detach()
            state = self.model.recurrence_norm(batch)
            if self._positions is None:
                self._positions = self.model.positions(state.shape[1], state.device)
            for layer in self.model.coda:
                state, _ = layer(state, self._positions)
            logits = self.model.head(state).float()
            if self.lengths is None:
                logits = logits[0]
            # x·0 is ±0 for finite x and NaN otherwise: a row's sum of x·0 is 0 exactly when
            # every logit is finite (on the host several times cheaper than isfinite().all())
            finite = (logits * 0).sum(dim=-1) == 0
            self._top1.append(torch.where(finite, logits.argmax(dim=-1), -1))

    def _stacked(self) -> NDArray[np.int32]:
        if not self._top1:
            raise RuntimeError("LogitLensProbe saw no block layer; was it passed to the engine?")
        return torch.stack(self._top1).cpu().numpy().astype(np.int32)

    def result(self) -> NDArray[np.int32]:
        """(R, T) top-1 token id of every token's read-out after each recurrence (one prompt;
        with ``lengths``, the first row's real tokens)."""
        if self.lengths is not None:
            return self.rows()[0]
        return self._stacked()

    def rows(self) -> list[NDArray[np.int32]]:
        """Per batch row, its (R, T_i) record over its real tokens only."""
        top1 = self._stacked()
        if self.lengths is None:
            return [top1]
        return [np.ascontiguousarray(top1[:, row, :n]) for row, n in enumerate(self.lengths)]


# ------------------------------------------------------------------------------- measurement


def agreement_counts(top1: ArrayLike) -> tuple[NDArray[np.int64], int]:
    """Per recurrence, how many tokens predict their final top-1 token, and how many tokens
    count (those whose final read-out is finite)."""
    ids = np.asarray(top1)
    valid = ids[-1] >= 0
    agree = (ids[:, valid] == ids[-1, valid]).sum(axis=1)
    return agree.astype(np.int64), int(valid.sum())


def settled_from(top1: ArrayLike) -> NDArray[np.int64]:
    """Per token with a finite final read-out, the first recurrence from which its top-1
    prediction stays the final one."""
    ids = np.asarray(top1)
    valid = ids[-1] >= 0
    differs = ids[:, valid] != ids[-1, valid]  # (R, T'), never true in the last row
    last_change = ids.shape[0] - 1 - np.argmax(differs[::-1], axis=0)
    return np.where(differs.any(axis=0), last_change + 1, 0).astype(np.int64)


@dataclass(frozen=True)
class LogitLens:
    """``agreement`` (R,): fraction of tokens predicting their final token after recurrence r;
    ``settled_from``: per token, the recurrence from which it does for good."""

    agreement: FloatArray
    settled_from: NDArray[np.int64]
    tokens: int
    train_recurrences: int

    @property
    def at_training_depth(self) -> float | None:
        """Agreement after the training recurrence count (None past the traced depth)."""
        r = self.train_recurrences - 1
        return float(self.agreement[r]) if 0 <= r < self.agreement.size else None


def _read(prompt: PromptView, facts: TraceFacts) -> tuple[Any, ...]:
    top1 = np.asarray(prompt.array(ARRAY))
    counts, tokens = agreement_counts(top1)
    return counts, tokens, settled_from(top1)


def _pool(parts: list[tuple[Any, ...]], facts: TraceFacts, results: Results) -> LogitLens:
    tokens = int(sum(p[1] for p in parts))
    counts = np.sum([p[0] for p in parts], axis=0)
    agreement = counts / tokens if tokens else np.full(counts.shape, np.nan)
    return LogitLens(
        agreement=np.asarray(agreement, dtype=np.float64),
        settled_from=np.concatenate([p[2] for p in parts]),
        tokens=tokens,
        train_recurrences=facts.train_recurrences,
    )


def _metrics(lens: LogitLens) -> dict[str, Any]:
    settled = lens.settled_from
    return {
        "logit_lens": {
            "agreement": lens.agreement,
            "agreement_at_train_recurrences": lens.at_training_depth,
            "settled_from_mean": float(settled.mean()) if settled.size else None,
            "settled_from_max": int(settled.max()) if settled.size else None,
            "tokens": lens.tokens,
        }
    }


def _text(lens: LogitLens, facts: TraceFacts, results: Results) -> str:
    at_train = lens.at_training_depth
    train = "—" if at_train is None else f"{100 * at_train:.1f}%"
    settled = lens.settled_from
    final = (
        f"every token's prediction is final from r={int(settled.max())}, on average from "
        f"r={float(settled.mean()):.1f}"
        if settled.size
        else "no token had a finite final read-out"
    )
    return (
        "Top-1 prediction read out after every recurrence (the per-recurrence norm, the coda "
        "and the head applied to the state, as if the run stopped there), compared with the "
        f"prediction after the last of {facts.recurrences} recurrences, over {lens.tokens} "
        f"tokens. After the training recurrence count ({facts.train_recurrences}): {train} "
        f"agree; {final}."
    )


def plot_logit_lens(lens: LogitLens) -> MplFigure:
    """Agreement with the final prediction per recurrence, and when each token settles."""
    fig = MplFigure(figsize=(10.0, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax_a, ax_s = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax_a.plot(np.arange(lens.agreement.size), lens.agreement, marker=".", ms=3)
    ax_a.set_ylim(-0.02, 1.02)
    ax_a.set_xlabel("recurrence r")
    ax_a.set_ylabel("fraction of tokens")
    ax_a.set_title("Top-1 agrees with the final prediction")
    bins = [r - 0.5 for r in range(lens.agreement.size + 1)]
    ax_s.hist(lens.settled_from, bins=bins, color="tab:green")
    ax_s.set_xlabel("recurrence from which the prediction is final")
    ax_s.set_ylabel("tokens")
    ax_s.set_title("When each token settles")
    for ax in (ax_a, ax_s):
        ax.axvline(lens.train_recurrences - 1, color="k", ls="--", lw=1, label="training depth")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    fig.suptitle("Logit lens")
    return fig


LENS_READABLE = Need(
    "a model whose state can be read out between recurrences",
    "this model's family reads its state out only at the end of a run (its coda and head "
    "depend on the whole run, as Inkling-2's head mixes every block state of the last pass), "
    "so a mid-run read-out is not defined for it and no trace of it has a logit lens",
    lambda prompt: prompt.array(UNAVAILABLE) is None,
)
LOGIT_LENS_RECORD = Need(
    "logit-lens read-outs (logit_lens.npy)",
    "trace again with this version of loopscope, which records them for every trace",
    lambda prompt: prompt.array(ARRAY) is not None,
)

LOGIT_LENS = register(
    Measurement(
        name="logit_lens",
        title="Logit lens",
        sources=(Source((LENS_READABLE, LOGIT_LENS_RECORD), _read),),
        pool=_pool,
        metrics=_metrics,
        text=_text,
        figure=lambda lens, facts, results: Figure(
            "logit_lens",
            "Agreement of each recurrence's top-1 read-out with the final prediction, pooled "
            "over tokens and prompts.",
            plot_logit_lens(lens),
        ),
    )
)
