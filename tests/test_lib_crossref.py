"""crossref: layer_correlations against a direct detrend-and-shift computation (bottleneck
layer left out or kept), and layer_table column by column against direct formulas."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from weight_geometry.crossref import PAIRS, layer_correlations, layer_table
from weight_geometry.multiplicity import benjamini_hochberg
from weight_geometry.rowspace_nulls import similarity_null


def _detrended_r(x: np.ndarray, y: np.ndarray, t: np.ndarray) -> float:
    """Pearson r of the residuals of least-squares lines in t (numpy's polyfit)."""
    rx = x - np.polyval(np.polyfit(t, x, 1), t)
    ry = y - np.polyval(np.polyfit(t, y, 1), t)
    return stats.pearsonr(rx, ry)[0]


def test_correlations_leave_out_or_keep_the_bottleneck():
    rng = np.random.default_rng(3)
    n, b = 12, 4
    layers = pd.DataFrame({
        "layer": np.arange(n),
        "is_bottleneck": np.arange(n) == b,
        "mean_normalized_eff_rank": rng.normal(size=n),
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
            assert np.isclose(c.r, _detrended_r(rows[x].to_numpy(), rows[y].to_numpy(),
                                                rows["layer"].to_numpy(float)))
    # The self-similarity moves the correlation: leaving it out is visible.
    left_out = layer_correlations(layers)[2][1].r
    kept = layer_correlations(layers, keep_bottleneck=True)[2][1].r
    assert abs(left_out - kept) > 0.05


def test_a_shared_trend_is_no_correlation():
    """Two series that share only a trend in depth correlate strongly by Pearson's r, but not
    once detrended: the circular-shift p is large."""
    rng = np.random.default_rng(5)
    n = 30
    t = np.arange(n)
    layers = pd.DataFrame({"layer": t, "is_bottleneck": False,
                           "mean_normalized_eff_rank": 0.5 + 0.01 * t + 0.01 * rng.normal(size=n),
                           "bottleneck_similarity": 0.1 + 0.02 * t + 0.02 * rng.normal(size=n),
                           "alignment": rng.normal(size=n)})
    raw = stats.pearsonr(layers["mean_normalized_eff_rank"], layers["bottleneck_similarity"])
    assert raw[0] > 0.8 and raw[1] < 1e-6
    _, first = layer_correlations(layers)[0]
    assert abs(first.r) < 0.5 and first.p > 0.05


def test_layer_table_follows_its_docstring():
    """Every column of layer_table against direct formulas on shuffled hand-built inputs."""
    rng = np.random.default_rng(8)
    n, head, b, k, d, m = 7, 2, 5, 3, 16, 5
    chance = k / d
    std = np.sqrt(2 * (d - k) ** 2 / (d**2 * (d - 1) * (d + 2)))   # null std of sim
    # Three weight types with skewed ranks: the mean (12 + l) / 3 is not the median 2.
    ranks = pd.DataFrame([(layer, wt, shape, r) for layer in range(n)
                          for wt, shape, r in (("W_Q", "8x16", 1.0), ("W_K", "4x16", 2.0),
                                               ("W_V", "4x16", 9.0 + layer))],
                         columns=["layer_idx", "weight_type", "shape", "eff_rank"])
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
    bottleneck = pd.DataFrame([(h, layer, to_b[h][layer], 0.2, 0.05) for h in heads
                               for layer in range(n)],
                              columns=["head", "layer", "similarity", "conditional_mean",
                                       "conditional_std"])
    bottleneck = bottleneck.sample(frac=1, random_state=2).reset_index(drop=True)
    bottleneck["bottleneck_layer"] = b
    cols = ("alignment", "null_std", "z", "normalized", "conditional_chance",
            "conditional_ratio", "conditional_z", "conditional_normalized", "conditional_p")
    values = {(h, layer): rng.uniform(0.01, 0.5, size=len(cols))
              for h in heads for layer in range(n)}
    alignment = pd.DataFrame([(h, layer, *v) for (h, layer), v in values.items()],
                             columns=["head", "layer", *cols])
    alignment.insert(3, "ratio", alignment["alignment"] / chance)
    alignment = alignment.sample(frac=1, random_state=3).reset_index(drop=True)
    # Overlap moments: 2 KV heads (head 2 reads KV head 1), different per layer pair.
    t1 = rng.uniform(0.5, 2.0, size=(n, 2, n, 2))
    t1 = (t1 + t1.transpose(2, 3, 0, 1)) / 2
    overlaps = np.stack([t1, t1**2 / m])
    model = {"n_layers": n, "d_model": d, "d_head": m, "n_heads": 4, "n_kv_heads": 2}

    # Spectra (n, 4 heads, d_head = 5), descending; head 2's gap at k = 3 set per layer.
    spectra = np.sort(rng.uniform(1, 2, size=(n, 4, 5)), axis=-1)[..., ::-1].copy()
    gap = rng.uniform(0, 0.3, size=n)
    spectra[:, head, k] = spectra[:, head, k - 1] * (1 - gap)
    spectra[:, head, k + 1:] = np.minimum(spectra[:, head, k + 1:], spectra[:, head, [k]])

    table = layer_table(ranks, sims, best, bottleneck, alignment, spectra, head, k, model,
                        overlaps)

    layers = np.arange(n)
    assert list(table["layer"]) == list(layers)
    assert set(table["head"]) == {head}
    assert list(table["is_bottleneck"]) == [layer == b for layer in layers]
    np.testing.assert_allclose(table["relative_gap"], gap)
    at_d_head = layer_table(ranks, sims, best, bottleneck, alignment, spectra, head, 5, model,
                            overlaps)
    assert at_d_head["relative_gap"].isna().all()             # no sigma_k+1 at k = d_head
    np.testing.assert_allclose(table["mean_eff_rank"], (12.0 + layers) / 3)
    np.testing.assert_allclose(table["mean_normalized_eff_rank"],
                               (1.0 / 8 + 2.0 / 4 + (9.0 + layers) / 4) / 3)
    adjacent = np.array([sims[layer, layer + 1] for layer in range(n - 1)] + [np.nan])
    np.testing.assert_allclose(table["adjacent_similarity"], adjacent)
    np.testing.assert_allclose(table["adjacent_z"], (adjacent - chance) / std)
    c_mean, c_std = similarity_null(t1[layers[:-1], 1, layers[:-1] + 1, 1],
                                    t1[layers[:-1], 1, layers[:-1] + 1, 1] ** 2 / m, k, m)
    np.testing.assert_allclose(table["adjacent_conditional_mean"], np.append(c_mean, np.nan))
    np.testing.assert_allclose(table["adjacent_conditional_std"], np.append(c_std, np.nan))
    z_adjacent = (adjacent[:-1] - c_mean) / c_std
    np.testing.assert_allclose(table["adjacent_z_conditional"], np.append(z_adjacent, np.nan))
    # One-sided p under the moment-matched gamma (scipy), BH over the L - 1 pairs.
    shape = (c_mean / c_std) ** 2
    p = stats.gamma.sf(adjacent[:-1], shape, scale=c_mean / shape)
    np.testing.assert_allclose(table["adjacent_p"][:-1], p, atol=2e-3)
    np.testing.assert_allclose(table["adjacent_p_adjusted"],
                               benjamini_hochberg(table["adjacent_p"]))
    np.testing.assert_allclose(table["adjacent_best_match"],
                               [best[layer, layer + 1] for layer in range(n - 1)] + [np.nan])
    np.testing.assert_allclose(table["bottleneck_similarity"], to_b[head])
    np.testing.assert_allclose(table["bottleneck_z"], (to_b[head] - chance) / std)
    z_b = (to_b[head] - 0.2) / 0.05
    z_b[b] = np.nan                                    # the bottleneck itself is no test
    np.testing.assert_allclose(table["bottleneck_z_conditional"], z_b)
    np.testing.assert_allclose(table["bottleneck_conditional_mean"], 0.2)
    assert np.isnan(table["bottleneck_p"][b]) and table["bottleneck_p"].notna().sum() == n - 1
    mine = np.array([values[head, layer] for layer in layers])
    np.testing.assert_allclose(table["alignment"], mine[:, 0])
    np.testing.assert_allclose(table["alignment_ratio"], mine[:, 0] / chance)
    np.testing.assert_allclose(table["alignment_null_std"], mine[:, 1])
    np.testing.assert_allclose(table["alignment_z"], mine[:, 2])
    np.testing.assert_allclose(table["alignment_normalized"], mine[:, 3])
    for offset, column in enumerate(("alignment_conditional_chance",
                                     "alignment_conditional_ratio", "alignment_z_conditional",
                                     "alignment_conditional_normalized", "alignment_p")):
        np.testing.assert_allclose(table[column], mine[:, 4 + offset], err_msg=column)
    np.testing.assert_allclose(table["alignment_p_adjusted"], benjamini_hochberg(mine[:, 8]))
