"""composition: Q-, K- and V-composition scores from the stored factors, against the d x d maps
formed in float64; the isotropic null's exact E[score^2] = 1/d; a planted circuit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import naive_kernel

from weight_geometry.composition import (
    TOP_COLUMNS,
    TYPES,
    Circuits,
    composing_pairs,
    composition_scores,
    isotropic_null,
    layer_rows,
    pair_tests,
    random_circuits,
    top_pairs,
)
from weight_geometry.kernels import circuit_svd, ov_circuits
from weight_geometry.multiplicity import FDR_Q


def random_weights(rng, n_layers, d, h, n_kv, d_head):
    """Per layer Gaussian W_Q (h d_head, d), W_K, W_V (n_kv d_head, d), W_O (d, h d_head)."""
    return [{"W_Q": rng.standard_normal((h * d_head, d)),
             "W_K": rng.standard_normal((n_kv * d_head, d)),
             "W_V": rng.standard_normal((n_kv * d_head, d)),
             "W_O": rng.standard_normal((d, h * d_head))} for _ in range(n_layers)]


def factors(weights, h, n_kv, d_head) -> Circuits:
    """What the extraction stores, by its routines (float32 vectors)."""
    parts = {k: [] for k in ("query", "key", "qk_sigma", "write", "read", "ov_sigma")}
    for w in weights:
        qk = circuit_svd(torch.from_numpy(w["W_Q"]), torch.from_numpy(w["W_K"]), h, n_kv, d_head)
        ov = ov_circuits(torch.from_numpy(w["W_O"]), torch.from_numpy(w["W_V"]), h, n_kv, d_head)
        for k, x in (("query", qk.left), ("key", qk.right), ("qk_sigma", qk.singular_values),
                     ("write", ov.left), ("read", ov.right), ("ov_sigma", ov.singular_values)):
            parts[k].append(x.numpy())
    return Circuits(**{k: np.stack(x) for k, x in parts.items()}, n_kv_heads=n_kv)


def naive_scores(weights, h, d_head) -> np.ndarray:
    """(3, L h, L h) by the definitions, every d x d map formed in float64."""
    qk = [naive_kernel(w["W_Q"], w["W_K"], i, d_head) for w in weights for i in range(h)]
    ov = [naive_kernel(w["W_O"].T, w["W_V"], i, d_head) for w in weights for i in range(h)]
    n = len(qk)
    out = np.full((3, n, n), np.nan)
    fro = np.linalg.norm
    for later in range(n):
        for earlier in range(n):
            if earlier // h >= later // h:
                continue
            e = ov[earlier]
            for t, m in enumerate((qk[later].T, qk[later], ov[later])):
                out[t, later, earlier] = fro(m @ e) / (fro(m) * fro(e))
    return out


@pytest.mark.parametrize("d,h,n_kv,d_head", [(24, 4, 2, 3), (20, 3, 3, 4), (18, 4, 1, 5)])
def test_scores_match_formed_maps(d, h, n_kv, d_head):
    """Every ordered pair, all three types, GQA/MHA/MQA: the factored scores equal the norms of
    the formed products (float32 factors: 1e-5); NaN exactly where the column is not earlier."""
    rng = np.random.default_rng(d + h + n_kv + d_head)
    weights = random_weights(rng, 3, d, h, n_kv, d_head)
    ours = composition_scores(factors(weights, h, n_kv, d_head))
    ref = naive_scores(weights, h, d_head)
    assert ours.shape == (3, 3 * h, 3 * h)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    assert np.isnan(ref).sum() == 3 * (3 * h) * (3 * h + h) // 2     # layer e >= l
    np.testing.assert_allclose(ours, ref, rtol=1e-5, equal_nan=True)


def test_orientation_is_the_papers():
    """K-composition reads through W_K: an earlier head writing only into the row space of a
    later head's W_K and orthogonally to its W_Q and W_V composes by K only (and Q, V by
    theirs)."""
    d, d_head = 12, 2
    basis = np.eye(d)
    rng = np.random.default_rng(0)
    # Later head reads queries from e_0, e_1, keys from e_2, e_3, values from e_4, e_5.
    later = {"W_Q": basis[0:2], "W_K": basis[2:4], "W_V": basis[4:6],
             "W_O": rng.standard_normal((d, d_head))}
    for t, rows in ((0, basis[0:2]), (1, basis[2:4]), (2, basis[4:6])):
        earlier = {"W_Q": rng.standard_normal((d_head, d)), "W_K": rng.standard_normal((d_head, d)),
                   "W_V": rng.standard_normal((d_head, d)), "W_O": rows.T.copy()}
        scores = composition_scores(factors([earlier, later], 1, 1, d_head))[:, 1, 0]
        assert scores[t] > 0.3 and np.delete(scores, t).max() < 1e-6, (TYPES[t], scores)


def test_isotropic_null_mean_square_is_one_over_d():
    """E[score^2] = 1/d for every type (module docstring), by Monte Carlo over independent
    random layers: within 4 standard errors."""
    d, d_head, n = 40, 4, 12
    rng = np.random.default_rng(5)
    squares = []
    for _ in range(8):
        s = composition_scores(random_circuits(2, n, d, d_head, rng))[:, n:, :n]
        squares.append(np.square(s).reshape(3, -1))
    squares = np.concatenate(squares, axis=1)
    se = squares.std(1) / np.sqrt(squares.shape[1] / n)     # pairs share heads: n per draw
    assert np.all(np.abs(squares.mean(1) - 1 / d) < 4 * se), (squares.mean(1), 1 / d, se)
    null = isotropic_null(d, d_head, n_heads=12)
    assert null.exact_mean_square == 1 / d and null.n_pairs == 144
    np.testing.assert_allclose(null.mean_square, 1 / d, rtol=0.15)
    np.testing.assert_allclose(null.mean, np.sqrt(1 / d), rtol=0.15)
    assert np.all(null.std > 0)


@pytest.mark.parametrize("plant", TYPES)
def test_planted_circuit_is_the_only_discovery(plant):
    """Layer 0 head 1 writes (W_O columns) exactly into the subspace that layer 2 head 2 reads
    by its W_Q, W_K or W_V: that pair's score of that type is the largest of all and survives
    BH; no other pair of any type does."""
    d, h, d_head = 64, 4, 4
    rng = np.random.default_rng(11)
    weights = random_weights(rng, 3, d, h, h, d_head)
    source = {"q": "W_Q", "k": "W_K", "v": "W_V"}[plant]
    rows = weights[2][source][2 * d_head:3 * d_head]                    # head 2 of layer 2
    weights[0]["W_O"][:, d_head:2 * d_head] = rows.T
    scores = composition_scores(factors(weights, h, h, d_head))
    null = isotropic_null(d, d_head)
    tests = pair_tests(scores, null)
    t = TYPES.index(plant)
    later, earlier = 2 * h + 2, 0 * h + 1
    assert np.nanargmax(scores[t]) == later * 3 * h + earlier
    significant = np.argwhere(tests["p_adjusted"] <= FDR_Q)
    assert significant.tolist() == [[t, later, earlier]]
    top = [dict(zip(TOP_COLUMNS, row, strict=True)) for row in top_pairs(scores, tests, null, h)]
    first = [row for row in top if row["type"] == plant][0]
    assert (first["layer"], first["head"], first["earlier_layer"], first["earlier_head"]) == (
        2, 2, 0, 1)
    assert first["significant"] and sum(row["significant"] for row in top) == 1
    assert len(top) == 3 * 20
    layers = layer_rows(scores, tests, h)
    assert len(layers) == 3 * 3
    assert [(r[0], r[1], r[2]) for r in layers if r[7]] == [(plant, 2, 0)]


def test_a_pair_composes_only_beyond_both_nulls():
    """composing_pairs: significant after BH against the isotropic and the conditional null;
    either alone is not enough (a random-init model's few conditional discoveries sit at
    isotropic chance), and without the conditional tests the isotropic decides."""
    iso = np.array([[0.01, 0.01, 0.5, 0.5]])
    cond = np.array([[0.01, 0.5, 0.01, 0.5]])
    both = composing_pairs({"p_adjusted": iso, "conditional_p_adjusted": cond})
    assert both.tolist() == [[True, False, False, False]]
    assert composing_pairs({"p_adjusted": iso}).tolist() == [[True, True, False, False]]


def test_conditional_null_by_monte_carlo():
    """The row-space-conditional null: the later head's singular vectors rotated by a Haar
    orthogonal C inside their own row space (U -> C U, V -> C V, B -> C B; singular values
    kept). The squared scores' mean and std over 3000 rotations match the exact moments
    (3 standard errors; std within 8 %), which do not depend on the rotation; GQA bases
    give the moments of each head's own rows."""
    from weight_geometry.composition import composition

    d, d_head = 14, 4
    rng = np.random.default_rng(7)
    c = factors(random_weights(rng, 2, d, 2, 1, d_head), 2, 1, d_head)
    exact = composition(c)
    mhead = composition(Circuits(**{**vars(c), "n_kv_heads": 2}))     # each head its own basis
    np.testing.assert_allclose(mhead.conditional_mean, exact.conditional_mean, rtol=1e-5)
    np.testing.assert_allclose(mhead.conditional_std, exact.conditional_std, rtol=1e-5)
    draws = []
    for _ in range(3000):
        q, r = np.linalg.qr(rng.standard_normal((d_head, d_head)))
        rot = q * np.sign(np.diag(r))
        turned = {k: v.copy() for k, v in vars(c).items() if isinstance(v, np.ndarray)}
        for k in ("query", "key", "read"):
            turned[k][1] = np.einsum("ab,hbd->had", rot, c.__dict__[k][1])
        draws.append(np.square(composition_scores(Circuits(**turned))[:, 2:, :2]))
    draws = np.array(draws)
    mean, std = exact.conditional_mean[:, 2:, :2], exact.conditional_std[:, 2:, :2]
    assert np.all(np.abs(draws.mean(0) - mean) < 3 * std / np.sqrt(len(draws)) + 1e-12)
    np.testing.assert_allclose(draws.std(0), std, rtol=0.08)


