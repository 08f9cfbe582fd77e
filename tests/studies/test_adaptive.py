"""Adaptive depth on constructed recurrences whose exit points are known, on a tiny LoopLM, and
the out-of-memory micro-batcher it runs prompts through."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tolerances import model_tolerance, rounding_tolerance

from loopscope.cli.main import main
from loopscope.engine.batching import (
    MicrobatchOutOfMemoryError,
    is_out_of_memory,
    run_in_microbatches,
)
from loopscope.families.looplm import LoopConfig, LoopLM
from loopscope.studies.adaptive import (
    adaptive_depth_sweep,
    exit_recurrences,
    plot_adaptive,
    recurrences_saved_at,
    signals_from_tensors,
    sweep_signals,
)
from loopscope.training.checkpoints import save_checkpoint
from loopscope.training.config import TrainConfig

R, V, D = 10, 7, 4
TARGET = 6  # the settled top-1; the unsettled phase cycles through tokens 0..5
SETTLE = [0, 2, 5, 9]  # token t settles (takes its final logits and state) at recurrence SETTLE[t]


def settling_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """States (R, T, D) and logits (R, T, V): token t is "thinking" before SETTLE[t] (top-1
    cycling, state moving) and constant from SETTLE[t] on."""
    g = torch.Generator().manual_seed(0)
    final_state = torch.randn(len(SETTLE), D, generator=g, dtype=torch.float64)
    states = torch.empty(R, len(SETTLE), D, dtype=torch.float64)
    logits = torch.zeros(R, len(SETTLE), V, dtype=torch.float64)
    for t, s in enumerate(SETTLE):
        for r in range(R):
            if r < s:
                states[r, t] = torch.randn(D, generator=g, dtype=torch.float64)
                logits[r, t, r % 6] = 5.0
            else:
                states[r, t] = final_state[t]
                logits[r, t, TARGET] = 8.0
    return states, logits


def test_exit_recurrence_is_where_the_token_settles() -> None:
    signals = signals_from_tensors(*settling_tensors())
    full = R - 1
    settled_next = [min(s + 1, full) for s in SETTLE]  # first recurrence with no change
    for crit in ("kl", "latent", "cosine"):
        np.testing.assert_array_equal(exit_recurrences(signals, crit, 1e-9), settled_next)
    for n in (1, 3):
        expect = [min(s + n, full) for s in SETTLE]
        np.testing.assert_array_equal(exit_recurrences(signals, "argmax", n), expect)
    # Entropy is blind to which token is on top: the cycling phase has constant entropy, so it
    # exits every token at recurrence 1, settled (token 0) or not.
    np.testing.assert_array_equal(exit_recurrences(signals, "entropy", 1e-9), [1, 1, 1, 1])


def test_agreement_kl_and_savings_follow_from_the_exits() -> None:
    signals = signals_from_tensors(*settling_tensors())
    result = sweep_signals([signals], {"kl": [1e-9, 0.0], "entropy": [1e-9]})
    kl_row, never, entropy_row = result.rows
    assert kl_row.mean_recurrences == pytest.approx(np.mean([2, 4, 7, 10]))
    assert kl_row.saved_fraction == pytest.approx(1 - kl_row.mean_recurrences / R)
    # exits at identical logits: a KL over V log-probabilities (logits up to 8) of float64
    kl = rounding_tolerance(torch.float64, 8.0, V)
    assert kl_row.top1_agreement == 1.0 and kl_row.mean_kl == pytest.approx(0.0, abs=kl)
    # Threshold 0 never fires: full depth, full agreement, nothing saved.
    assert never.mean_recurrences == R and never.saved_fraction == 0.0
    assert never.top1_agreement == 1.0 and never.mean_kl == 0.0
    # Entropy exits tokens 1-3 while their top-1 still cycles: only token 0 agrees.
    assert entropy_row.top1_agreement == pytest.approx(0.25)
    assert entropy_row.mean_kl > 1.0
    # The oracle exits each token as soon as its top-1 is final: at SETTLE (0-based).
    assert result.oracle_mean_recurrences == pytest.approx(np.mean([1, 3, 6, 10]))
    saved = recurrences_saved_at(result, agreement=0.99)
    assert saved == {"kl": pytest.approx(kl_row.saved_fraction), "entropy": 0.0}


def test_gate_criterion_uses_the_cumulative_exit_probability() -> None:
    states, logits = settling_tensors()
    gate = torch.zeros(R, len(SETTLE), dtype=torch.float64)  # λ = 1/2 every recurrence
    signals = signals_from_tensors(states, logits, gate)
    assert signals.gate_cdf is not None
    np.testing.assert_allclose(signals.gate_cdf[:, 0], 1 - 0.5 ** np.arange(1, R + 1))
    # 1 − 2^{-(r+1)} ≥ 0.9 first at r = 3 (0.9375); 0.875 at r = 2 is not enough.
    np.testing.assert_array_equal(exit_recurrences(signals, "gate", 0.9), [3, 3, 3, 3])
    with pytest.raises(ValueError, match="exit_gate_logits"):
        exit_recurrences(signals_from_tensors(states, logits), "gate", 0.9)


def test_bad_criteria_and_shapes_get_clear_errors() -> None:
    states, logits = settling_tensors()
    signals = signals_from_tensors(states, logits)
    with pytest.raises(ValueError, match="unknown criterion 'depth'"):
        exit_recurrences(signals, "depth", 0.1)
    with pytest.raises(ValueError, match="whole number"):
        exit_recurrences(signals, "argmax", 0.5)
    with pytest.raises(ValueError, match="disagree"):
        signals_from_tensors(states[:, :2], logits)


# --------------------------------------------------------------------------- on a model

TINY = LoopConfig(
    name="tiny",
    d_model=32,
    n_heads=2,
    prelude_layers=1,
    block_layers=2,
    coda_layers=1,
    context_length=64,
)


class GatedLM(LoopLM):
    """A LoopLM with a constant Ouro-style exit gate (λ = 1/2 at every recurrence)."""

    def exit_gate_logits(self, state: torch.Tensor) -> torch.Tensor:
        return torch.zeros(state.shape[:2], dtype=state.dtype, device=state.device)


def prompts() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (n,), generator=g) for n in (5, 11, 8)]


def test_sweep_on_a_model_is_the_same_batched_or_not() -> None:
    model = LoopLM(TINY).eval()
    crits: dict[str, list[float]] = {"kl": [1e-3, 0.0], "argmax": [2], "latent": [0.05]}
    one = adaptive_depth_sweep(model, prompts(), max_recurrences=6, criteria=crits, batch_size=1)
    three = adaptive_depth_sweep(model, prompts(), max_recurrences=6, criteria=crits)
    assert one.n_prompts == 3 and one.n_tokens == 24 and one.max_recurrences == 6
    with torch.no_grad():
        reference = model(prompts()[1][None], recurrences=6).logits
    # batching changes only rounding; log-softmax is 2-Lipschitz in the max norm and a KL
    # compares two of them: 4 × the logits' tolerance
    kl = 4 * model_tolerance(model, reference, 6)
    for a, b in zip(one.rows, three.rows):
        assert (a.criterion, a.threshold) == (b.criterion, b.threshold)
        assert a.mean_recurrences == pytest.approx(b.mean_recurrences)
        assert a.top1_agreement == pytest.approx(b.top1_agreement)
        assert a.mean_kl == pytest.approx(b.mean_kl, abs=kl)
    never = [r for r in one.rows if r.threshold == 0.0][0]
    assert never.mean_recurrences == 6 and never.top1_agreement == 1.0
    assert one.skipped == {} and "gate" not in one.criteria()
    fig = plot_adaptive(one)
    assert len(fig.axes[0].lines) == 3 + 2  # one per criterion, the target and the oracle


def test_default_criteria_use_the_gate_only_when_the_model_has_one(tmp_path: Path) -> None:
    plain = adaptive_depth_sweep(LoopLM(TINY).eval(), prompts()[:1], max_recurrences=4)
    assert "gate" in plain.skipped and "gate" not in plain.criteria()
    gated = adaptive_depth_sweep(GatedLM(TINY).eval(), prompts()[:1], max_recurrences=4)
    assert "gate" in gated.criteria() and not gated.skipped
    row = [r for r in gated.rows if r.criterion == "gate" and r.threshold == 0.9][0]
    assert row.mean_recurrences == 4.0  # 1 − 2^-4 = 0.9375 ≥ 0.9 only at the 4th
    row = [r for r in gated.rows if r.criterion == "gate" and r.threshold == 0.7][0]
    assert row.mean_recurrences == 2.0  # 1 − 2^-2 = 0.75
    with pytest.raises(ValueError, match="exit_gate_logits"):
        adaptive_depth_sweep(
            LoopLM(TINY).eval(), prompts(), max_recurrences=4, criteria={"gate": [0.5]}
        )


def test_cli_writes_table_csv_and_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_checkpoint(tmp_path / "model", LoopLM(TINY), TrainConfig())
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("2+2=\nHello there\n")
    out = str(tmp_path / "out")
    args = ["--prompts", str(prompts_file), "--out", out, "--recurrences", "5", "--no-progress"]
    code = main(["adaptive", str(tmp_path / "model"), *args])
    assert code == 0
    md = (tmp_path / "out" / "adaptive.md").read_text()
    assert "2 prompts" in md and "| kl |" in md
    csv_lines = (tmp_path / "out" / "adaptive.csv").read_text().splitlines()
    assert (
        csv_lines[0] == "criterion,threshold,mean_recurrences,saved_fraction,top1_agreement,mean_kl"
    )
    assert (tmp_path / "out" / "adaptive.png").stat().st_size > 0
    assert "Recurrences saved" in capsys.readouterr().out
    assert main(["adaptive", str(tmp_path / "missing"), *args]) == 2
    assert "cannot load" in capsys.readouterr().err


# --------------------------------------------------------------------------- micro-batching


class FitsAtMost:
    """Doubles its items, but raises a real out-of-memory error on batches above ``k``."""

    def __init__(self, k: int, error: type[Exception] = torch.OutOfMemoryError) -> None:
        self.k, self.error = k, error
        self.sizes: list[int] = []

    def __call__(self, batch: list[int]) -> list[int]:
        self.sizes.append(len(batch))
        if len(batch) > self.k:
            raise self.error(f"CUDA out of memory. Tried to allocate {len(batch)} GiB")
        return [2 * x for x in batch]


def test_microbatches_halve_on_oom_and_keep_order() -> None:
    fn = FitsAtMost(3)
    assert run_in_microbatches(fn, list(range(10)), 8) == [2 * x for x in range(10)]
    assert fn.sizes == [8, 4, 2, 2, 2, 2, 2]  # 8 and 4 fail; 2 fits and is kept
    text_oom = FitsAtMost(5, error=RuntimeError)  # older torch / CPU allocators
    assert run_in_microbatches(text_oom, list(range(7)), 7) == [2 * x for x in range(7)]
    assert text_oom.sizes == [7, 3, 3, 1]


def test_microbatches_give_up_at_one_and_pass_other_errors_through() -> None:
    with pytest.raises(MicrobatchOutOfMemoryError, match="out of memory on item 0") as info:
        run_in_microbatches(FitsAtMost(0), [1, 2, 3], 4)
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert is_out_of_memory(info.value)  # an outer micro-batcher would halve again

    def broken(batch: list[int]) -> list[int]:
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_in_microbatches(broken, [1, 2], 2)
    with pytest.raises(ValueError, match="one result per item"):
        run_in_microbatches(lambda batch: batch[:1], [1, 2], 2)
    with pytest.raises(ValueError, match="batch_size"):
        run_in_microbatches(lambda batch: batch, [1], 0)
