"""The report's figures, drawn from a loaded :class:`results_io.Analysis` (matplotlib, Agg).

matplotlib is imported by :func:`pyplot` when a figure is drawn, not with this module. The
figure names live in :mod:`figure_names`, which the Snakefile imports at parse time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .ksweep import CONDITIONAL_RATIO_LABELS, RATIO_LABELS
from .ranks import normalized_eff_rank
from .results_io import Analysis, pair_matrix
from .similarity import null_mean


def pyplot():
    """``matplotlib.pyplot`` with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    # tight_layout leaves a placeholder layout engine, for which savefig draws the whole figure
    # once more before drawing it for the file; without an engine it draws it once.
    fig.set_layout_engine(None)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def _heatmap(ax, fig, matrix, title, label="Similarity"):
    im = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, label=label)
    ax.set(xlabel="Layer", ylabel="Layer", title=title)


def _band(ax, table, chance=None, bottleneck=None):
    mean, std = table.mean(axis=1), table.std(axis=1, ddof=0)
    ax.plot(table.index, mean, marker=".")
    ax.fill_between(table.index, mean - std, mean + std, alpha=0.2)
    if chance is not None:
        ax.axhline(chance, color="r", linestyle="--", label=f"chance k/d = {chance:.4f}")
        ax.legend()
    if bottleneck is not None:
        ax.axvline(bottleneck, color="r", linestyle="--", alpha=0.5)


def _null_band(ax, mean, std, label: str) -> None:
    """A per-layer null: its mean (dashed) and ± 2 std (shaded), in one colour."""
    ax.plot(mean.index, mean, color="tab:green", linestyle="--", label=f"{label} mean")
    ax.fill_between(mean.index, mean - 2 * std, mean + 2 * std, color="tab:green", alpha=0.15,
                    label=f"{label} ± 2 std")


def _no_bottleneck(ax, a: Analysis) -> None:
    """An empty panel saying why there is nothing to draw."""
    ax.text(0.5, 0.5, "No bottleneck: no layer's effective rank stands out\n"
            "(Experiment 2 not run)", ha="center", va="center", transform=ax.transAxes)
    ax.set(xticks=[], yticks=[])


