"""Head matching: planted head permutations across layers, nulls of the pairing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import gaussian_kernel_bases, haar_bases, orthonormal_rows

from weight_geometry.head_matching import (
    best_match,
    cross_head_similarity,
    isotropic_weight_null,
    layer_pair_table,
    match_heads,
    same_index_mean,
)
from weight_geometry.multiplicity import pairing_null_exact, pairing_permutation_p
from weight_geometry.rowspace_nulls import rowspace_overlaps, same_index_null
from weight_geometry.similarity import null_std, similarity


def _record(n_layers: int, n_heads: int, n_kv: int, d_head: int, d: int) -> dict:
    """The ``model.json`` keys the head-matching nulls read, for one head size and KV count."""
    return {"n_layers": n_layers, "d_model": d, "n_heads": n_heads, "n_kv_heads": n_kv,
            "d_head": d_head}


def _own_row_spaces(bases: np.ndarray) -> np.ndarray:
    """Overlap moments for heads that are their own KV heads with d_head = k (each top-k
    subspace is its whole row space): the nulls of independent Haar heads."""
    return rowspace_overlaps(bases)


def _derangements(rng, n_layers: int, n_heads: int) -> np.ndarray:
    """``(L, h)`` head labelings such that no head keeps its index between any two layers."""
    while True:
        perms = np.stack([rng.permutation(n_heads) for _ in range(n_layers)])
        a, b = np.triu_indices(n_layers, k=1)
        if not np.any(perms[a] == perms[b]):
            return perms


def _planted(seed: int, relabel: bool = True, n_layers=4, n_heads=6, k=3, d=40, noise=0.02):
    """Every layer holds the same ``h`` Haar subspaces, relabeled (or not): head i of layer l is
    shared subspace ``labels[l, i]``, plus noise. Returns bases ``(L, h, k, d)`` and labels."""
    rng = np.random.default_rng(seed)
    shared = haar_bases(rng, (n_heads,), k, d)
    labels = (_derangements(rng, n_layers, n_heads) if relabel
              else np.tile(np.arange(n_heads), (n_layers, 1)))
    bases = shared[labels] + noise * rng.standard_normal((n_layers, n_heads, k, d))
    return orthonormal_rows(bases), labels


def test_cross_head_similarity_matches_pairwise_reference():
    rng = np.random.default_rng(0)
    bases = haar_bases(rng, (3, 4), 2, 10)
    bases[2, 1] = orthonormal_rows(bases[0, 3] + 0.1 * rng.standard_normal((2, 10)))
    sims = cross_head_similarity(bases.astype(np.float32))
    assert sims.shape == (3, 4, 3, 4) and sims.dtype == np.float64
    for index in np.ndindex(3, 4, 3, 4):
        a, i, b, j = index
        assert sims[index] == pytest.approx(similarity(bases[a, i], bases[b, j]), abs=1e-6)
    np.testing.assert_array_equal(sims, sims.transpose(2, 3, 0, 1))
    assert sims[2, 1, 0, 3] > 0.9


def test_cross_head_similarity_float32_products_keep_float64_accuracy_at_real_sizes():
    """At SmolLM2-like sizes (d = 576, k = 32) the float32 products stay within 1e-6 of the
    float64 reference for every pair, far below the null's std (~2e-3)."""
    rng = np.random.default_rng(7)
    bases = haar_bases(rng, (3, 3), 32, 576)
    sims = cross_head_similarity(bases.astype(np.float32))
    reference = np.array([similarity(bases[a, i], bases[b, j])
                          for a, i, b, j in np.ndindex(3, 3, 3, 3)]).reshape(sims.shape)
    np.testing.assert_allclose(sims, reference, rtol=0, atol=1e-6)
    assert null_std(32, 576) > 1e3 * np.abs(sims - reference).max()
    # Exactly symmetric, and exactly 1 for a head with itself, whatever the rounding.
    np.testing.assert_array_equal(sims, sims.transpose(2, 3, 0, 1))
    for a, i in np.ndindex(3, 3):
        assert sims[a, i, a, i] == 1.0


def test_summaries_match_loops():
    rng = np.random.default_rng(1)
    sims = cross_head_similarity(haar_bases(rng, (4, 5), 2, 12))
    best, pairs = best_match(sims)
    same = same_index_mean(sims)
    for a in range(4):
        for b in range(4):
            assert same[a, b] == pytest.approx(np.mean([sims[a, i, b, i] for i in range(5)]))
            assert best[a, b] == pytest.approx(np.mean([max(sims[a, i, b]) for i in range(5)]))
            assert list(pairs[a, b]) == [int(np.argmax(sims[a, i, b])) for i in range(5)]
    np.testing.assert_allclose(np.diag(best), 1.0)
    np.testing.assert_array_equal(pairs[np.arange(4), np.arange(4)], np.tile(np.arange(5), (4, 1)))


