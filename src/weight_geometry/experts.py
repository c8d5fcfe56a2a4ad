"""A sparse layer's experts in the extraction pass: per-expert effective ranks, and the layer's
FFN input as the routed experts' mean.

A mixture-of-experts layer has no single ``W_in``. Its FFN input here is the routed experts'
mean Gram ``G = (1/E) sum_e W_gate_e^T W_gate_e`` (``d x d``), the Gram of the stacked
``W_in = [W_gate_0; ...; W_gate_{E-1}] / sqrt(E)``: every quantity the extraction derives
from ``G`` keeps its meaning for that matrix, so the alignment of a head is the routed
experts' pooled share ``sum_e ||W_gate_e V_k^T||_F^2 / sum_e ||W_gate_e||_F^2`` (the shared
expert, which every token passes through, is not in it). Its singular values are
``sqrt(eigvalsh(G))``, ``d`` of them (zeros where ``E d_expert < d``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .architectures import SHARED
from .checkpoint import Checkpoint
from .ranks import (
    effective_rank_from_singular_values,
    frobenius_norm2,
    gram_side,
    shape_text,
    singular_values_from_gram,
    weight_spectrum,
)


@dataclass
class ExpertPass:
    """What the pass over a sparse layer's experts gives: the mean Gram of the routed experts'
    W_gate (float64 torch, ``(d, d)``), its singular values ``(d,)`` and trace, and the
    effective-rank rows ``(layer_idx, weight_type, shape, eff_rank, expert)`` (``expert``:
    ``"0"`` .. ``"E-1"``, ``"shared"``)."""

    gram: torch.Tensor
    singular_values: np.ndarray
    norm2: np.ndarray
    rows: list[tuple] = field(default_factory=list)


def expert_pass(ckpt: Checkpoint, layer: int, device: torch.device, fold_norms: bool = False,
                compute_ranks: bool = True) -> ExpertPass:
    """Read sparse ``layer``'s experts one at a time (:meth:`Checkpoint.iter_experts`): the
    effective rank of each one's W_gate, W_up, W_down (``compute_ranks``; otherwise only W_gate
    of the routed experts is read), and the routed experts' mean W_gate Gram. Cost per weight:
    its Gram and ``eigvalsh`` (:func:`ranks.weight_spectrum`), plus one ``d x d`` float64
    ``eigvalsh``; memory: one expert's weights, their Grams and the float64 sum."""
    ffn_input = ckpt.adapter.ffn_input
    n_experts = ckpt.moe.n_experts
    total, rows = None, []
    only = None if compute_ranks else (ffn_input,)
    for expert, weights in ckpt.iter_experts(layer, fold_norms, only):
        routed = expert != SHARED
        for wt, array in weights.items():
            w = torch.from_numpy(array).to(device)
            shape = tuple(w.shape)
            sigma, g = weight_spectrum(w, gram_side(wt, ffn_input, shape))
            if compute_ranks:
                rows.append((layer, wt, shape_text(shape),
                             effective_rank_from_singular_values(sigma, shape), str(expert)))
            if wt == ffn_input and routed:
                g = g.to(torch.float64)
                total = g if total is None else total.add_(g)
            del w, g
    gram = total / n_experts
    return ExpertPass(gram=gram, singular_values=singular_values_from_gram(gram),
                      norm2=np.array(frobenius_norm2(gram)), rows=rows)