@pytest.mark.parametrize("threads", [1, 3])
def test_any_number_of_layer_workers_gives_the_same_result(threads):
    """composition runs as many later layers at once as torch has threads (one thread each):
    scores and conditional moments do not depend on how many (GQA, 4 layers)."""
    from weight_geometry.composition import composition

    rng = np.random.default_rng(3)
    c = factors(random_weights(rng, 4, 24, 4, 2, 3), 4, 2, 3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        ref = composition(c)
        torch.set_num_threads(threads)
        ours = composition(c)
    finally:
        torch.set_num_threads(before)
    for name in ("scores", "conditional_mean", "conditional_std"):
        np.testing.assert_allclose(getattr(ours, name), getattr(ref, name), rtol=1e-6,
                                   equal_nan=True)
    assert np.isfinite(ref.scores).sum() == 3 * 6 * 16


def haar(rng, n, m):
    """``n`` Haar-random orthogonal ``m x m`` matrices (QR of Gaussians, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((n, m, m)))
    return q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]


def saddlepoint_weights(d, nu):
    """lambda_ab of composition.refined_conditional_p for spectra d, nu (unnormalized)."""
    m = len(d)
    return np.outer(d - d.mean(), nu - nu.mean()).ravel() / np.sqrt((m - 1) * (m + 2))


@pytest.mark.parametrize("m,spectrum", [(12, "exponential"), (16, "exponential"),
                                        (16, "uniform"), (16, "spike")])
def test_refined_tail_against_haar_monte_carlo(m, spectrum):
    """The saddlepoint tail of the Gaussian stand-in for the Haar null
    ``sum_ab (d_a - mean d)(nu_b - mean nu) R_ab^2`` (2e5 Haar draws): at the Monte Carlo
    quantiles of 1e-2, 1e-3, 1e-4 it is never lighter (>= 0.8x) and heavier by at most 1.6x
    at 1e-2 and 8x at 1e-4 at these small m (measured 1.0-1.4x, 1.7-4x, 3.8-6.1x; the
    Gaussian form is unbounded, the Haar one is not: conservative, less so as m grows)."""
    from weight_geometry.multiplicity import quadratic_form_p

    rng = np.random.default_rng(m)
    d, nu = {"exponential": lambda: (rng.exponential(size=m), rng.exponential(size=m)),
             "uniform": lambda: (rng.uniform(size=m), rng.uniform(size=m) ** 2),
             "spike": lambda: (np.r_[4.0, rng.uniform(size=m - 1)],
                               np.r_[3.0, rng.uniform(size=m - 1)])}[spectrum]()
    x = np.concatenate([np.einsum("a,nab,b->n", d - d.mean(), np.square(haar(rng, 50_000, m)),
                                  nu - nu.mean()) for _ in range(4)])
    lam = saddlepoint_weights(d, nu)
    np.testing.assert_allclose(x.var(), 2 * np.square(lam).sum(), rtol=0.02)
    for p, most in ((1e-2, 1.6), (1e-3, 3.0), (1e-4, 8.0)):
        ratio = quadratic_form_p(lam[None], [np.quantile(x, 1 - p)])[0] / p
        assert 0.8 <= ratio <= most, (p, ratio)


def imhof_p(lam, x):
    """P(sum lam g^2 > x) by Imhof's (1961) inversion integral (scipy quad)."""
    from scipy.integrate import quad

    def integrand(u):
        theta = 0.5 * np.arctan(lam * u).sum() - 0.5 * x * u
        rho = np.exp(0.25 * np.log1p(np.square(lam * u)).sum())
        return np.sin(theta) / (u * rho)

    value, _ = quad(integrand, 0, np.inf, limit=2000, epsabs=1e-12, epsrel=1e-10)
    return 0.5 + value / np.pi


def test_saddlepoint_against_imhof():
    """multiplicity.quadratic_form_p against Imhof's integral for indefinite Gaussian forms
    of the refinement's shape: within 5 % from 1e-2 to 1e-5; the normal tail near the mean;
    chi-square for equal weights."""
    from scipy.stats import chi2

    from weight_geometry.multiplicity import quadratic_form_p

    rng = np.random.default_rng(1)
    for m in (6, 10):
        lam = saddlepoint_weights(rng.exponential(size=m), rng.exponential(size=m))
        sd = np.sqrt(2 * np.square(lam).sum())
        for z in (2.5, 3.5, 4.5, 5.5):
            ref = imhof_p(lam, z * sd)
            assert 1e-6 < ref < 2e-2
            np.testing.assert_allclose(quadratic_form_p(lam[None], [z * sd])[0], ref, rtol=0.05)
    np.testing.assert_allclose(quadratic_form_p(np.ones((2, 5)), [12.0, 30.0]),
                               chi2.sf([12.0, 30.0], 5), rtol=0.02)
    assert abs(quadratic_form_p(lam[None], [0.01 * sd])[0] - 0.496) < 1e-3


def test_refined_conditional_p_is_calibrated_on_random_circuits():
    """Random weights are the conditional null (a Gaussian W_K is invariant under rotations
    within its row space): the fraction of pairs with refined conditional p below alpha is
    at most ~1.3 alpha (plus Poisson slack), and the refinement replaces exactly the pairs
    whose gamma p is below composition.REFINE_BELOW."""
    from weight_geometry.composition import REFINE_BELOW, composition, conditional_tests

    rng = np.random.default_rng(4)
    c = random_circuits(5, 16, 24, 6, rng)
    comp = composition(c)
    gamma, refined = conditional_tests(comp), conditional_tests(comp, c)
    p = refined["conditional_p"]
    finite = np.isfinite(p)
    changed = finite & (p != gamma["conditional_p"])
    assert np.array_equal(changed, finite & (gamma["conditional_p"] < REFINE_BELOW))
    n = finite.sum()
    for alpha in (1e-1, 1e-2, 1e-3):
        count = np.count_nonzero(p[finite] < alpha)
        assert count <= 1.3 * alpha * n + 3 * np.sqrt(alpha * n), (alpha, count, alpha * n)
    assert np.count_nonzero(p[finite] < 1e-1) >= 0.7 * 1e-1 * n


@pytest.mark.parametrize("plant", TYPES)
def test_planted_circuit_survives_the_refined_conditional_null(plant):
    """Layer 0 head 1 writes 10x into the top two of the eight directions of layer 2 head 2's
    W_Q, W_K or W_V row space (its largest singular directions): against the refined
    conditional null that pair is the strongest of its type and the only discovery of any
    type (at d_head = 4 no pair can pass: the Gaussian tail is conservative near the Haar
    null's bound)."""
    from weight_geometry.composition import composition, conditional_tests

    d, h, d_head = 64, 4, 8
    rng = np.random.default_rng(11)
    weights = random_weights(rng, 3, d, h, h, d_head)
    c = factors(weights, h, h, d_head)
    side = {"q": c.query, "k": c.key, "v": c.read}[plant]
    top = side[2, 2, :2].astype(np.float64)                             # its top directions
    weights[0]["W_O"][:, d_head:d_head + 2] = 10 * np.sqrt(d) * top.T
    c = factors(weights, h, h, d_head)
    tests = conditional_tests(composition(c), c)
    t = TYPES.index(plant)
    later, earlier = 2 * h + 2, 0 * h + 1
    assert np.nanargmin(tests["conditional_p"][t]) == later * 3 * h + earlier
    significant = np.argwhere(tests["conditional_p_adjusted"] <= FDR_Q)
    assert significant.tolist() == [[t, later, earlier]]
