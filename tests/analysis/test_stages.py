"""Stages-of-inference metrics, accumulator, alignment and figures, against closed forms."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from tolerances import forward_tolerance, rounding_tolerance

from loopscope.analysis.alignment import (
    align_pass_to_reference,
    alignment_summary,
    dtw_distance,
    stage_alignment,
)
from loopscope.analysis.figures_stages import (
    plot_alignment,
    plot_intervention_comparison,
    plot_neuron_classes,
    plot_stages_views,
)
from loopscope.analysis.stages import (
    METRICS,
    StagesAccumulator,
    StagesProfile,
    colsum_concentration,
    massive_activations,
    massive_ratio,
    matrix_entropy,
    mixing_score,
    neuron_classes,
    residual_norm,
    sink_rate,
    sink_scores,
)
from loopscope.engine.sites import Site

T = 8


def uniform_causal(t: int) -> torch.Tensor:
    a = torch.tril(torch.ones(t, t))
    return a / a.sum(-1, keepdim=True)


def one_hot_sink(t: int) -> torch.Tensor:
    a = torch.zeros(t, t)
    a[:, 0] = 1.0
    return a


def random_causal(*lead: int, t: int = T, gen: torch.Generator | None = None) -> torch.Tensor:
    logits = torch.randn(*lead, t, t, generator=gen)
    mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
    return logits.masked_fill(mask, float("-inf")).softmax(-1)


# ------------------------------------------------------------------------- attention metrics


def test_uniform_causal_closed_forms() -> None:
    a = uniform_causal(T)
    # column j is read by queries i ≥ j with weight 1/(i+1): ĉ_j = (H_T − H_j) / T
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, T + 1))])
    c_hat = (harmonic[T] - harmonic[:T]) / T
    expected_c = 1.0 + float(np.sum(c_hat * np.log(c_hat))) / math.log(T)
    # column sums of T terms, then an entropy over T columns, in float32
    tol = forward_tolerance(torch.float32, 1.0, 2, T)
    assert float(colsum_concentration(a)) == pytest.approx(expected_c, abs=tol)
    expected_mix = float(np.mean(np.log(np.arange(1, T + 1))))
    tol = forward_tolerance(torch.float32, expected_mix, 2, T)  # row entropies, then a mean
    assert float(mixing_score(a)) == pytest.approx(expected_mix, abs=tol)
    tol = rounding_tolerance(torch.float32, 1.0, T)  # a column mean of T weights
    expected_s = torch.tensor(c_hat, dtype=torch.float32)
    assert torch.allclose(sink_scores(a), expected_s, atol=tol, rtol=0)


def test_one_hot_sink() -> None:
    a = one_hot_sink(T).expand(2, 3, T, T)  # (B, H, T, T)
    s = sink_scores(a)
    assert s.shape == (2, 3, T)
    tol = forward_tolerance(torch.float32, 1.0, 2, T)  # sums of T weights, then entropies
    assert torch.allclose(s[..., 0], torch.ones(2, 3), atol=tol, rtol=0)
    assert torch.allclose(sink_rate(a), torch.ones(2), atol=tol, rtol=0)
    assert torch.allclose(colsum_concentration(a), torch.ones(2, 3), atol=tol, rtol=0)
    assert torch.allclose(mixing_score(a), torch.zeros(2, 3), atol=tol, rtol=0)


def test_sink_rate_threshold_and_position() -> None:
    # head 0 sinks on position 0, head 1 on position 2 (from query 2 on), head 2 is uniform
    h1 = torch.zeros(T, T)
    h1[:2] = uniform_causal(T)[:2]
    h1[2:, 2] = 1.0
    a = torch.stack([one_hot_sink(T), h1, uniform_causal(T)])
    # uniform causal's column 0 score is H_T / T ≈ 0.34 ≥ 0.3: counts at threshold 0.3 only
    assert float(sink_rate(a)) == pytest.approx(2 / 3)
    assert float(sink_rate(a, threshold=0.5)) == pytest.approx(1 / 3)
    assert float(sink_rate(a, threshold=0.5, position=None)) == pytest.approx(2 / 3)
    assert float(sink_rate(a, threshold=0.3, position=None)) == pytest.approx(1.0)


def test_t_equals_one() -> None:
    a = torch.ones(2, 1, 1)
    assert torch.equal(colsum_concentration(a), torch.ones(2))
    assert torch.equal(matrix_entropy(torch.randn(2, 1, 4)), torch.zeros(2))


# ------------------------------------------------------------------------- residual metrics


def test_matrix_entropy_rank_one_and_orthogonal() -> None:
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(T, 1, generator=g), torch.randn(1, 16, generator=g)
    # u @ v rounded entrywise: spurious eigenvalue shares of at most δ = (λ√16·ε)², each
    # adding δ·log(1/δ) to the entropy, which is divided by log T
    share = rounding_tolerance(torch.float32, 1.0, 16) ** 2
    rank_one = (T - 1) * share * math.log(1 / share) / math.log(T)
    assert float(matrix_entropy(u @ v)) == pytest.approx(0.0, abs=rank_one)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    x = 3.0 * q[:T]  # T orthogonal rows of equal norm
    # the rows are orthogonal up to a float32 QR (16 reflections of 16 terms); at its maximum
    # the entropy moves less than the eigenvalue shares do
    qr = rounding_tolerance(torch.float32, 1.0, 16 * 16)
    assert float(matrix_entropy(x, normalize=False)) == pytest.approx(math.log(T), abs=qr)
    assert float(matrix_entropy(x)) == pytest.approx(1.0, abs=qr)
    batch = torch.stack([u @ v, x])
    assert torch.allclose(matrix_entropy(batch), torch.tensor([0.0, 1.0]), atol=qr, rtol=0)


def test_matrix_entropy_massive_token_compresses() -> None:
    # one huge token dominates the un-normalised spectrum; row normalisation removes the effect
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, 32, generator=g)
    x[0] *= 1000.0
    assert float(matrix_entropy(x)) < 0.05
    assert float(matrix_entropy(x, row_normalize=True)) > 0.8


def test_residual_norm_and_massive_activation() -> None:
    g = torch.Generator().manual_seed(2)
    h = torch.randn(15, 33, generator=g)  # odd count: lower median == numpy median
    h[0, 5] = 500.0
    h[3, 7] = -300.0
    ma = massive_activations(h, top_k=2)
    med = float(np.median(np.abs(h.numpy())))
    ratio = rounding_tolerance(torch.float32, 1.0, 2)  # the median is exact, then a division
    assert ma.ratio == pytest.approx(500.0 / med, rel=ratio)
    assert ma.indices == [(0, 5), (3, 7)]
    assert ma.top_values == pytest.approx([500.0, -300.0])
    assert float(massive_ratio(h)) == pytest.approx(ma.ratio, rel=ratio)
    expected_norm = float(np.linalg.norm(h.numpy(), axis=-1).mean())
    norms = rounding_tolerance(torch.float32, 1.0, 33 + 15)  # norms of 33 terms, mean of 15
    assert float(residual_norm(h)) == pytest.approx(expected_norm, rel=norms)
    assert residual_norm(h.expand(3, 2, 15, 33)).shape == (3, 2)


# ------------------------------------------------------------------------- neuron classes


def test_neuron_classes() -> None:
    g = torch.Generator().manual_seed(3)
    v, d = 2000, 16
    unembed = 0.1 * torch.randn(v, d, generator=g)
    unembed[[10, 20, 30], 0] = 5.0  # column 0: sparse positive spike
    unembed[[40, 50, 60], 1] = 5.0  # column 1: spike, read with a negative weight below
    w_out = torch.zeros(d, 3)
    w_out[0, 0] = 1.0  # → +spike: prediction
    w_out[1, 1] = -1.0  # → −spike: suppression
    w_out[5, 2] = 1.0  # → Gaussian: neither
    nc = neuron_classes(w_out, unembed, chunk_size=2)
    assert nc.kurtosis.shape == (3,) and nc.skew.shape == (3,)
    assert nc.prediction.tolist() == [True, False, False]
    assert nc.suppression.tolist() == [False, True, False]
    assert nc.prediction_fraction == pytest.approx(1 / 3)
    assert nc.suppression_fraction == pytest.approx(1 / 3)
    assert abs(nc.kurtosis[2]) < 1.0 and abs(nc.skew[2]) < 0.5
    assert nc.kurtosis[0] > 100 and nc.skew[0] > 5 and nc.skew[1] < -5
    with pytest.raises(ValueError):
        neuron_classes(w_out.T, unembed)


# ------------------------------------------------------------------------- accumulator


def per_prompt(hidden: torch.Tensor, attn: torch.Tensor) -> dict[str, float]:
    return {
        "colsum_concentration": float(colsum_concentration(attn).mean()),
        "sink_rate": float(sink_rate(attn)),
        "sink_score": float(sink_scores(attn)[:, 0].mean()),
        "mixing": float(mixing_score(attn).mean()),
        "matrix_entropy": float(matrix_entropy(hidden)),
        "residual_norm": float(residual_norm(hidden)),
        "massive_ratio": float(massive_ratio(hidden)),
    }


def test_accumulator_means_and_memory() -> None:
    g = torch.Generator().manual_seed(4)
    acc = StagesAccumulator()
    assert acc.wants_attention
    late, early = Site("block", 0, 1, 5), Site("prelude", 0, 0, 0)
    h1, a1 = torch.randn(2, T, 16, generator=g), random_causal(2, 4, gen=g)
    h2, a2 = torch.randn(1, T, 16, generator=g), random_causal(1, 4, gen=g)
    a2[..., 0] = 0.0
    a2[..., :, 0] = 1.0  # second call: all-sink heads
    a2 = a2 / a2.sum(-1, keepdim=True)
    acc.observe(late, h1, a1)
    acc.observe(late, h2, a2)
    acc.observe(early, h2, None)
    prof = acc.result()
    assert prof.sites == [early, late]
    assert prof.counts.tolist() == [1, 3]
    prompts = [per_prompt(h1[0], a1[0]), per_prompt(h1[1], a1[1]), per_prompt(h2[0], a2[0])]
    # each metric sums over the T×16 entries of a prompt in float32, batched or one by one
    tol = rounding_tolerance(torch.float32, 1.0, T * 16)
    for m in METRICS:
        expected = np.mean([p[m] for p in prompts])
        assert prof.metrics[m][1] == pytest.approx(expected, rel=tol, abs=tol), m
    assert np.isnan(prof.metrics["sink_rate"][0])
    expected = prompts[2]["residual_norm"]
    assert prof.metrics["residual_norm"][0] == pytest.approx(expected, rel=tol)
    stored = [t for sums in acc._sums.values() for t in sums.values()]
    assert stored and all(t.numel() == 1 for t in stored)
    assert not any(isinstance(v, torch.Tensor) for v in vars(acc).values())


# ------------------------------------------------------------------------- profile views


def looped_profile(passes: int = 3, k: int = 4, shape: np.ndarray | None = None) -> StagesProfile:
    """(2, k⊗passes, 1) profile; block metric follows ``shape`` in every pass, fading slowly."""
    shape = np.linspace(0.0, 1.0, k) ** 2 if shape is None else shape
    sites, vals, depth = [], [], 0
    for lay in range(2):
        sites.append(Site("prelude", lay, 0, depth))
        vals.append(0.1 * lay)
        depth += 1
    for r in range(passes):
        for lay in range(k):
            sites.append(Site("block", lay, r, depth))
            vals.append(shape[lay] * (1.0 - 0.1 * r))
            depth += 1
    sites.append(Site("coda", 0, 0, depth))
    vals.append(0.5)
    order = np.random.default_rng(0).permutation(len(sites))  # constructor must re-sort
    arr = np.array(vals)
    return StagesProfile(
        sites=[sites[i] for i in order],
        metrics={m: arr[order] for m in METRICS},
        counts=np.ones(len(sites), dtype=np.int64)[order],
    )


def feedforward_profile(n: int = 12) -> StagesProfile:
    sites = [Site("block", i, 0, i) for i in range(n)]
    vals = np.linspace(0.0, 1.0, n) ** 2
    return StagesProfile(sites=sites, metrics={m: vals for m in METRICS})


def test_profile_views_and_json_roundtrip() -> None:
    prof = looped_profile()
    assert [s.depth for s in prof.sites] == list(range(len(prof.sites)))
    x, y = prof.by_depth("mixing")
    assert x.tolist() == list(range(15)) and y[0] == 0.0
    rec = prof.by_recurrence("mixing")
    assert sorted(rec) == [0, 1, 2]
    assert rec[1][0].tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert rec[1][1].tolist() == pytest.approx(0.9 * np.linspace(0, 1, 4) ** 2)
    lay = prof.by_layer("mixing")
    assert sorted(lay) == [0, 1, 2, 3]
    assert lay[3][0].tolist() == [0, 1, 2] and lay[3][1].tolist() == pytest.approx([1, 0.9, 0.8])
    assert prof.stage_curve("mixing", "coda")[1].tolist() == [0.5]
    prof.metrics["sink_rate"][0] = np.nan
    back = StagesProfile.from_dict(json.loads(json.dumps(prof.to_dict(), allow_nan=False)))
    assert back.sites == prof.sites and back.counts.tolist() == prof.counts.tolist()
    for m in METRICS:
        np.testing.assert_array_equal(back.metrics[m], prof.metrics[m])


# ------------------------------------------------------------------------- alignment


def test_alignment_identical_reversed_and_scaled() -> None:
    pass_curve = np.array([0.0, 2.0, 1.0, 3.0])
    grid = np.linspace(0, 1, 12)
    reference = np.interp(grid, np.linspace(0, 1, 4), pass_curve)  # the pass, resampled
    same = align_pass_to_reference(5.0 * pass_curve + 2.0, reference)  # z-scoring: scale-free
    assert same.pearson == pytest.approx(1.0)
    assert same.spearman > 0.99  # exact ties in the interpolant are broken by rounding
    # the z-scores agree up to a mean and a std over 12 points (values below 2); DTW adds at
    # most 2·12 aligned differences of them
    dtw = 2 * 12 * rounding_tolerance(np.float64, 2.0, 12)
    assert same.dtw_distance == pytest.approx(0.0, abs=dtw)
    assert same.grid.shape == same.pass_curve.shape == same.reference_curve.shape == (12,)
    rev = align_pass_to_reference(pass_curve[::-1], reference)
    assert rev.pearson < 0 and rev.dtw_distance > 0
    flat = align_pass_to_reference(np.ones(4), reference)
    assert np.isnan(flat.pearson)


def test_dtw_forgives_time_warp() -> None:
    x = np.linspace(0.0, 1.0, 50)

    def bump(t: np.ndarray) -> np.ndarray:
        return np.exp(-(((t - 0.3) / 0.08) ** 2))

    reference, warped = bump(x), bump(x**1.6)  # same bump, later in depth
    al = align_pass_to_reference(warped, reference)
    assert al.lockstep_distance > 0.5
    assert al.dtw_distance < 0.25 * al.lockstep_distance
    assert dtw_distance(np.array([1.0, 2.0]), np.array([1.0, 1.0, 2.0, 2.0])) == 0.0


def test_stage_alignment_profiles() -> None:
    scores = stage_alignment(looped_profile(), feedforward_profile(), metrics=["mixing"])
    assert list(scores) == ["mixing"] and len(scores["mixing"]) == 3
    assert all(a.pearson > 0.99 for a in scores["mixing"])
    rev = looped_profile(shape=np.linspace(1.0, 0.0, 4) ** 2)
    assert all(a.pearson < 0 for a in stage_alignment(rev, feedforward_profile())["mixing"])
    summary = alignment_summary(scores)
    assert summary["mixing"]["pearson"] > 0.99


# ------------------------------------------------------------------------- figures


def test_figures_smoke() -> None:
    prof, ref = looped_profile(), feedforward_profile()
    g = torch.Generator().manual_seed(5)
    nc = neuron_classes(torch.randn(8, 20, generator=g), torch.randn(50, 8, generator=g))
    figs = [
        plot_stages_views(prof, reference=ref),
        plot_stages_views(prof, metrics=["mixing", "sink_rate"]),
        plot_alignment(stage_alignment(prof, ref)),
        plot_neuron_classes({"block.0": nc, "block.1": nc}, reference={"0": nc}),
        plot_intervention_comparison(prof, looped_profile(passes=2), metrics=["mixing"]),
    ]
    assert len(figs[0].axes) == 3 * len(METRICS)
    for fig in figs:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=40)
        assert buf.tell() > 1000
