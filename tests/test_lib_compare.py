"""Cross-model comparison on two synthetic models of different depth and width."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from weight_geometry.compare import (
    COMPARE_FIGURES,
    compare_summary,
    compare_table,
    draw_compare,
    render_compare,
)
from weight_geometry.verdicts import alignment_verdict

K = 8


def _model(name: str, n_layers: int, d: int, bottleneck: int, seed: int,
           ffn_input: str = "W_gate") -> tuple[dict, pd.DataFrame]:
    """A model.json record and a layers table as the workflow writes them."""
    rng = np.random.default_rng(seed)
    layers = np.arange(n_layers)
    to_ref = rng.uniform(0, 0.5, n_layers)
    to_ref[bottleneck] = 1.0
    alignment = rng.uniform(0, 3 * K / d, n_layers)
    record = {"name": name, "n_layers": n_layers, "d_model": d, "d_ff": 4 * d, "n_heads": 4,
              "n_kv_heads": 2, "d_head": d // 4, "architecture": "llama", "ffn_input": ffn_input}
    adjacent = np.append(rng.uniform(0, 0.6, n_layers - 1), np.nan)
    table = pd.DataFrame({
        "layer": layers, "head": 0, "is_bottleneck": layers == bottleneck,
        "mean_eff_rank": rng.uniform(10, d, n_layers),
        "mean_normalized_eff_rank": rng.uniform(0.2, 0.9, n_layers),
        "adjacent_similarity": adjacent,
        "adjacent_conditional_mean": np.append(rng.uniform(0.05, 0.2, n_layers - 1), np.nan),
        "bottleneck_similarity": to_ref, "bottleneck_conditional_mean": 0.05,
        "alignment": alignment,
        "alignment_ratio": alignment / (K / d),
        "alignment_conditional_ratio": rng.uniform(0.5, 1.5, n_layers),
    })
    return record, table


@pytest.fixture
def models():
    return {"small": _model("small", 6, 64, 4, 0), "deep": _model("deep", 10, 128, 7, 1, "W_up")}


def test_table_rows_depth_and_chance_ratios(models):
    table = compare_table(models, K)
    assert list(table["model"].unique()) == ["small", "deep"]
    assert len(table) == 16
    for name, (record, layers) in models.items():
        rows = table[table["model"] == name].reset_index(drop=True)
        n, d = record["n_layers"], record["d_model"]
        assert (rows["n_layers"] == n).all() and (rows["d_model"] == d).all()
        np.testing.assert_allclose(rows["depth"], np.arange(n) / n)
        assert rows["depth"].min() == 0 and rows["depth"].max() < 1
        assert (rows["chance"] == K / d).all()
        for column in ["adjacent_similarity", "bottleneck_similarity", "alignment",
                       "alignment_ratio", "alignment_conditional_ratio", "mean_eff_rank",
                       "mean_normalized_eff_rank", "is_bottleneck", "head"]:
            np.testing.assert_array_equal(rows[column], layers[column])
        np.testing.assert_allclose(rows["adjacent_conditional_ratio"],
                                   layers["adjacent_similarity"]
                                   / layers["adjacent_conditional_mean"])
        np.testing.assert_allclose(rows["adjacent_ratio"], layers["adjacent_similarity"] * d / K)
        np.testing.assert_allclose(rows["bottleneck_ratio"],
                                   layers["bottleneck_similarity"] * d / K)
        assert (rows["ffn_input"] == record["ffn_input"]).all()


def test_table_refuses_a_layers_table_of_another_depth(models):
    record, layers = models["small"]
    with pytest.raises(ValueError, match="small: layers table does not hold layers 0..5"):
        compare_table({"small": (record, layers.iloc[:-1])}, K)


def test_summary_against_hand_computation(models):
    table = compare_table(models, K)
    summary = compare_summary(table).set_index("model")
    assert list(summary.index) == ["small", "deep"]
    for name, (record, layers) in models.items():
        row = summary.loc[name]
        d, n = record["d_model"], record["n_layers"]
        adjacent = layers["adjacent_similarity"].to_numpy()[:-1]  # the last layer has none
        b = int(np.flatnonzero(layers["is_bottleneck"])[0])
        others = np.delete(layers["bottleneck_similarity"].to_numpy(), b)
        assert row["n_layers"] == n and row["d_model"] == d and row["head"] == 0
        assert row["adjacent_mean"] == pytest.approx(adjacent.mean())
        assert row["adjacent_ratio"] == pytest.approx(adjacent.mean() / (K / d))
        assert row["bottleneck_layer"] == b
        assert row["bottleneck_depth"] == pytest.approx(b / n)
        assert row["bottleneck_similarity_mean"] == pytest.approx(others.mean())
        assert row["alignment_mean"] == pytest.approx(layers["alignment"].mean())
        assert row["alignment_ratio_mean"] == pytest.approx(layers["alignment_ratio"].mean())
        assert row["mean_eff_rank"] == pytest.approx(layers["mean_eff_rank"].mean())
        assert row["mean_normalized_eff_rank"] == pytest.approx(
            layers["mean_normalized_eff_rank"].mean())
        assert row["alignment_conditional_ratio_mean"] == pytest.approx(
            layers["alignment_conditional_ratio"].mean())
        assert row["adjacent_conditional_ratio"] == pytest.approx(
            (layers["adjacent_similarity"] / layers["adjacent_conditional_mean"]).mean())
        assert row["ffn_input"] == record["ffn_input"]


def test_draw_compare_writes_every_figure(tmp_path, models):
    out = {name: str(tmp_path / "figures" / f"{name}.png") for name in COMPARE_FIGURES}
    draw_compare(compare_table(models, K), out)
    for path in out.values():
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_report_has_summary_numbers_figures_and_findings(models):
    table = compare_table(models, K)
    summary = compare_summary(table)
    text = render_compare(table, summary, K)
    assert text.startswith(f"# Cross-model comparison (top-{K})")
    for name in COMPARE_FIGURES:
        assert f"](figures/{name}.png)" in text
    for row in summary.itertuples():
        for value in (row.adjacent_mean, row.adjacent_ratio, row.adjacent_conditional_ratio,
                      row.bottleneck_depth, row.alignment_ratio_mean,
                      row.alignment_conditional_ratio_mean, row.mean_normalized_eff_rank):
            assert f"{value:.4f}" in text
        assert f"{row.model} at layer {int(row.bottleneck_layer)} of {row.n_layers}" in text
    ranked = summary.sort_values("adjacent_conditional_ratio", ascending=False)["model"].tolist()
    by_model = summary.set_index("model")
    first, second = (f"{m} ({by_model.loc[m, 'adjacent_conditional_ratio']:.2f}x)"
                     for m in ranked)
    assert f"(most shared beyond the row spaces first): {first}, {second}." in text
    peak = table.loc[table[table["model"] == "deep"]["adjacent_similarity"].idxmax()]
    assert (f"deep: layers {peak['layer']}-{peak['layer'] + 1} (depth {peak['depth']:.2f}) at"
            f" {peak['adjacent_similarity']:.3f}") in text
    for row in summary.itertuples():
        verdict = alignment_verdict(row.alignment_ratio_mean, row.ffn_input)
        assert f"- {row.model}: {verdict}" in text


def test_findings_rank_alignment_by_conditional_ratio_and_give_bottleneck_depth():
    # Alignment / k/d and alignment / conditional chance rank these two models in opposite
    # orders: the comparison uses the conditional one (comparable across head sizes).
    wide_record, wide = _model("wide", 6, 256, 4, 2)
    narrow_record, narrow = _model("narrow", 5, 64, 1, 3)
    wide["alignment"], narrow["alignment"] = 0.1, 0.2
    wide["alignment_ratio"], narrow["alignment_ratio"] = 0.1 / (K / 256), 0.2 / (K / 64)
    wide["alignment_conditional_ratio"], narrow["alignment_conditional_ratio"] = 0.9, 1.3
    table = compare_table({"narrow": (narrow_record, narrow), "wide": (wide_record, wide)}, K)
    text = render_compare(table, compare_summary(table), K)
    assert ("- Ranked by mean FFN-attention alignment / its conditional chance: narrow (1.30x),"
            " wide (0.90x).") in text
    assert "wide at layer 4 of 6 (depth 0.67)" in text             # depth = layer / L
    assert "narrow at layer 1 of 5 (depth 0.20)" in text


def test_summary_table_has_similarity_to_bottleneck_of_other_layers(models):
    table = compare_table(models, K)
    text = render_compare(table, compare_summary(table), K)
    lines = text[text.index("## Summary"):].splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines
            if line.startswith("|")]
    column = rows[0].index("Sim to bottleneck (others)")
    for (_, layers), row in zip(models.values(), rows[2:], strict=True):
        others = layers.loc[~layers["is_bottleneck"], "bottleneck_similarity"].mean()
        assert row[column] == f"{others:.4f}"


def test_a_model_without_bottleneck_says_none(models):
    record, layers = models["small"]
    layers = layers.assign(is_bottleneck=False, bottleneck_similarity=np.nan)
    table = compare_table({"small": (record, layers), "deep": models["deep"]}, K)
    summary = compare_summary(table).set_index("model")
    assert np.isnan(summary.loc["small", "bottleneck_depth"])
    text = render_compare(table, compare_summary(table), K)
    assert "- Bottleneck layers: small: none; deep at layer 7 of 10 (depth 0.70)." in text
