"""Cross-model comparison of the per-layer tables (one k, each model's primary head).

Models of different depth are put on one axis by normalized depth ``layer / L`` (in [0, 1)).
Raw Grassmann similarities are not comparable across widths, since the isotropic null is
``k / d``; the ``*_ratio`` columns divide by it (``alignment_ratio`` already does). Nor is the
ratio to ``k / d`` comparable across head sizes at one k (a k-subspace fills ``k / d_head`` of
its row space; ``k / m_p`` in layer ``p`` of a model whose layers differ, :mod:`head_layout`),
so models are compared and ranked by their ratios to the row-space-conditional
null (``*_conditional_ratio``), which accounts for both; effective ranks by their normalized
mean (``eff_rank / min(rows, cols)``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from .figure_names import COMPARE_FIGURES
from .figures import pyplot, save_figure
from .head_layout import head_dims, is_uniform
from .hybrid import attention_layers
from .report import by_kind, markdown_table
from .similarity import null_mean
from .verdicts import alignment_verdict


class _Figure(NamedTuple):
    ylabel: str
    caption: str
    reference: str | None  # "chance": each model's k/d; "one": ratio 1 (chance); None


#: Figure name (= the plotted column of :func:`compare_table`) -> how it is drawn and described.
_FIGURES = dict(zip(COMPARE_FIGURES, (
    _Figure(
        "Adjacent-layer similarity / conditional null",
        "Similarity of each layer's attention subspace to the next layer's, divided by its"
        " row-space-conditional null mean; the grey line is that null (1).", "one"),
    _Figure(
        "Similarity to the bottleneck layer",
        "Similarity of each layer's subspace to its model's bottleneck layer (1 at the"
        " bottleneck itself); dotted lines are each model's k/d, dashed ones its"
        " row-space-conditional null mean. Models without a bottleneck have no line.",
        "chance"),
    _Figure(
        "FFN-attention alignment / conditional chance",
        "Fraction of the FFN input energy inside the attention subspace, divided by the share"
        " a random k-subspace of the head's KV row space holds; the grey line is that null"
        " (1).", "one"),
    _Figure(
        "Mean normalized effective rank",
        "Effective rank / min(rows, cols), averaged over the layer's weight types: comparable"
        " across widths.", None),
), strict=True))


def _model_rows(name: str, model: dict, layers: pd.DataFrame, k: int) -> pd.DataFrame:
    """One model's rows of :func:`compare_table`."""
    n_layers, d = model["n_layers"], model["d_model"]
    expected = attention_layers(model)  # every layer, or a hybrid's softmax-attention ones
    if not np.array_equal(layers["layer"].to_numpy(), expected):
        which = (f"0..{n_layers - 1}" if len(expected) == n_layers
                 else f"{expected.tolist()} (its softmax-attention layers)")
        raise ValueError(f"{name}: layers table does not hold layers {which}")
    chance = null_mean(k, d)
    return pd.DataFrame({
        "model": name,
        "layer": layers["layer"].to_numpy(),
        "n_layers": n_layers,
        "d_model": d,
        "head": layers["head"].to_numpy(),
        "ffn_input": model["ffn_input"],
        "depth": layers["layer"].to_numpy() / n_layers,
        "chance": chance,
        "adjacent_similarity": layers["adjacent_similarity"].to_numpy(),
        "adjacent_ratio": layers["adjacent_similarity"].to_numpy() / chance,
        "bottleneck_similarity": layers["bottleneck_similarity"].to_numpy(),
        "bottleneck_ratio": layers["bottleneck_similarity"].to_numpy() / chance,
        "bottleneck_conditional_mean": layers["bottleneck_conditional_mean"].to_numpy(),
        "adjacent_conditional_ratio": (layers["adjacent_similarity"]
                                       / layers["adjacent_conditional_mean"]).to_numpy(),
        "alignment": layers["alignment"].to_numpy(),
        "alignment_ratio": layers["alignment_ratio"].to_numpy(),
        "alignment_conditional_ratio": layers["alignment_conditional_ratio"].to_numpy(),
        "mean_eff_rank": layers["mean_eff_rank"].to_numpy(),
        "mean_normalized_eff_rank": layers["mean_normalized_eff_rank"].to_numpy(),
        "is_bottleneck": layers["is_bottleneck"].to_numpy(),
    })