def test_best_match_recovers_planted_permutation_that_same_index_misses():
    bases, labels = _planted(seed=2)
    n_layers, n_heads, k, d = bases.shape
    sims = cross_head_similarity(bases)
    best, pairs = best_match(sims)
    same = same_index_mean(sims)
    off = ~np.eye(n_layers, dtype=bool)
    assert best[off].min() > 0.95
    assert same[off].max() < k / d + 5 * null_std(k, d)
    for a, b in zip(*np.nonzero(off), strict=True):
        # Head i of a is shared subspace labels[a, i]; in b that subspace is head j with
        # labels[b, j] == labels[a, i].
        planted = np.argsort(labels[b])[labels[a]]
        np.testing.assert_array_equal(pairs[a, b], planted)
    table = layer_pair_table(sims, best, k, _record(n_layers, n_heads, n_heads, k, d),
                             _own_row_spaces(bases), n_perm=200)
    assert (table["z_best_match"] > 20).all()
    assert (table["z_same_index"].abs() < 5).all()
    # Against the random pairing (which averages in the one true match per head) the same-index
    # similarity is below the pairing mean.
    assert (table["same_index"] < table["random_pairing_mean"]).all()
    assert (table["z_same_index_vs_pairing"] < 0).all()


def test_same_index_planted_shared_subspaces_give_large_z():
    bases, _ = _planted(seed=3, relabel=False)
    n_layers, n_heads, k, d = bases.shape
    _, _, table, _ = match_heads(bases, k, _record(n_layers, n_heads, n_heads, k, d),
                                 _own_row_spaces(bases), n_perm=200)
    assert (table["same_index"] > 0.95).all()
    assert (table["z_same_index"] > 20).all()
    assert (table["z_same_index_vs_pairing"] > 3).all()


def test_z_scores_standard_under_isotropic_null():
    """Independent Haar heads (multi-head attention: one KV head per head) are the null."""
    rng = np.random.default_rng(4)
    n_layers, n_heads, k, d = 14, 6, 3, 30
    bases = haar_bases(rng, (n_layers, n_heads), k, d)
    _, _, table, _ = match_heads(bases, k, _record(n_layers, n_heads, n_heads, k, d),
                                 _own_row_spaces(bases), n_perm=300)
    assert len(table) == n_layers * (n_layers - 1) // 2
    assert (table["layer_a"] < table["layer_b"]).all()
    # 91 pairwise-independent z (same_index): mean within ~5 standard errors of 0.
    for column in ("z_same_index", "z_best_match"):
        z = table[column]
        assert abs(z.mean()) < 0.5, column
        assert 0.7 < z.std() < 1.3, column
    assert np.allclose(table["isotropic_mean"], k / d)
    # the simulated null (64 layers here: 2016 pairs) against the exact std of a mean of h
    # independent similarities
    model = _record(n_layers, n_heads, n_heads, k, d)
    null = isotropic_weight_null(model, k, n_layers=64)
    assert null["isotropic_std"][0, 1] == pytest.approx(null_std(k, d) / np.sqrt(n_heads),
                                                        rel=0.1)
    assert table["isotropic_std"][0] == isotropic_weight_null(model, k)["isotropic_std"][0, 1]


