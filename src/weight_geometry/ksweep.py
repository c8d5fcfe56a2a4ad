"""Sensitivity to k from one extraction: every statistic for k = 1 .. d_head - 1 at once.

The extraction keeps all ``d_head`` right singular vectors per head, so each k is a prefix:
``sim_k(a, b) = sum_{r<k, s<k} (v_a,r . v_b,s)^2 / k`` is a 2-D prefix sum of the squared cross
products, and ``align(l, i, k)`` a prefix sum of the per-direction energies.

The top-k subspace is only defined up to the spectral gap at k. Davis-Kahan: a perturbation
``E`` of the kernel rotates it by ``sin(theta) <= ||E|| / (sigma_k - sigma_{k+1})``, so with a
relative gap ``g = (sigma_k - sigma_{k+1}) / sigma_k`` a relative perturbation of size about
``g`` can rotate it completely. :data:`GAP_THRESHOLD` = 1% is a few bf16 rounding steps
(2^-8 ~ 0.4% relative): below it the subspace is set by rounding and training noise, not by
the weights' structure.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .similarity import cross_head_similarity, null_mean, null_std
from .statistics import adjacent, distant, off_diagonal

GAP_THRESHOLD = 0.01

#: The table's statistics divided by chance, with the labels of the report and the figure.
RATIO_LABELS = {"off_diagonal_mean_ratio": "off-diagonal similarity / chance",
                "adjacent_mean_ratio": "adjacent-layer similarity / chance",
                "distant_mean_ratio": "distant-layer similarity / chance",
                "alignment_mean_ratio": "FFN-attention alignment / chance"}
#: The same statistics divided by their row-space-conditional null means.
CONDITIONAL_RATIO_LABELS = {
    "off_diagonal_mean_conditional_ratio": "off-diagonal similarity / conditional",
    "adjacent_mean_conditional_ratio": "adjacent-layer similarity / conditional",
    "distant_mean_conditional_ratio": "distant-layer similarity / conditional",
    "alignment_mean_conditional_ratio": "FFN-attention alignment / conditional"}


def relative_gaps(singular_values: np.ndarray) -> np.ndarray:
    """``(L, h, d_head - 1)``: entry ``k - 1`` is ``(sigma_k - sigma_{k+1}) / sigma_k`` (1-based
    sigma, descending); 0 where ``sigma_k = 0`` (then ``sigma_{k+1} = 0``: an exact tie)."""
    s = np.asarray(singular_values, dtype=np.float64)
    upper, lower = s[..., :-1], s[..., 1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(upper > 0, (upper - lower) / upper, 0.0)


def gaps_at(singular_values: np.ndarray, k: int) -> np.ndarray:
    """``(L, h)`` relative gap at ``k`` of each (layer, head) (:func:`relative_gaps`); NaN for
    ``k >= d_head`` (no ``sigma_{k+1}``: the subspace is the whole row space of ``W_K``)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    gaps = relative_gaps(singular_values)
    return np.full(gaps.shape[:-1], np.nan) if k > gaps.shape[-1] else gaps[..., k - 1]


def ill_defined(singular_values: np.ndarray, k: int) -> pd.DataFrame:
    """(layer, head, gap) of every (layer, head) whose relative gap at ``k`` is below
    :data:`GAP_THRESHOLD`; empty for ``k >= d_head`` (see :func:`gaps_at`)."""
    gaps_k = gaps_at(singular_values, k)
    layer, head = np.nonzero(gaps_k < GAP_THRESHOLD)
    return pd.DataFrame({"layer": layer, "head": head, "gap": gaps_k[layer, head]})


def similarity_by_k(bases: np.ndarray) -> np.ndarray:
    """``(d_head, L, L)``: entry ``k - 1`` is the similarity matrix of the top-k prefixes of
    ``bases`` ``(L, d_head, d)`` (orthonormal rows), for every k: the prefix sums of
    :func:`similarity.cross_head_similarity` for one head (exact to ~1e-7). Cost
    O(L^2 d_head^2 d / 2); memory O(L d_head d) for the float32 copy plus O(L d_head^2) per
    block (never ``(L d_head)^2``). Symmetric, diagonal exactly 1, as
    :func:`similarity.similarity_matrix`.
    """
    n_layers, d_head = bases.shape[:2]
    sims = cross_head_similarity(bases[:, None], prefixes=True)
    return sims.reshape(d_head, n_layers, n_layers)


