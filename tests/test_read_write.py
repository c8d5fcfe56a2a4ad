"""read_write: the overlap of each head's top-k write subspace with every later head's top-k
read subspaces, against the formed d x d maps' SVDs in float64; its nulls by Monte Carlo; a
planted circuit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import haar_bases, naive_kernel, orthonormal_rows
from test_lib_composition import factors, random_weights

from weight_geometry.composition import TYPES
from weight_geometry.errors import UserError
from weight_geometry.multiplicity import FDR_Q
from weight_geometry.read_write import (
    COLUMNS,
    ReadSides,
    check_k,
    haar_similarities,
    max_null,
    read_write,
    table_rows,
)
from weight_geometry.similarity import null_std


def sides_of(weights, h, n_kv, d_head) -> ReadSides:
    c = factors(weights, h, n_kv, d_head)
    return ReadSides(c.query, c.key, c.read, c.write, n_kv)


def naive_sides(weights, h, d_head):
    """Per layer and head, by full float64 SVDs of the formed maps: the write vectors (left
    singular vectors of W_OV, rows), the read vectors of each type (q: left of W_QK; k: right
    of W_QK; v: right of W_OV) and each read side's row space (rows of W_Q_i, W_K_j, W_V_j)."""
    out = []
    for w in weights:
        layer = []
        for i in range(h):
            u_qk, _, vt_qk = np.linalg.svd(naive_kernel(w["W_Q"], w["W_K"], i, d_head))
            u_ov, _, vt_ov = np.linalg.svd(naive_kernel(w["W_O"].T, w["W_V"], i, d_head))
            kv = i // (h // (len(w["W_K"]) // d_head))
            spaces = [orthonormal_rows(x[r * d_head:(r + 1) * d_head]) for x, r in
                      ((w["W_Q"], i), (w["W_K"], kv), (w["W_V"], kv))]
            layer.append({"write": u_ov.T, "read": [u_qk.T, vt_qk, vt_ov], "spaces": spaces})
        out.append(layer)
    return out


@pytest.mark.parametrize("d,h,n_kv,d_head,k", [(24, 4, 2, 5, 3), (20, 3, 3, 4, 2),
                                               (18, 4, 1, 5, 5)])
def test_overlap_matches_formed_maps(d, h, n_kv, d_head, k):
    """Every ordered head pair and type (GQA, MHA, MQA; k < d_head and k = d_head): the
    overlap, its layer means and best matches, and the conditional null's pair means equal
    those of the formed maps' float64 SVDs; NaN exactly where the layer is not earlier."""
    rng = np.random.default_rng(d + h + k)
    weights = random_weights(rng, 3, d, h, n_kv, d_head)
    rw = read_write(sides_of(weights, h, n_kv, d_head), k)
    ref = naive_sides(weights, h, d_head)
    expect = np.full((3, 3, h, 3, h), np.nan)
    expect_mean = np.full_like(expect, np.nan)
    for b in range(3):
        for a in range(b):
            for i in range(h):
                for j in range(h):
                    w = ref[a][j]["write"][:k]
                    for t in range(3):
                        x = ref[b][i]["read"][t][:k]
                        expect[t, b, i, a, j] = np.square(x @ w.T).sum() / k
                        q = ref[b][i]["spaces"][t]
                        expect_mean[t, b, i, a, j] = np.square(q @ w.T).sum() / d_head
    np.testing.assert_array_equal(np.isnan(rw.overlap), np.isnan(expect))
    np.testing.assert_allclose(rw.overlap, expect, atol=2e-5, equal_nan=True)
    np.testing.assert_allclose(rw.pair_mean, expect_mean, atol=2e-5, equal_nan=True)
    np.testing.assert_allclose(rw.mean, expect.mean(axis=(2, 4)), atol=2e-5, equal_nan=True)
    np.testing.assert_allclose(rw.best_match, expect.max(axis=2).mean(axis=-1), atol=2e-5,
                               equal_nan=True)
    if k == d_head:   # the read subspace is the whole row space: the conditional null is exact
        np.testing.assert_allclose(rw.conditional_mean, rw.mean, atol=2e-5, equal_nan=True)
        assert np.nanmax(rw.conditional_std) < 1e-6


