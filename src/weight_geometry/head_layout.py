"""Per-layer head sizes and KV-head counts (Gemma 4), and how the stored arrays hold them.

Most models have one head size ``d_head`` and one KV-head count ``n_kv`` for every layer.
Gemma 4's global (``full``) layers have their own (``global_head_dim``,
``num_global_key_value_heads``) beside its sliding layers'. ``model.json`` then lists them per
attention layer (per stored row ``p``, as :mod:`hybrid` indexes): ``head_dims[p]`` (``m_p``)
and ``kv_heads[p]`` (``n_kv_p``); its ``d_head`` and ``n_kv_heads`` are the largest, the widths
of the stored arrays. Without those keys every layer has ``d_head`` and ``n_kv_heads``.

Storage contract (every ``bases/.../*.npy``; ``h`` query heads in every layer):

- per-head arrays ``(h, d_head, ...)`` (``vectors``, ``query_vectors``, ``ov_*``,
  ``singular_values``, ``ffn_input_energy``, ``expert_energy``): entries ``r >= m_p`` are zero
  (zero vectors, zero singular values, zero energies), so top-k prefixes with ``k <= m_p``
  and prefix sums are exact, and a padded row adds nothing to a projection or an overlap;
- per-KV-head arrays ``(n_kv_heads, d_head)`` (``ffn_input_rowspace_eigenvalues``,
  ``expert_rowspace_eigenvalues``): NaN for ``r >= m_p`` and for KV heads ``j >= n_kv_p``,
  so a reader that forgets the layer's own sizes gets NaN, not a wrong null.

Query head ``i`` of layer ``p`` reads KV head ``i // (h // n_kv_p)``; every ``n_kv_p`` divides
``h``. Cost of every function: O(L h).
"""

from __future__ import annotations

import numpy as np


def head_dims(model: dict) -> np.ndarray:
    """``(L_attn,)`` int: each attention layer's head size ``m_p``."""
    return _per_layer(model, "head_dims", "d_head")


def kv_heads(model: dict) -> np.ndarray:
    """``(L_attn,)`` int: each attention layer's KV-head count ``n_kv_p``."""
    return _per_layer(model, "kv_heads", "n_kv_heads")


def is_uniform(model: dict) -> bool:
    """Whether every attention layer has the same head size and KV-head count."""
    return model.get("head_dims") is None and model.get("kv_heads") is None


def min_head_dim(model: dict) -> int:
    """The smallest head size: the largest ``k`` every layer allows."""
    return int(head_dims(model).min())


def kv_of_heads(model: dict) -> np.ndarray:
    """``(L_attn, h)`` int: the KV head each query head reads, per attention layer."""
    group = model["n_heads"] // kv_heads(model)
    return np.arange(model["n_heads"])[None, :] // group[:, None]


def first_heads(model: dict) -> np.ndarray:
    """``(L_attn, n_kv_heads)`` int: the first query head of each KV head (whose stored
    vectors span that KV head's row space), -1 for a KV head the layer does not have."""
    n_kv = kv_heads(model)
    j = np.arange(model["n_kv_heads"])[None, :]
    return np.where(j < n_kv[:, None], j * (model["n_heads"] // n_kv)[:, None], -1)


def key_sources(model: dict) -> np.ndarray:
    """``(L_attn,)`` int: for each attention layer (stored row ``p``), the row of the layer
    whose W_K its kernel ends in: its own, or for a Gemma 4 layer that reuses an earlier
    layer's keys (``model.json``'s ``kv_shared_layers``, ``{layer: source}`` in model layers)
    that layer's."""
    layers = model.get("attention_layers") or list(range(model["n_layers"]))
    row = {layer: p for p, layer in enumerate(layers)}
    shared = {int(layer): source for layer, source in
              (model.get("kv_shared_layers") or {}).items()}
    return np.array([row[shared.get(layer, layer)] for layer in layers], dtype=int)


def same_keys(model: dict, kv: np.ndarray) -> np.ndarray:
    """``(L, n, L, n)`` bool for query heads given by their KV heads ``kv`` ``(L, n)``: whether
    head ``i`` of layer ``a`` and head ``j`` of another layer ``b`` end in the same ``W_K_j``
    (both layers read one layer's keys, through the same KV head). All False without key
    reuse."""
    src = key_sources(model)
    n_layers = len(src)
    pair = (src[:, None] == src[None, :]) & ~np.eye(n_layers, dtype=bool)
    return pair[:, None, :, None] & (kv[:, :, None, None] == kv[None, None, :, :])


def layout_record(head_sizes, kv_counts) -> dict:
    """The ``model.json`` keys for per-layer sizes (``d_head``, ``n_kv_heads`` the largest;
    ``head_dims``, ``kv_heads`` only where a layer differs): empty of the per-layer keys for
    a uniform model, so its record is as before."""
    sizes, counts = [int(s) for s in head_sizes], [int(c) for c in kv_counts]
    out = {"d_head": max(sizes), "n_kv_heads": max(counts)}
    if len(set(sizes)) > 1 or len(set(counts)) > 1:
        out.update(head_dims=sizes, kv_heads=counts)
    return out


def pad_to(array: np.ndarray, shape: tuple[int, ...], fill: float) -> np.ndarray:
    """``array`` in the leading corner of a ``shape`` array filled with ``fill`` (``array``
    itself where it has that shape). Cost: one copy."""
    if array.shape == tuple(shape):
        return array
    out = np.full(shape, fill, dtype=array.dtype)
    out[tuple(slice(0, n) for n in array.shape)] = array
    return out


def _per_layer(model: dict, key: str, uniform_key: str) -> np.ndarray:
    values = model.get(key)
    if values is None:
        n = len(model.get("attention_layers") or range(model["n_layers"]))
        return np.full(n, model[uniform_key], dtype=int)
    return np.asarray(values, dtype=int)
