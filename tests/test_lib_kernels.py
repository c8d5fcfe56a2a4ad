"""kernels.head_subspaces against a naive d x d SVD of each head's kernel W_Q_i^T W_K_j."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DEVICES, naive_kernel, naive_kernel_svd

from weight_geometry import kernels, ranks
from weight_geometry.kernels import (
    GRAM_KAPPA_MAX,
    factored_subspaces,
    head_subspaces,
    query_r_factors,
    thin_qr,
)

# (d, h, n_kv, d_head): GQA, MHA, MQA, d_head != d // h (larger and smaller).
# The last: a real model's d_head, whose cores take other LAPACK/cuSOLVER routines than
# small ones (on CUDA, batched Jacobi solvers serve n <= 32).
SHAPES = [(48, 4, 2, 8), (64, 8, 8, 8), (40, 6, 1, 6), (32, 4, 2, 12), (60, 3, 3, 7),
          (160, 4, 2, 64)]


def _check_against_naive(w_q, w_k, h, n_kv, d_head, min_checked_fraction=0.5, device="cpu"):
    d = w_q.shape[1]
    v, s = head_subspaces(torch.from_numpy(w_q).to(device), torch.from_numpy(w_k).to(device),
                          h, n_kv, d_head)
    v, s = v.cpu().numpy(), s.cpu().numpy()
    assert v.shape == (h, d_head, d), "V must be (h, d_head, d)"
    assert s.shape == (h, d_head), "S must be (h, d_head)"
    checked = 0
    for i in range(h):
        s_ref, vt_ref = naive_kernel_svd(w_q, w_k, i, d_head)
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
    assert checked >= h * (d_head - 1) * min_checked_fraction, "too few separated k checked"


@pytest.mark.parametrize("panel", [kernels.HEAD_GRAM_PANEL, 5])  # one panel; several
@pytest.mark.parametrize("d,h,n_kv,d_head", SHAPES)
@pytest.mark.parametrize("device", DEVICES)
def test_head_subspaces_match_full_svd(monkeypatch, d, h, n_kv, d_head, panel, device):
    monkeypatch.setattr(kernels, "HEAD_GRAM_PANEL", panel)
    rng = np.random.default_rng(1000 + d + h + n_kv + d_head)
    w_q = rng.standard_normal((h * d_head, d))
    w_k = rng.standard_normal((n_kv * d_head, d))
    _check_against_naive(w_q, w_k, h, n_kv, d_head, device=device)


def _record_inputs(monkeypatch, name: str) -> list[np.ndarray]:
    """Every input of ``torch.linalg.<name>`` (a fallback: ``qr``, ``svd``) from now on, as
    numpy."""
    inputs = []
    original = getattr(torch.linalg, name)

    def recording(x, *args, **kwargs):
        inputs.append(x.cpu().numpy())
        return original(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, name, recording)
    return inputs


def _with_condition(rng, rows: int, cols: int, kappa: float) -> np.ndarray:
    """A (rows, cols) matrix with singular values log-spaced from 1 down to 1 / kappa."""
    u, _ = np.linalg.qr(rng.standard_normal((rows, rows)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, rows)))
    return (u * np.logspace(0, -np.log10(kappa), rows)) @ v.T


@pytest.mark.parametrize("device", DEVICES)
def test_rank_deficient_and_ill_conditioned_query_heads(monkeypatch, device):
    """Head 0: a zero row and a duplicated row (singular Gram: Cholesky fails); head 1:
    cond 1e6 (Cholesky succeeds but would lose 1e-4); head 3: cond 1e3 (Cholesky kept).
    All must match the naive SVD, and the fallback must really be taken."""
    d, h, n_kv, d_head = 40, 4, 2, 6
    rng = np.random.default_rng(11)
    w_q = rng.standard_normal((h * d_head, d))
    w_q[0] = 0.0
    w_q[2] = w_q[1]
    w_q[d_head:2 * d_head] = _with_condition(rng, d_head, d, 1e6)
    w_q[3 * d_head:] = _with_condition(rng, d_head, d, 1e3)
    w_k = rng.standard_normal((n_kv * d_head, d))
    q_t = torch.from_numpy(w_q).reshape(h, d_head, d).transpose(1, 2)
    gram = q_t.transpose(1, 2) @ q_t
    on_device = q_t.to(device)         # the fallback decisions as the device takes them
    cholesky, info = (t.cpu() for t in torch.linalg.cholesky_ex(
        on_device.transpose(1, 2) @ on_device, upper=True))
    r_householder = torch.linalg.qr(q_t, mode="r")[1]
    householder_inputs = _record_inputs(monkeypatch, "qr")
    r = query_r_factors(on_device).cpu()
    assert len(householder_inputs) == 1, "one Householder QR, of the rejected heads"
    np.testing.assert_array_equal(householder_inputs[0], q_t[[0, 1]].numpy(),
                                  err_msg="heads 0 and 1, and only they, fall back")
    for i in range(h):
        # Any R of a QR has R^T R = X^T X. At full rank R is unique up to the signs of its
        # rows, so it equals Householder's; head 0 is rank-deficient, and the rows of its R
        # after the lost pivots are rounding noise (equal on the CPU only because the same
        # LAPACK routine runs twice).
        np.testing.assert_allclose((r[i].T @ r[i]).numpy(), gram[i].numpy(),
                                   atol=1e-12 * float(gram[i].abs().max()))
        if i != 0:  # forward error of R up to eps kappa (1e-10 at head 1's kappa 1e6)
            np.testing.assert_allclose(r[i].abs().numpy(), r_householder[i].abs().numpy(),
                                       atol=1e-9 * float(r_householder[i].abs().max()))
    kappa = cholesky.diagonal(dim1=1, dim2=2)
    kappa = kappa.amax(1) / kappa.amin(1)
    assert info[0] != 0 or not kappa[0] <= GRAM_KAPPA_MAX, "head 0 must fall back"
    assert info[1] != 0 or not kappa[1] <= GRAM_KAPPA_MAX, "head 1 must fall back"
    assert info[3] == 0 and kappa[3] <= GRAM_KAPPA_MAX, "head 3 must keep Cholesky"
    _check_against_naive(w_q, w_k, h, n_kv, d_head, min_checked_fraction=0.25, device=device)


@pytest.mark.parametrize("block", [256, 10])   # one block of G's rows; several, a partial last
@pytest.mark.parametrize("device", DEVICES)
def test_energies_equal_diag_v_g_vt(monkeypatch, block, device):
    """Per-KV-head energies equal the direct diag(V G V^T) with the d x d Gram, and read only
    its upper triangle."""
    monkeypatch.setattr(kernels, "ENERGY_BLOCK", block)
    d, h, n_kv, d_head, d_ff = 48, 6, 2, 8, 70
    rng = np.random.default_rng(5)
    w_q = torch.from_numpy(rng.standard_normal((h * d_head, d))).to(device)
    w_k = torch.from_numpy(rng.standard_normal((n_kv * d_head, d))).to(device)
    w_in = rng.standard_normal((d_ff, d)) * np.linspace(0.1, 3.0, d)   # anisotropic columns
    g = torch.from_numpy(w_in.T @ w_in).to(device)
    f = factored_subspaces(w_q, w_k, h, n_kv, d_head)
    v = f.vectors().cpu().numpy()
    direct = np.einsum("hrd,hrd->hr", v @ w_in.T, v @ w_in.T)     # ||W_in v||^2
    energy, rowspace = f.energies(g)
    np.testing.assert_allclose(energy.cpu().numpy(), direct, rtol=1e-10)
    # The row-space spectrum: eigenvalues of Q_j G Q_j^T with Q_j an orthonormal basis of
    # W_K_j's row space from numpy's QR, descending.
    w_k_np = w_k.cpu().numpy()
    for j in range(n_kv):
        q = np.linalg.qr(w_k_np[j * d_head:(j + 1) * d_head].T)[0]
        expected = np.linalg.eigvalsh(q.T @ (w_in.T @ w_in) @ q)[::-1]
        np.testing.assert_allclose(rowspace[j].cpu().numpy(), expected, rtol=1e-9)
    lower = torch.tril(torch.from_numpy(rng.standard_normal((d, d))), -1).to(device)
    upper_only = torch.triu(g) + lower
    energy_upper, rowspace_upper = f.energies(upper_only)
    np.testing.assert_allclose(energy_upper.cpu().numpy(), direct, rtol=1e-10)
    np.testing.assert_allclose(rowspace_upper.cpu().numpy(), rowspace.cpu().numpy(), rtol=1e-10)
    assert f.singular_values.shape == (h, d_head)


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
    for i in range(h):
        s_ref, _ = naive_kernel_svd(w_q, w_k, i, d_head)
        np.testing.assert_allclose(s32[i].numpy(), s_ref[:d_head], rtol=1e-4)


def test_half_precision_input_is_computed_in_float32():
    """bf16 and fp16 weights (as checkpoints store them) give their exact values' subspaces
    in float32: a kernel computed in bf16 was about 1 % off."""
    d, h, n_kv, d_head = 48, 4, 2, 8
    rng = np.random.default_rng(5)
    for half in (torch.bfloat16, torch.float16):
        w_q = torch.from_numpy(rng.standard_normal((h * d_head, d))).to(half)
        w_k = torch.from_numpy(rng.standard_normal((n_kv * d_head, d))).to(half)
        v, s = head_subspaces(w_q, w_k, h, n_kv, d_head)
        assert v.dtype == torch.float32 and s.dtype == torch.float32
        for i in range(h):
            s_ref, vt_ref = naive_kernel_svd(w_q.double().numpy(), w_k.double().numpy(), i,
                                             d_head)
            np.testing.assert_allclose(s[i].numpy(), s_ref[:d_head], rtol=1e-4)
            top = v[i, :4].double().numpy()      # a top-4 subspace (random spectra: gapped)
            ref_top = vt_ref[:4]
            assert np.linalg.norm(top.T @ top - ref_top.T @ ref_top) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_core_svd_gram_route_and_svd_fallback(monkeypatch, device):
    """Cores of cond 1, 1e3 (eigh of the Gram), 1e6 and a singular one (LAPACK's SVD, only
    those two): singular values and vectors equal numpy's SVD, the fallback's at a precision
    the squared condition could not give."""
    rng = np.random.default_rng(17)
    n = 12
    core = np.stack([rng.standard_normal((n, n)), _with_condition(rng, n, n, 1e3),
                     _with_condition(rng, n, n, 1e6), rng.standard_normal((n, n))])
    core[3, 4] = core[3, 7]                              # singular
    svd_inputs = _record_inputs(monkeypatch, "svd")
    s, vc_t = (t.cpu() for t in kernels.core_svd(torch.from_numpy(core).to(device)))
    assert [len(x) for x in svd_inputs] == [2], "only the two ill-conditioned cores take the SVD"
    for b in range(len(core)):
        _, s_ref, vt_ref = np.linalg.svd(core[b])
        np.testing.assert_allclose(s[b], s_ref, rtol=1e-8 if b < 2 else 1e-12,
                                   atol=1e-14 * s_ref[0])
        np.testing.assert_allclose(vc_t[b] @ vc_t[b].T, np.eye(n), atol=1e-13)
        cosines = np.abs(np.sum(vc_t[b].numpy() * vt_ref, axis=1))
        np.testing.assert_allclose(cosines, 1.0, atol=1e-9 if b < 2 else 1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_weights_computed_in_float64(monkeypatch, device):
    """float32 W_Q and W_K with dtype=float64 (as extraction runs them: W_Q's Grams cast it
    by row blocks, several here, and a falling-back head casts its own rows) give the float64
    result of the same values."""
    monkeypatch.setattr(ranks, "GRAM_BLOCK", 7)
    d, h, n_kv, d_head = 40, 4, 2, 6
    rng = np.random.default_rng(12)
    w_q = rng.standard_normal((h * d_head, d)).astype(np.float32)
    w_q[0] = 0.0                                         # head 0 falls back to Householder
    w_k = rng.standard_normal((n_kv * d_head, d)).astype(np.float32)
    w_q, w_k = torch.from_numpy(w_q).to(device), torch.from_numpy(w_k).to(device)
    f32_in = factored_subspaces(w_q, w_k, h, n_kv, d_head, torch.float64)
    f64_in = factored_subspaces(w_q.double(), w_k.double(), h, n_kv, d_head)
    assert f32_in.q_k.dtype == f32_in.singular_values.dtype == torch.float64
    np.testing.assert_allclose(f32_in.singular_values.cpu(), f64_in.singular_values.cpu(),
                               rtol=1e-12)
    v32, v64 = f32_in.vectors(), f64_in.vectors()
    assert v32.dtype == torch.float64
    np.testing.assert_allclose((v32.transpose(1, 2) @ v32).cpu().numpy(),
                               (v64.transpose(1, 2) @ v64).cpu().numpy(), atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_vectors_from_float64_factors(device):
    """vectors(float32) maps back in float32: within a few float32 ulps of the unit norm of
    the float64 vectors (a float64 product rounded is within half an ulp per entry), and
    orthonormal to the same level; this is what extraction stores."""
    d, h, n_kv, d_head = 512, 4, 2, 64
    rng = np.random.default_rng(13)
    cols = np.logspace(-1, 1, d)                         # anisotropic, like trained weights
    w_q = torch.from_numpy(rng.standard_normal((h * d_head, d)) * cols).to(device)
    w_k = torch.from_numpy(rng.standard_normal((n_kv * d_head, d)) * cols).to(device)
    f = factored_subspaces(w_q, w_k, h, n_kv, d_head)
    v64, v32 = f.vectors().cpu(), f.vectors(torch.float32).cpu()
    assert v32.dtype == torch.float32 and v32.shape == (h, d_head, d)
    eps32 = float(np.finfo(np.float32).eps)
    row_error = (v32.double() - v64).norm(dim=-1)
    assert float(row_error.max()) < 8 * eps32
    gram = v32.double() @ v32.double().transpose(1, 2)
    np.testing.assert_allclose(gram.numpy(), np.broadcast_to(np.eye(d_head), gram.shape),
                               atol=8 * eps32)


@pytest.mark.parametrize("device", DEVICES)
def test_thin_qr_matches_householder_and_falls_back(monkeypatch, device):
    """CholeskyQR2 (kappa 1, 1e3) and the Householder fallback (kappa 1e6, rank-deficient),
    each taken by exactly those matrices: Q orthonormal to 1e-13, Q R = X, and Q, R equal
    Householder's up to column/row signs."""
    rng = np.random.default_rng(21)
    n, m = 60, 8
    x = np.stack([rng.standard_normal((n, m)), _with_condition(rng, m, n, 1e3).T,
                  _with_condition(rng, m, n, 1e6).T, rng.standard_normal((n, m))])
    x[3, :, 5] = x[3, :, 2]                              # rank-deficient: Cholesky fails
    q_h, r_h = torch.linalg.qr(torch.from_numpy(x))
    householder_inputs = _record_inputs(monkeypatch, "qr")
    q, r = (t.cpu() for t in thin_qr(torch.from_numpy(x).to(device)))
    assert len(householder_inputs) == 1, "one Householder QR, of the rejected matrices"
    np.testing.assert_array_equal(householder_inputs[0], x[[2, 3]],
                                  err_msg="matrices 2 and 3, and only they, fall back")
    for b in range(len(x)):
        np.testing.assert_allclose(q[b].T @ q[b], np.eye(m), atol=1e-13)
        np.testing.assert_allclose(q[b] @ r[b], x[b], atol=1e-13 * np.abs(x[b]).max())
        if b < 3:   # full rank: the factorization is unique up to signs
            signs = torch.sign(r[b].diagonal() * r_h[b].diagonal())
            np.testing.assert_allclose(q[b] * signs, q_h[b], atol=1e-9)
            np.testing.assert_allclose(r[b] * signs[:, None], r_h[b],
                                       atol=1e-12 * float(r_h[b].abs().max()))
    q32, r32 = (t.cpu() for t in thin_qr(torch.from_numpy(x[:2]).float().to(device)))
    assert q32.dtype == torch.float32 and r32.dtype == torch.float32
    np.testing.assert_allclose(q32[0].T @ q32[0], np.eye(m), atol=1e-6)


