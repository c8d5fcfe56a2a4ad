"""Row-space-conditional nulls against Monte Carlo draws of random subspaces of the row spaces,
and against direct projector formulas."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import orthonormal_rows

from weight_geometry.nulls import alignment_null_std
from weight_geometry.rowspace_nulls import (
    alignment_null,
    head_pair_null,
    rowspace_overlaps,
    same_index_null,
    similarity_null,
)
from weight_geometry.similarity import null_std


def uniform_model(n_layers: int, n_heads: int, n_kv: int, m: int) -> dict:
    """The ``model.json`` keys :mod:`head_layout` reads, for one head size and KV-head count."""
    return {"n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv, "d_head": m}


def haar_frames(rng: np.random.Generator, draws: int, k: int, m: int) -> np.ndarray:
    """``(draws, k, m)`` Haar-random orthonormal rows (:func:`conftest.orthonormal_rows` of
    Gaussian matrices)."""
    return orthonormal_rows(rng.standard_normal((draws, k, m)))


def overlapping_row_spaces(rng, m: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Two ``(m, d)`` orthonormal bases whose principal angles spread from near 0 to near 90."""
    qa = orthonormal_rows(rng.standard_normal((m, d)))
    mix = np.linspace(0.0, 3.0, m)[:, None]
    return qa, orthonormal_rows(qa * (3.0 - mix) + mix * rng.standard_normal((m, d)))


@pytest.mark.parametrize("k", [1, 3, 7])
def test_similarity_null_matches_monte_carlo(k):
    """Mean and std of ||A M B^T||_F^2 / k over Haar frames A, B of R^m, for row spaces with
    spread principal angles, agree with the closed form to Monte Carlo precision."""
    rng = np.random.default_rng(3)
    m, d, draws = 8, 30, 40_000
    qa, qb = overlapping_row_spaces(rng, m, d)
    overlaps = rowspace_overlaps(np.stack([qa[None], qb[None]]))
    mean, std = similarity_null(overlaps[0, 0, 0, 1, 0], overlaps[1, 0, 0, 1, 0], k, m)
    ua = haar_frames(rng, draws, k, m) @ qa
    ub = haar_frames(rng, draws, k, m) @ qb
    sims = np.square(ua @ np.swapaxes(ub, 1, 2)).sum((1, 2)) / k
    assert mean == pytest.approx(sims.mean(), abs=4 * sims.std() / np.sqrt(draws))
    assert std == pytest.approx(sims.std(), rel=0.03)


def test_similarity_null_of_one_row_space_is_the_isotropic_null_of_r_m():
    """M = I (two heads of one KV head): mean k/m and the isotropic std with d = m."""
    for k, m in [(1, 4), (5, 16), (20, 64)]:
        mean, std = similarity_null(m, m, k, m)
        assert mean == pytest.approx(k / m)
        assert std == pytest.approx(null_std(k, m))
    assert similarity_null(16, 16, 16, 16) == (pytest.approx(1.0), 0.0)


def test_rowspace_overlaps_equal_direct_products():
    """t1 = ||Q_a Q_b^T||_F^2 and t2 = ||(Q_a Q_b^T)^T (Q_a Q_b^T)||_F^2 for every pair of row
    spaces, both triangles, in float64 to float32 precision."""
    rng = np.random.default_rng(0)
    n_layers, n, m, d = 4, 2, 5, 24
    bases = np.stack([[orthonormal_rows(rng.standard_normal((m, d))) for _ in range(n)]
                      for _ in range(n_layers)])
    out = rowspace_overlaps(bases.astype(np.float32))
    for a in range(n_layers):
        for p in range(n):
            for b in range(n_layers):
                for q in range(n):
                    mat = bases[a, p] @ bases[b, q].T
                    assert out[0, a, p, b, q] == pytest.approx(np.square(mat).sum(), rel=1e-5)
                    assert out[1, a, p, b, q] == pytest.approx(
                        np.square(mat.T @ mat).sum(), rel=1e-5)


