"""FFN-attention alignment from per-direction energies (no d x d projector).

``align(l, i, k) = ||W_in V_k^T||_F^2 / ||W_in||_F^2``: the fraction of the FFN input
projection's Frobenius energy inside head ``i``'s top-k attention subspace. With
``e_r = ||W_in v_r||^2`` stored per basis vector by the extraction, the numerator is
``sum_{r<k} e_r``: O(k) per (layer, head, k). Chance (isotropic subspace) = ``k / d``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def alignment_table(energy: np.ndarray, norm2: np.ndarray, k: int, d: int,
                    ffn_input: str) -> pd.DataFrame:
    """Long table (head, layer, alignment, chance, ratio, ffn_input) for every head.

    Args:
        energy: ``(L, h, d_head)`` per-direction energies ``||W_in v_r||^2``.
        norm2: ``(L,)`` ``||W_in||_F^2``.
    """
    values = energy[:, :, :k].sum(-1) / norm2[:, None]       # (L, h)
    n_layers, n_heads = values.shape
    chance = k / d
    return pd.DataFrame({
        "head": np.tile(np.arange(n_heads), n_layers),
        "layer": np.repeat(np.arange(n_layers), n_heads),
        "alignment": values.reshape(-1),
        "chance": chance,
        "ratio": values.reshape(-1) / chance,
        "ffn_input": ffn_input,
    }).sort_values(["head", "layer"], ignore_index=True)
