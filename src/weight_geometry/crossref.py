"""Per-layer cross-reference of effective ranks and subspace geometry (primary head).

Each tested statistic of the layer table stands beside both nulls (isotropic, and the
row-space-conditional null of :mod:`rowspace_nulls`) and carries a p-value against the
conditional one (:func:`multiplicity.gamma_p`; one-sided for similarities, two-sided for
alignment),
BH-adjusted over the layers of this table (:mod:`multiplicity`). The three correlations across
depth are tested on linearly detrended series with circular shifts
(:func:`multiplicity.detrended_correlation`), which a shared trend in depth does not make
significant, and BH-adjusted together with Experiment 2's trends by the report.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .head_layout import head_dims
from .ksweep import gaps_at
from .multiplicity import (
    DetrendedCorrelation,
    benjamini_hochberg,
    detrended_correlation,
    null_test,
)
from .nulls import similarity_z
from .ranks import per_weight_type
from .results_io import bottleneck_layer, head_rows
from .rowspace_nulls import one_head_null

PAIRS = (
    ("mean_normalized_eff_rank", "bottleneck_similarity",
     "Normalized effective rank vs bottleneck similarity"),
    ("mean_normalized_eff_rank", "alignment",
     "Normalized effective rank vs FFN-attention alignment"),
    ("bottleneck_similarity", "alignment", "Bottleneck similarity vs FFN-attention alignment"),
)


def _next_layer(matrix: np.ndarray) -> np.ndarray:
    """``matrix[l, l+1]`` per layer, NaN for the last one."""
    return np.append(np.diagonal(matrix, offset=1), np.nan)


def layer_table(weight_ranks: pd.DataFrame, sims: np.ndarray, best_match: np.ndarray,
                bottleneck: pd.DataFrame, alignment: pd.DataFrame,
                singular_values: np.ndarray, head: int, k: int, model: dict,
                overlaps: np.ndarray) -> pd.DataFrame:
    """One row per layer ``l`` for ``head``.

    Columns: layer, head, is_bottleneck; relative_gap at ``k`` of the head's kernel,
    ``(sigma_k - sigma_k+1) / sigma_k`` from ``singular_values (L, h, d_head)`` (below
    :data:`ksweep.GAP_THRESHOLD` the top-k subspace is ill-defined; NaN at ``k = m_l``, the
    layer's head size);
    mean_eff_rank (raw, over the weight types) and mean_normalized_eff_rank (of ``eff_rank /
    min(rows, cols)``, comparable across weights of different sizes), a sparse layer's FFN
    weights each counted as its experts' mean (:func:`ranks.per_weight_type`); adjacent_similarity
    ``sim[l, l+1]`` (NaN for the last layer) with adjacent_z (isotropic), adjacent_conditional_mean,
    adjacent_conditional_std, adjacent_z_conditional, adjacent_p, adjacent_p_adjusted;
    adjacent_best_match (all heads); bottleneck_similarity with bottleneck_z (isotropic),
    bottleneck_conditional_mean, bottleneck_z_conditional, bottleneck_p, bottleneck_p_adjusted
    (the bottleneck itself untested); alignment, alignment_ratio, alignment_null_std,
    alignment_z, alignment_normalized (isotropic), alignment_conditional_chance,
    alignment_conditional_ratio, alignment_z_conditional, alignment_conditional_normalized,
    alignment_p, alignment_p_adjusted.

    Args:
        model: the ``model.json`` record (``d_model``, ``n_heads``, each layer's head size
            and KV heads: :mod:`head_layout`).
        overlaps: ``(2, L, n_kv, L, n_kv)`` :func:`rowspace_nulls.rowspace_overlaps`.
    Cost O(L^2) plus the tables' group-bys.
    """
    n, d = len(sims), model["d_model"]
    layers = np.arange(n)
    cond_mean, cond_std = one_head_null(overlaps, k, model, head)
    adjacent = _next_layer(sims)
    adjacent_z, adjacent_p = null_test(adjacent, _next_layer(cond_mean),
                                       _next_layer(cond_std))
    b = bottleneck_layer(bottleneck)
    to_ref = head_rows(bottleneck, head).reindex(layers)
    to_bottleneck = to_ref["similarity"].to_numpy()
    untested = layers == b
    bottleneck_z, bottleneck_p = null_test(np.where(untested, np.nan, to_bottleneck),
                                           to_ref["conditional_mean"],
                                           to_ref["conditional_std"])
    align = head_rows(alignment, head).reindex(layers)
    align_p = align["conditional_p"].to_numpy()
    by_layer = per_weight_type(weight_ranks).groupby("layer_idx")  # experts: their mean
    normalized = by_layer["normalized_eff_rank"].mean()
    return pd.DataFrame({
        "layer": layers,
        "head": head,
        "is_bottleneck": untested,
        "relative_gap": gaps_at(singular_values, k, head_dims(model))[:, head],
        "mean_eff_rank": by_layer["eff_rank"].mean().reindex(layers).to_numpy(),
        "mean_normalized_eff_rank": normalized.reindex(layers).to_numpy(),
        "adjacent_similarity": adjacent,
        "adjacent_z": similarity_z(adjacent, k, d),
        "adjacent_conditional_mean": _next_layer(cond_mean),
        "adjacent_conditional_std": _next_layer(cond_std),
        "adjacent_z_conditional": adjacent_z,
        "adjacent_p": adjacent_p,
        "adjacent_p_adjusted": benjamini_hochberg(adjacent_p),
        "adjacent_best_match": _next_layer(best_match),
        "bottleneck_similarity": to_bottleneck,
        "bottleneck_z": similarity_z(to_bottleneck, k, d),
        "bottleneck_conditional_mean": to_ref["conditional_mean"].to_numpy(),
        "bottleneck_z_conditional": bottleneck_z,
        "bottleneck_p": bottleneck_p,
        "bottleneck_p_adjusted": benjamini_hochberg(bottleneck_p),
        "alignment": align["alignment"].to_numpy(),
        "alignment_ratio": align["ratio"].to_numpy(),
        "alignment_null_std": align["null_std"].to_numpy(),
        "alignment_z": align["z"].to_numpy(),
        "alignment_normalized": align["normalized"].to_numpy(),
        "alignment_conditional_chance": align["conditional_chance"].to_numpy(),
        "alignment_conditional_ratio": align["conditional_ratio"].to_numpy(),
        "alignment_z_conditional": align["conditional_z"].to_numpy(),
        "alignment_conditional_normalized": align["conditional_normalized"].to_numpy(),
        "alignment_p": align_p,
        "alignment_p_adjusted": benjamini_hochberg(align_p),
    })


def layer_correlations(layers: pd.DataFrame, keep_bottleneck: bool = False
                       ) -> list[tuple[str, DetrendedCorrelation]]:
    """Detrended correlations across depth (circular-shift p) for the three metric pairs
    (:data:`PAIRS`), in layer order.

    By default the bottleneck layer's similarity to itself (1 by definition) is left out, so it
    cannot drive a correlation; ``keep_bottleneck`` keeps it, as the notebook does. Cost three
    :func:`multiplicity.detrended_correlation`: O(L^2) each.
    """
    data = layers.copy()
    if not keep_bottleneck:
        data.loc[data["is_bottleneck"], "bottleneck_similarity"] = np.nan
    return [(label, detrended_correlation(data[a], data[b], data["layer"]))
            for a, b, label in PAIRS]
