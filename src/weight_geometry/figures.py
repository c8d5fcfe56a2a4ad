"""The report's figures, drawn from a loaded :class:`results_io.Analysis` (matplotlib, Agg).

matplotlib is imported by :func:`pyplot` when a figure is drawn, not with this module. The
figure names live in :mod:`figure_names`, which the Snakefile imports at parse time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .ksweep import CONDITIONAL_RATIO_LABELS, RATIO_LABELS
from .multiplicity import FDR_Q
from .ranks import per_weight_type
from .results_io import Analysis, pair_matrix
from .rowspace_nulls import one_head_null
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


def off_diagonal_ratio(values: np.ndarray, null: np.ndarray) -> np.ndarray:
    """``values / null`` with the diagonal (a layer against itself, 1 by definition) masked as
    NaN: what the ratio heatmaps colour."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(null > 0, values / null, np.nan)
    np.fill_diagonal(ratio, np.nan)
    return ratio


def ratio_limit(ratio: np.ndarray) -> float:
    """The colour range ``[1 / r, r]`` of a ratio heatmap: symmetric on a log scale around 1
    (the null) and wide enough for every finite off-diagonal ratio, at least 2 (so that the
    scatter of a model at chance, within about 20 % of its null, stays pale)."""
    finite = ratio[np.isfinite(ratio) & (ratio > 0)]
    if not finite.size:
        return 2.0
    return float(max(2.0, finite.max(), 1 / finite.min()))


def _ratio_heatmap(ax, fig, values, null, title, null_label, quantity="similarity",
                   diagonal=False):
    """``values / null`` off the diagonal (on it too with ``diagonal``), on a diverging map
    centred on 1 (log scale: 2x and 0.5x equally far from white); the masked diagonal and NaN
    grey."""
    from matplotlib import colors, ticker

    plt = pyplot()
    if diagonal:
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(null > 0, values / null, np.nan)
    else:
        ratio = off_diagonal_ratio(values, null)
    r = ratio_limit(ratio)
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="0.85")
    im = ax.imshow(ratio, cmap=cmap, norm=colors.LogNorm(1 / r, r), interpolation="nearest")
    bar = fig.colorbar(im, ax=ax, label=f"{quantity} / {null_label}")
    ticks = [t for t in (0.25, 0.5, 0.67, 0.8, 1, 1.25, 1.5, 2, 3, 4, 6, 8, 16)
             if 1 / r <= t <= r]
    bar.set_ticks(ticks)
    bar.ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    bar.ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set(xlabel="Layer", ylabel="Layer", title=title)


