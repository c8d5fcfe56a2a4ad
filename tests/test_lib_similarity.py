"""Grassmann similarity against scipy's principal angles; the isotropic null by Monte Carlo."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import haar_bases, orthonormal_rows
from scipy.linalg import subspace_angles

from weight_geometry.similarity import (
    cross_head_similarity,
    null_mean,
    null_std,
    similarity,
    similarity_matrix,
    squared_cosines,
)


def _reference(v1: np.ndarray, v2: np.ndarray) -> float:
    """Mean squared cosine of the principal angles between the row spaces."""
    return float(np.mean(np.cos(subspace_angles(v1.T, v2.T)) ** 2))


@pytest.mark.parametrize("noise", [None, 0.005])
def test_squared_cosines_float32_products_hold_principal_angles_to_1e7(noise):
    """At d = 2048, k = 128 (Qwen2.5-3B heads), for unrelated subspaces (sim ~ k/d) and
    nearly equal ones (sim ~ 0.95), the float32 products give the similarity within 1e-7 of
    scipy's principal angles (float64). Bases rounded to float16 miss that where the cosines
    are near 1 (their rounding errors then add up instead of cancelling)."""
    rng = np.random.default_rng(1)
    v1 = haar_bases(rng, (), 128, 2048)
    v2 = (haar_bases(rng, (), 128, 2048) if noise is None
          else orthonormal_rows(v1 + noise * rng.standard_normal(v1.shape)))
    squares = squared_cosines(v1, v2)
    assert squares.shape == (128, 128) and squares.dtype == np.float64
    reference = _reference(v1, v2)
    assert squares.sum() / 128 == pytest.approx(reference, abs=1e-7)
    if noise is not None:
        rounded = squared_cosines(v1.astype(np.float16), v2.astype(np.float16)).sum() / 128
        assert abs(rounded - reference) > 1e-7


@pytest.mark.parametrize("k,d", [(1, 5), (3, 10), (5, 30), (8, 8)])
def test_similarity_equals_principal_angles(k, d):
    rng = np.random.default_rng(k * 100 + d)
    for _ in range(5):
        v1, v2 = haar_bases(rng, (), k, d), haar_bases(rng, (), k, d)
        assert similarity(v1, v2) == pytest.approx(_reference(v1, v2), abs=1e-12)


def test_similarity_extremes():
    eye = np.eye(6)
    assert similarity(eye[:3], eye[:3]) == pytest.approx(1.0)
    assert similarity(eye[:3], eye[3:]) == pytest.approx(0.0)
    # Same subspace, different basis (rotated within): still 1.
    rng = np.random.default_rng(0)
    rot, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    assert similarity(eye[:3], rot @ eye[:3]) == pytest.approx(1.0)
    # One shared direction out of two: 1/2.
    assert similarity(eye[[0, 1]], eye[[0, 2]]) == pytest.approx(0.5)


def test_similarity_matrix_matches_pairwise_reference():
    rng = np.random.default_rng(11)
    n, k, d = 6, 4, 12
    bases = np.stack([haar_bases(rng, (), k, d) for _ in range(n)])
    # Make two layers nearly share a subspace so values are not all near k/d.
    bases[3] = np.linalg.qr((bases[2] + 0.1 * rng.standard_normal((k, d))).T)[0].T
    sims = similarity_matrix(bases.astype(np.float32))
    assert sims.shape == (n, n) and sims.dtype == np.float64   # float64 sums of the products
    np.testing.assert_array_equal(sims, sims.T)
    np.testing.assert_array_equal(np.diag(sims), np.ones(n))
    assert np.all(sims <= 1 + 1e-12)          # a sum of squares: only the upper bound can fail
    for i in range(n):
        for j in range(n):
            if i != j:
                ref = _reference(bases[i], bases[j])
                assert sims[i, j] == pytest.approx(ref, abs=1e-6), (i, j)
    assert sims[2, 3] > 0.9


@pytest.mark.parametrize("prefixes", [False, True])
def test_cross_head_similarity_matches_principal_angles(prefixes):
    """The one blocked layer-pair routine behind every similarity matrix: each (layer, head)
    pair, and with ``prefixes`` each top-k' prefix, against scipy's principal angles; exactly
    symmetric, exactly 1 for a head with itself."""
    rng = np.random.default_rng(12)
    n, h, k, d = 4, 3, 5, 16
    bases = haar_bases(rng, (n, h), k, d)
    bases[2, 1] = orthonormal_rows(bases[0, 2] + 0.05 * rng.standard_normal((k, d)))
    sims = cross_head_similarity(bases.astype(np.float32), prefixes=prefixes)
    by_k = sims if prefixes else sims[None]
    assert by_k.shape == ((k if prefixes else 1), n, h, n, h) and sims.dtype == np.float64
    np.testing.assert_array_equal(by_k, by_k.transpose(0, 3, 4, 1, 2))
    for kk, s in zip(range(1, k + 1) if prefixes else [k], by_k, strict=True):
        for a, i, b, j in np.ndindex(n, h, n, h):
            if (a, i) == (b, j):
                assert s[a, i, b, j] == 1.0
            else:
                reference = _reference(bases[a, i, :kk], bases[b, j, :kk])
                assert s[a, i, b, j] == pytest.approx(reference, abs=1e-6), (kk, a, i, b, j)
    assert by_k[-1, 2, 1, 0, 2] > 0.9


def test_one_head_of_several_is_that_heads_matrix():
    """A strided view of one head (as the k-sweep passes) gives the same matrix as that head's
    entries of the all-heads tensor (to float32 GEMM rounding: the blocks differ in shape)."""
    rng = np.random.default_rng(13)
    bases = haar_bases(rng, (5, 3), 4, 20).astype(np.float32)
    all_heads = cross_head_similarity(bases)
    np.testing.assert_allclose(similarity_matrix(bases[:, 1]), all_heads[:, 1, :, 1], atol=1e-7)
    by_k = cross_head_similarity(bases[:, 1:2], prefixes=True)
    np.testing.assert_allclose(by_k[-1], all_heads[:, 1:2, :, 1:2], atol=1e-7)


def test_null_values_closed_form_small_case():
    # d=2, k=1: sim = cos^2(theta), theta uniform: mean 1/2, var 3/8 - 1/4 = 1/8.
    assert null_mean(1, 2) == pytest.approx(0.5)
    assert null_std(1, 2) == pytest.approx(np.sqrt(1 / 8))
    # k = d: every subspace is the whole space, sim is 1 exactly.
    assert null_mean(4, 4) == pytest.approx(1.0)
    assert null_std(4, 4) == pytest.approx(0.0)


@pytest.mark.parametrize("k,d", [(5, 30), (2, 7)])
def test_null_mean_and_std_by_monte_carlo(k, d):
    rng = np.random.default_rng(2024 + d)
    n = 4000
    draws = np.empty(n)
    for t in range(n):
        v1, v2 = haar_bases(rng, (), k, d), haar_bases(rng, (), k, d)
        draws[t] = np.square(v1 @ v2.T).sum() / k   # independent of the library
    se = draws.std(ddof=1) / np.sqrt(n)
    assert abs(draws.mean() - null_mean(k, d)) < 3 * se, (draws.mean(), null_mean(k, d))
    assert draws.std(ddof=1) == pytest.approx(null_std(k, d), rel=0.07)
