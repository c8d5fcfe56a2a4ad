"""Render the markdown report of one (model, k) from a loaded :class:`results_io.Analysis`.

Sections follow the notebook's report (SCIENCE.md): configuration, experiments 1-3, multi-head
robustness, cross-reference with effective ranks, key findings; figures by relative path.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .architectures import ABSOLUTE_POSITIONS
from .crossref import PAIRS, layer_correlations
from .ksweep import GAP_THRESHOLD, RATIO_LABELS, ill_defined
from .nulls import similarity_z
from .results_io import Analysis
from .similarity import null_mean, null_std
from .statistics import (
    AUTO_BOTTLENECK,
    Correlation,
    bottleneck_trends,
    distant_threshold,
    off_diagonal,
    overlap_summary,
    phase_boundaries,
    similarity_by_distance,
)
from .verdicts import alignment_verdict, bottleneck_verdict, overlap_verdict

#: Ill-defined (layer, head) pairs listed by name in the report (the smallest gaps).
MAX_LISTED = 20
#: z-scores in tables: one decimal and a sign (their precision; 4 decimals would suggest more).
Z_FORMAT = "+.1f"
#: Values of k shown in the report's k-sweep table (all k are in ksweep.csv).
KSWEEP_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def markdown_table(df: pd.DataFrame, floatfmt=".4f", index=False,
                   formats: dict[str, str] | None = None) -> str:
    """``df`` as a markdown table, floats as ``floatfmt`` or, by column name, as ``formats``
    (e.g. ``{"z": "+.1f"}``), integers unformatted, missing values (NaN: e.g. the last layer's
    similarity to a next layer) as ``n/a``."""
    columns = ([df.index.name] if index else []) + list(df.columns)
    per_column = [(formats or {}).get(c, floatfmt) for c in columns]
    cells = df.astype(object).where(df.notna(), None)  # per-value types: ints stay unformatted
    return cells.to_markdown(index=index, floatfmt=per_column, missingval="n/a")


def _metric_table(rows: list[tuple[str, object]]) -> str:
    return markdown_table(pd.DataFrame(rows, columns=["Metric", "Value"]).astype({"Value": str}))


def _matrix(matrix: np.ndarray) -> str:
    labels = [f"L{i}" for i in range(len(matrix))]
    return markdown_table(pd.DataFrame(matrix, index=labels, columns=labels), ".3f", index=True)


def _fig(name: str, caption: str) -> str:
    return f"![{caption}](figures/{name}.png)"


def per_head_table(a: Analysis, table: pd.DataFrame, column: str) -> pd.DataFrame:
    grid = a.per_head(table, column)
    out = grid.rename(columns=lambda h: f"Head {h}")
    out["Mean"], out["Std"] = grid.mean(axis=1), grid.std(axis=1, ddof=0)
    return out.rename_axis("Layer").reset_index()


def render(a: Analysis) -> str:
    """The whole report as markdown.

    What two sections show is computed once, here: Experiment 1's summary of the primary
    head's matrix and Experiment 2's trends (2 x 10^4 permutations), in their sections and in
    the key findings.
    """
    summary = overlap_summary(a.similarity[a.primary_head])
    trends = bottleneck_trends(a.layers["bottleneck_similarity"].to_numpy(), a.bottleneck_layer)
    sections = [_header(a), _configuration(a), _overlap(a, summary), _head_matching(a),
                _bottleneck(a, trends), _alignment(a), _multihead(a), _k_sensitivity(a),
                _crossref(a), _findings(a, summary, trends)]
    return "\n".join(line for section in sections for line in section)


def _header(a: Analysis):
    m, k, d_head = a.model, a.k, a.model["d_head"]
    yield f"# Subspace geometry analysis: {m['name']}\n"
    yield (f"Source: `{m['source']}` ({m['format']}, architecture `{m['architecture']}`);"
           f" weights stored as {m['storage_dtype']}; analysed as {m['compute_dtype']}.\n")
    positions = ("before scaling; positions enter as learned absolute embeddings in the"
                 " residual stream, not inside the score" if m["architecture"] in
                 ABSOLUTE_POSITIONS else "before RoPE and scaling; RoPE makes the true kernel"
                 " depend on the relative position, and this is its zero-offset slice")
    yield ("Caveats: the kernel `W_Q_i^T W_K_j` is the attention score's bilinear form"
           f" {positions}. Biases: {m.get('biases', 'not used')}; norm gains:"
           f" {m.get('norm_gains', 'not applied (raw projection weights)')}."
           + (f" **k = d_head = {d_head}: the subspace is the row space of W_K alone, so heads"
              " sharing a KV head are identical; use k < d_head to compare heads.**"
              if k == d_head else "") + "\n")
    yield ("Nulls: the similarity of one pair of subspaces is shown beside the isotropic null"
           f" (two Haar-random k-subspaces of R^d: mean k/d = {null_mean(k, m['d_model']):.4f},"
           f" std {null_std(k, m['d_model']):.4f}) as a z-score `(value - k/d) / std`, averages"
           " as multiples of chance; alignment beside its own isotropic null (std from the FFN"
           " input's spectrum). A z-score measures distance from chance, not effect size: with"
           " d in the hundreds, small similarities can have large z.\n")


def _configuration(a: Analysis):
    m = a.model
    yield "## Model configuration\n"
    yield _metric_table([
        ("Architecture", m["architecture"]), ("Layers (L)", m["n_layers"]),
        ("Hidden size (d)", m["d_model"]), ("FFN intermediate (d_ff)", m["d_ff"]),
        ("Attention heads (h)", m["n_heads"]), ("Key/value heads (n_kv)", m["n_kv_heads"]),
        ("Head dim (d_head)", m["d_head"]), ("Subspace rank (k)", a.k),
        ("Primary head", a.primary_head), ("Sampled heads", a.heads),
        ("FFN input used for alignment", m["ffn_input"]),
        ("Storage dtype", m["storage_dtype"]),
        ("Effective ranks", a.weight_ranks["source"].iloc[0]),
    ]) + "\n"


def _overlap(a: Analysis, s1: dict[str, float]):
    """Experiment 1; ``s1`` is :func:`statistics.overlap_summary` of the primary head."""
    k, head, d = a.k, a.primary_head, a.model["d_model"]
    sims = a.similarity[head]
    yield "## Experiment 1: subspace overlap across layers\n"
    yield (f"For head {head}, the top-{k} right singular vectors of each layer's attention"
           " kernel `W_Q_i^T W_K_j` (computed from its factors, never formed), and their"
           " pairwise Grassmann similarity `||V1 V2^T||_F^2 / k` (mean squared cosine of the"
           " principal angles). This same-index matrix compares head"
           f" {head} of one layer with head {head} of another; head numbers carry no meaning"
           " across layers, so see also the best-match matrix in the next section.\n")
    yield "**Interpretation:**\n"
    yield "- Uniformly high similarity: depth is redundant (layers query the same subspace)."
    yield "- Block-diagonal structure: layers cluster into phases with sharp transitions."
    yield "- Off-diagonal near the isotropic null: each layer queries a different subspace.\n"
    yield _fig("similarity_heatmap", "Similarity heatmap") + "\n"
    yield "### Summary statistics\n"
    t = s1["distant_threshold"]
    chance = null_mean(k, d)
    rows = [("Isotropic null mean (k/d)", chance, True),
            ("Isotropic null std (one pair)", null_std(k, d), False),
            ("Off-diagonal mean", s1["off_diagonal_mean"], True),
            ("Off-diagonal std", s1["off_diagonal_std"], False),
            ("Off-diagonal min", s1["off_diagonal_min"], True),
            ("Off-diagonal max", s1["off_diagonal_max"], True),
            ("Adjacent layer mean", s1["adjacent_mean"], True),
            ("Adjacent layer std", s1["adjacent_std"], False),
            (f"Distant layer (>{t} apart) mean", s1["distant_mean"], True),
            (f"Distant layer (>{t} apart) std", s1["distant_std"], False),
            ("Adjacent vs distant gap", s1["adjacent_minus_distant"], False)]
    yield markdown_table(pd.DataFrame(
        [(label, f"{value:.4f}", f"{value / chance:.2f}x" if ratio else "")
         for label, value, ratio in rows], columns=["Metric", "Value", "× chance"])) + "\n"
    yield "### Full similarity matrix (layer × layer)\n"
    off = similarity_z(off_diagonal(sims), k, d)
    yield (f"z-scores of the off-diagonal entries (each one pair of subspaces) against the"
           f" isotropic null range {off.min():+.1f} to {off.max():+.1f}; entries with |z| > 3:"
           f" {int((np.abs(off) > 3).sum()) // 2} of {off.size // 2} layer pairs.\n")
    yield _matrix(sims) + "\n"
    yield "### Phase boundaries (largest drops in adjacent-layer similarity)\n"
    boundaries = phase_boundaries(sims)
    yield (markdown_table(boundaries.rename(columns={
        "rank": "Rank", "boundary": "Boundary (layers)", "adjacent_similarity": "Adjacent sim",
        "change": "Change from prev"})) if len(boundaries) else
        "None: adjacent-layer similarity never drops from one layer pair to the next.") + "\n"
    yield "### Similarity by layer distance\n"
    by_distance = similarity_by_distance(sims)
    by_distance["ratio"] = by_distance["mean"] / chance
    yield markdown_table(by_distance.rename(columns={
        "distance": "Distance", "mean": "Mean similarity", "std": "Std",
        "n_pairs": "N pairs", "ratio": "Mean × chance"})) + "\n"


def _head_matching(a: Analysis):
    k, d = a.k, a.model["d_model"]
    far = distant_threshold(a.model["n_layers"])
    pairs = a.layer_pairs
    yield "## Head matching across layers (all heads)\n"
    yield ("Heads are interchangeable within a layer, so which matrix answers which question"
           " matters:\n")
    yield (f"- **Same-index** (Experiment 1, head {a.primary_head}; here averaged over all"
           f" {a.model['n_heads']} heads): does head i of layer a look where head i of layer b"
           " looks? Only meaningful if training kept head identities, which nothing enforces.")
    yield ("- **Best match**: for each head of layer a, its most similar head in layer b,"
           " averaged over heads (`best_match.npy`, pairs in `best_match_pairs.npy`). Does"
           " layer b contain, somewhere, the subspaces layer a queries?")
    yield ("- **Random pairing** (structured null): heads of the two layers paired at random"
           " (seeded permutations). What any two heads of these layers share; best match far"
           " above it means specific heads correspond.")
    yield (f"- **Isotropic null**: the same statistics for isotropic random weights of this"
           f" architecture (Gaussian W_Q and W_K, simulated), whose heads' subspaces are random"
           f" k-subspaces of R^{d} but share their KV head's row space"
           f" ({a.model['n_heads']} heads on {a.model['n_kv_heads']} KV heads): mean k/d ="
           f" {null_mean(k, d):.4f} for same-index and random pairing; for the best match, the"
           " expected maximum over heads (`best_match_null_mean`).\n")
    yield _fig("best_match", "Same-index and best-match similarity") + "\n"
    adjacent = pairs["layer_b"] - pairs["layer_a"] == 1
    distant = pairs["layer_b"] - pairs["layer_a"] > far
    rows = []
    for column, label in [("same_index", "Same-index (mean over heads)"),
                          ("best_match", "Best match"),
                          ("random_pairing_mean", "Random pairing (structured null)"),
                          ("best_match_null_mean", "Best match of isotropic random weights")]:
        rows.append((label, *(f"{pairs.loc[sel, column].mean():.4f}" if sel.any() else "n/a"
                              for sel in (pairs.index >= 0, adjacent, distant))))
    rows.append(("Isotropic null (k/d)", *[f"{null_mean(k, d):.4f}"] * 3))
    yield markdown_table(pd.DataFrame(rows, columns=["Matrix", "All layer pairs", "Adjacent pairs",
                                             f"Distant pairs (>{far} apart)"])) + "\n"
    kept = int((pairs["z_same_index_vs_pairing"] > 3).sum())
    yield (f"Layer pairs where same-index heads share more than randomly paired heads (by more"
           f" than 3 std of the random-pairing null): {kept} of {len(pairs)}; where they do,"
           " head identities persist across those layers. Best match exceeds same-index by"
           f" {(pairs['best_match'] - pairs['same_index']).mean():+.4f} on average; as a"
           " maximum over heads it always sits at or above the random pairing, so it is judged"
           " against the best match of isotropic random weights (mean z"
           f" {pairs['z_best_match'].mean():+.1f}) and by how far it exceeds same-index.\n")


def _bottleneck(a: Analysis, trends: tuple[Correlation, Correlation]):
    """Experiment 2; ``trends`` are :func:`statistics.bottleneck_trends` of the layer table."""
    k, head, d, b = a.k, a.primary_head, a.model["d_model"], a.bottleneck_layer
    to_ref = a.layers["bottleneck_similarity"].to_numpy()
    pre, post = trends
    before, after = to_ref[:b], to_ref[b + 1:]
    yield f"## Experiment 2: convergence to layer {b}\n"
    yield (f"Bottleneck layer {b}: {a.bottleneck_choice}. Similarity of each layer's subspace"
           f" to layer {b}'s (head {head}, top-{k}). If it rises towards layer {b} from both"
           " sides, the network converges towards that subspace. Trends are correlations with"
           " the layer index, Pearson and Spearman each with a permutation p-value; fewer than"
           " 3 points give no trend (reported as undefined).\n")
    yield _fig("bottleneck_trace", "Similarity to the bottleneck layer") + "\n"
    yield "### Summary\n"
    yield _metric_table([
        (f"Self-similarity (layer {b})", f"{to_ref[b]:.4f}"),
        ("Mean similarity (all layers, the bottleneck's 1 included)", f"{to_ref.mean():.4f}"),
        ("Mean similarity (before bottleneck)",
         f"{before.mean():.4f}" if len(before) else "n/a"),
        ("Mean similarity (after bottleneck)", f"{after.mean():.4f}" if len(after) else "n/a"),
        ("Pre-bottleneck trend", pre.text()),
        ("Post-bottleneck trend", post.text()),
    ]) + "\n"
    yield "### Per-layer similarity to the bottleneck\n"
    yield markdown_table(pd.DataFrame({
        "Layer": a.layers["layer"], "Similarity": to_ref,
        "z vs isotropic null": similarity_z(to_ref, k, d),
        "Note": ["← bottleneck" if i == b else "" for i in range(len(to_ref))]}),
        formats={"z vs isotropic null": Z_FORMAT}) + "\n"


def _alignment(a: Analysis):
    m, k, d = a.model, a.k, a.model["d_model"]
    chance = null_mean(k, d)
    layers = a.layers
    align = layers["alignment"].to_numpy()
    gated = "" if m["ffn_input"] == "W_gate" else "; this model's FFN is not gated"
    yield "## Experiment 3: FFN-attention alignment\n"
    yield (f"Fraction of the FFN input projection's ({m['ffn_input']}{gated}) Frobenius energy"
           f" inside the top-{k} attention subspace of head {a.primary_head},"
           f" `||W_in V_k^T||_F^2 / ||W_in||_F^2`. Chance level = k/d = {k}/{d} ="
           f" {chance:.4f}; its std under the isotropic null depends on how unevenly W_in's"
           " energy is spread (per layer below). The ceiling is the share of W_in's energy in"
           " its own top-k right singular directions (no k-subspace holds more); 'normalized'"
           " places the alignment between chance (0) and that ceiling (1).\n")
    yield "**Interpretation:**\n"
    yield f"- Near chance ({chance:.4f}, z near 0): FFN and attention are randomly oriented."
    yield "- Well below chance: the FFN avoids the attention subspace (clean separation)."
    yield "- Well above chance: FFN and attention are coupled in the same subspace.\n"
    yield _fig("alignment", "Alignment vs chance") + "\n"
    yield "### Summary\n"
    yield _metric_table([
        ("Chance level (k/d)", f"{chance:.4f}"), ("Mean alignment", f"{align.mean():.4f}"),
        ("Mean / chance", f"{align.mean() / chance:.2f}x"), ("Std", f"{align.std():.4f}"),
        ("Mean z vs isotropic null", f"{layers['alignment_z'].mean():{Z_FORMAT}}"),
        ("Mean normalized (0 = chance, 1 = ceiling)",
         f"{layers['alignment_normalized'].mean():+.4f}"),
        ("Min", f"{align.min():.4f} (layer {int(align.argmin())})"),
        ("Max", f"{align.max():.4f} (layer {int(align.argmax())})"),
        ("Layers above chance", f"{int((align > chance).sum())}/{len(align)}"),
        ("Layers at or below chance", f"{int((align <= chance).sum())}/{len(align)}"),
    ]) + "\n"
    yield "### Per-layer alignment\n"
    yield markdown_table(pd.DataFrame({
        "Layer": layers["layer"], "Alignment": align,
        "vs chance": [f"{r:.2f}x" for r in align / chance],
        "Null std": layers["alignment_null_std"],
        "z": layers["alignment_z"],
        "Normalized": layers["alignment_normalized"]}), formats={"z": Z_FORMAT}) + "\n"


def _multihead(a: Analysis):
    b = a.bottleneck_layer
    yield "## Multi-head robustness\n"
    yield (f"The experiments repeated for heads {a.heads} (the notebook's linspace sample unless"
           " configured otherwise), to check whether the primary head is representative.\n")
    yield _fig("multihead_summary", "Multi-head summary") + "\n"
    yield "### Averaged similarity matrix statistics\n"
    sm = overlap_summary(a.similarity_mean)
    yield _metric_table([(lbl, f"{sm[key]:.4f}") for lbl, key in [
        ("Off-diagonal mean", "off_diagonal_mean"), ("Off-diagonal std", "off_diagonal_std"),
        ("Adjacent mean", "adjacent_mean"), ("Distant mean", "distant_mean")]]) + "\n"
    yield "### Averaged similarity matrix (layer × layer)\n"
    yield _matrix(a.similarity_mean) + "\n"
    k, d = a.k, a.model["d_model"]
    yield f"### Per-head similarity to layer {b}\n"
    yield (f"Each entry is one pair of subspaces: isotropic null {null_mean(k, d):.4f} ± "
           f"{null_std(k, d):.4f}, so entries above {null_mean(k, d) + 3 * null_std(k, d):.4f}"
           " have z > 3.\n")
    yield markdown_table(per_head_table(a, a.bottleneck, "similarity")) + "\n"
    yield "### Per-head FFN-attention alignment\n"
    yield ("Null per layer: chance k/d with the std in the Experiment 3 table (it depends on"
           " the layer's FFN input, not on the head).\n")
    yield markdown_table(per_head_table(a, a.alignment, "alignment")) + "\n"


def _k_sensitivity(a: Analysis):
    k, d_head = a.k, a.model["d_head"]
    sweep = a.ksweep
    yield "## k-sensitivity\n"
    yield (f"The statistics above at every k from 1 to d_head - 1 = {d_head - 1}, from the same"
           f" extraction (sampled heads {a.heads}), each divided by chance k/d; all rows are in"
           " `../ksweep.csv`. k = d_head is left out: there the subspace is the key"
           " projection's row space, and heads sharing a KV head become identical.\n")
    yield "![k-sweep](../figures/ksweep.png)\n"
    shown = sweep[sweep["k"].isin([*KSWEEP_ROWS, k])]
    yield markdown_table(shown[["k", *RATIO_LABELS, "n_ill_defined"]].rename(columns={
        **RATIO_LABELS, "n_ill_defined": "Ill-defined (layer, sampled head)"}), ".2f") + "\n"
    if k == d_head:
        yield (f"**This report's k = d_head = {d_head}: heads sharing a KV head have identical"
               " subspaces; choose k < d_head to compare heads.**\n")
        return
    weak = ill_defined(a.singular_values, k).sort_values("gap")
    listed = ", ".join(f"L{r.layer}/H{r.head} ({r.gap:.4f})"
                       for r in weak.head(MAX_LISTED).itertuples())
    more = f" and {len(weak) - MAX_LISTED} more" if len(weak) > MAX_LISTED else ""
    yield (f"Ill-defined subspaces at k = {k}, all heads: (layer, head) pairs whose relative"
           f" spectral gap `(sigma_k - sigma_k+1) / sigma_k` is below {GAP_THRESHOLD} (their"
           " top-k subspace can rotate under a perturbation of that relative size):"
           f" {len(weak)} of {a.singular_values.shape[0] * a.singular_values.shape[1]}"
           + (f"; smallest gaps first: {listed}{more}" if listed else "") + ".\n")


def _crossref(a: Analysis):
    yield "## Cross-reference: effective rank vs subspace geometry\n"
    yield ("Effective rank `exp(H(sigma / sum sigma))` (Roy & Vetterli 2007) of W_Q, W_K, W_V,"
           " W_O, W_gate, W_up, W_down, averaged per layer, beside the subspace metrics of head"
           f" {a.primary_head} ({a.weight_ranks['source'].iloc[0]}). Not WeightWatcher's"
           " \"entropy\", a different quantity. Gap at k: the relative spectral gap"
           " `(sigma_k - sigma_k+1) / sigma_k` of that head's kernel; below"
           f" {GAP_THRESHOLD} its top-k subspace is ill-defined.\n")
    yield _fig("effective_ranks", "Effective rank by layer, normalized: eff_rank / min(rows,"
               " cols)") + "\n"
    yield _fig("kernel_effective_ranks", "Kernel effective rank per layer and head") + "\n"
    columns = ["layer", "mean_eff_rank", "relative_gap", "adjacent_similarity",
               "adjacent_best_match", "bottleneck_similarity", "alignment", "alignment_ratio"]
    yield markdown_table(a.layers[columns].rename(columns={
        "layer": "Layer", "mean_eff_rank": "Mean eff rank", "relative_gap": "Gap at k",
        "adjacent_similarity": "Adj sim",
        "adjacent_best_match": "Adj best match", "bottleneck_similarity": "Sim to bottleneck",
        "alignment": "FFN-attn align", "alignment_ratio": "Align / chance"})) + "\n"
    yield "### Correlation between metrics\n"
    yield ("Pearson r and Spearman rho, each with a two-sided permutation p-value (seeded);"
           " the bottleneck layer's similarity to itself is left out.\n")
    corr = layer_correlations(a.layers)
    rows = [(label, c.pearson, c.pearson_p, c.spearman, c.spearman_p, c.n) for label, c in corr]
    yield markdown_table(pd.DataFrame(rows, columns=[
        "Pair", "Pearson r", "Permutation p (r)", "Spearman rho", "Permutation p (rho)",
        "N"])) + "\n"
    kept = [f"r = {c.pearson:.4f} (N = {c.n}) for {label[0].lower() + label[1:]}"
            for (x, y, _), (label, c) in zip(
                PAIRS, layer_correlations(a.layers, keep_bottleneck=True), strict=True)
            if "bottleneck_similarity" in (x, y)]
    yield ("With the bottleneck layer kept, as the notebook computes them: "
           + " and ".join(kept) + ".\n")


def _findings(a: Analysis, s1: dict[str, float], trends: tuple[Correlation, Correlation]):
    """The verdicts, from the statistics of :func:`_overlap` and :func:`_bottleneck`."""
    k, d = a.k, a.model["d_model"]
    b = a.bottleneck_layer
    pre, post = trends
    mean_ratio = a.layers["alignment"].mean() / null_mean(k, d)
    yield "## Key findings\n"
    yield f"**Experiment 1 (subspace overlap):** {overlap_verdict(s1)}\n"
    chosen_by_rank = a.bottleneck_choice == AUTO_BOTTLENECK
    yield (f"**Experiment 2 (bottleneck convergence):**"
           f" {bottleneck_verdict(b, pre, post, chosen_by_rank)}\n")
    yield (f"**Experiment 3 (FFN-attention alignment):**"
           f" {alignment_verdict(mean_ratio, a.model['ffn_input'])}\n")
