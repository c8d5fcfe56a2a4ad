"""Read and write the workflow's stored products (the public layout in the README).

Extraction writes one directory per layer range, ``bases/layers{first:03d}-{last:03d}/``; the
readers here concatenate ranges in layer order with memory-mapped loads, so selecting one head
and the first k vectors touches only those bytes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .architectures import ModelDims
from .errors import UserError
from .head_layout import first_heads

if TYPE_CHECKING:  # pandas is imported where tables are read: array-only jobs start faster
    import pandas as pd

BASES_FILES = ("vectors", "singular_values", "ffn_input_energy",
               "ffn_input_rowspace_eigenvalues", "ffn_input_norm2", "ffn_input_singular_values",
               "query_vectors", "ov_write_vectors", "ov_read_vectors", "ov_singular_values",
               "expert_energy", "expert_norm2", "expert_rowspace_eigenvalues",
               "expert_singular_values")


def chunk_dir_name(first: int, last: int) -> str:
    return f"layers{first:03d}-{last:03d}"


def _sorted_by_first_layer(paths) -> list[Path]:
    return sorted((Path(p) for p in paths), key=lambda p: p.parent.name)


def load_array(path, mmap_mode: str | None = None) -> np.ndarray:
    """A stored ``.npy`` array (memory-mapped with ``mmap_mode``), never unpickled; a one-line
    UserError naming a file that is not a plain numeric array (tampered with, truncated,
    another format), and the way out: deleting it makes the rule that writes it run again."""
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, EOFError) as err:  # what np.load raises for all of these
        text = str(err)
        why = ("it holds Python objects, which are never unpickled"
               if any(s in text for s in ("allow_pickle", "Python objects", "pickled"))
               else text.split("\n")[0])
        raise UserError(f"{path}: not a plain numeric array ({why}); delete it and run again:"
                        " the rule that writes it runs again") from None


def load_layers(paths, select=lambda a: a) -> np.ndarray:
    """Concatenate one stored array over layer ranges; ``select`` slices each memmap first."""
    return np.concatenate([np.asarray(select(load_array(p, mmap_mode="r")))
                           for p in _sorted_by_first_layer(paths)])


def load_rank_tables(paths) -> pd.DataFrame:
    """The ``weight_ranks.parquet`` tables of layer ranges (:data:`ranks.RANK_COLUMNS`), one
    after another in layer order, on a fresh index."""
    import pandas as pd

    return pd.concat([pd.read_parquet(p) for p in _sorted_by_first_layer(paths)],
                     ignore_index=True)


def load_head_bases(vector_paths, head: int, k: int) -> np.ndarray:
    """``(L, k, d)`` top-k right singular vectors of one head across all layers."""
    return load_layers(vector_paths, lambda a: a[:, head, :k, :])


def load_row_spaces(vector_paths, model: dict) -> np.ndarray:
    """``(L, n_kv_heads, d_head, d)``: for each KV head ``j`` of each layer ``p``, the stored
    vectors of its first query head (:func:`head_layout.first_heads`), an orthonormal basis of
    the KV head's row space (every head of the group has one; :mod:`rowspace_nulls`): ``m_p``
    rows, the padded rows zero (:mod:`head_layout`), and all zero for a KV head ``j >=
    n_kv_p``. Reads the union over layers of those heads' vectors. Cost O(L n_kv d_head d)."""
    first = first_heads(model)                                          # (L, n_kv), -1: none
    heads = np.unique(first[first >= 0])
    loaded = load_layers(vector_paths, lambda a: a[:, heads])
    out = loaded[np.arange(len(first))[:, None], np.searchsorted(heads, first)]
    out[first < 0] = 0
    return out


def load_similarities(paths) -> dict[int, np.ndarray]:
    """``{head: (L, L) matrix}`` from ``.../similarity_head{head}.npy`` files."""
    return {int(Path(p).stem.removeprefix("similarity_head")): load_array(p) for p in paths}


def pair_matrix(pairs: pd.DataFrame, column: str, n_layers: int) -> np.ndarray:
    """``(L, L)`` symmetric matrix of ``column`` from a per-layer-pair table (rows a < b), with
    a diagonal of 1 (a layer's similarity to itself)."""
    out = np.eye(n_layers)
    a, b = pairs["layer_a"].to_numpy(), pairs["layer_b"].to_numpy()
    out[a, b] = out[b, a] = pairs[column].to_numpy()
    return out


def model_dims(record: dict) -> ModelDims:
    """The dimensions recorded in a ``model.json``."""
    return ModelDims(**{f.name: tuple(v) if isinstance(v := record[f.name], list) else v
                        for f in fields(ModelDims) if f.name in record})


def unwritable_directory(paths) -> tuple[Path, str, Path] | None:
    """``(directory, why, path)`` for the first of ``paths`` (files that jobs will write or
    replace, e.g. every output, log and benchmark of the jobs a run will execute) whose
    directory this process cannot write: its parent, or where the parent does not exist yet,
    the nearest ancestor that does (where it will be made). None when all can be written. Asks
    ``access(2)``, which knows read-only mounts and, unlike file modes, what root may do;
    writes nothing. Cost: one ``access`` per distinct directory."""
    seen: set[Path] = set()
    for path in map(Path, paths):
        directory = path.parent
        while not directory.exists() and directory != directory.parent:
            directory = directory.parent
        if directory in seen:
            continue
        seen.add(directory)
        if not directory.is_dir():
            return directory, "not a directory", path
        if not os.access(directory, os.W_OK | os.X_OK):
            read_only = os.statvfs(directory).f_flag & os.ST_RDONLY
            return directory, ("read-only file system" if read_only
                               else "no write permission"), path
    return None


