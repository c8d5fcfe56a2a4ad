"""Per-layer cross-reference of effective ranks and subspace geometry (primary head)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .statistics import Correlation, correlate

PAIRS = (
    ("mean_eff_rank", "bottleneck_similarity", "Effective rank vs bottleneck similarity"),
    ("mean_eff_rank", "alignment", "Effective rank vs FFN-attention alignment"),
    ("bottleneck_similarity", "alignment", "Bottleneck similarity vs FFN-attention alignment"),
)


def layer_table(weight_ranks: pd.DataFrame, sims: np.ndarray, bottleneck: pd.DataFrame,
                alignment: pd.DataFrame, head: int) -> pd.DataFrame:
    """One row per layer: mean effective rank over the seven weights, ``sim[l, l+1]`` (NaN for
    the last layer), similarity to the bottleneck and alignment of ``head``."""
    n = len(sims)
    adj = np.append(np.diagonal(sims, offset=1), np.nan)
    to_ref = bottleneck[bottleneck["head"] == head].set_index("layer")["similarity"]
    align = alignment[alignment["head"] == head].set_index("layer")
    mean_rank = weight_ranks.groupby("layer_idx")["eff_rank"].mean()
    layers = np.arange(n)
    return pd.DataFrame({
        "layer": layers,
        "head": head,
        "is_bottleneck": layers == int(bottleneck["bottleneck_layer"].iloc[0]),
        "mean_eff_rank": mean_rank.reindex(layers).to_numpy(),
        "adjacent_similarity": adj,
        "bottleneck_similarity": to_ref.reindex(layers).to_numpy(),
        "alignment": align["alignment"].reindex(layers).to_numpy(),
        "alignment_ratio": align["ratio"].reindex(layers).to_numpy(),
    })


def layer_correlations(layers: pd.DataFrame) -> list[tuple[str, Correlation]]:
    """Pearson/Spearman (with permutation p) for the three metric pairs.

    The bottleneck layer's similarity to itself (1 by definition) is left out, so it cannot
    drive a correlation.
    """
    data = layers.copy()
    data.loc[data["is_bottleneck"], "bottleneck_similarity"] = np.nan
    return [(label, correlate(data[a], data[b])) for a, b, label in PAIRS]
