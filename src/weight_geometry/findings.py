"""The tested findings of one (model, k): every family of tests the report states, computed once
from a loaded :class:`results_io.Analysis`, with its multiplicity control.

Families (each BH-adjusted at :data:`multiplicity.FDR_Q` within itself; the report lists them
with their sizes):

- Experiment 1, primary head: adjacent-layer similarity against the row-space-conditional null
  (one-sided z per pair, from the layer table); every off-diagonal layer pair likewise; phase
  boundaries, the steps of the adjacent similarity tested as drops beyond the conditional null
  of a difference (:func:`multiplicity.step_drop_test`);
- head matching: same-index against random head orderings (permutation p per layer pair) and
  against the conditional null (layer-pair table);
- Experiment 2: similarity to the bottleneck per layer (layer table); the two trends
  (permutation p) together with the three cross-reference correlations (detrended,
  circular-shift p): one family of five;
- Experiment 3: alignment of every (layer, head) against the conditional null (two-sided), and
  of the primary head's layers (layer table); in a mixture-of-experts model, of every (layer,
  expert or router row, head) (:mod:`expert_alignment`);
- every head: the adjacent-layer similarity of every (head, layer) (heads table) and its
  similarity to the bottleneck (bottleneck table).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .crossref import PAIRS, layer_correlations
from .multiplicity import (
    FDR_Q,
    DetrendedCorrelation,
    FamilyCounts,
    benjamini_hochberg,
    count_family,
    null_test,
    step_drop_test,
)
from .results_io import Analysis
from .rowspace_nulls import one_head_null
from .statistics import (
    Correlation,
    adjacent,
    bottleneck_trends,
    distant,
    off_diagonal,
    overlap_summary,
)

#: The family of Experiment 2's trends and the cross-reference's correlations.
DEPTH_FAMILY = "Trends and correlations across depth"
#: The family of the per-expert alignment (mixture-of-experts models).
EXPERT_FAMILY = ("Alignment per expert vs conditional null (every layer, expert or router row"
                 " and head)")


@dataclass
class Findings:
    """What the report's sections and verdicts read (module docstring)."""

    overlap: dict[str, float]             # statistics.overlap_summary of the primary head
    conditional_mean: np.ndarray          # (L, L) conditional null of the primary head
    conditional_std: np.ndarray
    conditional_summary: dict[str, float]  # off-diagonal / adjacent / distant null means
    conditional_ratio: dict[str, float]   # their observed means over them (tested pairs)
    adjacent: FamilyCounts
    pairs: FamilyCounts                   # every off-diagonal layer pair, primary head
    boundaries: pd.DataFrame              # significant drops only, largest first
    n_steps: int
    identity: list[tuple[int, int]]       # layer pairs whose head identities persist
    same_index: FamilyCounts              # same-index vs the conditional null, all heads
    bottleneck: FamilyCounts | None
    trends: tuple[Correlation, Correlation] | None
    correlations: list[tuple[str, DetrendedCorrelation]]
    depth_adjusted: dict[str, float]      # BH over the trends and correlations, by name
    alignment_heads: FamilyCounts         # every (layer, head)
    alignment_layers: FamilyCounts        # primary head
    heads_adjacent: FamilyCounts          # every (head, layer) adjacent pair
    heads_bottleneck: FamilyCounts | None  # every (head, layer) similarity to the bottleneck
    alignment_experts: FamilyCounts | None = None  # every (layer, unit, head); None: no experts

    def families(self) -> list[tuple[str, int]]:
        """(family, number of tests) of every family the report ran."""
        rows = [("Adjacent layer pairs vs conditional null (primary head)", self.adjacent.n_tests),
                ("All layer pairs vs conditional null (primary head)", self.pairs.n_tests),
                ("Phase boundaries (drops of adjacent similarity)", self.n_steps),
                ("Head identities (same-index vs random head orderings)",
                 self.same_index.n_tests),
                ("Same-index vs conditional null (all heads)", self.same_index.n_tests),
                ("Adjacent layer pairs vs conditional null (every head)",
                 self.heads_adjacent.n_tests),
                ("Alignment vs conditional null (every layer and head)",
                 self.alignment_heads.n_tests),
                ("Alignment vs conditional null (primary head)", self.alignment_layers.n_tests),
                (DEPTH_FAMILY, int(np.isfinite(list(self.depth_adjusted.values())).sum()))]
        if self.alignment_experts is not None:
            rows.append((EXPERT_FAMILY, self.alignment_experts.n_tests))
        if self.bottleneck is not None:
            rows[6:6] = [("Similarity to the bottleneck vs conditional null (primary head)",
                          self.bottleneck.n_tests),
                         ("Similarity to the bottleneck vs conditional null (every head)",
                          self.heads_bottleneck.n_tests)]
        return rows


def _upper_triangle_test(values: np.ndarray, mean: np.ndarray, std: np.ndarray) -> FamilyCounts:
    a, b = np.triu_indices(len(values), 1)
    z, p = null_test(values[a, b], mean[a, b], std[a, b])
    return count_family(values[a, b], mean[a, b], z, benjamini_hochberg(p))


