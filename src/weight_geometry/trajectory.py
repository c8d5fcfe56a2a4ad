"""Geometry over training: per-layer statistics of a checkpoint series, drift, and when each
structure appears, with the first checkpoint (step 0) as the empirical null.

Inputs are each checkpoint's own outputs (``k{k}/layers.parquet``, the stored bases); nothing
here reads weights. ``S`` steps, ``L`` layers, ``h`` heads, ``k`` the subspace dimension,
``d`` the model width.

The test of "exceeds step 0" (docs/SCIENCE.md, Trajectories): a statistic with a
row-space-conditional z at both steps, ``z_s`` and ``z_0`` (each ``(x - mu) / sigma`` under
that checkpoint's own conditional null), is compared through ``z_diff = (z_s - z_0) / sqrt 2``,
the difference of two independent unit-variance null-scaled values; ``p`` is one-sided (above
step 0) for similarities and two-sided for the alignment, normal, BH over the layers of each
(statistic, step). A structure *appears* at the first step with a BH discovery.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .multiplicity import FDR_Q, benjamini_hochberg, two_sided_p, upper_p
from .series import TRAJECTORY_FIGURES
from .similarity import squared_cosines


@dataclass(frozen=True)
class Statistic:
    """A per-layer column of ``layers.parquet`` followed over the steps: its isotropic and
    conditional z columns (None where that null does not exist) and whether its test against
    step 0 is two-sided."""

    column: str
    label: str
    z_isotropic: str | None
    z_conditional: str | None
    two_sided: bool = False


STATISTICS = (
    Statistic("adjacent_similarity", "Adjacent-layer similarity (primary head)", "adjacent_z",
              "adjacent_z_conditional"),
    Statistic("adjacent_best_match", "Adjacent-layer best match (all heads)", None, None),
    Statistic("bottleneck_similarity", "Similarity to the bottleneck layer", "bottleneck_z",
              "bottleneck_z_conditional"),
    Statistic("alignment", "FFN-attention alignment", "alignment_z", "alignment_z_conditional",
              two_sided=True),
    Statistic("mean_eff_rank", "Mean effective rank", None, None),
    Statistic("mean_normalized_eff_rank", "Mean normalized effective rank", None, None),
)
if (*(s.column for s in STATISTICS), "drift") != TRAJECTORY_FIGURES:
    raise ImportError("series.TRAJECTORY_FIGURES must list STATISTICS' columns and drift")
#: Columns of ``layers.parquet`` carried into ``trajectory.parquet`` besides the statistics.
CONTEXT_COLUMNS = ("head", "is_bottleneck", "relative_gap", "adjacent_conditional_mean",
                   "bottleneck_conditional_mean", "alignment_conditional_chance")


def trajectory_table(steps: list[int], layers: list[pd.DataFrame]) -> pd.DataFrame:
    """One row per (step, layer), by step then layer.

    Columns: step, layer, the context columns, and per statistic ``s`` its value, its
    isotropic and conditional z (where they exist), ``s_initial`` (the first step's value at
    that layer), ``s_minus_initial``; for a statistic with a conditional z also
    ``s_z_vs_initial = (z_s - z_0) / sqrt 2``, ``s_p_vs_initial`` (one-sided, or two-sided for
    the alignment), ``s_p_vs_initial_adjusted`` (BH over the layers of that step) and
    ``s_exceeds_initial`` (adjusted p <= :data:`multiplicity.FDR_Q`; False at the first step
    and where undefined). ``layers[i]`` is step ``steps[i]``'s ``layers.parquet``; all must
    have the same layers. Cost O(S L).
    """
    if len(steps) != len(layers) or len(steps) < 2:
        raise ValueError("need two or more steps, one layer table each")
    first = layers[0].sort_values("layer").reset_index(drop=True)
    frames = []
    for step, table in zip(steps, layers, strict=True):
        table = table.sort_values("layer").reset_index(drop=True)
        if not np.array_equal(table["layer"], first["layer"]):
            raise ValueError(f"step {step}: its layers differ from the first step's")
        out = {"step": step, "layer": table["layer"].to_numpy()}
        out.update({c: table[c].to_numpy() for c in CONTEXT_COLUMNS if c in table})
        for stat in STATISTICS:
            value = table[stat.column].to_numpy(dtype=float)
            initial = first[stat.column].to_numpy(dtype=float)
            out[stat.column] = value
            for z in (stat.z_isotropic, stat.z_conditional):
                if z is not None:
                    out[z] = table[z].to_numpy(dtype=float)
            out[f"{stat.column}_initial"] = initial
            out[f"{stat.column}_minus_initial"] = value - initial
            if stat.z_conditional is not None:
                out.update(_versus_initial(stat, table[stat.z_conditional].to_numpy(float),
                                           first[stat.z_conditional].to_numpy(float),
                                           step == steps[0]))
        frames.append(pd.DataFrame(out))
    return pd.concat(frames, ignore_index=True)


def _versus_initial(stat: Statistic, z: np.ndarray, z0: np.ndarray,
                    is_first: bool) -> dict[str, np.ndarray]:
    """The z-test of one step's conditional z against the first step's, per layer."""
    diff = (z - z0) / math.sqrt(2.0)
    p = two_sided_p(diff) if stat.two_sided else upper_p(diff)
    if is_first:
        p = np.full_like(diff, np.nan)
    adjusted = benjamini_hochberg(p)
    with np.errstate(invalid="ignore"):
        exceeds = np.nan_to_num(adjusted, nan=1.0) <= FDR_Q
    name = stat.column
    return {f"{name}_z_vs_initial": diff, f"{name}_p_vs_initial": p,
            f"{name}_p_vs_initial_adjusted": adjusted, f"{name}_exceeds_initial": exceeds}


def best_match_similarity(bases: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``(L, h)``: for each layer ``l`` and head ``i`` of ``bases``, ``max_j sim(V_l,i,
    R_l,j)`` over the heads ``j`` of the same layer of ``reference`` (Grassmann similarity
    ``||V R^T||_F^2 / k``).

    Args:
        bases, reference: ``(L, h, k, d)`` orthonormal rows (float32 as stored).
    Per layer one ``(h k, d) @ (d, h k)`` float32 product, squared and summed in float64
    (:func:`similarity.squared_cosines`, exact to ~1e-7). Cost O(L h^2 k^2 d); memory one
    ``(h k)^2`` block.
    """
    n_layers, n_heads, k, d = bases.shape
    out = np.empty((n_layers, n_heads))
    for layer in range(n_layers):
        block = squared_cosines(bases[layer].reshape(-1, d), reference[layer].reshape(-1, d))
        sims = block.reshape(n_heads, k, n_heads, k).sum(axis=(1, 3)) / k
        out[layer] = sims.max(axis=1)
    return out


