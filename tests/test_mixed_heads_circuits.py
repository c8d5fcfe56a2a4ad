"""Circuits of a model whose layers differ in head size and KV-head count (Gemma 4's layout,
:mod:`mixed_heads`: sizes 8, 12, 8, 12, 8 with 2, 1, 2, 1, 2 KV heads, padded to 12): every
composition score, read/write overlap and null on the padded whole equals the same computed on
each pair of layers unpadded at their own sizes (equal sizes: the uniform code on that
two-layer sub-model; different sizes: the formulas from the unpadded factors, and the formed
``d x d`` maps); the conditional nulls by Monte Carlo within each layer's own row space, with
a tolerance that rejects the padded width; padded rows are never read."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import haar_bases, naive_kernel
from mixed_heads import mixed_model
from test_lib_composition import haar
from test_read_write import naive_sides

from weight_geometry.composition import (
    NULL_COLUMNS,
    SIZED_NULL_COLUMNS,
    TOP_COLUMNS,
    TYPES,
    Circuits,
    composition,
    conditional_tests,
    isotropic_null,
    isotropic_nulls,
    load_circuits,
    null_rows,
    null_table,
    random_circuits,
    write_composition,
)
from weight_geometry.errors import UserError
from weight_geometry.head_layout import head_dims, kv_heads
from weight_geometry.multiplicity import quadratic_form_p
from weight_geometry.read_write import ReadSides, check_k, load_sides, read_write
from weight_geometry.results_io import chunk_dir_name

#: The stored file behind each factor the circuits read.
FILES = {"query": "query_vectors", "key": "vectors", "qk_sigma": "singular_values",
         "write": "ov_write_vectors", "read": "ov_read_vectors",
         "ov_sigma": "ov_singular_values"}
#: Per type, the later head's read vectors and the weights of its map (module composition).
SIDES = (("query_vectors", "singular_values"), ("vectors", "singular_values"),
         ("ov_read_vectors", "ov_singular_values"))
K = 3


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """The mixed model, its arrays stored as two layer ranges and loaded by the jobs'
    loaders from its ``model.json`` record."""
    model, arrays, layers = mixed_model()
    root = tmp_path_factory.mktemp("bases")
    paths = {name: [] for name in FILES}
    for first, last in ((0, 2), (3, 4)):
        directory = root / chunk_dir_name(first, last)
        directory.mkdir()
        for name, stored in FILES.items():
            np.save(directory / f"{stored}.npy", arrays[stored][first:last + 1])
            paths[name].append(directory / f"{stored}.npy")
    inputs = SimpleNamespace(**paths)
    return SimpleNamespace(model=model, arrays=arrays, layers=layers,
                           circuits=load_circuits(inputs, model),
                           sides=load_sides(inputs, model), h=model["n_heads"],
                           d=model["d_model"], sizes=head_dims(model))


def layer_pairs(n_layers):
    return [(int(b), int(a)) for b, a in zip(*np.tril_indices(n_layers, -1), strict=True)]


def sub_circuits(layers, picks) -> Circuits:
    """The layers ``picks`` (one head size and KV count) unpadded, as a uniform model."""
    return Circuits(*(np.stack([layers[p][FILES[name]] for p in picks]) for name in FILES),
                    n_kv_heads=layers[picks[0]]["n_kv"])


def sub_sides(layers, picks) -> ReadSides:
    c = sub_circuits(layers, picks)
    return ReadSides(c.query, c.key, c.read, c.write, c.n_kv_heads)


def test_loaders_take_the_per_layer_sizes_from_the_record(mixed):
    """load_circuits and load_sides concatenate the layer ranges and carry model.json's
    per-layer head sizes and KV-head counts (query heads per KV head 2, 4, 2, 4, 2)."""
    for loaded in (mixed.circuits, mixed.sides):
        sizes, groups = loaded.layout()
        assert sizes.tolist() == [8, 12, 8, 12, 8] and groups.tolist() == [2, 4, 2, 4, 2]
    np.testing.assert_array_equal(mixed.circuits.write, mixed.arrays["ov_write_vectors"])
    np.testing.assert_array_equal(mixed.sides.key, mixed.arrays["vectors"])


def direct_composition(later: dict, earlier: dict) -> np.ndarray:
    """``(3 [score, conditional mean, conditional std of score^2], 3 types, h, h)`` of one
    layer pair from the unpadded factors in float64: ``M = X_l A_e^T diag(t_e)`` (``m_l x
    m_e``), ``N = M M^T``, score^2 = ``sum_a w_a^2 N_aa / (|w|^2 |t|^2)``, conditional mean
    ``sum(w^2) tr N / m_l``, variance ``2 sum (w^2 - mean)^2 (tr N^2 - (tr N)^2 / m_l) /
    ((m_l - 1)(m_l + 2))``, both over the norms' product (squared for the variance)."""
    m = later["m"]
    write = earlier["ov_write_vectors"].astype(np.float64)
    t = earlier["ov_singular_values"]
    out = np.empty((3, 3, len(write), len(write)))
    for kind, (vectors, sigma) in enumerate(SIDES):
        weights = np.square(later[sigma])                                   # (h, m_l)
        core = (np.einsum("iad,jbd->ijab", later[vectors].astype(np.float64), write)
                * t[None, :, None])                                          # M (h, h, m, m_e)
        gram = core @ np.swapaxes(core, -1, -2)                              # N (h, h, m, m)
        trace = np.trace(gram, axis1=-2, axis2=-1)
        scale = weights.sum(-1)[:, None] * np.square(t).sum(-1)[None, :]
        spread = np.square(weights - weights.mean(-1, keepdims=True)).sum(-1)[:, None]
        out[0, kind] = np.sqrt(np.einsum("ia,ijaa->ij", weights, gram) / scale)
        out[1, kind] = weights.sum(-1)[:, None] * trace / m / scale
        out[2, kind] = np.sqrt(2 * spread * (np.square(gram).sum((-1, -2)) - trace**2 / m)
                               / ((m - 1) * (m + 2))) / scale
    return out