def save_result(path, array: np.ndarray) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)


def write_rows(path, columns: dict[str, str], rows: list[tuple]) -> None:
    """``rows`` as a parquet table with columns ``{name: pyarrow type name}`` (``"int64"``,
    ``"string"``, ...), written with pyarrow alone: a job that only writes rows does not pay
    pandas' import (0.4 s, 80 MiB). An empty ``rows`` gives an empty table with the columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({name: pa.array([row[i] for row in rows], type=pa.type_for_alias(kind))
                      for i, (name, kind) in enumerate(columns.items())})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def write_json(path, record: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=2) + "\n")


@dataclass
class Analysis:
    """Everything the figures and the report of one (model, k) need, loaded from files."""

    model: dict
    k: int
    heads: list[int]
    primary_head: int
    similarity: dict[int, np.ndarray]
    similarity_mean: np.ndarray
    bottleneck: pd.DataFrame
    alignment: pd.DataFrame
    layers: pd.DataFrame | None  # None where not an input (the figures)
    weight_ranks: pd.DataFrame
    kernel_ranks: pd.DataFrame
    singular_values: np.ndarray  # (L, h, d_head)
    best_match: np.ndarray       # (L, L), all heads
    layer_pairs: pd.DataFrame    # per layer pair a < b: same-index, best-match, nulls
    every_head: pd.DataFrame     # per head and layer: adjacent similarity, conditional null
    within_layer: pd.DataFrame   # per layer: similarity of heads sharing / not a KV head
    overlaps: np.ndarray         # (2, L, n_kv, L, n_kv) row-space overlap moments
    ksweep: pd.DataFrame | None  # rows by k; None where not an input (the figures)
    #: per (layer, expert or router row, head): expert_alignment; None where not an input
    alignment_experts: pd.DataFrame | None = None

    @property
    def has_experts(self) -> bool:
        """Whether the per-expert alignment has rows (a mixture-of-experts model)."""
        return self.alignment_experts is not None and len(self.alignment_experts) > 0

    @property
    def has_bottleneck(self) -> bool:
        return self.bottleneck_layer >= 0

    @property
    def bottleneck_layer(self) -> int:
        return bottleneck_layer(self.bottleneck)

    @property
    def bottleneck_choice(self) -> str:
        return str(self.bottleneck["bottleneck_choice"].iloc[0])

    def per_head(self, table: pd.DataFrame, column: str) -> pd.DataFrame:
        """``layer x head`` matrix of ``column`` for the sampled heads."""
        sub = table[table["head"].isin(self.heads)]
        return sub.pivot(index="layer", columns="head", values=column)

    def primary(self, table: pd.DataFrame, column: str) -> pd.Series:
        """``column`` of the primary head by layer (the figures' source for what the report
        reads from the layer table, so they need not wait for it)."""
        return head_rows(table, self.primary_head)[column]


def bottleneck_layer(bottleneck: pd.DataFrame) -> int:
    """The bottleneck layer recorded in a bottleneck table (:func:`statistics.bottleneck_table`:
    the same in every row; -1 where ``auto`` found none)."""
    return int(bottleneck["bottleneck_layer"].iloc[0])


def head_rows(table: pd.DataFrame, head: int) -> pd.DataFrame:
    """The rows of a long ``(head, layer, ...)`` table for ``head``, indexed by layer."""
    return table[table["head"] == head].set_index("layer").sort_index()


def load_analysis(inputs, k: int, heads: list[int], primary_head: int) -> Analysis:
    """Load from a Snakemake ``input`` object with the named entries used by the report rule
    (``layers`` and ``ksweep`` optional: the figures have neither). A hybrid's tables are
    indexed by position among its attention layers, as its arrays are
    (:func:`hybrid.to_positions`)."""
    import pandas as pd

    from .hybrid import to_positions

    model = read_json(inputs.model)

    def table(path):
        return to_positions(pd.read_parquet(path), model)

    return Analysis(
        model=model,
        k=k,
        heads=heads,
        primary_head=primary_head,
        similarity=load_similarities(inputs.similarity),
        similarity_mean=load_array(inputs.similarity_mean),
        bottleneck=table(inputs.bottleneck),
        alignment=table(inputs.alignment),
        layers=table(inputs.layers) if hasattr(inputs, "layers") else None,
        weight_ranks=table(inputs.weight_ranks),
        kernel_ranks=table(inputs.kernel_ranks),
        singular_values=load_layers(inputs.singular_values),
        best_match=load_array(inputs.best_match),
        layer_pairs=table(inputs.layer_pairs),
        every_head=table(inputs.every_head),
        within_layer=table(inputs.within_layer),
        overlaps=load_array(inputs.overlaps),
        ksweep=pd.read_parquet(inputs.ksweep) if hasattr(inputs, "ksweep") else None,
        alignment_experts=(table(inputs.alignment_experts)
                           if hasattr(inputs, "alignment_experts") else None),
    )
