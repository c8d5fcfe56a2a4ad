"""Effective ranks a user already has, from the earlier notebook's CSV, checked against a model.

The CSV has columns ``layer_idx, weight_type, shape, eff_rank`` (extra columns are ignored),
``shape`` like ``2048x11008``. A mixture-of-experts model's CSV also has an ``expert`` column, as
the workflow's own table: in a sparse layer one W_gate, W_up and W_down row per expert
(``0`` .. ``E-1``, ``shared``), empty for the attention weights and for dense layers' FFN.
Notebooks differ in orientation, so a shape is accepted as
``rows x cols`` or ``cols x rows`` of the model's ``nn.Linear`` weight (out x in); the table
returned always states it as ``rows x cols``, as the workflow's ``effective_ranks`` table.
Every problem raises :class:`UserError` with one line naming the file, the value and what is
allowed. :func:`weight_rank_table` gives a model's effective-rank table: this CSV when the user
has one, else the extraction's.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

from .architectures import EXPERT_WEIGHTS, SHARED, ModelDims, MoeDims
from .errors import UserError, listed
from .ranks import EXPERT_RANK_COLUMNS, RANK_COLUMNS, parse_shape, shape_text
from .results_io import load_rank_tables

#: ``source`` of effective ranks that the extraction computed (:func:`weight_rank_table`).
COMPUTED_SOURCE = "computed from the weights"

_SHOWN = 5  # how many offending items a message lists


def _first(mask: np.ndarray) -> int | None:
    """Index of the first True in ``mask``, None when there is none."""
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


def _span(layers: set[int]) -> str:
    return f"{min(layers)}..{max(layers)}" if layers else "none"


def _line(index: int) -> str:
    """CSV line of a row (line 1 is the header)."""
    return f"line {index + 2}"


def _require_rectangular(path: Path) -> None:
    """Every line that is not blank (or spaces only, which pandas skips) has as many fields
    as the header. Otherwise pandas would take the first column of rows one field longer for
    their index and shift every value one column to the left (or fill a short row with empty
    values)."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        lines = csv.reader(fh)
        header = next(lines, None)
        for row in lines:
            if any(field.strip() for field in row) and len(row) != len(header):
                raise UserError(f"user ranks {path}: line {lines.line_num} has {len(row)}"
                                f" fields, the header has {len(header)}"
                                f" ({', '.join(header)}); every line needs one value per"
                                " column (a comma inside a value must be quoted)")


def _read(path: Path) -> pd.DataFrame:
    if path.is_dir():
        raise UserError(f"user ranks {path}: is a directory (allowed: a CSV file with columns"
                        f" {', '.join(RANK_COLUMNS)})")
    if not path.is_file():
        raise UserError(f"user ranks {path}: file not found")
    try:
        _require_rectangular(path)
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, csv.Error, pd.errors.ParserError,
            pd.errors.EmptyDataError) as e:
        raise UserError(f"user ranks {path}: not a readable CSV ({e})".replace("\n", " ")) from e
    missing = [c for c in RANK_COLUMNS if c not in table.columns]
    if missing:
        raise UserError(f"user ranks {path}: missing column(s) {', '.join(missing)}; found"
                        f" {', '.join(map(str, table.columns))}; needed {', '.join(RANK_COLUMNS)}")
    columns = list(EXPERT_RANK_COLUMNS if "expert" in table.columns else RANK_COLUMNS)
    return table[columns].apply(lambda col: col.str.strip())


def _layers(table: pd.DataFrame, path: Path, n_layers: int) -> np.ndarray:
    """``layer_idx`` as integers; the set must be exactly 0..L-1."""
    values = pd.to_numeric(table["layer_idx"], errors="coerce").to_numpy()
    if (i := _first(~np.isfinite(values) | (values != np.round(values)))) is not None:
        raise UserError(f"user ranks {path}: layer_idx {table['layer_idx'].iloc[i]!r}"
                        f" ({_line(i)}) is not an integer layer index 0..{n_layers - 1}")
    layers = values.astype(np.int64)
    found, expected = set(layers.tolist()), set(range(n_layers))
    if found != expected:
        differences = [f"{label}: [{listed(sorted(items), _SHOWN)}]" for label, items in
                       (("missing", expected - found), ("not in the model", found - expected))
                       if items]
        raise UserError(
            f"user ranks {path}: the CSV has {len(found)} layers ({_span(found)}),"
            f" the model has L = {n_layers} (layers 0..{n_layers - 1}); "
            + ", ".join(differences) + ". Is it another model's CSV?")
    return layers


