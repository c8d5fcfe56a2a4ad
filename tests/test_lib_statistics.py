"""Statistics against straightforward loops (as the notebook) and scipy.stats."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from weight_geometry.multiplicity import benjamini_hochberg
from weight_geometry.statistics import (
    BOTTLENECK_ROBUST_Z,
    NO_BOTTLENECK,
    bottleneck_profile,
    bottleneck_table,
    bottleneck_trends,
    choose_bottleneck,
    correlate,
    overlap_summary,
    similarity_by_distance,
)


def _random_sims(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.uniform(0, 1, (n, n))
    s = (a + a.T) / 2
    np.fill_diagonal(s, 1.0)
    return s


@pytest.mark.parametrize("n", [4, 7, 12, 36])
def test_overlap_summary_matches_loops(n):
    s = _random_sims(n, n)
    off = [s[i, j] for i in range(n) for j in range(n) if i != j]
    adj = [s[i, i + 1] for i in range(n - 1)]
    far = [s[i, j] for i in range(n) for j in range(n) if abs(i - j) > n // 3]
    got = overlap_summary(s)
    assert got["off_diagonal_mean"] == pytest.approx(np.mean(off))
    assert got["off_diagonal_std"] == pytest.approx(np.std(off))
    assert got["off_diagonal_min"] == pytest.approx(min(off))
    assert got["off_diagonal_max"] == pytest.approx(max(off))
    assert got["adjacent_mean"] == pytest.approx(np.mean(adj))
    assert got["adjacent_std"] == pytest.approx(np.std(adj))
    assert got["distant_mean"] == pytest.approx(np.mean(far))
    assert got["distant_std"] == pytest.approx(np.std(far))
    assert got["adjacent_minus_distant"] == pytest.approx(np.mean(adj) - np.mean(far))
    assert got["distant_threshold"] == n // 3


def test_overlap_summary_two_layers():
    s = np.array([[1.0, 0.3], [0.3, 1.0]])    # L=2: threshold 0, the one pair is distant
    got = overlap_summary(s)
    assert got["adjacent_mean"] == pytest.approx(0.3)
    assert got["distant_mean"] == pytest.approx(0.3)
    assert got["adjacent_minus_distant"] == pytest.approx(0.0)
    assert got["adjacent_std"] == pytest.approx(0.0)


@pytest.mark.parametrize("n", [3, 8, 25, 36, 50])
def test_similarity_by_distance_matches_loops(n):
    s = _random_sims(n, 7 * n)
    got = similarity_by_distance(s)
    wanted = sorted({d for d in (1, 2, 3, 5, 10, 15, 20, n // 2) if 0 < d < n})
    assert list(got["distance"]) == wanted
    for row in got.itertuples():
        vals = [s[i, i + row.distance] for i in range(n - row.distance)]
        assert row.n_pairs == len(vals)
        assert row.mean == pytest.approx(np.mean(vals))
        assert row.std == pytest.approx(np.std(vals))


def test_correlate_undefined_below_three_points():
    for x, y in [([], []), ([1.0], [2.0]), ([1.0, 2.0], [3.0, 1.0])]:
        c = correlate(x, y)
        assert c.n == len(x)
        assert not c.defined
        assert all(math.isnan(v) for v in (c.pearson, c.spearman, c.spearman_p, c.pearson_p)), \
            "a correlation of < 3 points must be NaN, never +-1"
        assert "undefined" in c.text()
    # Non-finite pairs are dropped before counting.
    c = correlate([1.0, 2.0, np.nan, 4.0], [1.0, 2.0, 3.0, np.inf])
    assert c.n == 2 and not c.defined


@pytest.mark.parametrize("n", [3, 4, 10, 30])
def test_correlate_matches_scipy(n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n)
    y = 0.5 * x + rng.standard_normal(n)
    y[0] = y[1]                                       # ties for Spearman, in y and in x
    x[-1] = x[-2]
    c = correlate(x, y, n_perm=500)
    assert c.n == n and c.defined
    assert c.pearson == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert c.spearman == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert 0 < c.spearman_p <= 1
    assert 0 < c.pearson_p <= 1
    assert f"p={c.pearson_p:.3g}" in c.text() and f"p={c.spearman_p:.3g}" in c.text()


def test_pearson_and_spearman_share_permutations():
    # Data that are their own ranks: Pearson = Spearman, and with the same permutations the
    # two p-values must be identical, not merely close.
    rng = np.random.default_rng(5)
    x = rng.permutation(15).astype(float) + 1
    y = rng.permutation(15).astype(float) + 1
    c = correlate(x, y, n_perm=999, seed=2)
    assert c.pearson == pytest.approx(c.spearman, abs=1e-12)
    assert c.pearson_p == c.spearman_p


def test_pearson_exact_permutation_p_small_n():
    # n=4, exactly linear: |r| = 1 only for the identity and the reversal (2 of 24).
    c = correlate([0, 1, 2, 3], [1.0, 3.0, 5.0, 7.0], n_perm=20000, seed=3)
    assert c.pearson == pytest.approx(1.0)
    assert c.pearson_p == pytest.approx(2 / 24, abs=0.01)


def test_pearson_p_matches_scipy_permutation_test():
    rng = np.random.default_rng(8)
    x = rng.standard_normal(10)
    y = 0.6 * x + rng.standard_normal(10)
    n = 20000
    ref = stats.pearsonr(x, y, method=stats.PermutationMethod(
        n_resamples=n, rng=np.random.default_rng(1))).pvalue
    got = correlate(x, y, n_perm=n).pearson_p
    # Two independent Monte Carlo estimates of the same p: 4 standard errors of their difference.
    assert abs(got - ref) < 4 * np.sqrt(2 * ref * (1 - ref) / n), (got, ref)


def test_spearman_p_matches_exact_permutation_test():
    """Spearman's p permutes ranks, not values: with an outlier the two differ (exact p 0.536
    from ranks, about 0.60 from raw values); scipy enumerates all 8! pairings."""
    x = np.arange(8.0)
    y = np.array([0.1, 0.3, 0.2, 0.5, 0.4, 0.7, 0.6, -5.0])
    exact = stats.permutation_test(
        (x,), lambda a: stats.spearmanr(a, y).statistic, permutation_type="pairings",
        n_resamples=np.inf).pvalue
    n = 20000
    got = correlate(x, y, n_perm=n, seed=4).spearman_p
    assert abs(got - exact) < 4 * np.sqrt(exact * (1 - exact) / n), (got, exact)


def test_permutation_p_roughly_uniform_under_null():
    rng = np.random.default_rng(12345)
    n_perm = 300
    cs = [correlate(rng.standard_normal(12), rng.standard_normal(12), n_perm=n_perm, seed=seed)
          for seed in range(200)]
    grid = np.linspace(0.05, 0.95, 19)
    # Kolmogorov-Smirnov 1% critical value for 200 samples, plus the 1/(1+n_perm) granularity.
    ks_limit = 1.63 / np.sqrt(len(cs)) + 1 / (1 + n_perm)
    for name in ("spearman_p", "pearson_p"):
        ps = np.array([getattr(c, name) for c in cs])
        frac = np.mean(ps < 0.05)
        assert 0.01 <= frac <= 0.10, f"{name}: fraction p<0.05 under the null: {frac}"
        assert 0.35 < np.mean(ps) < 0.65, f"{name}: null p-values should average about 1/2"
        ecdf = (ps[:, None] <= grid).mean(axis=0)
        assert np.max(np.abs(ecdf - grid)) < ks_limit, f"{name}: not uniform"


def test_permutation_p_small_for_strong_trend():
    x = np.arange(20.0)
    y = np.sqrt(x) + 0.01 * np.random.default_rng(0).standard_normal(20)
    c = correlate(x, y, n_perm=2000)
    assert c.spearman > 0.95
    assert c.spearman_p < 0.005
    assert c.spearman_p >= 1 / 2001, "p-value can't be below 1/(1+n_perm)"
    # Nearly linear in x: no permutation comes close, p is at its floor 1/(1+n_perm).
    assert c.pearson > 0.95
    assert c.pearson_p == pytest.approx(1 / 2001)


def test_bottleneck_trends_split_and_undefined_post():
    sims = np.array([0.1, 0.2, 0.3, 0.5, 1.0, 0.4, 0.3])
    pre, post = bottleneck_trends(sims, 4)
    assert pre.n == 4 and post.n == 2
    assert pre.pearson == pytest.approx(stats.pearsonr(np.arange(4), sims[:4])[0])
    assert math.isnan(post.pearson), "2 points after the bottleneck: undefined, not -1"


def test_bottleneck_trends_after_the_bottleneck():
    """The post trend runs over the layers after the bottleneck, in layer order (a falling
    similarity is a negative r: the verdict's convergence needs it)."""
    sims = np.array([0.1, 0.3, 0.2, 0.5, 1.0, 0.6, 0.2, 0.4, 0.1, 0.15])
    _, post = bottleneck_trends(sims, 4)
    after = sims[5:]
    assert post.n == 5
    assert post.pearson == pytest.approx(stats.pearsonr(np.arange(5), after)[0], abs=1e-12)
    assert post.spearman == pytest.approx(stats.spearmanr(np.arange(5), after)[0], abs=1e-12)
    assert post.pearson < -0.3


def _ranks_table(values: dict[tuple[int, str], tuple[str, float]]) -> pd.DataFrame:
    return pd.DataFrame([(layer, wt, shape, r) for (layer, wt), (shape, r) in values.items()],
                        columns=["layer_idx", "weight_type", "shape", "eff_rank"])


def _profile_ranks(profile) -> pd.DataFrame:
    """Ranks whose W_Q (64x32) and W_K (16x32) both have normalized rank ``profile[l]``."""
    return _ranks_table({(layer, wt): (shape, value * side) for layer, value in enumerate(profile)
                         for wt, shape, side in (("W_Q", "64x32", 32), ("W_K", "16x32", 16))})


def test_choose_bottleneck_normalizes_and_ignores_other_weights():
    # Normalized by min(rows, cols): W_Q 64x32 -> /32, W_K 16x32 -> /16. Layers 0 and 6 (first
    # and last) are left out; layers 1-5 are the profile.
    values = {(layer, wt): (shape, r) for layer in range(7)
              for wt, shape, r in (("W_Q", "64x32", 30.0), ("W_K", "16x32", 15.0))}
    values[(0, "W_Q")] = ("64x32", 1.0)                          # the first layer: left out
    values[(3, "W_Q")], values[(3, "W_K")] = ("64x32", 16.0), ("16x32", 14.0)   # .6875
    values[(2, "W_Q")], values[(2, "W_K")] = ("64x32", 28.0), ("16x32", 4.0)    # .5625
    values[(4, "W_gate")] = ("48x32", 1.0)                       # other types: ignored
    t = _ranks_table(values)
    # Raw (unnormalized) means would pick layer 3 ((16+14)/2=15 < (28+4)/2=16): the
    # normalization flips the answer.
    choice = choose_bottleneck(t)
    assert choice.layer == 2 and choice.n_profile == 5
    np.testing.assert_allclose(bottleneck_profile(t).to_numpy(),
                               [(1 / 32 + 15 / 16) / 2, .9375, .5625, .6875, .9375, .9375, .9375])


def test_choose_bottleneck_stands_out_only_beyond_the_robust_threshold():
    """A layer whose profile sits far below the interior's median (in MADs) is a bottleneck; a
    smooth profile or a dip within the spread is not; too few layers give none."""
    rng = np.random.default_rng(0)
    base = 0.8 + 0.01 * rng.standard_normal(20)
    dip = base.copy()
    dip[12] = 0.5
    choice = choose_bottleneck(_profile_ranks(dip))
    assert choice.layer == 12 and choice.stands_out
    values = dip[1:-1]
    mad = 1.4826 * np.median(np.abs(values - np.median(values)))
    assert choice.robust_z == pytest.approx((np.median(values) - 0.5) / mad)
    assert "stands out" in choice.text() and "layer 12" in choice.text()
    smooth = choose_bottleneck(_profile_ranks(base))
    assert not smooth.stands_out and smooth.robust_z < BOTTLENECK_ROBUST_Z
    assert "does not stand out" in smooth.text()
    edge = base.copy()
    edge[0] = edge[-1] = 0.1                                     # first and last: not candidates
    assert not choose_bottleneck(_profile_ranks(edge)).stands_out
    few = choose_bottleneck(_profile_ranks(dip[:6]))
    assert not few.stands_out and "at least 5 layers" in few.text()


def _nulls(sims: dict[int, np.ndarray]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    return {h: (np.full_like(s, 0.1 + h), np.full_like(s, 0.01 * (h + 1))) for h, s in sims.items()}


def test_bottleneck_table():
    sims = {3: _random_sims(7, 1), 0: _random_sims(7, 2)}
    profile = np.full(7, 0.8) + np.linspace(0, 0.01, 7)
    profile[3] = 0.3
    auto = bottleneck_table(sims, _profile_ranks(profile), "auto", _nulls(sims))
    assert list(auto.columns[:5]) == ["head", "layer", "similarity", "conditional_mean",
                                      "conditional_std"]
    assert list(auto["head"]) == [0] * 7 + [3] * 7, "heads in sorted order"
    assert set(auto["bottleneck_layer"]) == {3}
    assert auto["bottleneck_choice"].str.startswith("auto: layer 3").all()
    for head in (0, 3):
        part = auto[auto["head"] == head]
        np.testing.assert_allclose(part["similarity"], sims[head][3])
        np.testing.assert_allclose(part["conditional_mean"], 0.1 + head)
        np.testing.assert_allclose(part["conditional_std"], 0.01 * (head + 1))
        assert list(part["layer"]) == list(range(7))
    # The test against the conditional null: z, the gamma tail (scipy), BH over every head and
    # layer but the bottleneck's own.
    tested = auto[auto["layer"] != 3]
    np.testing.assert_allclose(tested["z_conditional"], (tested["similarity"]
                                                         - tested["conditional_mean"])
                               / tested["conditional_std"])
    shape = (tested["conditional_mean"] / tested["conditional_std"]) ** 2
    np.testing.assert_allclose(tested["p_conditional"], stats.gamma.sf(
        tested["similarity"], shape, scale=tested["conditional_mean"] / shape), atol=2e-3)
    assert auto.loc[auto["layer"] == 3, ["z_conditional", "p_conditional"]].isna().all().all()
    np.testing.assert_allclose(auto["p_conditional_adjusted"],
                               benjamini_hochberg(auto["p_conditional"]))
    fixed = bottleneck_table(sims, _profile_ranks(profile), 1, _nulls(sims))
    assert set(fixed["bottleneck_layer"]) == {1}
    assert (fixed["bottleneck_choice"] == "set in the config").all()
    np.testing.assert_allclose(fixed[fixed["head"] == 0]["similarity"], sims[0][1])
    flat = bottleneck_table(sims, _profile_ranks(np.full(7, 0.8)), "auto", _nulls(sims))
    assert set(flat["bottleneck_layer"]) == {NO_BOTTLENECK}
    assert flat[["similarity", "conditional_mean", "conditional_std"]].isna().all().all()
    assert "does not stand out" in flat["bottleneck_choice"].iloc[0]
