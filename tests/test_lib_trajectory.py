"""Trajectory math: best-match drift against naive similarities, the test against step 0."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from conftest import haar_bases

from weight_geometry.multiplicity import FDR_Q
from weight_geometry.similarity import similarity
from weight_geometry.trajectory import (
    STATISTICS,
    appearances,
    best_match_similarity,
    drift_table,
    report_markdown,
    trajectory_table,
)


def test_best_match_against_naive_similarities():
    rng = np.random.default_rng(0)
    a = haar_bases(rng, (3, 4), 5, 40).astype(np.float32)
    b = haar_bases(rng, (3, 4), 5, 40).astype(np.float32)
    got = best_match_similarity(a, b)
    want = np.array([[max(similarity(a[layer, i].astype(float), b[layer, j].astype(float))
                          for j in range(4)) for i in range(4)] for layer in range(3)])
    assert np.allclose(got, want, atol=1e-6)


def test_drift_is_zero_at_the_first_step_and_grows_with_noise():
    rng = np.random.default_rng(1)
    start = haar_bases(rng, (2, 3), 4, 32)
    steps = [0, 10, 20]
    series = [start] + [np.stack([np.stack([np.linalg.qr((s + eps * rng.standard_normal(
        s.shape)).T)[0].T for s in layer]) for layer in start]) for eps in (0.1, 0.5)]
    series = [b.astype(np.float32) for b in series]
    drift = drift_table(steps, lambda i: series[i])
    assert list(drift.columns) == ["step", "layer", "head", "similarity_to_initial",
                                   "similarity_to_final"]
    at = drift.groupby("step")["similarity_to_initial"].mean()
    assert abs(1 - at[0]) < 1e-6
    assert 1 - at[0] < 1 - at[10] < 1 - at[20]
    assert np.allclose(drift[drift["step"] == 20]["similarity_to_final"], 1, atol=1e-6)


def layers_frame(n_layers: int, z_shift: float) -> pd.DataFrame:
    out = {"layer": np.arange(n_layers), "head": 0}
    for stat in STATISTICS:
        out[stat.column] = 0.1 + z_shift * 0.01
        for z in (stat.z_isotropic, stat.z_conditional):
            if z:
                out[z] = np.full(n_layers, z_shift)
    out["adjacent_z_conditional"] = np.array([z_shift, 0.0, 0.0, np.nan])[:n_layers]
    return pd.DataFrame(out)


def test_structure_appears_when_its_z_exceeds_step_zero():
    table = trajectory_table([0, 5, 9], [layers_frame(4, 0.0), layers_frame(4, 2.0),
                                         layers_frame(4, 8.0)])
    assert len(table) == 12
    first = table[table["step"] == 0]
    assert not first["alignment_exceeds_initial"].any()
    assert first["adjacent_similarity_p_vs_initial"].isna().all()
    z = table.loc[table["step"] == 9, "bottleneck_similarity_z_vs_initial"]
    assert np.allclose(z, 8 / math.sqrt(2))
    by_name = {a.statistic.column: a for a in appearances(table)}
    # z_diff = 2 / sqrt 2 (one-sided p 0.079) is not significant; 8 / sqrt 2 is.
    assert by_name["bottleneck_similarity"].first_step == 9
    assert by_name["adjacent_similarity"].first_step == 9
    assert by_name["adjacent_similarity"].layers_at_last == [0]
    assert by_name["alignment"].layers_at_last == [0, 1, 2, 3]
    assert FDR_Q == 0.05
    drift = pd.DataFrame({"step": [0, 5, 9], "layer": 0, "head": 0,
                          "similarity_to_initial": [1.0, 0.8, 0.5],
                          "similarity_to_final": [0.5, 0.7, 1.0]})
    text = report_markdown("run", 4, table, drift)
    assert "| Similarity to the bottleneck layer | 9 |" in text
    assert "| 9 | 0.5000 |" in text
