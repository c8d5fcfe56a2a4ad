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

from .multiplicity import benjamini_hochberg, null_test
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


#: Robust z (median minus the layer's value over 1.4826 MAD of the interior profile) at
#: which a layer's low effective rank stands out as a bottleneck (Iglewicz and Hoaglin's
#: outlier rule for a modified z-score).
BOTTLENECK_ROBUST_Z = 3.5
#: Fewest interior layers (all but the first and the last) the robust rule needs.
MIN_PROFILE_LAYERS = 5


def bottleneck_profile(weight_ranks: pd.DataFrame) -> pd.Series:
    """Per layer (index), the mean normalized effective rank ``eff_rank / min(rows, cols)``
    (:func:`ranks.normalized_eff_rank`) of W_Q and W_K: the profile ``auto`` reads."""
    qk = weight_ranks[weight_ranks["weight_type"].isin(["W_Q", "W_K"])]
    return normalized_eff_rank(qk).groupby(qk["layer_idx"]).mean().sort_index()


@dataclass(frozen=True)
class BottleneckChoice:
    """The ``auto`` rule's outcome: the interior layer of lowest profile, its robust z, and
    whether it stands out (``layer`` is then the bottleneck; else there is none)."""

    layer: int
    robust_z: float
    stands_out: bool
    n_profile: int

    def text(self) -> str:
        if self.n_profile < MIN_PROFILE_LAYERS:
            return (f"auto: no bottleneck (the rule needs at least {MIN_PROFILE_LAYERS} layers"
                    f" besides the first and the last, this model has {self.n_profile})")
        verdict = "stands out" if self.stands_out else "does not stand out"
        return (f"auto: layer {self.layer} has the lowest mean normalized effective rank of"
                f" W_Q and W_K among layers 1 .. L-2 and {verdict} from that profile (robust"
                f" z = {self.robust_z:.1f}, threshold {BOTTLENECK_ROBUST_Z})")


def choose_bottleneck(weight_ranks: pd.DataFrame) -> BottleneckChoice:
    """The ``auto`` bottleneck: among layers ``1 .. L-2`` (the first and last layers, whose
    projections are shaped by the embeddings and the unembedding, are left out), the layer of
    lowest :func:`bottleneck_profile`; it is a bottleneck only if it stands out from that
    profile: ``(median - value) / (1.4826 MAD) >=`` :data:`BOTTLENECK_ROBUST_Z`. Cost O(L)."""
    profile = bottleneck_profile(weight_ranks)
    interior = profile.iloc[1:-1]
    if len(interior) < MIN_PROFILE_LAYERS:
        return BottleneckChoice(-1, float("nan"), False, len(interior))
    values = interior.to_numpy()
    median = np.median(values)
    mad = 1.4826 * np.median(np.abs(values - median))
    layer = int(interior.idxmin())
    with np.errstate(divide="ignore", invalid="ignore"):
        robust_z = float((median - interior.min()) / mad) if mad > 0 else (
            float("inf") if interior.min() < median else 0.0)
    return BottleneckChoice(layer, robust_z, robust_z >= BOTTLENECK_ROBUST_Z, len(interior))


#: ``bottleneck_layer`` of a bottleneck table without a bottleneck (``auto`` found none).
NO_BOTTLENECK = -1


def bottleneck_table(sims_by_head: dict[int, np.ndarray], weight_ranks: pd.DataFrame,
                     choice: int | str, null_by_head: dict[int, tuple[np.ndarray, np.ndarray]]
                     ) -> pd.DataFrame:
    """Long table (head, layer, similarity, conditional_mean, conditional_std, z_conditional,
    p_conditional, p_conditional_adjusted) of ``sims[b, l]`` for each head, with its
    row-space-conditional null (``null_by_head[head]``: the ``(L, L)`` mean and std of
    :func:`rowspace_nulls.similarity_null` for that head) and the one-sided test against it
    (:func:`multiplicity.gamma_p`, BH over every (head, layer) but the bottleneck itself), the
    bottleneck layer ``b`` and how it was chosen (configured, or ``auto`` by
    :func:`choose_bottleneck`). Without a bottleneck (``auto`` found none) ``b`` is
    :data:`NO_BOTTLENECK` and the values are NaN."""
    if choice == "auto":
        auto = choose_bottleneck(weight_ranks)
        layer, how = (auto.layer if auto.stands_out else NO_BOTTLENECK), auto.text()
    else:
        layer, how = int(choice), "set in the config"

    def to_bottleneck(matrix: np.ndarray) -> np.ndarray:
        return matrix[layer] if layer != NO_BOTTLENECK else np.full(len(matrix), np.nan)

    frames = []
    for head, sims in sorted(sims_by_head.items()):
        mean, std = null_by_head[head]
        frames.append(pd.DataFrame({"head": head, "layer": np.arange(len(sims)),
                                    "similarity": to_bottleneck(sims),
                                    "conditional_mean": to_bottleneck(mean),
                                    "conditional_std": to_bottleneck(std)}))
    table = pd.concat(frames, ignore_index=True)
    # the bottleneck's similarity to itself is no test
    z, p = null_test(table["similarity"].where(table["layer"] != layer),
                     table["conditional_mean"], table["conditional_std"])
    table["z_conditional"], table["p_conditional"] = z, p
    table["p_conditional_adjusted"] = benjamini_hochberg(table["p_conditional"])
    table["bottleneck_layer"] = layer
    table["bottleneck_choice"] = how
    return table
