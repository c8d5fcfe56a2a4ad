"""Multiplicity control and exact nulls against scipy.stats, brute-force enumeration and loops."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from weight_geometry.multiplicity import (
    FDR_Q,
    MIN_DETRENDED_POINTS,
    benjamini_hochberg,
    count_family,
    detrended_correlation,
    gamma_p,
    pairing_null_exact,
    pairing_permutation_p,
    step_drop_test,
    two_sided_p,
    upper_p,
)
from weight_geometry.similarity import null_std


def _symmetric_sims(n_layers: int, n_heads: int, seed: int) -> np.ndarray:
    """Random ``S (L, h, L, h)`` with ``S[a, i, b, j] = S[b, j, a, i]`` and unit self-similarity."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(0, 1, (n_layers * n_heads,) * 2)
    s = (a + a.T) / 2
    np.fill_diagonal(s, 1.0)
    return s.reshape(n_layers, n_heads, n_layers, n_heads)


def _all_orderings(s: np.ndarray, a: int, b: int) -> np.ndarray:
    """``mean_i S[a, i, b, pi(i)]`` for every permutation ``pi``, by a plain loop."""
    h = s.shape[1]
    return np.array([sum(s[a, i, b, pi[i]] for i in range(h)) / h
                     for pi in itertools.permutations(range(h))])


# --- Benjamini-Hochberg ---------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_bh_matches_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    p = rng.uniform(0, 1, 60) ** 3
    p[:10] = p[10]                       # ties
    p[20:23] = 1.0
    p[30] = 0.0
    assert benjamini_hochberg(p) == pytest.approx(stats.false_discovery_control(p, method="bh"))


def test_bh_nan_passed_through_and_not_counted():
    rng = np.random.default_rng(7)
    p = rng.uniform(0, 0.2, (4, 5))
    p[0, 1] = p[3, 3] = np.nan
    got = benjamini_hochberg(p)
    assert got.shape == p.shape
    assert np.isnan(got[0, 1]) and np.isnan(got[3, 3])
    ok = ~np.isnan(p)
    assert got[ok] == pytest.approx(stats.false_discovery_control(p[ok], method="bh"))
    assert np.isnan(benjamini_hochberg([np.nan, np.nan])).all()
    assert benjamini_hochberg([]).shape == (0,)


def test_bh_monotone_capped_and_brute_force():
    rng = np.random.default_rng(3)
    p = rng.uniform(0, 1, 40)
    got = benjamini_hochberg(p)
    m = len(p)
    # Definition: q_i = min over tests j with p_j >= p_i of p_j m / rank(p_j).
    ranks = stats.rankdata(p, method="max")
    want = [min(1.0, min(p[j] * m / ranks[j] for j in range(m) if p[j] >= p[i]))
            for i in range(m)]
    assert got == pytest.approx(want)
    order = np.argsort(p)
    assert np.all(np.diff(got[order]) >= 0) and got.max() <= 1.0
    assert FDR_Q == 0.05
    with pytest.raises(ValueError):
        benjamini_hochberg([0.5, 1.5])


# --- exact pairing null -----------------------------------------------------------------------

@pytest.mark.parametrize("h", [1, 2, 3, 4, 5, 6])
def test_pairing_null_exact_matches_enumeration(h):
    s = _symmetric_sims(3, h, seed=h)
    mean, std = pairing_null_exact(s)
    assert mean.shape == std.shape == (3, 3)
    for a in range(3):
        for b in range(3):
            t = _all_orderings(s, a, b)
            assert mean[a, b] == pytest.approx(t.mean(), abs=1e-12)
            assert std[a, b] == pytest.approx(t.std(), abs=1e-12)    # population std of h!


def test_pairing_null_exact_shapes_and_symmetry():
    s = _symmetric_sims(4, 5, seed=11)
    mean, std = pairing_null_exact(s)
    assert mean.shape == std.shape == (4, 4)
    assert mean == pytest.approx(mean.T) and std == pytest.approx(std.T)
    assert mean == pytest.approx(s.mean(axis=(1, 3)))
    with pytest.raises(ValueError):
        pairing_null_exact(s[:, :4])


# --- permutation p over head orderings -------------------------------------------------------

@pytest.mark.parametrize("h", [1, 2, 3, 4, 5])
def test_pairing_p_exact_matches_enumeration(h):
    s = _symmetric_sims(3, h, seed=20 + h)
    p = pairing_permutation_p(s, chunk=7)
    for a in range(3):
        for b in range(3):
            t = _all_orderings(s, a, b)
            same = sum(s[a, i, b, i] for i in range(h)) / h
            assert p[a, b] == pytest.approx(np.mean(t >= same - 1e-12))


