"""A user's effective-rank CSV (the earlier notebook's format) against a model's dimensions."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import assert_one_line

from weight_geometry.architectures import GATED, ModelDims
from weight_geometry.errors import UserError
from weight_geometry.ranks import RANK_COLUMNS
from weight_geometry.results_io import chunk_dir_name, write_rows
from weight_geometry.user_ranks import (
    COMPUTED_SOURCE,
    read_user_ranks,
    weight_rank_table,
    write_effective_ranks,
)

DIMS = ModelDims(n_layers=3, d_model=64, d_ff=96, n_heads=4, n_kv_heads=2, d_head=24)
NON_GATED = tuple(wt for wt in GATED if wt != "W_gate")


def _workflow_table(dims: ModelDims, weight_types=GATED) -> pd.DataFrame:
    """The table as the extraction builds it: rows (layer, type, "rows x cols", rank)."""
    rows = []
    for layer in range(dims.n_layers):
        for i, wt in enumerate(weight_types):
            r, c = dims.weight_shape(wt)
            rows.append((layer, wt, f"{r}x{c}", min(r, c) / (2 + i + layer)))
    return pd.DataFrame(rows, columns=["layer_idx", "weight_type", "shape", "eff_rank"])


def _write(tmp_path, table: pd.DataFrame) -> str:
    path = tmp_path / "ranks.csv"
    table.to_csv(path, index=False)
    return str(path)


def test_valid_csv_round_trips(tmp_path):
    expected = _workflow_table(DIMS)
    got = read_user_ranks(_write(tmp_path, expected), DIMS, GATED)
    pd.testing.assert_frame_equal(got, expected)


def test_shuffled_transposed_csv_with_extra_column_gives_workflow_table(tmp_path):
    expected = _workflow_table(DIMS)
    user = expected.sample(frac=1, random_state=1).reset_index(drop=True)
    user["shape"] = user["shape"].str.split("x").map(lambda s: f" {s[1]}x{s[0]} ")
    user["note"] = "from 1.py"
    got = read_user_ranks(_write(tmp_path, user), DIMS, GATED)
    pd.testing.assert_frame_equal(got, expected)


def test_rank_at_its_maximum_and_tuple_shapes_are_accepted(tmp_path):
    """``eff_rank = min(rows, cols)`` (a flat spectrum) is allowed, and shapes may be written
    as tuples, ``(48, 64)``, as Python prints ``w.shape``."""
    expected = _workflow_table(DIMS)
    expected.loc[1, "eff_rank"] = 48.0                                  # W_K is 48 x 64
    user = expected.copy()
    user["shape"] = user["shape"].str.replace("x", ", ").map(lambda s: f"({s})")
    got = read_user_ranks(_write(tmp_path, user), DIMS, GATED)
    pd.testing.assert_frame_equal(got, expected)


def test_rank_zero_of_an_all_zero_weight_is_accepted(tmp_path):
    """The workflow writes eff_rank 0.0 for an all-zero weight: its own table reads back."""
    expected = _workflow_table(DIMS)
    expected.loc[5, "eff_rank"] = 0.0
    got = read_user_ranks(_write(tmp_path, expected), DIMS, GATED)
    pd.testing.assert_frame_equal(got, expected)


def test_listing_names_five_items_and_counts_the_rest(tmp_path):
    """A message lists at most five offending items, then says how many more."""
    big = ModelDims(n_layers=12, d_model=64, d_ff=96, n_heads=4, n_kv_heads=2, d_head=24)
    table = _workflow_table(big)
    for kept, listing in ((7, "missing: [7, 8, 9, 10, 11]. "),
                          (6, "missing: [6, 7, 8, 9, 10 and 1 more]. ")):
        with pytest.raises(UserError) as info:
            read_user_ranks(_write(tmp_path, table[table["layer_idx"] < kept]), big, GATED)
        assert listing in str(info.value), str(info.value)


def test_non_gated_model_round_trips_and_refuses_w_gate(tmp_path):
    expected = _workflow_table(DIMS, NON_GATED)
    got = read_user_ranks(_write(tmp_path, expected), DIMS, NON_GATED)
    pd.testing.assert_frame_equal(got, expected)
    with pytest.raises(UserError, match="unknown weight_type 'W_gate'.*allowed for this model:"
                                        " W_Q, W_K, W_V, W_O, W_up, W_down"):
        read_user_ranks(_write(tmp_path, _workflow_table(DIMS)), DIMS, NON_GATED)


def _set(row: int, column: str, value):
    def edit(t: pd.DataFrame) -> pd.DataFrame:
        t = t.astype({column: object})
        t.loc[row, column] = value
        return t
    return edit


BAD = {
    "missing column": (lambda t: t.drop(columns="eff_rank"),
                       r"missing column\(s\) eff_rank; found layer_idx, weight_type, shape"),
    "layer not an int": (_set(4, "layer_idx", "two"), r"layer_idx 'two' \(line 6\) is not an"
                                                      r" integer layer index 0\.\.2"),
    "fractional layer": (_set(0, "layer_idx", 0.5), r"layer_idx '0\.5' \(line 2\)"),
    "missing layer": (lambda t: t[t["layer_idx"] != 1],
                      r"the CSV has 2 layers \(0\.\.2\), the model has L = 3 .*missing: \[1\]"),
    "extra layer": (_set(0, "layer_idx", 7), r"not in the model: \[7\]"),
    "unknown weight type": (_set(2, "weight_type", "W_qkv"),
                            r"unknown weight_type 'W_qkv' \(line 4\); allowed for this model:"
                            r" W_Q, W_K, W_V, W_O, W_gate, W_up, W_down"),
    "duplicate": (lambda t: pd.concat([t, t.iloc[[3]]], ignore_index=True),
                  r"\(layer 0, W_O\) appears twice \(line 5 and line 23\)"),
    "missing row": (lambda t: t.drop(index=9), r"no row for \(layer 1, W_V\); every layer needs"
                                               r" one row per weight type"),
    "shape mismatch": (_set(1, "shape", "64x64"), r"shape 64x64 of \(layer 0, W_K\) \(line 3\)"
                                                  r" does not match the model's W_K: expected"
                                                  r" 48x64 \(or 64x48\)"),
    "shape unparsable": (_set(1, "shape", "48 by 64"), r"shape '48 by 64' of \(layer 0, W_K\)"
                                                       r" .*is not 'rows x cols'; expected 48x64"),
    "eff_rank nan": (_set(5, "eff_rank", "nan"), r"eff_rank 'nan' of \(layer 0, W_up\)"
                                                 r" \(line 7\) is not a number in"
                                                 r" \[0, min\(rows, cols\) = 64\]"),
    "eff_rank empty": (_set(5, "eff_rank", ""), r"eff_rank '' of \(layer 0, W_up\)"),
    "eff_rank text": (_set(5, "eff_rank", "high"), r"eff_rank 'high'"),
    "eff_rank inf": (_set(5, "eff_rank", "inf"), r"eff_rank 'inf'"),
    "eff_rank negative": (_set(5, "eff_rank", -3.0), r"eff_rank '-3\.0'"),
    "eff_rank above min(shape)": (_set(1, "eff_rank", 48.5),
                                  r"eff_rank '48\.5' of \(layer 0, W_K\) .*= 48\]"),
}


@pytest.mark.parametrize("case", BAD)
def test_each_problem_is_one_line_naming_file_and_value(tmp_path, case):
    edit, message = BAD[case]
    path = _write(tmp_path, edit(_workflow_table(DIMS)))
    with pytest.raises(UserError, match=message) as info:
        read_user_ranks(path, DIMS, GATED)
    assert assert_one_line(info.value).startswith(f"user ranks {path}: ")


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(UserError, match="ranks.csv: file not found"):
        read_user_ranks(tmp_path / "ranks.csv", DIMS, GATED)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(UserError, match=r"empty\.csv: not a readable CSV") as info:
        read_user_ranks(tmp_path / "empty.csv", DIMS, GATED)
    assert_one_line(info.value)
    (tmp_path / "header.csv").write_text("layer_idx,weight_type,shape,eff_rank\n")
    with pytest.raises(UserError, match=r"the CSV has 0 layers \(none\), the model has L = 3"):
        read_user_ranks(tmp_path / "header.csv", DIMS, GATED)


def test_directory_instead_of_a_csv(tmp_path):
    """It used to say "file not found" for a directory that is there."""
    with pytest.raises(UserError) as info:
        read_user_ranks(tmp_path, DIMS, GATED)
    assert str(info.value) == (f"user ranks {tmp_path}: is a directory (allowed: a CSV file with"
                               " columns layer_idx, weight_type, shape, eff_rank)")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda line: line + ",9", "line 2 has 5 fields, the header has 4"),      # every row
    (lambda line: line.rsplit(",", 1)[0], "line 2 has 3 fields, the header has 4"),
])
def test_ragged_rows_are_refused_before_pandas_shifts_them(tmp_path, edit, message):
    """pandas reads rows one field longer than the header with their first field as the index,
    so every value moved one column left and the message named the wrong column."""
    path = _write(tmp_path, _workflow_table(DIMS))
    header, *rows = Path(path).read_text().splitlines()
    Path(path).write_text("\n".join([header, *map(edit, rows)]) + "\n")
    with pytest.raises(UserError) as info:
        read_user_ranks(path, DIMS, GATED)
    assert str(info.value) == (f"user ranks {path}: {message} (layer_idx, weight_type, shape,"
                               " eff_rank); every line needs one value per column (a comma"
                               " inside a value must be quoted)")


def test_blank_and_space_only_lines_are_skipped_as_pandas_does(tmp_path):
    expected = _workflow_table(DIMS)
    path = _write(tmp_path, expected)
    header, *rows = Path(path).read_text().splitlines()
    Path(path).write_text("\n".join([header, rows[0], "", "   ", *rows[1:], "  "]) + "\n")
    pd.testing.assert_frame_equal(read_user_ranks(path, DIMS, GATED), expected)


def test_csv_of_another_model_is_refused(tmp_path):
    deeper = ModelDims(n_layers=5, d_model=64, d_ff=96, n_heads=4, n_kv_heads=2, d_head=24)
    with pytest.raises(UserError, match=r"the CSV has 5 layers \(0\.\.4\), the model has L = 3"
                                        r" .*not in the model: \[3, 4\]. Is it another model"):
        read_user_ranks(_write(tmp_path, _workflow_table(deeper)), DIMS, GATED)
    wider = ModelDims(n_layers=3, d_model=128, d_ff=256, n_heads=4, n_kv_heads=4, d_head=32)
    with pytest.raises(UserError, match=r"shape 128x128 of \(layer 0, W_Q\) .*expected 96x64"
                                        r" \(or 64x96\). Is it another model"):
        read_user_ranks(_write(tmp_path, _workflow_table(wider)), DIMS, GATED)


def _write_chunks(tmp_path, table: pd.DataFrame, ranges) -> list[str]:
    """``table``'s rows of each layer range as the extraction writes them (write_rows into
    ``bases/layers{first}-{last}/weight_ranks.parquet``), paths listed last range first."""
    paths = []
    for first, last in ranges:
        path = tmp_path / "bases" / chunk_dir_name(first, last) / "weight_ranks.parquet"
        part = table[table["layer_idx"].between(first, last)]
        write_rows(path, RANK_COLUMNS, list(part.itertuples(index=False, name=None)))
        paths.append(str(path))
    return paths[::-1]


def test_computed_ranks_are_the_chunks_in_layer_order(tmp_path):
    """Without a user CSV: the layer ranges' tables one after another in layer order (whatever
    order the paths come in), source "computed from the weights"."""
    expected = _workflow_table(DIMS)
    chunks = _write_chunks(tmp_path, expected, [(0, 0), (1, 2)])
    got = weight_rank_table(None, chunks, DIMS, GATED)
    assert list(got.columns) == [*RANK_COLUMNS, "source"]
    assert (got["source"] == COMPUTED_SOURCE).all()
    pd.testing.assert_frame_equal(got.drop(columns="source"), expected)


def test_a_user_csv_replaces_the_chunks(tmp_path):
    """With a user CSV: its validated table (read_user_ranks), source naming it; the chunks
    (the extraction's empty tables then) are not read."""
    user = _workflow_table(DIMS).sample(frac=1, random_state=2)
    path = _write(tmp_path, user)
    missing = [str(tmp_path / "no" / "weight_ranks.parquet")]
    got = weight_rank_table(path, missing, DIMS, GATED)
    assert (got["source"] == f"user CSV {path}").all()
    pd.testing.assert_frame_equal(got.drop(columns="source"),
                                  read_user_ranks(path, DIMS, GATED))
    with pytest.raises(UserError, match="no row for"):     # and it is validated
        weight_rank_table(_write(tmp_path, user.iloc[1:]), missing, DIMS, GATED)


@pytest.mark.parametrize("user", [False, True])
def test_write_effective_ranks_csv_is_the_notebooks_format(tmp_path, user):
    """The CSV has the notebook's four columns and no index; the parquet adds source."""
    expected = _workflow_table(DIMS)
    chunks = _write_chunks(tmp_path, expected, [(0, 2)])
    user_csv = _write(tmp_path, expected) if user else None
    csv, parquet = tmp_path / "effective_ranks.csv", tmp_path / "effective_ranks.parquet"
    write_effective_ranks(user_csv, chunks, DIMS, GATED, csv, parquet)
    assert csv.read_text().splitlines()[0] == "layer_idx,weight_type,shape,eff_rank"
    pd.testing.assert_frame_equal(pd.read_csv(csv), expected)
    table = pd.read_parquet(parquet)
    pd.testing.assert_frame_equal(table, weight_rank_table(user_csv, chunks, DIMS, GATED))
    assert table["source"].iloc[0] == (f"user CSV {user_csv}" if user else COMPUTED_SOURCE)