def _band(ax, table, chance=None, bottleneck=None):
    mean, std = table.mean(axis=1), table.std(axis=1, ddof=0)
    if bottleneck is not None:   # its similarity to itself, 1, would flatten the rest
        mean, std = mean.drop(bottleneck), std.drop(bottleneck)
    ax.plot(mean.index, mean, marker=".", label="mean over the sampled heads")
    ax.fill_between(mean.index, mean - std, mean + std, alpha=0.2)
    if chance is not None:
        ax.axhline(chance, color="r", linestyle="--", label=f"chance k/d = {chance:.4f}")
        ax.legend()
    if bottleneck is not None:
        ax.axvline(bottleneck, color="r", linestyle="--", alpha=0.5,
                   label=f"bottleneck layer {bottleneck} (its own point left out)")


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

    n_layers = len(a.best_match)

    fig, ax = plt.subplots(figsize=(8, 6.5))
    _ratio_heatmap(ax, fig, a.similarity[head], one_head_null(a.overlaps, k, a.model, head)[0],
                   f"Attention subspace overlap over the conditional null (head {head},"
                   f" top-{k})", "conditional null mean")
    save_figure(fig, out["similarity_heatmap"])

    fig, axes = plt.subplots(1, 2, figsize=(15, 6.2))
    _ratio_heatmap(axes[0], fig, pair_matrix(a.layer_pairs, "same_index", n_layers),
                   pair_matrix(a.layer_pairs, "conditional_mean", n_layers),
                   f"Same-index similarity, mean over all heads (top-{k})",
                   "conditional null mean")
    _ratio_heatmap(axes[1], fig, a.best_match,
                   pair_matrix(a.layer_pairs, "best_match_null_mean", n_layers),
                   f"Best-match similarity (top-{k})", "best match of isotropic weights")
    axes[1].set(ylabel="Layer a (each head's best match in layer b)", xlabel="Layer b")
    save_figure(fig, out["best_match"])

    fig, ax = plt.subplots(figsize=(10, 3.8))
    ax.set(xlabel="Layer", title=f"Similarity to the bottleneck (head {head}, top-{k})")
    if a.has_bottleneck:   # the bottleneck's similarity to itself (1) would flatten the rest
        to_bottleneck = a.primary(a.bottleneck, "similarity").drop(b)
        ax.plot(to_bottleneck.index, to_bottleneck, marker=".", label=f"head {head}")
        ax.axvline(b, color="r", linestyle="--", alpha=0.5,
                   label=f"bottleneck layer {b} (its own point, 1, left out)")
        _null_band(ax, a.primary(a.bottleneck, "conditional_mean").drop(b),
                   a.primary(a.bottleneck, "conditional_std").drop(b), "conditional null")
        ax.axhline(chance, color="gray", linestyle=":", label="isotropic null k/d")
        ax.set(ylabel=f"Similarity to layer {b}")
        ax.legend()
    else:
        _no_bottleneck(ax, a)
    save_figure(fig, out["bottleneck_trace"])

    alignment, null_std = (a.primary(a.alignment, c) for c in ("alignment", "null_std"))
    fig, (ax, zax) = plt.subplots(2, 1, figsize=(10, 6.4), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 2]})
    ax.plot(alignment.index, alignment, marker=".", label=f"head {head}")
    ax.axhline(chance, color="r", linestyle="--", label=f"isotropic chance k/d = {chance:.4f}")
    ax.fill_between(null_std.index, chance - 2 * null_std, chance + 2 * null_std, color="r",
                    alpha=0.1, label=f"isotropic null ± 2 std (± {2 * null_std.mean():.4f};"
                    " its z below)")
    _null_band(ax, a.primary(a.alignment, "conditional_chance"),
               a.primary(a.alignment, "conditional_std"), "conditional null")
    ax.set(ylabel="Fraction of FFN input energy",
           title=f"FFN-attention alignment ({a.model['ffn_input']}, top-{k})")
    ax.legend(fontsize="small", ncol=2)
    # The nulls' bands are narrow beside the spread of the values: z shows where each layer
    # stands against them, the ± 2 band and the layers significant after BH.
    zax.axhspan(-2, 2, color="0.9", label="|z| < 2")
    zax.axhline(0, color="0.5", linewidth=0.8)
    z_iso = a.primary(a.alignment, "z")
    z_cond = a.primary(a.alignment, "conditional_z")
    zax.plot(z_iso.index, z_iso, marker=".", color="r", alpha=0.6, label="z, isotropic null")
    zax.plot(z_cond.index, z_cond, marker=".", color="tab:green", label="z, conditional null")
    significant = a.primary(a.alignment, "conditional_p_adjusted") <= FDR_Q
    zax.scatter(z_cond.index[significant], z_cond[significant], s=60, facecolors="none",
                edgecolors="k", zorder=3, label=f"significant (BH q = {FDR_Q})")
    zax.set(xlabel="Layer", ylabel="z")
    zax.legend(fontsize="small", ncol=4)
    save_figure(fig, out["alignment"])

    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    sampled_null = np.mean([one_head_null(a.overlaps, k, a.model, h)[0] for h in a.heads],
                           axis=0)
    _ratio_heatmap(axes[0], fig, a.similarity_mean, sampled_null,
                   f"Mean overlap over heads {a.heads}", "conditional null mean")
    if a.has_bottleneck:
        _band(axes[1], a.per_head(a.bottleneck, "similarity"), bottleneck=b)
        conditional = a.per_head(a.bottleneck, "conditional_mean").mean(axis=1).drop(b)
        axes[1].plot(conditional.index, conditional, color="tab:green", linestyle="--",
                     label="conditional null (mean over these heads)")
        axes[1].axhline(chance, color="gray", linestyle=":", label=f"isotropic k/d ="
                        f" {chance:.4f}")
        axes[1].legend(fontsize="small")
        axes[1].set(title=f"Similarity to layer {b} (mean ± std)", xlabel="Layer",
                    ylabel=f"Similarity to layer {b}")
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
    for wt, rows in per_weight_type(a.weight_ranks).groupby("weight_type", sort=False):
        ax.plot(rows["layer_idx"], rows["normalized_eff_rank"], marker=".", label=wt)
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


def _ratio_ticks(ax) -> None:
    """Plain ratio labels ("0.5x", "1x", "2x") on a log y axis, not "5x10^-1"."""
    from matplotlib import ticker

    low, high = ax.get_ylim()
    ticks = [t for t in (0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8, 10, 15, 20, 30, 50, 100)
             if low <= t <= high]
    ax.yaxis.set_major_locator(ticker.FixedLocator(ticks))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def draw_ksweep(table, d_head: int, path, uniform: bool = True) -> None:
    """Statistics / chance (solid) and / their conditional null mean (dashed) against k (rows
    of :func:`ksweep.ksweep_table`), and the number of ill-defined (layer, head) subspaces per
    k; ``d_head`` the smallest head size (:func:`head_layout.min_head_dim`), where the sweep
    stops; ``uniform``: whether every layer has that size (else the title names it as the
    smallest)."""
    fig, (top, bottom) = pyplot().subplots(2, 1, figsize=(10, 7), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    for (column, label), (conditional, conditional_label) in zip(
            RATIO_LABELS.items(), CONDITIONAL_RATIO_LABELS.items(), strict=True):
        (line,) = top.plot(table["k"], table[column], marker=".", label=label)
        top.plot(table["k"], table[conditional], linestyle="--", color=line.get_color(),
                 label=conditional_label)
    top.axhline(1.0, color="gray", linestyle=":", label="the null (1)")
    top.set(ylabel="statistic / null mean", yscale="log",
            title=f"k-sensitivity (k = 1 .. {d_head - 1}; "
            + (f"d_head = {d_head}" if uniform else f"the smallest head size, {d_head},")
            + " excluded)")
    _ratio_ticks(top)
    top.legend()
    bottom.bar(table["k"], table["n_ill_defined"], color="gray")
    bottom.set(xlabel="k", ylabel="ill-defined\n(layer, sampled head)")
    save_figure(fig, path)