def _check_weight_types(table: pd.DataFrame, path: Path, weight_types: tuple[str, ...]):
    if (i := _first(~table["weight_type"].isin(weight_types).to_numpy())) is not None:
        raise UserError(f"user ranks {path}: unknown weight_type"
                        f" {table['weight_type'].iloc[i]!r} ({_line(i)}); allowed for this"
                        f" model: {', '.join(weight_types)}")


def _expected(n_layers: int, weight_types: tuple[str, ...], moe: MoeDims | None,
              not_stored: frozenset[tuple[int, str]] = frozenset()
              ) -> list[tuple[int, str, str]]:
    """``(layer, weight type, expert)`` of every row the model's table has, in the
    extraction's order: a sparse layer's attention weights (expert ``""``), then per expert its
    W_gate, W_up, W_down; a dense layer's weight types (expert ``""``); none of a ``(layer,
    weight type)`` in ``not_stored`` (:func:`record_not_stored`)."""
    keys = []
    for layer in range(n_layers):
        own = [wt for wt in weight_types if (layer, wt) not in not_stored]
        if moe is None or layer not in moe.sparse_layers:
            keys += [(layer, wt, "") for wt in own]
            continue
        keys += [(layer, wt, "") for wt in own if wt not in EXPERT_WEIGHTS]
        keys += [(layer, wt, str(e)) for e in moe.experts for wt in EXPERT_WEIGHTS]
    return keys


def _key_text(key: tuple[int, str, str]) -> str:
    return f"(layer {key[0]}, {key[1]}" + (f", expert {key[2]})" if key[2] else ")")


def _check_experts(table: pd.DataFrame, path: Path, moe: MoeDims | None) -> list[str]:
    """The ``expert`` of each row (``""`` where none): a column the model's experts need, or
    that a model without experts leaves empty."""
    sparse = sorted(moe.sparse_layers) if moe is not None else []
    if "expert" not in table.columns:
        if sparse:
            labels = ", ".join(map(str, moe.experts))
            raise UserError(f"user ranks {path}: no expert column, but layers"
                            f" {listed(sparse, _SHOWN)}"
                            f" are mixtures of experts (allowed: an expert column, {labels} on"
                            " their W_gate, W_up and W_down rows, empty elsewhere)")
        return [""] * len(table)
    experts = table["expert"].tolist()
    if not sparse and (i := _first(np.array([e != "" for e in experts]))) is not None:
        raise UserError(f"user ranks {path}: expert {experts[i]!r} ({_line(i)}), but the"
                        " model has no experts (allowed: an empty expert column, or none)")
    return experts


def _check_complete(keys: list[tuple[int, str, str]], path: Path,
                    expected: list[tuple[int, str, str]],
                    not_stored: frozenset[tuple[int, str]] = frozenset()):
    """Each expected (layer, weight type, expert) exactly once, and no other (none of a weight
    the layer does not store, ``not_stored``)."""
    seen: dict[tuple[int, str, str], int] = {}
    allowed = set(expected)
    for i, key in enumerate(keys):
        if key in seen:
            raise UserError(f"user ranks {path}: {_key_text(key)} appears twice"
                            f" ({_line(seen[key])} and {_line(i)}); each (layer_idx,"
                            " weight_type, expert) must appear once")
        if key[:2] in not_stored:
            raise UserError(f"user ranks {path}: {_key_text(key)} ({_line(i)}) is a weight"
                            " this layer does not store: it reads another layer's keys, or"
                            " its values are its keys (allowed: no row for it)")
        if key not in allowed:
            what = ("an expert of a weight without experts" if key[2] else
                    "no expert where the model has experts")
            raise UserError(f"user ranks {path}: {_key_text(key)} ({_line(i)}) has {what}"
                            " (allowed: an expert 0..E-1 or shared on W_gate, W_up, W_down of"
                            " a mixture-of-experts layer, empty elsewhere)")
        seen[key] = i
    absent = [_key_text(key) for key in expected if key not in seen]
    if absent:
        raise UserError(f"user ranks {path}: no row for {listed(absent, _SHOWN)}; every layer needs"
                        " one row per weight type (per expert in a mixture-of-experts layer)")