def drift_table(steps: list[int], load_bases: Callable[[int], np.ndarray]) -> pd.DataFrame:
    """One row per (step, layer, head): ``step, layer, head, similarity_to_initial,
    similarity_to_final``, :func:`best_match_similarity` of the step's top-k bases against
    the first and the last step's. ``load_bases(i)``: ``(L, h, k, d)`` of ``steps[i]``,
    called once per step; three steps' bases are held at a time (the first, the last, the
    current), so a long series costs no more memory than three checkpoints. At the first
    step ``similarity_to_initial`` is 1 (to float32 rounding, ~1e-7): each head is its own
    best match; the drift ``1 - similarity_to_initial`` is then 0. Cost O(S L h^2 k^2 d).
    """
    first, last = load_bases(0), load_bases(len(steps) - 1)
    n_layers, n_heads = first.shape[:2]
    layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    frames = []
    for i, step in enumerate(steps):
        bases = first if i == 0 else last if i == len(steps) - 1 else load_bases(i)
        frames.append(pd.DataFrame({
            "step": step, "layer": layer.ravel(), "head": head.ravel(),
            "similarity_to_initial": best_match_similarity(bases, first).ravel(),
            "similarity_to_final": best_match_similarity(bases, last).ravel()}))
    return pd.concat(frames, ignore_index=True)


@dataclass(frozen=True)
class Appearance:
    """When a statistic's structure first exceeds the first step's (:func:`trajectory_table`)."""

    statistic: Statistic
    first_step: int | None       # the first step with a discovery at any layer; None: never
    layers_at_first: list[int]   # the layers discovered at that step
    layers_at_last: list[int]    # the layers discovered at the last step
    first_step_per_layer: dict[int, int]  # layer -> its first step with a discovery


