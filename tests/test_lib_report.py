"""The markdown report of one (model, k) on a small hand-built Analysis: the numbers in its
tables and sentences against values computed here from the formulas (SCIENCE.md)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from conftest import markdown_table
from scipy import stats

from weight_geometry.report import per_head_table, render
from weight_geometry.results_io import Analysis

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


def _analysis() -> Analysis:
    layer = np.arange(L)
    sims = _similarity()
    sv = np.tile(np.arange(D_HEAD, 0, -1, dtype=float), (L, len(HEADS), 1))   # 6, 5, .., 1
    for (ly, h), s4 in WEAK.items():
        sv[ly, h, K] = s4
    bottleneck = pd.DataFrame({
        "head": np.repeat(HEADS, L), "layer": np.tile(layer, 2),
        "similarity": np.concatenate([TO_REF, [0.4, 0.1, 1.0, 0.5, 0.2, 0.3]]),
        "bottleneck_layer": B, "bottleneck_choice": "set in the config"})
    alignment = pd.DataFrame({"head": np.repeat(HEADS, L), "layer": np.tile(layer, 2),
                              "alignment": np.concatenate([ALIGN, np.full(L, 0.2)])})
    layers = pd.DataFrame({
        "layer": layer, "head": 0, "is_bottleneck": layer == B,
        "relative_gap": [0.25, (4 - WEAK[1, 0]) / 4, 0.25, 0.25, 0.25, 0.25],
        "mean_eff_rank": [10.0, 12.0, 9.0, 14.0, 11.0, 13.0],
        "adjacent_similarity": np.append(np.diagonal(sims, 1), np.nan),
        "adjacent_best_match": [0.9, 0.8, 0.7, 0.6, 0.5, np.nan],
        "bottleneck_similarity": TO_REF, "alignment": ALIGN,
        "alignment_ratio": np.array(ALIGN) / CHANCE, "alignment_null_std": 0.02,
        "alignment_z": (np.array(ALIGN) - CHANCE) / 0.02, "alignment_normalized": 0.1})
    pairs = pd.DataFrame([(a, b) for a in range(L) for b in range(a + 1, L)],
                         columns=["layer_a", "layer_b"])
    pairs["best_match"] = 0.1 * (pairs["layer_b"] - pairs["layer_a"]) + 0.01 * pairs["layer_a"]
    pairs["same_index"] = pairs["best_match"] / 2
    pairs["random_pairing_mean"] = 0.15
    pairs["best_match_null_mean"] = 0.2
    pairs["z_same_index_vs_pairing"] = 1.0
    pairs["z_best_match"] = 2.0
    ksweep = pd.DataFrame({"k": range(1, D_HEAD), "off_diagonal_mean_ratio": 1.5,
                           "adjacent_mean_ratio": 2.0, "distant_mean_ratio": 1.0,
                           "alignment_mean_ratio": 1.1, "n_ill_defined": 0})
    model = {"name": "hand", "source": "hand/made", "format": "safetensors",
             "architecture": "llama", "storage_dtype": "float32", "compute_dtype": "float64",
             "n_layers": L, "d_model": D, "d_ff": 4 * D, "n_heads": 2, "n_kv_heads": 1,
             "d_head": D_HEAD, "ffn_input": "W_gate"}
    return Analysis(
        model=model, k=K, heads=HEADS, primary_head=0, similarity={0: sims, 1: sims},
        similarity_mean=sims, bottleneck=bottleneck, alignment=alignment, layers=layers,
        weight_ranks=pd.DataFrame({"source": ["computed"]}), kernel_ranks=pd.DataFrame(),
        singular_values=sv, best_match=sims, layer_pairs=pairs, ksweep=ksweep)


@pytest.fixture(scope="module")
def text() -> str:
    return render(_analysis())


def _metrics(text: str, heading: str) -> dict[str, str]:
    return {row["Metric"]: row["Value"] for row in markdown_table(text, heading)}


def test_off_diagonal_z_count_is_per_layer_pair(text):
    sims, std = _similarity(), _null_std(K, D)
    z = [(sims[i, j] - CHANCE) / std for i in range(L) for j in range(i + 1, L)]
    big = sum(abs(v) > 3 for v in z)
    assert big == 4 and len(z) == 15          # 0.9 three times and 0.7; 0.2 is within 3 std
    assert f"entries with |z| > 3: {big} of {len(z)} layer pairs." in text


def test_similarity_by_distance_ratio_is_mean_over_chance(text):
    sims = _similarity()
    rows = markdown_table(text, "### Similarity by layer distance")
    assert [int(r["Distance"]) for r in rows] == [1, 2, 3, 5]     # DISTANCES < L and L // 2
    for row in rows:
        dist = int(row["Distance"])
        mean = np.mean([sims[i, i + dist] for i in range(L - dist)])
        assert row["Mean similarity"] == f"{mean:.4f}"
        assert row["Mean × chance"] == f"{mean / CHANCE:.4f}"


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
    all_layers = got["Mean similarity (all layers, the bottleneck's 1 included)"]
    assert all_layers == f"{np.mean(TO_REF):.4f}"
    # The trends against the layer index, before (2 layers: undefined) and after the bottleneck.
    assert got["Pre-bottleneck trend"] == f"undefined (n={B} < 3)"
    after = TO_REF[B + 1:]
    r = stats.pearsonr(np.arange(len(after)), after)[0]
    assert got["Post-bottleneck trend"].startswith(f"r={r:+.3f} (perm. p=")
    assert f"n={len(after)}" in got["Post-bottleneck trend"]


def test_alignment_summary_counts_chance_as_not_above(text):
    got = _metrics(text, "## Experiment 3")
    assert got["Layers above chance"] == "2/6"              # 0.3 and 0.2
    assert got["Layers at or below chance"] == "4/6"        # two of them exactly at 0.125
    assert got["Min"] == "0.0500 (layer 2)"
    assert got["Max"] == "0.3000 (layer 1)"
    assert got["Mean / chance"] == f"{np.mean(ALIGN) / CHANCE:.2f}x"


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
    rows = markdown_table(text, "## Cross-reference")
    assert [r["Gap at k"] for r in rows] == ["0.2500", "0.0025", *["0.2500"] * 4]


def test_missing_values_and_z_scores_formatted(text):
    assert markdown_table(text, "## Cross-reference")[-1]["Adj sim"] == "n/a"
    z = [r["z"] for r in markdown_table(text, "### Per-layer alignment")]
    assert z == [f"{(a - CHANCE) / 0.02:+.1f}" for a in ALIGN]


def test_phase_boundaries_list_drops_only(text):
    """Adjacent similarity 0.9, 0.9, 0.9, 0.125, 0.125: one drop; the steps of 0 are none."""
    rows = markdown_table(text, "### Phase boundaries")
    assert [(row["Boundary (layers)"], row["Change from prev"]) for row in rows] == \
        [("3→4", "-0.7750")]


@pytest.mark.parametrize(("architecture", "says", "not_says"), [
    ("llama", "zero-offset slice", "absolute embeddings"),
    ("gpt2", "learned absolute embeddings", "RoPE"),
])
def test_position_caveat_follows_the_architecture(architecture, says, not_says):
    a = _analysis()
    a.model["architecture"] = architecture
    caveat = next(line for line in render(a).splitlines() if line.startswith("Caveats:"))
    assert says in caveat and not_says not in caveat
