"""Render the markdown report of one (model, k) from a loaded :class:`results_io.Analysis`.

Sections follow the notebook's report (SCIENCE.md): configuration, experiments 1-3, every head
(the notebook's multi-head robustness), cross-reference with effective ranks, key findings,
and the tests the report ran; figures by relative path. Every tested number comes from
:func:`findings.compute_findings`, computed once.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .circuits_report import CircuitFindings, CircuitTables, circuit_findings
from .circuits_report import finding as circuit_finding
from .circuits_report import section as circuit_section
from .crossref import PAIRS, layer_correlations
from .errors import listed
from .expert_alignment import expert_finding, group_summary
from .findings import DEPTH_FAMILY, Findings, compute_findings, tested_means
from .head_layout import head_dims, is_uniform, kv_heads, kv_of_heads, min_head_dim
from .hybrid import attention_layers, left_out
from .ksweep import CONDITIONAL_RATIO_LABELS, GAP_THRESHOLD, RATIO_LABELS, ill_defined
from .layer_kinds import LayerKinds, position_caveat
from .multiplicity import FDR_Q, count_family
from .results_io import Analysis
from .similarity import null_mean, null_std
from .statistics import (
    Correlation,
    bottleneck_profile,
    distant_threshold,
    overlap_summary,
    similarity_by_distance,
)
from .verdicts import (
    AT_CHANCE,
    CONDITIONAL_NULL,
    alignment_verdict,
    bottleneck_verdict,
    conditional_alignment_verdict,
    conditional_overlap_verdict,
    identity_verdict,
    no_bottleneck_verdict,
    overlap_verdict,
)

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


def render(a: Analysis, circuits: CircuitTables | None = None) -> str:
    """The whole report as markdown; its tested numbers from :func:`findings.compute_findings`
    (and, with ``circuits``, the tables of the composition and read_write jobs,
    :func:`circuits_report.circuit_findings`), computed once and read by the sections and the
    key findings."""
    f = compute_findings(a)
    lines = section_findings(a, f)
    c = circuit_findings(circuits) if circuits is not None else None
    if c is not None:
        lines["circuits"] = circuit_finding(circuits, c)
    sections = [_header(a), _configuration(a), _overlap(a, f, lines), _head_matching(a, f, lines),
                _bottleneck(a, f, lines), _alignment(a, f, lines), _every_head(a, f, lines),
                _k_sensitivity(a, lines), _crossref(a, f, lines),
                circuit_section(circuits, c, a.k, lines["circuits"]) if c is not None else [],
                _findings(a, f, lines), _tests(f, c), _appendix(a)]
    return "\n".join(line for section in sections for line in section)


def _finding(lines: dict[str, str], section: str) -> str:
    return f"**Finding:** {lines[section]}\n"


def attention_kinds(model: dict) -> list[str]:
    """Each attention layer's kind (``model.json``'s ``layer_types`` at ``attention_layers``),
    in the report's layer order. Cost O(L)."""
    every = LayerKinds.from_record(model).kinds
    return [every[layer] for layer in attention_layers(model)]


def by_kind(model: dict, values: list, sep: str = ", ") -> str:
    """One value (text) per attention layer, None where a layer has none, as text: the value
    itself where every layer has it, else each distinct value (in order of first appearance) with
    the layer kinds that have it, ``"256 (sliding), 512 (full)"``, or where other layers of
    those kinds differ, the layers (positions among the attention layers, as the report
    numbers them); the parts joined by ``sep``. Cost O(L)."""
    if len(set(values)) == 1:
        return values[0]
    present = [v for v in values if v is not None]
    kinds = attention_kinds(model)
    parts = []
    for value in dict.fromkeys(present):
        layers = [p for p, v in enumerate(values) if v == value]
        own = list(dict.fromkeys(kinds[p] for p in layers))
        alone = all(v == value for v, kind in zip(values, kinds, strict=True)
                    if kind in own and v is not None)
        where = (", ".join(own) if alone
                 else f"layer{'s' * (len(layers) > 1)} {listed([str(p) for p in layers])}")
        parts.append(f"{value} ({where})")
    return sep.join(parts)


def _smallest_head(model: dict) -> str:
    """``m = 8, the smallest head size (layers 0, 2, 4)``: the bound on k of a model whose
    layers differ in head size."""
    sizes, m = head_dims(model), min_head_dim(model)
    layers = [str(p) for p in np.flatnonzero(sizes == m)]
    return (f"m = {m}, the smallest head size (layer{'s' * (len(layers) > 1)}"
            f" {listed(layers)})")


def kv_reuse_caveat(model: dict) -> str:
    """Gemma 4's key/value reuse in words (``model.json``'s ``kv_shared_layers``, ``{layer:
    source}``, and ``keys_as_values``); empty where the model has neither."""
    shared = {int(layer): source for layer, source in
              (model.get("kv_shared_layers") or {}).items()}
    same = model.get("keys_as_values") or []
    parts = []
    if shared:
        layers = listed([f"{layer} (from {source})" for layer, source in sorted(shared.items())])
        parts.append(f"Layers {layers} store no W_K or W_V and reuse an earlier layer's keys and"
                     " values; their kernel pairs their own W_Q with the source layer's W_K,"
                     " whose keys read the source layer's input, so `W_Q_i^T W_K_j` there is a"
                     " bilinear form between two layers' inputs, not within one layer. Two"
                     " layers whose kernels end in the same W_K (such a layer and its source,"
                     " or two that share one) are left out of every similarity test and"
                     " conditional ratio: that W_K's uneven spectrum pulls both kernels' top-k"
                     " directions together for any queries, random ones too, which the"
                     " row-space null (independent random frames of the row space) does not"
                     " model; their similarities stay in the matrices.")
    if same:
        parts.append(f"Layer{'s' * (len(same) > 1)} {listed([str(x) for x in same])} use"
                     " their keys as values (W_V = W_K): their value and key row spaces are"
                     " one.")
    return ("Key/value reuse (Gemma 4): " + " ".join(parts)) if parts else ""


def overlap_at_chance(f: Findings) -> bool:
    """Experiment 1 reads as chance: no adjacent pair and no layer pair of the primary head is
    significantly above the conditional null."""
    return f.adjacent.n_above == 0 and f.pairs.n_above == 0


