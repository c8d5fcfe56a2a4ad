"""The row-space-conditional nulls and the head statistics built on them, on a model whose layers
differ in head size and KV-head count (Gemma 4's layout, :mod:`mixed_heads`): each answer on the
padded whole equals the same function applied layer by layer (or pair by pair) at each layer's
own sizes; for layers of one layout, the uniform code path on an unpadded sub-model. The
similarity null of row spaces of different dimensions is checked by Monte Carlo."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import gaussian_kernel_bases, orthonormal_rows
from mixed_heads import mixed_model

from weight_geometry.alignment import alignment_table
from weight_geometry.crossref import layer_table
from weight_geometry.head_matching import (
    isotropic_weight_null,
    match_heads,
    pairing_groups,
)
from weight_geometry.head_summary import adjacent_by_head, within_layer_similarity
from weight_geometry.multiplicity import pairing_null_exact, pairing_permutation_p
from weight_geometry.nulls import random_weight_bases
from weight_geometry.results_io import load_row_spaces, save_result
from weight_geometry.rowspace_nulls import (
    alignment_null,
    head_pair_null,
    one_head_null,
    rowspace_overlaps,
    same_index_null,
    similarity_null,
)
from weight_geometry.similarity import cross_head_similarity
from weight_geometry.statistics import bottleneck_table

#: Sliding (m 8, 2 KV heads) and full (m 12, 1 KV head) layers, 4 query heads.
SIZES, KV, N_HEADS, K = (8, 12, 8, 12, 8), (2, 1, 2, 1, 2), 4, 3
#: The layers of each layout.
LAYOUTS = ([0, 2, 4], [1, 3])


@pytest.fixture(scope="module")
def mixed():
    """``(model, arrays, layers, overlaps)``: :func:`mixed_heads.mixed_model` and the overlap
    moments of its padded row spaces (as the rowspace_overlap rule computes them)."""
    model, arrays, layers = mixed_model(head_dims=SIZES, kv_heads=KV, n_heads=N_HEADS)
    first = [np.arange(layer["n_kv"]) * (N_HEADS // layer["n_kv"]) for layer in layers]
    bases = np.zeros((len(layers), model["n_kv_heads"], model["d_head"], model["d_model"]),
                     dtype=np.float32)
    for p, (layer, heads) in enumerate(zip(layers, first, strict=True)):
        bases[p, :len(heads), :layer["m"]] = layer["vectors"][heads]
    return model, arrays, layers, rowspace_overlaps(bases)


def _row_space(layer: dict, kv: int) -> np.ndarray:
    """``(m, d)`` float64 basis of KV head ``kv``'s row space, unpadded: the stored vectors of
    its first query head."""
    return layer["vectors"][kv * (N_HEADS // layer["n_kv"])].astype(np.float64)


def _moments(qa: np.ndarray, qb: np.ndarray) -> tuple[float, float]:
    """``t1 = ||Q_a Q_b^T||_F^2``, ``t2 = ||(Q_a Q_b^T)^T (Q_a Q_b^T)||_F^2`` in float64."""
    m = qa @ qb.T
    return float(np.square(m).sum()), float(np.square(m.T @ m).sum())


def _kv(layer: dict, head: int) -> int:
    return head // (N_HEADS // layer["n_kv"])


def _sub_model(model: dict, layer: dict, n_layers: int) -> dict:
    """The uniform ``model.json`` record of ``n_layers`` layers of ``layer``'s layout."""
    return {**{key: model[key] for key in ("d_model", "d_ff", "n_heads")},
            "n_layers": n_layers, "d_head": layer["m"], "n_kv_heads": layer["n_kv"]}


def _sub_overlaps(layers: list[dict], which: list[int]) -> np.ndarray:
    """:func:`rowspace_overlaps` of the unpadded row spaces of the layers ``which`` (one
    layout)."""
    group = N_HEADS // layers[which[0]]["n_kv"]
    return rowspace_overlaps(np.stack([layers[p]["vectors"][::group] for p in which]))


