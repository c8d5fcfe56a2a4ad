"""The report's Circuits section: which layers feed which, whether composition is local or
long-range, and where the strongest pairs are, each against its null; from the composition
tables (:mod:`composition`, k-independent) and the read/write overlap at k (:mod:`read_write`).

Families of tests it adds to the report's list (each BH-adjusted at :data:`multiplicity.FDR_Q`
within itself):

- per composition type, every ordered head pair against the row-space-conditional null of its
  squared score (one-sided; computed by the composition job, counted from its layer table); a
  pair counts as composing where it is also significant against the isotropic null
  (:func:`composition.composing_pairs`);
- per read side, every layer pair's mean read/write overlap against its conditional null
  (one-sided; computed by the read_write job);
- locality (:func:`locality_test`): per composition type, Spearman's rho between a layer
  pair's mean score and its distance ``l - e``, with a within-row permutation p: one family of
  three.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .composition import TYPES
from .hybrid import to_positions
from .multiplicity import FDR_Q, FamilyCounts, benjamini_hochberg, count_family
from .results_io import read_json
from .verdicts import AT_CHANCE

#: Within-row permutations of :func:`locality_test` (smallest p ``1 / (1 + n)``).
LOCALITY_PERMUTATIONS = 2000
#: Its seed.
LOCALITY_SEED = 0
#: Names of the composition types and read sides in the text.
TYPE_NAMES = {"q": "Q", "k": "K", "v": "V"}
SIDE_NAMES = {"q": "queries", "k": "keys", "v": "values"}
#: Layer pairs named per type in "which layers feed which".
LISTED_LAYER_PAIRS = 5
#: Head pairs in the strongest-pairs table.
TOP_ROWS = 10


@dataclass
class CircuitTables:
    """``composition_layers.parquet``, ``composition_top.parquet`` and ``read_write.parquet``
    (the README's columns)."""

    layers: pd.DataFrame
    top: pd.DataFrame
    read_write: pd.DataFrame


def load_circuit_tables(inputs) -> CircuitTables | None:
    """The tables from a Snakemake ``input`` with entries ``model, composition_layers,
    composition_top, read_write``; None without them (circuits off). A hybrid's are indexed
    by position among its attention layers, as the report's arrays are
    (:func:`hybrid.to_positions`)."""
    if not hasattr(inputs, "composition_layers"):
        return None
    model = read_json(inputs.model)
    return CircuitTables(*(to_positions(pd.read_parquet(path), model) for path in (
        inputs.composition_layers, inputs.composition_top, inputs.read_write)))


def _spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of ``x`` (ranks, ``(..., n)``) with ``y`` (ranks, ``(n,)``), along the last
    axis."""
    x = x - x.mean(-1, keepdims=True)
    y = y - y.mean()
    return (x @ y) / np.sqrt(np.square(x).sum(-1) * np.square(y).sum())


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank). Cost O(n log n)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    _, inverse = np.unique(x, return_inverse=True)
    sums = np.bincount(inverse, ranks)
    return (sums / np.bincount(inverse))[inverse]


def locality_test(later, earlier, values, n_perm: int = LOCALITY_PERMUTATIONS,
                  seed: int = LOCALITY_SEED) -> tuple[float, float, int]:
    """Spearman's rho between ``values`` of layer pairs ``(later, earlier)`` and their distance
    ``later - earlier`` (rho < 0: stronger between near layers), its two-sided permutation p and
    the number of pairs (finite values).

    Null: within each later layer, which earlier layer a value belongs to carries no
    information; the values of each later layer's row are shuffled among its earlier layers
    (``n_perm`` seeded shuffles of every row at once), which keeps each later layer's level and
    spread (a layer whose heads read strongly from everything does not pass for locality).
    Not controlled: an earlier layer that writes strongly into every later one (its pairs lie at
    every distance from it, so it biases rho only through where it sits). ``p = (1 + #{|rho_pi|
    >= |rho|}) / (1 + n_perm)``. Cost O(n_perm n log n) for ``n`` pairs; memory O(chunk n), in
    chunks of :data:`multiplicity.PERMUTATION_CHUNK` shuffles.
    """
    from .multiplicity import PERMUTATION_CHUNK, TOLERANCE

    later, earlier = np.asarray(later, int), np.asarray(earlier, int)
    values = np.asarray(values, float)
    ok = np.isfinite(values)
    later, earlier, values = later[ok], earlier[ok], values[ok]
    if len(values) < 3 or np.ptp(later - earlier) == 0:
        return float("nan"), float("nan"), int(len(values))
    ranks, distance = _ranks(values), _ranks(later - earlier)
    rho = float(_spearman(ranks, distance))
    # Pairs grouped by row; per shuffle, random keys offset by row sort each row apart.
    row_of = np.unique(later, return_inverse=True)[1]
    base = np.argsort(row_of, kind="stable")
    rng = np.random.default_rng(seed)
    exceed, done = 0, 0
    while done < n_perm:
        size = min(PERMUTATION_CHUNK, n_perm - done)
        order = np.argsort(rng.random((size, len(values))) + 2.0 * row_of, axis=-1)
        shuffled = np.empty((size, len(values)))
        shuffled[:, base] = ranks[order]
        exceed += int(np.count_nonzero(np.abs(_spearman(shuffled, distance))
                                       >= abs(rho) - TOLERANCE))
        done += size
    return rho, (1 + exceed) / (1 + n_perm), int(len(values))


@dataclass
class CircuitFindings:
    """What the section and the report's family list read (module docstring)."""

    composition: dict[str, FamilyCounts]      # by type: head pairs vs both nulls
    read_write: dict[str, FamilyCounts]       # by side: layer pairs vs the conditional null
    locality: pd.DataFrame                    # type, rho, p, p_adjusted, n_pairs

    def families(self) -> list[tuple[str, int]]:
        rows = [(f"{TYPE_NAMES[t]}-composition of every head pair vs both nulls",
                 c.n_tests) for t, c in self.composition.items()]
        rows += [(f"Read/write overlap ({SIDE_NAMES[t]}) of layer pairs vs conditional null",
                  c.n_tests) for t, c in self.read_write.items()]
        rows.append(("Locality of composition (Spearman rho vs layer distance, within-row"
                     " permutations)", int(np.isfinite(self.locality["p"]).sum())))
        return rows

    def local(self) -> pd.DataFrame:
        """Locality rows significant after BH."""
        return self.locality[self.locality["p_adjusted"] <= FDR_Q]

    def at_chance(self) -> bool:
        return (all(c.n_above == 0 for c in self.composition.values())
                and all(c.n_above == c.n_below == 0 for c in self.read_write.values())
                and self.local().empty)