def section_findings(a: Analysis, f: Findings) -> dict[str, str]:
    """One sentence per section, each against its nulls; "indistinguishable from chance"
    (:data:`verdicts.AT_CHANCE`) where nothing in the section departs from them."""
    k, d, head, m = a.k, a.model["d_model"], a.primary_head, a.model
    chance = null_mean(k, d)
    layers, pairs = a.layers, a.layer_pairs
    out = {}
    adjacent_ratio = f.conditional_ratio["adjacent_mean"]
    distant_ratio = f.conditional_ratio["distant_mean"]
    if overlap_at_chance(f):
        out["overlap"] = (f"Head {head}'s top-{k} subspaces are {AT_CHANCE} across layers: no"
                          f" layer pair shares more than the conditional null (0 of"
                          f" {f.pairs.n_tests}); adjacent {adjacent_ratio:.2f}x and distant"
                          f" {distant_ratio:.2f}x its mean.")
    else:
        above = layers[(layers["adjacent_p_adjusted"] <= FDR_Q)
                       & (layers["adjacent_z_conditional"] > 0)]
        named = [f"{int(r.layer)}-{int(r.layer) + 1}"
                 f" ({r.adjacent_similarity / r.adjacent_conditional_mean:.1f}x)"
                 for r in above.sort_values("adjacent_z_conditional",
                                            ascending=False).itertuples()]
        boundaries = (f"; {len(f.boundaries)} significant phase boundaries, the largest drop"
                      f" between layers {f.boundaries['boundary'].iloc[0]}"
                      if len(f.boundaries) else "; no significant phase boundary")
        out["overlap"] = (f"Adjacent layers share more than chance: {f.adjacent.n_above} of"
                          f" {f.adjacent.n_tests} adjacent pairs are above the conditional null"
                          f" (mean {adjacent_ratio:.2f}x it,"
                          f" {f.overlap['adjacent_mean'] / chance:.2f}x k/d; most:"
                          f" {listed(named, 5) or 'none'}), distant layers"
                          f" {distant_ratio:.2f}x{boundaries}.")
    best = (pairs["best_match"].mean() / pairs["best_match_null_mean"].mean())
    if not f.identity and f.same_index.n_above == 0:
        out["head_matching"] = (f"Same-index similarity over all heads is {AT_CHANCE}: head"
                                f" identities do not persist (0 of {len(pairs)} layer pairs"
                                f" beat random head orderings) and no layer pair exceeds the"
                                f" conditional null; best match {best:.2f}x that of isotropic"
                                f" random weights.")
    else:
        out["head_matching"] = (f"Head identities persist in {len(f.identity)} of {len(pairs)}"
                                f" layer pairs; same-index exceeds the conditional null in"
                                f" {f.same_index.n_above} (mean {f.same_index.mean_ratio:.2f}x);"
                                f" best match {best:.2f}x that of isotropic random weights.")
    if not a.has_bottleneck:
        out["bottleneck"] = ("No bottleneck: the effective-rank profile of W_Q and W_K has no"
                             f" outlier ({AT_CHANCE} by the outlier rule), so Experiment 2 is"
                             " not run.")
    else:
        t = f.bottleneck
        state = (f"{AT_CHANCE}: no layer" if t.n_above == 0 else f"{t.n_above} of {t.n_tests}"
                 " layers")
        pre, post = f.trends
        out["bottleneck"] = (f"Similarity to layer {a.bottleneck_layer} is {state} above the"
                             f" conditional null (mean {t.mean_ratio:.2f}x); trends pre"
                             f" {pre.text()}, post {post.text()}.") if t.n_above else (
            f"Similarity to layer {a.bottleneck_layer} is {AT_CHANCE}: no layer is above the"
            f" conditional null (0 of {t.n_tests}; mean {t.mean_ratio:.2f}x).")
    t, lay = f.alignment_heads, f.alignment_layers
    deviating = _alignment_deviating(a)
    if t.n_above == t.n_below == 0 and lay.n_above == lay.n_below == 0:
        out["alignment"] = (f"FFN alignment is {AT_CHANCE}: no (layer, head) differs from the"
                            f" conditional null (0 of {t.n_tests}; mean {t.mean_ratio:.2f}x,"
                            f" {layers['alignment'].mean() / chance:.2f}x k/d).")
    else:
        out["alignment"] = (f"FFN alignment differs from the conditional null in {t.n_above}"
                            f" (above) and {t.n_below} (below) of {t.n_tests} (layer, head)"
                            f" pairs (mean {t.mean_ratio:.2f}x); head {head}'s layers that"
                            " differ: " + (listed([f"{ly} ({r:.2f}x)" for ly, r in deviating])
                                           or "none") + ".")
    families = [f.heads_adjacent, f.alignment_heads] + (
        [f.heads_bottleneck] if a.has_bottleneck else [])
    if all(x.n_above == x.n_below == 0 for x in families):
        out["every_head"] = (f"Every one of the {m['n_heads']} heads is {AT_CHANCE}: no"
                             " (head, layer) adjacent similarity"
                             + (", similarity to the bottleneck" if a.has_bottleneck else "")
                             + " or alignment"
                             + " differs from its conditional null.")
    else:
        out["every_head"] = (f"Over all {m['n_heads']} heads, adjacent similarity is above the"
                             f" conditional null in {f.heads_adjacent.n_above} of"
                             f" {f.heads_adjacent.n_tests} (head, layer) pairs (mean"
                             f" {f.heads_adjacent.mean_ratio:.2f}x) and alignment differs in"
                             f" {f.alignment_heads.n_above + f.alignment_heads.n_below} of"
                             f" {f.alignment_heads.n_tests}; per KV head in the table.")
    out["k_sensitivity"] = _ksweep_finding(a, at_chance=overlap_at_chance(f) and
                                           t.n_above == t.n_below == 0)
    significant = [label for label, p in f.depth_adjusted.items() if p <= FDR_Q]
    out["crossref"] = (f"Significant after detrending and BH: {', '.join(significant)}."
                       if significant else
                       f"No correlation across depth survives detrending and BH"
                       f" ({len(f.depth_adjusted)} tested): {AT_CHANCE}.")
    if a.has_experts:
        out["alignment_experts"] = expert_finding(a.alignment_experts, f.alignment_experts,
                                                  AT_CHANCE)
    return out


def _alignment_deviating(a: Analysis) -> list[tuple[int, float]]:
    """(layer, ratio to the conditional chance) of the primary head's layers whose alignment
    differs from the conditional null after BH, the largest |z| first."""
    layers = a.layers
    rows = layers[layers["alignment_p_adjusted"] <= FDR_Q]
    rows = rows.reindex(rows["alignment_z_conditional"].abs().sort_values(ascending=False).index)
    return [(int(r.layer), float(r.alignment_conditional_ratio)) for r in rows.itertuples()]


#: The k-sweep reads as at its null when every conditional ratio is within this of 1.
KSWEEP_TOLERANCE = 0.1


