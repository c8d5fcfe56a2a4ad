"""Summary statistics of the experiments: overlap structure, trends, correlations (the
report's verdicts on them: :mod:`verdicts`).

Correlations with fewer than 3 points are undefined (NaN, flagged), never +-1. Pearson's r and
Spearman's rho each come with a two-sided permutation p-value,
``(1 + #{|r_perm| >= |r|}) / (1 + n_perm)``, from the same permutations of a fixed seed so
reports are reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .ranks import normalized_eff_rank

MIN_POINTS = 3
#: Permutations behind each correlation's p-values (:func:`correlate`).
CORRELATION_PERMUTATIONS = 10_000
DISTANCES = (1, 2, 3, 5, 10, 15, 20)


def off_diagonal(sims: np.ndarray) -> np.ndarray:
    """The ``L (L - 1)`` entries ``sims[i, j]``, ``i != j`` (both triangles), row by row."""
    return sims[~np.eye(len(sims), dtype=bool)]


def adjacent(sims: np.ndarray) -> np.ndarray:
    """``sims[l, l+1]`` for l = 0 .. L-2."""
    return np.diagonal(sims, offset=1).copy()


def distant_threshold(n_layers: int) -> int:
    """Layers more than ``L // 3`` apart are distant (the notebook's rule)."""
    return n_layers // 3


def distant(sims: np.ndarray) -> np.ndarray:
    """Entries with ``|i - j| >`` :func:`distant_threshold` (both triangles, as the notebook)."""
    n = len(sims)
    i, j = np.indices((n, n))
    return sims[np.abs(i - j) > distant_threshold(n)]


def overlap_summary(sims: np.ndarray) -> dict[str, float]:
    """Experiment 1 statistics of an ``(L, L)`` similarity matrix. Cost O(L^2)."""
    off, adj, far = off_diagonal(sims), adjacent(sims), distant(sims)
    nan = float("nan")
    return {
        "off_diagonal_mean": off.mean(), "off_diagonal_std": off.std(),
        "off_diagonal_min": off.min(), "off_diagonal_max": off.max(),
        "adjacent_mean": adj.mean(), "adjacent_std": adj.std(),
        "distant_mean": far.mean() if far.size else nan,
        "distant_std": far.std() if far.size else nan,
        "adjacent_minus_distant": adj.mean() - far.mean() if far.size else nan,
        "distant_threshold": distant_threshold(len(sims)),
    }


def phase_boundaries(sims: np.ndarray, n: int = 10) -> pd.DataFrame:
    """The ``n`` most negative steps of the adjacent-similarity sequence (fewer if fewer steps
    are negative).

    Step ``t`` goes from pair (t, t+1) to pair (t+1, t+2); a large drop marks a boundary
    between layers t+1 and t+2.
    """
    adj = adjacent(sims)
    steps = np.diff(adj)
    order = np.argsort(steps, kind="stable")[:n]
    order = order[steps[order] < 0]      # a rise is no boundary (the notebook listed rises too)
    return pd.DataFrame({
        "rank": np.arange(len(order)),
        "boundary": [f"{t + 1}→{t + 2}" for t in order],
        "adjacent_similarity": adj[order + 1],
        "change": steps[order],
    })


