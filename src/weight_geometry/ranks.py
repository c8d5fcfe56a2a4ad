"""Effective rank (Roy & Vetterli 2007) from singular values, via the smaller Gram matrix.

``r_eff(W) = exp(H(p))`` with ``p = sigma / sum(sigma)`` over the nonzero singular values of
``W``. The singular values come from ``eigvalsh`` of the smaller Gram matrix (``W W^T`` or
``W^T W``, size ``m = min(rows, cols)``, its upper triangle only): cost about
``rows cols m + 4 m^3 / 3`` flops against ``4 rows cols m`` for a full SVD's singular values.
"Nonzero" means ``sigma > sigma_max * max(rows, cols) * eps(float32)``: the weights are stored
at float32 precision or less, so smaller values are rounding noise.

Precision (:func:`weight_spectrum`). The Gram and ``eigvalsh`` run in float32 first (about
twice the float64 rate on a CPU). The float32 Gram is ``G + E`` with ``||E|| <= c eps32
sigma_max^2`` (``c`` = :data:`GRAM_NOISE` = 4; measured 0.15-1.7), and float32 ``eigvalsh``
leaves a null space's eigenvalues within about the same (1.5-1.8 on 2048 x 2048 matrices of
rank 1792; 4.6-5.8 on the 960-dimensional null space of a 576 x 1536 weight's larger Gram, a
side :func:`weight_spectrum` does not take). So a small ``sigma_i`` moves by up to
``sqrt(c eps32) sigma_max = 7e-4 sigma_max``, a larger one by about
``c eps32 sigma_max^2 / (2 sigma_i)``. (Float32 ``eigvalsh`` moves the large eigenvalues
more than ``E`` does, up to 110 ``eps32 sigma_max^2`` at m = 2048, but by at most about 1e-5
relative for a full-rank weight; the bound below does not model that, and the tests measure
the resulting ``r_eff``.) For a full-rank weight these are the smallest terms of the
entropy; at d_ff = 11008 the noise stays below the zero threshold (1.3e-3 sigma_max), but not
for smaller shapes, nor for a rank-deficient weight, whose zero singular values would come
out as noise above the threshold (``r_eff`` of a rank-1792 2048 x 2048 matrix: 2e-4 off).
So the float32 spectrum is kept only when :func:`rank_error_bound`, a first-order bound on
the relative change of ``r_eff`` under that noise, is at most :data:`FLOAT32_BOUND_MAX`;
otherwise Gram and ``eigvalsh`` are redone in float64. The bound overestimates the actual
change 30-300x on every matrix measured (all weights of SmolLM2-135M, random weights of
Qwen2.5-3B shapes, rank-deficient matrices), so a kept float32 ``r_eff`` is within 1e-4
relative of numpy's float64 SVD (measured at most 3.9e-5 on SmolLM2-135M, 1.3e-5 at 3B shapes;
``tests/test_lib_ranks.py`` checks both routes against numpy at 1e-4 and 1e-7).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pandas only where a table is built: the extraction job never imports it
    import pandas as pd

ZERO_RTOL_EPS = float(np.finfo(np.float32).eps)
#: ``||E|| / (eps32 sigma_max^2)`` of a float32 Gram ``G + E`` (:func:`gram`): 0.15-1.7
#: measured on real shapes (``tests/test_lib_ranks.py``); also the scale of the float32
#: ``eigvalsh`` error on a null space (module docstring).
GRAM_NOISE = 4.0
#: Largest :func:`rank_error_bound` for which the float32 spectrum is kept (see module doc).
FLOAT32_BOUND_MAX = 1e-3
#: Largest and smallest diagonal of a float32 Gram (``||column||^2``) whose spectrum is kept:
#: outside, the float32 products overflow or fall to denormals (weights beyond about 1e17 or
#: below 1e-16 in magnitude, e.g. a corrupt or rescaled file) and the Gram is redone in float64,
#: which holds the square of any float32 value.
FLOAT32_GRAM_RANGE = (1e-30, 1e30)
#: Rows of ``X`` per block of a Gram ``X^T X`` computed in another dtype than ``X``'s: 1 MiB of
#: float64 at 2048 columns (one weight) or 16 x 128 (the query heads of Qwen2.5-3B). Small
#: blocks stay below the extraction's mmap threshold (:func:`extraction.unmap_large_frees`) and
#: are reused from the heap instead of page-faulted afresh: on the AMD EPYC (Zen 5) of
#: benchmarks/RESULTS.md, one thread, 64 rows against 1024 take the query Grams of a 3B layer
#: from 33 to 20 ms and its whole subspace extraction from 85 to 74 ms, a float64 Gram of an
#: 11008 x 2048 weight from 933 to 842 ms.
GRAM_BLOCK = 64
#: Columns of ``X`` per panel of the Gram's upper triangle (see :func:`gram`).
GRAM_PANEL = 256

#: The effective-rank table, one row per weight (the extraction's ``weight_ranks.parquet``,
#: ``effective_ranks.csv``, the user's CSV): column -> pyarrow type
#: (:func:`results_io.write_rows`). ``shape`` is :func:`shape_text` of ``(rows, cols)``.
RANK_COLUMNS = {"layer_idx": "int64", "weight_type": "string", "shape": "string",
                "eff_rank": "float64"}

#: The effective-rank table of a mixture-of-experts model: :data:`RANK_COLUMNS` and the
#: ``expert`` of each row (``"0"``, ``"1"``, ..., ``"shared"``; null for the attention weights
#: and for the FFN weights of a dense layer).
EXPERT_RANK_COLUMNS = {**RANK_COLUMNS, "expert": "string"}

#: A weight shape as text: ``2048x11008``; also ``2048 X 11008``, ``2048×11008``, ``(2048,
#: 11008)``, ``2048, 11008`` (what notebooks write), with spaces around the parts.
_SHAPE_TEXT = re.compile(r"\s*\(?\s*(\d+)\s*(?:[xX×]|,)\s*(\d+)\s*\)?\s*")


def nonzero_mask(sigma: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Which singular values count as nonzero (see module docstring)."""
    return sigma > sigma.max() * max(shape) * ZERO_RTOL_EPS