def _ksweep_finding(a: Analysis, at_chance: bool) -> str:
    sweep, k = a.ksweep, a.k
    ratios = sweep[list(CONDITIONAL_RATIO_LABELS)].to_numpy(dtype=float)
    lo, hi = np.nanmin(ratios), np.nanmax(ratios)
    if at_chance and max(1 - lo, hi - 1) <= KSWEEP_TOLERANCE:
        return (f"At every k from 1 to {int(sweep['k'].max())} the four statistics stay within"
                f" {KSWEEP_TOLERANCE:.0%} of their conditional null ({lo:.2f}x-{hi:.2f}x):"
                f" {AT_CHANCE} at every k, as this report's tests find at k = {k}.")
    adjacent = sweep.set_index("k")["adjacent_mean_conditional_ratio"]
    at_k = f"{adjacent[k]:.2f}x at k = {k}, " if k in adjacent.index else ""
    return (f"Adjacent similarity over its conditional null: {at_k}from {adjacent.min():.2f}x"
            f" (k = {int(adjacent.idxmin())}) to {adjacent.max():.2f}x (k ="
            f" {int(adjacent.idxmax())}); the verdicts hold where the ratios stay on one side"
            " of 1.")


def partial_rotary_caveat(fraction: float, d_head: int) -> str:
    """What the zero-offset kernel is when RoPE rotates only the first ``r = int(fraction
    d_head)`` of each head's coordinates (GLM-4-MoE, MiniMax-M2; transformers' rule)."""
    r = int(d_head * fraction)
    return (f"Partial rotary: RoPE rotates only the first {r} of each head's {d_head} query and"
            f" key coordinates (rotary fraction {fraction:g}). At offset 0 the rotation is the"
            " identity, so the kernel is still the whole `W_Q_i^T W_K_j`; at other offsets only"
            f" the part of the score from those {r} coordinates turns with the offset, while"
            f" the part from the other {d_head - r} is the same at every offset.")


def kind_rotary_caveats(m: dict) -> list[str]:
    """What the zero-offset kernel is on the layer kinds whose RoPE turns only part of each
    head's coordinate pairs (``model.json``'s ``rotary_fractions``: Gemma 4's global layers,
    proportional RoPE, which turns the first ``int(f m / 2)`` of a head's ``m / 2`` pairs), one
    sentence per kind, naming its head sizes."""
    out = []
    for kind, f in m.get("rotary_fractions", {}).items():
        sizes = sorted({int(s) for s, t in zip(head_dims(m), attention_kinds(m), strict=True)
                        if t == kind})
        turned = ", ".join(f"{int(f * s) // 2} of {s // 2}" for s in sizes)
        out.append(f"Proportional RoPE on the {kind} layers turns only {turned} coordinate"
                   f" pairs of each query and key head (partial_rotary_factor {f:g}); the other"
                   " pairs have frequency 0. At offset 0 every rotation is the identity, so the"
                   " kernel is still the whole `W_Q_i^T W_K_j`; at other offsets only the part"
                   " of the score from the turned pairs changes, the rest is the same at every"
                   " offset.")
    return out


def _header(a: Analysis):
    m, k, d_head = a.model, a.k, a.model["d_head"]
    uniform = is_uniform(m)
    yield f"# Subspace geometry analysis: {m['name']}\n"
    yield (f"Source: `{m['source']}` ({m['format']}, architecture `{m['architecture']}`);"
           f" weights stored as {m['storage_dtype']}; analysed as {m['compute_dtype']}.\n")
    positions = position_caveat(m["architecture"], LayerKinds.from_record(m))
    yield ("Caveats: the kernel `W_Q_i^T W_K_j` is the attention score's bilinear form"
           f" {positions}. Biases: {m.get('biases', 'not used')}; norm gains:"
           f" {m.get('norm_gains', 'not applied (raw projection weights)')}."
           + (f" Also, {m['not_used']}." if m.get("not_used") else "")
           + (f" **k = d_head = {d_head}: the subspace is the row space of W_K alone, so heads"
              " sharing a KV head are identical; use k < d_head to compare heads.**"
              if uniform and k == d_head else "")
           + (f" **k = {_smallest_head(m)}: in those layers the subspace is the row space of"
              " W_K alone, so heads sharing a KV head are identical; use a smaller k to"
              " compare heads.**" if not uniform and k == min_head_dim(m) else "") + "\n")
    if (fraction := m.get("rotary_fraction", 1.0)) < 1:
        yield partial_rotary_caveat(fraction, d_head) + "\n"
    for caveat in kind_rotary_caveats(m):
        yield caveat + "\n"
    if reuse := kv_reuse_caveat(m):
        yield reuse + "\n"
    if latent := m.get("latent_attention"):
        yield f"Latent attention: {latent['note']}.\n"
    if hybrid := left_out(m):
        yield f"**{hybrid}**\n"
    d = m["d_model"]
    yield ("Nulls: every similarity and alignment stands beside two nulls. The isotropic null"
           f" (Haar-random k-subspaces of R^d: similarity mean k/d = {null_mean(k, d):.4f},"
           f" std {null_std(k, d):.4f}) is what random weights give. But every"
           " direction of a head's kernel lies in its KV head's"
           + (" d_head-dimensional row space" if uniform else
              " m-dimensional row space (m the layer's head size:"
              f" {by_kind(m, [str(x) for x in head_dims(m)])})")
           + " of W_K, so anything that shares that row space beats the isotropic null without"
           " any structure of the kernel itself. **The verdicts are judged against"
           f" {CONDITIONAL_NULL}**, whose mean and std are exact (docs/SCIENCE.md); 'conditional'"
           " below means this null. z-scores get p-values under a normal approximation,"
           f" Benjamini-Hochberg adjusted at q = {FDR_Q} within each family of tests (listed at"
           " the end). A z-score measures distance from a null, not effect size.\n")


def _configuration(a: Analysis):
    """The model's dimensions; a size that differs by layer (Gemma 4's head sizes, KV-head
    counts and FFN widths, ``ffn_widths`` by model layer) per layer kind (:func:`by_kind`)."""
    m = a.model
    widths = m.get("ffn_widths")
    yield "## Model configuration\n"
    yield _metric_table([
        ("Architecture", m["architecture"]), ("Layers (L)", m["n_layers"]),
        ("Hidden size (d)", m["d_model"]),
        ("FFN intermediate (d_ff)", by_kind(m, [str(widths[layer] if widths else m["d_ff"])
                                                for layer in attention_layers(m)])),
        ("Attention heads (h)", m["n_heads"]),
        ("Key/value heads (n_kv)", by_kind(m, [str(x) for x in kv_heads(m)])),
        ("Head dim (d_head)", by_kind(m, [str(x) for x in head_dims(m)])),
        ("Subspace rank (k)", a.k),
        ("Primary head", a.primary_head), ("Sampled heads", a.heads),
        ("FFN input used for alignment", m["ffn_input"]),
        ("Norm gains", m.get("norm_gains", "not applied (raw projection weights)")),
        ("Storage dtype", m["storage_dtype"]),
        ("Effective ranks", a.weight_ranks["source"].iloc[0]),
    ]) + "\n"