def appearances(table: pd.DataFrame) -> list[Appearance]:
    """Per tested statistic (one with a conditional z), when its structure appears."""
    out = []
    last = table["step"].max()
    for stat in STATISTICS:
        if stat.z_conditional is None:
            continue
        hits = table[table[f"{stat.column}_exceeds_initial"]]
        per_layer = {int(lay): int(g["step"].min()) for lay, g in hits.groupby("layer")}
        first = int(hits["step"].min()) if len(hits) else None
        out.append(Appearance(
            stat, first,
            sorted(int(v) for v in hits.loc[hits["step"] == first, "layer"]),
            sorted(int(v) for v in hits.loc[hits["step"] == last, "layer"]), per_layer))
    return out


def _x_axis(ax, steps: list[int]) -> None:
    """Steps on a symmetric-log axis when they span decades (Pythia's 0, 1, 2, 4, ...)."""
    positive = [s for s in steps if s > 0]
    if positive and max(positive) / min(positive) >= 100:
        ax.set_xscale("symlog", linthresh=min(positive))


def draw_statistic(table: pd.DataFrame, stat: Statistic, path, chance: float | None) -> None:
    """Left: layer x step heatmap of the statistic minus its first-step value (diverging,
    white = the empirical null; dots where the test finds it above step 0). Right: the
    profile over layers at the first step (the empirical null, dashed), at the last step,
    and the isotropic chance ``k/d`` for the similarities."""
    from .figures import pyplot, save_figure

    plt = pyplot()
    steps = sorted(table["step"].unique())
    grid = table.pivot(index="layer", columns="step", values=f"{stat.column}_minus_initial")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2),
                                      gridspec_kw={"width_ratios": [3, 2]})
    values = grid.to_numpy(dtype=float)
    bound = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    image = left.imshow(values, aspect="auto", origin="lower", cmap="RdBu_r",
                        vmin=-(bound or 1.0), vmax=bound or 1.0)
    left.set_xticks(range(len(steps)), [str(s) for s in steps], rotation=45)
    left.set_yticks(range(len(grid.index)), [str(v) for v in grid.index])
    left.set(xlabel="step", ylabel="layer",
             title=f"{stat.label}\nminus step {steps[0]} (the empirical null)")
    fig.colorbar(image, ax=left, label=f"value - step {steps[0]}")
    flag = f"{stat.column}_exceeds_initial"
    if flag in table:
        hits = table[table[flag]]
        left.scatter([steps.index(s) for s in hits["step"]],   # rows of the grid (a
                     grid.index.get_indexer(hits["layer"]), s=12, c="k",  # hybrid's skip layers)
                     marker="o", label=f"exceeds step {steps[0]} (BH {FDR_Q})")
        if len(hits):
            left.legend(loc="upper left", fontsize=7)
    for step, style, label in ((steps[0], "--", f"step {steps[0]} (empirical null)"),
                               (steps[-1], "-", f"step {steps[-1]}")):
        rows = table[table["step"] == step].sort_values("layer")
        right.plot(rows["layer"], rows[stat.column], style, marker=".", label=label)
    if chance is not None:
        right.axhline(chance, color="grey", lw=0.8, ls=":", label="isotropic chance k/d")
    right.set(xlabel="layer", ylabel=stat.column)
    right.legend(fontsize=7)
    save_figure(fig, path)


