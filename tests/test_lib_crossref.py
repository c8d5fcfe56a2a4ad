"""crossref.layer_correlations against scipy, with the bottleneck layer left out or kept."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from weight_geometry.crossref import PAIRS, layer_correlations


def test_correlations_leave_out_or_keep_the_bottleneck():
    rng = np.random.default_rng(3)
    n, b = 12, 4
    layers = pd.DataFrame({
        "is_bottleneck": np.arange(n) == b,
        "mean_eff_rank": rng.normal(size=n),
        "bottleneck_similarity": rng.uniform(0.02, 0.2, size=n),
        "alignment": rng.uniform(0.01, 0.05, size=n),
    })
    layers.loc[b, "bottleneck_similarity"] = 1.0      # the self-similarity, far off the rest
    others = layers.drop(index=b)
    for keep, data in ((False, None), (True, layers)):
        for (label, c), (x, y, expected_label) in zip(
                layer_correlations(layers, keep_bottleneck=keep), PAIRS, strict=True):
            assert label == expected_label
            rows = data if data is not None else (others if "bottleneck" in x + y else layers)
            assert c.n == len(rows)
            assert np.isclose(c.pearson, stats.pearsonr(rows[x], rows[y])[0])
            assert np.isclose(c.spearman, stats.spearmanr(rows[x], rows[y])[0])
    # The self-similarity moves the correlation: leaving it out is visible.
    left_out = layer_correlations(layers)[2][1].pearson
    kept = layer_correlations(layers, keep_bottleneck=True)[2][1].pearson
    assert abs(left_out - kept) > 0.05
