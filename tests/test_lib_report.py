"""The markdown report of one (model, k) on a small hand-built Analysis: the numbers in its
tables and sentences against values computed here from the formulas (SCIENCE.md)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from conftest import markdown_table
from scipy import stats

from weight_geometry.multiplicity import benjamini_hochberg
from weight_geometry.report import per_head_table, render
from weight_geometry.results_io import Analysis
from weight_geometry.rowspace_nulls import similarity_null

L, K, D, D_HEAD, B = 6, 3, 24, 6, 2     # chance k/d = 0.125, exactly
CHANCE = K / D
HEADS = [0, 1]
#: Similarity of each layer to the bottleneck layer B (primary head 0).
TO_REF = [0.2, 0.5, 1.0, 0.6, 0.3, 0.1]
#: FFN-attention alignment per layer: two layers exactly at chance, two above.
ALIGN = [0.125, 0.3, 0.05, 0.125, 0.2, 0.1]
#: (layer, head) -> sigma_{k+1} making the relative gap at k = 3 (sigma_3 = 4) tiny.
WEAK = {(1, 0): 3.99, (4, 1): 3.98, (0, 1): 3.9996}


def _null_std(k: int, d: int) -> float:
    """SCIENCE.md: Var[||V1 V2^T||_F^2] = 2k^2(d-k)^2 / (d^2 (d-1)(d+2)); sim divides by k."""
    return math.sqrt(2 * k**2 * (d - k) ** 2 / (d**2 * (d - 1) * (d + 2))) / k


def _similarity() -> np.ndarray:
    s = np.full((L, L), CHANCE)
    for i, j, v in [(0, 1, 0.9), (1, 2, 0.9), (2, 3, 0.9), (0, 5, 0.2), (1, 4, 0.7)]:
        s[i, j] = s[j, i] = v
    np.fill_diagonal(s, 1.0)
    return s


#: Row-space overlap moments making every conditional mean equal k/d: t1 = m^2 / d and
#: M^T M = (t1 / m) I, so t2 = t1^2 / m (one KV head).
T1 = D_HEAD**2 / D
T2 = T1**2 / D_HEAD


def _conditional() -> tuple[float, float]:
    """The conditional null of one pair of heads for these moments (rowspace_nulls)."""
    return similarity_null(T1, T2, K, D_HEAD)


def _analysis() -> Analysis:
    layer = np.arange(L)
    sims = _similarity()
    c_mean, c_std = _conditional()
    sv = np.tile(np.arange(D_HEAD, 0, -1, dtype=float), (L, len(HEADS), 1))   # 6, 5, .., 1
    for (ly, h), s4 in WEAK.items():
        sv[ly, h, K] = s4
    bottleneck = pd.DataFrame({
        "head": np.repeat(HEADS, L), "layer": np.tile(layer, 2),
        "similarity": np.concatenate([TO_REF, [0.4, 0.1, 1.0, 0.5, 0.2, 0.3]]),
        "conditional_mean": c_mean, "conditional_std": c_std,
        "bottleneck_layer": B, "bottleneck_choice": "set in the config"})
    bottleneck["z_conditional"] = ((bottleneck["similarity"] - c_mean) / c_std).where(
        bottleneck["layer"] != B)
    bottleneck["p_conditional_adjusted"] = np.where(bottleneck["z_conditional"] > 3, 0.01, 0.5)
    bottleneck.loc[bottleneck["layer"] == B, "p_conditional_adjusted"] = np.nan
    align = np.concatenate([ALIGN, np.full(L, 0.2)])
    alignment = pd.DataFrame({"head": np.repeat(HEADS, L), "layer": np.tile(layer, 2),
                              "alignment": align, "conditional_chance": 0.1,
                              "conditional_z": (align - 0.1) / 0.01,
                              "conditional_p_adjusted": np.where(align > 0.15, 0.001, 0.5)})
    adjacent = np.append(np.diagonal(sims, 1), np.nan)
    adjacent_z = (adjacent - c_mean) / c_std
    to_ref_z = np.where(layer == B, np.nan, (np.array(TO_REF) - c_mean) / c_std)
    layers = pd.DataFrame({
        "layer": layer, "head": 0, "is_bottleneck": layer == B,
        "relative_gap": [0.25, (4 - WEAK[1, 0]) / 4, 0.25, 0.25, 0.25, 0.25],
        "mean_eff_rank": [10.0, 12.0, 9.0, 14.0, 11.0, 13.0],
        "mean_normalized_eff_rank": [0.5, 0.6, 0.45, 0.7, 0.55, 0.65],
        "adjacent_similarity": adjacent, "adjacent_conditional_mean": c_mean,
        "adjacent_z_conditional": adjacent_z,
        "adjacent_p_adjusted": np.where(adjacent_z > 3, 0.001, 0.9),
        "adjacent_best_match": [0.9, 0.8, 0.7, 0.6, 0.5, np.nan],
        "bottleneck_similarity": TO_REF, "bottleneck_z": (np.array(TO_REF) - CHANCE) / 0.02,
        "bottleneck_conditional_mean": c_mean, "bottleneck_z_conditional": to_ref_z,
        "bottleneck_p_adjusted": np.where(to_ref_z > 3, 0.001, 0.9),
        "alignment": ALIGN,
        "alignment_ratio": np.array(ALIGN) / CHANCE, "alignment_null_std": 0.02,
        "alignment_z": (np.array(ALIGN) - CHANCE) / 0.02, "alignment_normalized": 0.1,
        "alignment_conditional_chance": 0.1,
        "alignment_conditional_ratio": np.array(ALIGN) / 0.1,
        "alignment_z_conditional": (np.array(ALIGN) - 0.1) / 0.01,
        "alignment_conditional_normalized": 0.05,
        "alignment_p_adjusted": np.where(np.array(ALIGN) > 0.15, 0.001, 0.5)})
    pairs = pd.DataFrame([(a, b) for a in range(L) for b in range(a + 1, L)],
                         columns=["layer_a", "layer_b"])
    pairs["best_match"] = 0.1 * (pairs["layer_b"] - pairs["layer_a"]) + 0.01 * pairs["layer_a"]
    pairs["same_index"] = pairs["best_match"] / 2
    pairs["random_pairing_mean"] = 0.15
    pairs["best_match_null_mean"] = 0.2
    pairs["conditional_mean"] = c_mean
    pairs["z_conditional"] = (pairs["same_index"] - c_mean) / c_std
    pairs["p_conditional_adjusted"] = 0.5
    pairs["z_same_index_vs_pairing"] = 1.0
    pairs["p_pairing_adjusted"] = np.where(pairs["layer_a"] == 1, 0.01, 0.6)
    pairs["z_best_match"] = 2.0
    every_head = pd.DataFrame({"head": np.repeat(HEADS, L - 1), "kv_head": 0,
                               "layer": np.tile(layer[:-1], 2),
                               "adjacent_similarity": np.tile(adjacent[:-1], 2),
                               "conditional_mean": c_mean,
                               "z_conditional": np.tile(adjacent_z[:-1], 2),
                               "p_conditional_adjusted": 0.5})
    within = pd.DataFrame({"layer": layer, "same_kv_mean": 0.6, "same_kv_conditional_mean": 0.5,
                           "other_kv_mean": np.nan, "other_kv_conditional_mean": np.nan})
    overlaps = np.empty((2, L, 1, L, 1))
    overlaps[0], overlaps[1] = T1, T2
    ksweep = pd.DataFrame({"k": range(1, D_HEAD), "off_diagonal_mean_ratio": 1.5,
                           "adjacent_mean_ratio": 2.0, "distant_mean_ratio": 1.0,
                           "alignment_mean_ratio": 1.1, "off_diagonal_mean_conditional_ratio": 1.2,
                           "adjacent_mean_conditional_ratio": 1.7,
                           "distant_mean_conditional_ratio": 0.9,
                           "alignment_mean_conditional_ratio": 1.0, "n_ill_defined": 0})
    model = {"name": "hand", "source": "hand/made", "format": "safetensors",
             "architecture": "llama", "storage_dtype": "float32", "compute_dtype": "float64",
             "n_layers": L, "d_model": D, "d_ff": 4 * D, "n_heads": 2, "n_kv_heads": 1,
             "d_head": D_HEAD, "ffn_input": "W_gate"}
    ranks = pd.DataFrame([(ly, wt, shape, r) for ly in range(L) for wt, shape, r in
                          (("W_Q", "12x24", 6.0 - 0.5 * (ly == 3)), ("W_K", "6x24", 3.0))],
                         columns=["layer_idx", "weight_type", "shape", "eff_rank"])
    ranks["source"] = "computed"
    return Analysis(
        model=model, k=K, heads=HEADS, primary_head=0, similarity={0: sims, 1: sims},
        similarity_mean=sims, bottleneck=bottleneck, alignment=alignment, layers=layers,
        weight_ranks=ranks, kernel_ranks=pd.DataFrame(),
        singular_values=sv, best_match=sims, layer_pairs=pairs, every_head=every_head,
        within_layer=within, overlaps=overlaps, ksweep=ksweep)


@pytest.fixture(scope="module")
def text() -> str:
    return render(_analysis())


def _metrics(text: str, heading: str) -> dict[str, str]:
    return {row["Metric"]: row["Value"] for row in markdown_table(text, heading)}


def test_conditional_null_is_stated_beside_each_summary(text):
    """The conditional mean of every pair is k/d here (module constants), so the summary's
    conditional column equals the isotropic chance and its ratio the isotropic one."""
    c_mean, _ = _conditional()
    assert c_mean == pytest.approx(CHANCE)
    rows = {r["Metric"]: r for r in markdown_table(text, "### Summary statistics")}
    assert rows["Adjacent layer mean"]["Conditional null mean"] == f"{c_mean:.4f}"
    adjacent = np.diagonal(_similarity(), 1).mean()
    assert rows["Adjacent layer mean"]["× conditional"] == f"{adjacent / c_mean:.2f}x"
    assert "The verdicts are judged against the row-space-conditional null" in text


def test_similarity_by_distance_ratio_is_mean_over_chance(text):
    sims = _similarity()
    rows = markdown_table(text, "### Similarity by layer distance")
    assert [int(r["Distance"]) for r in rows] == [1, 2, 3, 5]     # DISTANCES < L and L // 2
    for row in rows:
        dist = int(row["Distance"])
        mean = np.mean([sims[i, i + dist] for i in range(L - dist)])
        assert row["Mean similarity"] == f"{mean:.4f}"
        assert row["× isotropic"] == f"{mean / CHANCE:.4f}"
        assert row["× conditional"] == f"{mean / _conditional()[0]:.4f}"


def test_head_matching_distant_pairs_are_more_than_a_third_apart(text):
    rows = {r["Matrix"]: r for r in markdown_table(text, "## Head matching")}
    best = {(a, b): 0.1 * (b - a) + 0.01 * a for a in range(L) for b in range(a + 1, L)}
    distant = [v for (a, b), v in best.items() if b - a > L // 3]       # 3, 4, 5 apart
    adjacent = [v for (a, b), v in best.items() if b - a == 1]
    assert rows["Best match"]["Distant pairs (>2 apart)"] == f"{np.mean(distant):.4f}"
    assert rows["Best match"]["Adjacent pairs"] == f"{np.mean(adjacent):.4f}"
    assert rows["Best match"]["All layer pairs"] == f"{np.mean(list(best.values())):.4f}"


def test_bottleneck_summary_means_exclude_the_bottleneck(text):
    got = _metrics(text, "## Experiment 2")
    assert got[f"Self-similarity (layer {B})"] == "1.0000"
    assert got["Mean similarity (before bottleneck)"] == f"{np.mean(TO_REF[:B]):.4f}"
    assert got["Mean similarity (after bottleneck)"] == f"{np.mean(TO_REF[B + 1:]):.4f}"
    others = TO_REF[:B] + TO_REF[B + 1:]
    assert got["Mean similarity (the other layers)"] == f"{np.mean(others):.4f}"
    # The trends against the layer index, before (2 layers: undefined) and after the bottleneck.
    assert got["Pre-bottleneck trend"].startswith(f"undefined (n={B} < 3)")
    after = TO_REF[B + 1:]
    r = stats.pearsonr(np.arange(len(after)), after)[0]
    assert got["Post-bottleneck trend"].startswith(f"r={r:+.3f} (perm. p=")
    assert f"n={len(after)}" in got["Post-bottleneck trend"]
    assert "adjusted p" in got["Post-bottleneck trend"]


def test_alignment_summary_states_both_nulls(text):
    got = _metrics(text, "## Experiment 3")
    assert got["Min"] == "0.0500 (layer 2)"
    assert got["Max"] == "0.3000 (layer 1)"
    assert got["Mean / isotropic chance"] == f"{np.mean(ALIGN) / CHANCE:.2f}x"
    assert got["Mean / conditional chance"] == f"{np.mean(ALIGN) / 0.1:.2f}x"
    # Layers whose adjusted p is below 0.05 (0.3 and 0.2) are named with their ratios.
    assert got["Those layers (× conditional chance)"] == "1 (3.00x), 4 (2.00x)"
    assert got["Layers differing from the conditional null"].startswith("2 of 6 layers")


def test_per_head_table_mean_and_population_std():
    a = _analysis()
    got = per_head_table(a, a.bottleneck, "similarity")
    assert list(got.columns) == ["Layer", "Head 0", "Head 1", "Mean", "Std"]
    other = [0.4, 0.1, 1.0, 0.5, 0.2, 0.3]
    for row, x, y in zip(got.itertuples(), TO_REF, other, strict=True):
        assert row.Mean == pytest.approx((x + y) / 2)
        assert row.Std == pytest.approx(abs(x - y) / 2)     # std of two values, ddof = 0


def test_k_sweep_rows_include_the_report_k(text):
    rows = markdown_table(text, "## k-sensitivity")
    assert [int(r["k"]) for r in rows] == [1, 2, 3, 4]     # KSWEEP_ROWS below d_head, and k=3


def test_ill_defined_subspaces_listed_smallest_gap_first(text):
    # Relative gap (sigma_k - sigma_k+1) / sigma_k with sigma_3 = 4 (all other gaps are 0.25).
    gaps = {key: (4 - s4) / 4 for key, s4 in WEAK.items()}
    listed = ", ".join(f"L{ly}/H{h} ({g:.4f})"
                       for (ly, h), g in sorted(gaps.items(), key=lambda item: item[1]))
    assert listed == "L0/H1 (0.0001), L1/H0 (0.0025), L4/H1 (0.0050)"
    assert f": 3 of {L * len(HEADS)}; smallest gaps first: {listed}." in text


def test_cross_reference_shows_the_primary_heads_gap_at_k(text):
    rows = markdown_table(text, "### Cross-reference per layer")
    assert [r["Gap at k"] for r in rows] == ["0.2500", "0.0025", *["0.2500"] * 4]


def test_missing_values_and_z_scores_formatted(text):
    assert markdown_table(text, "### Cross-reference per layer")[-1]["Adj sim"] == "n/a"
    rows = markdown_table(text, "### Per-layer alignment")
    assert [r["z (isotropic)"] for r in rows] == [f"{(a - CHANCE) / 0.02:+.1f}" for a in ALIGN]
    assert [r["z (conditional)"] for r in rows] == [f"{(a - 0.1) / 0.01:+.1f}" for a in ALIGN]


def test_phase_boundaries_list_significant_drops_only(text):
    """Adjacent similarity 0.9, 0.9, 0.9, 0.125, 0.125: one drop, far beyond the conditional
    null of a difference (z from the pairs' conditional stds, p = Phi(z), BH over 4 steps);
    the steps of 0 are not significant."""
    _, c_std = _conditional()
    adjacent = np.diagonal(_similarity(), 1)
    z = np.diff(adjacent) / np.hypot(c_std, c_std)
    adjusted = benjamini_hochberg(stats.norm.cdf(z))
    assert list(np.flatnonzero(adjusted <= 0.05)) == [2]
    rows = markdown_table(text, "### Phase boundaries")
    assert [(row["Rank"], row["Boundary (layers)"], row["Change from prev"], row["z"])
            for row in rows] == [("1", "3→4", "-0.7750", f"{z[2]:+.1f}")]


def test_no_bottleneck_is_said_and_experiment_2_is_skipped():
    a = _analysis()
    a.bottleneck = a.bottleneck.assign(bottleneck_layer=-1, bottleneck_choice="auto: none here")
    text = render(a)
    assert "No bottleneck: auto: none here; Experiment 2 is not run." in text
    assert "### Per-layer similarity to the bottleneck" not in text
    assert "Lowest mean normalized effective rank of W_Q and W_K" in text
    assert "layer 3 0.479" in text       # mean of W_Q 5.5 / 12 and W_K 3 / 6: the minimum


def test_identity_and_multiplicity_are_reported(text):
    """Pairs whose pairing p survives BH (layer 1 with every later layer here) are named; the
    report states how many tests it ran per family."""
    assert "Head identities persist across 4 layer pairs (1-2, 1-3, 1-4, 1-5)" in text
    families = {r["Family"]: int(r["Tests"]) for r in markdown_table(
        text, "## Tests and multiplicity")}
    assert families["Phase boundaries (drops of adjacent similarity)"] == L - 2
    assert families["All layer pairs vs conditional null (primary head)"] == L * (L - 1) // 2
    assert f"This report ran {sum(families.values())} tests in {len(families)} families" in text


@pytest.mark.parametrize(("architecture", "says", "not_says"), [
    ("llama", "zero-offset slice", "absolute embeddings"),
    ("gpt2", "learned absolute embeddings", "RoPE"),
])
def test_position_caveat_follows_the_architecture(architecture, says, not_says):
    a = _analysis()
    a.model["architecture"] = architecture
    caveat = next(line for line in render(a).splitlines() if line.startswith("Caveats:"))
    assert says in caveat and not_says not in caveat


def test_every_head_is_summarized_per_kv_head_against_the_conditional_null(text):
    """One KV head (heads 0 and 1) and the model: ratios of means to the conditional null, and
    the BH counts of each every-head family (the hand-made tables' adjusted p-values)."""
    rows = {r["Group"]: r for r in markdown_table(text, "## Every head")}
    assert list(rows) == ["KV head 0 (heads 0, 1)", "Model"]
    c_mean, _ = _conditional()
    adjacent = np.diagonal(_similarity(), 1)
    model = rows["Model"]
    assert model["Adjacent sim × conditional"] == f"{adjacent.mean() / c_mean:.2f}"
    assert model["Alignment × conditional"] == f"{(np.mean(ALIGN) + 0.2) / 2 / 0.1:.2f}"
    assert model["Alignment significant"] == "8 above, 0 below /12"   # 0.3, 0.2 and head 1's
    others = [0.4, 0.1, 0.5, 0.2, 0.3] + [v for i, v in enumerate(TO_REF) if i != B]
    assert model["Sim to bottleneck × conditional"] == f"{np.mean(others) / c_mean:.2f}"
    assert "Within-layer dependence, measured: two heads of one KV head have mean similarity" \
        " 0.600" in text


SECTIONS = ("## Experiment 1", "## Head matching", "## Experiment 2", "## Experiment 3",
            "## Every head", "## k-sensitivity", "## Cross-reference")


def _at_chance() -> Analysis:
    """The hand-built analysis with every statistic at its conditional null: similarities k/d
    (the conditional mean of these moments), nothing significant, k-sweep ratios 1."""
    a = _analysis()
    sims = np.full((L, L), CHANCE)
    np.fill_diagonal(sims, 1.0)
    layers = a.layers.assign(adjacent_similarity=np.append(np.full(L - 1, CHANCE), np.nan),
                             adjacent_z_conditional=0.0, adjacent_p_adjusted=0.9,
                             bottleneck_p_adjusted=0.9, alignment_p_adjusted=0.9,
                             alignment_z=0.0)
    ratios = [c for c in a.ksweep.columns if c.endswith("ratio")]
    return replace(a, similarity={0: sims, 1: sims}, similarity_mean=sims, layers=layers,
                   layer_pairs=a.layer_pairs.assign(p_pairing_adjusted=0.9),
                   bottleneck=a.bottleneck.assign(p_conditional_adjusted=0.9),
                   alignment=a.alignment.assign(conditional_p_adjusted=0.9),
                   ksweep=a.ksweep.assign(**dict.fromkeys(ratios, 1.0)))


def _findings_of(text: str) -> dict[str, str]:
    """Each section's one-line finding (the first ``**Finding:**`` line after its heading)."""
    return {h: text[text.index(h):].split("**Finding:** ", 1)[1].split("\n", 1)[0]
            for h in SECTIONS}


def test_every_section_states_a_one_line_finding_against_its_null(text):
    lines = _findings_of(text)
    assert "Adjacent layers share more than chance" in lines["## Experiment 1"]
    assert "conditional null" in lines["## Experiment 3"] and "1 (3.00x)" in \
        lines["## Experiment 3"]       # the deviating layers are named, with their ratio
    assert "indistinguishable from chance" not in lines["## Experiment 1"]


def test_a_model_at_chance_reads_as_chance_in_every_section():
    text = render(_at_chance())
    lines = _findings_of(text)
    for heading, line in lines.items():
        assert "indistinguishable from chance" in line, (heading, line)
    key = text[text.index("## Key findings"):text.index("## Tests and multiplicity")]
    assert "this reads as chance" in key and "(1.00x chance k/d)" not in key
    assert "1.00x chance k/d" in key      # the notebook's rule, relative to chance
    # the main text is short: the full matrices are in the appendix only
    main = text[:text.index("## Appendix")]
    assert "| L0 " not in main and "| L0 " in text[text.index("## Appendix"):]