def composition_counts(layers: pd.DataFrame) -> dict[str, FamilyCounts]:
    """Per type, from the composition layer table: head pairs tested (``n_pairs``), composing
    (``n_composing``: significant after BH against the conditional and the isotropic null,
    one-sided: all above), the mean conditional ratio."""
    out = {}
    for t in TYPES:
        rows = layers[layers["type"] == t]
        out[t] = FamilyCounts(int(rows["n_pairs"].sum()),
                              int(rows["n_composing"].sum()), 0,
                              float(rows["mean_conditional_ratio"].mean()))
    return out


def circuit_findings(tables: CircuitTables, n_perm: int = LOCALITY_PERMUTATIONS
                     ) -> CircuitFindings:
    """Every family of the module docstring. Cost that of three :func:`locality_test`."""
    rw = tables.read_write
    read_write = {t: count_family(*(rw.loc[rw["type"] == t, c] for c in (
        "mean_overlap", "conditional_mean", "conditional_z", "conditional_p_adjusted")))
        for t in TYPES}
    locality = []
    for t in TYPES:
        rows = tables.layers[tables.layers["type"] == t]
        locality.append((t, *locality_test(rows["layer"], rows["earlier_layer"],
                                           rows["mean_score"], n_perm)))
    locality = pd.DataFrame(locality, columns=["type", "rho", "p", "n_pairs"])
    locality.insert(3, "p_adjusted", benjamini_hochberg(locality["p"].to_numpy()))
    return CircuitFindings(composition_counts(tables.layers), read_write, locality)


def _pair(row: pd.Series) -> str:
    """``L{l}.H{i} ← L{e}.H{j}`` of a top-table row."""
    return (f"L{int(row['layer'])}.H{int(row['head'])} ← L{int(row['earlier_layer'])}"
            f".H{int(row['earlier_head'])}")