def phase_boundaries(sims: np.ndarray, std: np.ndarray) -> tuple[pd.DataFrame, int]:
    """Significant drops of the adjacent-layer similarity (step ``t``: pair (t, t+1) to (t+1,
    t+2), a boundary between layers t+1 and t+2), tested against the conditional null of a
    difference with the pairs' conditional stds, BH over the ``L - 2`` steps; the table (rank
    from 1, largest drop first) and the number of steps tested."""
    values = adjacent(sims)
    z, p = step_drop_test(values, adjacent(std))
    adjusted = benjamini_hochberg(p)
    keep = np.flatnonzero(adjusted <= FDR_Q)
    keep = keep[np.argsort(z[keep], kind="stable")]
    return pd.DataFrame({
        "rank": np.arange(1, len(keep) + 1),
        "boundary": [f"{t + 1}→{t + 2}" for t in keep],
        "adjacent_similarity": values[keep + 1],
        "change": np.diff(values)[keep],
        "z": z[keep],
        "p_adjusted": adjusted[keep],
    }), int(np.isfinite(p).sum())


def tested_means(values: np.ndarray, null: np.ndarray) -> tuple[float, float]:
    """The mean of ``values`` and of their conditional ``null`` means over the entries that
    have a null (a NaN null leaves a pair out of every test: Gemma 4's layers that read the
    same keys, :func:`rowspace_nulls.one_head_null`); NaN for none. Cost O(n)."""
    ok = np.isfinite(null)
    return (float(values[ok].mean()), float(null[ok].mean())) if ok.any() else (
        float("nan"), float("nan"))


def _family(table: pd.DataFrame, value: str, null: str, z: str, p_adjusted: str) -> FamilyCounts:
    """:func:`multiplicity.count_family` of four columns of a table."""
    return count_family(*(table[c] for c in (value, null, z, p_adjusted)))


def compute_findings(a: Analysis) -> Findings:
    """Every family of the module docstring from ``a``. Cost O(L^2 h^2) (the conditional null
    of the primary head and the tables' columns) plus the trends' permutations."""
    k, head = a.k, a.primary_head
    sims = a.similarity[head]
    mean, std = one_head_null(a.overlaps, k, a.model, head)
    layers, pairs = a.layers, a.layer_pairs
    boundaries, n_steps = phase_boundaries(sims, std)
    persistent = pairs[(pairs["p_pairing_adjusted"] <= FDR_Q)
                       & (pairs["z_same_index_vs_pairing"] > 0)]
    if a.has_bottleneck:
        trends = bottleneck_trends(layers["bottleneck_similarity"].to_numpy(), a.bottleneck_layer)
        correlations = layer_correlations(layers)
        depth_p = {"Pre-bottleneck trend": trends[0].pearson_p,
                   "Post-bottleneck trend": trends[1].pearson_p}
    else:   # nothing to correlate with a similarity to no layer
        trends, depth_p = None, {}
        correlations = [(label, c) for (x, y, _), (label, c) in
                        zip(PAIRS, layer_correlations(layers), strict=True)
                        if "bottleneck_similarity" not in (x, y)]
    depth_p.update({label: c.p for label, c in correlations})
    adjusted = benjamini_hochberg(np.array(list(depth_p.values()), dtype=float))
    tested = {name: tested_means(part(sims), part(mean)) for name, part in
              (("off_diagonal_mean", off_diagonal), ("adjacent_mean", adjacent),
               ("distant_mean", distant))}
    return Findings(
        overlap=overlap_summary(sims),
        conditional_mean=mean, conditional_std=std,
        conditional_summary={name: null for name, (_, null) in tested.items()},
        conditional_ratio={name: value / null for name, (value, null) in tested.items()},
        adjacent=_family(layers, "adjacent_similarity", "adjacent_conditional_mean",
                         "adjacent_z_conditional", "adjacent_p_adjusted"),
        pairs=_upper_triangle_test(sims, mean, std),
        boundaries=boundaries, n_steps=n_steps,
        identity=list(zip(persistent["layer_a"], persistent["layer_b"], strict=True)),
        same_index=_family(pairs, "same_index", "conditional_mean", "z_conditional",
                           "p_conditional_adjusted"),
        bottleneck=(_family(layers, "bottleneck_similarity", "bottleneck_conditional_mean",
                            "bottleneck_z_conditional", "bottleneck_p_adjusted")
                    if a.has_bottleneck else None),
        trends=trends, correlations=correlations,
        depth_adjusted=dict(zip(depth_p, adjusted, strict=True)),
        alignment_heads=_family(a.alignment, "alignment", "conditional_chance", "conditional_z",
                                "conditional_p_adjusted"),
        alignment_layers=_family(layers, "alignment", "alignment_conditional_chance",
                                 "alignment_z_conditional", "alignment_p_adjusted"),
        heads_adjacent=_family(a.every_head, "adjacent_similarity", "conditional_mean",
                               "z_conditional", "p_conditional_adjusted"),
        heads_bottleneck=(_family(a.bottleneck, "similarity", "conditional_mean",
                                  "z_conditional", "p_conditional_adjusted")
                          if a.has_bottleneck else None),
        alignment_experts=(_family(a.alignment_experts, "alignment", "conditional_chance",
                                   "conditional_z", "conditional_p_adjusted")
                           if a.has_experts else None),
    )