def effective_rank_from_singular_values(sigma: np.ndarray, shape: tuple[int, int]) -> float:
    """``exp(entropy(sigma / sum(sigma)))`` over the nonzero ``sigma``; 0 for a zero matrix."""
    sigma = np.asarray(sigma, dtype=np.float64)
    if sigma.size == 0 or sigma.max() <= 0:
        return 0.0
    s = sigma[nonzero_mask(sigma, shape)]
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def gram(w, side: str, dtype=None, panel: int | None = None, out=None):
    """``W^T W`` (side='in', cols x cols) or ``W W^T`` (side='out', rows x rows) in ``dtype``
    (default float32), on ``w``'s device; ``w`` may carry leading batch axes (``(..., rows,
    cols)``: one Gram per matrix). With ``out`` (a Gram of the same shape, its dtype), the
    Gram is added to it in place and ``out`` returned: a sum of Grams without a temporary.

    ``G = X^T X`` with ``X = W`` or ``W^T`` of shape ``(n, m)``. Only the upper triangle is
    multiplied, in panels of ``p = panel`` (default :data:`GRAM_PANEL`) columns: ``G[c:c+p, c:]
    += X_c^T X[:, c:]``, then mirrored, which is ``n m^2 (1 + p/m)`` flops instead of a full
    GEMM's ``2 n m^2`` (1.3-1.4x faster on a CPU at 11008 x 2048; BLAS has ``syrk`` but torch
    does not expose it). ``X`` is read whole when it has ``dtype`` already (no copy of a float32
    ``W``); otherwise in blocks of :data:`GRAM_BLOCK` rows, each cast to ``dtype`` (a float64
    Gram of float32 weights needs a 16 MiB block per matrix at 2048 columns, not a float64 copy
    of ``W``). Memory: the Grams, one block and one ``p x m`` panel product per matrix; the
    mirror is in place.
    """
    import torch

    dtype = out.dtype if out is not None else dtype or torch.float32
    panel = panel or GRAM_PANEL
    x = w if side == "in" else w.transpose(-1, -2)
    n, m = x.shape[-2:]
    batch = x.shape[:-2]
    x = x.reshape(-1, n, m)                      # a view: (b, n, m), b = 1 for a plain matrix
    rows = n if x.dtype == dtype else GRAM_BLOCK
    g = (out.view(-1, m, m) if out is not None
         else torch.zeros(x.shape[0], m, m, dtype=dtype, device=w.device))
    for start in range(0, n, rows):
        block = x[:, start:start + rows].to(dtype)
        for c in range(0, m, panel):
            g[:, c:c + panel, c:].baddbmm_(block[:, :, c:c + panel].transpose(1, 2),
                                           block[:, :, c:])
    for c in range(0, m, panel):  # mirror, in place: exactly symmetric
        end = c + panel
        diagonal = g[:, c:end, c:end]
        diagonal.copy_(diagonal.triu() + diagonal.triu(1).transpose(1, 2))
        g[:, end:, c:end] = g[:, c:end, end:].transpose(1, 2)
    return g.reshape(*batch, m, m)


