"""Read/write overlap at k: how much of what each head writes to the residual stream lies where
each later head reads, as Grassmann similarity (:mod:`similarity`) of top-k subspaces, from the
factors the extraction stores (no checkpoint read).

For an earlier head ``j`` of layer ``e`` with top-k write vectors ``A`` (``ov_write_vectors``,
``(k, d)``: the top-k left singular vectors of ``W_OV = W_O_j W_V``) and a later head ``i`` of
layer ``l > e`` with top-k read vectors ``X`` (``(k, d)``, per type: ``q`` the query side
``U`` of its kernel ``W_QK = U^T diag(s) V`` (``query_vectors``), ``k`` the key side ``V``
(``vectors``), ``v`` the OV read side ``B`` (``ov_read_vectors``)):

    overlap = sim(X, A) = ||X A^T||_F^2 / k.

Nulls (the later head's read subspace is what is randomized, as for composition's conditional
null; the write subspace is kept):

- **isotropic**: ``X`` a Haar-random k-subspace of R^d, independently per later head: per pair
  mean ``k/d``, std :func:`similarity.null_std`. The layer pair's mean over its ``h^2`` head
  pairs, ``(1/(h^2 k)) sum_i tr(P_i S)`` with ``S = sum_j A_j^T A_j``, has mean ``k/d`` and,
  the ``h`` readers being independent, variance ``h Var[tr(P S)] / (h^2 k)^2`` with
  ``Var[tr(P S)] = c_d (tr S^2 - (tr S)^2 / d)`` (:func:`rowspace_nulls.trace_null_var`;
  ``tr S = h k``, ``tr S^2 = ||A_all A_all^T||_F^2``, the writers' overlaps): exact.
- **row-space-conditional**: ``X`` a Haar-random k-subspace of the later head's own ``m =
  d_head``-dimensional read space (``Q``: the row space of ``W_Q_i``, of ``W_K_j`` or of
  ``W_V_j``, whose orthonormal basis is the ``m`` stored vectors), independently per later
  head. With ``P = Q A^T`` (``m x k``) and ``N = P P^T``: ``k overlap = tr(C N)`` for a
  Haar rank-k projector ``C`` of ``R^m``, so the pair's mean is ``tr N / m`` and its variance
  ``c_m (tr N^2 - (tr N)^2 / m) / k^2`` (``tr N = ||P||_F^2``, ``tr N^2 = ||P^T P||_F^2``).
  For the layer pair's mean, ``N_i = Q_i A_all^T A_all Q_i^T`` per reader (``m x m`` from the
  ``m x h k`` block ``Q_i A_all^T``), summed over the independent readers. Heads of one KV
  head share ``Q`` (key and value sides), so anything that writes into that row space beats
  the isotropic null once per head of the group; this null asks whether the later head's
  top-k directions within its row space are where the earlier head writes, beyond the row
  space itself receiving it.
- **KV heads** (both nulls, a layer pair's mean on the key and value sides): the ``g`` heads of
  a KV head read within one row space and, for random weights too, lean towards the same
  directions of it (as for same-index, :func:`rowspace_nulls.same_index_null`), so they are
  not independent readers: their variance is bounded by counting them as perfectly
  correlated, ``g`` times that of independent heads (an upper bound by at most ``sqrt(g)`` in
  the std). Measured on a random-init SmolLM2-135M-shaped model at k = 20: with independent
  heads the z-scores' std was 1.30-1.45 on those sides (0.97-0.99 on queries) and 15 of 1305
  layer pairs passed BH; with the bound 0.75-0.84 and none.
- **best match**: for each earlier head, its best-reading later head ``max_i overlap``, mean
  over the earlier heads. Given the writer, the ``h`` overlaps with independent isotropic
  readers are i.i.d. with the distribution of ``sim`` of two Haar k-subspaces of R^d, so its
  null mean is ``E[max of h draws]`` (:func:`max_null`, Monte Carlo of that distribution,
  seeded); the std given is that of one maximum, an upper bound for the mean over writers
  (which share readers).

Per-layer sizes (:mod:`head_layout`, Gemma 4): a later layer is read at its own head size
``m_l`` (its first ``m_l`` stored rows; the padding is never read) and KV grouping ``g_l = h /
n_kv_l``: its bases, the conditional null's ``m`` and the KV heads' bound are its own. The
writers' top-k rows lie within every layer's size (``k <= min m_p``), and the isotropic and
best-match nulls do not involve ``m``.

Cost per later layer ``l`` (all earlier layers at once): one float32 GEMM ``((h + 2 n_kv) m,
d) x (d, l h k)`` (the read bases under GQA, as composition's), the cores ``k x m`` times ``m x
l h k`` per later head, ``m x k`` Grams per (basis, writer) and ``m x m`` Grams per (basis,
earlier layer): ``2 l h k ((h + 2 n_kv) m (d + k + m) + h k m)`` flops; for the model about
``L^2 h k (h + 2 n_kv) m (d + m)``, ``(h + 2 n_kv) m / (3 h k)`` times the GEMMs of the
overlaps alone, never a ``d x d`` matrix; SmolLM2-135M at k = 20: 1.6 s of one core (torch on
two threads was slower: the products are small). Memory: the four ``(L, h, m, d)`` float32
vector arrays (:func:`load_sides`), one later layer's products ``(h + 2 n_kv) m x L h k``
(float32) with their Grams, and the three ``(3, L, h, L, h)`` float64 pair arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .composition import TYPES, layer_layout
from .errors import UserError
from .multiplicity import FDR_Q, benjamini_hochberg, null_test
from .rowspace_nulls import trace_null_var
from .similarity import null_mean

#: Monte Carlo draws of ``h`` i.i.d. similarities behind the best match's null.
MAX_NULL_DRAWS = 4096
#: Seed of that Monte Carlo.
MAX_NULL_SEED = 0


@dataclass
class ReadSides:
    """The stored vectors :func:`read_write` needs, ``(L, h, m, d)`` with orthonormal rows:
    ``query`` (``U``), ``key`` (``V``), ``read`` (``B``), ``write`` (``A``; only its first
    ``k`` rows are read); ``n_kv_heads`` KV heads (one count, or ``(L,)`` per layer; 0:
    ``h``), whose heads share the row spaces of ``W_K_j`` and ``W_V_j`` (the first head's
    ``m_p`` stored rows are their bases); ``head_dims`` ``(L,)`` each layer's head size ``m_p
    <= m`` (None: ``m``; rows ``r >= m_p`` are padding, :mod:`head_layout`, never read)."""

    query: np.ndarray
    key: np.ndarray
    read: np.ndarray
    write: np.ndarray
    n_kv_heads: int | np.ndarray = 0
    head_dims: np.ndarray | None = None

    def layout(self) -> tuple[np.ndarray, np.ndarray]:
        """``(L,)`` head sizes ``m_p`` and KV groups ``g_p`` (:func:`composition.
        layer_layout`)."""
        n_layers, h, m, _ = self.query.shape
        return layer_layout(n_layers, h, m, self.n_kv_heads, self.head_dims)


@dataclass
class ReadWrite:
    """Per type (:data:`composition.TYPES`), ``(3, L, h, L, h)`` float64 indexed ``[t, later
    layer, later head, earlier layer, earlier head]``, NaN where the earlier layer is not
    earlier: ``overlap``, its conditional ``pair_mean`` and ``pair_std``; per layer pair
    ``(3, L, L)`` ``[t, later, earlier]``: ``mean`` over the ``h^2`` pairs, its
    ``isotropic_std`` (mean ``k/d``), ``conditional_mean``, ``conditional_std``, and
    ``best_match``. ``k``, ``d``."""

    overlap: np.ndarray
    pair_mean: np.ndarray
    pair_std: np.ndarray
    mean: np.ndarray
    isotropic_std: np.ndarray
    conditional_mean: np.ndarray
    conditional_std: np.ndarray
    best_match: np.ndarray
    k: int
    d: int


def check_k(k: int, head_dims) -> None:
    """A one-line UserError unless ``1 <= k <= m_p`` in every layer (``head_dims`` one head
    size ``d_head`` or one per layer)."""
    sizes = np.unique(head_dims)
    d_head = int(sizes[0])
    if not 1 <= k <= d_head:
        name = "d_head" if len(sizes) == 1 else "the smallest layer's d_head"
        raise UserError(f"top_k = {k} is outside 1 .. {name} = {d_head} (allowed: an int in"
                        f" [1, {d_head}])")


def _read_bases(sides: ReadSides, layer: int, k: int, group: int, m: int):
    """Layer ``layer``'s read bases stacked ``((h + 2 n_kv) m, d)`` (``U`` of every head, then
    the KV heads' ``W_K`` and ``W_V`` row-space bases: the first ``m`` rows, the layer's head
    size) and per type its ``(first basis, coefficients (n, g k, m))``: the top-k read vectors
    of the ``g`` heads of each of its ``n`` bases in that basis, ``X_i[:k] Q^T`` (``g = 1``
    for queries); float32 tensors. Cost ``2 h k m d`` per type."""
    import torch

    d = sides.query.shape[-1]
    blocks, coefficients, start = [], [], 0
    for vectors, step in ((sides.query, 1), (sides.key, group), (sides.read, group)):
        rows = torch.from_numpy(np.asarray(vectors[layer, :, :m], dtype=np.float32))  # (h, m, d)
        basis = rows[::step]                                                   # (n, m, d)
        top = rows[:, :k].reshape(len(basis), -1, d)                           # (n, g k, d)
        blocks.append(basis.reshape(-1, d))
        coefficients.append((start, top @ basis.transpose(1, 2)))
        start += len(basis)
    return torch.cat(blocks), coefficients


def _sum_squares(x, dims=(-1, -2)) -> np.ndarray:
    """Sums of squares of a float32 tensor over ``dims``, accumulated in float64 (numpy)."""
    import torch

    return x.square().sum(dims, dtype=torch.float64).numpy()


def read_write(sides: ReadSides, k: int) -> ReadWrite:
    """Every overlap and null of the module docstring at ``k`` (``1 <= k <= m_p`` in every
    layer), with float32 torch products (stacked small products are 5-10x faster than numpy's
    here) and float64 sums of squares; each later layer at its own head size ``m`` and KV
    group ``g`` (the writers' top-k rows are within every layer's size)."""
    import torch

    n_layers, h, _, d = sides.query.shape
    sizes, groups = sides.layout()
    check_k(k, sizes)
    writes = torch.from_numpy(np.stack([np.asarray(sides.write[e, :, :k], dtype=np.float32)
                                        for e in range(n_layers)])).reshape(n_layers, h * k, d)
    # The isotropic variance of a layer pair's mean (independent readers): tr S^2 of each
    # layer's writers.
    writer_sq = _sum_squares(writes @ writes.transpose(1, 2))
    iso_var = h * trace_null_var(k, d, h * k, writer_sq) / (h * h * k) ** 2     # (L,)
    overlap, pair_mean, pair_std = (np.full((3, n_layers, h, n_layers, h), np.nan)
                                    for _ in range(3))
    mean, isotropic_std, cond_mean, cond_std, best = (np.full((3, n_layers, n_layers), np.nan)
                                                      for _ in range(5))
    for later in range(1, n_layers):
        m, group = int(sizes[later]), int(groups[later])
        bases, coefficients = _read_bases(sides, later, k, group, m)
        products = bases @ writes[:later].reshape(-1, d).T                     # (rows, e h k)
        for t, (start, coefficient) in enumerate(coefficients):
            step = 1 if t == 0 else group           # heads per read basis
            owner, n_basis = np.arange(h) // step, h // step
            block = products[start * m:(start + n_basis) * m].reshape(n_basis, m, -1)
            cores = coefficient @ block                                        # (n, g k, e h k)
            overlap[t, later, :, :later] = _sum_squares(
                cores.reshape(h, k, later, h, k), (1, 4)) / k
            # Conditional null: P = Q A^T per (basis, earlier layer, writer), m x k.
            tr_n = _sum_squares(block.reshape(n_basis, m, later, h, k), (1, 4))  # (n, e, j)
            frames = block.reshape(n_basis, m, later, h, k).permute(0, 2, 3, 1, 4)
            tr_n2 = _sum_squares(frames.transpose(-1, -2) @ frames)
            pair_mean[t, later, :, :later] = (tr_n / m)[owner]
            pair_std[t, later, :, :later] = np.sqrt(trace_null_var(k, m, tr_n, tr_n2))[owner] / k
            # The layer pair's mean: N_i of all the earlier layer's writers at once, m x m;
            # the heads sharing a basis counted as perfectly correlated (variance x step).
            wide = block.reshape(n_basis, m, later, h * k).permute(0, 2, 1, 3)  # (n, e, m, hk)
            tr_sum = tr_n.sum(-1)                                              # (n, e)
            sum_sq = _sum_squares(wide @ wide.transpose(-1, -2))
            var_sum = step * trace_null_var(k, m, tr_sum, sum_sq)[owner].sum(0)
            cond_mean[t, later, :later] = tr_sum[owner].sum(0) / (m * h * h)
            cond_std[t, later, :later] = np.sqrt(var_sum) / (h * h * k)
            isotropic_std[t, later, :later] = np.sqrt(step * iso_var[:later])
        mean[:, later, :later] = overlap[:, later, :, :later].mean(axis=(1, 3))
        best[:, later, :later] = overlap[:, later, :, :later].max(axis=1).mean(axis=-1)
    return ReadWrite(overlap, pair_mean, pair_std, mean, isotropic_std, cond_mean, cond_std,
                     best, k, d)


def haar_similarities(k: int, d: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` draws of ``sim`` between a Haar-random k-subspace of R^d and a fixed one:
    ``tr((W_1 + W_2)^{-1} W_1) / k`` with ``W_1 = G_1 G_1^T`` (``G_1`` a ``k x k`` Gaussian:
    the Haar frame's first ``k`` coordinates before orthonormalization) and ``W_2`` Wishart
    with ``d - k`` degrees of freedom (the rest), by Bartlett's decomposition when ``d - k >=
    k`` (``O(k^3)`` a draw, not ``O(d k^2)``), else from its Gaussian factor."""
    g1 = rng.standard_normal((size, k, k))
    w1 = g1 @ np.swapaxes(g1, -1, -2)
    rest = d - k
    if rest >= k:
        lower = np.tril(rng.standard_normal((size, k, k)), -1)
        chi = np.sqrt(rng.chisquare(rest - np.arange(k), size=(size, k)))
        lower[:, np.arange(k), np.arange(k)] = chi
        w2 = lower @ np.swapaxes(lower, -1, -2)
    else:
        g2 = rng.standard_normal((size, k, rest))
        w2 = g2 @ np.swapaxes(g2, -1, -2)
    return np.trace(np.linalg.solve(w1 + w2, w1), axis1=-2, axis2=-1) / k


