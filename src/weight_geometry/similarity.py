"""Grassmann similarity of k-dimensional subspaces and its isotropic null.

``sim(V1, V2) = ||V1 V2^T||_F^2 / k = mean(cos^2(principal angles))`` for ``V1, V2`` of shape
``(k, d)`` with orthonormal rows: 1 for the same subspace, 0 for orthogonal ones.

Every layer-pair similarity of the workflow (one head's ``(L, L)`` matrix, all heads'
``(L, h, L, h)`` tensor, every prefix k at once) comes from :func:`cross_head_similarity`.
"""

from __future__ import annotations

import numpy as np


def similarity(v1: np.ndarray, v2: np.ndarray) -> float:
    """Similarity of two ``(k, d)`` orthonormal-row bases. Cost O(k^2 d)."""
    return float(np.square(v1 @ v2.T).sum() / v1.shape[0])


def squared_cosines(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``(m, n)`` squares of ``rows @ cols^T`` (``(m, d)``, ``(n, d)``), float64.

    The product is a float32 GEMM (stored bases are float32; half the time of float64), the
    squares are float64 so that sums over many of them add no float32 rounding. Each cosine of
    unit vectors carries about ``sqrt(d) eps32`` (1e-6); a similarity (a mean of ``k`` such
    squares per row) about ``2 rms(cos) 1e-6``, ~1e-7, far below the null's std
    (~``sqrt(2) / d``). Cost ``2 m n d`` flops.
    """
    product = np.asarray(rows, dtype=np.float32) @ np.asarray(cols, dtype=np.float32).T
    return np.square(product, dtype=np.float64)


def cross_head_similarity(bases: np.ndarray, prefixes: bool = False) -> np.ndarray:
    """``S (L, h, L, h)``, ``S[a, i, b, j] = ||V_a,i V_b,j^T||_F^2 / k``, float64; with
    ``prefixes``, ``(k, L, h, L, h)`` whose entry ``k' - 1`` is ``S`` of the top-``k'``
    prefixes (the first ``k'`` rows of each basis), for every ``k' = 1 .. k`` at once.

    Args:
        bases: ``(L, h, k, d)`` bases with orthonormal rows (``h = 1`` for one head).
    Per layer ``a``, one ``(h k, d) @ (d, (L - a) h k)`` product against layers ``b >= a``
    (:func:`squared_cosines`: float32 products, float64 squares and sums, exact to ~1e-7),
    summed over both vector axes, or with ``prefixes`` prefix-summed over both and read where
    the two prefix lengths are equal (``P[k'-1, k'-1] / k'``); the other triangle is the
    mirror (:func:`_mirror_upper`). Cost O(L^2 h^2 k^2 d / 2); memory O(L h k d) for the
    contiguous float32 copy plus one block of O(h k L h k) at a time (12 bytes an entry while
    :func:`squared_cosines` holds its float32 product), never ``(L h k)^2``, and the result
    (``k`` times larger with ``prefixes``). ``S`` is exactly symmetric (``S[a, i, b, j] =
    S[b, j, a, i]``), and exactly 1 for a head with itself.
    """
    n_layers, n_heads, k, d = bases.shape
    flat = np.ascontiguousarray(bases, dtype=np.float32).reshape(n_layers, n_heads * k, d)
    upper = np.zeros((k if prefixes else 1, n_layers, n_heads, n_layers, n_heads))
    for a in range(n_layers):
        block = squared_cosines(flat[a], flat[a:].reshape(-1, d))
        upper[:, a, :, a:] = _block_similarities(block, n_heads, k, prefixes)
        del block   # before the next block is made: one block at a time
    full = _mirror_upper(upper)
    return full if prefixes else full[0]


def _block_similarities(block: np.ndarray, n_heads: int, k: int, prefixes: bool) -> np.ndarray:
    """``(1, h, M, h)`` similarities from a ``(h k, M h k)`` block of squared cosines against
    ``M`` layers; with ``prefixes``, ``(k, h, M, h)``, one per prefix length (the block is
    prefix-summed in place)."""
    block = block.reshape(n_heads, k, -1, n_heads, k)
    if not prefixes:
        return block.sum(axis=(1, 4))[None] / k
    np.cumsum(block, axis=1, out=block)
    np.cumsum(block, axis=4, out=block)
    prefix = np.diagonal(block, axis1=1, axis2=4)                      # (h, M, h, k)
    return np.moveaxis(prefix, -1, 0) / np.arange(1, k + 1)[:, None, None, None]


def _mirror_upper(upper: np.ndarray) -> np.ndarray:
    """Full symmetric ``(..., L, h, L, h)`` from its layer blocks ``a <= b`` (zeros below):
    ``S[b, j, a, i] = S[a, i, b, j]``; within ``a = b`` the mean of the block and its
    transpose, with exactly 1 for ``(a, i, a, i)``."""
    n_layers, n_heads = upper.shape[-4:-2]
    full = upper + np.swapaxes(np.swapaxes(upper, -4, -2), -3, -1)   # exact: one term is 0
    layers = np.arange(n_layers)
    full[..., layers, :, layers, :] /= 2                            # a = b: both terms
    layer, head = np.indices((n_layers, n_heads))
    full[..., layer, head, layer, head] = 1.0
    return full


def similarity_matrix(bases: np.ndarray) -> np.ndarray:
    """``(L, L)`` similarity of ``L`` bases stacked as ``(L, k, d)``: :func:`cross_head_similarity`
    of one head. Symmetric, diagonal exactly 1; cost O(L^2 k^2 d / 2), memory O(L k d)."""
    n_layers = len(bases)
    return cross_head_similarity(bases[:, None]).reshape(n_layers, n_layers)


def null_mean(k: int | np.ndarray, d: int) -> float | np.ndarray:
    """``E[sim]`` for two independent Haar-random k-subspaces of R^d: ``k / d`` (elementwise
    for an array of ``k``)."""
    return k / d


def null_std(k: int, d: int) -> float:
    """Std of ``sim`` under the isotropic null.

    ``Var[||V1 V2^T||_F^2] = 2 k^2 (d - k)^2 / (d^2 (d - 1)(d + 2))``; ``sim`` divides by k.
    """
    var_f2 = 2 * k**2 * (d - k) ** 2 / (d**2 * (d - 1) * (d + 2))
    return float(np.sqrt(var_f2) / k)
