"""Isotropic nulls and z-scores for similarity, alignment and best-match statistics.

Under the isotropic null a head's top-k subspace is a Haar-random k-subspace of R^d, drawn
independently for every layer: what the kernel of isotropic random weights (Gaussian W_Q and
W_K) gives. Within a layer, heads that share a KV head share its row space
(:func:`random_weight_bases`), so statistics over several heads of one layer (the head-matching
nulls of :mod:`head_matching`) are simulated from such weights, not from independent heads.

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

from .rowspace_nulls import trace_null_var
from .similarity import null_mean, null_std

#: Layers of isotropic random weights whose ``N (N - 1) / 2 = 120`` layer pairs give the
#: isotropic nulls of same-index and best match (:func:`head_matching.isotropic_weight_null`):
#: their stds to about 7 % (relative std over seeds, SmolLM2-135M's shape at k = 20; 32 layers,
#: 496 pairs: 2.6 %, for four times the cost of the null, which at k = 32 took the embedded
#: model's ``top_k=32`` rerun past its 20 s target).
NULL_LAYERS = 16


def _along_layers(per_layer, like: np.ndarray) -> np.ndarray:
    """``per_layer`` (leading axes of ``like``) with trailing unit axes to broadcast."""
    per_layer = np.asarray(per_layer, dtype=float)
    return per_layer.reshape(per_layer.shape + (1,) * (np.ndim(like) - per_layer.ndim))


def chance_z(value, k: int, d: int, std) -> np.ndarray:
    """``(value - k/d) / std`` (:func:`similarity.null_mean`), elementwise, ``std``
    broadcast; ``inf``/NaN where ``std`` is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.asarray(value, dtype=float) - null_mean(k, d)) / std


def similarity_z(sim, k: int, d: int):
    """``(sim - k/d) / null_std(k, d)``, elementwise; ``inf``/NaN when ``k = d`` (std 0)."""
    return chance_z(sim, k, d, null_std(k, d))


def alignment_null_std(k: int, d: int, ffn_singular_values: np.ndarray) -> np.ndarray:
    """Std of ``align`` for a Haar-random k-subspace, per layer (module docstring).

    Args:
        ffn_singular_values: ``(L, m)`` singular values of ``W_in`` (``m <= d``), any order.
    Returns ``(L,)``. Cost O(L m).
    """
    lam = np.square(np.asarray(ffn_singular_values, dtype=np.float64))
    total = lam.sum(-1)
    return np.sqrt(trace_null_var(k, d, total, np.square(lam).sum(-1))) / total


def alignment_z(align, k: int, d: int, ffn_singular_values: np.ndarray) -> np.ndarray:
    """``(align - k/d) / alignment_null_std`` for ``align`` of shape ``(L,)`` or ``(L, h)``."""
    return chance_z(align, k, d, _along_layers(alignment_null_std(k, d, ffn_singular_values),
                                               align))


def alignment_ceiling(ffn_singular_values: np.ndarray, k: int) -> np.ndarray:
    """Largest ``align`` any k-subspace reaches, per layer: ``sum_{r<k} sigma_r^2 / sum sigma^2``
    (Ky Fan: the top-k right singular directions of ``W_in``). ``(L, m)`` -> ``(L,)``."""
    lam = np.square(np.asarray(ffn_singular_values, dtype=np.float64))
    top = -np.sort(-lam, axis=-1)[..., :k]
    return top.sum(-1) / lam.sum(-1)


def alignment_floor(ffn_singular_values: np.ndarray, k: int, d: int) -> np.ndarray:
    """Smallest ``align`` any k-subspace of R^d reaches, per layer: the share of ``W_in``'s
    bottom-k right singular directions (its ``d - m`` null directions count as zeros when it
    has ``m < d`` singular values). ``(L, m)`` -> ``(L,)``."""
    lam = np.square(np.asarray(ffn_singular_values, dtype=np.float64))
    padded = np.concatenate([lam, np.zeros(lam.shape[:-1] + (d - lam.shape[-1],))], axis=-1)
    return np.sort(padded, axis=-1)[..., :k].sum(-1) / lam.sum(-1)


