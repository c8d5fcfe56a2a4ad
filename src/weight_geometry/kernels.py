"""Per-head attention subspaces from the factored kernel, all heads of a layer batched.

For query head ``i`` with key/value head ``j = i // g`` (``g = h // n_kv`` heads per KV head)
the attention kernel is ``A_i = W_Q_i^T W_K_j``, shape ``(d, d)``, rank <= ``d_head`` (the
bilinear form ``x_q^T A_i x_k`` of the score before RoPE and scaling). It is never formed:

    W_K_j^T = Q_k R_k                  (thin QR, Q_k is d x d_head, once per KV head)
    W_Q_i^T = Q_q R_q                  (R_q only: upper Cholesky factor of W_Q_i W_Q_i^T)
    A_i = Q_q (R_q R_k^T) Q_k^T,  R_q R_k^T = U S Vc^T   (SVD of a d_head x d_head core)
    => A_i = (Q_q U) S (Q_k Vc)^T

so the right singular vectors of ``A_i`` are the rows of ``Vc^T Q_k^T`` with singular values
``S``. ``Q_q`` is never needed, so ``R_q`` comes from the small Gram ``W_Q_i W_Q_i^T``
(``d_head x d_head``, its upper triangle in panels, all heads batched) by Cholesky, in float64
whatever the input dtype. This squares the condition number of ``W_Q_i``: ``R_q`` is exact to
``eps64 kappa^2``, harmless below ``kappa = 1e4`` (2e-8). A head whose Cholesky fails
(rank-deficient ``W_Q_i``: a singular Gram) or whose ``R_q`` diagonal spans more than
:data:`GRAM_KAPPA_MAX` (a lower bound of kappa) gets ``R_q`` from a Householder QR instead.
Either ``R_q`` equals ``Q^T W_Q_i^T`` up to the signs of its rows, which change ``U`` but
neither ``S`` nor ``Vc``. The cores' ``S`` and ``Vc`` come from ``eigh`` of their Grams under
the same bound on their condition, from an SVD above it (:func:`core_svd`); ``U`` is never
computed.

The key factors come from CholeskyQR2 (:func:`thin_qr`), with the same Householder fallback.
Heads sharing KV head ``j`` are batched against the one ``R_k_j``/``Q_k_j`` (no per-head copies).
Cost per layer: ``h d_head d (d_head + p)`` for the query Grams (``p`` =
:data:`HEAD_GRAM_PANEL`), ``O(n_kv d d_head^2)`` for the key QRs, ``O(h d_head^3)`` for the
Cholesky factors and cores, ``2 h d_head^2 d`` to map ``Vc`` back to ``R^d``; versus
``O(h d^3)`` for a full SVD of each kernel. Memory O(h d d_head).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .ranks import gram

#: Largest condition number for which a factor is taken from a Gram matrix, which squares it
#: (Cholesky QR of W_Q_i and W_K_j, tested on R's diagonal, a lower bound of kappa; ``eigh`` of
#: a core's Gram, tested on its exact eigenvalue ratio): errors ``eps64 kappa^2 <= 2e-8``.
GRAM_KAPPA_MAX = 1e4
#: Columns per panel of the per-head Grams' upper triangle (:func:`_gram64`): at ``m = d_head =
#: 128`` it multiplies 62.5 % of a full Gram's flops; 16 query heads of Qwen2.5-3B (d = 2048),
#: one thread: 58 ms instead of 72-82 ms for a float64 copy and a batched GEMM (panels of 64:
#: 61 ms, of 16: 63 ms).
HEAD_GRAM_PANEL = 32
#: Rows of the FFN Gram's upper triangle per panel in :meth:`FactoredSubspaces.energies`, each
#: cast to the subspaces' dtype (at most 4 MiB of float64 at d = 2048, instead of a float64 copy
#: of the whole Gram).
ENERGY_BLOCK = 256


@dataclass
class FactoredSubspaces:
    """Every head's kernel SVD of one layer, factored through its KV head's row space.

    ``q_k``: ``(n_kv, d, d_head)``, orthonormal columns spanning the rows of ``W_K_j``;
    ``core_vectors``: ``(n_kv, g, d_head, d_head)``, row ``r`` of ``[j, m]`` is query head
    ``j * g + m``'s r-th right singular vector in the ``q_k[j]`` basis (``Vc^T``);
    ``singular_values``: ``(h, d_head)``, descending;
    ``r_k``: ``(n_kv, d_head, d_head)``, ``W_K_j^T = Q_k_j R_k_j`` (:meth:`left_vectors`).
    """

    q_k: torch.Tensor
    core_vectors: torch.Tensor
    singular_values: torch.Tensor
    r_k: torch.Tensor | None = None

    def vectors(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(h, d_head, d)`` right singular vectors in ``R^d``: ``Vc^T Q_k^T``, computed and
        returned in ``dtype`` (default ``q_k``'s); cost ``2 h d_head^2 d``, memory the result.

        In float32 from float64 factors, each entry is a float32 sum of ``d_head`` products:
        its error is a few float32 ulps of the vector's unit norm, the precision at which the
        stored vectors are used (their squared cosines are float32 products, summed over
        ``d``), against half an ulp for a float64 product rounded. On this CPU the float32
        product takes 33 ms instead of 66 ms at Qwen2.5-3B shapes (one thread).
        """
        n_kv, group, d_head, _ = self.core_vectors.shape
        dtype = dtype or self.q_k.dtype
        flat = self.core_vectors.reshape(n_kv, group * d_head, d_head).to(dtype)
        return (flat @ self.q_k.to(dtype).transpose(1, 2)).reshape(n_kv * group, d_head, -1)

    def left_vectors(self, w_q: torch.Tensor, dtype: torch.dtype | None = None
                     ) -> torch.Tensor:
        """``(h, d_head, d)`` left singular vectors of each kernel ``A_i = W_Q_i^T W_K_j``
        (rows; ``w_q`` the ``(h d_head, d)`` query projection these subspaces came from):
        ``u_r = A_i v_r / s_r``, and ``A_i v_r = W_Q_i^T R_k_j^T c_r`` (``c_r`` the core vector,
        as ``W_K_j = R_k_j^T Q_k_j^T``), so neither ``Q_q`` nor ``A_i`` is formed. The small
        ``(d_head, d_head)`` coefficients ``c_r^T R_k_j / s_r`` in ``q_k``'s dtype, their
        product with ``W_Q_i`` in ``dtype`` (default ``q_k``'s; float32 as the stored vectors,
        :meth:`vectors`): ``s_r u_r`` is exact to about ``eps s_1`` (all a Frobenius norm of a
        product with ``A_i`` needs), ``u_r`` alone to ``eps s_1 / s_r``; a zero ``s_r`` gives a
        zero row. Cost ``2 h d_head^2 (d + d_head)``."""
        n_kv, group, d_head, _ = self.core_vectors.shape
        dtype = dtype or self.q_k.dtype
        s = self.singular_values.to(self.r_k.dtype)
        inverse = torch.where(s > 0, 1 / s, torch.zeros_like(s))
        coefficients = (self.core_vectors.reshape(n_kv, group * d_head, d_head) @ self.r_k)
        coefficients = coefficients.reshape(n_kv * group, d_head, d_head) * inverse[..., None]
        return coefficients.to(dtype) @ w_q.reshape(n_kv * group, d_head, -1).to(dtype)

    def energies(self, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, d_head)`` quadratic forms ``v^T G v`` of every right singular vector ``v``, and
        ``(n_kv, d_head)`` eigenvalues of each ``G_j`` (descending): the spectrum of ``G``
        restricted to KV head ``j``'s row space, which the row-space-conditional null of the
        alignment needs (:mod:`rowspace_nulls`; ``eigvalsh`` of ``n_kv`` ``d_head x d_head``
        matrices, ``O(n_kv d_head^3)`` more).

        ``G`` is a ``(d, d)`` symmetric matrix (the FFN input's Gram ``W_in^T W_in``); only its
        upper triangle is read. Every ``v`` of KV group ``j`` lies in ``span(Q_k_j)``, so
        ``v^T G v = c^T G_j c`` with ``G_j = Q_k_j^T G Q_k_j`` (``d_head x d_head``) and ``c``
        its core vector. With ``G = T + T^T``, ``T = triu(G, 1) + diag(G) / 2``, ``G_j = M_j +
        M_j^T`` where ``M_j = Q_k_j^T (T Q_k_j)``, and ``T Q_k`` is taken by row panels of
        :data:`ENERGY_BLOCK` rows of ``G``'s upper triangle, each cast to ``q_k``'s dtype.
        Computed in that dtype; cost ``n_kv d^2 d_head + 2 h d_head^3`` (half of ``G Q_k``)
        instead of ``2 h d_head d^2`` for ``diag(V G V^T)``. Memory: ``T Q_k`` and one panel.
        """
        q_k, dtype = self.q_k, self.q_k.dtype
        n_kv, d, d_head = q_k.shape
        q_all = q_k.transpose(0, 1).reshape(d, n_kv * d_head)    # every Q_k_j side by side
        t_q = torch.empty_like(q_all)                            # T Q_k, (d, n_kv d_head)
        for c in range(0, d, ENERGY_BLOCK):
            end = c + ENERGY_BLOCK
            block = gram[c:end, c:end].to(dtype).triu()
            block.diagonal().mul_(0.5)
            t_q[c:end] = block @ q_all[c:end] + gram[c:end, end:].to(dtype) @ q_all[end:]
        m = q_k.transpose(1, 2) @ t_q.reshape(d, n_kv, d_head).transpose(0, 1)
        return self.rowspace_energies(m + m.transpose(1, 2))

    def rowspace_energies(self, g_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """From ``g_kv`` ``(..., n_kv, d_head, d_head)``, a Gram ``G`` restricted to each KV
        head's row space (``G_j = Q_k_j^T G Q_k_j``, in ``q_k``'s dtype; leading axes: one per
        weight): every head's ``(..., h, d_head)`` energies ``c^T G_j c`` and the ``(..., n_kv,
        d_head)`` eigenvalues of each ``G_j``, descending. Cost ``2 h d_head^3 + O(n_kv
        d_head^3)`` per weight."""
        n_kv, group, d_head, _ = self.core_vectors.shape
        flat = self.core_vectors.reshape(n_kv, group * d_head, d_head)
        energy = ((flat @ g_kv) * flat).sum(-1)
        return (energy.reshape(*g_kv.shape[:-3], n_kv * group, d_head),
                torch.linalg.eigvalsh(g_kv).flip(-1))

    def weight_energies(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`energies` of ``G = W^T W`` for a weight ``W`` ``(n, d)`` of ``n >= d_head``
        rows (an expert's W_gate), without its ``d x d`` Gram: ``P = W Q_k`` (``n x n_kv
        d_head``, a GEMM in ``W``'s dtype), ``G_j = P_j^T P_j`` in ``q_k``'s. Cost ``2 n d n_kv
        d_head + n n_kv d_head^2 + 2 h d_head^3`` against ``n d^2`` for ``G`` itself; memory
        ``P``."""
        p = self._project(w)                                    # (n_kv, n, d_head)
        return self.rowspace_energies(p.transpose(1, 2) @ p)

    def row_energies(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row ``w_e`` of ``W`` ``(n, d)`` (a router's rows) as a weight of its own:
        ``(n, h, d_head)`` energies ``(v^T w_e)^2`` and ``(n, n_kv, d_head)`` eigenvalues of
        its rank-one ``G_j``, ``||Q_k_j^T w_e||^2`` then zeros. Cost ``2 n d n_kv d_head + 2 n
        h d_head^2``."""
        n_kv, group, d_head, _ = self.core_vectors.shape
        p = self._project(w)                                    # (n_kv, n, d_head)
        flat = self.core_vectors.reshape(n_kv, group * d_head, d_head)
        energy = torch.square(p @ flat.transpose(1, 2))         # (n_kv, n, g d_head)
        energy = energy.transpose(0, 1).reshape(w.shape[0], n_kv * group, d_head)
        eigenvalues = torch.zeros(w.shape[0], n_kv, d_head, dtype=p.dtype, device=p.device)
        eigenvalues[..., 0] = torch.square(p).sum(-1).T
        return energy, eigenvalues

    def _project(self, w: torch.Tensor) -> torch.Tensor:
        """``(n_kv, n, d_head)`` coordinates ``W Q_k_j`` of the rows of ``W`` ``(n, d)`` in each
        KV row space: one GEMM in ``W``'s dtype (at least float32), returned in ``q_k``'s."""
        dtype = torch.promote_types(w.dtype, torch.float32)
        n_kv, d, d_head = self.q_k.shape
        q_all = self.q_k.transpose(0, 1).reshape(d, n_kv * d_head).to(dtype)
        p = (w.to(dtype) @ q_all).to(self.q_k.dtype)
        return p.reshape(-1, n_kv, d_head).transpose(0, 1)


def _gram64(x: torch.Tensor) -> torch.Tensor:
    """Float64 Gram ``x_b^T x_b`` of each ``(n, m)`` matrix of ``x`` (``(b, n, m)``, any float
    dtype, cast in row blocks): :func:`ranks.gram`'s upper triangle in panels of
    :data:`HEAD_GRAM_PANEL` columns, cost ``b n m (m + p)``."""
    return gram(x, "in", torch.float64, HEAD_GRAM_PANEL)


def _cholesky_r(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of each float64 Gram ``x_b^T x_b`` (``x``: ``(b, n, m)``) and
    whether it may stand for a QR's ``R``: Cholesky succeeded and the diagonal spans at most
    :data:`GRAM_KAPPA_MAX`. Cost ``b n m (m + p) + b m^3 / 3`` (:func:`_gram64`)."""
    r, info = torch.linalg.cholesky_ex(_gram64(x), upper=True)
    diag = r.diagonal(dim1=1, dim2=2)
    return r, (info == 0) & (diag.amax(1) <= GRAM_KAPPA_MAX * diag.amin(1))


def query_r_factors(q_t: torch.Tensor) -> torch.Tensor:
    """``R`` of the thin QR of each ``W_Q_i^T`` (``q_t``: ``(h, d, d_head)``), float64.

    Upper Cholesky factor of ``W_Q_i W_Q_i^T`` where it is well conditioned, Householder
    ``R`` (``mode="r"``) for the other heads (see module docstring). Cost ``h d_head d (d_head
    + p)`` (:func:`_gram64`) plus ``h d_head^3 / 3``; memory ``h d_head^2`` and one row block
    of ``q_t`` in float64 (no float64 copy of a float32 ``W_Q``, except of the heads that fall
    back).
    """
    r, ok = _cholesky_r(q_t)
    if not ok.all():
        r[~ok] = torch.linalg.qr(q_t[~ok].to(torch.float64), mode="r")[1]
    return r


def thin_qr(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR ``x_b = Q_b R_b`` of each ``(n, m)`` matrix of ``x`` (``(b, n, m)``, ``n >= m``),
    computed in float64, returned in ``x``'s dtype.

    CholeskyQR2 where :func:`_cholesky_r` accepts the Gram: ``Q1 = x R1^{-1}`` loses
    orthogonality only to ``eps64 kappa^2`` (<= 2e-8 at ``kappa = 1e4``), and a second
    Cholesky QR of the well-conditioned ``Q1`` brings it back to ``eps64``: ``Q = Q1 R2^{-1}``,
    ``R = R2 R1``. Householder QR for the other matrices. Cost about ``2 b n m (m + p) + 2 b n
    m^2`` (two upper-triangle Grams, :func:`_gram64`; two triangular solves) instead of
    Householder's ``4 b n m^2`` of slower, BLAS-2-bound work: 8 ms instead of 20 ms for two
    2048 x 128 key heads on an Intel Xeon (2 cores); on the AMD EPYC of benchmarks/RESULTS.md
    both take 20 ms (2 threads), 35 and 30 ms (1 thread).
    """
    x64 = x.to(torch.float64)
    r, ok = _cholesky_r(x64)
    # CholeskyQR2 of every matrix, without masked copies; the rejected ones' (possibly NaN)
    # results are then overwritten by Householder's.
    q1 = torch.linalg.solve_triangular(r, x64, upper=True, left=False)
    r2 = torch.linalg.cholesky_ex(_gram64(q1), upper=True)[0]
    q = torch.linalg.solve_triangular(r2, q1, upper=True, left=False)
    r = r2 @ r
    if not ok.all():
        q[~ok], r[~ok] = torch.linalg.qr(x64[~ok])
    return q.to(x.dtype), r.to(x.dtype)


def core_svd(core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values ``(b, n)`` (descending) and right singular vectors ``Vc^T`` ``(b, n, n)``
    (rows) of each ``(n, n)`` core of ``core`` (``(b, n, n)``), without the left ones; computed
    in float64, returned in ``core``'s dtype.

    From ``eigh`` of the Gram ``C^T C = Vc S^2 Vc^T`` (float64), which squares ``kappa =
    cond(C)``: ``sigma_i = sqrt(lambda_i)`` is exact to ``eps sigma_1^2 / (2 sigma_i)``, i.e.
    ``eps kappa^2 / 2 <= 1.1e-8`` relative below ``kappa = ``:data:`GRAM_KAPPA_MAX`; a vector
    ``v_i`` to ``eps sigma_1^2 / min_j |sigma_i^2 - sigma_j^2|``, at most ``kappa`` times an
    SVD's ``eps sigma_1 / min_j |sigma_i - sigma_j|``. A core above the bound (``lambda_min <=
    lambda_max / kappa_max^2``, a singular one included) gets LAPACK's SVD instead. Cost
    ``2 b n^3`` for the Gram plus ``eigh``'s, about half of an SVD that also computes the left
    vectors (16 cores of 128 x 128, one thread: 40 ms instead of 68 ms).
    """
    c64 = core.to(torch.float64)
    lam, vectors = torch.linalg.eigh(c64.transpose(1, 2) @ c64)       # ascending
    s = lam.flip(1).clamp_min(0).sqrt()
    vc_t = vectors.flip(2).transpose(1, 2)
    ill = ~(lam[:, 0] > lam[:, -1] / GRAM_KAPPA_MAX**2)
    if ill.any():
        _, s[ill], vc_t[ill] = torch.linalg.svd(c64[ill])
    return s.to(core.dtype), vc_t.to(core.dtype)


def factored_subspaces(w_q: torch.Tensor, w_k: torch.Tensor, n_heads: int, n_kv_heads: int,
                       d_head: int, dtype: torch.dtype | None = None) -> FactoredSubspaces:
    """Every head's kernel SVD, factored (see module docstring), in ``dtype`` (default
    ``w_k``'s, at least float32: a bf16 core and its vectors would be off by about 1 %) on
    ``w_k``'s device. ``w_q`` is not copied to ``dtype``: its Grams cast it by row blocks.

    Args:
        w_q: ``(n_heads * d_head, d)`` query projection (nn.Linear layout).
        w_k: ``(n_kv_heads * d_head, d')`` key projection; ``d' != d`` where the two are in
            different coordinates (the core ``R_q R_k^T`` needs only their ``R`` factors:
            latent attention's, :mod:`latent_attention`).
    """
    group = n_heads // n_kv_heads
    dtype = dtype or torch.promote_types(w_k.dtype, torch.float32)
    q_t = w_q.reshape(n_heads, d_head, -1).transpose(1, 2)       # (h, d, d_head) = W_Q_i^T
    k_t = w_k.reshape(n_kv_heads, d_head, -1).transpose(1, 2)    # (n_kv, d', d_head) = W_K_j^T
    q_k, r_k = thin_qr(k_t.to(dtype))
    r_q = query_r_factors(q_t).to(dtype).reshape(n_kv_heads, group * d_head, d_head)
    core = (r_q @ r_k.transpose(1, 2)).reshape(n_heads, d_head, d_head)
    s, vc_t = core_svd(core)
    return FactoredSubspaces(q_k, vc_t.reshape(n_kv_heads, group, d_head, d_head), s, r_k)


def head_subspaces(w_q: torch.Tensor, w_k: torch.Tensor, n_heads: int, n_kv_heads: int,
                   d_head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right singular vectors and singular values of every head's kernel ``W_Q_i^T W_K_j``.

    Args:
        w_q: ``(n_heads * d_head, d)`` query projection (nn.Linear layout).
        w_k: ``(n_kv_heads * d_head, d)`` key projection.
    Returns:
        ``V``: ``(n_heads, d_head, d)``, row ``r`` of ``V[i]`` is the r-th right singular vector
        (orthonormal rows, singular values descending); ``S``: ``(n_heads, d_head)``.
        Computed in the dtype of ``w_k``, at least float32 (the query Grams in float64), and
        on the device of the inputs.
    """
    f = factored_subspaces(w_q, w_k, n_heads, n_kv_heads, d_head)
    return f.vectors(), f.singular_values



@dataclass
class TwoSidedSVD:
    """Both sides of every head's ``(d, d)`` map ``M_i = X_i^T Y_j`` of one layer (rank <=
    ``d_head``): ``M_i = left_i^T diag(s_i) right_i``.

    ``left``, ``right``: ``(h, d_head, d)`` left and right singular vectors (rows, in ``R^d``);
    ``singular_values``: ``(h, d_head)``, descending, float64.
    """

    left: torch.Tensor
    right: torch.Tensor
    singular_values: torch.Tensor


def circuit_svd(x: torch.Tensor, y: torch.Tensor, n_heads: int, n_kv_heads: int, d_head: int,
                dtype: torch.dtype = torch.float32) -> TwoSidedSVD:
    """The thin SVD of every head's ``M_i = X_i^T Y_j`` (``X_i``, ``Y_j`` the ``d_head``-row
    blocks of ``x`` ``(h d_head, d)`` and ``y`` ``(n_kv d_head, d)``; ``j`` head ``i``'s KV
    head), from its factors: the right side and the singular values are
    :func:`factored_subspaces`' (float64), the left side follows from them
    (:meth:`FactoredSubspaces.left_vectors`). Vectors in ``dtype``.

    The attention kernel ``W_QK_i = W_Q_i^T W_K_j`` is ``(x, y) = (W_Q, W_K)``; the OV circuit
    ``W_OV_i = W_O_i W_V_j`` is ``(x, y) = (W_O^T, W_V)`` (head ``i``'s columns of ``W_O`` as
    rows). Cost: :func:`factored_subspaces`' plus ``2 h d_head^2 d`` for the left side.
    """
    f = factored_subspaces(x, y, n_heads, n_kv_heads, d_head, torch.float64)
    return TwoSidedSVD(f.left_vectors(x, dtype), f.vectors(dtype), f.singular_values)


def ov_circuits(w_o: torch.Tensor, w_v: torch.Tensor, n_heads: int, n_kv_heads: int,
                d_head: int, dtype: torch.dtype = torch.float32) -> TwoSidedSVD:
    """Every head's OV circuit ``W_OV_i = W_O_i W_V_j`` (``(d, d)``, rank <= ``d_head``; ``W_O_i``
    the ``(d, d_head)`` column block of head ``i``, ``W_V_j`` the rows of its KV head) by
    :func:`circuit_svd`: ``left`` = the directions the head writes to the residual stream,
    ``right`` = those it reads.

    Args:
        w_o: ``(d, n_heads * d_head)`` output projection (nn.Linear layout).
        w_v: ``(n_kv_heads * d_head, d)`` value projection.
    """
    sides: dict[str, torch.Tensor] = {}
    emit_ov_circuits({"W_O": w_o, "W_V": w_v}, sides.__setitem__, n_heads, n_kv_heads, d_head,
                     dtype)
    return TwoSidedSVD(sides["ov_write_vectors"], sides["ov_read_vectors"],
                       sides["ov_singular_values"])


def emit_ov_circuits(weights: dict[str, torch.Tensor],
                     emit: Callable[[str, torch.Tensor], None], n_heads: int, n_kv_heads: int,
                     d_head: int, dtype: torch.dtype = torch.float32) -> None:
    """:func:`ov_circuits` of ``weights["W_O"]`` and ``weights["W_V"]``, which are popped from
    ``weights`` (so that this call holds their last references), each part handed to ``emit``
    as soon as it is formed and not kept: ``emit("ov_singular_values", S)``, then
    ``emit("ov_write_vectors", left)``, after which W_O is dropped, then ``emit(
    "ov_read_vectors", right)`` (W_V is dropped once its QR is done). Memory: W_O, the
    factors (``O((h + n_kv) d_head^2)`` and ``Q_k``) and one side at a time, instead of both
    sides with both weights. The same numbers as :func:`ov_circuits` (which calls this)."""
    w_o = weights.pop("W_O")
    f = factored_subspaces(w_o.T, weights.pop("W_V"), n_heads, n_kv_heads, d_head,
                           torch.float64)
    emit("ov_singular_values", f.singular_values)
    emit("ov_write_vectors", f.left_vectors(w_o.T, dtype))
    del w_o
    emit("ov_read_vectors", f.vectors(dtype))
