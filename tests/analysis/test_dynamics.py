"""Dynamics analyses on systems whose answer is known analytically."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure
from tolerances import forward_tolerance, magnitude, rounding_tolerance

from loopscope.analysis import attention_dynamics as attn_dyn
from loopscope.analysis import dynamics as dyn
from loopscope.analysis import figures_dynamics as figs
from loopscope.analysis import limiting as lim


def rotation(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])


def affine_trace(a: np.ndarray, b: np.ndarray, x0: np.ndarray, r_count: int) -> np.ndarray:
    """States (R, 1, T, D) of x → A x + b iterated per token (x0: (T, D))."""
    out = [x0]
    for _ in range(r_count - 1):
        out.append(out[-1] @ a.T + b)
    return np.stack(out)[:, None]


def embed(points_2d: np.ndarray, d: int, seed: int = 0) -> np.ndarray:
    """Put (..., 2) points into a random 2-D subspace of R^d (orthonormal basis)."""
    basis, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, 2)))
    return points_2d @ basis.T


# ----------------------------------------------------------------------------- affine map


@pytest.fixture
def contractive() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    a = 0.8 * rotation(0.5)
    b = np.array([1.0, -2.0])
    x0 = np.array([[5.0, 5.0], [-3.0, 1.0], [0.0, 10.0]])
    return a, b, x0, np.linalg.solve(np.eye(2) - a, b)


def test_fixed_point_of_contractive_affine_map(contractive):
    a, b, x0, x_star = contractive
    states = affine_trace(a, b, x0, 80)
    ref = np.broadcast_to(x_star, (1, 3, 2))
    fp = dyn.fixed_point_distances(states, ref)
    # ‖X_r − X*‖ = 0.8^r ‖X_0 − X*‖ exactly, because A is 0.8 times an orthogonal matrix.
    expected = 0.8 ** np.arange(80) * np.linalg.norm(x0 - x_star)
    # 80 iterations of a 2-term affine map in float64; the distances shrink, their error not
    tol = forward_tolerance(np.float64, magnitude(states), 80, 2)
    np.testing.assert_allclose(fp.distance[:, 0], expected, atol=tol, rtol=0)
    relative = expected / np.linalg.norm(ref)
    np.testing.assert_allclose(fp.relative[:, 0], relative, atol=tol / np.linalg.norm(ref), rtol=0)
    assert fp.cosine[-1, 0] == pytest.approx(1.0)
    assert not fp.divergent.any()
    r = dyn.convergence_recurrence(fp.relative[:, 0], 1e-3)
    assert r is not None and fp.relative[r, 0] <= 1e-3 < fp.relative[r - 1, 0]
    assert dyn.convergence_recurrence(fp.relative[:, 0], 1e-30) is None
    assert dyn.convergence_recurrence(np.array([0.1, 0.0, np.nan, 0.0]), 0.01) == 3


def test_successive_differences_shrink_geometrically(contractive):
    a, b, x0, _ = contractive
    states = affine_trace(a, b, x0, 30)
    sd = dyn.successive_differences(states)
    assert sd.norm.shape == (29, 1)
    # X_{r+1} − X_r = A (X_r − X_{r−1}): the step norm shrinks by exactly 0.8.
    # each step norm errs by at most the 30 iterations' rounding; a ratio of two, relative to
    # the smallest step, twice that
    rtol = 2 * forward_tolerance(np.float64, magnitude(states), 30, 2) / sd.norm.min()
    np.testing.assert_allclose(sd.norm[1:, 0] / sd.norm[:-1, 0], 0.8, rtol=rtol)
    cur = states[1:, 0].reshape(29, -1)
    np.testing.assert_allclose(sd.relative[:, 0], sd.norm[:, 0] / np.linalg.norm(cur, axis=1))
    # not a rounding tolerance: after 30 steps the states still turn, cos = 1 − 4e-7
    assert sd.cosine[-1, 0] == pytest.approx(1.0, abs=1e-5)
    assert np.all(sd.cosine <= 1.0)


def test_default_reference_is_last_state(contractive):
    a, b, x0, _ = contractive
    states = affine_trace(a, b, x0, 10)
    fp = dyn.fixed_point_distances(states)
    assert fp.distance[-1, 0] == 0.0 and fp.relative[-1, 0] == 0.0


# ----------------------------------------------------------------------------- degeneracy


def test_degenerate_vs_distinct_fixed_points():
    rng = np.random.default_rng(1)
    point = rng.normal(size=(4, 16))
    collapsed = np.stack([point, point * 2.0, point + 1e-6])  # same direction per token
    deg = dyn.degeneracy(collapsed)
    # not a rounding tolerance: the 1e-6 shift itself turns the direction by ~1e-6/‖point‖
    assert deg.min_cosine == pytest.approx(1.0, abs=1e-6)
    assert deg.is_degenerate() and deg.pairwise.shape == (3, 3)
    distinct = np.stack([point, rng.normal(size=(4, 16)), -point])
    nd = dyn.degeneracy(distinct)
    assert nd.min_cosine == pytest.approx(-1.0)
    assert not nd.is_degenerate()
    assert nd.is_degenerate(threshold=-2.0)
    np.testing.assert_allclose(nd.pairwise, nd.pairwise.T)
    assert np.isnan(dyn.degeneracy(point[None]).min_cosine)


def test_layer_recurrence_cosine_of_a_two_cycle():
    e1, e2 = np.eye(2)
    # Two layers alternating between orthogonal points: a genuine cycle of distinct points.
    states = np.stack([np.stack([e1[None], e2[None]]) for _ in range(3)])  # (3, 2, 1, 2)
    cos = dyn.layer_recurrence_cosine(states)
    assert cos.shape == (6, 6)
    layer = np.arange(6) % 2
    np.testing.assert_allclose(cos, (layer[:, None] == layer[None, :]).astype(float))


def test_per_token_cosine_weighs_tokens_equally():
    x = np.array([[1.0, 0.0], [0.0, 1.0]])  # two tokens
    y = np.array([[1.0, 0.0], [0.0, -100.0]])  # token 1 flipped and large
    cos = dyn.layer_recurrence_cosine(np.stack([x, y])[None])
    assert cos[0, 1] == pytest.approx(0.0)  # mean of +1 and −1
    zeros = dyn.layer_recurrence_cosine(np.zeros((1, 2, 1, 3)))
    np.testing.assert_allclose(zeros, 1.0)  # cos(0, 0) = 1 by convention


# ----------------------------------------------------------------------------- attention


def attention_trace() -> tuple[np.ndarray, np.ndarray]:
    """(R=2, L=2, H=2, T=2, T=2) causal attention maps with known differences."""
    eye = np.array([[1.0, 0.0], [0.0, 1.0]])
    uni = np.array([[1.0, 0.0], [0.5, 0.5]])
    sink = np.array([[1.0, 0.0], [1.0, 0.0]])
    attn = np.empty((2, 2, 2, 2, 2))
    attn[0, 0] = [eye, eye]
    attn[0, 1] = [uni, sink]
    attn[1, 0] = [uni, eye]
    attn[1, 1] = [uni, sink]
    return attn, np.stack([eye, uni, sink])


def test_attention_fixed_point_distances_known_values():
    attn, _ = attention_trace()
    d = attn_dyn.attention_fixed_point_distances(attn)
    # ‖eye − uni‖_F = √(0.25 + 0.25) = √0.5; head 1 of layer 0 unchanged; layer 1 unchanged.
    np.testing.assert_allclose(d, [[np.sqrt(0.5) / 2, 0.0], [0.0, 0.0]])


def test_attention_pair_distances_known_values():
    attn, _ = attention_trace()
    d = attn_dyn.attention_pair_distances(attn)
    s, t = np.sqrt(0.5), np.sqrt(2.0)  # ‖eye−uni‖ = ‖uni−sink‖ = √0.5, ‖eye−sink‖ = √2
    # pairs (r,l) r-major: 0=(0,0) [eye,eye], 1=(0,1) [uni,sink], 2=(1,0) [uni,eye], 3=(1,1)
    expected = np.array(
        [
            [0, (s + t) / 2, s / 2, (s + t) / 2],
            [(s + t) / 2, 0, t / 2, 0],
            [s / 2, t / 2, 0, t / 2],
            [(s + t) / 2, 0, t / 2, 0],
        ]
    )
    tol = rounding_tolerance(np.float64, magnitude(expected), 8)  # 4-entry norms, 2-head means
    np.testing.assert_allclose(d, expected, atol=tol, rtol=0)
    curve = attn_dyn.attention_fixed_point_distances(attn)[:, 0]
    assert attn_dyn.attention_stabilised_from(curve, 1e-9) == 1
    assert attn_dyn.attention_stabilised_from(np.array([1.0, 0.5]), 0.1) is None


def test_attention_nan_rows_are_dropped():
    attn, _ = attention_trace()
    bad = attn.copy()
    bad[1, 0, 1, 1] = np.nan  # query row 1 broken somewhere
    d = attn_dyn.attention_fixed_point_distances(bad)
    assert np.isfinite(d).all()
    assert np.isfinite(attn_dyn.attention_pair_distances(bad)).all()


def test_bound_check_and_kappa():
    check = attn_dyn.attention_bound_check(
        attn_step_norms=[0.5, 0.2, 0.1],
        state_step_norms=[1.0, 0.5, 0.2],
        kappa=2.0,
        bound_B=4.0,
        d_head=16,
    )
    assert check.lipschitz == pytest.approx(2.0)  # ½·2·4·2/√16
    np.testing.assert_allclose(check.bound, [2.0, 1.0, 0.4])
    assert check.holds and check.tightness == pytest.approx(0.25)
    bad = attn_dyn.attention_bound_check([0.5, 3.0, np.nan], [1.0, 1.0, 1.0], 1.0, 1.0, 1)
    assert not bad.holds and bad.tightness == pytest.approx(3.0) and bad.n_checked == 2

    rng = np.random.default_rng(0)
    d, h, dh = 12, 3, 4
    w_q, w_k = rng.normal(size=(d, h * dh)), rng.normal(size=(d, h * dh))
    kappa = attn_dyn.kappa_from_weights(w_q, w_k, h)
    for i in range(h):
        cols = slice(i * dh, (i + 1) * dh)
        assert kappa[i] == pytest.approx(np.linalg.norm(w_q[:, cols] @ w_k[:, cols].T, 2))
    per_head = w_q.reshape(d, h, dh).transpose(1, 0, 2)
    np.testing.assert_allclose(attn_dyn.kappa_from_weights(per_head, w_k, h), kappa)
    gqa = attn_dyn.kappa_from_weights(w_q, w_k[:, :dh], h, n_kv_heads=1)
    assert gqa[2] == pytest.approx(np.linalg.norm(w_q[:, 2 * dh :] @ w_k[:, :dh].T, 2))


# ----------------------------------------------------------------------------- PCA


def test_pca_of_a_circle_in_a_plane():
    r_count, n_layers, d = 6, 4, 10
    angles = 2 * np.pi * np.arange(n_layers) / n_layers
    circle = np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (L, 2), one cycle per pass
    states = np.broadcast_to(embed(circle, d) + 3.0, (r_count, n_layers, d)).copy()
    traj = dyn.pca_trajectory(states)
    assert traj.points.shape == (r_count, n_layers, 2)
    assert traj.explained_variance_ratio.sum() == pytest.approx(1.0)
    svd = rounding_tolerance(np.float64, 1.0, d * d)  # an SVD: d rotations of d terms each
    np.testing.assert_allclose(traj.components @ traj.components.T, np.eye(2), atol=svd)
    # Every pass traces the same closed loop: projected points sit on a unit circle.
    radii = np.linalg.norm(traj.points, axis=-1)
    tol = rounding_tolerance(np.float64, magnitude(states), d * d)  # centred, then projected
    np.testing.assert_allclose(radii, 1.0, atol=tol, rtol=0)
    np.testing.assert_allclose(traj.points[0], traj.points[-1])
    for comp in traj.components:
        assert comp[np.argmax(np.abs(comp))] > 0
    again = dyn.pca_trajectory(states)
    np.testing.assert_array_equal(again.points, traj.points)


def test_pca_survives_nan_and_rank_deficiency():
    states = np.zeros((3, 2, 5))
    states[1, 1, 0] = np.nan
    traj = dyn.pca_trajectory(states, n_components=3)
    assert np.isnan(traj.points[1, 1]).all()
    assert np.isfinite(traj.points[0]).all()
    np.testing.assert_array_equal(traj.explained_variance_ratio, 0.0)


# ----------------------------------------------------------------------------- limiting


def limit_tokens(r_count: int = 64, d: int = 8) -> np.ndarray:
    """(R, T=5, D): fixed point, orbit P=5, orbit P=2, slider, slow-rotation slider."""
    r = np.arange(r_count)
    fixed = embed(np.stack([1 + 0.5**r, 0.3 * 0.5**r], 1), d, seed=1)
    orbit5 = embed(np.stack([np.cos(2 * np.pi * r / 5), np.sin(2 * np.pi * r / 5)], 1), d, 2)
    orbit2 = embed(np.stack([(-1.0) ** r, 0.1 * np.ones(r_count)], 1), d, seed=3)
    # x_r = x0 + r·v passing the origin during the second half: the direction sweeps steadily.
    drift = embed(np.stack([-48.0 + r, 2.0 * np.ones(r_count)], 1), d, seed=4)
    slow = embed(np.stack([np.cos(0.03 * r), np.sin(0.03 * r)], 1), d, seed=5)
    return np.stack([fixed, orbit5, orbit2, drift, slow], axis=1)


def test_classify_fixed_point_orbit_slider():
    res = lim.classify_limiting_behaviour(limit_tokens())
    assert res.labels.tolist() == ["fixed_point", "orbit", "orbit", "slider", "slider"]
    assert res.periods.tolist() == [0, 5, 2, 0, 0]
    assert res.rates["orbit"] == pytest.approx(0.4) and res.rates["slider"] == pytest.approx(0.4)
    assert sum(res.rates.values()) == pytest.approx(1.0)
    assert res.cosine_to_last.shape == (64, 5)


def test_classify_rotation_periods():
    r = np.arange(48)
    for period in (2, 3, 4, 7, 12):
        pts = np.stack([np.cos(2 * np.pi * r / period), np.sin(2 * np.pi * r / period)], 1)
        res = lim.classify_limiting_behaviour(embed(pts, 6)[:, None, :])
        assert res.labels[0] == "orbit" and res.periods[0] == period


def test_nan_token_is_divergent_and_nothing_crashes():
    states = limit_tokens()
    states[40, 1, 3] = np.nan
    states[10, 3, 0] = np.inf
    res = lim.classify_limiting_behaviour(states)
    assert res.labels.tolist() == ["fixed_point", "divergent", "orbit", "divergent", "slider"]
    assert res.rates["divergent"] == pytest.approx(0.4)
    trace = states.transpose(0, 1, 2)[:, None]  # (R, 1, T, D)
    sd = dyn.successive_differences(trace)
    fp = dyn.fixed_point_distances(trace)
    assert sd.divergent.tolist() == [False, True, False, True, False]
    assert fp.divergent.tolist() == sd.divergent.tolist()
    for arr in (sd.norm, sd.relative, sd.cosine, fp.distance, fp.relative, fp.cosine):
        assert np.isfinite(arr).all()
    assert np.isfinite(dyn.layer_recurrence_cosine(trace)).all()
    assert np.isfinite(dyn.degeneracy(trace[-1]).pairwise).all()
    all_bad = np.full((3, 2, 2, 4), np.nan)
    assert np.isnan(dyn.successive_differences(all_bad).cosine).all()
    assert (lim.classify_limiting_behaviour(all_bad[:, 0]).labels == "divergent").all()


def test_short_runs_are_unknown_and_per_example_rates():
    short = lim.classify_limiting_behaviour(np.ones((2, 3, 4)))
    assert (short.labels == "unknown").all()
    a = lim.classify_limiting_behaviour(limit_tokens())  # 1 fixed, 4 not
    b = lim.classify_limiting_behaviour(limit_tokens()[:, :1])  # 1 fixed
    agg = lim.per_example_rates([a, b])
    assert agg.n_tokens == 6 and agg.n_examples == 2
    assert agg.token_rates["fixed_point"] == pytest.approx(2 / 6)
    assert agg.example_rates["fixed_point"] == 1.0
    assert agg.example_rates["orbit"] == 0.5
    assert agg.non_fixed_point_token_rate == pytest.approx(4 / 6)
    assert agg.non_fixed_point_example_rate == 0.5
    empty = lim.per_example_rates([])
    assert empty.n_tokens == 0 and empty.non_fixed_point_example_rate == 0.0


def test_extrapolation_summary():
    curve = 0.5 ** np.arange(1, 17)  # successive differences for r = 1..16
    out = dyn.extrapolation_summary(curve, train_recurrences=4, first_recurrence=1)
    assert out["n_before"] == 3 and out["n_after"] == 13
    assert out["at_train"] == pytest.approx(0.125)
    assert out["decay_rate_after"] == pytest.approx(0.5)
    assert out["keeps_shrinking"] is True
    assert out["ratio_after_before"] is not None and out["ratio_after_before"] < 0.1
    growing = dyn.extrapolation_summary(np.r_[0.5 ** np.arange(4), 2.0 ** np.arange(4)], 4)
    assert growing["keeps_shrinking"] is False
    assert dyn.extrapolation_summary([np.nan, 1.0], 5)["mean_after"] is None


# ----------------------------------------------------------------------------- figures


def test_figures_smoke(contractive, tmp_path):
    a, b, x0, _ = contractive
    states = np.concatenate([affine_trace(a, b, x0, 12)] * 2, axis=1)  # (12, 2, 3, 2)
    attn, _ = attention_trace()
    sd = dyn.successive_differences(states)
    fp = dyn.fixed_point_distances(states)
    att_fp = attn_dyn.attention_fixed_point_distances(np.concatenate([attn] * 6))
    res = lim.classify_limiting_behaviour(limit_tokens())
    check = attn_dyn.attention_bound_check([0.5, 0.2], [1.0, 0.5], 2.0, 4.0, 16)
    traj = dyn.pca_trajectory(states[:, :, 0])
    cases = [
        (figs.plot_successive_differences(sd, train_recurrences=4), 2),
        (figs.plot_fixed_point_distances(fp, train_recurrences=4), 2),
        (figs.plot_fixed_point_distances(fp, att_fp, train_recurrences=4), 3),
        (figs.plot_cosine_heatmap(dyn.layer_recurrence_cosine(states), 2), 2),
        (figs.plot_attention_heatmap(attn_dyn.attention_pair_distances(attn), 2), 2),
        (
            figs.plot_attention_heatmap(
                attn_dyn.attention_pair_distances(attn), 2, group_by="recurrence"
            ),
            2,
        ),
        (figs.plot_pca_trajectory(traj), 1),
        (figs.plot_limiting_behaviour(res), 2),
        (figs.plot_bound_check(check, [1.0, 0.5]), 2),
    ]
    for fig, n_axes in cases:
        assert isinstance(fig, Figure)
        assert len(fig.axes) == n_axes
        assert all(ax.get_title() or ax.get_ylabel() for ax in fig.axes)
    cases[0][0].savefig(tmp_path / "sd.png")
    assert (tmp_path / "sd.png").stat().st_size > 0
