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
- :func:`quadratic_form_p`: upper tail of an indefinite quadratic form in Gaussians
  (Lugannani-Rice saddlepoint), for the composition null's refined tail.
- :func:`detrended_correlation`: Pearson r across depth of the residuals of linear trends in
  layer index, with an exact two-sided circular-shift p (which keeps each series'
  autocorrelation, unlike a permutation of layers).

All pure numpy (scipy is a test-only dependency); everything seeded is reproducible from its seed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
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
#: Newton/bisection steps of :func:`quadratic_form_p` at most (Newton converges in ~10).
SADDLEPOINT_ITERATIONS = 100
#: Relative change of the saddlepoint at which :func:`quadratic_form_p` stops iterating.
SADDLEPOINT_TOLERANCE = 1e-10
#: Standardized values below which :func:`quadratic_form_p` takes the normal tail.
SADDLEPOINT_NORMAL_BELOW = 0.1


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


@dataclass(frozen=True)
class FamilyCounts:
    """A family of tests as a verdict reads it: how many ran, how many are significant after BH
    at :data:`FDR_Q` above and below their null, and the statistic's mean over the null's
    mean (:func:`count_family`)."""

    n_tests: int
    n_above: int
    n_below: int
    mean_ratio: float

    def count(self, what: str) -> str:
        below = f", {self.n_below} below" if self.n_below else ""
        return (f"{self.n_above} of {self.n_tests} {what} significantly above it{below} (BH"
                f" q = {FDR_Q})")

    def above_below(self) -> str:
        """``"n above, m below /N"``, as the report's per-KV-head table puts it."""
        return f"{self.n_above} above, {self.n_below} below /{self.n_tests}"


def count_family(values, null_means, z, p_adjusted) -> FamilyCounts:
    """:class:`FamilyCounts` of one family: tests with a finite adjusted p; above (below) = adjusted
    p <= :data:`FDR_Q` with z > 0 (< 0); mean ratio = mean of ``values`` / mean of
    ``null_means`` over those tests. Cost O(n)."""
    values, null_means = np.asarray(values, float), np.asarray(null_means, float)
    z, p_adjusted = np.asarray(z, float), np.asarray(p_adjusted, float)
    ok = np.isfinite(p_adjusted)
    significant = ok & (p_adjusted <= FDR_Q)
    ratio = values[ok].mean() / null_means[ok].mean() if ok.any() else float("nan")
    return FamilyCounts(int(ok.sum()), int((significant & (z > 0)).sum()),
                        int((significant & (z < 0)).sum()), float(ratio))


def _pair_blocks(sims: np.ndarray) -> np.ndarray:
    """``C (L, L, h, h)``, ``C[a, b, i, j] = S[a, i, b, j]``, of ``S (L, h, L, h)``."""
    sims = np.asarray(sims, dtype=float)
    if sims.ndim != 4 or sims.shape[0] != sims.shape[2] or sims.shape[1] != sims.shape[3]:
        raise ValueError(f"expected S of shape (L, h, L, h), got {sims.shape}")
    return sims.transpose(0, 2, 1, 3)