def frobenius_norm2(g) -> float:
    """``||W||_F^2 = trace(G)`` from a torch Gram matrix of W (either side): its diagonal summed
    in float64, without a float64 copy of ``G``. Cost O(m)."""
    import torch

    return float(torch.diagonal(g).to(torch.float64).sum())


def singular_values_from_gram(g) -> np.ndarray:
    """Singular values (descending, float64 numpy) of W from a torch Gram matrix of W, by
    ``eigvalsh`` in the Gram's dtype. Cost O(m^3)."""
    import torch

    lam = torch.linalg.eigvalsh(g).clamp_min(0).flip(0)
    return lam.sqrt().cpu().numpy().astype(np.float64)


def rank_error_bound(sigma: np.ndarray, shape: tuple[int, int]) -> float:
    """First-order bound on ``|d r_eff / r_eff|`` if every ``sigma_i^2`` is off by
    ``eps = GRAM_NOISE eps32 sigma_max^2`` (float32 Gram rounding).

    ``d log r_eff / d sigma_i = -(log p_i + H) / S`` (``S = sum sigma``) and ``sigma_i`` is
    uncertain by ``ds_i = sqrt(sigma_i^2 + eps) - sqrt(max(sigma_i^2 - eps, 0))``; a value
    that may cross the zero threshold counts with ``p_i`` at least ``ds_i / S``. Cost O(m).
    """
    sigma = np.asarray(sigma, dtype=np.float64)
    if sigma.size == 0 or sigma[0] <= 0:
        return 0.0
    lam = sigma**2
    eps = GRAM_NOISE * ZERO_RTOL_EPS * lam[0]
    ds = np.sqrt(lam + eps) - np.sqrt(np.maximum(lam - eps, 0.0))
    may_count = nonzero_mask(sigma + ds, shape) | nonzero_mask(sigma, shape)
    total = sigma[nonzero_mask(sigma, shape)].sum()
    p = np.maximum(sigma, ds)[may_count] / total
    entropy = np.log(effective_rank_from_singular_values(sigma, shape))
    return float((np.abs(np.log(p) + entropy) * ds[may_count]).sum() / total)


def weight_spectrum(w, side: str):
    """Singular values of ``W`` (descending, float64 numpy, length of the ``side`` Gram) and
    the Gram they come from (torch, on ``w``'s device).

    Float32 Gram and ``eigvalsh``; redone in float64 when its diagonal leaves
    :data:`FLOAT32_GRAM_RANGE` (an all-zero weight included) or :func:`rank_error_bound`
    exceeds :data:`FLOAT32_BOUND_MAX` (see module docstring). Cost ``n m^2 (1 + p/m) + 4 m^3 / 3``
    flops in float32 (``p`` = :data:`GRAM_PANEL`), plus the same in float64 for a weight that
    needs it.
    """
    import torch

    g, sigma = gram(w, side), None
    low, high = FLOAT32_GRAM_RANGE
    if low <= float(torch.diagonal(g).max()) <= high:   # False for NaN: a non-finite Gram
        sigma = singular_values_from_gram(g)
    if sigma is None or rank_error_bound(sigma, tuple(w.shape)) > FLOAT32_BOUND_MAX:
        g = gram(w, side, torch.float64)
        sigma = singular_values_from_gram(g)
    return sigma, g