def similarity_by_distance(sims: np.ndarray) -> pd.DataFrame:
    """Mean, std and count of ``sims[i, i + dist]`` for the notebook's distances (< L)."""
    n = len(sims)
    rows = []
    for dist in sorted({*DISTANCES, n // 2}):
        if 0 < dist < n:
            vals = np.diagonal(sims, offset=dist)
            rows.append((dist, vals.mean(), vals.std(), len(vals)))
    return pd.DataFrame(rows, columns=["distance", "mean", "std", "n_pairs"])


@dataclass(frozen=True)
class Correlation:
    """Pearson r, Spearman rho and their permutation p-values; all NaN when ``n < 3``."""

    n: int
    pearson: float
    spearman: float
    spearman_p: float
    pearson_p: float

    @property
    def defined(self) -> bool:
        return self.n >= MIN_POINTS

    def text(self) -> str:
        if not self.defined:
            return f"undefined (n={self.n} < {MIN_POINTS})"
        return (f"r={self.pearson:+.3f} (perm. p={self.pearson_p:.3g}),"
                f" rho={self.spearman:+.3f} (perm. p={self.spearman_p:.3g}), n={self.n}")


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _permutation_p(x: np.ndarray, y: np.ndarray, r: float, perms: np.ndarray) -> float:
    """Two-sided p of Pearson ``r`` of ``(x, y)`` against ``y`` reordered by each row of
    ``perms`` ``(n_perm, n)``: ``(1 + #{|r_perm| >= |r|}) / (1 + n_perm)``. Cost O(n_perm n)."""
    if np.isnan(r):
        return float("nan")
    yp = y[perms]
    yc = yp - yp.mean(1, keepdims=True)
    xc = x - x.mean()
    null = (yc @ xc) / (np.linalg.norm(yc, axis=1) * np.linalg.norm(xc))
    return float((1 + np.sum(np.abs(null) >= abs(r) - 1e-12)) / (1 + len(perms)))


def correlate(x, y, n_perm: int = CORRELATION_PERMUTATIONS, seed: int = 0) -> Correlation:
    """Pearson and Spearman correlation of finite pairs, each with a permutation p-value.

    Both p-values use the same ``n_perm`` seeded permutations of the pairing. Spearman's rho is
    Pearson's r of the (average-tie) ranks. Cost O(n_perm n) time and memory for ``n`` finite
    pairs.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < MIN_POINTS:
        nan = float("nan")
        return Correlation(len(x), nan, nan, nan, nan)
    perms = np.random.default_rng(seed).permuted(np.tile(np.arange(len(x)), (n_perm, 1)), axis=1)
    rx = pd.Series(x).rank().to_numpy()
    ry = pd.Series(y).rank().to_numpy()
    r, rho = _pearson(x, y), _pearson(rx, ry)
    return Correlation(len(x), r, rho, _permutation_p(rx, ry, rho, perms),
                       _permutation_p(x, y, r, perms))


def bottleneck_trends(sims_to_ref: np.ndarray, bottleneck: int) -> tuple[Correlation, Correlation]:
    """Trend of similarity-to-bottleneck vs layer index before and after the bottleneck."""
    before = sims_to_ref[:bottleneck]
    after = sims_to_ref[bottleneck + 1:]
    return (correlate(np.arange(len(before)), before),
            correlate(np.arange(len(after)), after))


def choose_bottleneck(weight_ranks: pd.DataFrame) -> int:
    """Layer whose W_Q and W_K have the lowest mean normalized effective rank.

    Normalized effective rank = ``eff_rank / min(rows, cols)`` (:func:`ranks.normalized_eff_rank`).
    """
    qk = weight_ranks[weight_ranks["weight_type"].isin(["W_Q", "W_K"])]
    return int(normalized_eff_rank(qk).groupby(qk["layer_idx"]).mean().idxmin())


#: ``bottleneck_choice`` of a bottleneck chosen by :func:`choose_bottleneck`.
AUTO_BOTTLENECK = "auto: lowest mean normalized effective rank of W_Q and W_K"


def bottleneck_table(sims_by_head: dict[int, np.ndarray], weight_ranks: pd.DataFrame,
                     choice: int | str) -> pd.DataFrame:
    """Long table (head, layer, similarity) of ``sims[b, l]`` for each head, with the bottleneck
    layer ``b`` and how it was chosen (configured, or ``auto`` by :func:`choose_bottleneck`)."""
    if choice == "auto":
        layer, how = choose_bottleneck(weight_ranks), AUTO_BOTTLENECK
    else:
        layer, how = int(choice), "set in the config"
    frames = [pd.DataFrame({"head": head, "layer": np.arange(len(s)), "similarity": s[layer]})
              for head, s in sorted(sims_by_head.items())]
    table = pd.concat(frames, ignore_index=True)
    table["bottleneck_layer"] = layer
    table["bottleneck_choice"] = how
    return table
