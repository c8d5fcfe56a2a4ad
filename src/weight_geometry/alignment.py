"""FFN-attention alignment from per-direction energies (no d x d projector), with its nulls.

``align(l, i, k) = ||W_in V_k^T||_F^2 / ||W_in||_F^2``: the fraction of the FFN input
projection's Frobenius energy inside head ``i``'s top-k attention subspace. With
``e_r = ||W_in v_r||^2`` stored per basis vector by the extraction, the numerator is
``sum_{r<k} e_r``: O(k) per (layer, head, k). Beside it, per layer: the isotropic null (mean
``k / d``, std from the spectrum of ``W_in``, :mod:`nulls`), the z-score, the ceiling (the
share of the energy in ``W_in``'s own top-k right singular directions, the most any k-subspace
can hold) and the alignment normalized between chance (0) and that ceiling (1).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .nulls import alignment_ceiling, alignment_null_std, alignment_z, normalized_alignment
from .similarity import null_mean


def alignment_table(energy: np.ndarray, norm2: np.ndarray, ffn_singular_values: np.ndarray,
                    k: int, d: int, ffn_input: str) -> pd.DataFrame:
    """Long table, sorted by (head, layer), for every head: head, layer, alignment, chance,
    ratio (to chance), null_std, z, ceiling, normalized, ffn_input.

    Args:
        energy: ``(L, h, d_head)`` per-direction energies ``||W_in v_r||^2``.
        norm2: ``(L,)`` ``||W_in||_F^2``.
        ffn_singular_values: ``(L, d)`` singular values of ``W_in``, descending.
    Cost O(L h k + L d).
    """
    values = energy[:, :, :k].sum(-1) / norm2[:, None]       # (L, h)
    n_layers, n_heads = values.shape
    chance = null_mean(k, d)
    # Per-layer quantities broadcast to (L, h), flattened like ``values``.
    std = np.broadcast_to(alignment_null_std(k, d, ffn_singular_values)[:, None], values.shape)
    top = np.broadcast_to(alignment_ceiling(ffn_singular_values, k)[:, None], values.shape)
    z = alignment_z(values, k, d, ffn_singular_values)
    return pd.DataFrame({
        "head": np.tile(np.arange(n_heads), n_layers),
        "layer": np.repeat(np.arange(n_layers), n_heads),
        "alignment": values.reshape(-1),
        "chance": chance,
        "ratio": values.reshape(-1) / chance,
        "null_std": std.reshape(-1),
        "z": z.reshape(-1),
        "ceiling": top.reshape(-1),
        "normalized": normalized_alignment(values, k, d, top).reshape(-1),
        "ffn_input": ffn_input,
    }).sort_values(["head", "layer"], ignore_index=True)