def _shapes(layers: np.ndarray, table: pd.DataFrame, path: Path, dims: ModelDims,
            experts: list[str], moe: MoeDims | None) -> list[tuple[int, int]]:
    """The model's (rows, cols) per row, after checking the CSV's shape (either orientation);
    an expert's from its own width."""
    out = []
    for i, (layer, wt, text) in enumerate(zip(layers, table["weight_type"], table["shape"],
                                              strict=True)):
        expert, layer_dims = experts[i], dims.layer(int(layer))   # the layer's own head sizes
        own = layer_dims if not expert else moe.expert_dims(
            layer_dims, SHARED if expert == SHARED else int(expert))
        expected = own.weight_shape(wt)
        try:
            shape = parse_shape(text)
        except ValueError:
            raise UserError(f"user ranks {path}: shape {text!r} of (layer {layer}, {wt})"
                            f" ({_line(i)}) is not 'rows x cols'; expected"
                            f" {shape_text(expected)}") from None
        if shape not in (expected, expected[::-1]):
            raise UserError(f"user ranks {path}: shape {text} of (layer {layer}, {wt})"
                            f" ({_line(i)}) does not match the model's {wt}: expected"
                            f" {shape_text(expected)} (or {shape_text(expected[::-1])})."
                            " Is it another model's CSV?")
        out.append(expected)
    return out


def _eff_ranks(layers: np.ndarray, table: pd.DataFrame, path: Path,
               shapes: list[tuple[int, int]]) -> np.ndarray:
    """``eff_rank`` as floats in ``[0, min(rows, cols)]`` (0: an all-zero weight, as the
    workflow's own table states it)."""
    values = pd.to_numeric(table["eff_rank"], errors="coerce").to_numpy(dtype=np.float64)
    limits = np.array([min(s) for s in shapes], dtype=np.float64)
    bad = ~np.isfinite(values) | (values < 0) | (values > limits)
    if (i := _first(bad)) is not None:
        raise UserError(f"user ranks {path}: eff_rank {table['eff_rank'].iloc[i]!r} of"
                        f" (layer {layers[i]}, {table['weight_type'].iloc[i]}) ({_line(i)}) is"
                        f" not a number in [0, min(rows, cols) = {limits[i]:.0f}]")
    return values