def test_composition_equals_each_layer_pair_at_its_own_sizes(mixed):
    """Scores and the conditional null's mean and std of every head pair of every layer pair:
    for equal sizes those of the uniform code on the two layers unpadded; for all pairs the
    direct formulas from the unpadded factors; the scores also those of the formed maps
    (``||W_QK_l^T W_OV_e||`` etc., float64 from the weights at their own sizes)."""
    comp = composition(mixed.circuits)
    h, layers = mixed.h, mixed.layers
    blocks = np.stack([comp.scores, comp.conditional_mean, comp.conditional_std]
                      ).reshape(3, 3, 5, h, 5, h)
    assert np.isnan(blocks[:, :, np.triu_indices(5)[0], :, np.triu_indices(5)[1]]).all()
    for later, earlier in layer_pairs(5):
        got = blocks[:, :, later, :, earlier, :]
        if layers[later]["m"] == layers[earlier]["m"]:
            sub = composition(sub_circuits(layers, [earlier, later]))
            ref = np.stack([sub.scores, sub.conditional_mean, sub.conditional_std])
            np.testing.assert_allclose(got, ref[:, :, h:, :h], rtol=1e-6)
        np.testing.assert_allclose(got, direct_composition(layers[later], layers[earlier]),
                                   rtol=2e-5, err_msg=str((later, earlier)))
        w_l, w_e = layers[later], layers[earlier]
        for i, j in np.ndindex(h, h):
            qk = naive_kernel(w_l["W_Q"], w_l["W_K"], i, w_l["m"])
            ov_l = naive_kernel(w_l["W_O"].T, w_l["W_V"], i, w_l["m"])
            ov_e = naive_kernel(w_e["W_O"].T, w_e["W_V"], j, w_e["m"])
            for kind, x in enumerate((qk.T, qk, ov_l)):
                ref = np.linalg.norm(x @ ov_e) / (np.linalg.norm(x) * np.linalg.norm(ov_e))
                assert got[0, kind, i, j] == pytest.approx(ref, rel=1e-5)


def padded_with_nan(arrays: dict, sizes) -> dict:
    """The stored vectors with NaN in every padded row (beyond each layer's head size)."""
    out = dict(arrays)
    for name in ("vectors", "query_vectors", "ov_write_vectors", "ov_read_vectors"):
        out[name] = arrays[name].copy()
        for layer, m in enumerate(sizes):
            out[name][layer, :, m:] = np.nan
    return out


