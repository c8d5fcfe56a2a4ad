"""Experiment 3 per expert: the FFN-attention alignment of every expert's FFN input and of every
router row of a mixture-of-experts layer, with both nulls.

A sparse layer has one *unit* per weight whose alignment is measured, in this order
(:func:`expert_units`): the routed experts' W_gate ``(d_e, d)`` (``expert`` ``"0"`` ..
``"E-1"``), the shared expert's W_gate (``"shared"``), then the router's rows ``W_router[e]``
``(1, d)`` (``expert`` ``"router"``, ``router_row`` ``e``). For unit ``u`` and head ``i``

    align(l, u, i, k) = ||W_u V_k^T||_F^2 / ||W_u||_F^2,

``V_k`` ``(k, d)`` the head's top-k attention subspace: for an expert the share of its FFN
input's energy inside the subspace (Experiment 3 with ``W_in = W_gate_e``), for a router row
the share ``||V_k w_e||^2 / ||w_e||^2`` of the direction that routes tokens to expert ``e``.
The extraction stores per unit what every k needs, as for the dense FFN input
(:mod:`experts`): per-direction energies ``(U, h, d_head)`` (prefix sums give every k),
``||W_u||_F^2``, the eigenvalues of ``Q_j W_u^T W_u Q_j^T`` in each KV row space ``(U, n_kv,
d_head)`` (the conditional null) and the singular values of ``W_u`` (the isotropic null, its
ceiling and floor). Layers without experts hold NaN there; dense models have ``U = 0``.

The nulls are :func:`alignment.alignment_table`'s, per unit: isotropic (a Haar-random
k-subspace of R^d: chance k/d; a router row, rank one, has std ``sqrt(2k(d-k) / (d^2 (d+2)))``)
and row-space-conditional (a Haar-random k-subspace of the head's KV row space). The
conditional z gets a two-sided gamma-approximate p, Benjamini-Hochberg adjusted over every
(layer, unit, head) of this k: one family.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pandas where the table is built: the extraction job imports this module
    import pandas as pd

#: The ``expert`` label of the router's rows.
ROUTER = "router"
#: The label of the shared expert (:data:`architectures.SHARED`, repeated here so that this
#: module stays free of the checkpoint code).
SHARED = "shared"
#: The per-unit arrays of each layer the extraction stores (:class:`extraction.LayerResult`).
EXPERT_ARRAYS = ("expert_energy", "expert_norm2", "expert_rowspace_eigenvalues",
                 "expert_singular_values")


def expert_units(n_experts: int, shared: bool, shared_gate: bool = False
                 ) -> list[tuple[str, str | None]]:
    """``(expert, router_row)`` of each unit of a sparse layer, in the stored order: the routed
    experts ``("0", None)`` .. ``("E-1", None)``, ``("shared", None)`` with ``shared``, the
    router's rows ``("router", "0")`` .. ``("router", "E-1")`` and, with ``shared_gate``, the
    shared expert's gate row ``("router", "shared")``."""
    experts = [str(e) for e in range(n_experts)] + ([SHARED] if shared else [])
    rows = [str(e) for e in range(n_experts)] + ([SHARED] if shared_gate else [])
    return [(e, None) for e in experts] + [(ROUTER, r) for r in rows]


def record_units(model: dict) -> list[tuple[str, str | None]]:
    """:func:`expert_units` of a ``model.json`` record (none for a dense model)."""
    moe = model.get("experts")
    if not moe:
        return []
    return expert_units(moe["n_experts"], bool(moe["d_shared"]), bool(moe.get("shared_gate")))


def expert_alignment_table(energy: np.ndarray, norm2: np.ndarray,
                           singular_values: np.ndarray, rowspace_eigenvalues: np.ndarray,
                           units: list[tuple[str, str | None]], k: int, model: dict,
                           ffn_input: str) -> pd.DataFrame:
    """Long table sorted by (layer, unit, head): layer, expert, router_row, weight (``ffn_input``
    for an expert, ``"router"`` for a router row), head, and :func:`alignment.alignment_table`'s
    alignment and null columns, over the sparse layers only (rows of ``norm2`` that are
    finite); ``conditional_p_adjusted`` is BH over the whole table. Empty (same columns) for a
    dense model.

    Args:
        energy: ``(L, U, h, d_head)`` per-direction energies ``||W_u v_r||^2`` (zero beyond
            layer ``p``'s head size ``m_p``).
        norm2: ``(L, U)`` ``||W_u||_F^2`` (NaN in a layer without experts).
        singular_values: ``(L, U, m)`` singular values of each ``W_u``, zero-padded.
        rowspace_eigenvalues: ``(L, U, n_kv_heads, d_head)``, NaN beyond layer ``p``'s ``m_p``
            and ``n_kv_p`` (:mod:`head_layout`).
        units: :func:`expert_units`, ``U`` of them.
        model: the ``model.json`` record: ``d_model`` and each layer's head size and KV
            grouping, with which every (layer, unit) row gets its layer's conditional null
            (:func:`alignment.alignment_table`'s ``layers``); ``k <= min_p m_p``.
    Cost O(L U (h k + m log m)).
    """
    from .alignment import alignment_table

    n_layers, n_units, n_heads, d_head = energy.shape
    if len(units) != n_units:
        raise ValueError(f"{len(units)} unit labels for {n_units} stored units")
    layer, unit = np.nonzero(np.isfinite(norm2)) if n_units else (np.zeros(0, int),) * 2
    flat = alignment_table(energy[layer, unit], norm2[layer, unit],
                           singular_values[layer, unit], rowspace_eigenvalues[layer, unit],
                           k, model, ffn_input, layers=layer)
    which = flat.pop("layer").to_numpy()
    flat = flat.drop(columns="ffn_input")
    labels = np.array(units, dtype=object).reshape(-1, 2)
    expert = labels[unit[which], 0] if len(which) else np.zeros(0, dtype=object)
    row = labels[unit[which], 1] if len(which) else np.zeros(0, dtype=object)
    flat.insert(0, "layer", layer[which])
    flat.insert(1, "expert", expert)
    flat.insert(2, "router_row", row)
    flat.insert(3, "weight", np.where(expert == ROUTER, ROUTER, ffn_input))
    flat["order"] = which
    return (flat.sort_values(["order", "head"], ignore_index=True).drop(columns="order")
            .astype({"expert": "string", "router_row": "string", "weight": "string"}))


