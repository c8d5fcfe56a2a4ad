"""kernels.head_subspaces against a naive d x d SVD of each head's kernel W_Q_i^T W_K_j."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from weight_geometry.kernels import head_subspaces

# (d, h, n_kv, d_head): GQA, MHA, MQA, d_head != d // h (larger and smaller).
SHAPES = [(48, 4, 2, 8), (64, 8, 8, 8), (40, 6, 1, 6), (32, 4, 2, 12), (60, 3, 3, 7)]


def _naive(w_q: np.ndarray, w_k: np.ndarray, h: int, n_kv: int, d_head: int):
    """Full SVD of A_i = W_Q_i^T W_K_{i // (h // n_kv)} formed explicitly in float64."""
    group = h // n_kv
    out = []
    for i in range(h):
        j = i // group
        q_i = w_q[i * d_head:(i + 1) * d_head]          # (d_head, d)
        k_j = w_k[j * d_head:(j + 1) * d_head]          # (d_head, d)
        a = q_i.T @ k_j                                  # (d, d)
        _, s, vt = np.linalg.svd(a)
        out.append((s, vt))
    return out


@pytest.mark.parametrize("d,h,n_kv,d_head", SHAPES)
def test_head_subspaces_match_full_svd(d, h, n_kv, d_head):
    rng = np.random.default_rng(1000 + d + h + n_kv + d_head)
    w_q = rng.standard_normal((h * d_head, d))
    w_k = rng.standard_normal((n_kv * d_head, d))
    v, s = head_subspaces(torch.from_numpy(w_q), torch.from_numpy(w_k), h, n_kv, d_head)
    v, s = v.numpy(), s.numpy()
    assert v.shape == (h, d_head, d), "V must be (h, d_head, d)"
    assert s.shape == (h, d_head), "S must be (h, d_head)"
    checked = 0
    for i, (s_ref, vt_ref) in enumerate(_naive(w_q, w_k, h, n_kv, d_head)):
        # Singular values: the d_head nonzero ones, descending; the rest of A_i's are ~0.
        np.testing.assert_allclose(s[i], s_ref[:d_head], rtol=1e-9, atol=1e-9 * s_ref[0])
        assert np.all(s_ref[d_head:] < 1e-9 * s_ref[0]), "kernel rank must be <= d_head"
        assert np.all(np.diff(s[i]) <= 1e-12), "singular values must be descending"
        # Orthonormal rows.
        np.testing.assert_allclose(v[i] @ v[i].T, np.eye(d_head), atol=1e-10)
        for k in range(1, d_head):
            gap = (s_ref[k - 1] - s_ref[k]) / s_ref[0]
            if gap < 1e-3:   # top-k subspace ill-defined: not a fair test at this k
                continue
            p_lib = v[i, :k].T @ v[i, :k]
            p_ref = vt_ref[:k].T @ vt_ref[:k]
            assert np.linalg.norm(p_lib - p_ref) < 1e-8, f"head {i} k={k}: projector differs"
            checked += 1
    assert checked >= h * (d_head - 1) // 2, "too few well-separated k were checked"


def test_gqa_heads_share_row_space_at_full_d_head():
    """At k = d_head the subspace is W_K_j's row space: heads of one KV group coincide."""
    d, h, n_kv, d_head = 48, 4, 2, 8
    rng = np.random.default_rng(7)
    w_q = torch.from_numpy(rng.standard_normal((h * d_head, d)))
    w_k = torch.from_numpy(rng.standard_normal((n_kv * d_head, d)))
    v = head_subspaces(w_q, w_k, h, n_kv, d_head)[0].numpy()
    proj = [vi.T @ vi for vi in v]
    assert np.linalg.norm(proj[0] - proj[1]) < 1e-9, "heads 0, 1 share KV head 0"
    assert np.linalg.norm(proj[2] - proj[3]) < 1e-9, "heads 2, 3 share KV head 1"
    assert np.linalg.norm(proj[0] - proj[2]) > 0.5, "heads of different KV heads differ"
    # The row space of W_K_0, independently: projector from its own QR.
    qk, _ = np.linalg.qr(w_k[:d_head].numpy().T)
    assert np.linalg.norm(proj[0] - qk @ qk.T) < 1e-9


def test_float32_input_stays_float32_and_close():
    d, h, n_kv, d_head = 48, 4, 2, 8
    rng = np.random.default_rng(3)
    w_q = rng.standard_normal((h * d_head, d))
    w_k = rng.standard_normal((n_kv * d_head, d))
    v32, s32 = head_subspaces(torch.from_numpy(w_q).float(), torch.from_numpy(w_k).float(),
                              h, n_kv, d_head)
    assert v32.dtype == torch.float32 and s32.dtype == torch.float32
    ref = _naive(w_q, w_k, h, n_kv, d_head)
    for i in range(h):
        np.testing.assert_allclose(s32[i].numpy(), ref[i][0][:d_head], rtol=1e-4)
