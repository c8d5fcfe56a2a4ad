"""Several models in one run: the cross-model comparison, effective ranks supplied as the
earlier notebook's CSV, and Snakemake's own report of the results (adding a model: see
test_incremental.py)."""

from __future__ import annotations

import zipfile

import numpy as np
import pandas as pd
import pytest
from conftest import assert_ok, error_line, make_llama_checkpoint, run_snakemake

from weight_geometry.compare import COMPARE_FIGURES
from weight_geometry.figure_names import FIGURES

pytestmark = pytest.mark.workflow


def notebook_csv(ranks: pd.DataFrame, path):
    """The earlier notebook's CSV of these ranks, with shapes written cols x rows and rows
    shuffled, as another tool might."""
    flipped = ranks.assign(shape=ranks["shape"].str.split("x").str[::-1].str.join("x"))
    flipped.sample(frac=1, random_state=0).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    four = make_llama_checkpoint(root / "four", seed=1)
    six = make_llama_checkpoint(root / "six", seed=2, num_hidden_layers=6)
    # Ranks for "six" from a first run, handed back as the user's CSV with a visible mark.
    first = root / "first"
    assert_ok(run_snakemake(first, "results/six/effective_ranks.parquet", config={
        "models": {"six": {"source": str(six)}}, "device": "cpu"}))
    ranks = pd.read_parquet(first / "results/six/effective_ranks.parquet")
    ranks = ranks.drop(columns="source").assign(eff_rank=ranks["eff_rank"].round(3))
    csv = notebook_csv(ranks, root / "six_ranks.csv")
    config = {"models": {"four": {"source": str(four)},
                         "six": {"source": str(six), "effective_ranks": str(csv)}},
              "top_k": 4, "heads": [0, 3], "device": "cpu"}
    workdir = root / "run"
    assert_ok(run_snakemake(workdir, config=config))
    return workdir, config, ranks, root


def test_comparison_outputs(two_models):
    workdir, *_ = two_models
    cdir = workdir / "results/compare/k4"
    for name in ["models.parquet", "models.csv", "summary.csv", "report.md",
                 *(f"figures/{f}.png" for f in COMPARE_FIGURES)]:
        assert (cdir / name).is_file() and (cdir / name).stat().st_size > 0, name
    table = pd.read_parquet(cdir / "models.parquet")
    for name, n_layers in [("four", 4), ("six", 6)]:
        rows = table[table["model"] == name].sort_values("layer")
        layers = pd.read_parquet(workdir / f"results/{name}/k4/layers.parquet")
        assert rows["layer"].tolist() == list(range(n_layers))
        assert np.allclose(rows["depth"], np.arange(n_layers) / n_layers)
        for column in ("adjacent_similarity", "bottleneck_similarity", "alignment_ratio",
                       "alignment_conditional_ratio", "mean_eff_rank",
                       "mean_normalized_eff_rank"):
            assert np.allclose(rows[column], layers[column], equal_nan=True), (name, column)
    report = (cdir / "report.md").read_text()
    assert "four" in report and "six" in report
    assert all(f"figures/{f}.png" in report for f in COMPARE_FIGURES)


def test_user_ranks_replace_computed_ones(two_models):
    workdir, _, ranks, _ = two_models
    used = pd.read_parquet(workdir / "results/six/effective_ranks.parquet")
    assert used["source"].str.startswith("user CSV").all()
    merged = used.merge(ranks, on=["layer_idx", "weight_type"], suffixes=("", "_csv"))
    assert len(merged) == len(ranks) == 6 * 7
    assert (merged["shape"] == merged["shape_csv"]).all(), "shapes back in rows x cols"
    assert np.array_equal(merged["eff_rank"], merged["eff_rank_csv"])
    # Extraction skipped the ranks it was given: its per-range table is empty.
    assert pd.read_parquet(workdir / "results/six/bases/layers000-005/weight_ranks.parquet").empty
    computed = pd.read_parquet(workdir / "results/four/effective_ranks.parquet")
    assert (computed["source"] == "computed from the weights").all()
    assert "user CSV" in (workdir / "results/six/k4/report.md").read_text()


def test_csv_of_another_model_is_refused(two_models, tmp_path):
    _, config, ranks, _ = two_models
    csv = notebook_csv(ranks[ranks["layer_idx"] < 4], tmp_path / "other.csv")
    models = {"six": {**config["models"]["six"], "effective_ranks": str(csv)}}
    # A real run, not a dry one: no results/ then means that no job started.
    line = error_line(run_snakemake(tmp_path / "w", config={**config, "models": models}))
    assert "models.six.effective_ranks" in line and "other.csv" in line
    assert not (tmp_path / "w" / "results").exists()


@pytest.mark.parametrize("name", ["report.zip", "report.html"])
def test_snakemake_report(two_models, name):
    workdir, config, _, _ = two_models
    assert_ok(run_snakemake(workdir, "--report", name, config=config))
    path = workdir / name
    assert path.is_file() and path.stat().st_size > 10_000
    if name.endswith(".zip"):
        names = zipfile.ZipFile(path).namelist()
        for expected in [*(f"{f}.png" for f in FIGURES), *(f"{f}.png" for f in COMPARE_FIGURES),
                         "ksweep.png", "layer_pairs.csv", "ksweep.csv", "models.csv",
                         "effective_ranks.csv", "report.md"]:
            assert any(n.endswith("/" + expected) for n in names), expected
    else:
        html = path.read_text(errors="replace")
        for text in ("four", "six", "Comparison", "Head matching", "k-sensitivity"):
            assert text in html, text



def test_head_of_another_model_has_no_rule(tmp_path):
    """Heads are planned per model: a head that only the larger model has (7 of 8), asked of
    the smaller one by name, plans nothing (a union of the models' heads used to run a job
    for it that failed with a traceback); the larger model plans it."""
    config = {"models": {
        "four": {"source": str(make_llama_checkpoint(tmp_path / "four"))},
        "eight": {"source": str(make_llama_checkpoint(
            tmp_path / "eight", num_attention_heads=8, head_dim=16))}},
        "top_k": 4, "device": "cpu"}
    refused = "results/four/k4/similarity_head7.npy"
    proc = run_snakemake(tmp_path / "run", "-n", refused, config=config)
    assert proc.returncode != 0 and f"No rule to produce {refused}" in proc.stdout + proc.stderr
    planned = run_snakemake(tmp_path / "run", "-n", refused.replace("four", "eight"),
                            config=config)
    assert_ok(planned)
    assert "similarity_matrix" in planned.stdout
