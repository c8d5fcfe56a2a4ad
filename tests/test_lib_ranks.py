"""Effective rank via the Gram matrix against numpy's SVD and a hand-written exp(entropy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from weight_geometry.ranks import (
    effective_rank_from_singular_values,
    gram,
    kernel_rank_table,
    singular_values_from_gram,
    smaller_side,
)


def _reference_eff_rank(w: np.ndarray) -> float:
    """Roy & Vetterli: exp(-sum p log p), p = sigma / sum(sigma) over nonzero sigma."""
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    s = s[s > s[0] * 1e-6]
    p = s / s.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def _lib_eff_rank(w: np.ndarray, side: str | None = None) -> tuple[float, np.ndarray]:
    side = side or smaller_side(w.shape)
    sigma = singular_values_from_gram(gram(torch.from_numpy(w), side))
    return effective_rank_from_singular_values(sigma, w.shape), sigma


def _matrices():
    rng = np.random.default_rng(42)
    decay = rng.standard_normal((30, 30)) * np.exp(-np.arange(30) / 5)
    low = rng.standard_normal((40, 5)) @ rng.standard_normal((5, 25))      # rank 5
    low_wide = rng.standard_normal((12, 3)) @ rng.standard_normal((3, 50))  # rank 3
    return {
        "tall": rng.standard_normal((50, 20)).astype(np.float32),
        "wide": rng.standard_normal((16, 70)).astype(np.float32),
        "square_decay": decay,
        "rank_deficient_tall": low,
        "rank_deficient_wide": low_wide.astype(np.float32),
    }


@pytest.mark.parametrize("name", list(_matrices()))
def test_effective_rank_matches_numpy_svd(name):
    w = _matrices()[name]
    value, sigma = _lib_eff_rank(w)
    assert value == pytest.approx(_reference_eff_rank(w), rel=1e-7), name
    s_ref = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    assert len(sigma) == min(w.shape), "Gram of the smaller side"
    np.testing.assert_allclose(sigma, s_ref, atol=1e-6 * s_ref[0])


def test_rank_deficient_excludes_zero_singular_values():
    w = _matrices()["rank_deficient_tall"]           # rank 5, 40 x 25
    value, sigma = _lib_eff_rank(w)
    # With equal nonzero singular values the effective rank would be exactly 5; here it is
    # the entropy of the 5 nonzero ones only, so it must be <= 5 (zeros would add nothing
    # but a log(0) NaN or, with tiny noise values, push it above the reference).
    assert 1 < value <= 5 + 1e-9
    assert not np.isnan(value)
    # Exactly-equal nonzero singular values: r_eff = rank.
    q1, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((40, 4)))
    q2, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((25, 4)))
    flat = 3.0 * q1 @ q2.T
    assert _lib_eff_rank(flat)[0] == pytest.approx(4.0, rel=1e-9)


def test_larger_gram_side_gives_same_rank():
    """The FFN input's Gram is always W^T W even when that is the larger side."""
    w = _matrices()["wide"]                          # 16 x 70: 'in' Gram is 70 x 70
    value_in, sigma_in = _lib_eff_rank(w, "in")
    assert len(sigma_in) == 70
    assert value_in == pytest.approx(_reference_eff_rank(w), rel=1e-7)


def test_effective_rank_special_cases():
    assert effective_rank_from_singular_values(np.zeros(4), (4, 4)) == 0.0
    assert effective_rank_from_singular_values(np.array([2.0, 2.0, 2.0]), (3, 3)) == \
        pytest.approx(3.0)
    assert effective_rank_from_singular_values(np.array([5.0, 0.0, 0.0]), (3, 3)) == \
        pytest.approx(1.0)


def test_kernel_rank_table_known_values():
    # (L=2, h=2, d_head=3) singular values with known effective ranks.
    sv = np.array([[[1.0, 1.0, 1.0], [3.0, 1.0, 0.0]],
                   [[4.0, 0.0, 0.0], [2.0, 2.0, 0.0]]])
    p = np.array([0.75, 0.25])
    expected = {(0, 0): 3.0, (0, 1): float(np.exp(-np.sum(p * np.log(p)))),
                (1, 0): 1.0, (1, 1): 2.0}
    table = kernel_rank_table(sv, d_model=16)
    assert list(table.columns) == ["layer", "head", "kernel_eff_rank"]
    assert len(table) == 4
    for row in table.itertuples():
        assert row.kernel_eff_rank == pytest.approx(expected[(row.layer, row.head)])
