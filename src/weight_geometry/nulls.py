"""Isotropic nulls and z-scores for similarity, alignment and best-match statistics.

Under the isotropic null a head's top-k subspace is a Haar-random k-subspace of R^d, drawn
independently for every (layer, head).

Similarity (mean and std in :mod:`similarity`): ``E[sim] = k/d``,
``Var[sim] = 2 (d-k)^2 / (d^2 (d-1)(d+2))``.

Alignment ``align = tr(P G) / tr(G)`` with ``P = V_k^T V_k`` the Haar-random rank-k projector
and ``G = W_in^T W_in`` with eigenvalues ``lam_j = sigma_j^2`` (``sigma`` the singular values of
``W_in``; zeros beyond ``min(d_ff, d)`` change neither sum below). In G's eigenbasis
``tr(P G) = sum_j lam_j P_jj``; each ``P_jj ~ Beta(k/2, (d-k)/2)`` with variance
``v = 2k(d-k) / (d^2 (d+2))`` and, as ``sum_j P_jj = k`` is fixed, ``Cov(P_jj, P_ll) = -v/(d-1)``
for ``j != l``. Hence ``E[align] = k/d`` and

    Var[tr(P G)] = v d/(d-1) (sum lam^2 - (sum lam)^2 / d)
                 = 2k(d-k) / (d(d-1)(d+2)) * (sum lam^2 - (sum lam)^2 / d).

For ``G`` a rank-k projector (``sum lam = sum lam^2 = k``) this is
``2k^2(d-k)^2 / (d^2(d-1)(d+2))``, the variance of ``||V1 V2^T||_F^2`` in SCIENCE.md, and
``align`` is then ``sim``: the two nulls agree.
"""

from __future__ import annotations

import numpy as np

from .similarity import null_mean, null_std


def _along_layers(per_layer, like: np.ndarray) -> np.ndarray:
    """``per_layer`` (leading axes of ``like``) with trailing unit axes to broadcast."""
    per_layer = np.asarray(per_layer, dtype=float)
    return per_layer.reshape(per_layer.shape + (1,) * (np.ndim(like) - per_layer.ndim))


def similarity_z(sim, k: int, d: int):
    """``(sim - k/d) / null_std(k, d)``, elementwise; ``inf``/NaN when ``k = d`` (std 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.asarray(sim, dtype=float) - null_mean(k, d)) / null_std(k, d)


def alignment_null_std(k: int, d: int, ffn_singular_values: np.ndarray) -> np.ndarray:
    """Std of ``align`` for a Haar-random k-subspace, per layer (module docstring).

    Args:
        ffn_singular_values: ``(L, m)`` singular values of ``W_in`` (``m <= d``), any order.
    Returns ``(L,)``. Cost O(L m).
    """
    lam = np.square(np.asarray(ffn_singular_values, dtype=np.float64))
    total = lam.sum(-1)
    spread = np.square(lam).sum(-1) - np.square(total) / d
    var = 2 * k * (d - k) / (d * (d - 1) * (d + 2)) * np.maximum(spread, 0.0)
    return np.sqrt(var) / total


def alignment_z(align, k: int, d: int, ffn_singular_values: np.ndarray) -> np.ndarray:
    """``(align - k/d) / alignment_null_std`` for ``align`` of shape ``(L,)`` or ``(L, h)``."""
    std = _along_layers(alignment_null_std(k, d, ffn_singular_values), align)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.asarray(align, dtype=float) - k / d) / std


def alignment_ceiling(ffn_singular_values: np.ndarray, k: int) -> np.ndarray:
    """Largest ``align`` any k-subspace reaches, per layer: ``sum_{r<k} sigma_r^2 / sum sigma^2``
    (Ky Fan: the top-k right singular directions of ``W_in``). ``(L, m)`` -> ``(L,)``."""
    lam = np.square(np.asarray(ffn_singular_values, dtype=np.float64))
    top = -np.sort(-lam, axis=-1)[..., :k]
    return top.sum(-1) / lam.sum(-1)


def normalized_alignment(align, k: int, d: int, ceiling) -> np.ndarray:
    """``(align - k/d) / (ceiling - k/d)``: 0 = chance, 1 = the ceiling, < 0 = avoidance.

    ``ceiling`` is per layer ``(L,)`` (broadcast over heads) or already shaped like ``align``.
    """
    chance = k / d
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.asarray(align, dtype=float) - chance) / (_along_layers(ceiling, align) - chance)


def best_match_null(k: int, d: int, h: int, n_samples: int = 4000,
                    seed: int = 0) -> tuple[float, float]:
    """Mean and std of ``mean_i max_j sim(V_a,i, V_b,j)`` over ``h x h`` head pairs under the
    isotropic null, by seeded Monte Carlo.

    Each ``sim`` is drawn from the Beta distribution with the null's mean and variance (exact
    for ``k = 1``, where ``sim = cos^2`` is ``Beta(1/2, (d-1)/2)``), independently for all
    ``h^2`` pairs (their correlations are O(1/d)). The max over ``h`` candidates lifts the mean
    above ``k/d``: a best match must be compared with this, not with ``k/d``.
    Cost O(n_samples h^2). Returns ``(nan, nan)`` when ``k = d`` (no randomness).
    """
    mean, std = null_mean(k, d), null_std(k, d)
    if std == 0:
        return float("nan"), float("nan")
    concentration = mean * (1 - mean) / std**2 - 1
    draws = np.random.default_rng(seed).beta(mean * concentration, (1 - mean) * concentration,
                                             size=(n_samples, h, h))
    stat = draws.max(axis=2).mean(axis=1)
    return float(stat.mean()), float(stat.std(ddof=1))
