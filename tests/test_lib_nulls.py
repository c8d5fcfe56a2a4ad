"""Isotropic nulls by Monte Carlo over Haar-random subspaces and random weights; ceilings and
z-scores."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import gaussian_kernel_bases, haar_bases

from weight_geometry.nulls import (
    alignment_ceiling,
    alignment_floor,
    alignment_null_std,
    alignment_z,
    bartlett_r,
    chance_z,
    normalized_alignment,
    random_weight_bases,
    similarity_z,
)
from weight_geometry.similarity import null_std


def _std_tolerance(draws: np.ndarray, n_se: float = 4.0) -> float:
    """``n_se`` standard errors of the sample std, relative: ``sqrt((kurtosis - 1) / (4 n))``."""
    c = draws - draws.mean()
    kurtosis = np.mean(c**4) / np.mean(c**2) ** 2
    return n_se * np.sqrt((kurtosis - 1) / (4 * len(draws)))


def _ffn_spectrum(rng, d_ff: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """A ``W_in (d_ff, d)`` with a strongly non-flat spectrum and its singular values."""
    w = rng.standard_normal((d_ff, d)) * np.geomspace(3.0, 0.1, d)
    return w, np.linalg.svd(w, compute_uv=False)


def test_haar_bases_are_orthonormal():
    v = haar_bases(np.random.default_rng(0), (5, 2), 3, 9)
    assert v.shape == (5, 2, 3, 9)
    np.testing.assert_allclose(v @ np.swapaxes(v, -1, -2), np.broadcast_to(np.eye(3), (5, 2, 3, 3)),
                               atol=1e-12)


@pytest.mark.parametrize("k,d,d_ff", [(3, 12, 20), (1, 6, 4), (5, 16, 40)])
def test_alignment_null_by_monte_carlo(k, d, d_ff):
    # d_ff < d (4 < 6): W_in has only d_ff singular values, G has zero eigenvalues.
    rng = np.random.default_rng(100 * k + d)
    w, sv = _ffn_spectrum(rng, d_ff, d)
    n = 20000
    v = haar_bases(rng, (n,), k, d)
    draws = np.square(v @ w.T).sum(axis=(1, 2)) / np.square(w).sum()   # ||W V^T||_F^2 / ||W||^2
    se = draws.std(ddof=1) / np.sqrt(n)
    assert abs(draws.mean() - k / d) < 4 * se
    std = alignment_null_std(k, d, sv[None])[0]
    assert draws.std(ddof=1) == pytest.approx(std, rel=_std_tolerance(draws))


def test_alignment_null_depends_on_spectrum():
    # Same k, d: a steep spectrum spreads the alignment far more than a flat one.
    k, d = 3, 12
    steep = np.geomspace(10.0, 0.01, d)
    mild = np.linspace(1.0, 0.9, d)
    std = alignment_null_std(k, d, np.stack([steep, mild]))
    assert std[0] > 5 * std[1]
    assert std[0] > null_std(k, d) and std[1] < 0.1 * null_std(k, d)


def test_alignment_null_reduces_to_similarity_null_for_projector():
    for k, d in [(1, 2), (3, 10), (20, 2048), (7, 7)]:
        projector_spectrum = np.r_[np.ones(k), np.zeros(d - k)]
        assert alignment_null_std(k, d, projector_spectrum[None])[0] == pytest.approx(
            null_std(k, d), abs=1e-15)
    # Isotropic W_in: every subspace holds exactly k/d of the energy.
    assert alignment_null_std(4, 9, np.ones((2, 9))) == pytest.approx([0.0, 0.0])


def test_similarity_z_standard_under_null_and_large_when_shared():
    rng = np.random.default_rng(7)
    k, d, n = 4, 30, 4000
    v1, v2 = haar_bases(rng, (n,), k, d), haar_bases(rng, (n,), k, d)
    z = similarity_z(np.square(v1 @ np.swapaxes(v2, 1, 2)).sum(axis=(1, 2)) / k, k, d)
    assert abs(z.mean()) < 4 / np.sqrt(n)
    assert z.std() == pytest.approx(1.0, rel=_std_tolerance(z))
    # Half of the subspace shared: sim >= 1/2, far above chance 4/30.
    shared = np.r_[v1[0, :2], np.linalg.qr(rng.standard_normal((d, 2)))[0].T]
    assert similarity_z(np.square(v1[0] @ shared.T).sum() / k, k, d) > 5


def test_alignment_z_shapes_and_planted_coupling():
    rng = np.random.default_rng(3)
    k, d, n_layers, n_heads = 2, 10, 3, 5
    ws, svs = zip(*(_ffn_spectrum(rng, 15, d) for _ in range(n_layers)), strict=True)
    svs = np.stack(svs)
    v = haar_bases(rng, (n_layers, n_heads), k, d)
    align = np.stack([np.square(v[i] @ ws[i].T).sum(axis=(1, 2)) / np.square(ws[i]).sum()
                      for i in range(n_layers)])                          # (L, h)
    z = alignment_z(align, k, d, svs)
    assert z.shape == (n_layers, n_heads)
    np.testing.assert_allclose(z[1], (align[1] - k / d) / alignment_null_std(k, d, svs)[1])
    np.testing.assert_allclose(alignment_z(align[:, 0], k, d, svs), z[:, 0])
    np.testing.assert_array_equal(chance_z(align, k, d, alignment_null_std(k, d, svs)[:, None]), z)
    # A subspace inside W_in's top singular directions: strongly coupled.
    top = np.linalg.svd(ws[0])[2][:k]
    planted = np.square(top @ ws[0].T).sum() / np.square(ws[0]).sum()
    assert alignment_z(np.array([planted]), k, d, svs[:1])[0] > 3


def test_alignment_ceiling_and_normalization():
    rng = np.random.default_rng(9)
    k, d = 3, 12
    w, sv = _ffn_spectrum(rng, 8, d)                 # d_ff < d: only 8 singular values
    ceiling = alignment_ceiling(sv[None], k)
    vt = np.linalg.svd(w)[2]
    own = np.square(w @ vt[:k].T).sum() / np.square(w).sum()
    assert ceiling[0] == pytest.approx(own)
    # Order of the singular values must not matter.
    assert alignment_ceiling(sv[None, ::-1], k) == pytest.approx(ceiling)
    # Ky Fan: no k-subspace holds more.
    v = haar_bases(rng, (2000,), k, d)
    random_align = np.square(v @ w.T).sum(axis=(1, 2)) / np.square(w).sum()
    assert random_align.max() < ceiling[0]
    # The floor: W_in's bottom-k directions, here its null space (d_ff < d): 0, and no
    # k-subspace holds less.
    floor = alignment_floor(sv[None], k, d)
    bottom = np.square(w @ vt[-k:].T).sum() / np.square(w).sum()
    assert floor[0] == pytest.approx(bottom, abs=1e-12) and random_align.min() > floor[0]
    wide, wide_sv = _ffn_spectrum(rng, 30, d)            # d_ff > d: bottom-k nonzero
    wide_vt = np.linalg.svd(wide)[2]
    assert alignment_floor(wide_sv[None], k, d)[0] == pytest.approx(
        np.square(wide @ wide_vt[-k:].T).sum() / np.square(wide).sum())
    # Symmetric normalization: floor -1, chance 0, ceiling +1, linear on each side.
    chance = k / d
    values = np.array([own, chance, floor[0], (chance + own) / 2, (chance + floor[0]) / 2])
    np.testing.assert_allclose(normalized_alignment(values, chance, ceiling, floor),
                               [1.0, 0.0, -1.0, 0.5, -0.5], atol=1e-12)
    # Per-layer ceiling broadcasts over heads.
    per_head = normalized_alignment(np.full((1, 4), own), chance, ceiling[:, None],
                                    floor[:, None])
    np.testing.assert_allclose(per_head, np.ones((1, 4)))


def test_alignment_null_std_of_a_flat_spectrum_is_zero():
    """A flat W_in spectrum (W_in^T W_in = c I) gives every k-subspace the same alignment:
    std exactly 0, not NaN from a rounding-negative variance."""
    for value in (1.1, 0.3, 7.0):
        std = alignment_null_std(4, 9, np.full((1, 9), value))
        assert std.tolist() == [0.0]


def test_bartlett_r_is_distributed_as_the_r_of_a_gaussian_qr():
    """Entry by entry, its mean and std against the R (diagonal made positive) of numpy's QR
    of standard Gaussian n x m matrices, an independent draw of the same law."""
    n, m, draws = 7, 4, 20000
    rng = np.random.default_rng(0)
    r = bartlett_r(rng, n, m, (draws,))
    ref = np.linalg.qr(rng.standard_normal((draws, n, m)))[1]
    ref = ref * np.sign(np.diagonal(ref, axis1=1, axis2=2))[:, :, None]
    assert np.all(np.tril(r, -1) == 0) and np.all(np.diagonal(r, axis1=1, axis2=2) > 0)
    upper = np.triu(np.ones((m, m), dtype=bool))
    se = ref.std(0)[upper] / np.sqrt(draws)
    np.testing.assert_array_less(np.abs(r.mean(0) - ref.mean(0))[upper], 5 * np.sqrt(2) * se)
    np.testing.assert_allclose(r.std(0)[upper], ref.std(0)[upper], rtol=0.04)
    # exactly: E[R_rr^2] = n - r (chi-square), E[R^T R] = n I (Wishart)
    np.testing.assert_allclose(np.mean(np.diagonal(r, axis1=1, axis2=2) ** 2, 0),
                               n - np.arange(m), rtol=0.03)


def _pair_statistics(bases: np.ndarray) -> dict[str, np.ndarray]:
    """Independent draws of the statistics the head-matching nulls rest on: per disjoint layer
    pair (0, 1), (2, 3), ..., same-index and best match (:mod:`head_matching`'s definitions);
    per layer, the similarity of heads 0 and 1 and of heads 0 and h - 1."""
    k = bases.shape[2]
    a, b = bases[0::2], bases[1::2]
    cross = np.square(np.einsum("pikd,pjld->pijkl", a, b)).sum(axis=(3, 4)) / k
    within = [np.square(np.einsum("pkd,pld->pkl", bases[:, 0], bases[:, j])).sum(axis=(1, 2)) / k
              for j in (1, -1)]
    return {"same_index": np.einsum("pii->pi", cross).mean(1),
            "best_match": cross.max(axis=2).mean(1),
            "heads_0_1": within[0], "heads_0_last": within[1]}


@pytest.mark.parametrize("n_kv", [1, 2, 4])
def test_random_weight_bases_match_drawn_gaussian_weights(n_kv):
    """Orthonormal rows; one KV head's query heads inside one d_head-dimensional space; and
    the similarities that the head-matching nulls use have the law of the subspaces of drawn
    Gaussian W_Q and W_K (the library's kernels): within a layer (heads 0 and 1 share a KV
    head unless n_kv = h) and across layers (same-index, best match), mean and std over 4000
    independent layers (2000 layer pairs) of each."""
    n_layers, n_heads, d_head, d, k = 4000, 4, 6, 40, 3
    fast = random_weight_bases(np.random.default_rng(1), n_heads, [n_kv] * n_layers,
                               [d_head] * n_layers, d, k)
    assert fast.shape == (n_layers, n_heads, k, d) and fast.dtype == np.float32
    np.testing.assert_allclose(fast @ np.swapaxes(fast, -1, -2),
                               np.broadcast_to(np.eye(k), (n_layers, n_heads, k, k)), atol=1e-6)
    group = n_heads // n_kv
    if group > 1:   # g k = 6 directions of one KV head span only its d_head = 6 dimensions
        assert np.linalg.matrix_rank(fast[0, :group].reshape(group * k, d), tol=1e-4) == d_head
    ref = _pair_statistics(gaussian_kernel_bases(np.random.default_rng(2), n_layers, n_heads,
                                                n_kv, d_head, d, k))
    for name, x in _pair_statistics(fast).items():
        y = ref[name]
        se = np.hypot(x.std(), y.std()) / np.sqrt(len(x))
        assert abs(x.mean() - y.mean()) < 5 * se, name
        assert x.std() == pytest.approx(y.std(), rel=np.sqrt(2) * _std_tolerance(y)), name
