"""Sensitivity to k from one extraction: every statistic for k = 1 .. m - 1 at once, ``m`` the
smallest head size (``d_head`` unless layers differ: :mod:`head_layout`).

The extraction keeps all ``m_p`` right singular vectors per head of layer ``p`` (zero-padded to
``d_head``), so each k is a prefix: ``sim_k(a, b) = sum_{r<k, s<k} (v_a,r . v_b,s)^2 / k`` is a
2-D prefix sum of the squared cross products, and ``align(l, i, k)`` a prefix sum of the
per-direction energies; both exact for ``k <= min_p m_p``.

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

from .head_layout import head_dims, kv_of_heads, same_keys
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
    sigma, descending); 0 where ``sigma_k = 0`` (then ``sigma_{k+1} = 0``: an exact tie). A
    layer's entries from ``k = m_p`` on are those of its zero padding (:func:`gaps_at` leaves
    them out)."""
    s = np.asarray(singular_values, dtype=np.float64)
    upper, lower = s[..., :-1], s[..., 1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(upper > 0, (upper - lower) / upper, 0.0)


def gaps_at(singular_values: np.ndarray, k: int, sizes=None) -> np.ndarray:
    """``(L, h)`` relative gap at ``k`` of each (layer, head) (:func:`relative_gaps`); NaN where
    ``k >= m_p`` (no ``sigma_{k+1}``: the subspace is the whole row space of ``W_K``).

    ``sizes``: ``(L,)`` each layer's head size ``m_p`` (:func:`head_layout.head_dims`); None:
    every layer has ``d_head``, the stored width. A layer's padded zeros beyond ``m_p`` would
    otherwise read as a gap of 1 at ``k = m_p`` and as exact ties above it. Cost O(L h d_head).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    gaps = relative_gaps(singular_values)
    m = np.full(gaps.shape[0], singular_values.shape[-1]) if sizes is None else np.asarray(sizes)
    if k >= m.max():
        return np.full(gaps.shape[:-1], np.nan)
    return np.where((k < m)[:, None], gaps[..., k - 1], np.nan)


def ill_defined(singular_values: np.ndarray, k: int, sizes=None) -> pd.DataFrame:
    """(layer, head, gap) of every (layer, head) whose relative gap at ``k`` is below
    :data:`GAP_THRESHOLD`; none of a layer with ``k >= m_p`` (see :func:`gaps_at`)."""
    gaps_k = gaps_at(singular_values, k, sizes)
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
    """The three similarity means of an ``(L, L)`` matrix, over its entries that are not NaN
    (NaN marks a pair left out of the conditional comparison: :func:`untested_pairs`)."""
    return {"off_diagonal_mean": np.nanmean(off_diagonal(sims)),
            "adjacent_mean": np.nanmean(adjacent(sims)),
            "distant_mean": np.nanmean(distant(sims))}


def untested_pairs(model: dict, heads: list[int]) -> np.ndarray:
    """``(L, L)`` bool: layer pairs whose same-index similarity of the heads ``heads`` has no
    conditional null (both layers' kernels end in the same W_K: Gemma 4's reused keys,
    :func:`head_layout.same_keys`), left out of the conditional ratios."""
    kv = kv_of_heads(model)[:, heads]
    return np.einsum("aibi->abi", same_keys(model, kv)).any(-1)


def _conditional_means(ks: np.ndarray, kv: np.ndarray, sizes: np.ndarray, overlaps: np.ndarray,
                       rowspace_eigenvalues: np.ndarray, norm2: np.ndarray,
                       untested: np.ndarray) -> pd.DataFrame:
    """The row-space-conditional null means of the table's four statistics for every k, each
    linear in k (:mod:`rowspace_nulls`): a similarity's ``k t1 / (m_a m_b)``, an alignment's
    ``(k / m_p) sum_{r < m_p} mu_r / tr G``; averaged as the statistics are, over the heads
    whose KV heads in each layer are ``kv`` ``(L, h)``, each layer at its own size ``sizes``
    ``(L,)`` (``m_p``; the padded eigenvalues beyond it are left out). Cost O(h L^2 + L n_kv
    d_head). Layer pairs ``untested`` ``(L, L)`` are left out (:func:`untested_pairs`)."""
    layers = np.arange(len(sizes))
    t1 = overlaps[0][layers[:, None, None], kv[:, :, None], layers[None, None, :],
                     kv.T[None, :, :]]                                     # (L, h, L)
    per_pair = t1.mean(axis=1) / np.outer(sizes, sizes)                    # (L, L) at k = 1
    per_pair[untested] = np.nan
    own = np.arange(rowspace_eigenvalues.shape[-1]) < sizes[:, None, None]
    inside = np.where(own, rowspace_eigenvalues, 0.0).sum(-1) / norm2[:, None]  # (L, n_kv)
    per_k = {**_mean_statistics(per_pair),
             "alignment_mean": (inside[layers[:, None], kv] / sizes[:, None]).mean()}
    return pd.DataFrame({name: ks * value for name, value in per_k.items()})


def ksweep_table(vectors: np.ndarray, energy: np.ndarray, norm2: np.ndarray,
                 singular_values: np.ndarray, model: dict, heads: list[int],
                 overlaps: np.ndarray, rowspace_eigenvalues: np.ndarray) -> pd.DataFrame:
    """One row per k = 1 .. m - 1, ``m`` the smallest head size :func:`head_layout.min_head_dim`
    (k = m is skipped: there heads sharing a KV head coincide in the layers of that size),
    averaged over the heads ``heads`` (the caller selects them, e.g. the sampled heads).

    Args:
        vectors: ``(L, h, d_head, d)`` right singular vectors of the heads ``heads``, an
            in-memory array (its float32 copy is made one head at a time:
            :func:`similarity_by_k`); energy ``(L, h, d_head)``; norm2 ``(L,)``;
            singular_values ``(L, h, d_head)``; all zero-padded beyond each layer's ``m_p``.
        model: the ``model.json`` record: ``d_model``, and each layer's head size ``m_p`` and
            KV grouping (query head ``i`` of layer ``p`` reads KV head ``i // (h // n_kv_p)``,
            :mod:`head_layout`).
        overlaps: ``(2, L, n_kv, L, n_kv)`` :func:`rowspace_nulls.rowspace_overlaps`;
            rowspace_eigenvalues ``(L, n_kv, d_head)`` (the extraction's, NaN-padded).
    Columns: k; chance ``k/d``; null_std (of one similarity, :func:`similarity.null_std`);
    off_diagonal_mean, adjacent_mean, distant_mean (:func:`statistics.distant`): the mean over
    the heads of each head's statistic of its same-index ``(L, L)`` matrix; alignment_mean
    (mean over layers and heads); each of those four divided by chance as ``*_ratio`` and by
    its row-space-conditional null mean (each layer at its own ``m_p`` and KV head; both over
    the layer pairs that have one, :func:`untested_pairs`) as
    ``*_conditional_ratio``; n_ill_defined: (layer, head) pairs with relative gap at k below
    :data:`GAP_THRESHOLD`. Cost O(h L^2 d_head^2 d / 2), memory as :func:`similarity_by_k`
    plus ``(d_head, L, L)``.
    """
    d, sizes = model["d_model"], head_dims(model)
    ks = np.arange(1, sizes.min())
    # The statistics are means of matrix entries: the mean of each head's statistic is the
    # statistic of the head-mean matrix.
    sims = np.mean([similarity_by_k(vectors[:, i])[:len(ks)] for i in range(len(heads))],
                   axis=0)
    table = pd.DataFrame([_mean_statistics(s) for s in sims])
    align = np.cumsum(energy, axis=-1, dtype=np.float64) / norm2[:, None, None]
    table["alignment_mean"] = align.mean(axis=(0, 1))[:len(ks)]
    chance = null_mean(ks, d)
    ratios = table.div(chance, axis=0).add_suffix("_ratio")
    untested = untested_pairs(model, heads)
    tested = pd.DataFrame([_mean_statistics(np.where(untested, np.nan, s)) for s in sims])
    tested["alignment_mean"] = table["alignment_mean"]
    conditional = tested / _conditional_means(ks, kv_of_heads(model)[:, heads], sizes,
                                              overlaps, rowspace_eigenvalues, norm2, untested)
    table = pd.concat([table, ratios, conditional.add_suffix("_conditional_ratio")], axis=1)
    table.insert(0, "k", ks)
    table.insert(1, "chance", chance)
    table.insert(2, "null_std", [null_std(k, d) for k in ks])
    gaps = relative_gaps(singular_values)[..., :len(ks)]
    table["n_ill_defined"] = (gaps < GAP_THRESHOLD).sum(axis=(0, 1))
    return table