def draw_drift(drift: pd.DataFrame, path) -> None:
    """Per layer (mean over heads), against the step: left the drift from the first step,
    ``1 - similarity_to_initial`` (0 at the first step: the empirical null), right the
    similarity to the last step's best-matched head, with the first step's level dashed."""
    from .figures import pyplot, save_figure

    plt = pyplot()
    steps = sorted(drift["step"].unique())
    means = drift.groupby(["layer", "step"])[["similarity_to_initial",
                                               "similarity_to_final"]].mean().reset_index()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for layer, rows in means.groupby("layer"):
        left.plot(rows["step"], 1 - rows["similarity_to_initial"], marker=".", label=f"L{layer}")
        (line,) = right.plot(rows["step"], rows["similarity_to_final"], marker=".")
        right.axhline(rows["similarity_to_final"].iloc[0], color=line.get_color(), ls="--",
                      lw=0.7)
    left.axhline(0, color="grey", ls="--", lw=0.8, label=f"step {steps[0]} (empirical null)")
    left.set(xlabel="step", ylabel="1 - similarity to initial (best match)",
             title="Drift from the first checkpoint")
    right.set(xlabel="step", ylabel="similarity to final (best match)",
              title=f"Approach to the last checkpoint (dashed: step {steps[0]})")
    for ax in (left, right):
        _x_axis(ax, steps)
    left.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def draw_figures(table: pd.DataFrame, drift: pd.DataFrame, out: dict, chance: float) -> None:
    """Every figure in :data:`TRAJECTORY_FIGURES` to ``out[name]``; ``chance`` is ``k/d``."""
    for stat in STATISTICS:
        similarity = stat.column in ("adjacent_similarity", "bottleneck_similarity",
                                     "adjacent_best_match")
        draw_statistic(table, stat, out[stat.column], chance if similarity else None)
    draw_drift(drift, out["drift"])


def report_markdown(series: str, k: int, table: pd.DataFrame, drift: pd.DataFrame) -> str:
    """The trajectory report: checkpoints (each linked to its own report, ``results/{series}/
    step{N}/k{k}/report.md``), when each structure appears (the stated test), the last
    step's state against the first, and the drift per step."""
    steps = sorted(table["step"].unique())
    first, last = steps[0], steps[-1]
    lines = [f"# Trajectory of {series} (k = {k})", "",
             f"{len(steps)} checkpoints, steps {', '.join(map(str, steps))}. Step {first} is"
             " the empirical null: the architecture and its initialization, before training."
             " Each checkpoint's own report: "
             + ", ".join(f"[step {s}](../../step{s}/k{k}/report.md)" for s in steps) + ".", "",
             "## When each structure appears", "",
             f"A layer's statistic exceeds step {first}'s when `z_diff = (z_s - z_{first}) /"
             " sqrt 2` of its row-space-conditional z-scores is significant (normal p,"
             " one-sided above for similarities, two-sided for the alignment), BH over the"
             f" layers of each step at q = {FDR_Q} (docs/SCIENCE.md, Trajectories).", "",
             "| statistic | first step above step " + str(first) + " | layers then |"
             " layers at the last step | first step per layer |", "|---|---|---|---|---|"]
    for app in appearances(table):
        when = "never" if app.first_step is None else str(app.first_step)
        per_layer = ", ".join(f"L{lay}: {s}" for lay, s in app.first_step_per_layer.items())
        lines.append(f"| {app.statistic.label} | {when} | {_layers(app.layers_at_first)} |"
                     f" {_layers(app.layers_at_last)} | {per_layer or '-'} |")
    lines += ["", f"## Step {last} against step {first}", "",
              "Mean over layers (untested statistics: no null, the step-0 value is the"
              " reference).", "", f"| statistic | step {first} | step {last} | change |",
              "|---|---|---|---|"]
    for stat in STATISTICS:
        a = table.loc[table["step"] == first, stat.column].mean()
        b = table.loc[table["step"] == last, stat.column].mean()
        change = "-" if np.isnan(b - a) else f"{b - a:+.4g}"
        lines.append(f"| {stat.label} | {a:.4g} | {b:.4g} | {change} |")
    per_step = drift.groupby("step")[["similarity_to_initial", "similarity_to_final"]].mean()
    lines += ["", "## Drift", "",
              "Per step, mean over layers and heads of each head's top-k subspace's similarity"
              " to the same layer's best-matched head at the first and at the last step"
              " (drift = 1 - similarity to initial; 0 at the first step).", "",
              "| step | drift from initial | similarity to initial | similarity to final |",
              "|---:|---:|---:|---:|"]
    for step, row in per_step.iterrows():
        lines.append(f"| {step} | {1 - row['similarity_to_initial']:.4f} |"
                     f" {row['similarity_to_initial']:.4f} | {row['similarity_to_final']:.4f} |")
    lines += ["", "## Figures", ""]
    lines += [f"![{name}](figures/{name}.png)" for name in TRAJECTORY_FIGURES]
    return "\n".join(lines) + "\n"


def _layers(layers: list[int]) -> str:
    return ", ".join(map(str, layers)) if layers else "-"