def _ratio(value: float, null: float) -> str:
    return f"{value / null:.2f}x" if np.isfinite(value) and null > 0 else ""


def _overlap(a: Analysis, f: Findings, lines: dict[str, str]):
    """Experiment 1 of the primary head."""
    k, head, d = a.k, a.primary_head, a.model["d_model"]
    s1, c1 = f.overlap, f.conditional_summary
    yield "## Experiment 1: subspace overlap across layers\n"
    yield _finding(lines, "overlap")
    yield (f"For head {head}, the top-{k} right singular vectors of each layer's attention"
           " kernel `W_Q_i^T W_K_j` (computed from its factors, never formed), and their"
           " pairwise Grassmann similarity `||V1 V2^T||_F^2 / k` (mean squared cosine of the"
           " principal angles). This same-index matrix compares head"
           f" {head} of one layer with head {head} of another; head numbers carry no meaning"
           " across layers, so see also the best-match matrix in the next section.\n")
    yield "**Interpretation:**\n"
    yield "- Uniformly high similarity: layers query the same subspace."
    yield "- Block-diagonal structure: layers cluster into groups separated by sharp drops."
    yield ("- Off-diagonal near the conditional null: what layers share is what their KV row"
           " spaces share.\n")
    yield _fig("similarity_heatmap", "Similarity heatmap") + "\n"
    yield "### Summary statistics\n"
    t = s1["distant_threshold"]
    chance = null_mean(k, d)
    r1 = f.conditional_ratio
    rows = [("Isotropic null mean (k/d)", chance, None),
            ("Isotropic null std (one pair)", null_std(k, d), None),
            ("Off-diagonal mean", s1["off_diagonal_mean"], "off_diagonal_mean"),
            ("Off-diagonal std", s1["off_diagonal_std"], None),
            ("Off-diagonal min", s1["off_diagonal_min"], None),
            ("Off-diagonal max", s1["off_diagonal_max"], None),
            ("Adjacent layer mean", s1["adjacent_mean"], "adjacent_mean"),
            ("Adjacent layer std", s1["adjacent_std"], None),
            (f"Distant layer (>{t} apart) mean", s1["distant_mean"], "distant_mean"),
            (f"Distant layer (>{t} apart) std", s1["distant_std"], None),
            ("Adjacent vs distant gap", s1["adjacent_minus_distant"], None)]
    yield markdown_table(pd.DataFrame(
        [(label, f"{value:.4f}", _ratio(value, chance) if null is not None or "min" in label
          or "max" in label else "", f"{c1[null]:.4f}" if null is not None else "",
          f"{r1[null]:.2f}x" if null is not None and np.isfinite(r1[null]) else "")
         for label, value, null in rows],
        columns=["Metric", "Value", "× isotropic", "Conditional null mean",
                 "× conditional"])) + "\n"
    yield (f"Against the conditional null (one-sided z per pair, BH over {f.pairs.n_tests}"
           f" layer pairs): {f.pairs.count('layer pairs')}; adjacent pairs:"
           f" {f.adjacent.count('pairs')}.\n")
    yield ("The full matrix: [Appendix](#appendix-full-tables) and"
           f" `similarity_head{head}.npy`.\n")
    yield "### Phase boundaries (significant drops in adjacent-layer similarity)\n"
    if len(f.boundaries):
        yield (f"Steps of the adjacent similarity that drop beyond the conditional null of a"
               f" difference (one-sided z, BH over {f.n_steps} steps):\n")
        yield markdown_table(f.boundaries.rename(columns={
            "rank": "Rank", "boundary": "Boundary (layers)", "adjacent_similarity":
            "Adjacent sim", "change": "Change from prev", "z": "z", "p_adjusted": "Adjusted p"}),
            formats={"z": Z_FORMAT, "Adjusted p": ".2g"}) + "\n"
    else:
        yield (f"No significant boundary: none of the {f.n_steps} steps of the adjacent-layer"
               " similarity drops beyond the conditional null of a difference (one-sided z, BH"
               f" q = {FDR_Q}).\n")
    yield "### Similarity by layer distance\n"
    by_distance = similarity_by_distance(a.similarity[head])
    by_distance["ratio"] = by_distance["mean"] / chance
    tested = [tested_means(np.diagonal(a.similarity[head], offset=dist),
                           np.diagonal(f.conditional_mean, offset=dist))
              for dist in by_distance["distance"]]
    by_distance["conditional"] = [null for _, null in tested]
    by_distance["conditional_ratio"] = [value / null for value, null in tested]
    yield markdown_table(by_distance.rename(columns={
        "distance": "Distance", "mean": "Mean similarity", "std": "Std",
        "n_pairs": "N pairs", "ratio": "× isotropic", "conditional": "Conditional null mean",
        "conditional_ratio": "× conditional"})) + "\n"


