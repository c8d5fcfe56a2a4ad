"""Per-layer cross-reference of effective ranks and subspace geometry (primary head)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .ksweep import gaps_at
from .nulls import similarity_z
from .results_io import bottleneck_layer, head_rows
from .statistics import Correlation, correlate

PAIRS = (
    ("mean_eff_rank", "bottleneck_similarity", "Effective rank vs bottleneck similarity"),
    ("mean_eff_rank", "alignment", "Effective rank vs FFN-attention alignment"),
    ("bottleneck_similarity", "alignment", "Bottleneck similarity vs FFN-attention alignment"),
)


def _next_layer(matrix: np.ndarray) -> np.ndarray:
    """``matrix[l, l+1]`` per layer, NaN for the last one."""
    return np.append(np.diagonal(matrix, offset=1), np.nan)


def layer_table(weight_ranks: pd.DataFrame, sims: np.ndarray, best_match: np.ndarray,
                bottleneck: pd.DataFrame, alignment: pd.DataFrame,
                singular_values: np.ndarray, head: int, k: int, d: int) -> pd.DataFrame:
    """One row per layer ``l`` for ``head``: the relative spectral gap at ``k`` of the head's
    kernel, ``(sigma_k - sigma_k+1) / sigma_k`` from ``singular_values (L, h, d_head)`` (below
    :data:`ksweep.GAP_THRESHOLD` the top-k subspace is ill-defined; NaN at ``k = d_head``);
    mean effective rank over the weight types; ``sim[l, l+1]`` and the best-match similarity
    of layer l to l+1 (all heads; NaN for the last layer); similarity to the bottleneck;
    alignment, its ratio to chance, null std, z-score and value normalized between chance and
    ceiling. Similarity z-scores are against the isotropic null of k-subspaces of R^d
    (:func:`nulls.similarity_z`)."""
    n = len(sims)
    to_ref = head_rows(bottleneck, head)["similarity"]
    align = head_rows(alignment, head).reindex(np.arange(n))
    mean_rank = weight_ranks.groupby("layer_idx")["eff_rank"].mean()
    layers = np.arange(n)
    adjacent = _next_layer(sims)
    to_bottleneck = to_ref.reindex(layers).to_numpy()
    return pd.DataFrame({
        "layer": layers,
        "head": head,
        "is_bottleneck": layers == bottleneck_layer(bottleneck),
        "relative_gap": gaps_at(singular_values, k)[:, head],
        "mean_eff_rank": mean_rank.reindex(layers).to_numpy(),
        "adjacent_similarity": adjacent,
        "adjacent_z": similarity_z(adjacent, k, d),
        "adjacent_best_match": _next_layer(best_match),
        "bottleneck_similarity": to_bottleneck,
        "bottleneck_z": similarity_z(to_bottleneck, k, d),
        "alignment": align["alignment"].to_numpy(),
        "alignment_ratio": align["ratio"].to_numpy(),
        "alignment_null_std": align["null_std"].to_numpy(),
        "alignment_z": align["z"].to_numpy(),
        "alignment_normalized": align["normalized"].to_numpy(),
    })


def layer_correlations(layers: pd.DataFrame, keep_bottleneck: bool = False
                       ) -> list[tuple[str, Correlation]]:
    """Pearson/Spearman (with permutation p) for the three metric pairs.

    By default the bottleneck layer's similarity to itself (1 by definition) is left out, so it
    cannot drive a correlation; ``keep_bottleneck`` keeps it, as the notebook does. Cost three
    :func:`statistics.correlate`: O(n_perm L) each, for ``L`` layers.
    """
    data = layers.copy()
    if not keep_bottleneck:
        data.loc[data["is_bottleneck"], "bottleneck_similarity"] = np.nan
    return [(label, correlate(data[a], data[b])) for a, b, label in PAIRS]
