"""alignment_table against the direct d x d projector formula ||W P||_F^2 / ||W||_F^2."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import gaussian_kernel_bases

from weight_geometry.alignment import alignment_table
from weight_geometry.multiplicity import benjamini_hochberg


def _record(n_layers: int, d: int, h: int, n_kv: int, d_head: int) -> dict:
    """The ``model.json`` keys alignment_table reads, for one head size and KV-head count."""
    return {"n_layers": n_layers, "d_model": d, "n_heads": h, "n_kv_heads": n_kv,
            "d_head": d_head}


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
    rowspace = _rowspace_eigenvalues(vectors, gates, n_kv=2)
    table = alignment_table(energy, norm2, spectra, rowspace, k,
                            _record(n_layers, d, h, 2, rowspace.shape[-1]), "W_gate")
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
        floor = np.linalg.norm(w @ vt[d - k:].T) ** 2 / np.linalg.norm(w) ** 2
        assert row.floor == pytest.approx(floor, rel=1e-9)
        expected = ((ref - k / d) / (ceiling - k / d) if ref >= k / d
                    else (ref - k / d) / (k / d - floor))
        assert row.normalized == pytest.approx(expected, rel=1e-9)
        assert row.z == pytest.approx((ref - k / d) / row.null_std, rel=1e-9)
        # Conditional null: random k-subspaces of the head's row space Q (all d_head of its
        # vectors), from the projector onto it and the eigenvectors of Q W^T W Q^T.
        q = vectors[row.layer, row.head]
        inside = np.linalg.norm(w @ q.T @ q) ** 2 / np.linalg.norm(w) ** 2
        mu, eig = np.linalg.eigh(q @ w.T @ w @ q.T)
        top, bottom = eig[:, ::-1][:, :k].T @ q, eig[:, :k].T @ q
        chance = k / len(q) * inside
        assert row.conditional_chance == pytest.approx(chance, rel=1e-9)
        assert row.conditional_ratio == pytest.approx(ref / chance, rel=1e-9)
        assert row.conditional_ceiling == pytest.approx(
            np.linalg.norm(w @ top.T) ** 2 / np.linalg.norm(w) ** 2, rel=1e-9)
        assert row.conditional_floor == pytest.approx(
            np.linalg.norm(w @ bottom.T) ** 2 / np.linalg.norm(w) ** 2, rel=1e-9, abs=1e-15)
        assert row.conditional_floor - 1e-12 <= ref <= row.conditional_ceiling + 1e-12
        if k < len(q):
            assert row.conditional_z == pytest.approx((ref - chance) / row.conditional_std,
                                                      rel=1e-9)
        else:   # k = d_head: the top-k subspace is the row space, no test
            assert row.conditional_std == 0 and np.isnan(row.conditional_z)
            assert row.conditional_ratio == pytest.approx(1.0)
    assert table["alignment"].min() > 0 and table["alignment"].max() < 1
    np.testing.assert_allclose(table["conditional_p_adjusted"],
                               benjamini_hochberg(table["conditional_p"]))
    tested = table["conditional_p"].notna()
    assert tested.all() == (k < 6)
    assert (table["conditional_p_adjusted"] >= table["conditional_p"] - 1e-12)[tested].all()


def _rowspace_eigenvalues(vectors, gates, n_kv):
    """``(L, n_kv, d_head)`` eigenvalues of ``Q W^T W Q^T`` for the first head of each KV group
    (its ``d_head`` vectors span the group's row space)."""
    n_layers, h = vectors.shape[:2]
    group = h // n_kv
    return np.stack([[np.linalg.eigvalsh(vectors[ly, j * group] @ gates[ly].T @ gates[ly]
                                         @ vectors[ly, j * group].T) for j in range(n_kv)]
                     for ly in range(n_layers)])


def test_alignment_full_space_is_one_and_isotropic_gate_near_chance():
    d, d_ff = 10, 4000
    basis = np.eye(d)[None, None]                             # (1, 1, d, d): whole space
    rng = np.random.default_rng(0)
    w = rng.standard_normal((d_ff, d))
    energy = np.square(w @ basis[0, 0].T).sum(0)[None, None]
    norm2 = np.array([np.square(w).sum()])
    spectrum = np.linalg.svd(w, compute_uv=False)[None]
    rowspace = np.linalg.eigvalsh(w.T @ w)[None, None]        # the row space is R^d
    model = _record(1, d, 1, 1, d)
    full = alignment_table(energy, norm2, spectrum, rowspace, d, model, "W_up")
    assert full["alignment"].iloc[0] == pytest.approx(1.0)
    assert full["ratio"].iloc[0] == pytest.approx(1.0)
    assert full["conditional_ratio"].iloc[0] == pytest.approx(1.0)
    three = alignment_table(energy, norm2, spectrum, rowspace, 3, model, "W_up")
    assert three["conditional_chance"].iloc[0] == pytest.approx(0.3)
    assert three["chance"].iloc[0] == pytest.approx(0.3)
    assert three["alignment"].iloc[0] == pytest.approx(0.3, abs=0.02)


def _planted_alignment(plant: str, seed: int = 3):
    """Alignment table and conditional verdict of layers of Gaussian W_Q and W_K (4 heads on 2
    KV heads) whose W_gate is planted, through the extraction's kernel path
    (kernels.factored_subspaces, energies from W_gate's Gram):

    - ``rowspace``: W_gate's rows spread isotropically inside KV head 0's row space;
    - ``topk``: W_gate's rows inside head 0's top-k kernel directions."""
    import torch

    from weight_geometry.kernels import factored_subspaces
    from weight_geometry.multiplicity import count_family
    from weight_geometry.verdicts import conditional_alignment_verdict

    rng = np.random.default_rng(seed)
    n_layers, d, h, n_kv, d_head, d_ff, k = 6, 64, 4, 2, 8, 400, 3
    energy, rowspace, norm2, spectra = [], [], [], []
    for _ in range(n_layers):
        w_q = torch.from_numpy(rng.standard_normal((h * d_head, d)))
        w_k = torch.from_numpy(rng.standard_normal((n_kv * d_head, d)))
        f = factored_subspaces(w_q, w_k, h, n_kv, d_head, torch.float64)
        vectors = f.vectors().numpy()
        target = vectors[0, :k] if plant == "topk" else vectors[0]      # (k or d_head, d)
        w_gate = rng.standard_normal((d_ff, len(target))) @ target
        e, mu = f.energies(torch.from_numpy(w_gate.T @ w_gate))
        energy.append(e.numpy())
        rowspace.append(mu.numpy())
        norm2.append(np.square(w_gate).sum())
        spectra.append(np.sqrt(np.clip(np.linalg.eigvalsh(w_gate.T @ w_gate)[::-1], 0, None)))
    table = alignment_table(np.stack(energy), np.array(norm2), np.stack(spectra),
                            np.stack(rowspace), k, _record(n_layers, d, h, n_kv, d_head),
                            "W_gate")
    family = count_family(table["alignment"], table["conditional_chance"],
                          table["conditional_z"], table["conditional_p_adjusted"])
    return table, conditional_alignment_verdict(family, "W_gate", "(layer, head) pairs")


def test_planted_gate_isotropic_in_the_row_space_is_no_coupling_beyond_it():
    """Fixture (a): the isotropic ratio of KV head 0's heads is near d / d_head = 8, the
    conditional ratio near 1, and no (layer, head) survives BH."""
    table, verdict = _planted_alignment("rowspace")
    own = table[table["head"] < 2]                                   # heads of KV head 0
    assert own["ratio"].mean() == pytest.approx(64 / 8, rel=0.15)
    assert own["conditional_ratio"].mean() == pytest.approx(1.0, abs=0.1)
    assert (table["conditional_p_adjusted"] > 0.05).all()
    assert verdict.startswith("No coupling beyond the row space")


def test_planted_gate_in_the_top_k_directions_is_coupled_under_both_nulls():
    """Fixture (b): head 0's alignment is 1 (all of W_gate's energy in its top-k subspace),
    far above both nulls, significant after BH, and the verdict says coupled."""
    table, verdict = _planted_alignment("topk")
    head0 = table[table["head"] == 0]
    np.testing.assert_allclose(head0["alignment"], 1.0, atol=1e-9)
    assert (head0["ratio"] > 10).all() and (head0["conditional_ratio"] > 2).all()
    assert (head0["conditional_p_adjusted"] < 0.05).all()
    assert verdict.startswith("Coupled beyond the row space")
