"""Hybrid models: the experiments run over the layers with softmax attention.

A hybrid (Qwen3.5, Qwen3-Next) puts linear-attention layers (gated DeltaNet, ``linear_attn.*``)
between its full-attention layers. Only a softmax-attention layer has the kernel
``W_Q_i^T W_K_j``, so the extraction stores arrays for those layers alone, in layer order:
row ``p`` of every ``bases/.../*.npy`` (and row and column ``p`` of every ``(L_attn, L_attn)``
matrix: ``similarity_head{h}.npy``, ``best_match.npy``, ``same_index.npy``) is model layer
``attention_layers[p]``, which ``model.json`` lists. The library's experiments index layers by
that position ``p``; the per-layer tables written to disk name the model's own layer index
(:func:`to_model_layers`), and a reader that joins them with the arrays maps them back
(:func:`to_positions`). The effective-rank tables keep every layer (a linear-attention layer's
FFN rows too), indexed by model layer. For a model without linear attention ``p`` is the layer
index and both maps are the identity.

Cost: O(rows) per table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pandas is imported where a table is read: rows-only jobs skip it
    import pandas as pd

#: Columns of the per-layer tables that hold a layer (``bottleneck_layer`` may be -1: none).
LAYER_COLUMNS = ("layer", "layer_idx", "layer_a", "layer_b", "earlier_layer",
                 "bottleneck_layer")


def attention_layers(model: dict) -> np.ndarray:
    """``model.json``'s ``attention_layers`` (int array, ascending); every layer ``0 .. L-1``
    for a record written before hybrids were read."""
    layers = model.get("attention_layers")
    return np.asarray(range(model["n_layers"]) if layers is None else layers, dtype=int)


def is_hybrid(model: dict) -> bool:
    """Whether some layer of the model has no softmax attention."""
    return len(attention_layers(model)) < model["n_layers"]


def to_model_layers(table: pd.DataFrame, model: dict) -> pd.DataFrame:
    """``table`` with its layer columns (:data:`LAYER_COLUMNS`) mapped from positions ``p``
    among the attention layers to model layers ``attention_layers[p]`` (-1 stays -1)."""
    layers = attention_layers(model)
    out = table.copy()
    for column in LAYER_COLUMNS:
        if column in out:
            p = out[column].to_numpy()
            out[column] = np.where(p >= 0, layers[np.clip(p, 0, None)], p)
    return out


def to_positions(table: pd.DataFrame, model: dict) -> pd.DataFrame:
    """The inverse of :func:`to_model_layers`: model layers mapped to their positions among
    the attention layers; rows naming a layer without softmax attention (a linear-attention
    layer's FFN effective ranks) are dropped. -1 stays -1."""
    layers = attention_layers(model)
    position = np.full(model["n_layers"], -1)
    position[layers] = np.arange(len(layers))
    out = table
    for column in LAYER_COLUMNS:
        if column in out:
            values = out[column].to_numpy()
            keep = (values < 0) | (position[np.clip(values, 0, None)] >= 0)
            out = out[keep].copy()
            values = values[keep]
            out[column] = np.where(values >= 0, position[np.clip(values, 0, None)], values)
    return out.reset_index(drop=True) if out is not table else table.copy()


def relabel_table_file(path, model: dict) -> None:
    """Rewrite the parquet table at ``path`` (written with positions, by a job that writes
    rows without pandas) with its layer columns as model layers (:func:`to_model_layers`);
    for a model without linear attention nothing is read or written."""
    if not is_hybrid(model):
        return
    import pandas as pd

    to_model_layers(pd.read_parquet(path), model).to_parquet(path, index=False)


def left_out(model: dict) -> str:
    """One sentence for the report: how many layers the attention experiments leave out, and
    why (empty for a model without linear attention). Every layer left out is a
    linear-attention one (:data:`layer_kinds.ATTENTION_KINDS` are all the others)."""
    if not is_hybrid(model):
        return ""
    n, kept = model["n_layers"], attention_layers(model)
    linear = n - len(kept)
    return (f"Hybrid model: the attention experiments run over its {len(kept)} softmax"
            f" attention layers of {n} (model layers {', '.join(map(str, kept))}); {linear}"
            f" linear-attention {'layer is' if linear == 1 else 'layers are'} left out, since"
            " linear attention (gated DeltaNet) has no softmax kernel W_Q_i^T W_K_j. Layer"
            " numbers in this report count the softmax attention layers in order (layer p is"
            " model layer attention_layers[p] of model.json); the tables on disk name model"
            " layers, and effective_ranks.csv keeps every layer's FFN.")
