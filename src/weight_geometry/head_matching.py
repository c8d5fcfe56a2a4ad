"""Layer comparisons that do not depend on how heads are numbered.

Head ``i`` of layer ``a`` and head ``i`` of layer ``b`` need not play the same role: the
numbering of heads is arbitrary per layer. From the cross-head similarity tensor
``S[a, i, b, j] = sim(V_a,i, V_b,j)`` (:func:`similarity.cross_head_similarity`) this module
gives, per layer pair:

- same-index: ``mean_i S[a, i, b, i]`` (what per-head similarity matrices average);
- best match: ``mean_i max_j S[a, i, b, j]`` (each head of ``a`` paired with its most similar
  head of ``b``; many-to-one, not symmetric in ``a, b``);
- a structured null: ``mean_i S[a, i, b, pi(i)]`` over random head orderings ``pi`` that keep
  the KV heads together (blocks permuted as wholes, heads within them; where the two layers
  group heads differently, the coarser layer's blocks, :func:`pairing_groups`), which keeps
  the similarities of this pair of layers and only breaks the numbering: its exact mean and std,
  and the permutation p of same-index against it (does head ``i`` of ``a`` look where head
  ``i`` of ``b`` looks more than an arbitrary pairing? "head identities persist"), BH-adjusted
  over the layer pairs (:mod:`multiplicity`);
- the isotropic null of both: their distribution over the layer pairs of a model of the same
  shape with isotropic random weights (:func:`isotropic_weight_null`; per pair of layer
  layouts where layers differ in head size or KV-head count);
- the row-space-conditional null of same-index: each head's subspace a random k-subspace of its
  own KV row space (:mod:`rowspace_nulls`), exact mean and std, with a one-sided p
  (:func:`multiplicity.gamma_p`) BH-adjusted over the layer pairs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .head_layout import head_dims, kv_heads
from .multiplicity import (
    PAIRING_P_PERMUTATIONS,
    benjamini_hochberg,
    null_test,
    pairing_null_exact,
    pairing_permutation_p,
    z_score,
)
from .nulls import NULL_LAYERS, random_weight_bases
from .rowspace_nulls import same_index_null
from .similarity import cross_head_similarity, null_mean


def best_match(sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(L, L)`` mean over heads ``i`` of ``max_j S[a, i, b, j]`` and the ``(L, L, h)`` int
    argmax ``j`` for each ``(a, b, i)``. The diagonal is 1 (each head matches itself). Cost
    O(L^2 h^2): one pass for the argmax, the maxima read at it."""
    argmax = sims.argmax(axis=3)                                       # (L, h, L): [a, i, b]
    best = np.take_along_axis(sims, argmax[..., None], axis=3)[..., 0].mean(axis=1)
    return best, argmax.transpose(0, 2, 1)


def same_index_matrices(sims: np.ndarray) -> np.ndarray:
    """``(h, L, L)``: each head's same-index matrix ``S[a, i, b, i]`` (what the
    similarity_matrix rule computes for one head, from the all-heads blocks: equal to float32
    rounding). Cost O(L^2 h)."""
    return np.ascontiguousarray(np.einsum("aibi->iab", sims))


def same_index_mean(sims: np.ndarray) -> np.ndarray:
    """``(L, L)`` mean over heads ``i`` of ``S[a, i, b, i]``. Cost O(L^2 h)."""
    return np.einsum("aibi->abi", sims).mean(axis=2)