def test_padded_rows_are_never_read_and_zero_singular_values_add_nothing(mixed):
    """NaN in every padded vector row changes no score, conditional moment, refined p or
    read/write statistic (those rows are never read); the zero-padded singular values add
    nothing (the results equal the unpadded ones, test above)."""
    arrays = padded_with_nan(mixed.arrays, mixed.sizes)
    c = Circuits(*(arrays[FILES[name]] for name in FILES), n_kv_heads=kv_heads(mixed.model),
                 head_dims=mixed.sizes)
    ours, ref = composition(c), composition(mixed.circuits)
    for name in ("scores", "conditional_mean", "conditional_std"):
        np.testing.assert_array_equal(getattr(ours, name), getattr(ref, name))
    np.testing.assert_array_equal(conditional_tests(ours, c, refine_below=1.0)["conditional_p"],
                                  conditional_tests(ref, mixed.circuits,
                                                    refine_below=1.0)["conditional_p"])
    sides = ReadSides(c.query, c.key, c.read, c.write, c.n_kv_heads, c.head_dims)
    for name, value in vars(read_write(mixed.sides, K)).items():
        np.testing.assert_array_equal(getattr(read_write(sides, K), name), value)


def test_refined_conditional_p_at_each_pairs_sizes(mixed):
    """The saddlepoint p of every pair (refine_below = 1: all refined): for equal sizes the
    uniform code's on the two layers unpadded; for all pairs the saddlepoint of the direct
    weights ``(w_a - mean w)(nu_b - mean nu) / (sqrt((m_l - 1)(m_l + 2)) |w|^2 |t|^2)``,
    ``nu`` the ``m_l`` eigenvalues of ``N`` (``m_l x m_e`` M)."""
    h, layers = mixed.h, mixed.layers
    comp = composition(mixed.circuits)
    p = conditional_tests(comp, mixed.circuits, refine_below=1.0)["conditional_p"]
    p = p.reshape(3, 5, h, 5, h)
    for later, earlier in layer_pairs(5):
        if layers[later]["m"] == layers[earlier]["m"]:
            sub = sub_circuits(layers, [earlier, later])
            ref = conditional_tests(composition(sub), sub, refine_below=1.0)["conditional_p"]
            np.testing.assert_allclose(p[:, later, :, earlier], ref[:, h:, :h], rtol=1e-6)
        m, w_l, w_e = layers[later]["m"], layers[later], layers[earlier]
        direct = direct_composition(w_l, w_e)
        t = w_e["ov_singular_values"]
        for kind, (vectors, sigma) in enumerate(SIDES):
            weights = np.square(w_l[sigma])
            core = (np.einsum("iad,jbd->ijab", w_l[vectors].astype(np.float64),
                              w_e["ov_write_vectors"].astype(np.float64)) * t[None, :, None])
            nu = np.linalg.eigvalsh(core @ np.swapaxes(core, -1, -2))       # (h, h, m_l)
            scale = weights.sum(-1)[:, None] * np.square(t).sum(-1)[None, :]
            lam = ((weights - weights.mean(-1, keepdims=True))[:, None, :, None]
                   * (nu - nu.mean(-1, keepdims=True))[:, :, None, :])
            lam = lam / (np.sqrt((m - 1) * (m + 2)) * scale)[..., None, None]
            excess = np.square(direct[0, kind]) - direct[1, kind]
            ref = quadratic_form_p(lam.reshape(h * h, -1), excess.ravel()).reshape(h, h)
            np.testing.assert_allclose(p[kind, later, :, earlier], ref, rtol=1e-3, atol=1e-9)


