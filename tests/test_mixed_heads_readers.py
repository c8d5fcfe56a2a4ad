"""The readers on a model whose layers differ in head size and KV-head count (Gemma 4's layout,
:mod:`mixed_heads`): each answer on the padded whole equals one computed here layer by layer (or
pair by pair) at each layer's own sizes, from the unpadded arrays."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from conftest import assert_one_line
from mixed_heads import mixed_model

from weight_geometry.errors import UserError
from weight_geometry.head_layout import head_dims
from weight_geometry.ksweep import GAP_THRESHOLD, gaps_at, ill_defined, ksweep_table
from weight_geometry.similarity import null_mean, null_std, similarity
from weight_geometry.statistics import overlap_summary

#: Head sizes and KV-head counts of the mixed model: sliding (8, 2) and full (12, 1) layers.
SIZES, KV = (8, 12, 8, 12, 8), (2, 1, 2, 1, 2)
N_HEADS = 4


@pytest.fixture(scope="module")
def mixed():
    return mixed_model(head_dims=SIZES, kv_heads=KV, n_heads=N_HEADS)


def _kv(layer: dict, head: int) -> int:
    """The KV head ``head`` reads in ``layer``, from that layer's own KV-head count."""
    return head // (N_HEADS // layer["n_kv"])


def _row_space(layer: dict, kv: int) -> np.ndarray:
    """``(m, d)`` float64 orthonormal basis of KV head ``kv``'s row space: the stored vectors of
    its first query head (all ``m`` of them span it)."""
    return layer["vectors"][kv * (N_HEADS // layer["n_kv"])].astype(np.float64)


def _overlaps(layers: list[dict]) -> np.ndarray:
    """``(2, L, n_kv, L, n_kv)`` row-space overlap moments ``t1 = ||M||_F^2``, ``t2 =
    ||M^T M||_F^2`` of ``M = Q_a Q_b^T``, pair by pair in float64; NaN for a KV head a layer
    does not have, so a reader that looks there fails."""
    n, n_kv = len(layers), max(KV)
    out = np.full((2, n, n_kv, n, n_kv), np.nan)
    for a, la in enumerate(layers):
        for b, lb in enumerate(layers):
            for i in range(la["n_kv"]):
                for j in range(lb["n_kv"]):
                    m = _row_space(la, i) @ _row_space(lb, j).T
                    out[:, a, i, b, j] = np.square(m).sum(), np.square(m.T @ m).sum()
    return out


def _relative_gap(sv: np.ndarray, k: int) -> float:
    return (sv[k - 1] - sv[k]) / sv[k - 1]


# --- k-sweep ---------------------------------------------------------------------------------

def test_ksweep_equals_a_per_layer_computation(mixed):
    model, arrays, layers = mixed
    heads, d = [1, 3], model["d_model"]
    table = ksweep_table(arrays["vectors"][:, heads], arrays["ffn_input_energy"][:, heads],
                         arrays["ffn_input_norm2"], arrays["singular_values"][:, heads], model,
                         heads, _overlaps(layers), arrays["ffn_input_rowspace_eigenvalues"])
    assert list(table["k"]) == list(range(1, min(SIZES))), "k up to the smallest m - 1"
    for row in table.itertuples():
        k = row.k
        stats, nulls = [], []
        for h in heads:
            top = [layer["vectors"][h, :k].astype(np.float64) for layer in layers]
            sims = np.array([[similarity(x, y) if a != b else 1.0
                              for b, y in enumerate(top)] for a, x in enumerate(top)])
            stats.append(overlap_summary(sims))
            # Conditional null mean of one pair: k ||Q_a Q_b^T||_F^2 / (m_a m_b).
            null = np.array([[k * np.square(_row_space(la, _kv(la, h))
                                            @ _row_space(lb, _kv(lb, h)).T).sum()
                              / (la["m"] * lb["m"]) for lb in layers] for la in layers])
            nulls.append(overlap_summary(null))
        for stat in ("off_diagonal_mean", "adjacent_mean", "distant_mean"):
            wanted = np.mean([s[stat] for s in stats])
            assert getattr(row, stat) == pytest.approx(wanted, abs=1e-6), (k, stat)
            assert getattr(row, f"{stat}_ratio") == pytest.approx(wanted / (k / d), rel=1e-5)
            assert getattr(row, f"{stat}_conditional_ratio") == pytest.approx(
                wanted / np.mean([s[stat] for s in nulls]), rel=1e-5), (k, stat)
        align = [layer["ffn_input_energy"][h, :k].sum() / layer["ffn_input_norm2"]
                 for layer in layers for h in heads]
        chance = [k / layer["m"] * layer["ffn_input_rowspace_eigenvalues"][_kv(layer, h)].sum()
                  / layer["ffn_input_norm2"] for layer in layers for h in heads]
        assert row.alignment_mean == pytest.approx(np.mean(align), rel=1e-12)
        assert row.alignment_mean_conditional_ratio == pytest.approx(
            np.mean(align) / np.mean(chance), rel=1e-9)
        assert row.chance == null_mean(k, d) and row.null_std == null_std(k, d)
        ill = sum(_relative_gap(layer["singular_values"][h], k) < GAP_THRESHOLD
                  for layer in layers for h in heads)
        assert row.n_ill_defined == ill


def test_gaps_are_undefined_from_each_layers_own_head_size(mixed):
    model, arrays, layers = mixed
    sv = arrays["singular_values"].copy()
    sv[1, 2, 8] = sv[1, 2, 7] * (1 - 1e-4)            # full layer 1, head 2: gap at k = 8 tiny
    sizes = head_dims(model)
    for k in (1, 7, 8, 11, 12):
        gaps = gaps_at(sv, k, sizes)
        for p, layer in enumerate(layers):
            if k >= layer["m"]:   # the whole row space: no gap, whatever the padding says
                assert np.isnan(gaps[p]).all(), (k, p)
            else:
                wanted = [_relative_gap(s, k) for s in sv[p, :, :layer["m"]]]
                np.testing.assert_allclose(gaps[p], wanted, rtol=1e-12)
    assert ill_defined(sv, 8, sizes)[["layer", "head"]].values.tolist() == [[1, 2]]
    # Without the sizes, a sliding layer's padding reads as a gap of 1 at k = 8 and as ties
    # above it: the sizes are what makes the answer right.
    assert (gaps_at(sv, 8)[0] == 1).all()
    assert len(ill_defined(sv, 9)) == 3 * N_HEADS


# --- config ----------------------------------------------------------------------------------

def _plan(dims, top_k):
    """:func:`config._model_plan` of a source with ``dims`` (its headers already read)."""
    from pathlib import Path

    from weight_geometry.config import _model_plan, _Source

    src = _Source("g4", Path("g4"), None, dims, ("W_Q", "W_K", "W_V", "W_O"))
    return _model_plan("g4", src, top_k, ("all", None), 0, "auto", 0)


def test_config_checks_k_against_the_smallest_head_size():
    from weight_geometry.architectures import ModelDims

    mixed = ModelDims(n_layers=6, d_model=64, d_ff=96, n_heads=4, n_kv_heads=2, d_head=16,
                      head_dims=(8, 16) * 3, kv_heads=(2, 1) * 3)
    assert _plan(mixed, [4, 8]).name == "g4"
    with pytest.raises(UserError) as info:
        _plan(mixed, [4, 9, 16])
    assert assert_one_line(info.value) == (
        "top_k: 9 is not allowed for model g4 (1 <= k <= 8, the smallest head size, that of"
        " layers 0, 2, 4; the largest is d_head = 16)")
    one = ModelDims(n_layers=3, d_model=64, d_ff=96, n_heads=4, n_kv_heads=2, d_head=16,
                    head_dims=(16, 16, 12), kv_heads=(2, 2, 1))
    with pytest.raises(UserError, match=r"<= 12, the smallest head size, that of layer 2;"):
        _plan(one, [13])
    # A uniform model: the message as before.
    uniform = ModelDims(n_layers=6, d_model=64, d_ff=96, n_heads=4, n_kv_heads=2, d_head=16)
    assert _plan(uniform, [16]).name == "g4"
    with pytest.raises(UserError) as info:
        _plan(uniform, [17])
    assert str(info.value) == "top_k: 17 is not allowed for model g4 (1 <= k <= d_head = 16)"


# --- report ----------------------------------------------------------------------------------

#: The report's mixed record: sliding layers (head size 6, 2 KV heads: no head shares one) and
#: full layers (8, 1: both heads share it), two shared-KV layers and keys as values.
REPORT_SIZES, REPORT_KV = [6, 8] * 3, [2, 1] * 3


def _mixed_analysis(k: int):
    """test_lib_report's hand-built Analysis (2 heads, 6 layers) as a Gemma-4-like model at
    ``k``: per-layer sizes, layer kinds, key/value reuse; singular values zero-padded beyond
    each layer's size, one full layer's gap at 6 tiny."""
    from test_lib_report import _analysis

    a = _analysis()
    model = {**a.model, "d_head": 8, "n_kv_heads": 2, "head_dims": REPORT_SIZES,
             "kv_heads": REPORT_KV, "layer_types": ["sliding", "full"] * 3,
             "kv_shared_layers": {"4": 2, "5": 3}, "keys_as_values": [1, 3, 5]}
    sv = np.zeros((6, 2, 8))
    for p, m in enumerate(REPORT_SIZES):
        sv[p, :, :m] = np.arange(m, 0, -1)
    sv[3, 1, 6] = sv[3, 1, 5] * (1 - 1e-3)                    # L3/H1: gap 0.001 at k = 6
    return replace(a, model=model, k=k, singular_values=sv)


def _section(generator) -> str:
    return "\n".join(generator)


def test_report_model_table_shows_per_layer_sizes():
    from test_lib_report import _metrics

    from weight_geometry.report import _configuration

    a = _mixed_analysis(3)
    got = _metrics(_section(_configuration(a)), "## Model configuration")
    assert got["Head dim (d_head)"] == "6 (sliding), 8 (full)"
    assert got["Key/value heads (n_kv)"] == "2 (sliding), 1 (full)"
    assert got["FFN intermediate (d_ff)"] == "96"
    wide = replace(a, model={**a.model, "ffn_widths": [96] * 4 + [192] * 2})
    got = _metrics(_section(_configuration(wide)), "## Model configuration")
    assert got["FFN intermediate (d_ff)"] == "96 (layers 0, 1, 2, 3), 192 (layers 4, 5)"


def test_by_kind_names_layers_where_kinds_do_not_decide():
    from weight_geometry.report import by_kind

    model = {"n_layers": 4, "layer_types": ["sliding", "full", "sliding", "full"]}
    assert by_kind(model, ["8", "8", "8", "8"]) == "8"
    assert by_kind(model, ["6", "8", "6", "8"]) == "6 (sliding), 8 (full)"
    assert by_kind(model, ["6", "8", "6", "12"]) == "6 (sliding), 8 (layer 1), 12 (layer 3)"
    assert by_kind(model, ["6", None, "6", "8"]) == "6 (sliding), 8 (full)"
    assert by_kind({"n_layers": 3}, ["6", "8", "6"]) == "6 (layers 0, 2), 8 (layer 1)"


def test_report_header_states_sizes_reuse_and_the_k_bound():
    from weight_geometry.report import _header

    text = _section(_header(_mixed_analysis(6)))
    assert ("Key/value reuse (Gemma 4): Layers 4 (from 2), 5 (from 3) store no W_K or W_V and"
            " reuse an earlier layer's keys and values; their kernel pairs their own W_Q with"
            " the source layer's W_K, whose keys read the source layer's input") in text
    assert "Layers 1, 3, 5 use their keys as values (W_V = W_K)" in text
    assert "m-dimensional row space (m the layer's head size: 6 (sliding), 8 (full))" in text
    assert ("**k = m = 6, the smallest head size (layers 0, 2, 4): in those layers the subspace"
            " is the row space of W_K alone") in text
    assert "d_head" not in text
    below = _section(_header(_mixed_analysis(5)))
    assert "**k =" not in below and "Key/value reuse" in below
    # Without reuse (no entries, or empty ones) no such line.
    a = _mixed_analysis(5)
    model = {key: v for key, v in a.model.items()
             if key not in ("kv_shared_layers", "keys_as_values")}
    for empty in ({}, {"kv_shared_layers": {}, "keys_as_values": []}):
        assert "Key/value reuse" not in _section(_header(replace(a, model={**model, **empty})))


def test_report_groups_heads_by_each_layers_kv_head():
    from weight_geometry.multiplicity import count_family
    from weight_geometry.report import _by_kv_head

    a = _mixed_analysis(3)
    table = _by_kv_head(a).set_index("Group")
    assert list(table.index) == ["KV head 0 (heads 0 (sliding); 0, 1 (full))",
                                 "KV head 1 (heads 1 (sliding))", "Model"]
    t = a.every_head
    # Layer p's heads on KV head 0: head 0 where it has 2 KV heads, both where it has 1.
    on_zero = (t["head"] == 0) | (np.array(REPORT_KV)[t["layer"]] == 1)
    for label, rows in (("KV head 0 (heads 0 (sliding); 0, 1 (full))", t[on_zero]),
                        ("KV head 1 (heads 1 (sliding))", t[~on_zero])):
        assert table.loc[label, "Adjacent sim × conditional"] == pytest.approx(
            rows["adjacent_similarity"].mean() / rows["conditional_mean"].mean())
        assert table.loc[label, "Adjacent sim significant"] == count_family(
            rows["adjacent_similarity"], rows["conditional_mean"], rows["z_conditional"],
            rows["p_conditional_adjusted"]).above_below()


def test_report_within_layer_chance_uses_the_sharing_layers_sizes():
    from weight_geometry.report import _every_head

    text = _section(_every_head(_mixed_analysis(3), None, {"every_head": "."}))
    # Only the full layers (m = 8, one KV head) have heads sharing a KV head.
    assert "random k-subspaces of one row space: k/m = 0.375 (full))" in text


def test_report_k_sensitivity_bounds_k_by_the_smallest_head():
    from weight_geometry.report import _k_sensitivity

    text = _section(_k_sensitivity(_mixed_analysis(6), {"k_sensitivity": "."}))
    assert ("every k from 1 to m - 1 = 5 (m = 6, the smallest head size (layers 0, 2, 4))"
            in text)
    assert "**This report's k = m = 6: heads sharing a KV head have identical" in text
    # At k = 6 the sliding layers' subspaces are their whole row spaces (no gap, not listed,
    # whatever their zero padding says); the full layers' gaps are their own.
    assert ": 1 of 12; smallest gaps first: L3/H1 (0.0010)." in text


# --- expert alignment ------------------------------------------------------------------------

def _expert_arrays(layers: list[dict], dense: int, seed: int = 1):
    """One routed expert's W_gate ``(6, d)`` and one router row per layer but ``dense`` (no
    experts: NaN), their stored arrays padded per the contract, and the weights."""
    rng = np.random.default_rng(seed)
    n, d = len(layers), layers[0]["W_Q"].shape[1]
    m_max, kv_max = max(SIZES), max(KV)
    energy, eig = np.zeros((n, 2, N_HEADS, m_max)), np.full((n, 2, kv_max, m_max), np.nan)
    norm2, sv = np.full((n, 2), np.nan), np.zeros((n, 2, 6))
    weights = {}
    for p, layer in enumerate(layers):
        if p == dense:
            continue
        for u, rows in enumerate((6, 1)):
            w = weights[p, u] = rng.standard_normal((rows, d))
            energy[p, u, :, :layer["m"]] = np.square(
                layer["vectors"].astype(np.float64) @ w.T).sum(-1)
            for j in range(layer["n_kv"]):
                q = _row_space(layer, j)
                eig[p, u, j, :layer["m"]] = np.linalg.eigvalsh(q @ w.T @ w @ q.T)
            norm2[p, u] = np.square(w).sum()
            sv[p, u, :rows] = np.linalg.svd(w, compute_uv=False)
    return energy, norm2, sv, eig, weights


def _haar_frame(rng, k: int, m: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((m, k)))[0].T


def test_expert_alignment_nulls_at_each_layers_own_sizes(mixed):
    from weight_geometry.expert_alignment import expert_alignment_table, expert_units

    model, _, layers = mixed
    k, dense = 3, 2
    energy, norm2, sv, eig, weights = _expert_arrays(layers, dense)
    table = expert_alignment_table(energy, norm2, sv, eig, expert_units(1, False), k, model,
                                   "W_gate")
    assert len(table) == (len(layers) - 1) * 2 * N_HEADS and dense not in set(table["layer"])
    c = {m: 2 * k * (m - k) / (m * (m - 1) * (m + 2)) for m in set(SIZES)}
    for row in table.itertuples():
        layer, u = layers[row.layer], int(row.expert == "router")
        mu = np.sort(eig[row.layer, u, _kv(layer, row.head), :layer["m"]])
        total, m = norm2[row.layer, u], layer["m"]
        assert row.alignment == pytest.approx(energy[row.layer, u, row.head, :k].sum() / total)
        assert row.conditional_chance == pytest.approx(k / m * mu.sum() / total, rel=1e-12)
        assert row.conditional_std == pytest.approx(
            np.sqrt(c[m] * (np.square(mu).sum() - mu.sum() ** 2 / m)) / total, rel=1e-9)
        assert row.conditional_ceiling == pytest.approx(mu[-k:].sum() / total, rel=1e-12)
        assert row.conditional_floor == pytest.approx(mu[:k].sum() / total, rel=1e-12)
    # Monte Carlo: head 3's top-k replaced by a Haar-random k-subspace of its KV row space, in
    # a sliding (m = 8, KV head 1) and a full layer (m = 12, KV head 0). 4000 draws put the
    # mean within 4 standard errors (about 0.06 std): a wrong m moves it by 1/3 or 1/2.
    rng = np.random.default_rng(7)
    for p in (0, 1):
        layer, w = layers[p], weights[p, 0]
        q = _row_space(layer, _kv(layer, 3))
        draws = np.array([np.square(w @ (_haar_frame(rng, k, layer["m"]) @ q).T).sum()
                          for _ in range(4000)]) / norm2[p, 0]
        row = table[(table["layer"] == p) & (table["expert"] == "0") & (table["head"] == 3)]
        mean, std = row["conditional_chance"].item(), row["conditional_std"].item()
        assert draws.mean() == pytest.approx(mean, abs=4 * std / np.sqrt(len(draws))), p
        assert draws.std() == pytest.approx(std, rel=0.1), p


# --- model comparison ------------------------------------------------------------------------

def test_compare_states_k_over_each_layers_head_size():
    from test_lib_compare import K, _model

    from weight_geometry.compare import compare_summary, compare_table, render_compare

    models = {"small": _model("small", 6, 64, 4, 0), "g4": _model("g4", 6, 64, 2, 1)}
    models["g4"][0].update(d_head=32, n_kv_heads=2, head_dims=[16, 32] * 3, kv_heads=[2, 1] * 3,
                           layer_types=["sliding", "full"] * 3)
    table = compare_table(models, K)
    summary = compare_summary(table)
    records = {name: record for name, (record, _) in models.items()}
    text = render_compare(table, summary, K, records)
    assert ("In g4 the head size differs by layer (16 (sliding), 32 (full)): a top-8 subspace"
            " fills k / m = 0.5000 (sliding), 0.2500 (full) of its row space") in text
    assert "In small" not in text
    # Uniform models alone: the text as without the records.
    uniform = {"small": models["small"]}
    table = compare_table(uniform, K)
    assert render_compare(table, compare_summary(table), K, {"small": models["small"][0]}) == (
        render_compare(table, compare_summary(table), K))


# --- user ranks and kernel ranks -------------------------------------------------------------

def test_user_ranks_have_each_layers_own_shapes_and_no_row_of_reused_weights(tmp_path):
    from weight_geometry.architectures import GATED, ModelDims
    from weight_geometry.user_ranks import read_user_ranks, record_not_stored

    dims = ModelDims(n_layers=4, d_model=32, d_ff=24, n_heads=4, n_kv_heads=2, d_head=16,
                     head_dims=(8, 16, 8, 16), kv_heads=(2, 1, 2, 1), ffn_widths=(24, 24, 48, 48))
    record = {"kv_shared_layers": {"2": 0, "3": 1}, "keys_as_values": [1, 3]}
    not_stored = record_not_stored(record)
    assert not_stored == {(2, "W_K"), (2, "W_V"), (3, "W_K"), (3, "W_V"), (1, "W_V")}
    # Written by hand, layer by layer: W_Q (h m, d), W_K (n_kv m, d), W_O (d, h m), FFN widths.
    shapes = {"W_Q": ["32x32", "64x32", "32x32", "64x32"], "W_K": ["16x32", "16x32", None, None],
              "W_V": ["16x32", None, None, None], "W_O": ["32x32", "32x64", "32x32", "32x64"],
              "W_gate": ["24x32", "24x32", "48x32", "48x32"],
              "W_up": ["24x32", "24x32", "48x32", "48x32"],
              "W_down": ["32x24", "32x24", "32x48", "32x48"]}
    rows = [(layer, wt, shape[layer], 3.0) for layer in range(4) for wt in GATED
            if (shape := shapes[wt])[layer] is not None]
    table = pd.DataFrame(rows, columns=["layer_idx", "weight_type", "shape", "eff_rank"])
    path = tmp_path / "ranks.csv"
    table.to_csv(path, index=False)
    got = read_user_ranks(path, dims, GATED, None, not_stored)
    pd.testing.assert_frame_equal(got, table)
    # A sliding layer's W_Q with a full layer's shape, or a row of a weight the layer does not
    # store: one line each.
    wrong = table.copy()
    wrong.loc[0, "shape"] = "64x32"
    wrong.to_csv(path, index=False)
    with pytest.raises(UserError) as info:
        read_user_ranks(path, dims, GATED, None, not_stored)
    assert_one_line(info.value, "shape 64x32 of (layer 0, W_Q)", "expected 32x32")
    extra = pd.concat([table, pd.DataFrame([(3, "W_K", "16x32", 3.0)], columns=table.columns)])
    extra.to_csv(path, index=False)
    with pytest.raises(UserError) as info:
        read_user_ranks(path, dims, GATED, None, not_stored)
    assert_one_line(info.value, "(layer 3, W_K)", "is a weight this layer does not store")


def test_kernel_ranks_of_padded_heads_are_each_layers_own(mixed):
    from weight_geometry.ranks import effective_rank_from_singular_values, kernel_rank_table

    model, arrays, layers = mixed
    d = model["d_model"]
    table = kernel_rank_table(arrays["singular_values"], d)
    wanted = [effective_rank_from_singular_values(layer["singular_values"][h], (d, d))
              for layer in layers for h in range(N_HEADS)]
    np.testing.assert_allclose(table["kernel_eff_rank"], wanted, rtol=1e-12)
    assert (table["kernel_eff_rank"] > 0).all()


def test_config_reads_user_ranks_with_the_sources_key_value_reuse(tmp_path):
    from weight_geometry.architectures import GATED, ModelDims
    from weight_geometry.config import _Source, _user_ranks_path

    dims = ModelDims(n_layers=2, d_model=32, d_ff=24, n_heads=4, n_kv_heads=2, d_head=16,
                     head_dims=(8, 16), kv_heads=(2, 1))
    (tmp_path / "config.json").write_text("{}")                     # dense: no experts
    src = _Source("g4", tmp_path, None, dims, GATED, (), {"kv_shared_layers": {"1": 0},
                                                          "keys_as_values": []})
    rows = [(0, "W_Q", "32x32"), (0, "W_K", "16x32"), (0, "W_V", "16x32"), (0, "W_O", "32x32"),
            (1, "W_Q", "64x32"), (1, "W_O", "32x64")]
    rows += [(layer, wt, shape) for layer in (0, 1) for wt, shape in
             (("W_gate", "24x32"), ("W_up", "24x32"), ("W_down", "32x24"))]
    table = pd.DataFrame(rows, columns=["layer_idx", "weight_type", "shape"]).assign(eff_rank=2.0)
    path = tmp_path / "ranks.csv"
    table.to_csv(path, index=False)
    assert _user_ranks_path("g4", str(path), src) == str(path.resolve())
    table.iloc[:-1].to_csv(path, index=False)
    with pytest.raises(UserError) as info:
        _user_ranks_path("g4", str(path), src)
    assert_one_line(info.value, "models.g4.effective_ranks:", "no row for (layer 1, W_down)")


def test_ksweep_conditional_means_by_monte_carlo(mixed):
    """The k-sweep's conditional null of the off-diagonal and adjacent means (the statistic
    over its ratio) against draws of its definition: each sampled head's top-k replaced by a
    Haar-random k-subspace of its own KV row space, in every layer at that layer's size. 1500
    draws put each mean within 4 standard errors (about 1% of it); a wrong m (every layer at
    8, or at 12) moves the null means by 37-50%."""
    model, arrays, layers = mixed
    heads, k = [1, 3], 3
    table = ksweep_table(arrays["vectors"][:, heads], arrays["ffn_input_energy"][:, heads],
                         arrays["ffn_input_norm2"], arrays["singular_values"][:, heads], model,
                         heads, _overlaps(layers), arrays["ffn_input_rowspace_eigenvalues"])
    row = table.set_index("k").loc[k]
    rng = np.random.default_rng(3)
    draws = []
    for _ in range(1500):
        stats = []
        for h in heads:
            top = [_haar_frame(rng, k, layer["m"]) @ _row_space(layer, _kv(layer, h))
                   for layer in layers]
            stats.append(overlap_summary(np.array([[similarity(x, y) for y in top]
                                                   for x in top])))
        draws.append([np.mean([s[stat] for s in stats])
                      for stat in ("off_diagonal_mean", "adjacent_mean")])
    draws = np.array(draws)
    for column, stat in enumerate(("off_diagonal_mean", "adjacent_mean")):
        null_mean_k = row[stat] / row[f"{stat}_conditional_ratio"]
        se = draws[:, column].std() / np.sqrt(len(draws))
        assert draws[:, column].mean() == pytest.approx(null_mean_k, abs=4 * se), stat