def smaller_side(shape: tuple[int, int]) -> str:
    """The Gram side of size ``min(rows, cols)``."""
    return "in" if shape[1] <= shape[0] else "out"


def gram_side(weight_type: str, ffn_input: str, shape: tuple[int, int]) -> str:
    """The side of a weight's Gram for its spectrum (:func:`weight_spectrum`): ``"in"``
    (``W^T W``, ``cols x cols`` = ``d x d``) for the FFN input projection ``ffn_input``, whose
    Gram also gives the FFN energies of vectors of ``R^d``
    (:meth:`kernels.FactoredSubspaces.energies`) and ``||W_in||_F^2``; the smaller side
    (:func:`smaller_side`) for every other weight. Either side gives the same singular values
    (the larger one pads them with zeros)."""
    return "in" if weight_type == ffn_input else smaller_side(shape)


def shape_text(shape: tuple[int, int]) -> str:
    """A weight's ``(rows, cols)`` as the tables write it: ``"2048x11008"``."""
    rows, cols = shape
    return f"{rows}x{cols}"


def parse_shape(text: str) -> tuple[int, int]:
    """``(rows, cols)`` from a shape's text: :func:`shape_text`'s ``"2048x11008"``, or a
    notebook's ``"2048 X 11008"``, ``"2048×11008"``, ``"(2048, 11008)"`` (spaces allowed around
    the parts). A ValueError naming the text otherwise."""
    match = _SHAPE_TEXT.fullmatch(text)
    if match is None:
        raise ValueError(f"shape {text!r} is not 'rows x cols'")
    return int(match[1]), int(match[2])


def normalized_eff_rank(table: pd.DataFrame) -> pd.Series:
    """``eff_rank / min(rows, cols)`` of each row of an effective-rank table
    (:data:`RANK_COLUMNS`, ``shape`` read by :func:`parse_shape`), on the table's index: 1 for
    a weight whose nonzero singular values are all equal and as many as its smaller side, 0 for
    an all-zero weight. Cost O(rows of the table)."""
    smaller = table["shape"].map(lambda text: min(parse_shape(text)))
    return (table["eff_rank"] / smaller).rename("normalized_eff_rank")


def per_weight_type(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (layer_idx, weight_type) of an effective-rank table, in its order: a dense
    weight's own row, and for a mixture-of-experts layer's W_gate, W_up, W_down (rows with an
    ``expert``) the mean over the layer's experts (routed and shared, each once) of eff_rank
    and of normalized_eff_rank (:func:`normalized_eff_rank`). Columns layer_idx, weight_type,
    eff_rank, normalized_eff_rank; so a sparse layer counts as many weights as a dense one in
    a mean over weight types. Cost O(rows)."""
    out = table.assign(normalized_eff_rank=normalized_eff_rank(table))
    return (out.groupby(["layer_idx", "weight_type"], sort=False)[
        ["eff_rank", "normalized_eff_rank"]].mean().reset_index())


def kernel_rank_table(singular_values: np.ndarray, d_model: int) -> pd.DataFrame:
    """Effective rank of every head's ``d x d`` kernel from its singular values ``(L, h, d_head)``.

    The kernel ``W_Q_i^T W_K_j`` of layer ``p`` has rank <= ``m_p``, its head size, so its
    stored ``m_p`` singular values are all of its nonzero ones; the zeros that pad them to
    ``d_head`` where layers differ (:mod:`head_layout`) fall below the zero-threshold, which
    uses the kernel's shape ``(d, d)``, like any zero singular value. Cost O(L h d_head).
    """
    import pandas as pd

    n_layers, n_heads, _ = singular_values.shape
    rows = [(layer, head, effective_rank_from_singular_values(singular_values[layer, head],
                                                              (d_model, d_model)))
            for layer in range(n_layers) for head in range(n_heads)]
    return pd.DataFrame(rows, columns=["layer", "head", "kernel_eff_rank"])
