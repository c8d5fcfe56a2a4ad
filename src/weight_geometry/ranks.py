"""Effective rank (Roy & Vetterli 2007) from singular values, via the smaller Gram matrix.

``r_eff(W) = exp(H(p))`` with ``p = sigma / sum(sigma)`` over the nonzero singular values of
``W``. The singular values come from ``eigvalsh`` of the smaller Gram matrix (``W W^T`` or
``W^T W``, size ``m = min(rows, cols)``) in float64: cost O(rows cols m + m^3), about a third of
a full SVD, and sigma_i = sqrt(lambda_i) is exact to ~1e-8 sigma_max, far below the
zero-threshold. "Nonzero" means ``sigma > sigma_max * max(rows, cols) * eps(float32)``: the
weights are stored at float32 precision or less, so smaller values are rounding noise.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

ZERO_RTOL_EPS = float(np.finfo(np.float32).eps)


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


def gram(w, side: str):
    """``W^T W`` (side='in', cols x cols) or ``W W^T`` (side='out', rows x rows) in float64.

    ``w`` is a torch tensor; the result stays on its device. Cost O(rows cols m).
    """
    import torch

    w64 = w.to(torch.float64)
    return w64.T @ w64 if side == "in" else w64 @ w64.T


def singular_values_from_gram(g) -> np.ndarray:
    """Singular values (descending) of W from a torch Gram matrix of W. Cost O(m^3)."""
    import torch

    lam = torch.linalg.eigvalsh(g).clamp_min(0).flip(0)
    return lam.sqrt().cpu().numpy()


def smaller_side(shape: tuple[int, int]) -> str:
    """The Gram side of size ``min(rows, cols)``."""
    return "in" if shape[1] <= shape[0] else "out"


def kernel_rank_table(singular_values: np.ndarray, d_model: int) -> pd.DataFrame:
    """Effective rank of every head's ``d x d`` kernel from its singular values ``(L, h, d_head)``.

    The kernel ``W_Q_i^T W_K_j`` has rank <= d_head, so its stored ``d_head`` singular values are
    all of its nonzero ones; the zero-threshold uses the kernel's shape ``(d, d)``. Cost O(L h
    d_head).
    """
    n_layers, n_heads, _ = singular_values.shape
    rows = [(layer, head, effective_rank_from_singular_values(singular_values[layer, head],
                                                              (d_model, d_model)))
            for layer in range(n_layers) for head in range(n_heads)]
    return pd.DataFrame(rows, columns=["layer", "head", "kernel_eff_rank"])