def _hoeffding(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean and variance of ``sum_i c[..., i, pi(i)]`` over uniform permutations ``pi`` of
    the last two axes' ``n`` indices, for every leading index (Hoeffding 1951): mean ``n``
    times the mean of ``c``, variance ``sum_ij d_ij^2 / (n - 1)`` with ``d`` the doubly centred
    ``c`` (0 for ``n = 1``). Cost O(size of c)."""
    n = c.shape[-1]
    grand = c.mean(axis=(-2, -1), keepdims=True)
    mean = n * grand[..., 0, 0]
    if n == 1:
        return mean, np.zeros_like(mean)
    d = c - c.mean(axis=-1, keepdims=True) - c.mean(axis=-2, keepdims=True) + grand
    return mean, np.square(d).sum(axis=(-2, -1)) / (n - 1)


def _pair_groups(group, n_layers: int) -> np.ndarray:
    """``group`` (an int, or ``(L, L)`` ints: one per layer pair) as an ``(L, L)`` array."""
    return np.broadcast_to(np.asarray(group, dtype=int), (n_layers, n_layers))


def pairing_null_exact(sims: np.ndarray, group=1) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean and std ``(L, L)`` of ``T_pi = mean_i S[a, i, b, pi(i)]`` over a random head
    ordering ``pi`` that respects the KV heads, per layer pair ``(a, b)`` of ``S (L, h, L, h)``
    whose consecutive runs of ``group`` heads share a KV head (``group`` an int, or ``(L, L)``
    ints: one per layer pair, :func:`head_matching.pairing_groups`): the KV heads of layer b
    are permuted uniformly as blocks, and the heads within each block uniformly (``group = 1``
    or ``group = h``: any permutation of the heads).

    Heads of one KV head share its row space and lean towards the same directions of it, so
    under random weights they are exchangeable only within their block, and blocks only as
    wholes: a permutation that mixes blocks would credit same-index with the overlap of two
    KV heads' row spaces. With the ``g x g`` blocks ``C_pq`` of ``c_ij = S[a, i, b, j]``:
    ``E[sum] = sum_ij c_ij / n_kv`` (``pi(i)`` is uniform over all heads); with ``(m_pq,
    v_pq)`` Hoeffding's mean and variance of the sum within block ``C_pq``
    (:func:`_hoeffding`) and ``sigma`` the blocks' permutation, ``Var = E_sigma[sum_p
    v_p,sigma(p)] + Var_sigma(sum_p m_p,sigma(p)) = sum_pq v_pq / n_kv +`` Hoeffding's
    variance of the ``n_kv x n_kv`` matrix ``m``. ``T``'s moments are these over
    ``h`` and ``h^2``. The population std over all orderings. Cost O(L^2 h^2) per distinct
    block size.
    """
    c = _pair_blocks(sims)
    n_layers, n_heads = c.shape[0], c.shape[2]
    groups = _pair_groups(group, n_layers)
    mean, std = np.empty((n_layers, n_layers)), np.empty((n_layers, n_layers))
    for size in np.unique(groups):   # every pair at each block size, kept where it applies
        n_kv = n_heads // (size if 1 < size < n_heads else n_heads)
        block = n_heads // n_kv
        blocks = c.reshape(n_layers, n_layers, n_kv, block, n_kv, block).transpose(
            0, 1, 2, 4, 3, 5)
        within_mean, within_var = _hoeffding(blocks)                  # (L, L, n_kv, n_kv)
        across_mean, across_var = _hoeffding(within_mean)
        variance = within_var.sum(axis=(-2, -1)) / n_kv + across_var
        at = groups == size
        mean[at], std[at] = (across_mean / n_heads)[at], (np.sqrt(variance) / n_heads)[at]
    return mean, std


def _block_orderings(n_heads: int, group: int) -> Iterator[tuple[int, ...]]:
    """Every head ordering that permutes the KV heads' blocks of ``group`` heads as wholes and
    the heads within each: ``n_kv! (group!)^n_kv`` of them (``h!`` for ``group`` 1 or ``h``)."""
    if group in (1, n_heads):
        yield from itertools.permutations(range(n_heads))
        return
    n_kv = n_heads // group
    within = list(itertools.permutations(range(group)))
    for order in itertools.permutations(range(n_kv)):
        for inner in itertools.product(within, repeat=n_kv):
            yield tuple(order[p] * group + inner[p][i] for p in range(n_kv)
                        for i in range(group))


def _block_ordering_count(n_heads: int, group: int) -> int:
    if group in (1, n_heads):
        return math.factorial(n_heads)
    n_kv = n_heads // group
    return math.factorial(n_kv) * math.factorial(group) ** n_kv


def _draw_ordering(rng: np.random.Generator, n_heads: int, group: int) -> np.ndarray:
    """One uniform ordering of :func:`_block_orderings`' set."""
    if group in (1, n_heads):
        return rng.permutation(n_heads)
    order = rng.permutation(n_heads // group)
    return np.concatenate([p * group + rng.permutation(group) for p in order])


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
                          chunk: int = PERMUTATION_CHUNK, group=1) -> np.ndarray:
    """``(L, L)`` one-sided p-values that the same-index ``T = mean_i S[a, i, b, i]`` of each
    layer pair of ``S (L, h, L, h)`` is as large as ``T_pi = mean_i S[a, i, b, pi(i)]`` under
    random head orderings ``pi`` (the null: head numbers carry no identity). Orderings respect
    the KV heads (:func:`pairing_null_exact`: blocks of ``group`` heads permuted as wholes,
    heads within them; ``group`` 1 or ``h``: all orderings; an int, or ``(L, L)`` ints: one per
    layer pair, symmetric).

    - Exact when their number (``h!``, or ``n_kv! (group!)^n_kv``) is at most ``max_exact``:
      ``p = #{pi : T_pi >= T - tol} / count`` over all of them, the identity included.
    - Otherwise Monte Carlo: ``p = (1 + #{T_pi >= T - tol}) / (1 + n_perm)`` over ``n_perm``
      orderings drawn in turn from ``rng = np.random.default_rng(seed)`` (with all orderings
      allowed, each is ``rng.permutation(h)``; smallest attainable p: ``1 / (1 + n_perm)``;
      see :data:`PAIRING_P_PERMUTATIONS` for the number BH needs).

    ``tol`` = :data:`TOLERANCE` (sums in different orders). Each ordering relabels the heads of
    every layer pair of one block size at once (each block size its own orderings, from the
    same seed): each pair's p is that of its own test; pairs' p-values are dependent only
    through shared draws. The diagonal ``a = b`` compares each head with itself
    (``T = 1``) and is no test. Pairs ``a <= b`` are computed and mirrored (``S`` is
    symmetric: ``(b, a)``'s orderings are the inverses of ``(a, b)``'s), so the result is
    symmetric. Cost O(P L^2 h / 2) for ``P`` orderings per block size; memory O(L^2 h^2 +
    chunk L^2).
    """
    c = _pair_blocks(sims)
    n_layers = c.shape[0]
    upper_a, upper_b = np.triu_indices(n_layers)
    groups = _pair_groups(group, n_layers)[upper_a, upper_b]
    p = np.empty((n_layers, n_layers))
    for size in np.unique(groups):
        at = groups == size
        a, b = upper_a[at], upper_b[at]
        p[a, b] = p[b, a] = _ordering_p(c[a, b], n_perm, seed, max_exact, chunk, int(size))
    return p


def _ordering_p(blocks: np.ndarray, n_perm: int, seed: int, max_exact: int, chunk: int,
                group: int) -> np.ndarray:
    """:func:`pairing_permutation_p` of the layer pairs ``blocks (pairs, h, h)``
    (``C[i, j] = S[a, i, b, j]``) whose KV heads have ``group`` heads: ``(pairs,)``."""
    n_heads = blocks.shape[1]
    observed = _ordering_sums(blocks, np.arange(n_heads)[None, :])[:, 0] / n_heads
    threshold = observed[:, None] - TOLERANCE
    count = np.zeros(len(blocks), dtype=np.int64)
    exact = _block_ordering_count(n_heads, group) <= max_exact
    if exact:
        orderings = _block_orderings(n_heads, group)
        total = _block_ordering_count(n_heads, group)
    else:
        rng = np.random.default_rng(seed)
        total = n_perm
    done = 0
    while done < total:
        size = min(chunk, total - done)
        if exact:
            perms = np.array(list(itertools.islice(orderings, size)), dtype=np.intp)
        else:
            perms = np.stack([_draw_ordering(rng, n_heads, group) for _ in range(size)])
        count += (_ordering_sums(blocks, perms) / n_heads >= threshold).sum(axis=1)
        done += size
    return count / total if exact else (1 + count) / (1 + total)


def normal_cdf(z) -> np.ndarray:
    """``Phi(z) = erfc(-z / sqrt 2) / 2`` elementwise (accurate in both tails), float array."""
    z = np.asarray(z, dtype=float)
    return np.vectorize(lambda v: 0.5 * math.erfc(-v / math.sqrt(2.0)), otypes=[float])(z)


def upper_p(z) -> np.ndarray:
    """One-sided p ``1 - Phi(z)`` of a z-score under a normal approximation to its null (a
    statistic above its null mean), elementwise; NaN stays NaN."""
    return normal_cdf(-np.asarray(z, dtype=float))


def two_sided_p(z) -> np.ndarray:
    """Two-sided p ``2 (1 - Phi(|z|))`` of a z-score under a normal approximation to its null,
    elementwise; NaN stays NaN."""
    return 2 * normal_cdf(-np.abs(np.asarray(z, dtype=float)))


def gamma_p(value, mean, std, two_sided: bool = False) -> np.ndarray:
    """p-value of a nonnegative statistic (a similarity, an energy share) against a null with
    this ``mean`` and ``std``, elementwise: upper-tail, or two-sided with ``two_sided``.

    Such statistics are right-skewed under their nulls (a similarity is a mean of squared
    cosines), so a normal tail understates upper p-values. The null is taken as the gamma
    distribution with the same two moments (shape ``a = (mean / std)^2``), whose tail follows
    from the Wilson-Hilferty transform ``z' = ((value / mean)^(1/3) - 1 + 1 / (9a)) 3 sqrt(a)``
    (normal to within ~1e-3 in probability for ``a >= 1``). NaN where ``std`` is 0 or NaN.
    Cost O(n)."""
    value, mean, std = (np.asarray(x, dtype=float) for x in (value, mean, std))
    with np.errstate(divide="ignore", invalid="ignore"):
        shape = np.where(std > 0, np.square(mean / std), np.nan)
        z = (np.cbrt(value / mean) - 1 + 1 / (9 * shape)) * 3 * np.sqrt(shape)
    return two_sided_p(z) if two_sided else upper_p(z)


def quadratic_form_p(weights, value) -> np.ndarray:
    """Upper tail ``P(sum_r w_r g_r^2 > value)`` of a quadratic form in i.i.d. standard normal
    ``g_r`` with real weights of either sign (``weights`` ``(n, r)``, ``value`` ``(n,)``: one
    form per row), by the Lugannani-Rice saddlepoint approximation.

    Cumulant generating function ``K(s) = -1/2 sum log(1 - 2 s w_r)``; the saddlepoint solves
    ``K'(s) = value`` on ``0 <= s < 1 / (2 max w)`` (every ``1 - 2 s w_r > 0``; ``K'`` rises
    from the mean ``sum w`` to infinity there) by Newton steps with a bisection safeguard, all
    rows at once; then with ``v = sqrt(2 (s value - K(s)))`` and ``u = s sqrt(K''(s))``:
    ``p = 1 - Phi(v) + phi(v) (1 / u - 1 / v)``. Relative error a few percent in the far
    tail. Where ``value`` is within 0.1 standard deviations of the mean or below it (``v ->
    0``, where the formula cancels), the normal tail; ``0`` where no weight is positive
    and ``value`` exceeds the mean. Cost ``O(n r)`` per iteration, at most
    :data:`SADDLEPOINT_ITERATIONS`."""
    w = np.atleast_2d(np.asarray(weights, dtype=float))
    x = np.asarray(value, dtype=float).reshape(-1)
    mean, sd = w.sum(1), np.sqrt(2 * np.square(w).sum(1))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (x - mean) / sd
    p = upper_p(z)
    top = w.max(1)
    p = np.where((top <= 0) & (z > 0), 0.0, p)
    tail = np.flatnonzero((z > SADDLEPOINT_NORMAL_BELOW) & (top > 0))
    if tail.size == 0:
        return p
    w, x, sd = w[tail], x[tail], sd[tail]
    lo, hi = np.zeros(tail.size), 0.5 / top[tail]            # K'(lo) < x < K'(hi) = inf
    s = np.minimum((x - mean[tail]) / np.square(sd), 0.5 * hi)   # normal guess, inside
    active = np.arange(tail.size)                              # rows not yet converged
    for _ in range(SADDLEPOINT_ITERATIONS):
        sa, xa = s[active], x[active]
        ratio = w[active] / (1 - 2 * sa[:, None] * w[active])
        slope, curve = ratio.sum(1), 2 * np.square(ratio).sum(1)
        below = slope < xa
        lo[active] = np.where(below, sa, lo[active])
        hi[active] = np.where(below, hi[active], sa)
        step = sa - (slope - xa) / curve
        inside = (step > lo[active]) & (step < hi[active])
        s[active] = np.where(inside, step, 0.5 * (lo[active] + hi[active]))
        active = active[np.abs(s[active] - sa) > SADDLEPOINT_TOLERANCE * sa]
        if active.size == 0:
            break
    ratio = w / (1 - 2 * s[:, None] * w)
    curve = 2 * np.square(ratio).sum(1)
    k = -0.5 * np.log1p(-2 * s[:, None] * w).sum(1)
    v = np.sqrt(np.maximum(2 * (s * x - k), 0))
    u = s * np.sqrt(curve)
    with np.errstate(divide="ignore", invalid="ignore"):
        density = np.exp(-0.5 * np.square(v)) / math.sqrt(2 * math.pi)
        p[tail] = np.clip(upper_p(v) + density * (1 / u - 1 / v), 0, 1)
    return p


def z_score(value, mean, std) -> np.ndarray:
    """``(value - mean) / std`` elementwise, NaN where ``std`` is 0 or NaN (a null without
    spread tests nothing)."""
    value, mean, std = (np.asarray(x, dtype=float) for x in (value, mean, std))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(std > 0, (value - mean) / std, np.nan)


def null_test(value, mean, std, two_sided: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """z-score (:func:`z_score`) and p-value (:func:`gamma_p`) of a nonnegative statistic
    against a null with this ``mean`` and ``std``, elementwise; both NaN where ``std`` is 0 or
    NaN or ``value`` is NaN (a value left out of the test). Cost O(n)."""
    return z_score(value, mean, std), gamma_p(value, mean, std, two_sided)


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
