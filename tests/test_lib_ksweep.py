"""k-sweep against per-k references; random subspaces track chance, planted structure does not."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import haar_bases
from scipy.linalg import subspace_angles

from weight_geometry.alignment import alignment_table
from weight_geometry.ksweep import (
    GAP_THRESHOLD,
    gaps_at,
    ill_defined,
    ksweep_table,
    relative_gaps,
    similarity_by_k,
)
from weight_geometry.nulls import alignment_null_std
from weight_geometry.rowspace_nulls import alignment_null, rowspace_overlaps, similarity_null
from weight_geometry.similarity import null_std, similarity
from weight_geometry.statistics import overlap_summary


def _stored(seed: int, n_layers=7, n_heads=3, d_head=6, d=20, d_ff=30, shared=0):
    """Synthetic stored data: full Haar frames per (layer, head), the first ``shared`` vectors
    of every head common to all layers; a random ``W_in`` per layer with its energies; evenly
    spaced kernel singular values; and ``W_in`` itself."""
    rng = np.random.default_rng(seed)
    vectors = haar_bases(rng, (n_layers, n_heads), d_head, d)
    if shared:
        common = haar_bases(rng, (), d_head, d)[:shared]
        rest = rng.standard_normal((n_layers, n_heads, d_head - shared, d))
        rest -= rest @ common.T @ common                                  # orthogonal to it
        q = np.linalg.qr(np.swapaxes(rest, -1, -2))[0]
        vectors = np.concatenate([np.broadcast_to(common, (n_layers, n_heads, shared, d)),
                                  np.swapaxes(q, -1, -2)], axis=2)
    w_in = rng.standard_normal((n_layers, d_ff, d)) * np.geomspace(2.0, 0.2, d)
    energy = np.square(np.einsum("lfd,lhrd->lhrf", w_in, vectors)).sum(-1)
    norm2 = np.square(w_in).sum(axis=(1, 2))
    ffn_sv = np.linalg.svd(w_in, compute_uv=False)
    sv = np.tile(np.linspace(2.0, 0.5, d_head), (n_layers, n_heads, 1))   # gaps well above 1%
    return vectors.astype(np.float32), energy, norm2, ffn_sv, sv, w_in


def _model(seed: int, **shape):
    """:func:`_stored` without ``W_in``: what the extraction stores."""
    return _stored(seed, **shape)[:5]


def _row_spaces(seed: int, **shape):
    """The conditional null's inputs for :func:`_model`'s data, every head its own KV head (its
    ``d_head`` vectors span its row space): the overlap moments, and the eigenvalues of
    ``W_in``'s Gram inside each row space."""
    vectors, *_, w_in = _stored(seed, **shape)
    v = vectors.astype(np.float64)
    gram = np.einsum("lfd,lfe->lde", w_in, w_in)
    return rowspace_overlaps(vectors), np.linalg.eigvalsh(v @ gram[:, None]
                                                         @ np.swapaxes(v, -1, -2))


def _record(n_layers=7, n_heads=3, d_head=6, d=20) -> dict:
    """The ``model.json`` record of :func:`_model`'s data: every head its own KV head."""
    return {"n_layers": n_layers, "d_model": d, "n_heads": n_heads, "n_kv_heads": n_heads,
            "d_head": d_head}


def _matrix(bases: np.ndarray) -> np.ndarray:
    """``(L, L)`` similarity of ``(L, k, d)`` bases pair by pair in float64 (independent of the
    blocked float32 routine), diagonal 1."""
    n = len(bases)
    b64 = bases.astype(np.float64)
    return np.array([[similarity(b64[i], b64[j]) if i != j else 1.0 for j in range(n)]
                     for i in range(n)])


def test_similarity_by_k_matches_principal_angles():
    vectors = _model(0)[0]
    for head in range(3):
        by_k = similarity_by_k(vectors[:, head])          # a non-contiguous view of one head
        assert by_k.shape == (6, 7, 7) and by_k.dtype == np.float64
        np.testing.assert_array_equal(by_k, by_k.transpose(0, 2, 1))
        np.testing.assert_array_equal(np.diagonal(by_k, axis1=1, axis2=2), 1.0)
        for k in range(1, 7):
            for a, b in zip(*np.triu_indices(7, 1), strict=True):
                angles = subspace_angles(vectors[a, head, :k].T.astype(np.float64),
                                         vectors[b, head, :k].T.astype(np.float64))
                assert by_k[k - 1, a, b] == pytest.approx(np.mean(np.cos(angles) ** 2),
                                                          abs=1e-6), (head, k, a, b)


