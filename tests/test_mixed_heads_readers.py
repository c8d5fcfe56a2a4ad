"""The readers on a model whose layers differ in head size and KV-head count (Gemma 4's layout,
:mod:`mixed_heads`): each answer on the padded whole equals one computed here layer by layer (or
pair by pair) at each layer's own sizes, from the unpadded arrays."""

from __future__ import annotations

import numpy as np
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