def draw_all(a: Analysis, out: dict[str, str]) -> None:
    """Write every figure of :data:`figure_names.FIGURES` to ``out[name]``."""
    plt = pyplot()
    k, head, b = a.k, a.primary_head, a.bottleneck_layer
    chance = null_mean(a.k, a.model["d_model"])

    fig, ax = plt.subplots(figsize=(8, 6.5))
    _heatmap(ax, fig, a.similarity[head], f"Attention subspace overlap (head {head}, top-{k})")
    save_figure(fig, out["similarity_heatmap"])

    fig, axes = plt.subplots(1, 2, figsize=(15, 6.2))
    _heatmap(axes[0], fig, pair_matrix(a.layer_pairs, "same_index", len(a.best_match)),
             f"Same-index similarity, mean over all heads (top-{k})")
    _heatmap(axes[1], fig, a.best_match, f"Best-match similarity (top-{k})")
    axes[1].set(ylabel="Layer a (each head's best match in layer b)", xlabel="Layer b")
    save_figure(fig, out["best_match"])

    fig, ax = plt.subplots(figsize=(10, 3.8))
    ax.set(xlabel="Layer", title=f"Similarity to the bottleneck (head {head}, top-{k})")
    if a.has_bottleneck:
        to_bottleneck = a.primary(a.bottleneck, "similarity")
        ax.plot(to_bottleneck.index, to_bottleneck, marker=".", label=f"head {head}")
        ax.axvline(b, color="r", linestyle="--", alpha=0.5, label=f"bottleneck layer {b}")
        _null_band(ax, a.primary(a.bottleneck, "conditional_mean"),
                   a.primary(a.bottleneck, "conditional_std"), "conditional null")
        ax.axhline(chance, color="gray", linestyle=":", label="isotropic null k/d")
        ax.set(ylabel=f"Similarity to layer {b}")
        ax.legend()
    else:
        _no_bottleneck(ax, a)
    save_figure(fig, out["bottleneck_trace"])

    alignment, null_std = (a.primary(a.alignment, c) for c in ("alignment", "null_std"))
    fig, ax = plt.subplots(figsize=(10, 3.8))
    ax.plot(alignment.index, alignment, marker=".", label=f"head {head}")
    ax.axhline(chance, color="r", linestyle="--", label=f"isotropic chance k/d = {chance:.4f}")
    ax.fill_between(null_std.index, chance - 2 * null_std, chance + 2 * null_std, color="r",
                    alpha=0.1, label="isotropic null ± 2 std")
    _null_band(ax, a.primary(a.alignment, "conditional_chance"),
               a.primary(a.alignment, "conditional_std"), "conditional null")
    ax.set(xlabel="Layer", ylabel="Fraction of FFN input energy",
           title=f"FFN-attention alignment ({a.model['ffn_input']}, top-{k})")
    ax.legend()
    save_figure(fig, out["alignment"])

    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    _heatmap(axes[0], fig, a.similarity_mean, f"Mean overlap over heads {a.heads}")
    if a.has_bottleneck:
        _band(axes[1], a.per_head(a.bottleneck, "similarity"), bottleneck=b)
        axes[1].set(title=f"Similarity to layer {b} (mean ± std)", xlabel="Layer",
                    ylabel="Similarity")
    else:
        _no_bottleneck(axes[1], a)
    _band(axes[2], a.per_head(a.alignment, "alignment"), chance=chance)
    conditional = a.per_head(a.alignment, "conditional_chance").mean(axis=1)
    axes[2].plot(conditional.index, conditional, color="tab:green", linestyle="--",
                 label="conditional chance (mean over these heads)")
    axes[2].legend()
    axes[2].set(title="FFN-attention alignment (mean ± std)", xlabel="Layer",
                ylabel="Fraction of FFN input energy")
    fig.suptitle(f"Multi-head summary (heads {a.heads}, top-{k})")
    save_figure(fig, out["multihead_summary"])

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for wt, rows in a.weight_ranks.groupby("weight_type", sort=False):
        ax.plot(rows["layer_idx"], normalized_eff_rank(rows), marker=".", label=wt)
    ax.set(xlabel="Layer", ylabel="eff_rank / min(rows, cols)",
           title="Normalized effective rank by layer")
    ax.legend(ncol=4)
    save_figure(fig, out["effective_ranks"])

    fig, ax = plt.subplots(figsize=(8, 6))
    grid = a.kernel_ranks.pivot(index="layer", columns="head", values="kernel_eff_rank")
    im = ax.imshow(grid.to_numpy(), aspect="auto", cmap="magma", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="Kernel effective rank")
    ax.set(xlabel="Head", ylabel="Layer", title="Effective rank of W_Q_i^T W_K_j per head",
           xticks=np.arange(grid.shape[1]))
    save_figure(fig, out["kernel_effective_ranks"])


def draw_ksweep(table, d_head: int, path) -> None:
    """Statistics / chance (solid) and / their conditional null mean (dashed) against k (rows
    of :func:`ksweep.ksweep_table`), and the number of ill-defined (layer, head) subspaces per
    k."""
    fig, (top, bottom) = pyplot().subplots(2, 1, figsize=(10, 7), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    for (column, label), (conditional, conditional_label) in zip(
            RATIO_LABELS.items(), CONDITIONAL_RATIO_LABELS.items(), strict=True):
        (line,) = top.plot(table["k"], table[column], marker=".", label=label)
        top.plot(table["k"], table[conditional], linestyle="--", color=line.get_color(),
                 label=conditional_label)
    top.axhline(1.0, color="gray", linestyle=":", label="the null (1)")
    top.set(ylabel="statistic / null mean", yscale="log",
            title=f"k-sensitivity (k = 1 .. {d_head - 1}; d_head = {d_head} excluded)")
    top.legend()
    bottom.bar(table["k"], table["n_ill_defined"], color="gray")
    bottom.set(xlabel="k", ylabel="ill-defined\n(layer, sampled head)")
    save_figure(fig, path)
