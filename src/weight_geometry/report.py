"""Render the markdown report of one (model, k) from a loaded :class:`results_io.Analysis`.

Sections follow the notebook's report (SCIENCE.md): configuration, experiments 1-3, multi-head
robustness, cross-reference with effective ranks, key findings; figures by relative path.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .crossref import layer_correlations
from .results_io import Analysis
from .similarity import null_mean, null_std
from .statistics import (
    alignment_verdict,
    bottleneck_trends,
    bottleneck_verdict,
    overlap_summary,
    overlap_verdict,
    phase_boundaries,
    similarity_by_distance,
)

#: Relative spectral gap ``(sigma_k - sigma_{k+1}) / sigma_k`` below which the top-k subspace
#: of a head is flagged as ill-defined.
GAP_THRESHOLD = 0.01


def _table(df: pd.DataFrame, floatfmt=".4f", index=False) -> str:
    ints = df.select_dtypes("integer").columns  # keep integers unformatted in mixed tables
    return df.astype(dict.fromkeys(ints, object)).to_markdown(index=index, floatfmt=floatfmt)


def _metric_table(rows: list[tuple[str, object]]) -> str:
    return _table(pd.DataFrame(rows, columns=["Metric", "Value"]).astype({"Value": str}))


def _matrix(matrix: np.ndarray) -> str:
    labels = [f"L{i}" for i in range(len(matrix))]
    return _table(pd.DataFrame(matrix, index=labels, columns=labels), ".3f", index=True)


def _fig(name: str, caption: str) -> str:
    return f"![{caption}](figures/{name}.png)"


def spectral_gaps(singular_values: np.ndarray, head: int, k: int) -> np.ndarray | None:
    """Relative gap at k per layer for ``head``; None when k = d_head (no sigma_{k+1})."""
    s = singular_values[:, head, :]
    if k >= s.shape[1]:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        return (s[:, k - 1] - s[:, k]) / s[:, k - 1]


def per_head_table(a: Analysis, table: pd.DataFrame, column: str) -> pd.DataFrame:
    grid = a.per_head(table, column)
    out = grid.rename(columns=lambda h: f"Head {h}")
    out["Mean"], out["Std"] = grid.mean(axis=1), grid.std(axis=1, ddof=0)
    return out.rename_axis("Layer").reset_index()


def render(a: Analysis) -> str:
    """The whole report as markdown."""
    m, k, head = a.model, a.k, a.primary_head
    d, n_layers, d_head = m["d_model"], m["n_layers"], m["d_head"]
    sims = a.similarity[head]
    chance = null_mean(k, d)
    b = a.bottleneck_layer
    to_ref = a.layers["bottleneck_similarity"].to_numpy()
    align = a.layers["alignment"].to_numpy()
    s1 = overlap_summary(sims)
    pre, post = bottleneck_trends(to_ref, b)
    mean_ratio = align.mean() / chance
    out: list[str] = []
    w = out.append

    w(f"# Subspace geometry analysis: {m['name']}\n")
    w(f"Source: `{m['source']}` ({m['format']}, architecture `{m['architecture']}`); weights"
      f" stored as {m['storage_dtype']}; analysed as {m['compute_dtype']}.\n")
    w("Caveats: the kernel `W_Q_i^T W_K_j` is the attention score's bilinear form before RoPE"
      " and scaling; RoPE makes the true kernel depend on the relative position, and this is"
      f" its zero-offset slice. Biases: {m.get('biases', 'not used')}; norm gains:"
      f" {m.get('norm_gains', 'not applied (raw projection weights)')}."
      + (f" **k = d_head = {d_head}: the subspace is the row space of W_K alone, so heads sharing"
         " a KV head are identical; use k < d_head to compare heads.**" if k == d_head else "")
      + "\n")

    w("## Model configuration\n")
    w(_metric_table([
        ("Architecture", m["architecture"]), ("Layers (L)", n_layers), ("Hidden size (d)", d),
        ("FFN intermediate (d_ff)", m["d_ff"]), ("Attention heads (h)", m["n_heads"]),
        ("Key/value heads (n_kv)", m["n_kv_heads"]), ("Head dim (d_head)", d_head),
        ("Subspace rank (k)", k), ("Primary head", head), ("Sampled heads", a.heads),
        ("FFN input used for alignment", m["ffn_input"]),
        ("Storage dtype", m["storage_dtype"]),
    ]) + "\n")

    w("## Experiment 1: subspace overlap across layers\n")
    w(f"For head {head}, the top-{k} right singular vectors of each layer's attention kernel"
      " `W_Q_i^T W_K_j` (computed from its factors, never formed), and their pairwise Grassmann"
      " similarity `||V1 V2^T||_F^2 / k` (mean squared cosine of the principal angles).\n")
    w("**Interpretation:**\n")
    w("- Uniformly high similarity: depth is redundant (layers query the same subspace).")
    w("- Block-diagonal structure: layers cluster into phases with sharp transitions.")
    w("- Off-diagonal near the isotropic null: each layer queries a different subspace.\n")
    w(_fig("similarity_heatmap", "Similarity heatmap") + "\n")
    w("### Summary statistics\n")
    t = s1["distant_threshold"]
    w(_metric_table([
        ("Isotropic null mean (k/d)", f"{chance:.4f}"),
        ("Isotropic null std", f"{null_std(k, d):.4f}"),
        ("Off-diagonal mean", f"{s1['off_diagonal_mean']:.4f}"),
        ("Off-diagonal std", f"{s1['off_diagonal_std']:.4f}"),
        ("Off-diagonal min", f"{s1['off_diagonal_min']:.4f}"),
        ("Off-diagonal max", f"{s1['off_diagonal_max']:.4f}"),
        ("Adjacent layer mean", f"{s1['adjacent_mean']:.4f}"),
        ("Adjacent layer std", f"{s1['adjacent_std']:.4f}"),
        (f"Distant layer (>{t} apart) mean", f"{s1['distant_mean']:.4f}"),
        (f"Distant layer (>{t} apart) std", f"{s1['distant_std']:.4f}"),
        ("Adjacent vs distant gap", f"{s1['adjacent_minus_distant']:+.4f}"),
    ]) + "\n")
    gaps = spectral_gaps(a.singular_values, head, k)
    if gaps is not None:
        weak = [int(i) for i in np.flatnonzero(gaps < GAP_THRESHOLD)]
        w(f"Spectral gap at k: relative gap `(sigma_k - sigma_k+1) / sigma_k` of head {head}"
          f" ranges {np.nanmin(gaps):.4f} to {np.nanmax(gaps):.4f}; layers below"
          f" {GAP_THRESHOLD} (top-k subspace ill-defined): {weak or 'none'}.\n")
    w("### Full similarity matrix (layer × layer)\n")
    w(_matrix(sims) + "\n")
    w("### Phase boundaries (largest drops in adjacent-layer similarity)\n")
    w(_table(phase_boundaries(sims).rename(columns={
        "rank": "Rank", "boundary": "Boundary (layers)", "adjacent_similarity": "Adjacent sim",
        "change": "Change from prev"})) + "\n")
    w("### Similarity by layer distance\n")
    w(_table(similarity_by_distance(sims).rename(columns={
        "distance": "Distance", "mean": "Mean similarity", "std": "Std",
        "n_pairs": "N pairs"})) + "\n")

    before, after = to_ref[:b], to_ref[b + 1:]
    w(f"## Experiment 2: convergence to layer {b}\n")
    w(f"Bottleneck layer {b}: {a.bottleneck_choice}. Similarity of each layer's subspace to"
      f" layer {b}'s (head {head}, top-{k}). If it rises towards layer {b} from both sides, the"
      " network converges towards that subspace. Trends are correlations with the layer index;"
      " fewer than 3 points give no trend (reported as undefined).\n")
    w(_fig("bottleneck_trace", "Similarity to the bottleneck layer") + "\n")
    w("### Summary\n")
    w(_metric_table([
        (f"Self-similarity (layer {b})", f"{to_ref[b]:.4f}"),
        ("Mean similarity (all layers)", f"{to_ref.mean():.4f}"),
        ("Mean similarity (before bottleneck)",
         f"{before.mean():.4f}" if len(before) else "n/a"),
        ("Mean similarity (after bottleneck)", f"{after.mean():.4f}" if len(after) else "n/a"),
        ("Pre-bottleneck trend", pre.text()),
        ("Post-bottleneck trend", post.text()),
    ]) + "\n")
    w("### Per-layer similarity to the bottleneck\n")
    w(_table(pd.DataFrame({"Layer": a.layers["layer"], "Similarity": to_ref,
                           "Note": ["← bottleneck" if i == b else "" for i in range(n_layers)]}))
      + "\n")

    w("## Experiment 3: FFN-attention alignment\n")
    gated = "" if m["ffn_input"] == "W_gate" else "; this model's FFN is not gated"
    w(f"Fraction of the FFN input projection's ({m['ffn_input']}{gated}) Frobenius energy inside"
      " the"
      f" top-{k} attention subspace, `||W_in V_k^T||_F^2 / ||W_in||_F^2`. Chance level"
      f" = k/d = {k}/{d} = {chance:.4f}.\n")
    w("**Interpretation:**\n")
    w(f"- Near chance ({chance:.4f}): FFN and attention are randomly oriented.")
    w("- Well below chance: the FFN avoids the attention subspace (clean separation).")
    w("- Well above chance: FFN and attention are coupled in the same subspace.\n")
    w(_fig("alignment", "Alignment vs chance") + "\n")
    w("### Summary\n")
    w(_metric_table([
        ("Chance level (k/d)", f"{chance:.4f}"), ("Mean alignment", f"{align.mean():.4f}"),
        ("Mean / chance", f"{mean_ratio:.2f}x"), ("Std", f"{align.std():.4f}"),
        ("Min", f"{align.min():.4f} (layer {int(align.argmin())})"),
        ("Max", f"{align.max():.4f} (layer {int(align.argmax())})"),
        ("Layers above chance", f"{int((align > chance).sum())}/{n_layers}"),
        ("Layers at or below chance", f"{int((align <= chance).sum())}/{n_layers}"),
    ]) + "\n")
    w("### Per-layer alignment\n")
    w(_table(pd.DataFrame({"Layer": a.layers["layer"], "Alignment": align,
                           "vs chance": [f"{r:.2f}x" for r in align / chance]})) + "\n")

    w("## Multi-head robustness\n")
    w(f"The experiments repeated for heads {a.heads} (the notebook's linspace sample unless"
      " configured otherwise), to check whether the primary head is representative.\n")
    w(_fig("multihead_summary", "Multi-head summary") + "\n")
    w("### Averaged similarity matrix statistics\n")
    sm = overlap_summary(a.similarity_mean)
    w(_metric_table([(lbl, f"{sm[key]:.4f}") for lbl, key in [
        ("Off-diagonal mean", "off_diagonal_mean"), ("Off-diagonal std", "off_diagonal_std"),
        ("Adjacent mean", "adjacent_mean"), ("Distant mean", "distant_mean")]]) + "\n")
    w("### Averaged similarity matrix (layer × layer)\n")
    w(_matrix(a.similarity_mean) + "\n")
    w(f"### Per-head similarity to layer {b}\n")
    w(_table(per_head_table(a, a.bottleneck, "similarity")) + "\n")
    w("### Per-head FFN-attention alignment\n")
    w(_table(per_head_table(a, a.alignment, "alignment")) + "\n")

    w("## Cross-reference: effective rank vs subspace geometry\n")
    w("Effective rank `exp(H(sigma / sum sigma))` (Roy & Vetterli 2007) of W_Q, W_K, W_V, W_O,"
      " W_gate, W_up, W_down, averaged per layer, beside the subspace metrics of head"
      f" {head}.\n")
    w(_fig("effective_ranks", "Effective rank by layer") + "\n")
    w(_fig("kernel_effective_ranks", "Kernel effective rank per layer and head") + "\n")
    w(_table(a.layers.drop(columns=["head", "is_bottleneck"]).rename(columns={
        "layer": "Layer", "mean_eff_rank": "Mean eff rank", "adjacent_similarity": "Adj sim",
        "bottleneck_similarity": "Sim to bottleneck", "alignment": "FFN-attn align",
        "alignment_ratio": "Align / chance"})) + "\n")
    w("### Correlation between metrics\n")
    corr = layer_correlations(a.layers)
    w(_table(pd.DataFrame([(label, c.pearson, c.spearman, c.spearman_p, c.n)
                           for label, c in corr],
                          columns=["Pair", "Pearson r", "Spearman rho",
                                   "Permutation p (rho)", "N"])) + "\n")

    w("## Key findings\n")
    w(f"**Experiment 1 (subspace overlap):** {overlap_verdict(s1)}\n")
    w(f"**Experiment 2 (bottleneck convergence):** {bottleneck_verdict(b, pre, post)}\n")
    verdict3 = alignment_verdict(mean_ratio, m["ffn_input"])
    w(f"**Experiment 3 (FFN-attention alignment):** {verdict3}\n")
    return "\n".join(out)