def test_ksweep_matches_per_k_references():
    vectors, energy, norm2, ffn_sv, sv = _model(1)
    overlaps, rowspace = _row_spaces(1)
    heads, d, m = [0, 2], 20, 6
    table = ksweep_table(vectors[:, heads], energy[:, heads], norm2, sv[:, heads], _record(),
                         heads, overlaps, rowspace)
    assert list(table["k"]) == list(range(1, 6))
    assert list(table.columns) == [
        "k", "chance", "null_std", "off_diagonal_mean", "adjacent_mean", "distant_mean",
        "alignment_mean", "off_diagonal_mean_ratio", "adjacent_mean_ratio",
        "distant_mean_ratio", "alignment_mean_ratio", "off_diagonal_mean_conditional_ratio",
        "adjacent_mean_conditional_ratio", "distant_mean_conditional_ratio",
        "alignment_mean_conditional_ratio", "n_ill_defined"]
    for row in table.itertuples():
        k = row.k
        summaries = [overlap_summary(_matrix(vectors[:, h, :k])) for h in heads]
        # Conditional null of each pair: k ||Q_a Q_b^T||_F^2 / m^2 (the full frames).
        null = [overlap_summary(np.array([[k * np.square(vectors[a, h].astype(float)
                                                         @ vectors[b, h].T).sum() / m**2
                                           for b in range(7)] for a in range(7)]))
                for h in heads]
        for stat in ("off_diagonal_mean", "adjacent_mean", "distant_mean"):
            wanted = np.mean([s[stat] for s in summaries])
            assert getattr(row, stat) == pytest.approx(wanted, abs=1e-6), (k, stat)
            assert getattr(row, f"{stat}_ratio") == pytest.approx(wanted * d / k, abs=1e-5)
            assert getattr(row, f"{stat}_conditional_ratio") == pytest.approx(
                wanted / np.mean([s[stat] for s in null]), rel=1e-5), (k, stat)
        align = alignment_table(energy, norm2, ffn_sv, rowspace, k, _record(), "W_gate")
        mine = align[align["head"].isin(heads)]
        wanted = mine["alignment"].mean()
        assert row.alignment_mean == pytest.approx(wanted, rel=1e-12)
        assert row.alignment_mean_conditional_ratio == pytest.approx(
            wanted / mine["conditional_chance"].mean(), rel=1e-9)
        assert row.chance == pytest.approx(k / d)
        assert row.null_std == pytest.approx(null_std(k, d))


def test_random_subspaces_track_chance_for_every_k():
    n_layers, n_heads, d = 12, 4, 24
    vectors, energy, norm2, ffn_sv, sv = _model(2, n_layers=n_layers, n_heads=n_heads, d=d)
    overlaps, rowspace = _row_spaces(2, n_layers=n_layers, n_heads=n_heads, d=d)
    table = ksweep_table(vectors, energy, norm2, sv, _record(n_layers, n_heads, d=d),
                         list(range(n_heads)), overlaps, rowspace)
    n_pairs = n_layers * (n_layers - 1) // 2
    for row in table.itertuples():
        k, chance = row.k, row.chance
        # Pairwise-independent similarities: the mean of n has std null_std / sqrt(n).
        for stat, n in (("off_diagonal_mean", n_pairs), ("adjacent_mean", n_layers - 1)):
            tolerance = 5 * null_std(k, d) / np.sqrt(n * n_heads) / chance
            assert getattr(row, f"{stat}_ratio") == pytest.approx(1.0, abs=tolerance), (k, stat)
        spread = alignment_null_std(k, d, ffn_sv).mean() / np.sqrt(n_layers * n_heads)
        assert row.alignment_mean_ratio == pytest.approx(1.0, abs=5 * spread / chance), k
        # Each head's top-k is Haar in its own row space: the conditional null holds too,
        # within 5 standard errors from the conditional null's own stds.
        mean, std = similarity_null(overlaps[0], overlaps[1], k, 6)
        for stat, pairs in (("off_diagonal_mean", np.triu_indices(n_layers, 1)),
                            ("adjacent_mean", (np.arange(n_layers - 1), np.arange(1, n_layers)))):
            a, b = pairs
            pick = (a[:, None], np.arange(n_heads), b[:, None], np.arange(n_heads))
            m_ab, s_ab = mean[pick], std[pick]
            tolerance = 5 * np.sqrt(np.square(s_ab).sum()) / s_ab.size / m_ab.mean()
            assert getattr(row, f"{stat}_conditional_ratio") == pytest.approx(
                1.0, abs=tolerance), (k, stat)
        null = alignment_null(rowspace, norm2, k, _record(n_layers, n_heads, d=d))
        tolerance = 5 * np.sqrt(np.square(null["std"]).sum()) / null["std"].size
        assert row.alignment_mean_conditional_ratio == pytest.approx(
            1.0, abs=tolerance / null["chance"].mean()), k