def max_null(k: int, d: int, n_heads: int, draws: int = MAX_NULL_DRAWS,
             seed: int = MAX_NULL_SEED) -> tuple[float, float]:
    """Mean and std of the largest of ``n_heads`` i.i.d. :func:`haar_similarities`, from
    ``draws`` seeded groups. Cost ``O(draws h k^3)``."""
    if k >= d:
        return 1.0, 0.0
    rng = np.random.default_rng(seed)
    maxima = haar_similarities(k, d, draws * n_heads, rng).reshape(draws, n_heads).max(1)
    return float(maxima.mean()), float(maxima.std(ddof=1))


#: Columns of ``read_write.parquet``, one row per type and layer pair ``earlier_layer < layer``.
COLUMNS = {"type": "string", "layer": "int64", "earlier_layer": "int64", "distance": "int64",
           "k": "int64", "mean_overlap": "float64", "null_mean": "float64",
           "null_std": "float64", "ratio": "float64", "z": "float64", "p": "float64",
           "p_adjusted": "float64", "conditional_mean": "float64",
           "conditional_std": "float64", "conditional_ratio": "float64",
           "conditional_z": "float64", "conditional_p": "float64",
           "conditional_p_adjusted": "float64", "significant_conditional": "bool",
           "best_match": "float64", "best_match_null_mean": "float64",
           "best_match_null_std": "float64", "best_match_ratio": "float64",
           "max_overlap": "float64", "max_head": "int64", "max_earlier_head": "int64",
           "max_conditional_ratio": "float64", "max_conditional_z": "float64",
           "n_pairs": "int64"}