def test_load_row_spaces_takes_each_layers_first_heads_and_zeroes_the_rest(tmp_path, mixed):
    """Two layer ranges on disk; each layer's KV heads' first query heads (heads 0, 2 of a
    sliding layer, head 0 of a full one), zero rows beyond m_p and for the KV head a full layer
    lacks."""
    model, arrays, layers, _ = mixed
    paths = []
    for first, last in ((0, 2), (3, 4)):
        path = tmp_path / f"layers{first:03d}-{last:03d}" / "vectors.npy"
        save_result(path, arrays["vectors"][first:last + 1])
        paths.append(path)
    bases = load_row_spaces(paths[::-1], model)
    assert bases.shape == (5, 2, 12, model["d_model"])
    for p, layer in enumerate(layers):
        for j in range(2):
            if j < layer["n_kv"]:
                np.testing.assert_array_equal(bases[p, j, :layer["m"]],
                                              layer["vectors"][j * (N_HEADS // layer["n_kv"])])
            else:
                assert not bases[p, j].any()
            assert not bases[p, j, layer["m"]:].any()


def test_rowspace_overlaps_of_padded_row_spaces_are_exact(mixed):
    """t1 and t2 of every pair of (layer, KV head) equal those of the unpadded bases, at each
    layer's own size; 0 against a KV head the layer lacks."""
    _, _, layers, overlaps = mixed
    for a, la in enumerate(layers):
        for b, lb in enumerate(layers):
            for p in range(2):
                for q in range(2):
                    if p >= la["n_kv"] or q >= lb["n_kv"]:
                        assert overlaps[0, a, p, b, q] == overlaps[1, a, p, b, q] == 0
                        continue
                    t1, t2 = _moments(_row_space(la, p), _row_space(lb, q))
                    assert overlaps[0, a, p, b, q] == pytest.approx(t1, rel=1e-5)
                    assert overlaps[1, a, p, b, q] == pytest.approx(t2, rel=1e-5)
    assert overlaps[0, 1, 0, 1, 0] == pytest.approx(12, rel=1e-5)   # its own 12 dimensions


@pytest.mark.parametrize(("k", "m_a", "m_b"), [(1, 4, 9), (3, 5, 9), (5, 12, 8)])
def test_similarity_null_of_row_spaces_of_different_sizes_matches_monte_carlo(k, m_a, m_b):
    """Haar k-frames of R^{m_a} and R^{m_b} in two row spaces with spread principal angles:
    the mean and std of sim agree with the closed form to Monte Carlo precision, where taking
    either size for both would not; the formula is symmetric in the two sizes."""
    rng = np.random.default_rng(m_a * m_b + k)
    d, draws = 30, 40_000
    small, large = sorted((m_a, m_b))
    base = orthonormal_rows(rng.standard_normal((large, d)))
    mix = np.linspace(0.0, 3.0, small)[:, None]
    inner = orthonormal_rows(base[:small] * (3.0 - mix) + mix * rng.standard_normal((small, d)))
    qa, qb = (inner, base) if m_a < m_b else (base, inner)
    t1, t2 = _moments(qa, qb)
    mean, std = similarity_null(t1, t2, k, m_a, m_b)
    frames = [orthonormal_rows(rng.standard_normal((draws, k, m))) for m in (m_a, m_b)]
    ua, ub = frames[0] @ qa, frames[1] @ qb
    sims = np.square(ua @ np.swapaxes(ub, 1, 2)).sum((1, 2)) / k
    mean_tol, std_tol = 4 * sims.std() / np.sqrt(draws), 0.03 * sims.std()
    assert abs(mean - sims.mean()) < mean_tol
    assert abs(std - sims.std()) < std_tol
    for m in (m_a, m_b):   # one size for both: off by more than the tolerance
        wrong_mean, wrong_std = similarity_null(t1, t2, k, m)
        assert abs(wrong_mean - sims.mean()) > 3 * mean_tol or \
            abs(wrong_std - sims.std()) > 3 * std_tol
    assert similarity_null(t1, t2, k, m_b, m_a) == (pytest.approx(mean), pytest.approx(std))


def test_similarity_null_with_one_size_given_twice_is_the_one_size_null():
    """``m_b = m_a`` (given, or left out) is the one-size formula, for arrays of sizes too."""
    t1, t2, k = np.array([1.5, 3.0]), np.array([0.9, 2.5]), 2
    sizes = np.array([6, 10])
    both = similarity_null(t1, t2, k, sizes, sizes)
    for i, m in enumerate(sizes):
        one = similarity_null(t1[i], t2[i], k, int(m))
        assert (both[0][i], both[1][i]) == (one[0], one[1])


def test_head_nulls_equal_each_layer_pair_at_its_own_sizes(mixed):
    """head_pair_null and one_head_null: each (layer, head) pair's mean and std equal the
    similarity null of its two KV heads' row spaces at the two layers' own sizes (unpadded
    bases); within one layout, the uniform path on the unpadded sub-model."""
    model, _, layers, overlaps = mixed
    mean, std = head_pair_null(overlaps, K, model)
    assert mean.shape == std.shape == (5, N_HEADS, 5, N_HEADS)
    for a, la in enumerate(layers):
        for b, lb in enumerate(layers):
            for i in range(N_HEADS):
                for j in range(N_HEADS):
                    t1, t2 = _moments(_row_space(la, _kv(la, i)), _row_space(lb, _kv(lb, j)))
                    want = similarity_null(t1, t2, K, la["m"], lb["m"])
                    assert mean[a, i, b, j] == pytest.approx(want[0], rel=1e-5)
                    assert std[a, i, b, j] == pytest.approx(want[1], rel=1e-4)
    for head in range(N_HEADS):
        one = one_head_null(overlaps, K, model, head)
        np.testing.assert_array_equal(one[0], mean[:, head, :, head])
        np.testing.assert_array_equal(one[1], std[:, head, :, head])
    for which in LAYOUTS:
        sub = _sub_model(model, layers[which[0]], len(which))
        uniform = head_pair_null(_sub_overlaps(layers, which), K, sub)
        pick = np.ix_(which, range(N_HEADS), which, range(N_HEADS))
        np.testing.assert_allclose(mean[pick], uniform[0], rtol=1e-5)
        np.testing.assert_allclose(std[pick], uniform[1], rtol=1e-4)


def test_same_index_null_groups_heads_by_both_layers_kv_heads(mixed):
    """Mean: the mean of the heads' pair means. Std bound: within one layout the uniform path
    on the unpadded sub-model (groups = the KV heads); across layouts (2 and 4 heads per KV
    head) the runs of lcm(2, 4) = 4 heads, here all four: (sum of the stds / h)."""
    model, _, layers, overlaps = mixed
    mean, std = same_index_null(overlaps, K, model)
    pair_mean, pair_std = head_pair_null(overlaps, K, model)
    heads = np.arange(N_HEADS)
    np.testing.assert_allclose(mean, pair_mean[:, heads, :, heads].mean(0))
    for which in LAYOUTS:
        sub = _sub_model(model, layers[which[0]], len(which))
        uniform = same_index_null(_sub_overlaps(layers, which), K, sub)
        np.testing.assert_allclose(mean[np.ix_(which, which)], uniform[0], rtol=1e-5)
        np.testing.assert_allclose(std[np.ix_(which, which)], uniform[1], rtol=1e-4)
    for a in LAYOUTS[0]:
        for b in LAYOUTS[1]:
            bound = pair_std[a, heads, b, heads].sum() / N_HEADS
            assert std[a, b] == pytest.approx(bound) and std[b, a] == pytest.approx(bound)


def test_same_index_std_bound_holds_across_layouts_by_monte_carlo():
    """Layer a (4 heads on 2 KV heads, m 8) against layer b (1 KV head, m 12) whose row space
    holds 4 directions of both of a's: each head drawn in its own KV head's row space, the heads
    of one KV head sharing their draw in each layer (as correlated as heads can be), so a's two
    KV heads' similarities move together through b's draw. The lcm-run bound covers the std of
    same-index; grouping by a's KV heads alone (independent across them) falls short."""
    rng = np.random.default_rng(5)
    d, draws = 40, 20_000
    model = {"n_layers": 2, "d_model": d, "n_heads": N_HEADS, "d_head": 12, "n_kv_heads": 2,
             "head_dims": [8, 12], "kv_heads": [2, 1]}
    frame = orthonormal_rows(rng.standard_normal((24, d)))          # orthonormal directions
    shared, rest = frame[:4], frame[4:]
    a_spaces = [np.vstack([shared, rest[4 * j:4 * j + 4]]) for j in range(2)]
    b_space = np.vstack([shared, rest[8:16]])
    spaces = np.zeros((2, 2, 12, d))
    spaces[0, :, :8], spaces[1, 0] = a_spaces, b_space
    overlaps = rowspace_overlaps(spaces)
    b_frame = orthonormal_rows(rng.standard_normal((draws, K, 12))) @ b_space
    per_kv = []
    for space in a_spaces:
        a_frame = orthonormal_rows(rng.standard_normal((draws, K, 8))) @ space
        per_kv.append(np.square(a_frame @ np.swapaxes(b_frame, 1, 2)).sum((1, 2)) / K)
    values = 2 * (per_kv[0] + per_kv[1]) / N_HEADS
    mean, std = same_index_null(overlaps, K, model)
    pair_std = np.diagonal(head_pair_null(overlaps, K, model)[1][0, :, 1, :])
    by_a_alone = np.sqrt(sum(pair_std[2 * j:2 * j + 2].sum() ** 2 for j in range(2))) / N_HEADS
    assert mean[0, 1] == pytest.approx(values.mean(), abs=4 * values.std() / np.sqrt(draws))
    assert values.std() <= std[0, 1]
    assert by_a_alone < 0.95 * values.std()


def test_head_tables_take_each_layers_kv_heads_and_sizes(mixed):
    """adjacent_by_head: each head's KV head in its layer, and the conditional null of the two
    KV heads' row spaces at the two layers' sizes; within_layer_similarity: heads grouped by
    their own layer's KV heads, the shared-row-space null k / m_l, no other-KV pairs in a layer
    with one KV head; match_heads' table: the nulls of rowspace_nulls, multiplicity (per-pair
    blocks) and the isotropic null by layouts."""
    model, arrays, layers, overlaps = mixed
    sims = cross_head_similarity(arrays["vectors"][:, :, :K])
    adjacent = adjacent_by_head(sims, overlaps, K, model)
    for row in adjacent.itertuples():
        la, lb = layers[row.layer], layers[row.layer + 1]
        assert row.kv_head == _kv(la, row.head)
        t1, t2 = _moments(_row_space(la, _kv(la, row.head)), _row_space(lb, _kv(lb, row.head)))
        want = similarity_null(t1, t2, K, la["m"], lb["m"])
        assert row.conditional_mean == pytest.approx(want[0], rel=1e-5)
        assert row.conditional_std == pytest.approx(want[1], rel=1e-4)
        assert row.adjacent_similarity == sims[row.layer, row.head, row.layer + 1, row.head]
    within = within_layer_similarity(sims, overlaps, K, model).set_index("layer")
    for p, layer in enumerate(layers):
        kv = [_kv(layer, i) for i in range(N_HEADS)]
        same = [sims[p, i, p, j] for i in range(N_HEADS) for j in range(N_HEADS)
                if i != j and kv[i] == kv[j]]
        other = [sims[p, i, p, j] for i in range(N_HEADS) for j in range(N_HEADS)
                 if kv[i] != kv[j]]
        assert within.loc[p, "same_kv_mean"] == pytest.approx(np.mean(same))
        assert within.loc[p, "same_kv_conditional_mean"] == pytest.approx(K / layer["m"])
        if layer["n_kv"] == 1:
            assert np.isnan(within.loc[p, "other_kv_mean"])
        else:
            assert within.loc[p, "other_kv_mean"] == pytest.approx(np.mean(other))
    _, _, table, _ = match_heads(arrays["vectors"][:, :, :K], K, model, overlaps, n_perm=50)
    a, b = table["layer_a"].to_numpy(), table["layer_b"].to_numpy()
    cond_mean, cond_std = same_index_null(overlaps, K, model)
    pair_mean, pair_std = pairing_null_exact(sims, pairing_groups(model))
    iso = isotropic_weight_null(model, K)
    for column, matrix in (("conditional_mean", cond_mean), ("conditional_std", cond_std),
                           ("random_pairing_mean", pair_mean),
                           ("random_pairing_std", pair_std),
                           *((name, value) for name, value in iso.items())):
        np.testing.assert_allclose(table[column], matrix[a, b], rtol=1e-12, err_msg=column)


def test_layer_table_takes_each_layers_sizes(mixed):
    """crossref.layer_table of head 2 (KV head 1 of a sliding layer, 0 of a full one): the
    adjacent conditional null of the two layers' own KV heads at their own sizes, the
    bottleneck's that head's null, and the relative gap from each layer's own singular values
    (NaN at k = 8 where the layer has 8 of them, defined where it has 12)."""
    model, arrays, layers, overlaps = mixed
    head, n = 2, len(layers)
    sims = cross_head_similarity(arrays["vectors"][:, :, :K])
    same = {i: sims[:, i, :, i] for i in range(N_HEADS)}
    ranks = pd.DataFrame([(p, name, "48x48", 10.0 + p) for p in range(n)
                          for name in ("W_Q", "W_K")],
                         columns=["layer_idx", "weight_type", "shape", "eff_rank"])
    nulls = {i: one_head_null(overlaps, K, model, i) for i in same}
    bottleneck = bottleneck_table(same, ranks, 1, nulls)
    alignment = alignment_table(arrays["ffn_input_energy"], arrays["ffn_input_norm2"],
                                np.ones((n, model["d_model"])),
                                arrays["ffn_input_rowspace_eigenvalues"], K, model, "W_gate")
    args = (ranks, same[head], np.eye(n), bottleneck, alignment, arrays["singular_values"],
            head)
    table = layer_table(*args, K, model, overlaps)
    for p in range(n - 1):
        la, lb = layers[p], layers[p + 1]
        t1, t2 = _moments(_row_space(la, _kv(la, head)), _row_space(lb, _kv(lb, head)))
        want = similarity_null(t1, t2, K, la["m"], lb["m"])
        assert table["adjacent_conditional_mean"][p] == pytest.approx(want[0], rel=1e-5)
        assert table["adjacent_conditional_std"][p] == pytest.approx(want[1], rel=1e-4)
    np.testing.assert_array_equal(table["bottleneck_conditional_mean"], nulls[head][0][1])
    sigma = [layer["singular_values"][head] for layer in layers]
    np.testing.assert_allclose(table["relative_gap"],
                               [(s[K - 1] - s[K]) / s[K - 1] for s in sigma])
    at_8 = layer_table(*args, 8, model, overlaps)["relative_gap"].to_numpy()
    for p, s in enumerate(sigma):
        if layers[p]["m"] == 8:
            assert np.isnan(at_8[p])
        else:
            assert at_8[p] == pytest.approx((s[7] - s[8]) / s[7])


def test_alignment_null_takes_each_layers_own_eigenvalues(mixed):
    """Padded eigenvalues (NaN beyond m_p and for a missing KV head): each layer's null equals
    the one-layer null of its unpadded eigenvalues at its own size; ceiling and floor are its
    own top-k and bottom-k; head i reads KV head i // (h / n_kv_p)."""
    model, arrays, layers, _ = mixed
    eig, norm2 = arrays["ffn_input_rowspace_eigenvalues"], arrays["ffn_input_norm2"]
    assert np.isnan(eig).any()
    null = alignment_null(eig, norm2, K, model)
    for p, layer in enumerate(layers):
        own = layer["ffn_input_rowspace_eigenvalues"]                      # (n_kv_p, m_p)
        alone = alignment_null(own[None], norm2[p:p + 1], K, _sub_model(model, layer, 1))
        mu = np.sort(own, axis=-1)
        for i in range(N_HEADS):
            j = _kv(layer, i)
            for name in ("chance", "std", "ceiling", "floor"):
                assert null[name][p, i] == pytest.approx(alone[name][0, i], rel=1e-12), name
            assert null["chance"][p, i] == pytest.approx(K / layer["m"] * mu[j].sum() / norm2[p])
            assert null["ceiling"][p, i] == pytest.approx(mu[j, -K:].sum() / norm2[p])
            assert null["floor"][p, i] == pytest.approx(mu[j, :K].sum() / norm2[p])
    for name, value in null.items():
        assert np.isfinite(value).all(), name


def test_alignment_table_rows_by_layer_use_their_layers_sizes(mixed):
    """``layers`` (an expert table's rows): each row's conditional columns are its layer's."""
    model, arrays, _, _ = mixed
    args = [arrays[name] for name in ("ffn_input_energy", "ffn_input_norm2")]
    spectra = np.ones((5, model["d_model"]))
    whole = alignment_table(*args, spectra, arrays["ffn_input_rowspace_eigenvalues"], K, model,
                            "W_gate")
    rows = np.array([3, 0, 3, 4])
    picked = alignment_table(*(a[rows] for a in args), spectra[rows],
                             arrays["ffn_input_rowspace_eigenvalues"][rows], K, model, "W_gate",
                             layers=rows)
    columns = ["alignment", "conditional_chance", "conditional_std", "conditional_ceiling",
               "conditional_floor", "conditional_z"]
    for row, layer in enumerate(rows):
        got = picked[picked["layer"] == row].set_index("head")[columns]
        want = whole[whole["layer"] == layer].set_index("head")[columns]
        np.testing.assert_allclose(got.to_numpy(), want.to_numpy())


def test_random_weight_bases_draw_each_layer_at_its_own_sizes():
    """One call over mixed layers equals one call per layer from the same generator, and the
    heads of one KV head span exactly that layer's m_p dimensions."""
    n_kv, sizes, d, k = [2, 1, 2], [8, 12, 8], 48, 3
    whole = random_weight_bases(np.random.default_rng(4), N_HEADS, n_kv, sizes, d, k)
    rng = np.random.default_rng(4)
    for p in range(3):
        alone = random_weight_bases(rng, N_HEADS, n_kv[p:p + 1], sizes[p:p + 1], d, k)
        np.testing.assert_array_equal(whole[p], alone[0])
        group = N_HEADS // n_kv[p]
        span = whole[p, :group].reshape(group * k, d)
        assert np.linalg.matrix_rank(span, tol=1e-4) == min(group * k, sizes[p])


def test_isotropic_weight_null_by_pair_of_layouts(mixed):
    """Each layer pair gets the null of its two layouts: constant over pairs of the same
    layouts; the pairs within the first layout drawn are the uniform model's own null (the
    same draws, to float32 products of other sizes)."""
    model, _, layers, _ = mixed
    null = isotropic_weight_null(model, K, n_layers=6)
    kind = np.array([0, 1, 0, 1, 0])            # (8, 2) sorts before (12, 1)
    for name, value in null.items():
        assert value.shape == (5, 5)
        for u in range(2):
            for v in range(2):
                block = value[np.ix_(kind == u, kind == v)]
                assert np.all(block == block.flat[0]), name
    sliding = isotropic_weight_null(_sub_model(model, layers[0], 3), K, n_layers=6)
    for name, value in null.items():
        assert value[0, 2] == pytest.approx(sliding[name][0, 1], rel=1e-6), name
    np.testing.assert_allclose(null["isotropic_mean"], K / model["d_model"])
    assert null["best_match_null_mean"][0, 1] != null["best_match_null_mean"][0, 2]


def _random_mixed(seed: int, n_heads: int, kv: tuple[int, int], sizes: tuple[int, int],
                  n_layers: int, d: int = 40) -> tuple[dict, np.ndarray, np.ndarray]:
    """A model record, the ``(L, h, K, d)`` top-K kernel bases of Gaussian weights (the
    library's kernels), layers alternating between two layouts, and the overlap moments of
    their padded row spaces."""
    rng = np.random.default_rng(seed)
    model = {"n_layers": n_layers, "d_model": d, "n_heads": n_heads,
             "d_head": max(sizes), "n_kv_heads": max(kv),
             "head_dims": [sizes[p % 2] for p in range(n_layers)],
             "kv_heads": [kv[p % 2] for p in range(n_layers)]}
    per = [gaussian_kernel_bases(rng, n_layers // 2, n_heads, n, m, d, m)
           for n, m in zip(kv, sizes, strict=True)]
    spaces = np.zeros((n_layers, max(kv), max(sizes), d))
    for p in range(n_layers):
        full, n_kv = per[p % 2][p // 2], kv[p % 2]
        spaces[p, :n_kv, :sizes[p % 2]] = full[::n_heads // n_kv]
    bases = np.stack([per[p % 2][p // 2][:, :K] for p in range(n_layers)])
    return model, bases, rowspace_overlaps(spaces)


def test_pairing_null_takes_each_pairs_grouping():
    """pairing_groups: the coarser layer's heads per KV head; the pairing moments and p of each
    layer pair equal those computed with that pair's block size alone (exact and Monte Carlo),
    with 6 heads on 3 and 2 KV heads (groupings 2 and 3 that do not nest)."""
    model, bases, _ = _random_mixed(0, 6, (3, 2), (6, 8), 4)
    sims = cross_head_similarity(bases)
    groups = pairing_groups(model)
    np.testing.assert_array_equal(groups, [[2, 3, 2, 3], [3, 3, 3, 3], [2, 3, 2, 3],
                                           [3, 3, 3, 3]])
    mean, std = pairing_null_exact(sims, groups)
    exact = pairing_permutation_p(sims, group=groups)
    drawn = pairing_permutation_p(sims, n_perm=300, seed=2, max_exact=1, group=groups)
    for a in range(4):
        for b in range(4):
            g = int(groups[a, b])
            one = pairing_null_exact(sims, g)
            assert (mean[a, b], std[a, b]) == (one[0][a, b], one[1][a, b])
            assert exact[a, b] == pairing_permutation_p(sims, group=g)[a, b]
            assert drawn[a, b] == pairing_permutation_p(sims, n_perm=300, seed=2, max_exact=1,
                                                        group=g)[a, b]


def test_pairing_null_is_exact_for_random_weights_of_two_layouts():
    """Gaussian weights, layers alternating between 8 heads on 2 KV heads (m 8) and on 4 (m
    6). Where the orderings leave the law of ``S[a, :, b, :]`` unchanged, same-index is
    exchangeable with every ``T_pi`` and its z against their exact moments has ``E[z^2] = 1``
    exactly: so over the 400 pairs across layouts with the coarser layer's blocks
    (match_heads' table), not with all orderings, which mix one layer's KV heads."""
    model, bases, overlaps = _random_mixed(3, 8, (2, 4), (8, 6), 40)
    _, _, table, sims = match_heads(bases, K, model, overlaps, n_perm=20)
    across = ((table["layer_a"] + table["layer_b"]) % 2 == 1).to_numpy()
    z = table["z_same_index_vs_pairing"].to_numpy()[across]
    assert 0.85 < np.mean(np.square(z)) < 1.12
    a, b = table["layer_a"].to_numpy()[across], table["layer_b"].to_numpy()[across]
    mean, std = pairing_null_exact(sims)
    mixing = (table["same_index"].to_numpy()[across] - mean[a, b]) / std[a, b]
    assert np.mean(np.square(mixing)) > 1.15
