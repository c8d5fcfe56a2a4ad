"""Row-space-conditional nulls: a head's subspace against random subspaces of its own KV row
space, not of all R^d.

Every right singular vector of head ``i``'s kernel ``W_Q_i^T W_K_j`` lies in the row space
``R_j`` of its KV head's ``W_K_j`` (dimension ``m = d_head``), whatever ``W_Q`` is. So anything
that shares ``R_j`` (an FFN input that reads it, another head of the same KV head, a later
layer whose keys read nearby) beats the isotropic null of :mod:`nulls` without any structure
of the kernel itself. The conditional null keeps ``R_j`` and asks whether the kernel's *top-k*
directions within it are special: a head's top-k subspace is replaced by ``U = A Q_j`` with
``Q_j`` ``(m, d)`` an orthonormal basis of ``R_j`` (the head's stored ``d_head`` vectors) and
``A`` ``(k, m)`` a Haar-random k-frame of ``R^m``, independently for every head.

Both nulls rest on one moment formula. For ``P = A^T A`` a Haar-random rank-k projector of
``R^m`` and a fixed symmetric ``N`` ``(m, m)``, ``tr(P N)`` has mean ``(k/m) tr N`` and variance
``c (tr N^2 - (tr N)^2 / m)`` with ``c = 2 k (m - k) / (m (m - 1)(m + 2))`` (:mod:`nulls`' module
docstring, there with ``m = d``). Its second moments: ``E[P_ii^2] = v + k^2/m^2`` with ``v =
2k(m-k) / (m^2 (m+2))``, and ``E[P_ij^2] = w = k(m-k) / (m(m-1)(m+2))`` for ``i != j`` (from
``sum_j P_ij^2 = P_ii``).

**Alignment** ``tr(P G_j) / tr(G)`` with ``G_j = Q_j G Q_j^T`` (``G = W_in^T W_in``), whose
eigenvalues ``mu`` the extraction stores (``ffn_input_rowspace_eigenvalues``): chance
``(k/m) sum mu / tr G``, std ``sqrt(c (sum mu^2 - (sum mu)^2 / m)) / tr G``; the most and least
any k-subspace of ``R_j`` holds are its top-k and bottom-k ``mu`` over ``tr G`` (Ky Fan).

**Similarity** of heads with row spaces ``Q_a, Q_b``: ``k sim = ||A M B^T||_F^2 = tr(P_A M P_B
M^T)``, ``M = Q_a Q_b^T`` ``(m, m)``. With ``t1 = ||M||_F^2`` and ``t2 = ||M^T M||_F^2`` (the sums
of the squared cosines of the principal angles between the row spaces, and of their squares):
``E[k sim] = (k/m)^2 t1``. Conditioning on ``P_B`` (``N = M P_B M^T``, ``C = M^T M``) and using
the moments above, with ``E[tr N^2] = t2 (v + k^2/m^2) + (t1^2 - t2) w`` and ``E[(tr N)^2] =
c (t2 - t1^2/m) + (k/m)^2 t1^2``:

    Var[k sim] = c (E[tr N^2] - E[(tr N)^2] / m) + (k/m)^2 c (t2 - t1^2 / m).

For ``M = I`` (the same row space) this is the isotropic variance in ``R^m``; the tests check
both nulls by Monte Carlo. Heads are drawn independently, so a mean over ``h`` head pairs has
the mean of the means and variance ``sum Var / h^2``.
"""

from __future__ import annotations

import numpy as np


def _moments(k: int, m: int) -> tuple[float, float, float]:
    """``(c, v, w)`` of the module docstring; all 0 when ``k = m`` (``P = I``)."""
    if k >= m:
        return 0.0, 0.0, 0.0
    w = k * (m - k) / (m * (m - 1) * (m + 2))
    return 2 * w, 2 * k * (m - k) / (m**2 * (m + 2)), w


def trace_null_var(k: int, m: int, trace, trace_sq) -> np.ndarray:
    """``Var[tr(P N)]`` for a Haar-random rank-k projector ``P`` of ``R^m`` and a fixed
    symmetric ``N`` with ``tr N = trace`` and ``tr N^2 = trace_sq`` (elementwise):
    ``c (tr N^2 - (tr N)^2 / m)``, clipped at 0 against rounding."""
    c = _moments(k, m)[0]
    trace = np.asarray(trace, dtype=np.float64)
    return c * np.maximum(np.asarray(trace_sq, dtype=np.float64) - trace**2 / m, 0.0)


def alignment_null(rowspace_eigenvalues: np.ndarray, norm2: np.ndarray, k: int,
                   n_heads: int) -> dict[str, np.ndarray]:
    """Conditional null of every head's alignment, ``(L, h)`` each: ``chance``, ``std``,
    ``ceiling`` (top-k share of ``R_j``) and ``floor`` (bottom-k share).

    Args:
        rowspace_eigenvalues: ``(L, n_kv, m)`` eigenvalues ``mu`` of ``Q_j G Q_j^T``, any order.
        norm2: ``(L,)`` ``tr G = ||W_in||_F^2``.
        n_heads: ``h``; query head ``i`` reads KV head ``i // (h // n_kv)``.
    Cost O(L n_kv m log m).
    """
    mu = np.sort(np.asarray(rowspace_eigenvalues, dtype=np.float64), axis=-1)   # ascending
    m = mu.shape[-1]
    total = np.asarray(norm2, dtype=np.float64)[:, None]
    kv = mu.sum(-1)
    per_kv = {
        "chance": k / m * kv / total,
        "std": np.sqrt(trace_null_var(k, m, kv, np.square(mu).sum(-1))) / total,
        "ceiling": mu[..., m - k:].sum(-1) / total,
        "floor": mu[..., :k].sum(-1) / total,
    }
    group = n_heads // mu.shape[1]
    return {name: np.repeat(value, group, axis=1) for name, value in per_kv.items()}


