"""Synthetic stored arrays of a model whose layers differ in head size and KV-head count
(Gemma 4's layout), padded as :mod:`weight_geometry.head_layout` says, for the readers' tests.

Each layer's arrays come from the library's own kernels on random Gaussian weights of that
layer's sizes; :func:`mixed_model` returns them with the ``model.json`` record, and each layer's
unpadded arrays, so a test can compare a reader's answer on the padded whole with one computed
on each layer (or pair of layers) at its own sizes.
"""

from __future__ import annotations

import numpy as np
import torch

from weight_geometry.head_layout import layout_record, pad_to
from weight_geometry.kernels import factored_subspaces, ov_circuits


def mixed_model(d: int = 48, n_heads: int = 4, head_dims=(8, 12, 8, 12, 8),
                kv_heads=(2, 1, 2, 1, 2), d_ff: int = 64, seed: int = 0):
    """``(model, arrays, layers)``: the ``model.json`` record (``n_layers``, ``d_model``,
    ``d_ff``, ``n_heads`` and :func:`layout_record`'s keys); the stored arrays of the whole
    model, ``(L, ...)`` padded per the contract (``vectors``, ``singular_values``,
    ``query_vectors``, ``ov_write_vectors``, ``ov_read_vectors``, ``ov_singular_values``,
    ``ffn_input_energy``, ``ffn_input_rowspace_eigenvalues``, ``ffn_input_norm2``); and per
    layer a dict of the same arrays unpadded plus its weights (``W_Q``, ``W_K``, ``W_V``,
    ``W_O``, ``W_gate``: float64 numpy) and sizes ``m``, ``n_kv``."""
    rng = np.random.default_rng(seed)
    layers = []
    for m, n_kv in zip(head_dims, kv_heads, strict=True):
        shapes = {"W_Q": (n_heads * m, d), "W_K": (n_kv * m, d), "W_V": (n_kv * m, d),
                  "W_O": (d, n_heads * m), "W_gate": (d_ff, d)}
        w = {name: rng.standard_normal(shape) for name, shape in shapes.items()}
        t = {name: torch.from_numpy(value) for name, value in w.items()}
        f = factored_subspaces(t["W_Q"], t["W_K"], n_heads, n_kv, m, torch.float64)
        energy, eig = f.energies(t["W_gate"].T @ t["W_gate"])
        ov = ov_circuits(t["W_O"], t["W_V"], n_heads, n_kv, m, torch.float64)
        layers.append({
            **w, "m": m, "n_kv": n_kv,
            "vectors": f.vectors().numpy().astype(np.float32),
            "singular_values": f.singular_values.numpy(),
            "query_vectors": f.left_vectors(t["W_Q"]).numpy().astype(np.float32),
            "ov_write_vectors": ov.left.numpy().astype(np.float32),
            "ov_read_vectors": ov.right.numpy().astype(np.float32),
            "ov_singular_values": ov.singular_values.numpy(),
            "ffn_input_energy": energy.numpy(),
            "ffn_input_rowspace_eigenvalues": eig.numpy(),
            "ffn_input_norm2": np.array(float(np.square(w["W_gate"]).sum())),
        })
    model = {"n_layers": len(layers), "d_model": d, "d_ff": d_ff, "n_heads": n_heads,
             **layout_record(head_dims, kv_heads)}
    m_max, kv_max = model["d_head"], model["n_kv_heads"]
    shapes = {"vectors": (n_heads, m_max, d), "query_vectors": (n_heads, m_max, d),
              "ov_write_vectors": (n_heads, m_max, d), "ov_read_vectors": (n_heads, m_max, d),
              "singular_values": (n_heads, m_max), "ov_singular_values": (n_heads, m_max),
              "ffn_input_energy": (n_heads, m_max),
              "ffn_input_rowspace_eigenvalues": (kv_max, m_max), "ffn_input_norm2": ()}
    arrays = {name: np.stack([pad_to(layer[name], shape,
                                   np.nan if name.endswith("eigenvalues") else 0.0)
                              for layer in layers])
              for name, shape in shapes.items()}
    return model, arrays, layers