@pytest.mark.parametrize("h", [5, 6])
def test_pairing_p_exact_matches_scipy_permutation_test(h):
    s = _symmetric_sims(2, h, seed=30 + h)
    p = pairing_permutation_p(s)
    c = s[0, :, 1, :]
    heads = np.arange(h)
    res = stats.permutation_test((heads,), lambda pi: c[heads, pi].mean(),
                                 permutation_type="pairings", alternative="greater",
                                 n_resamples=np.inf)
    assert p[0, 1] == pytest.approx(res.pvalue)


def test_pairing_p_monte_carlo_matches_documented_draws():
    s = _symmetric_sims(3, 5, seed=41)
    n_perm, seed = 300, 5
    p = pairing_permutation_p(s, n_perm=n_perm, seed=seed, max_exact=1, chunk=64)
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(5) for _ in range(n_perm)]
    for a in range(3):
        for b in range(a, 3):
            same = np.mean([s[a, i, b, i] for i in range(5)])
            hits = sum(np.mean([s[a, i, b, pi[i]] for i in range(5)]) >= same - 1e-12
                       for pi in perms)
            assert p[a, b] == pytest.approx((1 + hits) / (1 + n_perm))
            assert p[b, a] == p[a, b]
    # Chunking does not change the draws.
    assert np.array_equal(p, pairing_permutation_p(s, n_perm=n_perm, seed=seed, max_exact=1,
                                                   chunk=n_perm))


def test_pairing_p_monte_carlo_close_to_exact():
    s = _symmetric_sims(2, 6, seed=50)
    exact = pairing_permutation_p(s)[0, 1]
    mc = pairing_permutation_p(s, n_perm=4000, seed=1, max_exact=1)[0, 1]
    assert abs(mc - exact) < 4 * math.sqrt(exact * (1 - exact) / 4000) + 1e-3


@pytest.mark.parametrize("h", [4, 9])         # exact (4! = 24) and Monte Carlo (9! > 5040)
def test_pairing_p_planted_pair_is_small(h):
    rng = np.random.default_rng(h)
    s = _symmetric_sims(4, h, seed=60 + h) * 0.2
    s[0, :, 2, :] = rng.uniform(0, 0.2, (h, h))
    s[0, np.arange(h), 2, np.arange(h)] = 0.9
    s[2, :, 0, :] = s[0, :, 2, :].T
    n_perm = 500
    p = pairing_permutation_p(s, n_perm=n_perm)
    smallest = 1 / math.factorial(h) if math.factorial(h) <= 5040 else 1 / (1 + n_perm)
    assert p[0, 2] == p[2, 0] == pytest.approx(smallest)
    off = ~np.eye(4, dtype=bool)
    off[0, 2] = off[2, 0] = False
    assert np.all(p[off] > smallest)


@pytest.mark.parametrize(("h", "n_layers", "max_exact"), [(5, 30, 5040), (6, 20, 1)])
def test_pairing_p_uniform_under_null(h, n_layers, max_exact):
    """Independent similarities: P(p <= 0.05) is 0.05 (exactly for h = 5, exact enumeration)."""
    s = _symmetric_sims(n_layers, h, seed=70 + h)
    p = pairing_permutation_p(s, n_perm=1000, max_exact=max_exact)
    upper = p[np.triu_indices(n_layers, k=1)]
    frac = np.mean(upper <= 0.05)
    se = math.sqrt(0.05 * 0.95 / len(upper))
    assert abs(frac - 0.05) < 4 * se
    assert 0.35 < upper.mean() < 0.65


# --- step drops ---------------------------------------------------------------------------------

def test_step_drop_matches_scipy():
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 1, 12)
    stds = rng.uniform(0.01, 0.1, 12)
    z, p = step_drop_test(values, stds)
    want_z = [(values[t + 1] - values[t]) / math.sqrt(stds[t] ** 2 + stds[t + 1] ** 2)
              for t in range(11)]
    assert z == pytest.approx(want_z)
    assert p == pytest.approx(stats.norm.cdf(want_z), rel=1e-12, abs=1e-300)
    _, tail = step_drop_test([1.0, 0.0], [0.01, 0.01])
    assert tail[0] == pytest.approx(stats.norm.cdf(-1 / math.sqrt(2e-4)), rel=1e-9)
    with pytest.raises(ValueError):
        step_drop_test([1.0, 2.0], [0.1])