def _check_two_sided(c, reference, i: int, rtol: float = 1e-9):
    """Head ``i`` of a :class:`kernels.TwoSidedSVD` against its formed float64 ``(d, d)`` map:
    the ``d_head`` singular values, orthonormal rows on both sides, and ``left^T S right``
    rebuilding the map."""
    s_ref = np.linalg.svd(reference, compute_uv=False)
    left, right, s = (x[i].cpu().double().numpy() for x in (c.left, c.right,
                                                              c.singular_values))
    m = len(s)
    np.testing.assert_allclose(s, s_ref[:m], rtol=rtol, atol=rtol * s_ref[0])
    for rows in (left, right):
        np.testing.assert_allclose(rows @ rows.T, np.eye(m), atol=1e-5)
    np.testing.assert_allclose(left.T @ np.diag(s) @ right, reference, atol=1e-5 * s_ref[0])


@pytest.mark.parametrize("d,h,n_kv,d_head", SHAPES)
@pytest.mark.parametrize("device", DEVICES)
def test_ov_and_qk_circuits_match_formed_maps(d, h, n_kv, d_head, device):
    """ov_circuits: both sides of every head's W_O_i W_V_j (its KV head's W_V rows); the
    kernel's two sides from circuit_svd(W_Q, W_K), against the d x d maps formed in float64
    (float32 vectors: their products to 1e-5 of sigma_1)."""
    rng = np.random.default_rng(2000 + d + h + n_kv + d_head)
    w_q, w_o_t = (rng.standard_normal((h * d_head, d)) for _ in range(2))
    w_k, w_v = (rng.standard_normal((n_kv * d_head, d)) for _ in range(2))
    ov = kernels.ov_circuits(torch.from_numpy(w_o_t.T.copy()).to(device),
                             torch.from_numpy(w_v).to(device), h, n_kv, d_head)
    qk = kernels.circuit_svd(torch.from_numpy(w_q).to(device), torch.from_numpy(w_k).to(device),
                             h, n_kv, d_head)
    assert ov.left.dtype == ov.right.dtype == torch.float32
    assert ov.left.shape == ov.right.shape == (h, d_head, d)
    for i in range(h):
        _check_two_sided(ov, naive_kernel(w_o_t, w_v, i, d_head), i)
        _check_two_sided(qk, naive_kernel(w_q, w_k, i, d_head), i)