def test_composition_conditional_null_by_monte_carlo_in_the_own_row_space(mixed):
    """Layer 2 (m = 8, stored 12 wide) reading layer 1 (m = 12): its heads' singular vectors
    rotated by Haar C in O(8) within their own row space, 3000 draws per head: the squared
    scores' mean within 4 standard errors and std within 8 % of composition's exact moments;
    the mean at the padded width (m = 12) is rejected (> 10 standard errors)."""
    rng = np.random.default_rng(1)
    h, n, (later, earlier) = mixed.h, 3000, (2, 1)
    w_l, w_e = mixed.layers[later], mixed.layers[earlier]
    comp = composition(mixed.circuits)
    block = (slice(later * h, (later + 1) * h), slice(earlier * h, (earlier + 1) * h))
    t = w_e["ov_singular_values"]
    for kind, (vectors, sigma) in enumerate(SIDES):
        weights = np.square(w_l[sigma])                                     # (h, 8)
        core = (np.einsum("iad,jbd->ijab", w_l[vectors].astype(np.float64),
                          w_e["ov_write_vectors"].astype(np.float64)) * t[None, :, None])
        turned = np.einsum("niab,ijbc->nijac", haar(rng, n * h, 8).reshape(n, h, 8, 8), core)
        scale = weights.sum(-1)[:, None] * np.square(t).sum(-1)[None, :]
        draws = np.einsum("ia,nijac->nij", weights, np.square(turned)) / scale
        mean, std = comp.conditional_mean[kind][block], comp.conditional_std[kind][block]
        se = std / np.sqrt(n)
        assert np.all(np.abs(draws.mean(0) - mean) < 4 * se), kind
        np.testing.assert_allclose(draws.std(0), std, rtol=0.08)
        assert np.all(np.abs(draws.mean(0) - mean * 8 / 12) > 10 * se), kind


def test_isotropic_null_per_pair_of_head_sizes(mixed):
    """One null per (earlier, later) head sizes that a layer pair has, each the scores of two
    random layers of those sizes (their unpadded factors by the direct formula; E[score^2] =
    1/d within 15 %); every pair's moments are its sizes' null; a uniform model keeps its one
    null and table, equal to isotropic_null at its head size."""
    d, h, n = mixed.d, mixed.h, 8
    nulls = isotropic_nulls(d, mixed.sizes, h, null_heads=n)
    assert sorted(nulls.by_sizes) == [(8, 8), (8, 12), (12, 8), (12, 12)]
    for (m_e, m_l), null in nulls.by_sizes.items():
        pair = random_circuits(2, n, d, (m_e, m_l), np.random.default_rng(0))
        assert np.all(pair.qk_sigma[0, :, m_e:] == 0) and np.all(pair.qk_sigma[0, :, :m_e] > 0)
        unpadded = [{name: getattr(pair, key)[layer, :, :m] for key, name in FILES.items()}
                    | {"m": m} for layer, m in enumerate((m_e, m_l))]
        scores = direct_composition(unpadded[1], unpadded[0])[0].reshape(3, -1)
        np.testing.assert_allclose(null.mean, scores.mean(1), rtol=1e-5)
        np.testing.assert_allclose(null.std, scores.std(1, ddof=1), rtol=1e-4)
        np.testing.assert_allclose(null.mean_square, 1 / d, rtol=0.15)
    mean, std = nulls.pair_moments()
    for later, earlier in layer_pairs(5):
        null = nulls.by_sizes[int(mixed.sizes[earlier]), int(mixed.sizes[later])]
        cell = (slice(None), slice(later * h, (later + 1) * h),
                slice(earlier * h, (earlier + 1) * h))
        assert np.all(mean[cell] == null.mean[:, None, None])
        assert np.all(std[cell] == null.std[:, None, None])
    uniform = isotropic_nulls(d, [8] * 4, h, null_heads=n)
    one = isotropic_null(d, 8, n_heads=n)
    assert list(uniform.by_sizes) == [(8, 8)]
    assert uniform.pair_moments()[0].shape == (3, 1, 1)
    np.testing.assert_array_equal(uniform.by_sizes[8, 8].mean, one.mean)
    assert null_table(uniform) == (NULL_COLUMNS, null_rows(one))