def compare_table(models: dict[str, tuple[dict, pd.DataFrame]], k: int) -> pd.DataFrame:
    """Long table, one row per (model, layer), models in the given order.

    ``models`` maps a name to its ``model.json`` record and its ``k{k}/layers.parquet`` table.
    Columns: model, layer, n_layers, d_model, head, ffn_input, ``depth = layer / n_layers``,
    ``chance = k / d_model``, adjacent_similarity, ``adjacent_ratio`` (= / chance),
    bottleneck_similarity, ``bottleneck_ratio`` (= / chance), bottleneck_conditional_mean,
    adjacent_conditional_ratio (=
    / its conditional null mean), alignment, alignment_ratio, alignment_conditional_ratio,
    mean_eff_rank, mean_normalized_eff_rank, is_bottleneck.
    """
    if not models:
        raise ValueError("compare_table needs at least one model")
    return pd.concat([_model_rows(name, model, layers, k)
                      for name, (model, layers) in models.items()], ignore_index=True)


def _summary_row(rows: pd.DataFrame) -> dict:
    """Summary of one model's rows; NaN (the last layer's adjacent similarity) is skipped. A
    model without a bottleneck has NaN bottleneck columns."""
    first = rows.iloc[0]
    bottleneck = rows[rows["is_bottleneck"]]
    others = rows.loc[~rows["is_bottleneck"], "bottleneck_similarity"]
    adjacent_mean = rows["adjacent_similarity"].mean()
    nan = float("nan")
    return {
        "model": first["model"], "n_layers": first["n_layers"], "d_model": first["d_model"],
        "head": first["head"], "ffn_input": first["ffn_input"], "chance": first["chance"],
        "adjacent_mean": adjacent_mean, "adjacent_ratio": adjacent_mean / first["chance"],
        "adjacent_conditional_ratio": rows["adjacent_conditional_ratio"].mean(),
        "bottleneck_layer": bottleneck["layer"].iloc[0] if len(bottleneck) else nan,
        "bottleneck_depth": bottleneck["depth"].iloc[0] if len(bottleneck) else nan,
        "bottleneck_similarity_mean": others.mean(),
        "alignment_mean": rows["alignment"].mean(),
        "alignment_ratio_mean": rows["alignment_ratio"].mean(),
        "alignment_conditional_ratio_mean": rows["alignment_conditional_ratio"].mean(),
        "mean_eff_rank": rows["mean_eff_rank"].mean(),
        "mean_normalized_eff_rank": rows["mean_normalized_eff_rank"].mean(),
    }


def compare_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per model of a :func:`compare_table`, in its order.

    Columns: model, n_layers, d_model, head, ffn_input, chance (k/d), adjacent_mean (mean of
    ``sim[l, l+1]`` over l < L-1), adjacent_ratio (adjacent_mean / chance),
    adjacent_conditional_ratio (mean over layers of the ratio to the conditional null),
    bottleneck_layer, bottleneck_depth (NaN without a bottleneck), bottleneck_similarity_mean
    (mean over the layers other than the bottleneck), alignment_mean, alignment_ratio_mean,
    alignment_conditional_ratio_mean, mean_eff_rank, mean_normalized_eff_rank (means over
    layers).
    """
    return pd.DataFrame([_summary_row(rows)
                         for _, rows in table.groupby("model", sort=False)])


def _draw(table: pd.DataFrame, name: str, path: str) -> None:
    spec = _FIGURES[name]
    fig, ax = pyplot().subplots(figsize=(10, 4.5))
    for model, rows in table.groupby("model", sort=False):
        (line,) = ax.plot(rows["depth"], rows[name], marker=".",
                          label=f"{model} (L={rows['n_layers'].iloc[0]})")
        if spec.reference == "chance":
            ax.axhline(rows["chance"].iloc[0], color=line.get_color(), linestyle=":")
            ax.plot(rows["depth"], rows["bottleneck_conditional_mean"], linestyle="--",
                    color=line.get_color())
    if spec.reference == "one":
        ax.axhline(1.0, color="gray", linestyle="--", label="the null (1)")
    ax.set(xlabel="Normalized depth (layer / L)", ylabel=spec.ylabel, xlim=(0, 1),
           title=f"{spec.ylabel} vs normalized depth")
    ax.legend()
    save_figure(fig, path)


def draw_compare(table: pd.DataFrame, out: dict[str, str]) -> None:
    """Write every figure in :data:`COMPARE_FIGURES` to ``out[name]``: the column ``name`` of
    ``table`` against normalized depth, one line per model."""
    for name in COMPARE_FIGURES:
        _draw(table, name, out[name])


_SUMMARY_COLUMNS = {
    "model": "Model", "n_layers": "L", "d_model": "d", "head": "Head", "chance": "Chance k/d",
    "adjacent_mean": "Adjacent sim", "adjacent_ratio": "Adjacent / k/d",
    "adjacent_conditional_ratio": "Adjacent / conditional",
    "bottleneck_layer": "Bottleneck layer", "bottleneck_depth": "Bottleneck depth",
    "bottleneck_similarity_mean": "Sim to bottleneck (others)",
    "alignment_ratio_mean": "Alignment / k/d",
    "alignment_conditional_ratio_mean": "Alignment / conditional",
    "mean_normalized_eff_rank": "Mean normalized eff rank",
}


def _ranking(summary: pd.DataFrame, column: str) -> str:
    """``model (value x)`` for every model, highest ``column`` first."""
    ranked = summary.sort_values(column, ascending=False, kind="stable")
    return ", ".join(f"{m} ({v:.2f}x)" for m, v in zip(ranked["model"], ranked[column],
                                                        strict=True))


def _peak_adjacent(table: pd.DataFrame) -> str:
    """Each model's most similar adjacent pair: ``model: layers l-(l+1) (depth) at sim``."""
    peaks = table.loc[table.groupby("model", sort=False)["adjacent_similarity"].idxmax()]
    return "; ".join(f"{r.model}: layers {r.layer}-{r.layer + 1} (depth {r.depth:.2f}) at"
                     f" {r.adjacent_similarity:.3f}" for r in peaks.itertuples())


