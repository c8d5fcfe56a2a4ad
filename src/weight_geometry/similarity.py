"""Grassmann similarity of k-dimensional subspaces and its isotropic null.

``sim(V1, V2) = ||V1 V2^T||_F^2 / k = mean(cos^2(principal angles))`` for ``V1, V2`` of shape
``(k, d)`` with orthonormal rows: 1 for the same subspace, 0 for orthogonal ones.
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


def similarity_matrix(bases: np.ndarray) -> np.ndarray:
    """``(L, L)`` similarity of ``L`` bases stacked as ``(L, k, d)``.

    One ``(L k, d) @ (d, L k)`` product: cost O(L^2 k^2 d), memory O(L^2 k^2). The diagonal is
    set to exactly 1 (it equals 1 up to rounding for orthonormal rows).
    """
    n, k, d = bases.shape
    flat = bases.reshape(n * k, d).astype(np.float64)
    cross = (flat @ flat.T).reshape(n, k, n, k)
    sims = np.square(cross).sum(axis=(1, 3)) / k
    sims = (sims + sims.T) / 2
    np.fill_diagonal(sims, 1.0)
    return sims


def null_mean(k: int, d: int) -> float:
    """``E[sim]`` for two independent Haar-random k-subspaces of R^d: ``k / d``."""
    return k / d


def null_std(k: int, d: int) -> float:
    """Std of ``sim`` under the isotropic null.

    ``Var[||V1 V2^T||_F^2] = 2 k^2 (d - k)^2 / (d^2 (d - 1)(d + 2))``; ``sim`` divides by k.
    """
    var_f2 = 2 * k**2 * (d - k) ** 2 / (d**2 * (d - 1) * (d + 2))
    return float(np.sqrt(var_f2) / k)