def table_rows(rw: ReadWrite) -> list[tuple]:
    """Rows of :data:`COLUMNS`: each layer pair's mean overlap beside its isotropic and
    conditional nulls (z, one-sided gamma p, BH over the layer pairs of the type), its best
    match beside :func:`max_null`, and its strongest head pair against that pair's conditional
    null. Cost O(L^2 h^2)."""
    n_layers, h = rw.overlap.shape[1:3]
    later, earlier = np.tril_indices(n_layers, -1)
    chance = null_mean(rw.k, rw.d)
    best_mean, best_std = max_null(rw.k, rw.d, h)
    rows = []
    for t, name in enumerate(TYPES):
        values = rw.mean[t, later, earlier]
        z, p = null_test(values, chance, rw.isotropic_std[t, later, earlier])
        cz, cp = null_test(values, rw.conditional_mean[t, later, earlier],
                           rw.conditional_std[t, later, earlier])
        p_adj, cp_adj = benjamini_hochberg(p), benjamini_hochberg(cp)
        for n, (b, a) in enumerate(zip(later, earlier, strict=True)):
            block = rw.overlap[t, b, :, a, :]
            i, j = np.unravel_index(int(np.argmax(block)), block.shape)
            top = block[i, j]
            top_mean, top_std = rw.pair_mean[t, b, i, a, j], rw.pair_std[t, b, i, a, j]
            with np.errstate(divide="ignore", invalid="ignore"):
                top_z = (top - top_mean) / top_std if top_std > 0 else float("nan")
                c_mean = rw.conditional_mean[t, b, a]
                rows.append((name, int(b), int(a), int(b - a), rw.k, float(values[n]), chance,
                             float(rw.isotropic_std[t, b, a]), float(values[n] / chance),
                             float(z[n]), float(p[n]), float(p_adj[n]), float(c_mean),
                             float(rw.conditional_std[t, b, a]), float(values[n] / c_mean),
                             float(cz[n]), float(cp[n]), float(cp_adj[n]),
                             bool(cp_adj[n] <= FDR_Q), float(rw.best_match[t, b, a]),
                             best_mean, best_std, float(rw.best_match[t, b, a] / best_mean),
                             float(top), int(i), int(j), float(top / top_mean), float(top_z),
                             h * h))
    return rows


def load_sides(inputs, model: dict) -> ReadSides:
    """The stored vectors of every layer range (a Snakemake ``input`` with entries ``query,
    key, read, write``, lists of chunk files; :func:`results_io.load_layers`), in layer
    order, of the model of ``model.json`` record ``model`` (its per-layer head sizes and
    KV-head counts, :mod:`head_layout`). Memory: the four ``(L, h, m, d)`` float32 arrays."""
    from .head_layout import head_dims, kv_heads
    from .results_io import load_layers

    return ReadSides(**{name: load_layers(getattr(inputs, name))
                        for name in ("query", "key", "read", "write")},
                     n_kv_heads=kv_heads(model), head_dims=head_dims(model))


def write_read_write(sides: ReadSides, k: int, path) -> None:
    """``read_write.parquet`` (:data:`COLUMNS`) at ``k``."""
    from .results_io import write_rows

    write_rows(path, COLUMNS, table_rows(read_write(sides, k)))
