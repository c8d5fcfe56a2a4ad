"""crossref: layer_correlations against scipy (bottleneck layer left out or kept), and
layer_table column by column against direct formulas."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from weight_geometry.crossref import PAIRS, layer_correlations, layer_table


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


def test_layer_table_follows_its_docstring():
    """Every column of layer_table against direct formulas on shuffled hand-built inputs."""
    rng = np.random.default_rng(8)
    n, head, b, k, d = 7, 2, 5, 3, 16
    chance = k / d
    std = np.sqrt(2 * (d - k) ** 2 / (d**2 * (d - 1) * (d + 2)))   # null std of sim
    # Three weight types with skewed ranks: the mean (12 + l) / 3 is not the median 2.
    ranks = pd.DataFrame([(layer, wt, r) for layer in range(n)
                          for wt, r in (("W_Q", 1.0), ("W_K", 2.0), ("W_V", 9.0 + layer))],
                         columns=["layer_idx", "weight_type", "eff_rank"])
    ranks = ranks.sample(frac=1, random_state=1).reset_index(drop=True)
    sims = rng.uniform(0.1, 0.9, size=(n, n))
    sims = (sims + sims.T) / 2
    np.fill_diagonal(sims, 1.0)
    best = rng.uniform(0.2, 0.9, size=(n, n))          # best match is not symmetric
    np.fill_diagonal(best, 1.0)
    heads = range(4)
    to_b = {h: rng.uniform(0.05, 0.6, size=n) for h in heads}
    for h in heads:
        to_b[h][b] = 1.0
    bottleneck = pd.DataFrame([(h, layer, to_b[h][layer]) for h in heads for layer in range(n)],
                              columns=["head", "layer", "similarity"])
    bottleneck = bottleneck.sample(frac=1, random_state=2).reset_index(drop=True)
    bottleneck["bottleneck_layer"] = b
    cols = ("alignment", "null_std", "z", "normalized")
    values = {(h, layer): rng.uniform(0.01, 0.5, size=len(cols))
              for h in heads for layer in range(n)}
    alignment = pd.DataFrame([(h, layer, *v) for (h, layer), v in values.items()],
                             columns=["head", "layer", *cols])
    alignment.insert(3, "ratio", alignment["alignment"] / chance)
    alignment = alignment.sample(frac=1, random_state=3).reset_index(drop=True)

    # Spectra (n, 4 heads, d_head = 5), descending; head 2's gap at k = 3 set per layer.
    spectra = np.sort(rng.uniform(1, 2, size=(n, 4, 5)), axis=-1)[..., ::-1].copy()
    gap = rng.uniform(0, 0.3, size=n)
    spectra[:, head, k] = spectra[:, head, k - 1] * (1 - gap)
    spectra[:, head, k + 1:] = np.minimum(spectra[:, head, k + 1:], spectra[:, head, [k]])

    table = layer_table(ranks, sims, best, bottleneck, alignment, spectra, head, k, d)

    layers = np.arange(n)
    assert list(table["layer"]) == list(layers)
    assert set(table["head"]) == {head}
    assert list(table["is_bottleneck"]) == [layer == b for layer in layers]
    np.testing.assert_allclose(table["relative_gap"], gap)
    at_d_head = layer_table(ranks, sims, best, bottleneck, alignment, spectra, head, 5, d)
    assert at_d_head["relative_gap"].isna().all()             # no sigma_k+1 at k = d_head
    np.testing.assert_allclose(table["mean_eff_rank"], (12.0 + layers) / 3)
    adjacent = np.array([sims[layer, layer + 1] for layer in range(n - 1)] + [np.nan])
    np.testing.assert_allclose(table["adjacent_similarity"], adjacent)
    np.testing.assert_allclose(table["adjacent_z"], (adjacent - chance) / std)
    np.testing.assert_allclose(table["adjacent_best_match"],
                               [best[layer, layer + 1] for layer in range(n - 1)] + [np.nan])
    np.testing.assert_allclose(table["bottleneck_similarity"], to_b[head])
    np.testing.assert_allclose(table["bottleneck_z"], (to_b[head] - chance) / std)
    mine = np.array([values[head, layer] for layer in layers])
    np.testing.assert_allclose(table["alignment"], mine[:, 0])
    np.testing.assert_allclose(table["alignment_ratio"], mine[:, 0] / chance)
    np.testing.assert_allclose(table["alignment_null_std"], mine[:, 1])
    np.testing.assert_allclose(table["alignment_z"], mine[:, 2])
    np.testing.assert_allclose(table["alignment_normalized"], mine[:, 3])
