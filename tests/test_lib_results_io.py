"""results_io readers against hand-built stored layouts: chunk order, head slices, tables."""

from __future__ import annotations

import numpy as np
import pandas as pd

from weight_geometry.ranks import RANK_COLUMNS
from weight_geometry.results_io import (
    chunk_dir_name,
    head_rows,
    load_head_bases,
    load_layers,
    load_rank_tables,
    pair_matrix,
    write_rows,
)

# Layer ranges of one extraction, first layers past 9 so that unpadded names sort wrongly
# ("layers10-..." before "layers2-...").
RANGES = [(0, 0), (1, 2), (3, 3), (4, 5), (6, 6), (7, 7), (8, 9), (10, 10), (11, 11), (12, 13),
          (14, 14), (15, 17)]
N_LAYERS = 18


def _write_chunks(root, name, full):
    """Store ``full`` (layers first) as one ``bases/<range>/<name>.npy`` per range; returns the
    paths in a fixed shuffled order, never the layer order."""
    paths = []
    for first, last in RANGES:
        path = root / "bases" / chunk_dir_name(first, last) / f"{name}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, full[first:last + 1])
        paths.append(path)
    order = np.random.default_rng(11).permutation(len(paths))
    assert not np.array_equal(order, np.arange(len(paths)))
    return [str(paths[i]) for i in order]


def test_chunk_dir_name_pads_layers_to_three_digits():
    assert chunk_dir_name(0, 3) == "layers000-003"
    assert chunk_dir_name(8, 12) == "layers008-012"
    assert chunk_dir_name(100, 127) == "layers100-127"
    # Padded names sort like their first layers.
    names = [chunk_dir_name(f, la) for f, la in RANGES]
    assert sorted(names) == names


def test_load_layers_concatenates_chunks_in_layer_order(tmp_path):
    # Each stored row carries its own layer index, so any misordering is visible.
    full = np.repeat(np.arange(N_LAYERS, dtype=float)[:, None], 3, axis=1)
    full[:, 1] *= 10
    paths = _write_chunks(tmp_path, "singular_values", full)
    out = load_layers(paths)
    assert out.shape == (N_LAYERS, 3)
    np.testing.assert_array_equal(out[:, 0], np.arange(N_LAYERS))
    np.testing.assert_array_equal(out, full)
    # The select hook is applied to each chunk before concatenation.
    np.testing.assert_array_equal(load_layers(paths, lambda a: a[:, 1]), 10 * np.arange(N_LAYERS))


def test_load_head_bases_takes_one_head_and_its_first_k_vectors(tmp_path):
    h, d_head, d, head, k = 3, 5, 7, 1, 2
    # vectors[l, i, r, c] = 1000 l + 100 i + 10 r + c: every entry names its own position.
    l_, i_, r_, c_ = np.meshgrid(np.arange(N_LAYERS), np.arange(h), np.arange(d_head),
                                 np.arange(d), indexing="ij")
    full = (1000 * l_ + 100 * i_ + 10 * r_ + c_).astype(np.float32)
    out = load_head_bases(_write_chunks(tmp_path, "vectors", full), head, k)
    assert out.shape == (N_LAYERS, k, d)
    for layer in range(N_LAYERS):
        for r in range(k):
            expected = 1000 * layer + 100 * head + 10 * r + np.arange(d)
            np.testing.assert_array_equal(out[layer, r], expected)


def test_pair_matrix_is_symmetric_with_unit_diagonal():
    """The figures' heatmap of the same-index similarity (symmetric by definition, unlike the
    best match: figures.py passes ``same_index``) from the layer-pair table's rows a < b."""
    n = 5
    rows = [(a, b, 0.1 * a + 0.01 * b, -1.0) for a in range(n) for b in range(a + 1, n)]
    pairs = pd.DataFrame(rows, columns=["layer_a", "layer_b", "same_index", "best_match"])
    pairs = pairs.sample(frac=1, random_state=4).reset_index(drop=True)
    out = pair_matrix(pairs, "same_index", n)
    assert out.shape == (n, n)
    for a in range(n):
        assert out[a, a] == 1.0
        for b in range(a + 1, n):
            assert np.isclose(out[a, b], 0.1 * a + 0.01 * b)
            assert np.isclose(out[b, a], 0.1 * a + 0.01 * b)


def test_head_rows_selects_one_head_indexed_by_sorted_layer():
    n, heads = 6, (0, 1, 2)
    table = pd.DataFrame([(h, layer, 10 * h + layer) for h in heads for layer in range(n)],
                         columns=["head", "layer", "value"])
    table = table.sample(frac=1, random_state=7).reset_index(drop=True)
    assert not table[table["head"] == 1]["layer"].is_monotonic_increasing
    rows = head_rows(table, 1)
    assert list(rows.index) == list(range(n))
    assert list(rows["value"]) == [10 + layer for layer in range(n)]
    assert set(rows["head"]) == {1}


def test_load_rank_tables_concatenates_chunks_in_layer_order(tmp_path):
    """The extraction's rank rows of each range (written by write_rows, one range empty as with
    a user CSV's chunk) read back as one table in layer order, on a fresh index."""
    rows = [(layer, wt, "4x3", float(layer + i)) for layer in range(N_LAYERS)
            for i, wt in enumerate(("W_Q", "W_K"))]
    paths = []
    for first, last in RANGES:
        path = tmp_path / "bases" / chunk_dir_name(first, last) / "weight_ranks.parquet"
        write_rows(path, RANK_COLUMNS, [r for r in rows if first <= r[0] <= last])
        paths.append(str(path))
    empty = tmp_path / "bases" / chunk_dir_name(18, 18) / "weight_ranks.parquet"
    write_rows(empty, RANK_COLUMNS, [])
    table = load_rank_tables([str(empty), *paths[::-1]])
    pd.testing.assert_frame_equal(table, pd.DataFrame(rows, columns=list(RANK_COLUMNS)))
