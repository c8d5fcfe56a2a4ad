"""A checkpoint series end to end: a tiny GPT-NeoX trained for real on the CPU, saved as the
Hugging Face Trainer saves (``checkpoint-<step>/``), analysed checkpoint by checkpoint and as a
trajectory; what adding or removing a checkpoint plans; hub revisions from an offline cache."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import (
    assert_ok,
    error_line,
    hub_cache,
    make_llama_checkpoint,
    run_snakemake,
)
from series_training import train_series
from test_incremental import planned

from weight_geometry.series import TRAJECTORY_FIGURES

pytestmark = pytest.mark.workflow

STEPS = [0, 80, 160, 240]
N_LAYERS = 4


@pytest.fixture(scope="module")
def series_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("series")
    losses = train_series(root / "train", steps=240, save_every=40, lr=1e-3)
    assert losses[-1] < losses[0] / 2, losses  # it learned the task
    folder = root / "series"
    folder.mkdir()
    for step in STEPS:
        shutil.move(root / "train" / f"checkpoint-{step}", folder)
    config = {"models": {"run": {"source": str(folder)},
                         "plain": {"source": str(make_llama_checkpoint(root / "plain"))}},
              "top_k": 4, "heads": [0], "device": "cpu"}
    workdir = root / "run"
    assert_ok(run_snakemake(workdir, config=config))
    return workdir, config, root


def test_each_checkpoint_and_the_trajectory_are_written(series_run):
    workdir, *_ = series_run
    for step in STEPS:
        assert (workdir / f"results/run/step{step}/k4/report.md").is_file()
        assert (workdir / f"logs/run/step{step}/model_info.log").is_file()
    tdir = workdir / "results/run/trajectory/k4"
    for name in TRAJECTORY_FIGURES:
        assert (tdir / f"figures/{name}.png").stat().st_size > 0, name
    table = pd.read_parquet(tdir / "trajectory.parquet")
    assert sorted(zip(table["step"], table["layer"], strict=True)) == [
        (s, layer) for s in STEPS for layer in range(N_LAYERS)]
    for step in STEPS:
        layers = pd.read_parquet(workdir / f"results/run/step{step}/k4/layers.parquet")
        rows = table[table["step"] == step].sort_values("layer")
        assert np.allclose(rows["adjacent_similarity"], layers["adjacent_similarity"],
                           equal_nan=True)
    first = table[table["step"] == 0]
    assert not first["adjacent_similarity_exceeds_initial"].any()
    assert np.allclose(first["alignment_minus_initial"], 0)
    report = (tdir / "report.md").read_text()
    assert "## When each structure appears" in report
    assert "Step 0 is the empirical null" in report


def test_drift_is_zero_at_step_zero_and_grows_with_the_step(series_run):
    workdir, *_ = series_run
    drift = pd.read_parquet(workdir / "results/run/trajectory/k4/drift.parquet")
    assert list(drift.columns) == ["step", "layer", "head", "similarity_to_initial",
                                   "similarity_to_final"]
    assert len(drift) == len(STEPS) * N_LAYERS * 4
    from_initial = 1 - drift.groupby("step")["similarity_to_initial"].mean()
    assert abs(from_initial[0]) < 1e-5
    assert np.all(np.diff(from_initial.to_numpy()) > 0), from_initial
    to_final = drift.groupby("step")["similarity_to_final"].mean()
    assert abs(to_final[240] - 1) < 1e-5 and np.all(np.diff(to_final.to_numpy()) > 0)


def test_comparison_takes_each_series_last_checkpoint(series_run):
    workdir, *_ = series_run
    table = pd.read_parquet(workdir / "results/compare/k4/models.parquet")
    assert set(table["model"]) == {"plain", "run/step240"}


def test_adding_a_checkpoint_plans_only_its_jobs_and_the_summary(series_run):
    workdir, config, root = series_run
    added = root / "series" / "checkpoint-120"
    shutil.move(root / "train" / "checkpoint-120", added)
    try:
        jobs = planned(run_snakemake(workdir, "-n", config=config))
    finally:
        shutil.move(added, root / "train")
    rules = {rule for rule, _ in jobs}
    assert "extract_layers" in rules and "trajectory" in rules
    for rule, outputs in jobs:
        if rule == "trajectory":
            assert all(o.startswith("results/run/trajectory/k4/") for o in outputs), outputs
        else:
            assert all(o.startswith("results/run/step120/") for o in outputs), (rule, outputs)


def test_removing_a_checkpoint_plans_only_the_summary(series_run):
    workdir, config, root = series_run
    removed = root / "series" / "checkpoint-80"
    shutil.move(removed, root)
    try:
        jobs = planned(run_snakemake(workdir, "-n", config=config))
    finally:
        shutil.move(root / "checkpoint-80", removed)
    assert [rule for rule, _ in jobs] == ["trajectory"]


def test_hub_revisions_resolve_offline_from_the_cache(series_run, tmp_path):
    _, _, root = series_run
    hf = tmp_path / "hf"
    commits = {}
    for i, step in enumerate(STEPS[:3]):
        files = {name: (root / "series" / f"checkpoint-{step}" / name).read_bytes()
                 for name in ("config.json", "model.safetensors")}
        commits[step] = f"{i + 1}" * 40
        repo = hf / "hub" / "models--acme--tiny-neox"
        if i == 0:
            hub_cache(hf, "acme/tiny-neox", files, commit=commits[step])
        else:
            snapshot = repo / "snapshots" / commits[step]
            snapshot.mkdir(parents=True)
            for name, data in files.items():
                (snapshot / name).write_bytes(data)
        (repo / "refs" / f"step{step}").write_text(commits[step])
    env = {"HF_HOME": str(hf), "HF_HUB_OFFLINE": "1"}
    config = {"models": {"pythia": {"source": "acme/tiny-neox",
                                    "revisions": ["step0", "step80", "step160"]}},
              "top_k": 4, "heads": [0], "device": "cpu"}
    jobs = planned(run_snakemake(tmp_path / "run", "-n", config=config, env=env))
    downloads = sorted(o for rule, outs in jobs if rule == "download_model" for o in outs)
    assert downloads == [f"resources/hub/pythia/step{s}.json" for s in (0, 160, 80)]
    assert any(rule == "trajectory" for rule, _ in jobs)
    missing = {**config, "models": {"pythia": {"source": "acme/tiny-neox",
                                               "revisions": ["step0", "step999"]}}}
    line = error_line(run_snakemake(tmp_path / "run", "-n", config=missing, env=env))
    assert "models.pythia: step 999" in line and "revision 'step999'" in line, line
