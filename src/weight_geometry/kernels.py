"""Per-head attention subspaces from the factored kernel, all heads of a layer batched.

For query head ``i`` with key/value head ``j = i // (h // n_kv)`` the attention kernel is
``A_i = W_Q_i^T W_K_j``, shape ``(d, d)``, rank <= ``d_head`` (the bilinear form
``x_q^T A_i x_k`` of the score before RoPE and scaling). It is never formed:

    W_Q_i^T = Q_q R_q,  W_K_j^T = Q_k R_k            (thin QR, Q_* is d x d_head)
    A_i = Q_q (R_q R_k^T) Q_k^T,  R_q R_k^T = U S Vc^T  (SVD of a d_head x d_head core)
    => A_i = (Q_q U) S (Q_k Vc)^T

so the right singular vectors of ``A_i`` are the rows of ``Vc^T Q_k^T`` with singular values
``S``. Cost per layer: O((h + n_kv) d d_head^2) for the QRs and O(h d_head^3) for the cores,
versus O(h d^3) for a full SVD of each kernel; memory O(h d d_head).
"""

from __future__ import annotations

import torch


def head_subspaces(w_q: torch.Tensor, w_k: torch.Tensor, n_heads: int, n_kv_heads: int,
                   d_head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right singular vectors and singular values of every head's kernel ``W_Q_i^T W_K_j``.

    Args:
        w_q: ``(n_heads * d_head, d)`` query projection (nn.Linear layout).
        w_k: ``(n_kv_heads * d_head, d)`` key projection.
    Returns:
        ``V``: ``(n_heads, d_head, d)``, row ``r`` of ``V[i]`` is the r-th right singular vector
        (orthonormal rows, singular values descending); ``S``: ``(n_heads, d_head)``.
        Computed in the dtype and on the device of the inputs.
    """
    d = w_q.shape[1]
    q_t = w_q.reshape(n_heads, d_head, d).transpose(1, 2)      # (h, d, d_head) = W_Q_i^T
    k_t = w_k.reshape(n_kv_heads, d_head, d).transpose(1, 2)   # (n_kv, d, d_head) = W_K_j^T
    _, r_q = torch.linalg.qr(q_t)                               # Q_q is not needed
    q_k, r_k = torch.linalg.qr(k_t)
    kv_of = torch.arange(n_heads, device=w_q.device) // (n_heads // n_kv_heads)
    core = r_q @ r_k[kv_of].transpose(1, 2)                     # (h, d_head, d_head)
    _, s, vc_t = torch.linalg.svd(core)
    v = vc_t @ q_k[kv_of].transpose(1, 2)                       # (h, d_head, d)
    return v, s


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cuda`` without a GPU is a user error."""
    from .errors import UserError

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device: 'cuda' was requested but torch.cuda.is_available() is False"
                        " (allowed here: auto, cpu)")
    return torch.device(device)
