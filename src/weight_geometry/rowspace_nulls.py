"""Row-space-conditional nulls: a head's subspace against random subspaces of its own KV row
space, not of all R^d.

Every right singular vector of head ``i``'s kernel ``W_Q_i^T W_K_j`` lies in the row space
``R_j`` of its KV head's ``W_K_j`` (dimension ``m`` = the layer's head size), whatever ``W_Q``
is. So anything that shares ``R_j`` (an FFN input that reads it, another head of the same KV
head, a later layer whose keys read nearby) beats the isotropic null of :mod:`nulls` without
any structure of the kernel itself. The conditional null keeps ``R_j`` and asks whether the
kernel's *top-k* directions within it are special: a head's top-k subspace is replaced by ``U =
A Q_j`` with ``Q_j`` ``(m, d)`` an orthonormal basis of ``R_j`` (the head's stored vectors) and
``A`` ``(k, m)`` a Haar-random k-frame of ``R^m``, independently for every head.

Layers may differ in head size ``m_p`` and KV-head count ``n_kv_p`` (Gemma 4,
:mod:`head_layout`): every null here takes the ``model.json`` record and uses each layer's own
``m_p`` (the row-space dimension) and grouping (query head ``i`` reads KV head ``i // (h //
n_kv_p)``). The stored arrays are padded to the largest sizes; zero rows add nothing to an
overlap, and NaN eigenvalues beyond ``m_p`` are never read.

Both nulls rest on one moment formula. For ``P = A^T A`` a Haar-random rank-k projector of
``R^m`` and a fixed symmetric ``N`` ``(m, m)``, ``tr(P N)`` has mean ``(k/m) tr N`` and variance
``c (tr N^2 - (tr N)^2 / m)`` with ``c = 2 k (m - k) / (m (m - 1)(m + 2))`` (:mod:`nulls`' module
docstring, there with ``m = d``). Its second moments: ``E[P_ii^2] = v + k^2/m^2`` with ``v =
2k(m-k) / (m^2 (m+2))``, and ``E[P_ij^2] = w = k(m-k) / (m(m-1)(m+2))`` for ``i != j`` (from
``sum_j P_ij^2 = P_ii``). Write ``c_m, v_m, w_m`` for these at ``m``.

**Alignment** ``tr(P G_j) / tr(G)`` with ``G_j = Q_j G Q_j^T`` (``G = W_in^T W_in``), whose
``m`` eigenvalues ``mu`` the extraction stores (``ffn_input_rowspace_eigenvalues``): chance
``(k/m) sum mu / tr G``, std ``sqrt(c_m (sum mu^2 - (sum mu)^2 / m)) / tr G``; the most and
least any k-subspace of ``R_j`` holds are its top-k and bottom-k ``mu`` over ``tr G`` (Ky Fan).

**Similarity** of heads with row spaces ``Q_a`` ``(m_a, d)`` and ``Q_b`` ``(m_b, d)`` (frames
``A`` ``(k, m_a)``, ``B`` ``(k, m_b)``, independent): ``k sim = ||A M B^T||_F^2 = tr(P_A M P_B
M^T)``, ``M = Q_a Q_b^T`` ``(m_a, m_b)``. With ``t1 = ||M||_F^2`` and ``t2 = ||M^T M||_F^2``
(the sums of the squared cosines of the principal angles between the row spaces, and of their
squares; ``C = M^T M`` ``(m_b, m_b)`` has ``tr C = t1``, ``tr C^2 = t2``), condition on
``P_B``: ``N = M P_B M^T`` ``(m_a, m_a)`` is fixed, so ``E_A[k sim] = (k/m_a) tr N`` and
``Var_A[k sim] = c_{m_a} (tr N^2 - (tr N)^2 / m_a)``, with ``tr N = tr(P_B C)`` and ``tr N^2 =
tr(P_B C P_B C)``. Over ``P_B`` (``R^{m_b}``; in ``C``'s eigenbasis ``tr(P_B C P_B C) = sum_ij
P_ij^2 lam_i lam_j``):

    E[tr N]     = (k/m_b) t1,
    Var[tr N]   = c_{m_b} (t2 - t1^2 / m_b),
    E[(tr N)^2] = Var[tr N] + (k/m_b)^2 t1^2,
    E[tr N^2]   = t2 (v_{m_b} + k^2/m_b^2) + (t1^2 - t2) w_{m_b},

    E[k sim]   = k^2 t1 / (m_a m_b),
    Var[k sim] = E[Var_A] + Var[E_A]
               = c_{m_a} (E[tr N^2] - E[(tr N)^2] / m_a) + (k/m_a)^2 Var[tr N].

At ``m_a = m_b = m`` this is the one-size formula; it is symmetric in ``(m_a, m_b)`` (``sim``
is), which the tests check beside Monte Carlo with ``m_a != m_b``. For ``M = I`` (the same row
space) it is the isotropic variance in ``R^m``. Heads are drawn independently, so a mean over
``h`` head pairs has the mean of the means and variance ``sum Var / h^2``.
"""

from __future__ import annotations

import numpy as np