def rowspace_overlaps(bases: np.ndarray) -> np.ndarray:
    """``(2, L, n, L, n)`` float64: ``t1 = ||Q_a Q_b^T||_F^2`` and ``t2 = ||(Q_a Q_b^T)^T
    (Q_a Q_b^T)||_F^2`` for every pair of row spaces ``(layer a, row space p)``, ``(layer b,
    row space q)``.

    Args:
        bases: ``(L, n, m, d)``, each ``(m, d)`` with orthonormal rows (one head per KV head:
            all ``d_head`` stored vectors span its KV head's row space).
    Per layer ``a`` one float32 product against layers ``b >= a`` (:func:`similarity.
    squared_cosines`' precision, ~1e-7 per cosine), the cores' ``M M^T`` in float64; the lower
    triangle mirrored (both are symmetric in the pair). Cost ``L^2 n^2 (m^2 d + m^3)``; memory
    one block of ``n m (L n m)`` cosines at a time.
    """
    n_layers, n, m, d = bases.shape
    flat = np.ascontiguousarray(bases, dtype=np.float32).reshape(n_layers, n * m, d)
    out = np.zeros((2, n_layers, n, n_layers, n))
    for a in range(n_layers):
        cos = np.asarray(flat[a], dtype=np.float32) @ flat[a:].reshape(-1, d).T
        cos = cos.astype(np.float64).reshape(n, m, n_layers - a, n, m).transpose(0, 2, 3, 1, 4)
        out[0, a, :, a:] = np.square(cos).sum((-1, -2))
        out[1, a, :, a:] = np.square(cos @ np.swapaxes(cos, -1, -2)).sum((-1, -2))
    lower = np.swapaxes(np.swapaxes(out, 1, 3), 2, 4)
    below = np.tril(np.ones((n_layers, n_layers), dtype=bool), -1)[:, None, :, None]
    return np.where(below, lower, out)


def similarity_null(t1, t2, k: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Conditional mean and std of ``sim`` for heads whose row spaces have overlap moments
    ``t1, t2`` (:func:`rowspace_overlaps`; elementwise), module docstring. Cost O(1) each."""
    t1, t2 = np.asarray(t1, dtype=np.float64), np.asarray(t2, dtype=np.float64)
    c, v, w = _moments(k, m)
    q = (k / m) ** 2
    tr_n2 = t2 * (v + q) + (t1**2 - t2) * w
    tr_n_sq = c * (t2 - t1**2 / m) + q * t1**2
    var = c * (tr_n2 - tr_n_sq / m) + q * c * (t2 - t1**2 / m)
    return q * t1 / k, np.sqrt(np.maximum(var, 0.0)) / k


def one_head_null(overlaps: np.ndarray, k: int, m: int, n_heads: int, head: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(L, L)`` conditional mean and std of ``sim(V_a,i, V_b,i)`` for one head ``i`` across
    layers (the null of its similarity matrix), from :func:`rowspace_overlaps`. Cost O(L^2)."""
    kv = head // (n_heads // overlaps.shape[2])
    return similarity_null(overlaps[0][:, kv, :, kv], overlaps[1][:, kv, :, kv], k, m)


def head_pair_null(overlaps: np.ndarray, k: int, m: int, n_heads: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(L, h, L, h)`` conditional mean and std of ``sim(V_a,i, V_b,j)`` for every pair of
    heads, from the ``(2, L, n_kv, L, n_kv)`` :func:`rowspace_overlaps`. Cost O(L^2 h^2)."""
    group = n_heads // overlaps.shape[2]
    per_head = np.repeat(np.repeat(overlaps, group, axis=2), group, axis=4)
    return similarity_null(per_head[0], per_head[1], k, m)


def same_index_null(overlaps: np.ndarray, k: int, m: int, n_heads: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``(L, L)`` conditional mean and std of same-index ``mean_i sim(V_a,i, V_b,i)``.

    The mean is the mean of the pairs' means. The std is an upper bound: the heads of one KV
    head are counted as perfectly correlated (``(sum of their stds)^2`` per KV head) and KV
    heads as independent. Heads of one KV head lean towards the same directions of their
    shared row space (random weights too: a Gaussian ``W_K_j``'s uneven spectrum favours some
    directions), so counting them as independent understates the std (measured z stds of 1.4
    and 1.8 for random weights with 4 and 8 heads per KV head); the bound overstates it by at
    most ``sqrt(h / n_kv)``. Cost O(L^2 h)."""
    mean, std = head_pair_null(overlaps, k, m, n_heads)
    n_kv = overlaps.shape[2]
    same_mean = np.einsum("aibi->ab", mean) / n_heads
    per_head = np.einsum("aibi->abi", std)
    by_kv = per_head.reshape(*per_head.shape[:2], n_kv, n_heads // n_kv).sum(-1)
    same_std = np.sqrt(np.square(by_kv).sum(-1)) / n_heads
    return same_mean, same_std