def test_ov_circuits_of_a_zero_head_are_zero():
    """A head whose W_O columns are zero: zero singular values and zero write rows, no NaN."""
    rng = np.random.default_rng(3)
    w_o, w_v = rng.standard_normal((24, 12)), rng.standard_normal((6, 24))
    w_o[:, :6] = 0
    ov = kernels.ov_circuits(torch.from_numpy(w_o), torch.from_numpy(w_v), 2, 1, 6)
    assert torch.all(ov.singular_values[0] == 0) and torch.all(ov.left[0] == 0)
    assert torch.isfinite(ov.right).all() and torch.all(ov.singular_values[1] > 0)


def test_emit_ov_circuits_drops_w_o_before_the_read_side():
    """emit_ov_circuits pops W_O and W_V and hands over each part as ov_circuits returns it;
    W_O is freed once the write side is handed over, before the read side is formed."""
    import weakref

    gen = torch.Generator().manual_seed(3)
    w_o, w_v = torch.randn(24, 4 * 6, generator=gen), torch.randn(2 * 6, 24, generator=gen)
    expected = kernels.ov_circuits(w_o, w_v, 4, 2, 6)
    weights = {"W_O": w_o.clone(), "W_V": w_v.clone()}
    ref, parts = weakref.ref(weights["W_O"]), {}

    def emit(name, tensor):
        if name == "ov_read_vectors":
            assert ref() is None, "W_O still held"
        parts[name] = tensor

    kernels.emit_ov_circuits(weights, emit, 4, 2, 6)
    assert weights == {} and list(parts) == ["ov_singular_values", "ov_write_vectors",
                                             "ov_read_vectors"]
    for name, side in [("ov_write_vectors", expected.left), ("ov_read_vectors", expected.right),
                       ("ov_singular_values", expected.singular_values)]:
        assert torch.equal(parts[name], side), name