from .head_layout import head_dims, kv_heads, kv_of_heads, same_keys


def _moments(k: int, m) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(c, v, w)`` of the module docstring at ``m`` (an int or an array), elementwise; 0
    where ``k = m`` (``P = I``)."""
    m = np.asarray(m, dtype=np.float64)
    free = np.maximum(m - k, 0.0)
    w = k * free / (m * np.maximum(m - 1, 1.0) * (m + 2))
    return 2 * w, 2 * k * free / (m**2 * (m + 2)), w


def trace_null_var(k: int, m, trace, trace_sq) -> np.ndarray:
    """``Var[tr(P N)]`` for a Haar-random rank-k projector ``P`` of ``R^m`` and a fixed
    symmetric ``N`` with ``tr N = trace`` and ``tr N^2 = trace_sq`` (elementwise; ``m`` an int
    or an array broadcasting with ``trace``): ``c (tr N^2 - (tr N)^2 / m)``, clipped at 0
    against rounding."""
    c = _moments(k, m)[0]
    trace = np.asarray(trace, dtype=np.float64)
    return c * np.maximum(np.asarray(trace_sq, dtype=np.float64) - trace**2 / m, 0.0)


def alignment_null(rowspace_eigenvalues: np.ndarray, norm2: np.ndarray, k: int,
                   model: dict) -> dict[str, np.ndarray]:
    """Conditional null of every head's alignment, ``(L, h)`` each: ``chance``, ``std``,
    ``ceiling`` (top-k share of ``R_j``) and ``floor`` (bottom-k share).

    Args:
        rowspace_eigenvalues: ``(L, n_kv_heads, d_head)`` eigenvalues ``mu`` of ``Q_j G
            Q_j^T``, any order; layer ``p``'s real ones are ``[p, j < n_kv_p, r < m_p]``, the
            rest padding (NaN, never read).
        norm2: ``(L,)`` ``tr G = ||W_in||_F^2``.
        model: the ``model.json`` record (:mod:`head_layout`: ``m_p``, ``n_kv_p``, and query
            head ``i`` reads KV head ``i // (h // n_kv_p)``); ``k <= min m_p``.
    Cost O(L n_kv m log m).
    """
    mu = np.sort(np.asarray(rowspace_eigenvalues, dtype=np.float64), axis=-1)  # NaN last
    m = head_dims(model)[:, None]                                                # (L, 1)
    real = np.arange(mu.shape[-1]) < m[..., None]                                # (L, 1, d)
    mu = np.where(real, mu, 0.0)
    total = np.asarray(norm2, dtype=np.float64)[:, None]
    kv = mu.sum(-1)
    top = np.take_along_axis(mu, (m - k + np.arange(k))[..., None, :], axis=-1)
    per_kv = {
        "chance": k / m * kv / total,
        "std": np.sqrt(trace_null_var(k, m, kv, np.square(mu).sum(-1))) / total,
        "ceiling": top.sum(-1) / total,
        "floor": mu[..., :k].sum(-1) / total,
    }
    owner = kv_of_heads(model)                                                   # (L, h)
    return {name: np.take_along_axis(value, owner, axis=1) for name, value in per_kv.items()}


def rowspace_overlaps(bases: np.ndarray) -> np.ndarray:
    """``(2, L, n, L, n)`` float64: ``t1 = ||Q_a Q_b^T||_F^2`` and ``t2 = ||(Q_a Q_b^T)^T
    (Q_a Q_b^T)||_F^2`` for every pair of row spaces ``(layer a, row space p)``, ``(layer b,
    row space q)``.

    Args:
        bases: ``(L, n, m, d)``, each ``(m, d)`` with orthonormal rows (one head per KV head:
            all its stored vectors span its KV head's row space), or zero rows: padding
            (:mod:`head_layout`) adds zero rows and columns to ``Q_a Q_b^T``, which change
            neither norm, so ``t1, t2`` are exact at each layer's own size (0 for a KV head a
            layer lacks).
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


def similarity_null(t1, t2, k: int, m_a, m_b=None) -> tuple[np.ndarray, np.ndarray]:
    """Conditional mean and std of ``sim`` for heads whose row spaces, of dimensions ``m_a``
    and ``m_b`` (``None``: ``m_a``), have overlap moments ``t1, t2`` (:func:`rowspace_overlaps`;
    all elementwise, broadcasting), module docstring; ``k <= min(m_a, m_b)``. Cost O(1) each."""
    t1, t2 = np.asarray(t1, dtype=np.float64), np.asarray(t2, dtype=np.float64)
    m_b = m_a if m_b is None else m_b
    c_a = _moments(k, m_a)[0]
    c_b, v_b, w_b = _moments(k, m_b)
    r_a, r_b = k / np.asarray(m_a), k / np.asarray(m_b)
    q_a, q_b = r_a**2, r_b**2
    spread = t2 - t1**2 / m_b                     # Var[tr N] / c_{m_b}
    tr_n2 = t2 * (v_b + q_b) + (t1**2 - t2) * w_b
    tr_n_sq = c_b * spread + q_b * t1**2
    var = c_a * (tr_n2 - tr_n_sq / m_a) + q_a * c_b * spread
    mean = r_a * r_b * t1 / k
    return mean, np.sqrt(np.maximum(var, 0.0)) / k


def _layer_pairs(overlaps: np.ndarray, model: dict, kv: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``overlaps`` at layer ``a``'s KV head ``kv[a, i]`` and layer ``b``'s ``kv[b, j]``, ``(2,
    L, n, L, n)`` for ``kv`` ``(L, n)``, and the head sizes ``m_a, m_b`` shaped to broadcast
    with it."""
    layers = np.arange(len(kv))[:, None]
    t = overlaps[:, layers[:, :, None, None], kv[:, :, None, None], layers[None, None],
                 kv[None, None]]
    m = head_dims(model)
    return t, (m[:, None, None, None], m[None, None, :, None])


def one_head_null(overlaps: np.ndarray, k: int, model: dict, head: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(L, L)`` conditional mean and std of ``sim(V_a,i, V_b,i)`` for one head ``i`` across
    layers (the null of its similarity matrix), from the ``(2, L, n_kv_heads, L, n_kv_heads)``
    :func:`rowspace_overlaps`, each layer pair at its own head sizes and KV heads
    (:mod:`head_layout`). Cost O(L^2)."""
    kv = kv_of_heads(model)[:, head:head + 1]
    t, (m_a, m_b) = _layer_pairs(overlaps, model, kv)
    mean, std = _unless_same_keys(similarity_null(t[0], t[1], k, m_a, m_b), model, kv)
    return mean[:, 0, :, 0], std[:, 0, :, 0]


def head_pair_null(overlaps: np.ndarray, k: int, model: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(L, h, L, h)`` conditional mean and std of ``sim(V_a,i, V_b,j)`` for every pair of
    heads, from the ``(2, L, n_kv_heads, L, n_kv_heads)`` :func:`rowspace_overlaps`, each
    layer pair at its own head sizes and KV heads (:mod:`head_layout`). Cost O(L^2 h^2)."""
    kv = kv_of_heads(model)
    t, (m_a, m_b) = _layer_pairs(overlaps, model, kv)
    return _unless_same_keys(similarity_null(t[0], t[1], k, m_a, m_b), model, kv)


def _unless_same_keys(null: tuple[np.ndarray, np.ndarray], model: dict, kv: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """``null`` (mean, std ``(L, n, L, n)``) with NaN for two heads of different layers whose
    kernels end in the same ``W_K_j`` (Gemma 4's reused keys: :func:`head_layout.same_keys`),
    which leaves them out of every test. Their top-k directions are pulled towards the same
    directions of that row space by ``W_K_j``'s own uneven spectrum, for any queries (random
    ones too), so independent Haar frames of the row space understate their similarity: as
    for two heads of one KV head, this null does not hold there."""
    mask = same_keys(model, kv)
    return tuple(np.where(mask, np.nan, x) for x in null)


def same_index_null(overlaps: np.ndarray, k: int, model: dict
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``(L, L)`` conditional mean and std of same-index ``mean_i sim(V_a,i, V_b,i)``.

    The mean is the mean of the pairs' means. The std is an upper bound: heads that share a KV
    head are counted as perfectly correlated (``(sum of their stds)^2`` per group) and groups
    as independent. Heads of one KV head lean towards the same directions of their shared row
    space (random weights too: a Gaussian ``W_K_j``'s uneven spectrum favours some directions),
    so counting them as independent understates the std (measured z stds of 1.4 and 1.8 for
    random weights with 4 and 8 heads per KV head); the bound overstates it by at most the
    square root of the group's size (``sqrt(h / n_kv)``).

    Where layers ``a`` and ``b`` group heads differently (``g_a = h / n_kv_a`` and ``g_b``
    heads per KV head), head ``i``'s similarity depends on both of its KV heads, so two heads
    are dependent when they share a KV head in either layer; the groups are the connected runs
    of that relation, ``lcm(g_a, g_b)`` consecutive heads (two neighbours are cut apart only
    where both layers' KV heads change, at multiples of both sizes). Any union of heads obeys
    ``Var(sum) <= (sum of stds)^2`` (Cauchy-Schwarz), and heads of different runs share no KV
    head, so the bound still holds (grouping by one layer's KV heads alone would not: through
    the other layer's shared draw, its groups move together); at ``g_a = g_b`` the groups are
    the KV heads. Cost O(L^2 h)."""
    mean, std = head_pair_null(overlaps, k, model)
    n_heads = model["n_heads"]
    same_mean = np.einsum("aibi->ab", mean) / n_heads
    per_head = np.einsum("aibi->abi", std)
    group = n_heads // kv_heads(model)
    runs = np.lcm(group[:, None], group[None, :])                       # (L, L)
    var = np.empty(runs.shape)
    for size in np.unique(runs):
        at = runs == size
        var[at] = np.square(per_head[at].reshape(-1, n_heads // size, size).sum(-1)).sum(-1)
    return same_mean, np.sqrt(var) / n_heads