def pair_statistics(sims: np.ndarray, best: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per layer pair ``a < b`` of ``S (L, h, L, h)``: ``a``, ``b``, same-index and best match
    (``best``: :func:`best_match`'s ``(L, L)`` matrix of ``S``), each ``(L (L - 1) / 2,)``.
    Cost O(L^2 h)."""
    a, b = np.triu_indices(sims.shape[0], k=1)
    return a, b, same_index_mean(sims)[a, b], best[a, b]


def isotropic_weight_null(model: dict, k: int, n_layers: int = NULL_LAYERS, seed: int = 0
                          ) -> dict[str, np.ndarray]:
    """Null mean and std of same-index and best match (``isotropic_mean, isotropic_std,
    best_match_null_mean, best_match_null_std``, each ``(L, L)`` over the model's layer pairs)
    for this architecture and k, seeded.

    Over the ``n_layers (n_layers - 1) / 2`` layer pairs of ``n_layers`` layers of isotropic
    random weights (:func:`nulls.random_weight_bases`), the statistics computed as for the data
    (:func:`cross_head_similarity`). Pairs that share a layer are not independent, but the
    layers are exchangeable, so the pairs' mean and std estimate the null's without bias (their
    precision: :data:`nulls.NULL_LAYERS`). Same-index's null mean is exactly ``k/d`` (each
    head's subspace is Haar-random, independently across layers); its std exceeds the
    ``null_std / sqrt(h)`` of independent heads when KV heads are shared, and best match's mean
    falls below theirs. Where layers differ in layout (head size ``m_p``, KV-head count
    ``n_kv_p``: :mod:`head_layout`), ``n_layers`` layers of each of the ``U`` layouts are
    drawn at their own sizes, and the pair ``(a, b)`` gets the statistics of the drawn pairs of
    its two layouts (``n_layers^2`` pairs across two layouts, ``n_layers (n_layers - 1) / 2``
    within one). Cost that of :func:`cross_head_similarity` on ``U n_layers`` layers plus
    :func:`nulls.random_weight_bases`: 0.6-0.9 s on one core of the AMD EPYC of
    benchmarks/RESULTS.md for SmolLM2-135M's shape at k = 20-32 (``U = 1``), ``U^2`` times that.
    """
    rng = np.random.default_rng(seed)
    layouts, kind = np.unique(np.stack([head_dims(model), kv_heads(model)], axis=1), axis=0,
                              return_inverse=True)
    drawn = np.repeat(np.arange(len(layouts)), n_layers)          # layout of each drawn layer
    bases = random_weight_bases(rng, model["n_heads"], layouts[drawn, 1], layouts[drawn, 0],
                                model["d_model"], k)
    sims = cross_head_similarity(bases)
    a, b, same, best = pair_statistics(sims, best_match(sims)[0])
    names = ("isotropic_std", "best_match_null_mean", "best_match_null_std")
    by_layouts = {name: np.empty((len(layouts),) * 2) for name in names}
    for u, v in zip(*np.triu_indices(len(layouts)), strict=True):
        at = (drawn[a] == u) & (drawn[b] == v)                   # drawn[a] <= drawn[b]
        for name, value in zip(names, (same[at].std(ddof=1), best[at].mean(),
                                       best[at].std(ddof=1)), strict=True):
            by_layouts[name][u, v] = by_layouts[name][v, u] = value
    return {"isotropic_mean": np.full((len(kind),) * 2, null_mean(k, model["d_model"])),
            **{name: value[kind[:, None], kind[None, :]] for name, value in by_layouts.items()}}


def pairing_groups(model: dict) -> np.ndarray:
    """``(L, L)`` int: the block size of the pairing null of each layer pair
    (:func:`multiplicity.pairing_null_exact`), ``max(h / n_kv_a, h / n_kv_b)``: the coarser
    layer's heads per KV head.

    The pairing test compares same-index with orderings ``pi`` of the heads; it is exact when
    random weights leave the law of ``S[a, :, b, :]`` unchanged under them. Relabeling one
    layer's heads within its KV structure (its blocks permuted as wholes, heads within them)
    does, and relabeling layer ``b`` by ``pi`` or layer ``a`` by ``pi^-1`` gives the same set
    of pairings (the orderings form a group). So either layer's own blocks give an exact test
    (an ordering that mixes one layer's blocks would credit same-index with the overlap of two
    of its KV heads' row spaces); where the layers group heads differently, the coarser
    layer's, within whose KV heads every head is exchangeable with more others (all ``h!``
    orderings for a layer with one KV head). Equal to both layers' grouping where they agree.
    Cost O(L^2)."""
    group = model["n_heads"] // kv_heads(model)
    return np.maximum.outer(group, group)


def layer_pair_table(sims: np.ndarray, best_matrix: np.ndarray, k: int, model: dict,
                     overlaps: np.ndarray, n_perm: int = PAIRING_P_PERMUTATIONS,
                     seed: int = 0) -> pd.DataFrame:
    """One row per layer pair ``a < b`` of the cross-head similarity ``S (L, h, L, h)`` of the
    model of the ``model.json`` record ``model`` (``d_model``, ``n_heads``, each layer's KV
    heads and head size: :mod:`head_layout`); ``best_matrix`` is :func:`best_match`'s
    ``(L, L)`` matrix of ``S`` (:func:`match_heads` computes both once); ``overlaps`` the
    ``(2, L, n_kv, L, n_kv)`` :func:`rowspace_nulls.rowspace_overlaps` of the model.

    Columns: layer_a, layer_b; same_index, best_match (this module's docstring);
    random_pairing_mean, random_pairing_std (exact, :func:`multiplicity.pairing_null_exact`,
    orderings that keep KV heads together, :func:`pairing_groups`);
    isotropic_mean, isotropic_std (same-index's) and best_match_null_mean, best_match_null_std
    (the max over ``h`` heads lifts the chance level): :func:`isotropic_weight_null`;
    conditional_mean, conditional_std (same-index's row-space-conditional null); z_same_index,
    z_best_match (against the isotropic nulls); z_conditional; z_same_index_vs_pairing =
    ``(same_index - random_pairing_mean) / random_pairing_std``, NaN when that std is 0;
    p_pairing (the permutation p of same-index over head orderings,
    :func:`multiplicity.pairing_permutation_p`) and p_pairing_adjusted; p_conditional (upper
    tail, :func:`multiplicity.gamma_p`) and p_conditional_adjusted, both BH over the layer pairs.
    Cost O(L^2 h^2) plus the permutations' O(P L^2 h / 2) and :func:`isotropic_weight_null`.
    """
    a, b, same, best = pair_statistics(sims, best_matrix)
    group = pairing_groups(model)
    pair_mean, pair_std = (m[a, b] for m in pairing_null_exact(sims, group))
    p_pairing = pairing_permutation_p(sims, n_perm, seed, group=group)[a, b]
    cond_mean, cond_std = (m[a, b] for m in same_index_null(overlaps, k, model))
    null = {name: m[a, b] for name, m in isotropic_weight_null(model, k, seed=seed).items()}
    vs_pairing = z_score(same, pair_mean, pair_std)
    z_conditional, p_conditional = null_test(same, cond_mean, cond_std)
    return pd.DataFrame({
        "layer_a": a, "layer_b": b,
        "same_index": same, "best_match": best,
        "random_pairing_mean": pair_mean, "random_pairing_std": pair_std,
        **null,
        "conditional_mean": cond_mean, "conditional_std": cond_std,
        "z_same_index": (same - null["isotropic_mean"]) / null["isotropic_std"],
        "z_best_match": (best - null["best_match_null_mean"]) / null["best_match_null_std"],
        "z_conditional": z_conditional,
        "z_same_index_vs_pairing": vs_pairing,
        "p_pairing": p_pairing,
        "p_pairing_adjusted": benjamini_hochberg(p_pairing),
        "p_conditional": p_conditional,
        "p_conditional_adjusted": benjamini_hochberg(p_conditional),
    })


def match_heads(vectors_k: np.ndarray, k: int, model: dict,
                overlaps: np.ndarray, n_perm: int = PAIRING_P_PERMUTATIONS,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray, pd.DataFrame, np.ndarray]:
    """Everything the match_heads rule writes, each computed once from the ``(L, h, k, d)``
    top-k bases of all heads: the ``(L, L)`` best-match matrix and ``(L, L, h)`` pairs
    (:func:`best_match`), :func:`layer_pair_table`, and the cross-head similarity ``S (L, h,
    L, h)`` itself. Cost that of :func:`similarity.cross_head_similarity` plus
    :func:`layer_pair_table`."""
    sims = cross_head_similarity(vectors_k)
    best, pairs = best_match(sims)
    table = layer_pair_table(sims, best, k, model, overlaps, n_perm, seed)
    return best, pairs, table, sims