def _bottleneck_text(r) -> str:
    if np.isnan(r.bottleneck_depth):
        return f"{r.model}: none"
    return (f"{r.model} at layer {int(r.bottleneck_layer)} of {r.n_layers} (depth"
            f" {r.bottleneck_depth:.2f})")


def _findings(table: pd.DataFrame, summary: pd.DataFrame) -> list[str]:
    """Bullet points computed from the table and its summary."""
    out = [f"- Ranked by mean adjacent-layer similarity / its conditional null (most shared"
           f" beyond the row spaces first): {_ranking(summary, 'adjacent_conditional_ratio')}.",
           f"- Most similar adjacent layers: {_peak_adjacent(table)}.",
           "- Bottleneck layers: " + "; ".join(map(_bottleneck_text, summary.itertuples()))
           + ".",
           f"- Ranked by mean FFN-attention alignment / its conditional chance:"
           f" {_ranking(summary, 'alignment_conditional_ratio_mean')}."]
    out += [f"- {r.model}: {alignment_verdict(r.alignment_ratio_mean, r.ffn_input)}"
            for r in summary.itertuples()]
    return out


def _head_sizes(records: dict[str, dict], k: int) -> list[str]:
    """One sentence per model whose layers differ in head size: the share ``k / m_p`` of a row
    space its k-subspaces fill, per layer kind (:func:`report.by_kind`)."""
    return [f"In {name} the head size differs by layer"
            f" ({by_kind(record, [str(m) for m in head_dims(record)])}): a top-{k} subspace"
            f" fills k / m = {by_kind(record, [f'{k / m:.4f}' for m in head_dims(record)])} of"
            " its row space, and its conditional ratios use each layer's own m.\n"
            for name, record in records.items() if not is_uniform(record)]


def render_compare(table: pd.DataFrame, summary: pd.DataFrame, k: int,
                   records: dict[str, dict] | None = None) -> str:
    """Markdown comparison report: summary table, figures (``figures/{name}.png``), findings;
    with ``records`` (each model's ``model.json``), a sentence on each model whose layers
    differ in head size (:func:`_head_sizes`)."""
    names = ", ".join(summary["model"])
    out = [
        f"# Cross-model comparison (top-{k})\n",
        f"Models: {names}. Each model's primary head and top-{k} attention subspace; layers are"
        " placed at normalized depth `layer / L` so models of different depth share an axis."
        " Ratios to the isotropic null k/d depend on the width and, at one k, on the head size"
        " (k / d_head of a row space); models are ranked by their ratios to the"
        " row-space-conditional null, which accounts for both.\n",
        *_head_sizes(records or {}, k),
        "## Summary\n",
        markdown_table(summary[list(_SUMMARY_COLUMNS)].rename(columns=_SUMMARY_COLUMNS)) + "\n",
        "Adjacent sim: mean of `sim[l, l+1]`; Sim to bottleneck (others): mean similarity to the"
        " bottleneck layer over the other layers (n/a without one); means are over layers.\n",
        "## Figures\n",
    ]
    for name, spec in _FIGURES.items():
        out.append(f"{spec.caption}\n\n![{spec.ylabel}](figures/{name}.png)\n")
    out.append("## Findings\n")
    out += _findings(table, summary)
    return "\n".join(out) + "\n"