def test_composition_outputs_and_figures_of_a_mixed_model(mixed, tmp_path):
    """write_composition: the null table has a row per type and pair of head sizes, the top
    table's null of each pair is its sizes' null; circuit_figures reads each layer pair's
    null mean back and draws the three figures."""
    from weight_geometry.circuit_figures import draw_circuits, null_means
    from weight_geometry.figure_names import CIRCUIT_FIGURES

    out = SimpleNamespace(**{f"composition_{t}": tmp_path / f"composition_{t}.npy"
                             for t in TYPES},
                          **{name: tmp_path / f"{name}.parquet"
                             for name in ("null", "top", "layers")})
    write_composition(mixed.circuits, out)
    null, top = pd.read_parquet(out.null), pd.read_parquet(out.top)
    assert list(null.columns) == list(SIZED_NULL_COLUMNS) and len(null) == 3 * 4
    sizes = mixed.sizes
    by_sizes = null.set_index(["type", "earlier_head_dim", "head_dim"])["null_mean"]
    expect = [by_sizes[r.type, sizes[r.earlier_layer], sizes[r.layer]] for r in top.itertuples()]
    assert list(top.columns) == list(TOP_COLUMNS)
    np.testing.assert_array_equal(top["null_mean"], expect)
    assert len({*top["null_mean"]}) > 3                     # more than one null per type
    means = null_means(null, sizes)
    for t in TYPES:
        for later, earlier in layer_pairs(5):
            assert means[t][later, earlier] == by_sizes[t, sizes[earlier], sizes[later]]
    scores = {t: np.load(getattr(out, f"composition_{t}")) for t in TYPES}
    rw = pd.DataFrame(read_write_rows(mixed.sides))
    paths = {name: tmp_path / f"{name}.png" for name in CIRCUIT_FIGURES}
    draw_circuits(scores, means, pd.read_parquet(out.layers), rw, mixed.h, paths)
    assert all(p.stat().st_size > 0 for p in paths.values())


def read_write_rows(sides: ReadSides) -> list[dict]:
    from weight_geometry.read_write import COLUMNS, table_rows

    return [dict(zip(COLUMNS, row, strict=True)) for row in table_rows(read_write(sides, K))]


def c_moment(k: int, m: int) -> float:
    """``Var[tr(P N)] / (tr N^2 - (tr N)^2 / m)`` for a Haar rank-k projector of R^m."""
    return 2 * k * (m - k) / (m * (m - 1) * (m + 2))


def test_read_write_equals_each_layer_pair_at_its_own_sizes(mixed):
    """Every overlap, both nulls and the best match: for equal sizes those of the uniform code
    on the two layers unpadded; for every pair those of the formed maps' float64 SVDs at the
    layers' own sizes with the direct formulas (the conditional null in the later layer's
    m_l-dimensional row space, its KV group's g_l heads counted as perfectly correlated)."""
    h, d, layers = mixed.h, mixed.d, mixed.layers
    rw = read_write(mixed.sides, K)
    ref = [naive_sides([w], h, w["m"])[0] for w in layers]
    for later, earlier in layer_pairs(5):
        if layers[later]["m"] == layers[earlier]["m"]:
            sub = read_write(sub_sides(layers, [earlier, later]), K)
            for name in ("overlap", "pair_mean", "pair_std"):
                np.testing.assert_allclose(getattr(rw, name)[:, later, :, earlier],
                                           getattr(sub, name)[:, 1, :, 0], rtol=1e-6)
            for name in ("mean", "isotropic_std", "conditional_mean", "conditional_std",
                         "best_match"):
                np.testing.assert_allclose(getattr(rw, name)[:, later, earlier],
                                           getattr(sub, name)[:, 1, 0], rtol=1e-6)
        m, n_kv = layers[later]["m"], layers[later]["n_kv"]
        writes = np.concatenate([ref[earlier][j]["write"][:K] for j in range(h)])   # (h k, d)
        iso = h * c_moment(K, d) * (np.square(writes @ writes.T).sum() - (h * K) ** 2 / d)
        for t in range(3):
            group = 1 if t == 0 else h // n_kv
            overlap = np.empty((h, h))
            cond_mean, cond_var = 0.0, 0.0
            for i in range(h):
                frame = ref[later][i]["spaces"][t] @ writes.T                  # Q A^T (m, h k)
                parts = frame.reshape(m, h, K).transpose(1, 0, 2)              # per writer
                tr = np.square(parts).sum((1, 2))
                tr2 = np.square(np.swapaxes(parts, 1, 2) @ parts).sum((1, 2))
                np.testing.assert_allclose(rw.pair_mean[t, later, i, earlier], tr / m,
                                           atol=2e-5)
                np.testing.assert_allclose(rw.pair_std[t, later, i, earlier],
                                           np.sqrt(c_moment(K, m) * (tr2 - tr**2 / m)) / K,
                                           rtol=1e-3, atol=1e-6)
                x = ref[later][i]["read"][t][:K]
                overlap[i] = np.square(x @ writes.T).reshape(K, h, K).sum((0, 2)) / K
                whole = np.square(frame).sum()
                cond_mean += whole / (m * h * h)
                cond_var += c_moment(K, m) * (np.square(frame @ frame.T).sum() - whole**2 / m)
            np.testing.assert_allclose(rw.overlap[t, later, :, earlier], overlap, atol=2e-5)
            np.testing.assert_allclose(rw.mean[t, later, earlier], overlap.mean(), atol=2e-5)
            np.testing.assert_allclose(rw.best_match[t, later, earlier],
                                       overlap.max(0).mean(), atol=2e-5)
            np.testing.assert_allclose(rw.conditional_mean[t, later, earlier], cond_mean,
                                       atol=2e-6)
            np.testing.assert_allclose(rw.conditional_std[t, later, earlier],
                                       np.sqrt(group * cond_var) / (h * h * K), rtol=1e-4)
            np.testing.assert_allclose(rw.isotropic_std[t, later, earlier],
                                       np.sqrt(group * iso) / (h * h * K), rtol=1e-4)


