"""The Circuits section's figures (:data:`figure_names.CIRCUIT_FIGURES`), from the composition
outputs and the read/write table at k; drawn as the other ratio figures (:mod:`figures`)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .composition import TYPES
from .figures import _ratio_heatmap, pyplot, save_figure

#: The types' names in titles.
NAMES = {"q": "Q", "k": "K", "v": "V"}


def _integer_ticks(ax, y: bool = True) -> None:
    """Integer tick labels (layers, heads, distances)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if y:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def layer_matrix(table: pd.DataFrame, column: str, n_layers: int) -> np.ndarray:
    """``(L, L)`` ``[later, earlier]`` of ``column`` of a per-layer-pair table (one type's
    rows; NaN where the earlier layer is not earlier)."""
    out = np.full((n_layers, n_layers), np.nan)
    out[table["layer"].to_numpy(), table["earlier_layer"].to_numpy()] = table[column].to_numpy()
    return out


def null_means(null: pd.DataFrame, head_dims) -> dict[str, np.ndarray]:
    """Per type, ``(L, L)`` ``[later, earlier]``: the isotropic null mean of the score of each
    layer pair, from ``composition_null.parquet`` (one row per type, or for a model whose
    layers differ in head size one per type and ``(earlier_head_dim, head_dim)``:
    :func:`composition.null_table`) and the ``(L,)`` head sizes (:mod:`head_layout`); NaN
    where no row has the pair's sizes. Cost O(L^2)."""
    sizes = np.asarray(head_dims, dtype=int)
    out = {}
    for t in TYPES:
        rows = null[null["type"] == t]
        if "head_dim" not in rows:
            out[t] = np.full((len(sizes), len(sizes)), float(rows["null_mean"].iloc[0]))
            continue
        by_sizes = pd.Series(rows["null_mean"].to_numpy(), index=pd.MultiIndex.from_arrays(
            [rows["head_dim"], rows["earlier_head_dim"]]))
        pairs = pd.MultiIndex.from_product([sizes, sizes])      # (later, earlier) sizes
        out[t] = by_sizes.reindex(pairs).to_numpy().reshape(len(sizes), len(sizes))
    return out


def top_layer_pair(layers: pd.DataFrame, t: str) -> tuple[int, int]:
    """The type's layer pair with most composing head pairs (beyond both nulls), then the
    highest mean conditional ratio."""
    rows = layers[layers["type"] == t].sort_values(
        ["n_composing", "mean_conditional_ratio"], ascending=False)
    first = rows.iloc[0]
    return int(first["layer"]), int(first["earlier_layer"])


def draw_circuits(scores: dict[str, np.ndarray], null_mean: dict[str, np.ndarray],
                  layers: pd.DataFrame, read_write: pd.DataFrame, n_heads: int,
                  out: dict[str, str]) -> None:
    """The three figures to ``out[name]``: per type the layer x layer mean conditional ratio of
    the squared scores (``layers``: ``composition_layers.parquet``); per type the head x head
    scores of its top layer pair over its isotropic null mean (``scores``: ``(L h, L h)``
    arrays, ``null_mean`` by type ``(L, L)``: :func:`null_means`); the read/write overlap's
    ratio to its nulls by layer distance."""
    from matplotlib.ticker import FuncFormatter

    plt = pyplot()
    n_layers = scores["q"].shape[0] // n_heads
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    for ax, t in zip(axes, TYPES, strict=True):
        rows = layers[layers["type"] == t]
        _ratio_heatmap(ax, fig, layer_matrix(rows, "mean_conditional_ratio", n_layers),
                       np.ones((n_layers, n_layers)), f"{NAMES[t]}-composition",
                       "conditional null mean", "mean score²", diagonal=True)
        ax.set(xlabel="Earlier layer (writes)", ylabel="Later layer (reads)")
        _integer_ticks(ax)
    fig.suptitle("Composition per layer pair: mean over head pairs of score² / its"
                 " row-space-conditional null")
    save_figure(fig, out["composition_layers"])

    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    for ax, t in zip(axes, TYPES, strict=True):
        later, earlier = top_layer_pair(layers, t)
        block = scores[t][later * n_heads:(later + 1) * n_heads,
                          earlier * n_heads:(earlier + 1) * n_heads]
        _ratio_heatmap(ax, fig, block, np.full(block.shape, null_mean[t][later, earlier]),
                       f"{NAMES[t]}-composition, layer {earlier} → {later}", "isotropic null",
                       "score", diagonal=True)
        ax.set(xlabel=f"Head of layer {earlier} (writes)",
               ylabel=f"Head of layer {later} (reads)")
        _integer_ticks(ax)
    fig.suptitle("Head pairs of each type's top layer pair (most pairs above the conditional"
                 " null)")
    save_figure(fig, out["composition_heads"])

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for t in TYPES:
        by = read_write[read_write["type"] == t].groupby("distance")
        # Per distance: sum of the pairs' means over the sum of their null means, with the
        # conditional null's +- 2 std of that ratio (independent layer pairs).
        ratio = by["mean_overlap"].sum() / by["conditional_mean"].sum()
        spread = (np.sqrt(by["conditional_std"].apply(lambda x: np.square(x).sum()))
                  / by["conditional_mean"].sum())
        line = ax.errorbar(ratio.index, ratio, yerr=2 * spread, marker=".", capsize=2,
                           label=f"{NAMES[t]} side / conditional null (± 2 std)")[0]
        ax.plot(by["ratio"].mean(), linestyle="--", color=line.get_color(),
                label=f"{NAMES[t]} side / k/d")
    ax.axhline(1.0, color="gray", linestyle=":", label="the null (1)")
    _integer_ticks(ax, y=False)
    k = int(read_write["k"].iloc[0]) if len(read_write) else 0
    ax.set(xlabel="Layer distance (later - earlier)", ylabel="mean overlap / null mean",
           title=f"Read/write overlap by layer distance (top-{k}, mean over layer pairs)")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.legend(fontsize="small", ncol=2)
    save_figure(fig, out["read_write"])