@pytest.mark.parametrize("n_kv", [1, 2, 8])
def test_z_scores_standard_for_random_weights_with_shared_kv_heads(n_kv):
    """Kernel subspaces of Gaussian W_Q, W_K through the library, with 8 query heads on n_kv KV
    heads: heads sharing a KV head are correlated, and the nulls must say so (a null of
    independent heads gives best-match z around -3 at n_kv = 1, a same-index z std of 1.9)."""
    n_layers, n_heads, d_head, d, k = 40, 8, 16, 128, 8
    full = gaussian_kernel_bases(np.random.default_rng(n_kv), n_layers, n_heads, n_kv, d_head,
                                 d, d_head)
    overlaps = rowspace_overlaps(full[:, ::n_heads // n_kv])
    _, _, table, _ = match_heads(full[:, :, :k], k, _record(n_layers, n_heads, n_kv, d_head, d),
                                 overlaps, n_perm=200)
    for column in ("z_same_index", "z_best_match"):
        z = table[column]
        assert abs(z.mean()) < 0.4, column
        assert 0.75 < z.std() < 1.25, column
    # The conditional std of same-index is an upper bound (heads of one KV head counted as
    # perfectly correlated): centred, never too narrow, exact for one head per KV head.
    z = table["z_conditional"]
    assert abs(z.mean()) < 0.4
    assert (0.5 < z.std() < 1.25) if n_kv < n_heads else (0.75 < z.std() < 1.25)
    # Random weights: the p-values of both tests are near uniform, and BH keeps the false
    # discoveries rare (at most a few of 780 pairs at q = 0.05, none in expectation).
    for column in ("p_pairing", "p_conditional"):
        assert 0.4 < table[column].mean() < 0.6, column
        assert (table[f"{column}_adjusted"] <= 0.05).sum() <= 2, column


def test_single_head_pairing_std_zero_gives_nan_z():
    bases = haar_bases(np.random.default_rng(6), (3, 1), 2, 8)
    _, _, table, _ = match_heads(bases, 2, _record(3, 1, 1, 2, 8), _own_row_spaces(bases),
                                 n_perm=20)
    assert (table["random_pairing_std"] == 0).all()
    assert table["z_same_index_vs_pairing"].isna().all()
    np.testing.assert_allclose(table["best_match"], table["same_index"])


def test_match_heads_is_its_parts_computed_once():
    """What the match_heads rule writes: best match and pairs of the cross-head similarity,
    and the per-pair table whose columns are those matrices' upper triangles and the nulls and
    tests of multiplicity and rowspace_nulls."""
    bases, _ = _planted(seed=8)
    n_layers, n_heads, k, d = bases.shape
    overlaps = _own_row_spaces(bases)
    model = _record(n_layers, n_heads, n_heads, k, d)
    best, pairs, table, sims = match_heads(bases, k, model, overlaps, n_perm=50, seed=3)
    np.testing.assert_array_equal(sims, cross_head_similarity(bases))
    np.testing.assert_array_equal(best, best_match(sims)[0])
    np.testing.assert_array_equal(pairs, best_match(sims)[1])
    pd.testing.assert_frame_equal(table, layer_pair_table(sims, best, k, model, overlaps,
                                                          n_perm=50, seed=3))
    a, b = np.triu_indices(n_layers, 1)
    np.testing.assert_array_equal(table["best_match"], best[a, b])
    np.testing.assert_array_equal(table["same_index"], same_index_mean(sims)[a, b])
    mean, std = pairing_null_exact(sims)
    np.testing.assert_array_equal(table["random_pairing_mean"], mean[a, b])
    np.testing.assert_array_equal(table["random_pairing_std"], std[a, b])
    np.testing.assert_array_equal(table["p_pairing"],
                                  pairing_permutation_p(sims, 50, 3)[a, b])
    cond_mean, cond_std = same_index_null(overlaps, k, model)
    np.testing.assert_array_equal(table["conditional_mean"], cond_mean[a, b])
    np.testing.assert_allclose(table["z_conditional"],
                               (table["same_index"] - cond_mean[a, b]) / cond_std[a, b])


def test_planted_identity_is_found_after_multiplicity_control_and_random_models_give_none():
    """A layer pair whose heads keep their identities (head i of layer 2 is head i of layer 5,
    rotated a little inside its own KV row space) among otherwise random layers of Gaussian
    weights: the permutation test over head orderings, BH over all pairs, finds that pair and
    no other; fully random models give no discovery in most seeds (BH at q = 0.05 under the
    global null: at most 5 % of seeds in expectation)."""
    n_layers, n_heads, n_kv, d_head, d, k = 10, 8, 2, 8, 48, 4
    rng = np.random.default_rng(11)
    full = gaussian_kernel_bases(rng, n_layers, n_heads, n_kv, d_head, d, d_head)
    full[5] = orthonormal_rows(full[2] + 0.15 * rng.standard_normal(full[2].shape))
    overlaps = rowspace_overlaps(full[:, ::n_heads // n_kv])
    model = _record(n_layers, n_heads, n_kv, d_head, d)
    _, _, table, _ = match_heads(full[:, :, :k], k, model, overlaps, n_perm=2000)
    found = table[table["p_pairing_adjusted"] <= 0.05]
    assert list(zip(found["layer_a"], found["layer_b"], strict=True)) == [(2, 5)]
    discoveries = []
    for seed in range(10):
        bases = gaussian_kernel_bases(np.random.default_rng(100 + seed), n_layers, n_heads,
                                      n_kv, d_head, d, d_head)
        _, _, null_table, _ = match_heads(bases[:, :, :k], k, model,
                                          rowspace_overlaps(bases[:, ::n_heads // n_kv]),
                                          n_perm=2000, seed=seed)
        discoveries.append(int((null_table["p_pairing_adjusted"] <= 0.05).sum()))
    assert sum(count > 0 for count in discoveries) <= 1, discoveries