#: The groups of units the report summarizes (:func:`unit_groups`).
GROUPS = {"routed": "Routed experts (W_gate)", "shared": "Shared expert (W_gate)",
          "router": "Router rows"}


def unit_groups(table: pd.DataFrame) -> pd.Series:
    """``"routed"``, ``"shared"`` or ``"router"`` for each row of an expert-alignment table."""
    expert = table["expert"].astype(object)
    return expert.map(lambda e: e if e in (SHARED, ROUTER) else "routed")


def unit_means(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (layer, expert, router_row), in the table's order: group, the mean over
    heads of alignment, chance, conditional_chance, and their ratios ``ratio`` (mean over mean
    chance) and ``conditional_ratio``. Cost O(rows)."""
    keys = ["layer", "expert", "router_row"]
    means = (table.assign(group=unit_groups(table))
             .groupby(keys, sort=False, dropna=False)
             .agg(group=("group", "first"), alignment=("alignment", "mean"),
                  chance=("chance", "mean"), conditional_chance=("conditional_chance", "mean"))
             .reset_index())
    means["ratio"] = means["alignment"] / means["chance"]
    means["conditional_ratio"] = means["alignment"] / means["conditional_chance"]
    return means


def unit_label(row) -> str:
    """``L3 E17``, ``L3 shared``, ``L3 router row 17``: a unit of :func:`unit_means`."""
    if row.expert == ROUTER:
        return f"L{row.layer} router row {row.router_row}"
    return f"L{row.layer} " + ("shared" if row.expert == SHARED else f"E{row.expert}")


def group_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per group present (:data:`GROUPS`): group, units (number of (layer, unit)), mean
    alignment over its rows, spread (std over its units of their mean over heads), ratio (mean
    over isotropic chance), conditional_ratio (mean over mean conditional chance) and the units
    with the highest and lowest conditional_ratio (:func:`unit_label`). Cost O(rows)."""
    import pandas as pd

    means, groups, rows = unit_means(table), unit_groups(table), []
    for key, label in GROUPS.items():
        part, units = table[groups == key], means[means["group"] == key]
        if not len(part):
            continue
        order = units.sort_values("conditional_ratio", ascending=False)
        top, bottom = order.iloc[0], order.iloc[-1]
        rows.append({"group": label, "units": len(units), "mean": part["alignment"].mean(),
                     "spread": units["alignment"].std(ddof=0) if len(units) > 1 else np.nan,
                     "ratio": part["alignment"].mean() / part["chance"].mean(),
                     "conditional_ratio": (part["alignment"].mean()
                                           / part["conditional_chance"].mean()),
                     "most": f"{unit_label(top)} ({top.conditional_ratio:.2f}x)",
                     "least": f"{unit_label(bottom)} ({bottom.conditional_ratio:.2f}x)"})
    return pd.DataFrame(rows)


def expert_finding(table: pd.DataFrame, tested, at_chance: str) -> str:
    """The report's one sentence on the per-expert alignment: the BH counts of ``tested`` (a
    :class:`multiplicity.FamilyCounts` of the whole table), each group's mean over its
    conditional chance and spread, and the most aligned expert; ``at_chance`` (the verdicts'
    phrase) where no test departs from the conditional null."""
    groups = group_summary(table).set_index("group")
    parts = [f"{label.split(' (')[0].lower()} {g.conditional_ratio:.2f}x"
             + (f" (spread {g.spread:.4f})" if g.units > 1 else "")
             for label, g in groups.iterrows()]
    means = f"mean over the conditional chance: {'; '.join(parts)}"
    if tested.n_above == tested.n_below == 0:
        return (f"Alignment per expert and router row is {at_chance}: no (layer, unit, head)"
                f" differs from the conditional null (0 of {tested.n_tests}); {means}.")
    most = groups.loc[GROUPS["routed"], "most"] if GROUPS["routed"] in groups.index else ""
    return (f"Alignment per expert differs from the conditional null in {tested.n_above}"
            f" (above) and {tested.n_below} (below) of {tested.n_tests} (layer, expert or"
            f" router row, head) tests; {means}" + (f"; most aligned expert {most}" if most
                                                   else "") + ".")
