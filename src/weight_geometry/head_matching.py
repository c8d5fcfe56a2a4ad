"""Layer comparisons that do not depend on how heads are numbered.

Head ``i`` of layer ``a`` and head ``i`` of layer ``b`` need not play the same role: the
numbering of heads is arbitrary per layer. From the cross-head similarity tensor
``S[a, i, b, j] = sim(V_a,i, V_b,j)`` (:func:`similarity.cross_head_similarity`) this module
gives, per layer pair:

- same-index: ``mean_i S[a, i, b, i]`` (what per-head similarity matrices average);
- best match: ``mean_i max_j S[a, i, b, j]`` (each head of ``a`` paired with its most similar
  head of ``b``; many-to-one, not symmetric in ``a, b``);
- a structured null: ``mean_i S[a, i, b, pi(i)]`` over random permutations ``pi``, which keeps
  the distribution of the similarities of this pair of layers and only breaks the numbering;
- the isotropic null of both: their distribution over the layer pairs of a model of the same
  shape with isotropic random weights (:func:`isotropic_weight_null`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .nulls import NULL_LAYERS, random_weight_bases
from .similarity import cross_head_similarity, null_mean

#: Random pairings of the structured null (:func:`random_pairing_null`).
PAIRING_PERMUTATIONS = 1000


def best_match(sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(L, L)`` mean over heads ``i`` of ``max_j S[a, i, b, j]`` and the ``(L, L, h)`` int
    argmax ``j`` for each ``(a, b, i)``. The diagonal is 1 (each head matches itself). Cost
    O(L^2 h^2): one pass for the argmax, the maxima read at it."""
    argmax = sims.argmax(axis=3)                                       # (L, h, L): [a, i, b]
    best = np.take_along_axis(sims, argmax[..., None], axis=3)[..., 0].mean(axis=1)
    return best, argmax.transpose(0, 2, 1)


def same_index_mean(sims: np.ndarray) -> np.ndarray:
    """``(L, L)`` mean over heads ``i`` of ``S[a, i, b, i]``. Cost O(L^2 h)."""
    return np.einsum("aibi->abi", sims).mean(axis=2)