def test_read_write_conditional_null_by_monte_carlo_in_the_own_row_space(mixed):
    """Layer 2 (m = 8, stored 12 wide, 2 heads per KV head) reading layer 1's writes (m = 12):
    its heads' top-k read subspaces drawn Haar within their own 8-dimensional row spaces,
    independently per head: each pair's mean within 4 standard errors and std within 8 %; the
    layer mean's mean the same, its std the bound (sqrt(g) times the independent heads' on the
    key and value sides); the padded width's mean (m = 12) is rejected (> 8 standard errors)."""
    rng = np.random.default_rng(3)
    h, n, (later, earlier) = mixed.h, 4000, (2, 1)
    rw = read_write(mixed.sides, K)
    ref = [naive_sides([w], h, w["m"])[0] for w in mixed.layers]
    writes = np.stack([ref[earlier][j]["write"][:K] for j in range(h)])        # (h, k, d)
    for t in range(3):
        spaces = np.stack([ref[later][i]["spaces"][t] for i in range(h)])      # (h, 8, d)
        frames = haar_bases(rng, (n, h), K, 8)
        pairs = np.square(np.einsum("nikm,imd,jld->nijkl", frames, spaces, writes)
                          ).sum((-1, -2)) / K                                  # (n, h, h)
        mean, std = rw.pair_mean[t, later, :, earlier], rw.pair_std[t, later, :, earlier]
        assert np.all(np.abs(pairs.mean(0) - mean) < 4 * std / np.sqrt(n))
        np.testing.assert_allclose(pairs.std(0), std, rtol=0.08)
        layer_means = pairs.mean((1, 2))
        mean, std = rw.conditional_mean[t, later, earlier], rw.conditional_std[t, later, earlier]
        bound = np.sqrt(1 if t == 0 else h // mixed.layers[later]["n_kv"])
        se = std / bound / np.sqrt(n)
        assert abs(layer_means.mean() - mean) < 4 * se
        np.testing.assert_allclose(bound * layer_means.std(), std, rtol=0.08)
        assert abs(layer_means.mean() - mean * 8 / 12) > 8 * se


def test_k_up_to_the_smallest_head_size(mixed):
    """k may be up to the smallest layer's head size (8; the arrays are 12 wide), where the
    conditional null of that layer's reads is exact (its whole row space); beyond it a
    one-line error names the smallest."""
    rw = read_write(mixed.sides, 8)
    small = [b for b in range(1, 5) if mixed.sizes[b] == 8]
    for later in small:
        np.testing.assert_allclose(rw.conditional_mean[:, later, :later],
                                   rw.mean[:, later, :later], atol=2e-5)
        assert np.nanmax(rw.conditional_std[:, later, :later]) < 1e-6
    with pytest.raises(UserError, match=r"top_k = 9 is outside 1 \.\. the smallest layer's"
                                        r" d_head = 8 \(allowed: an int in \[1, 8\]\)"):
        read_write(mixed.sides, 9)
    check_k(12, [12, 12])
