"""One pass over a range of layers: every tensor read once, everything k- and head-independent.

Per layer ``l`` the layer's weights are read (each stored tensor once) and produce:
- ``vectors[l]`` ``(h, d_head, d)``: right singular vectors of each head's kernel
  (:func:`kernels.head_subspaces`), all ``d_head`` of them;
- ``singular_values[l]`` ``(h, d_head)``;
- ``ffn_input_energy[l]`` ``(h, d_head)``: ``||W_in v||^2`` for each of those vectors, where
  ``W_in`` is the FFN input projection (``W_gate``, or ``W_up`` for a non-gated FFN). As
  ``V_k`` is the first ``k`` rows, ``||W_in V_k^T||_F^2`` is a prefix sum, so the alignment
  of every head at every k follows without re-reading weights. Computed from
  ``G = W_in^T W_in`` (the Gram matrix that the effective rank needs anyway) as
  ``diag(V G V^T)``, cost O(h d_head d^2);
- ``ffn_input_norm2[l]``: ``||W_in||_F^2 = trace(G)``;
- effective-rank rows (layer_idx, weight_type, shape, eff_rank) for every weight.
Peak memory: one layer's weights (numpy and device copies) plus one d x d Gram matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .checkpoint import Checkpoint
from .kernels import head_subspaces
from .ranks import (
    effective_rank_from_singular_values,
    gram,
    singular_values_from_gram,
    smaller_side,
)
from .rule_script import progress


@dataclass
class LayerRangeResult:
    """Arrays stacked over the layers of one extraction job (first axis = layer)."""

    vectors: np.ndarray
    singular_values: np.ndarray
    ffn_input_energy: np.ndarray
    ffn_input_norm2: np.ndarray
    weight_ranks: pd.DataFrame


def extract_layers(ckpt: Checkpoint, layers: range, device: torch.device,
                   fold_norms: bool = False) -> LayerRangeResult:
    """Run the single pass over ``layers`` of ``ckpt`` on ``device``."""
    dims = ckpt.dims
    n = len(layers)
    vectors = np.empty((n, dims.n_heads, dims.d_head, dims.d_model), dtype=np.float32)
    sigmas = np.empty((n, dims.n_heads, dims.d_head))
    energy = np.empty((n, dims.n_heads, dims.d_head))
    norm2 = np.empty(n)
    rows = []
    ffn_input = ckpt.adapter.ffn_input
    for pos, layer in enumerate(layers):
        weights = {}
        for wt, array in ckpt.read_layer(layer, fold_norms).items():
            weights[wt] = torch.from_numpy(array).to(device)
            shape = tuple(weights[wt].shape)
            g = gram(weights[wt], "in" if wt == ffn_input else smaller_side(shape))
            rows.append((layer, wt, f"{shape[0]}x{shape[1]}",
                         effective_rank_from_singular_values(singular_values_from_gram(g), shape)))
            if wt == ffn_input:
                ffn_gram = g
            if wt not in ("W_Q", "W_K"):
                del weights[wt]  # keep only what the kernels still need
        v, s = head_subspaces(weights["W_Q"].double(), weights["W_K"].double(), dims.n_heads,
                              dims.n_kv_heads, dims.d_head)
        vectors[pos] = v.float().cpu().numpy()
        sigmas[pos] = s.cpu().numpy()
        energy[pos] = ((v @ ffn_gram) * v).sum(-1).cpu().numpy()
        norm2[pos] = float(torch.trace(ffn_gram))
        progress(f"layer {layer} done ({pos + 1}/{n})")
    ranks = pd.DataFrame(rows, columns=["layer_idx", "weight_type", "shape", "eff_rank"])
    return LayerRangeResult(vectors, sigmas, energy, norm2, ranks)