def test_step_drop_monte_carlo_size_and_power():
    rng = np.random.default_rng(1)
    stds = np.array([0.02, 0.05, 0.01, 0.03])
    draws = 0.3 + rng.normal(0, 1, (4000, 4)) * stds          # null: equal means
    p = np.array([step_drop_test(v, stds)[1] for v in draws[:2000]])
    assert np.abs((p < 0.05).mean(axis=0) - 0.05).max() < 0.02
    assert np.abs(p.mean(axis=0) - 0.5).max() < 0.03
    planted = np.array([0.5, 0.5, 0.2, 0.2])
    _, p_planted = step_drop_test(planted, stds)
    assert p_planted[1] < 1e-6 and p_planted[0] == pytest.approx(0.5)
    assert p_planted[2] == pytest.approx(0.5)


# --- detrended correlation --------------------------------------------------------------------

def _brute_force_detrended(x, y):
    t = np.arange(len(x))
    u = x - np.polyval(np.polyfit(t, x, 1), t)
    v = y - np.polyval(np.polyfit(t, y, 1), t)
    r = stats.pearsonr(u, v)[0]
    shifted = [stats.pearsonr(u, np.roll(v, s))[0] for s in range(len(x))]
    return r, sum(abs(rs) >= abs(r) - 1e-12 for rs in shifted) / len(x)


@pytest.mark.parametrize("n", [4, 7, 24])
def test_detrended_matches_brute_force(n):
    rng = np.random.default_rng(n)
    t = np.arange(n)
    x = 0.1 * t + rng.normal(size=n)
    y = 0.5 * x + np.sin(t) + rng.normal(size=n)
    got = detrended_correlation(x, y)
    r, p = _brute_force_detrended(x, y)
    assert got.n == n and got.r == pytest.approx(r) and got.p == pytest.approx(p)
    assert got.defined and "circular-shift" in got.method and "r=" in got.text()


def test_detrended_positions_and_nan_pairs():
    rng = np.random.default_rng(2)
    n = 15
    x, y = rng.normal(size=n), rng.normal(size=n)
    pos = np.arange(n) * 3.0 + 5                     # an affine map of 0..n-1: same residuals
    assert detrended_correlation(x, y, pos).r == pytest.approx(detrended_correlation(x, y).r)
    x2, y2 = x.copy(), y.copy()
    x2[4] = np.nan
    got = detrended_correlation(x2, y2, pos)
    keep = np.arange(n) != 4
    lx = stats.linregress(pos[keep], x[keep])
    ly = stats.linregress(pos[keep], y[keep])
    u = x[keep] - lx.intercept - lx.slope * pos[keep]
    v = y[keep] - ly.intercept - ly.slope * pos[keep]
    assert got.n == n - 1 and got.r == pytest.approx(stats.pearsonr(u, v)[0])


def test_detrended_shared_trend_is_not_significant():
    n, runs = 30, 200
    t = np.arange(n)
    raw, ps, rs = [], [], []
    for seed in range(runs):
        rng = np.random.default_rng(seed)
        x = t + rng.normal(0, 2, n)
        y = 2 * t + rng.normal(0, 2, n)
        raw.append(stats.pearsonr(x, y)[0])
        res = detrended_correlation(x, y)
        ps.append(res.p)
        rs.append(res.r)
    assert min(raw) > 0.9                                   # raw Pearson: the trend
    assert abs(np.mean(rs)) < 0.05
    assert np.mean(np.array(ps) <= 0.05) < 0.05 + 4 * math.sqrt(0.05 * 0.95 / runs)
    assert np.median(ps) > 0.3


def test_detrended_shared_nonlinear_component_is_significant():
    n = 40
    rng = np.random.default_rng(9)
    t = np.arange(n)
    common = rng.normal(0, 1, n)                             # layer-to-layer jitter both share
    x = 0.5 * t + common + 0.3 * rng.normal(size=n)
    y = -0.2 * t + common + 0.3 * rng.normal(size=n)
    res = detrended_correlation(x, y)
    assert res.r > 0.8 and res.p == pytest.approx(1 / n)


def test_detrended_undefined():
    nan = float("nan")
    for n in range(MIN_DETRENDED_POINTS):
        res = detrended_correlation(np.arange(n, dtype=float), np.ones(n) * np.arange(n) ** 2)
        assert res.n == n and math.isnan(res.r) and math.isnan(res.p) and not res.defined
        assert "undefined" in res.text()
    res = detrended_correlation([1.0, nan, 2.0, 3.0, 5.0], [0.0, 1.0, 2.0, 1.0, 3.0])
    assert res.n == 4 and res.defined
    line = detrended_correlation(np.arange(6.0) * 2 + 1, np.random.default_rng(0).normal(size=6))
    assert math.isnan(line.r) and not line.defined


def test_upper_and_two_sided_p_are_normal_tails():
    z = np.array([-3.0, -0.5, 0.0, 1.2, 4.0, np.nan])
    np.testing.assert_allclose(upper_p(z), stats.norm.sf(z), rtol=1e-12)
    np.testing.assert_allclose(two_sided_p(z), 2 * stats.norm.sf(np.abs(z)), rtol=1e-12)