def _paired_mean(sims: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """``(L, L)`` mean over ``i`` of ``S[a, i, b, perm[i]]``."""
    heads = np.arange(sims.shape[1])
    return sims[:, heads, :, perm].mean(axis=0)


def random_pairing_null(sims: np.ndarray, n_perm: int = PAIRING_PERMUTATIONS,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std ``(L, L)`` of ``mean_i S[a, i, b, pi(i)]`` over ``n_perm`` seeded uniform
    permutations ``pi`` of the heads.

    One ``pi`` per draw serves every layer pair (a relabeling of heads): each pair's null
    distribution is the same as with separate draws, and the tables are reproducible from
    ``seed``. The expectation is the all-pairs mean ``mean_{i,j} S[a, i, b, j]``. Cost
    O(n_perm L^2 h), memory O(n_perm L^2).
    """
    rng = np.random.default_rng(seed)
    n_heads = sims.shape[1]
    draws = np.stack([_paired_mean(sims, rng.permutation(n_heads)) for _ in range(n_perm)])
    # Shifted by the first draw: identical draws (e.g. one head) give a std of exactly 0.
    return draws.mean(axis=0), (draws - draws[0]).std(axis=0, ddof=1)


def pair_statistics(sims: np.ndarray, best: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per layer pair ``a < b`` of ``S (L, h, L, h)``: ``a``, ``b``, same-index and best match
    (``best``: :func:`best_match`'s ``(L, L)`` matrix of ``S``), each ``(L (L - 1) / 2,)``.
    Cost O(L^2 h)."""
    a, b = np.triu_indices(sims.shape[0], k=1)
    return a, b, same_index_mean(sims)[a, b], best[a, b]


def isotropic_weight_null(n_heads: int, n_kv_heads: int, d_head: int, d: int, k: int,
                          n_layers: int = NULL_LAYERS, seed: int = 0) -> dict[str, float]:
    """Null mean and std of same-index and best match (``isotropic_mean, isotropic_std,
    best_match_null_mean, best_match_null_std``) for this architecture and k, seeded.

    Over the ``n_layers (n_layers - 1) / 2`` layer pairs of ``n_layers`` layers of isotropic
    random weights (:func:`nulls.random_weight_bases`), the statistics computed as for the data
    (:func:`cross_head_similarity`). Pairs that share a layer are not independent, but the
    layers are exchangeable, so the pairs' mean and std estimate the null's without bias (their
    precision: :data:`nulls.NULL_LAYERS`). Same-index's null mean is exactly ``k/d`` (each
    head's subspace is Haar-random, independently across layers); its std exceeds the
    ``null_std / sqrt(h)`` of independent heads when KV heads are shared, and best match's mean
    falls below theirs. Cost that of :func:`cross_head_similarity` on ``n_layers`` layers plus
    :func:`nulls.random_weight_bases`: 0.6-0.9 s on one core of the AMD EPYC of
    benchmarks/RESULTS.md for SmolLM2-135M's shape at k = 20-32.
    """
    rng = np.random.default_rng(seed)
    bases = random_weight_bases(rng, n_layers, n_heads, n_kv_heads, d_head, d, k)
    sims = cross_head_similarity(bases)
    _, _, same, best = pair_statistics(sims, best_match(sims)[0])
    return {"isotropic_mean": null_mean(k, d), "isotropic_std": float(same.std(ddof=1)),
            "best_match_null_mean": float(best.mean()),
            "best_match_null_std": float(best.std(ddof=1))}


def layer_pair_table(sims: np.ndarray, best_matrix: np.ndarray, k: int, d: int, n_kv_heads: int,
                     d_head: int, n_perm: int = PAIRING_PERMUTATIONS,
                     seed: int = 0) -> pd.DataFrame:
    """One row per layer pair ``a < b`` of the cross-head similarity ``S (L, h, L, h)`` of a
    model with ``n_kv_heads`` KV heads of size ``d_head``; ``best_matrix`` is :func:`best_match`'s
    ``(L, L)`` matrix of ``S`` (:func:`match_heads` computes both once).

    Columns: layer_a, layer_b; same_index, best_match (this module's docstring);
    random_pairing_mean, random_pairing_std (:func:`random_pairing_null`); isotropic_mean,
    isotropic_std (same-index's) and best_match_null_mean, best_match_null_std (the max over
    ``h`` heads lifts the chance level): :func:`isotropic_weight_null`; z_same_index,
    z_best_match (against those isotropic nulls); z_same_index_vs_pairing =
    ``(same_index - random_pairing_mean) / random_pairing_std``, NaN when that std is 0.
    """
    n_heads = sims.shape[1]
    a, b, same, best = pair_statistics(sims, best_matrix)
    pair_mean, pair_std = (m[a, b] for m in random_pairing_null(sims, n_perm, seed))
    null = isotropic_weight_null(n_heads, n_kv_heads, d_head, d, k, seed=seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        vs_pairing = np.where(pair_std > 0, (same - pair_mean) / pair_std, np.nan)
        return pd.DataFrame({
            "layer_a": a, "layer_b": b,
            "same_index": same, "best_match": best,
            "random_pairing_mean": pair_mean, "random_pairing_std": pair_std,
            **null,
            "z_same_index": (same - null["isotropic_mean"]) / null["isotropic_std"],
            "z_best_match": (best - null["best_match_null_mean"]) / null["best_match_null_std"],
            "z_same_index_vs_pairing": vs_pairing,
        })


def match_heads(vectors_k: np.ndarray, k: int, d: int, n_kv_heads: int, d_head: int,
                n_perm: int = PAIRING_PERMUTATIONS,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Everything the match_heads rule writes, each computed once from the ``(L, h, k, d)``
    top-k bases of all heads: the ``(L, L)`` best-match matrix and ``(L, L, h)`` pairs
    (:func:`best_match`), and :func:`layer_pair_table`. Cost that of
    :func:`similarity.cross_head_similarity` plus :func:`isotropic_weight_null`."""
    sims = cross_head_similarity(vectors_k)
    best, pairs = best_match(sims)
    return best, pairs, layer_pair_table(sims, best, k, d, n_kv_heads, d_head, n_perm, seed)
