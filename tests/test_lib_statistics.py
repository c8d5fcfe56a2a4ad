"""Statistics against straightforward loops (as the notebook) and scipy.stats."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from weight_geometry.statistics import (
    bottleneck_table,
    bottleneck_trends,
    choose_bottleneck,
    correlate,
    overlap_summary,
    phase_boundaries,
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


@pytest.mark.parametrize("n", [5, 14, 36])
def test_phase_boundaries_match_notebook_loop(n):
    s = _random_sims(n, 100 + n)
    adj = [s[i, i + 1] for i in range(n - 1)]
    diffs = [adj[t + 1] - adj[t] for t in range(len(adj) - 1)]
    order = [t for t in sorted(range(len(diffs)), key=lambda t: diffs[t])[:10] if diffs[t] < 0]
    got = phase_boundaries(s)
    assert len(got) == min(10, sum(step < 0 for step in diffs))
    assert list(got["rank"]) == list(range(len(got)))
    assert list(got["boundary"]) == [f"{t + 1}→{t + 2}" for t in order]
    np.testing.assert_allclose(got["adjacent_similarity"], [adj[t + 1] for t in order])
    np.testing.assert_allclose(got["change"], [diffs[t] for t in order])
    assert all(np.diff(got["change"]) >= 0), "most negative first"


def test_phase_boundaries_ties_in_layer_order():
    """Tied steps (20 drops of 0.5 here, more than a non-stable sort keeps in order) come in
    layer order, as the notebook's sorted() gives them."""
    n = 42
    s = np.eye(n)
    for i in range(n - 1):
        s[i, i + 1] = s[i + 1, i] = 0.9 if i % 2 == 0 else 0.4
    got = phase_boundaries(s)
    assert list(got["boundary"]) == [f"{t + 1}→{t + 2}" for t in range(0, 20, 2)]
    np.testing.assert_allclose(got["change"], -0.5)


def test_phase_boundaries_are_drops_only():
    """A rise between adjacent pairs is no boundary: with 3 drops among 8 steps, 3 rows."""
    adj = [0.5, 0.6, 0.4, 0.7, 0.8, 0.3, 0.9, 0.95, 0.85, 0.99]
    s = np.eye(len(adj) + 1)
    for i, value in enumerate(adj):
        s[i, i + 1] = s[i + 1, i] = value
    got = phase_boundaries(s)
    assert list(got["boundary"]) == ["5→6", "2→3", "8→9"]
    assert (got["change"] < 0).all()


def test_phase_boundary_at_planted_drop():
    n = 12
    s = np.full((n, n), 0.2)
    s[:6, :6] = 0.8                                   # block 0..5, then a different phase
    s[6:, 6:] = 0.7
    np.fill_diagonal(s, 1.0)
    got = phase_boundaries(s, n=1)
    # adjacent: pairs (4,5)=0.8, (5,6)=0.2: the drop is at step 4 -> between layers 5 and 6.
    assert got["boundary"].iloc[0] == "5→6"
    assert got["change"].iloc[0] == pytest.approx(-0.6)


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


def test_choose_bottleneck_hand_made_table():
    # Normalized by min(rows, cols): W_Q 64x32 -> /32, W_K 16x32 -> /16.
    t = _ranks_table({
        (0, "W_Q"): ("64x32", 30.0), (0, "W_K"): ("16x32", 15.0),   # mean(.9375,.9375)
        (1, "W_Q"): ("64x32", 16.0), (1, "W_K"): ("16x32", 14.0),   # mean(.5, .875)=.6875
        (2, "W_Q"): ("64x32", 28.0), (2, "W_K"): ("16x32", 4.0),    # mean(.875,.25)=.5625
        # Other weight types must be ignored even when their rank is tiny.
        (0, "W_gate"): ("48x32", 1.0), (1, "W_V"): ("16x32", 1.0),
    })
    # Raw (unnormalized) means would pick layer 1 ((16+14)/2=15 < (28+4)/2=16): the
    # normalization flips the answer.
    assert choose_bottleneck(t) == 2
    # By min(rows, cols), not max: W_K 8x32 (/8 or /32) against W_Q 64x32 (/32 or /64).
    t = _ranks_table({
        (0, "W_Q"): ("64x32", 28.0), (0, "W_K"): ("8x32", 1.0),     # /min .5;    /max .234
        (1, "W_Q"): ("64x32", 4.0), (1, "W_K"): ("8x32", 7.5),      # /min .53125; /max .148
    })
    assert choose_bottleneck(t) == 0


def test_bottleneck_table():
    rng = np.random.default_rng(1)
    sims = {3: _random_sims(5, 1), 0: _random_sims(5, 2)}
    ranks = _ranks_table({(layer, wt): ("64x32" if wt == "W_Q" else "16x32",
                                        5.0 if layer == 3 else 10.0 + rng.uniform())
                          for layer in range(5) for wt in ("W_Q", "W_K")})
    auto = bottleneck_table(sims, ranks, "auto")
    assert list(auto.columns[:3]) == ["head", "layer", "similarity"]
    assert list(auto["head"]) == [0] * 5 + [3] * 5, "heads in sorted order"
    assert set(auto["bottleneck_layer"]) == {3}
    assert auto["bottleneck_choice"].str.startswith("auto").all()
    for head in (0, 3):
        part = auto[auto["head"] == head]
        np.testing.assert_allclose(part["similarity"], sims[head][3])
        assert list(part["layer"]) == list(range(5))
    fixed = bottleneck_table(sims, ranks, 1)
    assert set(fixed["bottleneck_layer"]) == {1}
    assert (fixed["bottleneck_choice"] == "set in the config").all()
    np.testing.assert_allclose(fixed[fixed["head"] == 0]["similarity"], sims[0][1])