def read_user_ranks(path, dims: ModelDims, weight_types: tuple[str, ...],
                    moe: MoeDims | None = None,
                    not_stored: frozenset[tuple[int, str]] = frozenset()) -> pd.DataFrame:
    """The CSV at ``path`` as the workflow's effective-ranks table for a model of ``dims`` (and
    ``moe``, its experts, if any; each layer's attention weights at its own head size and
    KV-head count, :meth:`ModelDims.layer`), with no row for a ``(layer, weight type)`` in
    ``not_stored`` (:func:`record_not_stored`).

    Columns ``layer_idx`` (int64), ``weight_type`` (str), ``shape`` (``"{rows}x{cols}"`` of the
    model's weight, out x in), ``eff_rank`` (float64), and with ``moe`` ``expert`` (string, null
    where none); sorted by layer, then in the order of ``weight_types`` (the model's adapter
    order; a sparse layer's experts after its attention weights, as the extraction writes
    them). Raises :class:`UserError` on a missing or unreadable file, missing columns, a layer
    set other than 0..L-1, unknown weight types, an expert column missing where the model has
    experts or filled where it has none, missing, duplicate or unexpected (layer, weight type,
    expert) rows, shapes that differ from the model's (in both orientations), and eff_rank not
    finite, negative or above ``min(rows, cols)``.
    """
    path = Path(path)
    table = _read(path)
    layers = _layers(table, path, dims.n_layers)
    _check_weight_types(table, path, weight_types)
    moe = moe if moe is not None and moe.sparse_layers else None
    experts = _check_experts(table, path, moe)
    keys = list(zip(layers.tolist(), table["weight_type"], experts, strict=True))
    expected = _expected(dims.n_layers, weight_types, moe, not_stored)
    _check_complete(keys, path, expected, not_stored)
    shapes = _shapes(layers, table, path, dims, experts, moe)
    ranks = pd.DataFrame({
        "layer_idx": layers,
        "weight_type": table["weight_type"].to_numpy(),
        "shape": [shape_text(shape) for shape in shapes],
        "eff_rank": _eff_ranks(layers, table, path, shapes),
    })
    if moe is not None:
        ranks["expert"] = pd.array([e or None for e in experts], dtype="string")
    order = {key: i for i, key in enumerate(expected)}
    return ranks.iloc[np.argsort([order[key] for key in keys])].reset_index(drop=True)


def record_not_stored(record: dict) -> frozenset[tuple[int, str]]:
    """The ``(layer, weight type)`` pairs a ``model.json`` records as not stored by their layer,
    which therefore have no effective rank (Gemma 4): W_K and W_V of the layers that reuse
    another layer's keys and values (``kv_shared_layers``), W_V of the layers whose values are
    their keys (``keys_as_values``). Empty for every other model."""
    shared = [int(layer) for layer in record.get("kv_shared_layers") or {}]
    return frozenset([*((layer, wt) for layer in shared for wt in ("W_K", "W_V")),
                      *((int(layer), "W_V") for layer in record.get("keys_as_values") or [])])


def record_moe(record: dict) -> MoeDims | None:
    """The experts recorded in a ``model.json`` (``experts``), None for a dense model."""
    moe = record.get("experts")
    if not moe:
        return None
    return MoeDims(moe["n_experts"], moe["d_expert"], moe["d_shared"],
                   frozenset(moe["sparse_layers"]))


def weight_rank_table(user_csv, chunk_paths, dims: ModelDims,
                      weight_types: tuple[str, ...], moe: MoeDims | None = None,
                      not_stored: frozenset[tuple[int, str]] = frozenset()) -> pd.DataFrame:
    """A model's effective-rank table (:data:`ranks.RANK_COLUMNS`) and where it comes from, in
    a ``source`` column: the user's CSV ``user_csv`` when given (:func:`read_user_ranks`, with
    ``moe`` and ``not_stored``;
    ``source`` = ``"user CSV <user_csv>"``; ``chunk_paths`` are not read), else the
    extraction's ``weight_ranks.parquet`` of each layer range, ``chunk_paths``, in layer order
    (:func:`results_io.load_rank_tables`; ``source`` = :data:`COMPUTED_SOURCE`)."""
    if user_csv:
        ranks = read_user_ranks(user_csv, dims, weight_types, moe, not_stored)
        ranks["source"] = f"user CSV {user_csv}"
    else:
        ranks = load_rank_tables(chunk_paths)
        ranks["source"] = COMPUTED_SOURCE
    return ranks


def write_effective_ranks(user_csv, chunk_paths, dims: ModelDims, weight_types: tuple[str, ...],
                          csv_path, parquet_path, moe: MoeDims | None = None,
                          not_stored: frozenset[tuple[int, str]] = frozenset()) -> None:
    """:func:`weight_rank_table` written twice: to ``csv_path`` in the earlier notebook's format
    (its four columns and, for a mixture of experts, ``expert``; no ``source``, no index) and to
    ``parquet_path`` with ``source``."""
    ranks = weight_rank_table(user_csv, chunk_paths, dims, weight_types, moe, not_stored)
    ranks.drop(columns="source").to_csv(csv_path, index=False)
    ranks.to_parquet(parquet_path, index=False)
