"""FFN-attention alignment from per-direction energies (no d x d projector), with its nulls.

``align(l, i, k) = ||W_in V_k^T||_F^2 / ||W_in||_F^2``: the fraction of the FFN input
projection's Frobenius energy inside head ``i``'s top-k attention subspace. With
``e_r = ||W_in v_r||^2`` stored per basis vector by the extraction, the numerator is
``sum_{r<k} e_r``: O(k) per (layer, head, k). Beside it, two nulls:

- isotropic (:mod:`nulls`): a Haar-random k-subspace of R^d; chance ``k / d``, std from the
  spectrum of ``W_in``, ceiling and floor the shares of ``W_in``'s own top-k and bottom-k
  right singular directions (the most and least any k-subspace holds);
- row-space-conditional (:mod:`rowspace_nulls`): a Haar-random k-subspace of the head's KV row
  space, where every kernel direction lies; chance, std, ceiling and floor from the spectrum
  of ``W_in``'s Gram inside that row space. The report's verdicts use this one.

Each null gives a ratio, a z-score and a normalized value, piecewise linear: the floor -1,
chance 0, the ceiling +1 (:func:`nulls.normalized_alignment`). The conditional z gets a
two-sided p under a moment-matched gamma approximation to the null
(:func:`multiplicity.gamma_p`), BH-adjusted over every (layer, head) of
this k (:mod:`multiplicity`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .head_layout import head_dims, kv_heads
from .multiplicity import benjamini_hochberg, null_test
from .nulls import (
    alignment_ceiling,
    alignment_floor,
    alignment_null_std,
    alignment_z,
    normalized_alignment,
)
from .rowspace_nulls import alignment_null
from .similarity import null_mean


def alignment_table(energy: np.ndarray, norm2: np.ndarray, ffn_singular_values: np.ndarray,
                    rowspace_eigenvalues: np.ndarray, k: int, model: dict,
                    ffn_input: str, layers=None) -> pd.DataFrame:
    """Long table, sorted by (head, layer), for every head: head, layer, alignment; the
    isotropic null's chance, ratio, null_std, z, ceiling, floor, normalized; the conditional
    null's conditional_chance, conditional_ratio, conditional_std, conditional_z,
    conditional_ceiling, conditional_floor, conditional_normalized, conditional_p,
    conditional_p_adjusted; ffn_input.

    Args:
        energy: ``(L, h, d_head)`` per-direction energies ``||W_in v_r||^2`` (zero beyond
            each layer's head size).
        norm2: ``(L,)`` ``||W_in||_F^2``.
        ffn_singular_values: ``(L, d)`` singular values of ``W_in``, descending.
        rowspace_eigenvalues: ``(L, n_kv_heads, d_head)`` eigenvalues of ``W_in``'s Gram inside
            each KV head's row space (NaN-padded: :func:`rowspace_nulls.alignment_null`).
        model: the ``model.json`` record (``d_model``, ``n_heads``, each layer's head size and
            KV heads: :mod:`head_layout`); ``k`` at most the smallest head size.
        layers: ``(L,)`` the layer (stored row, as :mod:`head_layout` indexes) of each row, for
            rows that are not the layers in order (an expert's, :mod:`expert_alignment`); None:
            row ``p`` is layer ``p``.
    Cost O(L h k + L d log d).
    """
    values = energy[:, :, :k].sum(-1) / norm2[:, None]       # (L, h)
    n_layers, n_heads = values.shape
    d = model["d_model"]
    chance = null_mean(k, d)
    per_layer = {"null_std": alignment_null_std(k, d, ffn_singular_values),
                 "ceiling": alignment_ceiling(ffn_singular_values, k),
                 "floor": alignment_floor(ffn_singular_values, k, d)}
    iso = {name: np.broadcast_to(v[:, None], values.shape) for name, v in per_layer.items()}
    if layers is not None:   # each row at its layer's sizes
        model = {**model, "head_dims": head_dims(model)[layers].tolist(),
                 "kv_heads": kv_heads(model)[layers].tolist()}
    cond = alignment_null(rowspace_eigenvalues, norm2, k, model)
    # k = m_l: no spread, no test (NaN)
    cond_z, cond_p = null_test(values, cond["chance"], cond["std"], two_sided=True)
    columns = {
        "alignment": values,
        "chance": np.full(values.shape, chance),
        "ratio": values / chance,
        "null_std": iso["null_std"],
        "z": alignment_z(values, k, d, ffn_singular_values),
        "ceiling": iso["ceiling"],
        "floor": iso["floor"],
        "normalized": normalized_alignment(values, chance, iso["ceiling"], iso["floor"]),
        "conditional_chance": cond["chance"],
        "conditional_ratio": values / cond["chance"],
        "conditional_std": cond["std"],
        "conditional_z": cond_z,
        "conditional_ceiling": cond["ceiling"],
        "conditional_floor": cond["floor"],
        "conditional_normalized": normalized_alignment(values, cond["chance"], cond["ceiling"],
                                                       cond["floor"]),
        "conditional_p": cond_p,
        "conditional_p_adjusted": benjamini_hochberg(cond_p),
    }
    return pd.DataFrame({
        "head": np.tile(np.arange(n_heads), n_layers),
        "layer": np.repeat(np.arange(n_layers), n_heads),
        **{name: np.asarray(v, dtype=float).reshape(-1) for name, v in columns.items()},
        "ffn_input": ffn_input,
    }).sort_values(["head", "layer"], ignore_index=True)