def test_nulls_by_monte_carlo():
    """Both nulls of a layer pair's mean and the conditional null of each pair, by drawing the
    later heads' read subspaces (Haar in R^d; Haar in their own row space, independently per
    head) against the earlier layer's fixed writes: means within 4 standard errors, stds
    within 8 %; on the key and value sides the layer mean's std is the bound that counts the
    g heads of a KV head as perfectly correlated, sqrt(g) times that of independent heads."""
    d, h, n_kv, d_head, k = 16, 4, 2, 4, 2
    rng = np.random.default_rng(3)
    weights = random_weights(rng, 2, d, h, n_kv, d_head)
    rw = read_write(sides_of(weights, h, n_kv, d_head), k)
    ref = naive_sides(weights, h, d_head)
    writes = np.stack([ref[0][j]["write"][:k] for j in range(h)])              # (h, k, d)
    n = 4000
    for t in range(3):
        spaces = np.stack([ref[1][i]["spaces"][t] for i in range(h)])          # (h, m, d)
        frames = haar_bases(rng, (n, h), k, d_head)                            # (n, h, k, m)
        conditional = np.einsum("nikm,imd,jld->nijkl", frames, spaces, writes)
        iso = np.einsum("nikd,jld->nijkl", haar_bases(rng, (n, h), k, d), writes)
        for draws, mean, std in ((conditional, rw.conditional_mean[t, 1, 0],
                                  rw.conditional_std[t, 1, 0]),
                                 (iso, k / d, rw.isotropic_std[t, 1, 0])):
            layer_means = np.square(draws).sum((-1, -2)).mean((1, 2)) / k
            assert abs(layer_means.mean() - mean) < 4 * std / np.sqrt(n), (t, mean)
            bound = np.sqrt(1 if t == 0 else h // n_kv)
            np.testing.assert_allclose(bound * layer_means.std(), std, rtol=0.08)
        pairs = np.square(conditional).sum((-1, -2)) / k                       # (n, h, h)
        assert np.all(np.abs(pairs.mean(0) - rw.pair_mean[t, 1, :, 0]) <
                      4 * rw.pair_std[t, 1, :, 0] / np.sqrt(n))
        np.testing.assert_allclose(pairs.std(0), rw.pair_std[t, 1, :, 0], rtol=0.08)


@pytest.mark.parametrize("k,d", [(3, 40), (4, 6)])
def test_haar_similarities(k, d):
    """The Bartlett (d - k >= k) and the Gaussian-factor draws of sim for a Haar k-subspace:
    mean k/d and std similarity.null_std (exact) within 4 standard errors and 5 %; the
    maximum of h draws beside the same maximum of QR-orthonormalized Gaussian frames."""
    rng = np.random.default_rng(k + d)
    draws = haar_similarities(k, d, 40_000, rng)
    std = null_std(k, d)
    assert abs(draws.mean() - k / d) < 4 * std / np.sqrt(len(draws))
    np.testing.assert_allclose(draws.std(), std, rtol=0.05)
    direct = np.square(haar_bases(rng, (8000, 3), k, d)[..., :k]).sum((-1, -2)) / k
    mean, spread = max_null(k, d, 3)
    assert abs(direct.max(1).mean() - mean) < 4 * spread / np.sqrt(8000)
    np.testing.assert_allclose(direct.max(1).std(), spread, rtol=0.06)


def test_planted_write_into_a_key_read_subspace():
    """Layer 0 head 1 writes (its W_O columns, 10x the norm of the others) into the top-k key read
    subspace of layer 2 head 2: that pair's overlap is the largest of all (1 to rounding), its
    layer pair's K row is significant against both nulls after BH and the only row significant
    against the isotropic one. (Against the conditional null, K of layers 1 -> 2 also has
    adjusted p 0.004 here: its observed mean is a 1-in-800 draw of that null, checked by
    Monte Carlo, which test_nulls_by_monte_carlo validates.)"""
    d, h, n_kv, d_head, k = 64, 4, 2, 8, 2
    rng = np.random.default_rng(11)
    weights = random_weights(rng, 3, d, h, n_kv, d_head)
    keys = naive_sides(weights, h, d_head)[2][2]["read"][1][:k]                # (k, d)
    weights[0]["W_O"][:, d_head:d_head + k] = 10 * np.sqrt(d) * keys.T
    rw = read_write(sides_of(weights, h, n_kv, d_head), k)
    where = np.unravel_index(np.nanargmax(rw.overlap), rw.overlap.shape)
    assert tuple(map(int, where)) == (1, 2, 2, 0, 1)
    assert rw.overlap[where] > 0.99
    rows = [dict(zip(COLUMNS, row, strict=True)) for row in table_rows(rw)]
    assert len(rows) == 3 * 3
    significant = [(r["type"], r["layer"], r["earlier_layer"]) for r in rows
                   if r["p_adjusted"] <= FDR_Q]
    assert significant == [("k", 2, 0)]
    planted = [r for r in rows if (r["type"], r["layer"], r["earlier_layer"]) == ("k", 2, 0)][0]
    assert planted["significant_conditional"] and planted["conditional_ratio"] > 2
    assert (planted["max_head"], planted["max_earlier_head"]) == (2, 1)
    assert planted["max_conditional_z"] > 3 and planted["best_match_ratio"] > 1.5
    assert [r["type"] for r in rows] == [t for t in TYPES for _ in range(3)]


def test_k_outside_the_head_is_one_line():
    with pytest.raises(UserError, match=r"top_k = 9 is outside 1 \.\. d_head = 8"):
        check_k(9, 8)


def _layer_pairs(n_layers):
    later, earlier = np.tril_indices(n_layers, -1)
    return later, earlier


def test_locality_rho_is_spearmans_and_a_local_plant_is_found():
    """rho equals scipy's Spearman of the values with the layer distance; values falling with
    distance plus noise give rho < 0 and the smallest p the shuffles allow."""
    from scipy.stats import spearmanr

    from weight_geometry.circuits_report import locality_test

    later, earlier = _layer_pairs(12)
    rng = np.random.default_rng(0)
    values = 1.0 / (later - earlier) + 0.05 * rng.standard_normal(len(later))
    rho, p, n = locality_test(later, earlier, values, n_perm=999)
    assert rho == pytest.approx(spearmanr(values, later - earlier).statistic, abs=1e-12)
    assert rho < -0.5 and p == pytest.approx(1 / 1000) and n == len(later)


def test_locality_null_keeps_each_later_layers_level():
    """A later-layer effect alone (values depend on the reading layer only, which a global
    permutation of layer pairs would call a distance trend) is no locality: p = 1; pure noise
    gives p-values spread over (0, 1] (5 seeds: none below 0.01)."""
    from weight_geometry.circuits_report import locality_test

    later, earlier = _layer_pairs(10)
    rho, p, _ = locality_test(later, earlier, later.astype(float), n_perm=500)
    assert abs(rho) > 0.3 and p == 1.0
    ps = [locality_test(later, earlier, np.random.default_rng(s).random(len(later)),
                        n_perm=500, seed=s)[1] for s in range(5)]
    assert min(ps) > 0.01 and max(ps) > 0.2, ps


def circuit_tables(weights, h, n_kv, d_head, k):
    """The three tables the report reads, from the library's own rows (as the jobs write
    them)."""
    from weight_geometry.circuits_report import CircuitTables
    from weight_geometry.composition import (
        LAYER_COLUMNS,
        TOP_COLUMNS,
        composition,
        conditional_tests,
        isotropic_null,
        layer_rows,
        pair_tests,
        top_pairs,
    )

    c = factors(weights, h, n_kv, d_head)
    comp = composition(c)
    null = isotropic_null(c.shape[-1], d_head)
    tests = {**pair_tests(comp.scores, null), **conditional_tests(comp, c)}
    frame = lambda rows, columns: pd.DataFrame(rows, columns=list(columns))  # noqa: E731
    return CircuitTables(
        frame(layer_rows(comp.scores, tests, h), LAYER_COLUMNS),
        frame(top_pairs(comp.scores, tests, null, h), TOP_COLUMNS),
        frame(table_rows(read_write(sides_of(weights, h, n_kv, d_head), k)), COLUMNS))


@pytest.mark.parametrize("plant", [False, True])
def test_circuits_finding_at_chance_and_planted(plant):
    """The section's finding: random weights read as chance (no family departs from its null);
    layer 0 head 1 writing 10x into layer 2 head 2's top-k key directions is named as the
    strongest K-composition, and the read/write row of those layers is above its null. The
    section renders with its three tables and figures."""
    from weight_geometry.circuits_report import circuit_findings, finding, section
    from weight_geometry.verdicts import AT_CHANCE

    d, h, n_kv, d_head, k = 64, 4, 2, 8, 2
    weights = random_weights(np.random.default_rng(21), 3, d, h, n_kv, d_head)
    if plant:
        keys = naive_sides(weights, h, d_head)[2][2]["read"][1][:k]
        weights[0]["W_O"][:, d_head:d_head + k] = 10 * np.sqrt(d) * keys.T
    tables = circuit_tables(weights, h, n_kv, d_head, k)
    f = circuit_findings(tables, n_perm=200)
    line = finding(tables, f)
    assert f.at_chance() is not plant and (AT_CHANCE in line) is not plant, line
    if plant:
        assert "strongest K-composition L2.H2 ← L0.H1" in line, line
        assert f.read_write["k"].n_above >= 1
    text = "\n".join(section(tables, f, k, line))
    assert text.count("| Q ") >= 1 and text.count("![") == 3
    assert [name for name, _ in f.families()][-1].startswith("Locality of composition")
