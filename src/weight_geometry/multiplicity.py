"""Tests that survive review: adjusted p-values, exact head-ordering nulls, significant drops and
trend-respecting correlations across depth.

- :func:`benjamini_hochberg`: BH-adjusted p-values of ``m`` tests (false discovery rate
  :data:`FDR_Q`), ``p_(r) m / r`` made monotone by a running minimum from the largest ``p``.
- :func:`pairing_null_exact`: exact mean and std of ``T_pi = mean_i S[a, i, b, pi(i)]`` over a
  uniform permutation ``pi`` of the ``h`` heads (Hoeffding's combinatorial CLT moments).
- :func:`pairing_permutation_p`: one-sided p that the same-index ``mean_i S[a, i, b, i]`` is as
  large as under random head orderings: all ``h!`` orderings when ``h! <=``
  :data:`MAX_EXACT_PERMUTATIONS`, else seeded Monte Carlo.
- :func:`step_drop_test`: one-sided z-test that a step of the adjacent-layer similarity is a drop
  beyond the null of a difference of two independent similarities.
- :func:`detrended_correlation`: Pearson r across depth of the residuals of linear trends in
  layer index, with an exact two-sided circular-shift p (which keeps each series'
  autocorrelation, unlike a permutation of layers).

All pure numpy (scipy is a test-only dependency); everything seeded is reproducible from its seed.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

#: False discovery rate at which BH-adjusted p-values are called significant.
FDR_Q = 0.05
#: Largest ``h!`` for which :func:`pairing_permutation_p` enumerates every ordering (h <= 7).
MAX_EXACT_PERMUTATIONS = 5040
#: Monte Carlo orderings of :func:`pairing_permutation_p` when ``h!`` is larger. The smallest
#: attainable p is ``1 / (1 + n_perm)``; BH's smallest threshold is ``FDR_Q / m``, so a lone
#: signal among ``m`` layer pairs can survive only if ``n_perm >= m / FDR_Q`` (19 800 for the
#: 990 pairs of 45 layers).
PAIRING_P_PERMUTATIONS = 20_000
#: Orderings evaluated at once by :func:`pairing_permutation_p` (memory ``O(chunk L^2)``).
PERMUTATION_CHUNK = 2048
#: Fewest finite points of :func:`detrended_correlation` (a line through 3 leaves one degree of
#: freedom, whose residual correlation is always +-1).
MIN_DETRENDED_POINTS = 4
#: Slack of ``>=`` comparisons between statistics summed in different orders.
TOLERANCE = 1e-12


def benjamini_hochberg(p) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values, same shape as ``p`` (any shape), float.

    With the ``m`` finite p-values sorted, ``p_(1) <= .. <= p_(m)``:
    ``q_(r) = min_{s >= r} min(1, p_(s) m / s)`` (step-up; monotone in ``p``; ties get the same
    value). A test is a discovery at false discovery rate ``q`` iff its adjusted value is
    ``<= q`` (valid for independent or positively dependent tests). NaN entries stay NaN and are
    not counted in ``m``. Cost O(m log m).
    """
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    finite = p[ok]
    m = finite.size
    if m == 0:
        return out
    if np.any((finite < 0) | (finite > 1)):
        raise ValueError("p-values must lie in [0, 1]")
    order = np.argsort(finite, kind="stable")
    scaled = finite[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    result = np.empty(m)
    result[order] = adjusted
    out[ok] = result
    return out


def _pair_blocks(sims: np.ndarray) -> np.ndarray:
    """``C (L, L, h, h)``, ``C[a, b, i, j] = S[a, i, b, j]``, of ``S (L, h, L, h)``."""
    sims = np.asarray(sims, dtype=float)
    if sims.ndim != 4 or sims.shape[0] != sims.shape[2] or sims.shape[1] != sims.shape[3]:
        raise ValueError(f"expected S of shape (L, h, L, h), got {sims.shape}")
    return sims.transpose(0, 2, 1, 3)


def pairing_null_exact(sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean and std ``(L, L)`` of ``T_pi = mean_i S[a, i, b, pi(i)]`` over a uniform
    random permutation ``pi`` of the ``h`` heads, per layer pair ``(a, b)`` of ``S (L, h, L, h)``.

    With ``c_ij = S[a, i, b, j]``: ``E[T] = mean_{i,j} c_ij``; by Hoeffding (1951),
    ``Var(sum_i c_{i, pi(i)}) = sum_{i,j} d_ij^2 / (h - 1)`` exactly, with the doubly centred
    ``d_ij = c_ij - mean_j' c_ij' - mean_i' c_i'j + mean_{i',j'} c_i'j'``; ``T``'s variance is
    that over ``h^2``. ``h = 1``: std 0 (one ordering). The population std of all ``h!``
    orderings, i.e. what :func:`head_matching.random_pairing_null` estimates from draws. Cost
    O(L^2 h^2) time and memory.
    """
    c = _pair_blocks(sims)
    n_heads = c.shape[-1]
    rows = c.mean(axis=3, keepdims=True)
    cols = c.mean(axis=2, keepdims=True)
    grand = c.mean(axis=(2, 3), keepdims=True)
    mean = grand[..., 0, 0]
    if n_heads == 1:
        return mean, np.zeros_like(mean)
    d = c - rows - cols + grand
    variance = np.square(d).sum(axis=(2, 3)) / (n_heads - 1) / n_heads**2
    return mean, np.sqrt(variance)


def _ordering_sums(blocks: np.ndarray, perms: np.ndarray) -> np.ndarray:
    """``(n, P)`` sums ``sum_i C[n, i, perm[i]]`` for ``n`` blocks ``(n, h, h)`` and each row of
    ``perms (P, h)``, accumulated head by head in a fixed order. Cost O(P n h), memory
    O(P n)."""
    total = np.zeros((blocks.shape[0], len(perms)))
    for i in range(blocks.shape[1]):
        total += np.take(blocks[:, i, :], perms[:, i], axis=1)
    return total


def pairing_permutation_p(sims: np.ndarray, n_perm: int = PAIRING_P_PERMUTATIONS, seed: int = 0,
                          max_exact: int = MAX_EXACT_PERMUTATIONS,
                          chunk: int = PERMUTATION_CHUNK) -> np.ndarray:
    """``(L, L)`` one-sided p-values that the same-index ``T = mean_i S[a, i, b, i]`` of each
    layer pair of ``S (L, h, L, h)`` is as large as ``T_pi = mean_i S[a, i, b, pi(i)]`` under
    uniform random orderings ``pi`` of the heads (the null: head numbers carry no identity).

    - Exact when ``h! <= max_exact``: ``p = #{pi : T_pi >= T - tol} / h!`` over all ``h!``
      orderings, the identity included (smallest attainable p: ``1 / h!``).
    - Otherwise Monte Carlo: ``p = (1 + #{T_pi >= T - tol}) / (1 + n_perm)`` over ``n_perm``
      orderings, the rows of ``rng.permutation(h)`` drawn in turn from
      ``rng = np.random.default_rng(seed)`` (smallest attainable p: ``1 / (1 + n_perm)``;
      see :data:`PAIRING_P_PERMUTATIONS` for the number BH needs).

    ``tol`` = :data:`TOLERANCE` (sums in different orders). Each ordering relabels the heads of
    every layer pair at once (as :func:`head_matching.random_pairing_null`): each pair's p is
    that of its own test; pairs' p-values are dependent only through shared draws. The
    diagonal ``a = b`` compares each head with itself (``T = 1``) and is no test. Pairs
    ``a <= b`` are computed and mirrored (``S`` is symmetric: ``(b, a)``'s orderings are the
    inverses of ``(a, b)``'s), so the result is symmetric. Cost O(P L^2 h / 2) for ``P =
    min(h!, n_perm)`` orderings; memory O(L^2 h^2 + chunk L^2) (``chunk`` orderings at once).
    """
    c = _pair_blocks(sims)
    n_layers, n_heads = c.shape[0], c.shape[2]
    upper_a, upper_b = np.triu_indices(n_layers)
    blocks = c[upper_a, upper_b]                                       # (pairs, h, h)
    observed = _ordering_sums(blocks, np.arange(n_heads)[None, :])[:, 0] / n_heads
    threshold = observed[:, None] - TOLERANCE
    count = np.zeros(len(blocks), dtype=np.int64)
    exact = math.factorial(n_heads) <= max_exact
    if exact:
        orderings = itertools.permutations(range(n_heads))
        total = math.factorial(n_heads)
    else:
        rng = np.random.default_rng(seed)
        total = n_perm
    done = 0
    while done < total:
        size = min(chunk, total - done)
        if exact:
            perms = np.array(list(itertools.islice(orderings, size)), dtype=np.intp)
        else:
            perms = np.stack([rng.permutation(n_heads) for _ in range(size)])
        count += (_ordering_sums(blocks, perms) / n_heads >= threshold).sum(axis=1)
        done += size
    p = np.empty((n_layers, n_layers))
    p[upper_a, upper_b] = count / total if exact else (1 + count) / (1 + total)
    p[upper_b, upper_a] = p[upper_a, upper_b]
    return p


def normal_cdf(z) -> np.ndarray:
    """``Phi(z) = erfc(-z / sqrt 2) / 2`` elementwise (accurate in both tails), float array."""
    z = np.asarray(z, dtype=float)
    return np.vectorize(lambda v: 0.5 * math.erfc(-v / math.sqrt(2.0)), otypes=[float])(z)


def step_drop_test(values, stds) -> tuple[np.ndarray, np.ndarray]:
    """z and one-sided p ``(n - 1,)`` that each step ``values[t+1] - values[t]`` of ``n``
    adjacent-layer similarities is a drop beyond chance.

    Null: the two similarities are independent with equal means and null stds ``stds[t]``,
    ``stds[t+1]`` (pairs (t, t+1) and (t+1, t+2) share a layer, but one Haar-random subspace
    makes their similarities independent). ``z_t = (values[t+1] - values[t]) /
    sqrt(stds[t]^2 + stds[t+1]^2)``, ``p_t = Phi(z_t)`` (normal CDF): small for a large drop.
    A zero denominator gives ``z = -inf, 0 (NaN: p NaN), +inf``. Cost O(n).
    """
    values, stds = np.asarray(values, dtype=float), np.asarray(stds, dtype=float)
    if values.ndim != 1 or values.shape != stds.shape:
        raise ValueError(f"values and stds must be equal-length 1-D, got {values.shape}, "
                         f"{stds.shape}")
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.diff(values) / np.hypot(stds[:-1], stds[1:])
    return z, normal_cdf(z)


@dataclass(frozen=True)
class DetrendedCorrelation:
    """Pearson r of linearly detrended series and its exact circular-shift p; NaN when
    ``n <`` :data:`MIN_DETRENDED_POINTS` or a residual is constant."""

    n: int
    r: float
    p: float
    method: str = "detrended, circular-shift permutation"

    @property
    def defined(self) -> bool:
        return self.n >= MIN_DETRENDED_POINTS and not math.isnan(self.r)

    def text(self) -> str:
        if self.n < MIN_DETRENDED_POINTS:
            return f"undefined (n={self.n} < {MIN_DETRENDED_POINTS})"
        if math.isnan(self.r):
            return f"undefined (a detrended series is constant, n={self.n})"
        return f"r={self.r:+.3f} ({self.method} p={self.p:.3g}, min {1 / self.n:.2g}), n={self.n}"


def linear_residuals(values: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Residuals ``(n,)`` of the least-squares line ``values ~ a + b positions``. Cost O(n)."""
    centred = positions - positions.mean()
    ss = centred @ centred
    slope = (centred @ values) / ss if ss > 0 else 0.0
    return values - values.mean() - slope * centred


def detrended_correlation(x, y, positions=None) -> DetrendedCorrelation:
    """Correlation across depth of ``x`` and ``y`` (``(n,)``, in layer order) that a shared
    trend does not make significant.

    Each series' least-squares line in ``positions`` (default ``0 .. n-1``) is removed
    (:func:`linear_residuals`); ``r`` is Pearson's r of the residuals ``u, v``. Its two-sided p
    compares ``|r|`` with ``|r_s|``, the r of ``u`` and ``v`` rotated by ``s`` places, over all
    ``n`` circular shifts ``s = 0 .. n-1`` (identity included): ``p = #{s : |r_s| >= |r| - tol}
    / n``, exact and unseeded. Shifts keep each series' autocorrelation (neighbouring layers
    alike), which a permutation of layers breaks. The smallest attainable p is ``1 / n``
    (e.g. 1/24 for 24 layers), so p < 0.05 needs n >= 21. Pairs with a non-finite value are
    dropped first (the rest keep their order). Cost O(n^2).
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    pos = np.arange(len(x), dtype=float) if positions is None else np.asarray(positions, float)
    if not x.shape == y.shape == pos.shape or x.ndim != 1:
        raise ValueError(f"x, y, positions must be equal-length 1-D, got {x.shape}, {y.shape},"
                         f" {pos.shape}")
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(pos)
    x, y, pos = x[ok], y[ok], pos[ok]
    n = len(x)
    nan = float("nan")
    if n < MIN_DETRENDED_POINTS:
        return DetrendedCorrelation(n, nan, nan)
    u, v = linear_residuals(x, pos), linear_residuals(y, pos)
    norm_u, norm_v = np.linalg.norm(u), np.linalg.norm(v)
    if norm_u <= 1e-12 * np.linalg.norm(x) or norm_v <= 1e-12 * np.linalg.norm(y):
        return DetrendedCorrelation(n, nan, nan)        # a series is (numerically) a line
    norm = norm_u * norm_v
    shifts = np.arange(n)
    rotated = v[(np.arange(n)[None, :] - shifts[:, None]) % n]      # row s: np.roll(v, s)
    r_shift = rotated @ u / norm                  # residuals have mean 0: r = u.v / |u||v|
    r = float(r_shift[0])
    p = float(np.sum(np.abs(r_shift) >= abs(r) - TOLERANCE) / n)
    return DetrendedCorrelation(n, r, p)