def _strongest(top: pd.DataFrame, t: str):
    """The type's composing pair (beyond both nulls) with the largest conditional z, else its
    top-table row with the largest conditional z."""
    rows = top[top["type"] == t]
    if rows["composing"].any():
        rows = rows[rows["composing"]]
    return rows.loc[rows["conditional_z"].idxmax()] if len(rows) else None


def _locality_text(f: CircuitFindings) -> str:
    parts = []
    for r in f.locality.itertuples():
        parts.append(f"{TYPE_NAMES[r.type]} rho {r.rho:+.2f} (adjusted p {r.p_adjusted:.2g})")
    return "; ".join(parts)


def finding(tables: CircuitTables, f: CircuitFindings) -> str:
    """The section's one-line finding against its nulls."""
    n = {t: c.n_tests for t, c in f.composition.items()}
    rw_tests = sum(c.n_tests for c in f.read_write.values())
    if f.at_chance():
        return (f"Circuits are {AT_CHANCE}: no head pair composes beyond both nulls (0 of"
                f" {n['q']} per type), no layer pair's read/write overlap departs from its"
                f" conditional null (0 of {rw_tests}), and composition strength does not change"
                " with layer"
                f" distance ({_locality_text(f)}).")
    counts = ", ".join(f"{TYPE_NAMES[t]} {c.n_above}" for t, c in f.composition.items())
    candidates = [row for row in (_strongest(tables.top, t) for t in TYPES) if row is not None]
    best = max(candidates, key=lambda r: r.conditional_z, default=None)
    strongest = (f"; strongest {TYPE_NAMES[best.type]}-composition {_pair(best)} (score"
                 f" {best.score:.3f}, {best.ratio:.1f}x isotropic, conditional z"
                 f" {best.conditional_z:+.1f})" if best is not None else "")
    local = f.local()
    if local.empty:
        trend = "no trend with layer distance"
    else:
        kinds = ", ".join(f"{TYPE_NAMES[r.type]} {'local' if r.rho < 0 else 'long-range'}"
                          f" (rho {r.rho:+.2f})" for r in local.itertuples())
        trend = f"by layer distance: {kinds}"
    rw_above = sum(c.n_above for c in f.read_write.values())
    return (f"Head pairs composing beyond both nulls (of {n['q']} per type): {counts}"
            f"{strongest}; {trend}; read/write overlap above its conditional null in {rw_above}"
            f" of {rw_tests} layer pairs.")


def _feeds(layers: pd.DataFrame, t: str) -> str:
    """The type's layer pairs with most composing pairs (:func:`composition.composing_pairs`;
    then the highest mean conditional ratio), as ``e→l (n/N, r x)``."""
    rows = layers[(layers["type"] == t) & (layers["n_composing"] > 0)]
    rows = rows.sort_values(["n_composing", "mean_conditional_ratio"],
                            ascending=False).head(LISTED_LAYER_PAIRS)
    return ", ".join(f"{int(r.earlier_layer)}→{int(r.layer)} ({int(r.n_composing)}"
                     f"/{int(r.n_pairs)}, {r.mean_conditional_ratio:.2f}x)"
                     for r in rows.itertuples()) or "none"


