"""Q-, K- and V-composition of every ordered pair of heads (Elhage et al. 2021), from the
``d_head``-sized factors the extraction stores, never from ``d x d`` products.

Per head (``m = d_head``, rows orthonormal, ``s`` descending):
``W_QK = W_Q_i^T W_K_j = U^T diag(s) V`` (``U``: ``query_vectors``, ``V``: ``vectors``,
``s``: ``singular_values``; score ``x_q^T W_QK x_k``) and ``W_OV = W_O_i W_V_j = A^T diag(t) B``
(``A``: ``ov_write_vectors``, ``B``: ``ov_read_vectors``, ``t``: ``ov_singular_values``; output
``W_OV x``). For an earlier head ``e`` and a later head ``l``:

- K-composition ``||W_QK_l W_OV_e||_F / (||W_QK_l||_F ||W_OV_e||_F)``: how much of what ``e``
  writes the keys of ``l`` read; ``W_QK_l W_OV_e = U_l^T (s_l V_l A_e^T t_e) B_e``, so the
  numerator is ``||diag(s_l) V_l A_e^T diag(t_e)||_F`` (an ``m x m`` core);
- Q-composition ``||W_QK_l^T W_OV_e||_F / (...)``: the queries of ``l``;
  ``||diag(s_l) U_l A_e^T diag(t_e)||_F``;
- V-composition ``||W_OV_l W_OV_e||_F / (...)``: the values of ``l``;
  ``||diag(t_l) B_l A_e^T diag(t_e)||_F``;

with ``||W_QK||_F^2 = sum s^2``, ``||W_OV||_F^2 = sum t^2``. The orthonormal outer factors drop
out of the Frobenius norms, so each pair costs one ``m x d x m`` product, and all heads of a
layer pair one GEMM ``(3 h m, d) x (d, h m)`` (the three later sides stacked): ``6 (h m)^2 d``
flops per layer pair, ``3 (L h m)^2 d`` for the model, against ``O(d^3)`` per head pair formed.
Signs and rotations within repeated singular values cancel in the norms. Folded norm gains
(``fold_norms``) make these the maps between the normalized stream each head reads and the
residual stream it writes to, up to the normalization's scalar.

Null (:func:`isotropic_null`): the same scores of isotropic random weights of the same factor
shapes (Gaussian ``W_Q, W_K, W_V, W_O``). If ``W_O_e`` is Gaussian, ``A_e`` is a Haar-random
``m``-frame independent of ``t_e`` and of head ``l``, and ``E[a a^T] = I/d`` for each of its rows
``a``: ``E[||X W_OV_e||_F^2] = ||X||_F^2 ||W_OV_e||_F^2 / d`` for any fixed ``X``. So for every
type **E[score^2] = 1/d exactly** (whatever head ``l`` is; checked by Monte Carlo in the
tests); the three types' nulls are one distribution (``W_QK``, ``W_QK^T`` and ``W_OV`` of
Gaussian factors are all products of two independent ``m``-rank Gaussian factors), and the
score's mean and std come from Monte Carlo. p-values: upper tail of the gamma distribution
with those two moments (:func:`multiplicity.gamma_p`), BH over all pairs of one type.

Row-space-conditional null (:func:`composition`, :func:`conditional_tests`): the later head's
singular vectors rotated by a Haar ``C`` in ``O(m)`` inside their own row space (``Q``, ``m``
rows), singular values kept. With ``M = Q A_e^T diag(t_e)``, ``N = M M^T`` and ``d`` the later
head's squared singular values, the numerator is ``tr(diag(d) C N C^T)``: mean ``sum(d) tr N /
m``, variance ``2 sum (d - mean d)^2 (tr N^2 - (tr N)^2 / m) / ((m - 1)(m + 2))`` (from the
moments of ``C_ij^2``; checked by Monte Carlo in the tests), both divided by the norms'
product (squared for the variance): the exact null of ``score^2``. p-values: the gamma with
those two moments (calibrated to ~1e-3, too light beyond), and for the pairs below
:data:`REFINE_BELOW` the saddlepoint tail of the whole null (:func:`refined_conditional_p`:
``P_ab = C_ab^2`` is doubly stochastic, so the centred numerator is ``sum_ab (d_a - mean
d)(nu_b - mean nu) P_ab``, ``nu`` the eigenvalues of ``N``; ``C_ab`` taken Gaussian with the
exact variance, a quadratic form in Gaussians; conservative in the far tail, where the Haar
null is bounded and the Gaussian is not). Per refined pair ``2 m^2 d + O(m^3)`` flops and
``O(m^2)`` per saddlepoint iteration: SmolLM2-135M (16 000 of 106 000 pairs refined) takes
the composition job from 4.4 s to 31 s wall (15 s CPU); random weights (~0.1 % refined) at
Qwen2.5-3B shapes ~2 s per 500 pairs.

Layers of different head sizes (Gemma 4; :mod:`head_layout`'s padded arrays): every pair is
computed at its two layers' own sizes, ``m_l`` (later) and ``m_e`` (earlier), from the first
``m_p`` rows and singular values of each head (the padding is never read): ``M`` is ``m_l x
m_e``, the conditional null is in the later head's ``m_l``-dimensional row space, the KV
grouping each layer's ``h / n_kv_p``. E[score^2] = 1/d holds for any sizes, but the score's
distribution does not: the isotropic null is drawn once per distinct ``(m_e, m_l)``
(:func:`isotropic_nulls`; one for a uniform model, four for two sizes) and each pair is tested
against its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .extraction import in_threads, layer_workers, unmap_large_frees
from .head_layout import pad_to
from .kernels import circuit_svd
from .multiplicity import FDR_Q, benjamini_hochberg, gamma_p, quadratic_form_p

#: Composition types, in the order of the score array's first axis.
TYPES = ("q", "k", "v")
#: Heads of each of the two random layers whose ``NULL_HEADS^2`` pairs give the null.
NULL_HEADS = 32
#: Seed of the null's random weights.
NULL_SEED = 0
#: Pairs per type listed in the top table at least (beyond the significant ones).
TOP_PAIRS = 20
#: Pairs whose conditional gamma p is below this get the saddlepoint tail
#: (:func:`refined_conditional_p`); the gamma was measured calibrated above it.
REFINE_BELOW = 1e-3
#: Float32 elements of later-head rows (and as many of write rows) gathered at once by
#: :func:`refined_conditional_p` (64 MiB each).
REFINE_CHUNK = 1 << 24


@dataclass
class Circuits:
    """The per-head factors of ``L`` layers: ``query``, ``key``, ``write``, ``read`` ``(L, h, m,
    d)`` (rows as in the module docstring; memory-mapped arrays are read one layer at a time),
    ``qk_sigma``, ``ov_sigma`` ``(L, h, m)``; ``n_kv_heads`` KV heads (one count, or ``(L,)``
    per layer; 0: ``h``), whose query heads ``j g .. (j + 1) g - 1`` share the row spaces of
    ``W_K_j`` and ``W_V_j``; ``head_dims`` ``(L,)`` each layer's head size ``m_p <= m`` (None:
    ``m``), its rows and singular values ``r >= m_p`` padding (:mod:`head_layout`), never
    read."""

    query: np.ndarray
    key: np.ndarray
    qk_sigma: np.ndarray
    write: np.ndarray
    read: np.ndarray
    ov_sigma: np.ndarray
    n_kv_heads: int | np.ndarray = 0
    head_dims: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.write.shape

    def layout(self) -> tuple[np.ndarray, np.ndarray]:
        """:func:`layer_layout` of these factors."""
        n_layers, h, m, _ = self.shape
        return layer_layout(n_layers, h, m, self.n_kv_heads, self.head_dims)


def layer_layout(n_layers: int, n_heads: int, d_head: int, n_kv_heads=0, head_dims=None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(L,)`` int head sizes ``m_p`` and query heads per KV head ``g_p = h // n_kv_p`` of
    stored ``(L, h, d_head, ...)`` arrays: ``head_dims`` (None: ``d_head`` in every layer),
    ``n_kv_heads`` one count or one per layer (0: ``h``, every head its own KV head). O(L)."""
    sizes = (np.full(n_layers, d_head) if head_dims is None
             else np.asarray(head_dims, dtype=int).reshape(n_layers))
    kv = np.broadcast_to(np.asarray(n_kv_heads, dtype=int), (n_layers,))
    return sizes, n_heads // np.where(kv == 0, n_heads, kv)


