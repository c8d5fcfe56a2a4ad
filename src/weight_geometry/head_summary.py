"""Experiment 1 for every head, and how dependent the heads of one layer are.

From the cross-head similarity ``S (L, h, L, h)`` (:func:`similarity.cross_head_similarity`):

- :func:`adjacent_by_head`: for every head ``i`` and layer ``l < L - 1``, the adjacent-layer
  similarity ``S[l, i, l+1, i]`` beside its isotropic null (``k/d``, :func:`similarity.null_std`)
  and its row-space-conditional null (:mod:`rowspace_nulls`), with a one-sided p
  (:func:`multiplicity.gamma_p`) BH-adjusted over all ``h (L - 1)`` tests;
- :func:`within_layer_similarity`: per layer, the mean similarity of two different heads of
  that layer that share a KV head, and of two that do not, each beside its conditional null
  (``k / m_p`` for a shared row space). Heads that share a KV head share its row space, so
  they are not independent replicates of one another: the report states this dependence.

Each layer (pair) is taken at its own head sizes and KV grouping (:mod:`head_layout`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .head_layout import kv_heads, kv_of_heads
from .multiplicity import benjamini_hochberg, null_test
from .nulls import similarity_z
from .rowspace_nulls import head_pair_null


def adjacent_by_head(sims: np.ndarray, overlaps: np.ndarray, k: int,
                     model: dict) -> pd.DataFrame:
    """Long table sorted by (head, layer), one row per head and layer ``l < L - 1``: head,
    kv_head, layer, adjacent_similarity (``S[l, i, l+1, i]``), z_isotropic,
    conditional_mean, conditional_std, z_conditional, p_conditional, p_conditional_adjusted.

    Args:
        sims: ``(L, h, L, h)`` cross-head similarity at this k.
        overlaps: ``(2, L, n_kv, L, n_kv)`` :func:`rowspace_nulls.rowspace_overlaps`.
        model: the ``model.json`` record (``d_model``; the layers' sizes, :mod:`head_layout`).
    Cost O(L^2 h^2) (the conditional null of every head pair; the table reads its adjacent
    ones).
    """
    n_layers, n_heads = sims.shape[:2]
    mean, std = head_pair_null(overlaps, k, model)
    layers, heads = np.arange(n_layers - 1), np.arange(n_heads)
    pick = (layers[None, :], heads[:, None], layers[None, :] + 1, heads[:, None])   # (h, L-1)
    value, cond_mean, cond_std = sims[pick], mean[pick], std[pick]
    z_cond, p = null_test(value, cond_mean, cond_std)
    return pd.DataFrame({
        "head": np.repeat(heads, n_layers - 1),
        "kv_head": kv_of_heads(model)[:-1].T.reshape(-1),
        "layer": np.tile(layers, n_heads),
        "adjacent_similarity": value.reshape(-1),
        "z_isotropic": similarity_z(value, k, model["d_model"]).reshape(-1),
        "conditional_mean": cond_mean.reshape(-1),
        "conditional_std": cond_std.reshape(-1),
        "z_conditional": z_cond.reshape(-1),
        "p_conditional": p.reshape(-1),
        "p_conditional_adjusted": benjamini_hochberg(p).reshape(-1),
    })


def within_layer_similarity(sims: np.ndarray, overlaps: np.ndarray, k: int,
                            model: dict) -> pd.DataFrame:
    """One row per layer: layer, same_kv_mean (mean ``S[l, i, l, j]`` over ``i != j`` of one KV
    head; NaN without grouped heads), same_kv_conditional_mean (``k / m_l``: one row space),
    other_kv_mean (over ``i, j`` of different KV heads; NaN with one KV head) and
    other_kv_conditional_mean, each layer with its own KV grouping (:mod:`head_layout`). Cost
    O(L h^2)."""
    n_layers, n_heads = sims.shape[:2]
    mean, _ = head_pair_null(overlaps, k, model)
    layers = np.arange(n_layers)
    within = sims[layers, :, layers, :]                          # (L, h, h)
    within_null = mean[layers, :, layers, :]
    columns = {name: np.full(n_layers, np.nan) for name in (
        "same_kv_mean", "same_kv_conditional_mean", "other_kv_mean", "other_kv_conditional_mean")}
    counts, kv = kv_heads(model), kv_of_heads(model)
    for n_kv in np.unique(counts):                 # the layers that group heads alike
        at = counts == n_kv
        shared = kv[at][0][:, None] == kv[at][0][None, :]
        for name, mask in (("same", shared & ~np.eye(n_heads, dtype=bool)),
                           ("other", ~shared)):
            if mask.any():
                columns[f"{name}_kv_mean"][at] = within[at][:, mask].mean(axis=1)
                columns[f"{name}_kv_conditional_mean"][at] = within_null[at][:, mask].mean(axis=1)
    return pd.DataFrame({"layer": layers, **columns})