def section(tables: CircuitTables, f: CircuitFindings, k: int, line: str) -> Iterator[str]:
    """The Circuits section, markdown lines (``line``: its finding)."""
    from .report import Z_FORMAT, markdown_table

    layers, rw, top = tables.layers, tables.read_write, tables.top
    yield "## Circuits\n"
    yield f"**Finding:** {line}\n"
    yield ("Which heads write into what later heads read, from the weights alone (Elhage et al."
           " 2021). Composition of an earlier head e into a later head l: Q, K, V ="
           " `||W_QK_l^T W_OV_e||`, `||W_QK_l W_OV_e||`, `||W_OV_l W_OV_e||` over the norms'"
           " product (k-independent). Each score stands beside the isotropic null (random"
           " weights of the same shapes) and is judged against the row-space-conditional null"
           " of its square (the later head's singular vectors rotated within their own row"
           " space: does the head's weighting target what e writes, beyond its row space"
           " reading it?), BH over the pairs of a type. Locality: Spearman's rho between a"
           " layer pair's mean score and its distance, against shuffles of the earlier layers"
           " within each later layer (rho < 0: near layers compose more), BH over the three"
           " types. Heads sharing a KV head are not independent tests.\n")
    rows = []
    for t in TYPES:
        part = layers[layers["type"] == t]
        best = _strongest(top, t)
        loc = f.locality.set_index("type").loc[t]
        rows.append({"Type": TYPE_NAMES[t],
                     "Mean score × isotropic": part["mean_ratio"].mean(),
                     "Mean score² × conditional": part["mean_conditional_ratio"].mean(),
                     "Pairs above conditional (BH)":
                         f"{f.composition[t].n_above} of {f.composition[t].n_tests}",
                     "Strongest pair": _pair(best) if best is not None else "n/a",
                     "Its score": best.score if best is not None else np.nan,
                     "Its conditional z": best.conditional_z if best is not None else np.nan,
                     "Locality rho": loc["rho"], "Locality adjusted p": loc["p_adjusted"]})
    yield markdown_table(pd.DataFrame(rows), ".3f", formats={
        "Its conditional z": Z_FORMAT, "Locality rho": "+.2f",
        "Locality adjusted p": ".2g"}) + "\n"
    yield "Which layers feed which (layer pairs with most head pairs above the conditional null):\n"
    for t in TYPES:
        yield f"- {TYPE_NAMES[t]}: {_feeds(layers, t)}"
    yield ""
    yield "![Composition by layer pair](figures/composition_layers.png)\n"
    yield "![Composition by head pair, top layer pairs](figures/composition_heads.png)\n"
    yield "### Strongest head pairs\n"
    strongest = top.sort_values("conditional_z", ascending=False).head(TOP_ROWS)
    yield markdown_table(pd.DataFrame({
        "Type": strongest["type"].map(TYPE_NAMES),
        "Later ← earlier": [_pair(r) for _, r in strongest.iterrows()],
        "Score": strongest["score"], "× isotropic": strongest["ratio"],
        "z (isotropic)": strongest["z"], "Score² × conditional": strongest["conditional_ratio"],
        "z (conditional)": strongest["conditional_z"],
        "Adjusted p (conditional)": strongest["conditional_p_adjusted"]}),
        formats={"z (isotropic)": Z_FORMAT, "z (conditional)": Z_FORMAT,
                 "Adjusted p (conditional)": ".2g"}) + "\n"
    yield f"### Read/write overlap at k = {k}\n"
    yield ("Grassmann similarity of each head's top-k write subspace (OV left singular vectors)"
           " with each later head's top-k read subspace through its queries, keys and values,"
           " per layer pair: the mean over its head pairs (beside k/d and the conditional null:"
           " the later head's top-k a random k-subspace of its own row space) and the best"
           " match (each earlier head's best-reading later head, beside the expected maximum"
           " of isotropic overlaps). All rows: `read_write.parquet`.\n")
    rows = []
    for t in TYPES:
        part = rw[rw["type"] == t]
        near, far = part[part["distance"] == 1], part[part["distance"] > 1]
        strongest = part.loc[part["max_overlap"].idxmax()]
        rows.append({"Read side": SIDE_NAMES[t], "Mean overlap": part["mean_overlap"].mean(),
                     "× k/d": part["ratio"].mean(),
                     "× conditional": part["conditional_ratio"].mean(),
                     "Adjacent × conditional": near["conditional_ratio"].mean(),
                     "Farther × conditional": far["conditional_ratio"].mean(),
                     "Layer pairs differing (BH)": f.read_write[t].above_below(),
                     "Best match × its null": part["best_match_ratio"].mean(),
                     "Strongest pair": f"L{int(strongest.layer)}.H{int(strongest.max_head)} ←"
                                       f" L{int(strongest.earlier_layer)}"
                                       f".H{int(strongest.max_earlier_head)}"
                                       f" ({strongest.max_overlap:.3f},"
                                       f" z {strongest.max_conditional_z:+.1f})"})
    yield markdown_table(pd.DataFrame(rows), ".3f") + "\n"
    yield "![Read/write overlap by layer distance](figures/read_write.png)\n"