def _head_matching(a: Analysis, f: Findings, lines: dict[str, str]):
    k, d = a.k, a.model["d_model"]
    far = distant_threshold(len(a.best_match))
    pairs = a.layer_pairs
    yield "## Head matching across layers (all heads)\n"
    yield _finding(lines, "head_matching")
    yield ("Heads are interchangeable within a layer, so which matrix answers which question"
           " matters:\n")
    yield (f"- **Same-index** (Experiment 1, head {a.primary_head}; here averaged over all"
           f" {a.model['n_heads']} heads): does head i of layer a look where head i of layer b"
           " looks? Only meaningful if training kept head identities, which nothing enforces.")
    yield ("- **Best match**: for each head of layer a, its most similar head in layer b,"
           " averaged over heads (`best_match.npy`, pairs in `best_match_pairs.npy`). Does"
           " layer b contain, somewhere, the subspaces layer a queries?")
    yield ("- **Random pairing** (structured null): heads of the two layers paired by a uniform"
           " random permutation, exact mean and std. What any two heads of these layers share;"
           " same-index above it (permutation test over head orderings) means head identities"
           " persist.")
    yield ("- **Conditional null**: each head's subspace a random k-subspace of its own KV row"
           " space, exact mean and std.")
    yield (f"- **Isotropic null**: the same statistics for isotropic random weights of this"
           f" architecture (Gaussian W_Q and W_K, simulated), whose heads' subspaces are random"
           f" k-subspaces of R^{d} but share their KV head's row space"
           f" ({a.model['n_heads']} heads on"
           f" {by_kind(a.model, [str(x) for x in kv_heads(a.model)])} KV heads): mean k/d ="
           f" {null_mean(k, d):.4f} for same-index; for the best match, the expected maximum"
           " over heads (`best_match_null_mean`).\n")
    yield _fig("best_match", "Same-index and best-match similarity") + "\n"
    adjacent = pairs["layer_b"] - pairs["layer_a"] == 1
    distant = pairs["layer_b"] - pairs["layer_a"] > far
    rows = []
    for column, label in [("same_index", "Same-index (mean over heads)"),
                          ("best_match", "Best match"),
                          ("random_pairing_mean", "Random pairing (structured null)"),
                          ("conditional_mean", "Conditional null of same-index"),
                          ("best_match_null_mean", "Best match of isotropic random weights")]:
        rows.append((label, *(f"{pairs.loc[sel, column].mean():.4f}" if sel.any() else "n/a"
                              for sel in (pairs.index >= 0, adjacent, distant))))
    rows.append(("Isotropic null (k/d)", *[f"{null_mean(k, d):.4f}"] * 3))
    yield markdown_table(pd.DataFrame(rows, columns=["Matrix", "All layer pairs", "Adjacent pairs",
                                             f"Distant pairs (>{far} apart)"])) + "\n"
    yield f"{identity_verdict(len(pairs), f.identity)}\n"
    yield (f"Same-index against the conditional null (one-sided z per layer pair):"
           f" {f.same_index.count('layer pairs')}. Best match exceeds same-index by"
           f" {(pairs['best_match'] - pairs['same_index']).mean():+.4f} on average; as a"
           " maximum over heads it always sits at or above the random pairing, so it is shown"
           " against the best match of isotropic random weights (mean z"
           f" {pairs['z_best_match'].mean():+.1f}); it has no conditional null.\n")


def _trend(c: Correlation, adjusted: float) -> str:
    return f"{c.text()}; adjusted p {adjusted:.3g}" if c.defined else c.text()


def _bottleneck(a: Analysis, f: Findings, lines: dict[str, str]):
    """Experiment 2; without a bottleneck, the profile that found none."""
    k, head, b = a.k, a.primary_head, a.bottleneck_layer
    profile = bottleneck_profile(a.weight_ranks)
    lowest = profile.nsmallest(5)
    profile_text = ("Lowest mean normalized effective rank of W_Q and W_K (the profile `auto`"
                    " reads, figure 'Effective rank by layer'): " + ", ".join(
                        f"layer {layer} {value:.3f}" for layer, value in lowest.items())
                    + f"; median {profile.median():.3f}.")
    if not a.has_bottleneck:
        yield "## Experiment 2: convergence to a bottleneck layer\n"
        yield _finding(lines, "bottleneck")
        yield f"{no_bottleneck_verdict(a.bottleneck_choice)} {profile_text}\n"
        return
    to_ref = a.layers["bottleneck_similarity"].to_numpy()
    pre, post = f.trends
    before, after = to_ref[:b], to_ref[b + 1:]
    yield f"## Experiment 2: convergence to layer {b}\n"
    yield _finding(lines, "bottleneck")
    yield (f"Bottleneck layer {b}: {a.bottleneck_choice}. {profile_text} Similarity of each"
           f" layer's subspace to layer {b}'s (head {head}, top-{k}). If it rises towards layer"
           f" {b} from both sides, the network converges towards that subspace. Trends are"
           " correlations with the layer index, Pearson and Spearman each with a permutation"
           " p-value, BH-adjusted with the cross-reference's correlations; fewer than 3 points"
           " give no trend (reported as undefined).\n")
    yield _fig("bottleneck_trace", "Similarity to the bottleneck layer") + "\n"
    yield "### Summary\n"
    yield _metric_table([
        (f"Self-similarity (layer {b})", f"{to_ref[b]:.4f}"),
        ("Mean similarity (the other layers)", f"{np.delete(to_ref, b).mean():.4f}"),
        ("Mean similarity (before bottleneck)",
         f"{before.mean():.4f}" if len(before) else "n/a"),
        ("Mean similarity (after bottleneck)", f"{after.mean():.4f}" if len(after) else "n/a"),
        ("Pre-bottleneck trend", _trend(pre, f.depth_adjusted["Pre-bottleneck trend"])),
        ("Post-bottleneck trend", _trend(post, f.depth_adjusted["Post-bottleneck trend"])),
        ("Layers above the conditional null", f.bottleneck.count("layers")),
    ]) + "\n"
    yield ("Per layer with both nulls: [Appendix](#appendix-full-tables) and `layers.csv`.\n")


def _alignment(a: Analysis, f: Findings, lines: dict[str, str]):
    m, k, d = a.model, a.k, a.model["d_model"]
    chance = null_mean(k, d)
    layers = a.layers
    align = layers["alignment"].to_numpy()
    gated = "" if m["ffn_input"] == "W_gate" else "; this model's FFN is not gated"
    yield "## Experiment 3: FFN-attention alignment\n"
    yield _finding(lines, "alignment")
    yield (f"Fraction of the FFN input projection's ({m['ffn_input']}{gated}) Frobenius energy"
           f" inside the top-{k} attention subspace of head {a.primary_head},"
           f" `||W_in V_k^T||_F^2 / ||W_in||_F^2`. Isotropic chance = k/d = {k}/{d} ="
           f" {chance:.4f}, its std from W_in's spectrum. The conditional chance is"
           + (" `(k / d_head) ||W_in P_R||_F^2 / ||W_in||_F^2`" if is_uniform(m) else
              " `(k / m) ||W_in P_R||_F^2 / ||W_in||_F^2` (m the layer's head size)")
           + ", the share of a random k-subspace of"
           " the head's KV row space R, with its own std. 'Normalized' places the alignment"
           " piecewise linearly between the floor (-1: W_in's bottom-k directions, the least"
           " any k-subspace holds), chance (0) and the ceiling (+1: W_in's top-k directions);"
           " the conditional version uses the least and most any k-subspace of R holds.\n")
    yield "**Interpretation:**\n"
    yield "- Near the conditional chance: the kernel's top-k directions are not special within"
    yield "  its row space as far as the FFN input is concerned."
    yield "- Significantly below: the FFN input avoids the kernel's top-k directions."
    yield "- Significantly above: the FFN input reads the kernel's top-k directions.\n"
    yield _fig("alignment", "Alignment vs chance") + "\n"
    yield "### Summary\n"
    deviating = ", ".join(f"{layer} ({ratio:.2f}x)"
                          for layer, ratio in _alignment_deviating(a)) or "none"
    yield _metric_table([
        ("Isotropic chance (k/d)", f"{chance:.4f}"), ("Mean alignment", f"{align.mean():.4f}"),
        ("Mean / isotropic chance", f"{align.mean() / chance:.2f}x"),
        ("Mean z vs isotropic null", f"{layers['alignment_z'].mean():{Z_FORMAT}}"),
        ("Mean conditional chance", f"{layers['alignment_conditional_chance'].mean():.4f}"),
        ("Mean / conditional chance", f"{f.alignment_layers.mean_ratio:.2f}x"),
        ("Mean z vs conditional null", f"{layers['alignment_z_conditional'].mean():{Z_FORMAT}}"),
        ("Mean normalized (isotropic; conditional)",
         f"{layers['alignment_normalized'].mean():+.3f};"
         f" {layers['alignment_conditional_normalized'].mean():+.3f}"),
        ("Min", f"{align.min():.4f} (layer {int(align.argmin())})"),
        ("Max", f"{align.max():.4f} (layer {int(align.argmax())})"),
        ("Layers differing from the conditional null", f.alignment_layers.count("layers")),
        ("Those layers (× conditional chance)", deviating),
        ("Every (layer, head)", f.alignment_heads.count("(layer, head) pairs")),
    ]) + "\n"
    yield ("Per layer with both nulls: [Appendix](#appendix-full-tables) and `layers.csv`.\n")
    if a.has_experts:
        yield from _experts(a, f, lines)