def test_planted_shared_directions_stand_out_at_small_k():
    d, shared = 24, 2
    vectors, energy, norm2, ffn_sv, sv = _model(3, d=d, shared=shared)
    table = ksweep_table(vectors, energy, norm2, sv, _record(d=d), [0, 1, 2],
                         *_row_spaces(3, d=d, shared=shared)).set_index("k")
    # Up to k = 2 every layer has the same subspace; beyond, 2 of k directions are shared and
    # the rest is random in the (d - 2)-dimensional complement.
    np.testing.assert_allclose(table.loc[[1, 2], "off_diagonal_mean"], 1.0, atol=1e-6)
    for k in (3, 4, 5):
        expected = (shared + (k - shared) ** 2 / (d - shared)) / k
        assert table.loc[k, "off_diagonal_mean"] == pytest.approx(expected, abs=0.05)
    assert (table["off_diagonal_mean_ratio"] > 2).all()
    assert table["off_diagonal_mean_ratio"].is_monotonic_decreasing


def test_gaps_and_ill_defined():
    sv = np.array([[[4.0, 3.0, 2.999, 1.0],       # gap at k=2: 0.001/3 < 1%
                    [2.0, 2.0, 1.0, 0.0]],        # gap at k=1: exact tie; at k=3: 1
                   [[1.0, 0.5, 0.0, 0.0],         # sigma_3 = 0 = sigma_4: tie, gap 0
                    [3.0, 2.0, 1.0, 0.5]]])
    gaps = relative_gaps(sv)
    assert gaps.shape == (2, 2, 3)
    np.testing.assert_allclose(gaps[0, 0], [0.25, 0.001 / 3, 1.999 / 2.999])
    np.testing.assert_allclose(gaps[1, 0], [0.5, 1.0, 0.0])
    np.testing.assert_allclose(gaps[1, 1], [1 / 3, 0.5, 0.5])

    def flagged(k):
        return sorted(map(tuple, ill_defined(sv, k)[["layer", "head"]].to_numpy().tolist()))

    assert flagged(1) == [(0, 1)]
    assert flagged(2) == [(0, 0)]
    assert flagged(3) == [(1, 0)]
    assert flagged(4) == [], "k = d_head: no sigma_{k+1}, nothing to flag"
    assert ill_defined(sv, 2)["gap"].iloc[0] == pytest.approx(0.001 / 3)
    # "Below" the threshold: a gap equal to it (1 / 100 = 0.01 exactly in float64) is not
    # flagged, one just below is.
    assert ill_defined(np.array([[[100.0, 99.0]]]), 1).empty
    assert len(ill_defined(np.array([[[100.0, 99.0001]]]), 1)) == 1
    with pytest.raises(ValueError, match="k must be >= 1"):
        ill_defined(sv, 0)
    assert GAP_THRESHOLD == 0.01


def test_ksweep_counts_ill_defined_among_heads():
    vectors, energy, norm2, ffn_sv, sv = _model(4, d_head=4)
    sv[2, 1, 2] = sv[2, 1, 1] * (1 - 1e-4)            # k = 2 ill-defined for (2, 1)
    sv[5, 0, :2] = 1.5                                # k = 1 tie for (5, 0)
    sv[1, 2] = [100.0, 99.0, 50.0, 25.0]              # k = 1 gap exactly 0.01: not below it
    assert gaps_at(sv, 1)[1, 2] == GAP_THRESHOLD

    overlaps, rowspace = _row_spaces(4, d_head=4)

    def table(heads):
        return ksweep_table(vectors[:, heads], energy[:, heads], norm2, sv[:, heads],
                            _record(d_head=4), heads, overlaps, rowspace).set_index("k")

    assert table([1, 2]).loc[2, "n_ill_defined"] == 1
    assert table([1, 2]).loc[1, "n_ill_defined"] == 0, "head 0 is not among the heads"
    assert list(table([0])["n_ill_defined"]) == [1, 0, 0]
    assert list(table([0, 1, 2])["n_ill_defined"]) == [1, 1, 0]
    # The same rule as ill_defined, which the report lists.
    assert list(table([0, 1, 2])["n_ill_defined"]) == [len(ill_defined(sv, k)) for k in (1, 2, 3)]
