"""alignment_table against the direct d x d projector formula ||W P||_F^2 / ||W||_F^2."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import gaussian_kernel_bases

from weight_geometry.alignment import alignment_table


def _setup(seed=5, n_layers=3, d=24, h=4, n_kv=2, d_head=6, d_ff=40):
    rng = np.random.default_rng(seed)
    vectors = gaussian_kernel_bases(rng, n_layers, h, n_kv, d_head, d, d_head)
    # Anisotropic gates so the alignment is far from chance for some heads.
    gates = rng.standard_normal((n_layers, d_ff, d)) * np.linspace(3, 0.1, d)
    return vectors, gates


@pytest.mark.parametrize("k", [1, 3, 6])
def test_alignment_table_equals_projector_formula(k):
    vectors, gates = _setup()
    n_layers, h, _, d = vectors.shape
    # Per-direction energies e_r = ||W v_r||^2, computed directly (no Gram).
    energy = np.stack([[np.square(gates[ly] @ vectors[ly, i].T).sum(0) for i in range(h)]
                       for ly in range(n_layers)])
    norm2 = np.array([np.square(g).sum() for g in gates])
    spectra = np.stack([np.linalg.svd(g, compute_uv=False) for g in gates])
    table = alignment_table(energy, norm2, spectra, k, d, "W_gate")
    assert len(table) == n_layers * h
    assert list(table[["head", "layer"]].itertuples(index=False, name=None)) == \
        [(i, ly) for i in range(h) for ly in range(n_layers)], "sorted by head then layer"
    for row in table.itertuples():
        v_k = vectors[row.layer, row.head, :k]
        proj = v_k.T @ v_k                                   # d x d projector (tests only)
        w = gates[row.layer]
        ref = np.linalg.norm(w @ proj) ** 2 / np.linalg.norm(w) ** 2
        assert row.alignment == pytest.approx(ref, rel=1e-10), (row.head, row.layer)
        assert row.chance == pytest.approx(k / d)
        assert row.ratio == pytest.approx(ref / (k / d), rel=1e-10)
        assert row.ffn_input == "W_gate"
        # Ceiling: the energy share of W's own top-k right singular directions, from numpy's
        # SVD directly; no k-subspace holds more.
        _, s, vt = np.linalg.svd(w)
        ceiling = np.linalg.norm(w @ vt[:k].T) ** 2 / np.linalg.norm(w) ** 2
        assert row.ceiling == pytest.approx(ceiling, rel=1e-10)
        assert row.alignment <= row.ceiling + 1e-12
        assert row.normalized == pytest.approx((ref - k / d) / (ceiling - k / d), rel=1e-9)
        assert row.z == pytest.approx((ref - k / d) / row.null_std, rel=1e-9)
    assert table["alignment"].min() > 0 and table["alignment"].max() < 1


def test_alignment_full_space_is_one_and_isotropic_gate_near_chance():
    d, d_ff = 10, 4000
    basis = np.eye(d)[None, None]                             # (1, 1, d, d): whole space
    rng = np.random.default_rng(0)
    w = rng.standard_normal((d_ff, d))
    energy = np.square(w @ basis[0, 0].T).sum(0)[None, None]
    norm2 = np.array([np.square(w).sum()])
    spectrum = np.linalg.svd(w, compute_uv=False)[None]
    full = alignment_table(energy, norm2, spectrum, d, d, "W_up")
    assert full["alignment"].iloc[0] == pytest.approx(1.0)
    assert full["ratio"].iloc[0] == pytest.approx(1.0)
    three = alignment_table(energy, norm2, spectrum, 3, d, "W_up")
    assert three["chance"].iloc[0] == pytest.approx(0.3)
    assert three["alignment"].iloc[0] == pytest.approx(0.3, abs=0.02)