def _experts(a: Analysis, f: Findings, lines: dict[str, str]):
    """Experiment 3 per expert of a mixture-of-experts model, beside the layers' pooled FFN
    input (the tables above)."""
    table, k = a.alignment_experts, a.k
    sparse = sorted(set(table["layer"]))
    dense = sorted(set(range(len(a.layers))) - set(sparse))
    yield "### Experts and router\n"
    yield _finding(lines, "alignment_experts")
    yield (f"The same share for each expert's FFN input `W_gate_e` (and the shared expert's),"
           f" `||W_gate_e V_k^T||_F^2 / ||W_gate_e||_F^2`, and for each router row `w_e` (the"
           f" direction whose logit sends a token to expert e), `||V_k w_e||^2 / ||w_e||^2`, for"
           f" every head at k = {k}, each against its own isotropic and conditional null"
           " (`alignment_experts.parquet`). Above, a sparse layer's FFN input is its routed"
           " experts' pooled W_gate (the mean of their Grams); layers without experts"
           f" ({listed([str(x) for x in dense]) or 'none'}) are there as dense layers. Spread:"
           " the std over units of each unit's mean over heads; most and least aligned by that"
           " mean over its conditional chance.\n")
    summary = group_summary(table)
    for label, layers in (("Sparse layers' pooled FFN input", sparse),
                          ("Dense layers' FFN input", dense)):
        rows = a.alignment[a.alignment["layer"].isin(layers)]
        if len(rows):
            summary.loc[len(summary)] = {
                "group": label, "units": len(layers), "mean": rows["alignment"].mean(),
                "spread": np.nan, "ratio": rows["alignment"].mean() / rows["chance"].mean(),
                "conditional_ratio": (rows["alignment"].mean()
                                      / rows["conditional_chance"].mean()),
                "most": "", "least": ""}
    yield markdown_table(summary.rename(columns={
        "group": "Units", "units": "N", "mean": "Mean alignment", "spread": "Spread",
        "ratio": "× isotropic", "conditional_ratio": "× conditional",
        "most": "Most aligned", "least": "Least aligned"}), ".4f",
        formats={"× isotropic": ".2f", "× conditional": ".2f"}) + "\n"
    yield (f"Against the conditional null (two-sided, BH over every (layer, unit, head)):"
           f" {f.alignment_experts.count('tests')}.\n")


def _by_kv_head(a: Analysis) -> pd.DataFrame:
    """Per KV head and over the model: the adjacent similarity, the similarity to the
    bottleneck (where there is one) and the alignment of all its heads against their
    conditional nulls (ratio of means), with the BH counts of the every-head families. Query
    head ``i`` of layer ``p`` reads KV head ``i // (h // n_kv_p)`` (:mod:`head_layout`), so
    where layers differ a KV head gathers different heads in different layers."""
    model = a.model
    owner = kv_of_heads(model)                                          # (L, h)
    tables = {"adjacent": (a.every_head, "adjacent_similarity", "conditional_mean",
                           "z_conditional", "p_conditional_adjusted"),
              "alignment": (a.alignment, "alignment", "conditional_chance", "conditional_z",
                            "conditional_p_adjusted")}
    if a.has_bottleneck:   # the bottleneck's similarity to itself is no test
        others = a.bottleneck[a.bottleneck["layer"] != a.bottleneck_layer]
        tables["bottleneck"] = (others, "similarity", "conditional_mean", "z_conditional",
                                "p_conditional_adjusted")
    columns = {"adjacent": "Adjacent sim", "alignment": "Alignment",
               "bottleneck": "Sim to bottleneck"}
    groups = [(f"KV head {j} ({_kv_members(model, owner, j)})",
               lambda t, j=j: t[owner[t["layer"], t["head"]] == j])
              for j in range(model["n_kv_heads"])]
    groups.append(("Model", lambda t: t))
    rows = []
    for label, select in groups:
        row = {"Group": label}
        for name, (table, value, null, z, p_adjusted) in tables.items():
            part = select(table)
            observed, expected = tested_means(part[value].to_numpy(), part[null].to_numpy())
            row[f"{columns[name]} × conditional"] = observed / expected
            row[f"{columns[name]} significant"] = count_family(
                part[value], part[null], part[z], part[p_adjusted]).above_below()
        rows.append(row)
    return pd.DataFrame(rows)


def _kv_members(model: dict, owner: np.ndarray, j: int) -> str:
    """The query heads of KV head ``j`` (``owner``: :func:`head_layout.kv_of_heads`): ``heads 0,
    1``, or where layers group them differently, ``heads 0, 1 (sliding); 0, 1, 2, 3 (full)``
    (:func:`by_kind`), leaving out the layers without KV head ``j``."""
    members = [", ".join(map(str, np.flatnonzero(row == j))) or None for row in owner]
    return "heads " + by_kind(model, members, "; ")