def test_gamma_p_is_calibrated_for_skewed_similarity_nulls():
    """Similarities of Haar-random k-subspaces with small k/d are right-skewed: the normal tail
    gives too many p < 0.01, the moment-matched gamma about the nominal share (and its tail
    equals scipy's gamma survival function to Wilson-Hilferty's precision)."""
    rng = np.random.default_rng(0)
    k, d, draws = 2, 40, 40_000
    v1 = np.linalg.qr(rng.standard_normal((draws, d, k)))[0]
    v2 = np.linalg.qr(rng.standard_normal((draws, d, k)))[0]
    sims = np.square(np.swapaxes(v1, 1, 2) @ v2).sum((1, 2)) / k
    mean, std = k / d, null_std(k, d)
    p_gamma = gamma_p(sims, mean, std)
    p_normal = upper_p((sims - mean) / std)
    assert abs((p_gamma < 0.01).mean() - 0.01) < 0.004
    assert (p_normal < 0.01).mean() > 0.02                    # the normal tail misleads
    shape = (mean / std) ** 2
    x = np.array([0.01, 0.05, 0.1, 0.2])
    np.testing.assert_allclose(gamma_p(x, mean, std), stats.gamma.sf(x, shape, scale=mean / shape),
                               atol=2e-3)
    two = gamma_p(x, mean, std, two_sided=True)
    np.testing.assert_allclose(two, 2 * np.minimum(stats.gamma.sf(x, shape, scale=mean / shape),
                                                   stats.gamma.cdf(x, shape, scale=mean / shape)),
                               atol=4e-3)
    assert np.isnan(gamma_p(0.1, mean, 0.0))


def test_tested_counts_significant_tests_by_side():
    """count_family(): tests with a finite adjusted p; significant ones split by the sign of z; the
    ratio of means over the tested values."""
    values = np.array([2.0, 1.0, 0.5, 3.0, np.nan])
    nulls = np.array([1.0, 1.0, 1.0, 1.0, 1.0])
    z = np.array([5.0, 0.1, -4.0, 2.0, np.nan])
    adjusted = np.array([0.001, 0.9, 0.01, 0.2, np.nan])
    t = count_family(values, nulls, z, adjusted)
    assert (t.n_tests, t.n_above, t.n_below) == (4, 1, 1)
    assert t.mean_ratio == pytest.approx(6.5 / 4)
    assert t.count("pairs") == "1 of 4 pairs significantly above it, 1 below (BH q = 0.05)"


def _block_orderings_by_hand(n_heads: int, group: int) -> list[tuple[int, ...]]:
    """Orderings that keep blocks of ``group`` heads together, by filtering all ``h!``."""
    return [pi for pi in itertools.permutations(range(n_heads))
            if all(len({pi[i] // group for i in range(p * group, (p + 1) * group)}) == 1
                   for p in range(n_heads // group))]


@pytest.mark.parametrize(("h", "group"), [(4, 2), (6, 2), (6, 3)])
def test_pairing_null_and_p_that_keep_kv_heads_together_match_enumeration(h, group):
    """With KV heads of ``group`` heads, the orderings permute blocks as wholes and heads
    within them: the exact moments and the exact p equal those over that set enumerated by
    hand (a filter of all h! orderings), which differs from the full set."""
    s = _symmetric_sims(3, h, seed=50 + h + group)
    orderings = _block_orderings_by_hand(h, group)
    assert len(orderings) == math.factorial(h // group) * math.factorial(group) ** (h // group)
    mean, std = pairing_null_exact(s, group)
    p = pairing_permutation_p(s, group=group)
    full_std = pairing_null_exact(s)[1]
    for a in range(3):
        for b in range(3):
            t = np.array([np.mean([s[a, i, b, pi[i]] for i in range(h)]) for pi in orderings])
            same = np.mean([s[a, i, b, i] for i in range(h)])
            assert mean[a, b] == pytest.approx(t.mean(), abs=1e-12)
            assert std[a, b] == pytest.approx(t.std(), abs=1e-12)
            assert p[a, b] == pytest.approx(np.mean(t >= same - 1e-12))
    assert not np.allclose(std, full_std)


def test_pairing_p_keeping_kv_heads_monte_carlo_is_near_exact():
    """Monte Carlo draws of block-respecting orderings give the exact p to sampling error."""
    s = _symmetric_sims(3, 6, seed=77)
    exact = pairing_permutation_p(s, group=2)
    drawn = pairing_permutation_p(s, n_perm=4000, max_exact=1, group=2)
    np.testing.assert_allclose(drawn, exact, atol=0.03)