@pytest.mark.parametrize("shared", [False, True])
def test_same_index_null_bounds_the_std_of_correlated_heads(shared):
    """Same-index over heads, by Monte Carlo with each head drawn in its own KV head's row
    space (3 KV heads, 6 query heads, 2 layers): the mean is the mean of the pairs' means; the
    std bound holds for independent heads and is reached when the heads of one KV head share
    their draw (perfectly correlated)."""
    rng = np.random.default_rng(7)
    n_kv, group, m, d, k, draws = 3, 2, 6, 20, 2, 20_000
    spaces = np.stack([[orthonormal_rows(rng.standard_normal((m, d))) for _ in range(n_kv)]
                       for _ in range(2)])
    overlaps = rowspace_overlaps(spaces)
    model = uniform_model(2, n_kv * group, n_kv, m)
    mean, std = same_index_null(overlaps, k, model)
    pair_mean, _ = head_pair_null(overlaps, k, model)
    assert pair_mean.shape == (2, 6, 2, 6)
    values = np.zeros(draws)
    for j in range(n_kv):
        frames = [haar_frames(rng, draws, k, m) for _ in range(2)]
        for _ in range(group):
            if not shared:
                frames = [haar_frames(rng, draws, k, m) for _ in range(2)]
            ua, ub = frames[0] @ spaces[0, j], frames[1] @ spaces[1, j]
            values += np.square(ua @ np.swapaxes(ub, 1, 2)).sum((1, 2)) / k
    values /= n_kv * group
    assert mean[0, 1] == pytest.approx(values.mean(), abs=4 * values.std() / np.sqrt(draws))
    if shared:
        assert std[0, 1] == pytest.approx(values.std(), rel=0.03)
    else:
        assert values.std() < 0.9 * std[0, 1]
    np.testing.assert_allclose(mean, mean.T)


def test_alignment_null_matches_monte_carlo_and_projector_formulas():
    """For W_in with an anisotropic spectrum: the share of its energy in a Haar-random k-subspace
    of the row space R has the closed-form mean and std; the ceiling and floor are the largest
    and smallest shares any k-subspace of R holds (checked against the eigenvectors of the
    restricted Gram, and never exceeded by random draws)."""
    rng = np.random.default_rng(11)
    m, d, d_ff, k, draws = 6, 25, 40, 2, 40_000
    w_in = rng.standard_normal((d_ff, d)) * np.linspace(0.2, 3.0, d)
    g = w_in.T @ w_in
    q = orthonormal_rows(rng.standard_normal((m, d)))
    mu, vecs = np.linalg.eigh(q @ g @ q.T)
    null = alignment_null(mu[None, None], np.array([np.trace(g)]), k, uniform_model(1, 2, 1, m))
    assert null["chance"].shape == (1, 2)
    frames = haar_frames(rng, draws, k, m) @ q
    shares = np.square(frames @ w_in.T).sum((1, 2)) / np.trace(g)
    assert null["chance"][0, 0] == pytest.approx(shares.mean(), abs=4 * shares.std() / 200)
    assert null["std"][0, 0] == pytest.approx(shares.std(), rel=0.03)
    top, bottom = vecs[:, ::-1][:, :k].T @ q, vecs[:, :k].T @ q
    assert null["ceiling"][0, 0] == pytest.approx(np.square(w_in @ top.T).sum() / np.trace(g))
    assert null["floor"][0, 0] == pytest.approx(np.square(w_in @ bottom.T).sum() / np.trace(g))
    assert null["floor"][0, 0] <= shares.min() and shares.max() <= null["ceiling"][0, 0]


def test_alignment_null_of_the_whole_space_is_the_isotropic_null():
    """Row space = R^d (m = d): the conditional null is the isotropic one of :mod:`nulls`."""
    rng = np.random.default_rng(2)
    d, k = 12, 4
    sigma = np.sort(rng.uniform(0.1, 2.0, d))[::-1]
    null = alignment_null(np.square(sigma)[None, None], np.array([np.square(sigma).sum()]), k,
                          uniform_model(1, 1, 1, d))
    assert null["chance"][0, 0] == pytest.approx(k / d)
    assert null["std"][0, 0] == pytest.approx(alignment_null_std(k, d, sigma[None])[0])