def _every_head(a: Analysis, f: Findings, lines: dict[str, str]):
    m = a.model
    k = a.k
    within = a.within_layer
    yield "## Every head\n"
    yield _finding(lines, "every_head")
    yield (f"Experiments 1-3 for all {m['n_heads']} heads. Heads that share a KV head share"
           " its row space, so they are not independent replicates: summaries are per KV head"
           " and over the model, with the BH counts of the every-head families.\n")
    yield markdown_table(_by_kv_head(a), ".2f") + "\n"
    shared = m["n_heads"] > kv_heads(m)        # layers where heads share a KV head
    if shared.any():
        sizes = head_dims(m)
        chance = (f"k/d_head = {k / m['d_head']:.3f}" if is_uniform(m) else "k/m = " + by_kind(
            m, [f"{k / size:.3f}" if s else None for size, s in zip(sizes, shared, strict=True)]))
        yield (f"Within-layer dependence, measured: two heads of one KV head have mean"
               f" similarity {within['same_kv_mean'].mean():.3f} (random k-subspaces of one row"
               f" space: {chance}); two heads of different KV heads"
               f" {within['other_kv_mean'].mean():.3f} (conditional null"
               f" {within['other_kv_conditional_mean'].mean():.3f}).\n")
    yield (f"The notebook's multi-head robustness: the sampled heads {a.heads} (its linspace"
           " sample unless configured otherwise).\n")
    yield _fig("multihead_summary", "Multi-head summary") + "\n"
    yield "### Averaged similarity matrix statistics (sampled heads)\n"
    sm = overlap_summary(a.similarity_mean)
    yield _metric_table([(lbl, f"{sm[key]:.4f}") for lbl, key in [
        ("Off-diagonal mean", "off_diagonal_mean"), ("Off-diagonal std", "off_diagonal_std"),
        ("Adjacent mean", "adjacent_mean"), ("Distant mean", "distant_mean")]]) + "\n"
    yield ("The averaged matrix and the per-head tables: [Appendix](#appendix-full-tables).\n")


def _k_sensitivity(a: Analysis, lines: dict[str, str]):
    k, bound, uniform = a.k, min_head_dim(a.model), is_uniform(a.model)
    sweep = a.ksweep
    yield "## k-sensitivity\n"
    yield _finding(lines, "k_sensitivity")
    size = "d_head" if uniform else "m"
    yield (f"The statistics above at every k from 1 to {size} - 1 = {bound - 1}"
           + ("" if uniform else f" ({_smallest_head(a.model)})")
           + f", from the same extraction (sampled heads {a.heads}), each divided by chance k/d"
           " and by its conditional null mean; all rows are in"
           f" `../ksweep.csv`. k = {size} is left out: there the subspace is the key"
           " projection's row space, and heads sharing a KV head become identical"
           + ("" if uniform else " (in the layers of that size)") + ".\n")
    yield "![k-sweep](../figures/ksweep.png)\n"
    shown = sweep[sweep["k"].isin([*KSWEEP_ROWS, k])]
    yield markdown_table(shown[["k", *RATIO_LABELS, *CONDITIONAL_RATIO_LABELS,
                                "n_ill_defined"]].rename(columns={
        **RATIO_LABELS, **CONDITIONAL_RATIO_LABELS,
        "n_ill_defined": "Ill-defined (layer, sampled head)"}), ".2f") + "\n"
    if k == bound:
        yield (f"**This report's k = {size} = {bound}: heads sharing a KV head have identical"
               + (" subspaces; choose k < d_head to compare heads.**\n" if uniform else
                  " subspaces in the layers of that size; choose a smaller k to compare"
                  " heads.**\n"))
        if uniform:   # every subspace is the whole row space: no gap to list
            return
    weak = ill_defined(a.singular_values, k, head_dims(a.model)).sort_values("gap")
    listed = ", ".join(f"L{r.layer}/H{r.head} ({r.gap:.4f})"
                       for r in weak.head(MAX_LISTED).itertuples())
    more = f" and {len(weak) - MAX_LISTED} more" if len(weak) > MAX_LISTED else ""
    yield (f"Ill-defined subspaces at k = {k}, all heads: (layer, head) pairs whose relative"
           f" spectral gap `(sigma_k - sigma_k+1) / sigma_k` is below {GAP_THRESHOLD} (their"
           " top-k subspace can rotate under a perturbation of that relative size):"
           f" {len(weak)} of {a.singular_values.shape[0] * a.singular_values.shape[1]}"
           + (f"; smallest gaps first: {listed}{more}" if listed else "") + ".\n")


def _crossref(a: Analysis, f: Findings, lines: dict[str, str]):
    yield "## Cross-reference: effective rank vs subspace geometry\n"
    yield _finding(lines, "crossref")
    yield ("Effective rank `exp(H(sigma / sum sigma))` (Roy & Vetterli 2007) of W_Q, W_K, W_V,"
           " W_O, W_gate, W_up, W_down, averaged per layer after dividing each by its largest"
           " possible value min(rows, cols) (weights of different sizes are then comparable),"
           f" beside the subspace metrics of head {a.primary_head}"
           f" ({a.weight_ranks['source'].iloc[0]}). Not WeightWatcher's \"entropy\", a"
           " different quantity. Gap at k: the relative spectral gap `(sigma_k - sigma_k+1) /"
           f" sigma_k` of that head's kernel; below {GAP_THRESHOLD} its top-k subspace is"
           " ill-defined."
           + (" In a mixture-of-experts layer each of W_gate, W_up and W_down enters the"
              " per-layer means as its experts' mean (routed and shared, normalized first),"
              " beside the four attention weights; the bottleneck rule reads W_Q and W_K"
              " only." if "expert" in a.weight_ranks and a.weight_ranks["expert"].notna().any()
              else "") + "\n")
    yield _fig("effective_ranks", "Effective rank by layer, normalized: eff_rank / min(rows,"
               " cols)") + "\n"
    yield _fig("kernel_effective_ranks", "Kernel effective rank per layer and head") + "\n"
    yield ("Per layer: [Appendix](#appendix-full-tables) and `layers.csv`.\n")
    yield "### Correlation between metrics\n"
    yield ("Series across depth share trends (neighbouring layers are alike), which makes a"
           " permutation of layers call almost any two of them correlated. So each series'"
           " linear trend in the layer index is removed first, and the p-value of Pearson's r"
           " of the residuals comes from all circular shifts of one of them (exact; the"
           " smallest p it can give is 1/n). The bottleneck layer's similarity to itself is"
           " left out. Adjusted p: BH over these tests and Experiment 2's trends where there is"
           " a bottleneck.\n")
    rows = [(label, c.r, c.p, f.depth_adjusted[label], c.n) for label, c in f.correlations]
    yield markdown_table(pd.DataFrame(rows, columns=[
        "Pair", "Detrended r", "Circular-shift p", "Adjusted p", "N"])) + "\n"
    kept = [f"r = {c.r:.4f} (N = {c.n}) for {label[0].lower() + label[1:]}"
            for (x, y, _), (label, c) in zip(
                PAIRS, layer_correlations(a.layers, keep_bottleneck=True), strict=True)
            if "bottleneck_similarity" in (x, y) and a.has_bottleneck]
    if kept:
        yield ("With the bottleneck layer kept, as the notebook computes them: "
               + " and ".join(kept) + ".\n")