def _layer(array: np.ndarray, layer: int, m: int) -> torch.Tensor:
    """One layer's first ``m`` vectors of each head, ``(h, m, d)``, as a float32 ``(h m, d)``
    tensor (a view of ``array`` where it is float32 and ``m`` all its rows)."""
    block = np.ascontiguousarray(array[layer, :, :m], dtype=np.float32)
    return torch.from_numpy(block).reshape(-1, block.shape[-1])


def _spread(squares: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """``(L, h)`` ``sum_{r < m_p} (x_r - mean x)^2`` of each head's ``(m,)`` weights ``x``
    (``squares`` ``(L, h, m)``; the mean over its layer's ``m_p`` entries, the padding left
    out). Cost O(L h m)."""
    mask = np.arange(squares.shape[-1]) < sizes[:, None, None]
    mean = squares.sum(-1, keepdims=True) / sizes[:, None, None]
    return np.square(np.where(mask, squares - mean, 0.0)).sum(-1)


def composition_scores(c: Circuits) -> np.ndarray:
    """The scores of :func:`composition`."""
    return composition(c).scores


@dataclass
class Composition:
    """``scores`` ``(3, L h, L h)`` (:func:`composition`) and the row-space-conditional null of
    each pair's squared score: its exact ``conditional_mean`` and ``conditional_std`` (same
    shape; see the module docstring)."""

    scores: np.ndarray
    conditional_mean: np.ndarray
    conditional_std: np.ndarray


def composition(c: Circuits, device: str | torch.device = "cpu") -> Composition:
    """``(3, L h, L h)`` float64 scores (:data:`TYPES` order; row = later head ``l h + i``,
    column = earlier head ``e h + j``; NaN where the column's layer is not earlier, and where a
    head's map is zero), with the conditional null of their squares; computed on ``device``.

    Every later head's rows ``X`` (``U_l``, ``V_l`` or ``B_l``) lie in the row space of a basis
    ``Q`` (``m`` orthonormal rows): its own rows, or, for the key (value) sides of the ``g = h /
    n_kv`` heads of a KV head, the first head's rows ``Q_j``, which span ``W_K_j`` (``W_V_j``):
    ``X = C Q`` with ``C = X Q^T`` (``m x m``, ``I`` for its own rows). With ``M_{Q,e} = Q A_e^T
    diag(t_e)`` and ``N = M M^T`` (``m x m``), the squared numerator is ``||diag(s) C M||_F^2 =
    <G, N>`` with ``G = C^T diag(s^2) C`` (``diag(s^2)`` for its own rows: ``sum_r s_r^2
    N_rr``), and the conditional null needs ``tr N`` and ``tr N^2 - (tr N)^2 / m = ||N - (tr N
    / m) I||_F^2``. So per layer
    pair: one float32 GEMM of the later layer's stacked bases (``h`` query bases and ``n_b``
    key and value bases each: ``n_b = n_kv`` under GQA, ``h`` without) with ``A_e^T`` gives
    every ``M``; one batched product every ``N``; the rest is ``O(h^2 m^2)`` in float64. Cost
    per layer pair ``2 (h + 2 n_b) m d h m`` (``6 (h m)^2 d`` with ``g = 1``) plus ``2 (h +
    2 n_b) h m^3``, per later layer ``4 h m^2 d`` for ``C`` under GQA. On the CPU as many
    later layers at once as torch has threads, each with one thread
    (:func:`extraction.in_threads`: small products run badly on threads shared with other
    processes); on a GPU one. Memory per later layer in flight (at most workers + 1) its
    float32 bases and three ``(h + 2 n_b) m x h m`` float32 blocks, on ``device``, beside the
    write vectors of every earlier layer (views of ``c.write`` on the CPU) and the three
    ``(3, L h, L h)`` float64 results.

    Per-layer sizes (:mod:`head_layout`): each layer is read at its own head size ``m_p`` (the
    first ``m_p`` rows and singular values of each head, the padding never) and KV grouping
    ``g_p``; a layer pair's ``M`` is ``m_l x m_e`` (later, earlier), ``N``, ``G``, ``C`` and
    the conditional null are the later layer's, ``m = m_l``. The costs above with ``m^2``
    read ``m_l m_e``; a write layer with ``m_e`` below the array's width is copied (``h m_e
    d`` float32).
    """
    device = torch.device(device)
    n_layers, h, _, _ = c.shape
    sizes, groups = c.layout()
    qk_sq = np.square(np.asarray(c.qk_sigma, dtype=np.float64))
    ov_sq = np.square(np.asarray(c.ov_sigma, dtype=np.float64))
    qk_norm2, ov_norm2 = qk_sq.sum(-1), ov_sq.sum(-1)
    # Spread of each later head's weights d = s^2 about their mean: sum (d - mean d)^2.
    spread = {name: _spread(x, sizes) for name, x in (("qk", qk_sq), ("ov", ov_sq))}
    out = np.full((3, 3, n_layers, h, n_layers, h), np.nan)      # scores, mean, std
    writes = [_layer(c.write, e, int(sizes[e])).to(device) for e in range(n_layers - 1)]  # A_e
    t_all = [torch.as_tensor(np.asarray(c.ov_sigma[e, :, :sizes[e]], dtype=np.float32),
                             device=device) for e in range(n_layers - 1)]                # t_e

    def later_layer(later: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        m = int(sizes[later])
        sides = _later_sides(c, later, groups[later], qk_sq[later, :, :m], ov_sq[later, :, :m],
                             device)
        # The three blocks of every pair, allocated once (fresh ones fault their pages in).
        n_rows, widest = sum(sides.counts), max(m, int(sizes[:later].max()))
        work = torch.empty((3, n_rows * h * m * widest), dtype=torch.float32, device=device)
        return [_pair_moments(sides, writes[e], t_all[e], m, work) for e in range(later)]

    workers = layer_workers(device, torch.get_num_threads())
    for later, moments in enumerate(in_threads(later_layer, range(1, n_layers), workers), 1):
        m = int(sizes[later])
        c_var = 2 / ((m - 1) * (m + 2)) if m > 1 else 0.0
        norms2 = np.stack([qk_norm2[later], qk_norm2[later], ov_norm2[later]])  # (3, h)
        spreads = np.stack([spread["qk"][later], spread["qk"][later], spread["ov"][later]])
        for earlier, (sums, tr_n, spread_n) in enumerate(moments):
            scale = norms2[:, :, None] * ov_norm2[earlier][None, None, :]
            with np.errstate(divide="ignore", invalid="ignore"):
                out[0, :, later, :, earlier, :] = np.sqrt(np.maximum(sums, 0) / scale)
                out[1, :, later, :, earlier, :] = (tr_n / m / ov_norm2[earlier][None, None, :])
                var = c_var * spreads[:, :, None] * spread_n
                out[2, :, later, :, earlier, :] = np.sqrt(var) / scale
    out = out.reshape(3, 3, n_layers * h, n_layers * h)
    out[1:, np.isnan(out[0])] = np.nan
    return Composition(*out)


@dataclass
class _Sides:
    """One later layer's side of :func:`composition`: ``bases`` ``(n_q + 2 n_b) m x d``
    (float32: the query bases, then the key and the value bases), ``counts`` ``(n_q, n_b,
    n_b)``, and per type the weights of ``<G, N>``: ``(h, m)`` squared singular values where
    each head is its own basis, else ``G`` ``(n_b, g, m, m)`` float64."""

    bases: torch.Tensor
    counts: tuple[int, int, int]
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _later_sides(c: Circuits, later: int, group: int, qk_sq: np.ndarray, ov_sq: np.ndarray,
                 device: torch.device) -> _Sides:
    """The bases and weights of layer ``later`` (``qk_sq``, ``ov_sq``: its ``(h, m)`` squared
    singular values; see :func:`composition`). Cost ``4 h m^2 d + 4 h m^3`` under GQA (``C``
    and ``G`` of the key and value sides), nothing more without."""
    m = qk_sq.shape[1]
    query, key, read = (_layer(x, later, m).to(device) for x in (c.query, c.key, c.read))
    qk_sq, ov_sq = (torch.as_tensor(x, device=device) for x in (qk_sq, ov_sq))
    h = qk_sq.shape[0]
    if group == 1:
        return _Sides(torch.cat([query, key, read]), (h, h, h), (qk_sq, qk_sq, ov_sq))
    d = c.shape[3]
    bases, weights = [], [qk_sq]
    for side, sq in ((key, qk_sq), (read, ov_sq)):
        basis = side.reshape(-1, group, m, d)[:, 0]                          # (n_kv, m, d)
        coefficient = (side.reshape(-1, group * m, d) @ basis.transpose(1, 2)).double()
        coefficient = coefficient.reshape(-1, group, m, m)                    # C of each head
        weights.append(coefficient.mT @ (sq.reshape(coefficient.shape[:3])[..., None]
                                         * coefficient))
        bases.append(basis.reshape(-1, d))
    n_b = h // group
    return _Sides(torch.cat([query, *bases]), (h, n_b, n_b), tuple(weights))


def _pair_moments(sides: _Sides, write: torch.Tensor, t: torch.Tensor, m: int,
                  work: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(3, h, h)`` float64 ``<G, N>``, ``tr N`` and ``tr N^2 - (tr N)^2 / m = ||N - (tr N /
    m) I||_F^2`` (centred: no cancellation) of every (later head, earlier head) of one layer
    pair (``m`` the later layer's head size, ``m_e`` the earlier's: ``write`` ``A_e`` ``(h
    m_e, d)``, ``t`` ``(h, m_e)``; ``M`` is ``m x m_e``, ``N`` ``m x m``; :func:`composition`),
    in the float32 memory ``work`` (``(3, >= n_rows h m max(m, m_e))``, ``n_rows = n_q + 2
    n_b``). Cost ``2 (n_q + 2 n_b) m d h m_e + 2 (n_q + 2 n_b) h m^2 m_e``; ``<G, N>`` and the
    traces in float64."""
    h, m_e = t.shape
    n_rows = sides.bases.shape[0] // m
    size = n_rows * m * h * m_e
    products = work[0, :size].reshape(n_rows * m, h * m_e)
    blocks = work[1, :size].reshape(n_rows, h, m, m_e)
    gram = work[2, :n_rows * h * m * m].reshape(n_rows, h, m, m)
    torch.matmul(sides.bases, write.T, out=products)                         # Q A_e^T
    torch.mul(products.reshape(n_rows, m, h, m_e).transpose(1, 2), t.reshape(1, h, 1, m_e),
              out=blocks)                                                    # M per (Q, e)
    torch.matmul(blocks, blocks.mT, out=gram)                                # N per (Q, e)
    diag = gram.diagonal(dim1=-2, dim2=-1)                                   # (n_rows, h, m)
    diag64 = diag.double()
    sums, start = [], 0
    for count, weight in zip(sides.counts, sides.weights, strict=True):
        part = slice(start, start + count)
        if weight.dim() == 2:                                                # own rows
            sums.append((weight[:, None, :] * diag64[part]).sum(-1))
        else:
            sums.append(torch.einsum("jgab,jeab->jge", weight,
                                     gram[part].double()).reshape(h, h))
        start += count
    trace = diag64.sum(-1)                                                   # (n_rows, h)
    diag.sub_((trace / m).to(gram.dtype)[..., None])                         # N - tr N / m I
    centred = torch.linalg.vector_norm(gram, dim=(-2, -1)).double().square()
    basis = torch.stack([part.repeat_interleave(h // count)   # each later head's basis
                         for part, count in zip(torch.arange(n_rows).split(sides.counts),
                                                sides.counts, strict=True)])          # (3, h)
    basis = basis.to(trace.device)
    return tuple(x.cpu().numpy() for x in (torch.stack(sums), trace[basis], centred[basis]))


def random_circuits(n_layers: int, n_heads: int, d: int, d_head,
                    rng: np.random.Generator) -> Circuits:
    """The factors of ``n_layers`` layers of ``n_heads`` heads (one KV head each) with
    standard Gaussian ``W_Q, W_K, W_V, W_O``, by the extraction's routines
    (:func:`kernels.circuit_svd`); ``d_head`` one head size or one per layer (then padded to
    the largest, :mod:`head_layout`). Cost ``O(n_layers n_heads d d_head^2)``."""
    sizes = np.broadcast_to(np.asarray(d_head, dtype=int), (n_layers,))
    widest = int(sizes.max())
    parts = {name: [] for name in ("query", "key", "qk_sigma", "write", "read", "ov_sigma")}
    for m in sizes.tolist():
        w_q, w_k, w_v, w_o_t = (torch.from_numpy(rng.standard_normal((n_heads * m, d)))
                                for _ in range(4))
        qk = circuit_svd(w_q, w_k, n_heads, n_heads, m)
        ov = circuit_svd(w_o_t, w_v, n_heads, n_heads, m)
        for name, x in (("query", qk.left), ("key", qk.right), ("qk_sigma", qk.singular_values),
                        ("write", ov.left), ("read", ov.right), ("ov_sigma", ov.singular_values)):
            x = x.numpy()
            parts[name].append(pad_to(x, (n_heads, widest, *x.shape[2:]), 0.0))
    return Circuits(**{name: np.stack(x) for name, x in parts.items()}, head_dims=sizes)


@dataclass(frozen=True)
class CompositionNull:
    """Per type (:data:`TYPES` order): the isotropic null's ``mean``, ``std`` of the score,
    ``mean_square`` (Monte Carlo) of its square, whose exact value is ``exact_mean_square =
    1/d``; ``n_pairs`` pairs drawn."""

    mean: np.ndarray
    std: np.ndarray
    mean_square: np.ndarray
    exact_mean_square: float
    n_pairs: int

    def pair_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """The score's null mean and std per type, ``(3, 1, 1)``: broadcasting against the
        ``(3, L h, L h)`` scores."""
        return self.mean[:, None, None], self.std[:, None, None]


def isotropic_null(d: int, d_head, n_heads: int = NULL_HEADS,
                   seed: int = NULL_SEED) -> CompositionNull:
    """The scores of every (later, earlier) pair of two random layers of ``n_heads`` heads
    (:func:`random_circuits`, seeded) of head size ``d_head``, or ``(m_e, m_l)`` (earlier,
    later): ``n_heads^2`` pairs per type, correlated through their shared heads (the mean is
    unbiased; the std good to a few percent at 32 heads). Cost :func:`composition_scores`'
    for one layer pair of ``n_heads`` heads, ``6 n^2 m_e m_l d``."""
    rng = np.random.default_rng(seed)
    scores = composition_scores(random_circuits(2, n_heads, d, d_head, rng))
    pairs = scores[:, n_heads:, :n_heads].reshape(3, -1)
    return CompositionNull(pairs.mean(1), pairs.std(1, ddof=1), np.square(pairs).mean(1),
                           1 / d, pairs.shape[1])


@dataclass(frozen=True)
class IsotropicNulls:
    """The isotropic null of a model whose layers may differ in head size: ``by_sizes`` the
    :func:`isotropic_null` of each ``(m_e, m_l)`` (earlier, later) that a layer pair has; the
    model's ``head_dims`` ``(L,)`` and ``n_heads`` per layer."""

    by_sizes: dict[tuple[int, int], CompositionNull]
    head_dims: np.ndarray
    n_heads: int

    @property
    def uniform(self) -> bool:
        """Whether every layer has one head size (one null for every pair)."""
        return len(set(self.head_dims.tolist())) == 1

    def pair_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """The score's null mean and std per type and pair, broadcasting against the ``(3, L
        h, L h)`` scores: the one null's ``(3, 1, 1)`` where :attr:`uniform`, else ``(3, L h,
        L h)``, each pair's from its layers' sizes (NaN where the earlier layer is not
        earlier). Cost O((L h)^2) for a mixed model."""
        if self.uniform:
            return next(iter(self.by_sizes.values())).pair_moments()
        n_layers = len(self.head_dims)
        moments = np.full((2, 3, n_layers, n_layers), np.nan)
        for later, earlier in zip(*np.tril_indices(n_layers, -1), strict=True):
            null = self.by_sizes[int(self.head_dims[earlier]), int(self.head_dims[later])]
            moments[:, :, later, earlier] = null.mean, null.std
        grid = np.repeat(np.repeat(moments, self.n_heads, axis=2), self.n_heads, axis=3)
        return grid[0], grid[1]


def isotropic_nulls(d: int, head_dims, n_heads: int, null_heads: int = NULL_HEADS,
                    seed: int = NULL_SEED) -> IsotropicNulls:
    """:func:`isotropic_null` (of ``null_heads`` random heads per layer) once per distinct
    ``(m_e, m_l)`` of the layer pairs ``e < l`` of a model with ``(L,)`` ``head_dims`` and
    ``n_heads`` heads per layer (one null for a uniform model; a one-layer model gets its
    ``(m, m)``). Cost that of one null per distinct size pair (four for two sizes)."""
    sizes = np.asarray(head_dims, dtype=int)
    later, earlier = np.tril_indices(len(sizes), -1)
    pairs = (sorted(set(zip(sizes[earlier].tolist(), sizes[later].tolist(), strict=True)))
             or [(int(sizes[0]), int(sizes[0]))])
    return IsotropicNulls({pair: isotropic_null(d, pair, null_heads, seed) for pair in pairs},
                          sizes, n_heads)


def pair_tests(scores: np.ndarray, null: CompositionNull | IsotropicNulls
               ) -> dict[str, np.ndarray]:
    """Per type and pair (``scores``' shape): ``ratio`` (score over the null mean), ``z``,
    one-sided ``p`` (:func:`multiplicity.gamma_p`) and ``p_adjusted`` (BH over every finite
    pair of that type), against each pair's isotropic null (``null.pair_moments()``). Cost
    O(n log n) for n pairs."""
    mean, std = null.pair_moments()
    p = gamma_p(scores, mean, std)
    p = np.where(np.isnan(scores), np.nan, p)
    return {"ratio": scores / mean, "z": (scores - mean) / std, "p": p,
            "p_adjusted": np.stack([benjamini_hochberg(x) for x in p])}


def conditional_tests(comp: Composition, c: Circuits | None = None,
                      refine_below: float = REFINE_BELOW) -> dict[str, np.ndarray]:
    """Per type and pair, against the row-space-conditional null of the squared score:
    ``conditional_ratio`` (``score^2`` over its null mean), ``conditional_z``, one-sided
    ``conditional_p`` and ``conditional_p_adjusted`` (BH over every finite pair of that type).
    The p is :func:`multiplicity.gamma_p`'s with the exact mean and std; with the factors
    ``c``, the pairs whose gamma p is below ``refine_below`` get the saddlepoint tail of
    :func:`refined_conditional_p` instead (the gamma's tail is too light beyond ~1e-4)."""
    square, mean, std = np.square(comp.scores), comp.conditional_mean, comp.conditional_std
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(np.isnan(square), np.nan, gamma_p(square, mean, std))
        if c is not None:
            candidates = np.argwhere(p < refine_below)
            p[tuple(candidates.T)] = refined_conditional_p(c, comp, candidates)
        return {"conditional_ratio": square / mean, "conditional_z": (square - mean) / std,
                "conditional_p": p,
                "conditional_p_adjusted": np.stack([benjamini_hochberg(x) for x in p])}


def refined_conditional_p(c: Circuits, comp: Composition, pairs: np.ndarray) -> np.ndarray:
    """The row-space-conditional p of the squared score of ``pairs`` (``(n, 3)`` indices
    ``(type, later, earlier)`` into ``comp.scores``) from its whole null distribution, not
    its two moments.

    Null: ``X = tr(D R N R^T)``, ``R`` Haar in ``O(m)``, ``D = diag(d)`` the later head's
    squared singular values (``s^2``; ``t^2`` for V), ``N = M M^T`` with ``M = X_l A_e^T
    diag(t_e)`` from the later head's own rows ``X_l`` of that type (its eigenvalues ``nu``
    are those of the basis ``N`` of :func:`composition`: the rows differ by an orthogonal
    ``C``). ``P_ab = R_ab^2`` is doubly stochastic, so ``X - mean(d) tr N = sum_ab (d_a -
    mean d)(nu_b - mean nu) P_ab`` exactly. With ``R_ab`` taken as ``g_ab / sqrt(m)``
    Gaussian, scale matched to the exact variance: ``Y = sum_ab lambda_ab g_ab^2``,
    ``lambda_ab = (d_a - mean d)(nu_b - mean nu) / sqrt((m - 1)(m + 2))`` (mean 0, variance
    ``2 sum lambda^2`` = the exact conditional variance), whose upper tail at ``X - E X``
    is :func:`multiplicity.quadratic_form_p` (saddlepoint). The Haar ``X`` is bounded (by
    ``sum d_(a) nu_(a)``, both sorted), the Gaussian ``Y`` is not: in the far tail this p is
    conservative (larger than the exact one); from 1e-2 to 1e-4 it is within a factor ~1.5 of
    Monte Carlo of the Haar null and never much lighter (tests). Cost per pair ``2 m^2 d``
    (``M``, float32, batched), ``O(m^3)`` (``eigvalsh`` of ``N``) and ``O(m^2)`` per saddlepoint
    iteration (~10); memory :data:`REFINE_CHUNK` pairs' rows at once. Per-layer sizes: each
    pair at its later head's ``m_l`` and its earlier head's ``m_e`` (``M`` is ``m_l x m_e``),
    the pairs taken by ``(m_l, m_e)``."""
    h, d = c.shape[1], c.shape[3]
    sizes = c.layout()[0]
    out = np.full(len(pairs), np.nan)
    later_m, earlier_m = sizes[pairs[:, 1] // h], sizes[pairs[:, 2] // h]
    for m, m_e in np.unique(np.stack([later_m, earlier_m], axis=1), axis=0).tolist():
        if m < 2:
            continue
        chosen = np.flatnonzero((later_m == m) & (earlier_m == m_e))
        chunk = max(1, REFINE_CHUNK // (max(m, m_e) * d))
        for start in range(0, len(chosen), chunk):
            part = chosen[start:start + chunk]
            out[part] = _refined_p(c, comp, pairs[part], m, m_e)
    return out


def _refined_p(c: Circuits, comp: Composition, pairs: np.ndarray, m: int, m_e: int
               ) -> np.ndarray:
    """:func:`refined_conditional_p` of ``pairs`` whose later heads have size ``m`` and
    earlier heads ``m_e``, all at once."""
    h = c.shape[1]
    sides = (c.query, c.key, c.read)
    sigma = (c.qk_sigma, c.qk_sigma, c.ov_sigma)
    kind, later, earlier = pairs.T
    rows = np.empty((len(pairs), m, c.shape[3]), dtype=np.float32)
    weights = np.empty((len(pairs), m))
    for t in range(3):
        sel = np.flatnonzero(kind == t)
        if sel.size:
            layer, head = later[sel] // h, later[sel] % h
            rows[sel] = sides[t][layer, head, :m]
            weights[sel] = np.square(np.asarray(sigma[t][layer, head, :m], dtype=np.float64))
    layer, head = earlier // h, earlier % h
    write = np.asarray(c.write[layer, head, :m_e], dtype=np.float32)
    t_e = np.asarray(c.ov_sigma[layer, head, :m_e], dtype=np.float64)
    core = torch.from_numpy(rows) @ torch.from_numpy(write).mT                # X_l A_e^T
    core = core.double() * torch.from_numpy(t_e)[:, None, :]                 # M
    nu = torch.linalg.eigvalsh(core @ core.mT).numpy()                      # of N
    scale = weights.sum(1) * np.square(t_e).sum(1)
    lam = ((weights - weights.mean(1, keepdims=True))[:, :, None]
           * (nu - nu.mean(1, keepdims=True))[:, None, :]).reshape(len(pairs), -1)
    lam /= (np.sqrt((m - 1) * (m + 2)) * scale)[:, None]
    excess = (np.square(comp.scores[kind, later, earlier])
              - comp.conditional_mean[kind, later, earlier])
    return quadratic_form_p(lam, excess)


def top_pairs(scores: np.ndarray, tests: dict[str, np.ndarray],
              null: CompositionNull | IsotropicNulls, n_heads: int,
              least: int = TOP_PAIRS) -> list[tuple]:
    """Rows of :data:`TOP_COLUMNS` for every pair significant against the conditional null
    (``tests`` of :func:`pair_tests` and, where given, :func:`conditional_tests`; else the
    isotropic one) at :data:`multiplicity.FDR_Q` after BH, and at least the ``least`` highest
    scores of each type, by type and descending score, each with its own isotropic null's
    mean and std; ``composing`` per :func:`composing_pairs`."""
    null_mean, null_std = (np.broadcast_to(x, scores.shape) for x in null.pair_moments())
    rows = []
    nan = np.full(scores.shape, np.nan)
    conditional = [tests.get(k, nan) for k in ("conditional_ratio", "conditional_z",
                                               "conditional_p_adjusted")]
    selected = tests.get("conditional_p_adjusted", tests["p_adjusted"])
    composing = composing_pairs(tests)
    for t, name in enumerate(TYPES):
        flat_scores = scores[t].ravel()
        finite = np.flatnonzero(~np.isnan(flat_scores))
        order = finite[np.argsort(-flat_scores[finite], kind="stable")]
        significant = selected[t].ravel() <= FDR_Q
        chosen = np.union1d(order[:least], np.flatnonzero(significant))
        chosen = chosen[np.argsort(-flat_scores[chosen], kind="stable")]
        for flat in chosen:
            later, earlier = divmod(int(flat), scores.shape[-1])
            rows.append((name, later // n_heads, later % n_heads, earlier // n_heads,
                         earlier % n_heads, float(flat_scores[flat]),
                         float(null_mean[t, later, earlier]),
                         float(null_std[t, later, earlier]),
                         *(float(tests[k][t].ravel()[flat]) for k in ("ratio", "z", "p",
                                                                     "p_adjusted")),
                         bool(tests["p_adjusted"][t].ravel()[flat] <= FDR_Q),
                         *(float(x[t].ravel()[flat]) for x in conditional),
                         bool(significant[flat]), bool(composing[t].ravel()[flat])))
    return rows


TOP_COLUMNS = {"type": "string", "layer": "int64", "head": "int64", "earlier_layer": "int64",
               "earlier_head": "int64", "score": "float64", "null_mean": "float64",
               "null_std": "float64", "ratio": "float64", "z": "float64", "p": "float64",
               "p_adjusted": "float64", "significant": "bool",
               "conditional_ratio": "float64", "conditional_z": "float64",
               "conditional_p_adjusted": "float64", "significant_conditional": "bool",
               "composing": "bool"}
NULL_COLUMNS = {"type": "string", "null_mean": "float64", "null_std": "float64",
                "mean_square": "float64", "exact_mean_square": "float64", "n_pairs": "int64",
                "seed": "int64"}
#: Those of a model whose layers differ in head size: the null of each pair of sizes, the
#: earlier (writing) layer's ``earlier_head_dim`` and the later one's ``head_dim``.
SIZED_NULL_COLUMNS = {**NULL_COLUMNS, "earlier_head_dim": "int64", "head_dim": "int64"}
LAYER_COLUMNS = {"type": "string", "layer": "int64", "earlier_layer": "int64",
                 "mean_score": "float64", "max_score": "float64", "mean_ratio": "float64",
                 "mean_z": "float64", "n_significant": "int64",
                 "mean_conditional_ratio": "float64", "n_significant_conditional": "int64",
                 "n_composing": "int64", "n_pairs": "int64"}


def composing_pairs(tests: dict[str, np.ndarray]) -> np.ndarray:
    """Boolean per type and pair (``tests`` of :func:`pair_tests` and, where given,
    :func:`conditional_tests`): a pair *composes* where it is significant after BH at
    :data:`multiplicity.FDR_Q` against both nulls, the isotropic one (it composes more than
    random heads of these shapes do) and the row-space-conditional one (more than its later
    head's row space alone explains). An intersection-union test: either null alone leaves
    pairs at isotropic chance that a row space favours (on a random-init model a few, at the
    rate BH allows), which are not circuits. Without the conditional tests, the isotropic."""
    isotropic = tests["p_adjusted"] <= FDR_Q
    if "conditional_p_adjusted" not in tests:
        return isotropic
    return isotropic & (tests["conditional_p_adjusted"] <= FDR_Q)


def _nanmean(x: np.ndarray) -> float:
    """``nanmean`` without its warning on an all-NaN block (NaN)."""
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def null_rows(null: CompositionNull, seed: int = NULL_SEED) -> list[tuple]:
    """One row per type (:data:`NULL_COLUMNS`)."""
    return [(name, float(null.mean[t]), float(null.std[t]), float(null.mean_square[t]),
             null.exact_mean_square, null.n_pairs, seed) for t, name in enumerate(TYPES)]


def null_table(nulls: IsotropicNulls, seed: int = NULL_SEED) -> tuple[dict[str, str],
                                                                     list[tuple]]:
    """The columns and rows of ``composition_null.parquet``: a uniform model's one null,
    :func:`null_rows`; else one row per type and ``(m_e, m_l)`` (by type, then sizes),
    :data:`SIZED_NULL_COLUMNS`."""
    if nulls.uniform:
        return NULL_COLUMNS, null_rows(next(iter(nulls.by_sizes.values())), seed)
    rows = [(*null_rows(null, seed)[t], *sizes) for t in range(len(TYPES))
            for sizes, null in sorted(nulls.by_sizes.items())]
    return SIZED_NULL_COLUMNS, rows


def layer_rows(scores: np.ndarray, tests: dict[str, np.ndarray], n_heads: int) -> list[tuple]:
    """Per type and layer pair ``earlier_layer < layer`` (:data:`LAYER_COLUMNS`): mean and max
    score over the ``h^2`` head pairs, mean ratio and z, pairs significant after BH against
    the isotropic and the conditional null (NaN, 0 without :func:`conditional_tests`), pairs
    composing (:func:`composing_pairs`)."""
    n_layers = scores.shape[-1] // n_heads
    nan = np.full(scores.shape, np.nan)
    tests = {"conditional_ratio": nan, "conditional_p_adjusted": nan, **tests}
    blocks = {k: v.reshape(3, n_layers, n_heads, n_layers, n_heads)
              for k, v in {"score": scores, "composing": composing_pairs(tests),
                           **tests}.items()}
    rows = []
    for t, name in enumerate(TYPES):
        for later in range(1, n_layers):
            for earlier in range(later):
                block = {k: v[t, later, :, earlier, :] for k, v in blocks.items()}
                rows.append((name, later, earlier, float(np.nanmean(block["score"])),
                             float(np.nanmax(block["score"])),
                             float(np.nanmean(block["ratio"])), float(np.nanmean(block["z"])),
                             int(np.count_nonzero(block["p_adjusted"] <= FDR_Q)),
                             _nanmean(block["conditional_ratio"]),
                             int(np.count_nonzero(block["conditional_p_adjusted"] <= FDR_Q)),
                             int(np.count_nonzero(block["composing"])), n_heads * n_heads))
    return rows


def load_circuits(inputs, model: dict) -> Circuits:
    """The stored factors of every layer range (a Snakemake ``input`` with entries ``query,
    key, qk_sigma, write, read, ov_sigma``, each a list of chunk files) of the model of
    ``model.json`` record ``model`` (its per-layer head sizes and KV-head counts,
    :mod:`head_layout`), concatenated in layer order (:func:`results_io.load_layers`).
    Memory: the four ``(L, h, d_head, d)`` float32 arrays."""
    from .head_layout import head_dims, kv_heads
    from .results_io import load_layers

    return Circuits(**{name: load_layers(getattr(inputs, name))
                       for name in ("query", "key", "qk_sigma", "write", "read", "ov_sigma")},
                    n_kv_heads=kv_heads(model), head_dims=head_dims(model))


def write_composition(c: Circuits, outputs, device: str | torch.device = "cpu") -> None:
    """Every output of rule ``composition`` (a Snakemake ``output`` with ``composition_{q,k,v},
    null, top, layers``): the three ``(L h, L h)`` score matrices in float32, the null table
    (:func:`null_table`: one null per pair of head sizes), the top pairs
    (:data:`TOP_COLUMNS`) and the layer-pair summary (:data:`LAYER_COLUMNS`); the scores
    computed on ``device`` (:func:`composition`). Blocks of 4 MiB and more go back to the
    system when freed (:func:`extraction.unmap_large_frees`: the worker threads' blocks would
    otherwise stay in their heaps)."""
    from .results_io import save_result, write_rows

    unmap_large_frees()

    n_heads, d = c.shape[1], c.shape[3]
    comp = composition(c, device)
    scores = comp.scores
    nulls = isotropic_nulls(d, c.layout()[0], n_heads)
    tests = {**pair_tests(scores, nulls), **conditional_tests(comp, c)}
    for t, name in enumerate(TYPES):
        save_result(getattr(outputs, f"composition_{name}"), scores[t].astype(np.float32))
    write_rows(outputs.null, *null_table(nulls))
    write_rows(outputs.top, TOP_COLUMNS, top_pairs(scores, tests, nulls, n_heads))
    write_rows(outputs.layers, LAYER_COLUMNS, layer_rows(scores, tests, n_heads))