def _mean_statistics(sims: np.ndarray) -> dict[str, float]:
    return {"off_diagonal_mean": off_diagonal(sims).mean(),
            "adjacent_mean": adjacent(sims).mean(),
            "distant_mean": distant(sims).mean()}


def _conditional_means(ks: np.ndarray, kv_heads: list[int], overlaps: np.ndarray,
                       rowspace_eigenvalues: np.ndarray, norm2: np.ndarray) -> pd.DataFrame:
    """The row-space-conditional null means of the table's four statistics for every k: each
    is linear in k (a similarity's is ``k t1 / m^2``, an alignment's ``(k / m) sum mu / tr G``,
    :mod:`rowspace_nulls`), averaged as the statistics are, over the heads whose KV heads are
    ``kv_heads``. Cost O(h L^2)."""
    m = rowspace_eigenvalues.shape[-1]
    t1 = np.mean([overlaps[0][:, kv, :, kv] for kv in kv_heads], axis=0)      # (L, L)
    inside = rowspace_eigenvalues.sum(-1) / norm2[:, None]                    # (L, n_kv)
    per_k = {**{name: value / m**2 for name, value in _mean_statistics(t1).items()},
             "alignment_mean": inside[:, kv_heads].mean() / m}
    return pd.DataFrame({name: ks * value for name, value in per_k.items()})


def ksweep_table(vectors: np.ndarray, energy: np.ndarray, norm2: np.ndarray,
                 singular_values: np.ndarray, d: int, kv_heads: list[int],
                 overlaps: np.ndarray, rowspace_eigenvalues: np.ndarray) -> pd.DataFrame:
    """One row per k = 1 .. d_head - 1 (k = d_head is skipped: heads sharing a KV head coincide),
    averaged over the ``h`` heads given (the caller selects them, e.g. the sampled heads).

    Args:
        vectors: ``(L, h, d_head, d)`` right singular vectors, an in-memory array (its
            float32 copy is made one head at a time: :func:`similarity_by_k`);
            energy ``(L, h, d_head)``; norm2 ``(L,)``; singular_values ``(L, h, d_head)``.
        kv_heads: the KV head each of the ``h`` heads reads.
        overlaps: ``(2, L, n_kv, L, n_kv)`` :func:`rowspace_nulls.rowspace_overlaps`;
            rowspace_eigenvalues ``(L, n_kv, d_head)`` (the extraction's).
    Columns: k; chance ``k/d``; null_std (of one similarity, :func:`similarity.null_std`);
    off_diagonal_mean, adjacent_mean, distant_mean (:func:`statistics.distant`): the mean over
    the heads of each head's statistic of its same-index ``(L, L)`` matrix; alignment_mean
    (mean over layers and heads); each of those four divided by chance as ``*_ratio`` and by
    its row-space-conditional null mean as ``*_conditional_ratio``; n_ill_defined: (layer,
    head) pairs with relative gap at k below :data:`GAP_THRESHOLD`. Cost O(h L^2 d_head^2 d /
    2), memory as :func:`similarity_by_k` plus ``(d_head, L, L)``.
    """
    n_heads, d_head = vectors.shape[1:3]
    ks = np.arange(1, d_head)
    # The statistics are means of matrix entries: the mean of each head's statistic is the
    # statistic of the head-mean matrix.
    sims = np.mean([similarity_by_k(vectors[:, head])[:-1] for head in range(n_heads)], axis=0)
    table = pd.DataFrame([_mean_statistics(s) for s in sims])
    align = np.cumsum(energy, axis=-1, dtype=np.float64) / norm2[:, None, None]
    table["alignment_mean"] = align.mean(axis=(0, 1))[:-1]
    chance = null_mean(ks, d)
    ratios = table.div(chance, axis=0).add_suffix("_ratio")
    conditional = table / _conditional_means(ks, kv_heads, overlaps, rowspace_eigenvalues,
                                             norm2)
    table = pd.concat([table, ratios, conditional.add_suffix("_conditional_ratio")], axis=1)
    table.insert(0, "k", ks)
    table.insert(1, "chance", chance)
    table.insert(2, "null_std", [null_std(k, d) for k in ks])
    table["n_ill_defined"] = (relative_gaps(singular_values) < GAP_THRESHOLD).sum(axis=(0, 1))
    return table