def normalized_alignment(align, chance, ceiling, floor) -> np.ndarray:
    """``align`` placed piecewise linearly between the floor (-1), chance (0) and the ceiling
    (+1): ``(align - chance) / (ceiling - chance)`` above chance, ``(align - chance) / (chance -
    floor)`` below it. All arguments broadcast elementwise (per layer, or per layer and head).
    """
    align, chance = np.asarray(align, dtype=float), np.asarray(chance, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        above = (align - chance) / (np.asarray(ceiling) - chance)
        below = (align - chance) / (chance - np.asarray(floor))
    return np.where(align >= chance, above, below)


def bartlett_r(rng: np.random.Generator, n: int, m: int, size: tuple[int, ...]) -> np.ndarray:
    """``size + (m, m)`` upper-triangular matrices distributed as the ``R`` (positive diagonal)
    of the thin QR of an ``n x m`` standard Gaussian matrix (Bartlett's decomposition):
    ``R_rr = sqrt(chi2(n - r))``, ``R_rc ~ N(0, 1)`` above the diagonal, all independent, and
    independent of the ``Q``. Cost O(m^2) each, instead of ``2 n m^2`` for a QR."""
    r = np.triu(rng.standard_normal((*size, m, m)), 1)
    diag = np.arange(m)
    r[..., diag, diag] = np.sqrt(rng.chisquare(n - diag, size=(*size, m)))
    return r


def random_weight_bases(rng: np.random.Generator, n_heads: int, kv_heads, head_dims, d: int,
                        k: int) -> np.ndarray:
    """``(L, h, k, d)`` float32: the top-k right singular vectors of every head's kernel
    ``W_Q_i^T W_K_j`` for isotropic random weights, layer ``l`` drawn at its own sizes
    (``kv_heads[l] = n_kv``, ``head_dims[l] = d_head``, ``L`` of each; ``k <= d_head``): W_Q
    ``(h d_head, d)`` and W_K ``(n_kv d_head, d)`` with independent standard Gaussian entries.

    With ``W_K_j^T = Q_j R_j`` and ``W_Q_i^T = Q'_i B_i`` (thin QRs) the kernel is ``Q'_i (B_i
    R_j^T) Q_j^T``, so its right singular vectors are ``Q_j`` times the eigenvectors of ``(B_i
    R_j^T)^T (B_i R_j^T)``, a ``d_head x d_head`` problem (as :mod:`kernels` factors it).
    ``Q'_i`` never matters and ``B_i`` is drawn directly (:func:`bartlett_r`); ``Q_j, R_j`` come
    from a Cholesky QR of a drawn Gaussian ``W_K_j^T`` (``R_j`` the Cholesky factor of its Gram,
    ``Q_j = W_K_j^T R_j^{-1}``: orthonormal to ``eps kappa^2``, ``kappa`` about ``(1 + sqrt(d_head
    / d)) / (1 - sqrt(d_head / d))``, 2 at ``d = 9 d_head``). Each head's subspace is then
    Haar-random (the isotropic null of one similarity), but the ``h / n_kv`` heads of one KV
    head all lie in its ``d_head``-dimensional row space and share ``R_j``: their subspaces are
    correlated, which widens the null of a mean over heads and lowers that of a max over heads
    (grouped-query attention; independent heads when ``n_kv = h``). Cost per layer ``O(n_kv d
    d_head^2 + h d_head^3 + h k d_head d)``, one layer at a time; memory the result.
    """
    bases = np.empty((len(kv_heads), n_heads, k, d), dtype=np.float32)
    for layer, (n_kv, d_head) in enumerate(zip(kv_heads, head_dims, strict=True)):
        group = n_heads // n_kv
        y = rng.standard_normal((n_kv, d, d_head))                            # W_K_j^T
        lower = np.linalg.cholesky(np.swapaxes(y, 1, 2) @ y)                  # R_j^T
        q = y @ np.swapaxes(np.linalg.inv(lower), 1, 2)                       # Y R_j^-1
        core = bartlett_r(rng, d, d_head, (n_kv, group)) @ lower[:, None]
        _, vectors = np.linalg.eigh(np.swapaxes(core, -1, -2) @ core)       # ascending
        top = np.swapaxes(vectors[..., ::-1][..., :k], -1, -2)               # (n_kv, g, k, d_head)
        bases[layer] = (top.astype(np.float32)
                        @ np.swapaxes(q, 1, 2)[:, None].astype(np.float32)).reshape(-1, k, d)
    return bases