def _findings(a: Analysis, f: Findings, lines: dict[str, str]):
    """The verdicts: the notebook's rules and, beside them, the conditional tests."""
    k, d, ffn = a.k, a.model["d_model"], a.model["ffn_input"]
    chance = null_mean(k, d)
    mean_ratio = a.layers["alignment"].mean() / chance
    distant_ratio = f.conditional_ratio["distant_mean"]
    yield "## Key findings\n"
    overlap = overlap_verdict(f.overlap, chance, overlap_at_chance(f))
    yield (f"**Experiment 1 (subspace overlap):** {overlap}"
           f" {conditional_overlap_verdict(f.adjacent, distant_ratio)}"
           + (f" Phase boundaries: {len(f.boundaries)} significant drop(s)." if len(f.boundaries)
              else " No significant phase boundary.") + "\n")
    yield (f"**Head matching:** {lines['head_matching']}"
           f" {identity_verdict(len(a.layer_pairs), f.identity)}\n")
    if a.has_bottleneck:
        verdict = bottleneck_verdict(a.bottleneck_layer, *f.trends, (
            f.depth_adjusted["Pre-bottleneck trend"], f.depth_adjusted["Post-bottleneck trend"]))
    else:
        verdict = no_bottleneck_verdict(a.bottleneck_choice)
    yield f"**Experiment 2 (bottleneck convergence):** {verdict}\n"
    notebook = alignment_verdict(mean_ratio, ffn, a.layers["alignment_z"].mean(),
                                 _alignment_deviating(a))
    yield (f"**Experiment 3 (FFN-attention alignment):** {notebook}"
           f" {conditional_alignment_verdict(f.alignment_heads, ffn, '(layer, head) pairs')}\n")
    significant = [label for label, p in f.depth_adjusted.items() if p <= FDR_Q]
    yield ("**Correlations across depth:** "
           + (f"significant after detrending and BH: {', '.join(significant)}." if significant
              else "no trend or correlation across depth is significant after detrending"
              f" (correlations) and BH ({dict(f.families())[DEPTH_FAMILY]} tested):"
              f" {AT_CHANCE}.") + "\n")
    yield f"**Every head (multi-head robustness):** {lines['every_head']}\n"
    yield f"**k-sensitivity:** {lines['k_sensitivity']}\n"
    if "circuits" in lines:
        yield f"**Circuits:** {lines['circuits']}\n"


def _tests(f: Findings, circuits: CircuitFindings | None = None):
    families = f.families() + (circuits.families() if circuits is not None else [])
    yield "## Tests and multiplicity\n"
    yield (f"This report ran {sum(n for _, n in families)} tests in {len(families)} families;"
           f" p-values are Benjamini-Hochberg adjusted at q = {FDR_Q} within each family (the"
           " tables' `p_adjusted` columns).\n")
    yield markdown_table(pd.DataFrame(families, columns=["Family", "Tests"])) + "\n"


def _appendix(a: Analysis):
    """The full tables the sections summarize (also in ``layers.csv``, ``layer_pairs.csv`` and
    the ``.npy`` matrices)."""
    k, head, b, d = a.k, a.primary_head, a.bottleneck_layer, a.model["d_model"]
    chance = null_mean(k, d)
    yield "## Appendix: full tables\n"
    yield f"### Full similarity matrix (layer × layer, head {head})\n"
    yield _matrix(a.similarity[head]) + "\n"
    if a.has_bottleneck:
        to_ref = a.layers["bottleneck_similarity"].to_numpy()
        yield "### Per-layer similarity to the bottleneck\n"
        layers = a.layers
        yield markdown_table(pd.DataFrame({
            "Layer": layers["layer"], "Similarity": to_ref,
            "z (isotropic)": layers["bottleneck_z"],
            "Conditional null mean": layers["bottleneck_conditional_mean"],
            "z (conditional)": layers["bottleneck_z_conditional"],
            "Adjusted p": layers["bottleneck_p_adjusted"],
            "Note": ["← bottleneck" if i == b else "" for i in range(len(to_ref))]}),
            formats={"z (isotropic)": Z_FORMAT, "z (conditional)": Z_FORMAT,
                     "Adjusted p": ".2g"}) + "\n"
    layers, align = a.layers, a.layers["alignment"].to_numpy()
    yield "### Per-layer alignment\n"
    yield markdown_table(pd.DataFrame({
        "Layer": layers["layer"], "Alignment": align,
        "× isotropic": [f"{r:.2f}x" for r in align / chance],
        "z (isotropic)": layers["alignment_z"],
        "× conditional": [f"{r:.2f}x" for r in layers["alignment_conditional_ratio"]],
        "z (conditional)": layers["alignment_z_conditional"],
        "Adjusted p": layers["alignment_p_adjusted"],
        "Normalized (conditional)": layers["alignment_conditional_normalized"]}),
        formats={"z (isotropic)": Z_FORMAT, "z (conditional)": Z_FORMAT,
                 "Adjusted p": ".2g"}) + "\n"
    yield "### Averaged similarity matrix (layer × layer, sampled heads)\n"
    yield _matrix(a.similarity_mean) + "\n"
    if a.has_bottleneck:
        yield f"### Per-head similarity to layer {b}\n"
        yield markdown_table(per_head_table(a, a.bottleneck, "similarity")) + "\n"
    yield "### Per-head FFN-attention alignment\n"
    yield markdown_table(per_head_table(a, a.alignment, "alignment")) + "\n"
    yield "### Cross-reference per layer\n"
    columns = ["layer", "mean_normalized_eff_rank", "mean_eff_rank", "relative_gap",
               "adjacent_similarity", "adjacent_best_match", "bottleneck_similarity",
               "alignment", "alignment_conditional_ratio"]
    yield markdown_table(a.layers[columns].rename(columns={
        "layer": "Layer", "mean_normalized_eff_rank": "Mean normalized eff rank",
        "mean_eff_rank": "Mean eff rank", "relative_gap": "Gap at k",
        "adjacent_similarity": "Adj sim", "adjacent_best_match": "Adj best match",
        "bottleneck_similarity": "Sim to bottleneck", "alignment": "FFN-attn align",
        "alignment_conditional_ratio": "Align × conditional"})) + "\n"
