"""The batched online probes (DynamicsProbe with lengths=, BatchStagesAccumulator): one pass
over a right-padded batch gives every row the metrics that row gives alone."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
import pytest
import torch
from tolerances import magnitude, rounding_tolerance

from loopscope.analysis.stages import StagesAccumulator
from loopscope.analysis.stages_batch import BatchStagesAccumulator
from loopscope.engine.probes import DynamicsProbe
from loopscope.engine.sites import Site

#: The widest sum here: a row's six tokens of width eight (norms, Gram entries).
WIDEST = 6 * 8


def _tol(values: Any) -> float:
    """Two evaluations of the same float32 sums in another order (the padded row's zeros)."""
    array = np.array([np.nan if v is None else v for v in np.ravel(values)], float)
    return rounding_tolerance(torch.float32, magnitude(array), WIDEST)


def test_batch_stages_and_dynamics_give_each_row_its_own_metrics() -> None:
    # one pass over a padded batch against each row fed alone, with a single-token row (its
    # entropy is 0 by definition), a row whose last token diverges and NaN pads
    lengths, width, heads, recurrences = [1, 6, 4], 8, 2, 3
    gen = torch.Generator().manual_seed(3)
    states = torch.randn(recurrences, len(lengths), 6, width, generator=gen)
    states[:, 2, 3] = float("inf")
    scores = torch.randn(recurrences, len(lengths), heads, 6, 6, generator=gen)
    attn = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), -torch.inf).softmax(-1)
    for row, n in enumerate(lengths):
        states[:, row, n:] = float("nan")
        attn[:, row, :, n:] = float("nan")
    batch_stages = BatchStagesAccumulator(lengths)
    batch_dynamics = DynamicsProbe(recurrences, 1, track_attention=True, lengths=lengths)
    alone = [
        (StagesAccumulator(), DynamicsProbe(recurrences, 1, track_attention=True)) for _ in lengths
    ]
    for r in range(recurrences):
        site = Site("block", 0, r, r)
        batch_probes: list[Any] = [batch_stages, batch_dynamics]
        for probe in batch_probes:
            probe.observe(site, states[r], attn[r])
        for row, (n, pair) in enumerate(zip(lengths, alone)):
            row_probes: list[Any] = list(pair)
            for probe in row_probes:
                probe.observe(site, states[r, row : row + 1, :n], attn[r, row : row + 1, :, :n, :n])
    profiles, summaries = batch_stages.results(), batch_dynamics.rows()
    assert profiles[0].metrics["matrix_entropy"][0] == 0.0
    assert summaries[2].divergent.tolist() == [False, False, False, True]
    for row, (stages, dynamics) in enumerate(alone):
        want, got = stages.result().to_dict(), profiles[row].to_dict()
        assert want["counts"] == got["counts"] and want["sites"] == got["sites"]
        for name, values in want["metrics"].items():
            batched = np.array(got["metrics"][name], float)
            np.testing.assert_allclose(batched, np.array(values, float), rtol=0, atol=_tol(values))
        expected, have = asdict(dynamics.result()), asdict(summaries[row])
        for key, value in expected.items():
            if value is None:
                assert have[key] is None, key
            else:
                np.testing.assert_allclose(have[key], value, rtol=0, atol=_tol(value), err_msg=key)
    with pytest.raises(RuntimeError, match="by rows"):
        batch_dynamics.result()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("pending_bytes", [0, 1 << 30])
def test_batch_matrix_entropy_sizes_each_row_by_its_own_side(
    threads: int, pending_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # width 4: rows of 1, 3 and 4 tokens take their T_i × T_i Gram, rows of 6 and 9 the
    # 4 × 4 one; solved per site (pending_bytes 0) or all at results(), on one or two threads
    import loopscope.analysis.stages_batch as stages_batch

    monkeypatch.setattr(stages_batch, "PENDING_GRAM_BYTES", pending_bytes)
    lengths, width, recurrences = [9, 1, 6, 3, 4], 4, 4
    gen = torch.Generator().manual_seed(11)
    states = torch.randn(recurrences, len(lengths), max(lengths), width, generator=gen)
    states[2, 3, 1] = float("nan")  # one row diverges at one site: NaN there only
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        batch = BatchStagesAccumulator(lengths)
        alone = [StagesAccumulator() for _ in lengths]
        for r in range(recurrences):
            site = Site("block", 0, r, r)
            batch.observe(site, states[r], None)
            for row, n in enumerate(lengths):
                alone[row].observe(site, states[r, row : row + 1, :n], None)
        profiles = batch.results()
    finally:
        torch.set_num_threads(before)
    for row, accumulator in enumerate(alone):
        want = np.array(accumulator.result().metrics["matrix_entropy"], float)
        got = np.array(profiles[row].metrics["matrix_entropy"], float)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert np.isnan(profiles[3].metrics["matrix_entropy"][2])
    assert profiles[1].metrics["matrix_entropy"].tolist() == [0.0] * recurrences


def test_balanced_bins_split_costs_evenly_and_keep_index_order() -> None:
    from loopscope.analysis.stages_batch import _balanced_bins

    assert _balanced_bins([8.0, 1.0, 1.0, 6.0, 2.0], 2) == [[0, 1], [2, 3, 4]]
    assert _balanced_bins([5.0], 4) == [[0]]
    bins = _balanced_bins([float(t) ** 3 for t in (74, 81, 82, 84, 84, 84, 95, 108)], 2)
    assert sorted(i for b in bins for i in b) == list(range(8))
    loads = [sum(float((74, 81, 82, 84, 84, 84, 95, 108)[i]) ** 3 for i in b) for b in bins]
    assert max(loads) / min(loads) < 1.2
