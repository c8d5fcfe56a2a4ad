"""A sparse layer's experts in the extraction pass: per-expert effective ranks, each expert's
and each router row's alignment inputs, and the layer's FFN input as the routed experts' mean.

A mixture-of-experts layer has no single ``W_in``. Its FFN input here is the routed experts'
mean Gram ``G = (1/E) sum_e W_gate_e^T W_gate_e`` (``d x d``), the Gram of the stacked
``W_in = [W_gate_0; ...; W_gate_{E-1}] / sqrt(E)``: every quantity the extraction derives
from ``G`` keeps its meaning for that matrix, so the alignment of a head is the routed
experts' pooled share ``sum_e ||W_gate_e V_k^T||_F^2 / sum_e ||W_gate_e||_F^2`` (the shared
expert, which every token passes through, is not in it). Its singular values are
``sqrt(eigvalsh(G))``, ``d`` of them (zeros where ``E d_expert < d``).

Per unit (:func:`expert_alignment.expert_units`: each expert's W_gate, the shared expert's,
each router row) the pass stores what the per-expert alignment needs at every k
(:mod:`expert_alignment`), from the expert's weights already in memory, so nothing is read
twice: the energies ``||W_u v_r||^2`` of every head's ``d_head`` right singular vectors and the
eigenvalues of ``W_u``'s Gram inside each KV row space, from ``P = W_u Q_k`` (``d_e x n_kv
d_head``: :meth:`kernels.FactoredSubspaces.weight_energies`, ``2 d_e d n_kv d_head`` flops,
less than half of ``W_u``'s ``d x d`` Gram's upper triangle at ``n_kv d_head = 512``, ``d =
2048``; no ``d x d`` Gram of an expert is formed for this); ``||W_u||_F^2``; and ``W_u``'s
singular values from its smaller Gram (``d_e x d_e``), which its effective rank uses too. The
router, ``(E, d)``, is read once (:meth:`kernels.FactoredSubspaces.row_energies`, ``2 E d n_kv
d_head``), and with it the shared expert's gate where there is one (Qwen2-MoE's
``shared_expert_gate``, ``(1, d)``), a router row labelled ``shared``.

Cost per routed expert: three ``d_e x d_e`` Grams and ``eigvalsh`` (effective ranks; W_gate's
alone without them), ``W_gate``'s ``d x d`` Gram added to the float32 sum in place (its upper
triangle, ``d_e d^2 (1 + p/d)`` flops, :func:`ranks.gram`) and ``P``; per layer one float32
``d x d`` ``eigvalsh`` of the mean. Memory: one expert's three weights, the ``d x d`` float32
sum, ``P`` and the layer's per-unit arrays (``U (h + n_kv) d_head + U m`` float64); on
Qwen3-30B-A3B's shapes the pass peaks 97 MiB above the job's start-up (the attention outputs
are written before it runs; benchmarks/RESULTS.md). Precision: the float32 sum of ``E`` Grams
is off by about ``sqrt(E) eps32 ||G||`` (1e-6 relative at E = 128), the float32 Gram's own
order; the mean's singular values serve the pooled alignment's isotropic null only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .architectures import SHARED
from .checkpoint import Checkpoint
from .expert_alignment import expert_units
from .kernels import FactoredSubspaces
from .ranks import (
    effective_rank_from_singular_values,
    frobenius_norm2,
    gram,
    shape_text,
    singular_values_from_gram,
    smaller_side,
    weight_spectrum,
)


@dataclass
class UnitArrays:
    """A layer's per-unit alignment inputs (:mod:`expert_alignment`), float64 numpy: ``energy``
    ``(U, h, d_head)``, ``norm2`` ``(U,)``, ``rowspace_eigenvalues`` ``(U, n_kv, d_head)``,
    ``singular_values`` ``(U, m)`` (descending, zero-padded). NaN in a layer without experts;
    ``U = 0`` (and ``m = 0``) in a dense model."""

    energy: np.ndarray
    norm2: np.ndarray
    rowspace_eigenvalues: np.ndarray
    singular_values: np.ndarray

    @classmethod
    def empty(cls, ckpt: Checkpoint, layer: int | None = None) -> UnitArrays:
        """NaN arrays of a layer without experts of ``ckpt`` (``U = 0`` for a dense model), at
        ``layer``'s head size and KV-head count (None: the model's largest, the stored
        arrays' widths)."""
        dims, moe = ckpt.dims if layer is None else ckpt.dims.layer(layer), ckpt.moe
        n = len(checkpoint_units(ckpt))
        m = min(dims.d_model, max(moe.d_expert, moe.d_shared)) if moe is not None else 0
        return cls(*(np.full(shape, np.nan) for shape in (
            (n, dims.n_heads, dims.d_head), (n,), (n, dims.n_kv_heads, dims.d_head), (n, m))))


@dataclass
class ExpertPass:
    """What the pass over a sparse layer's experts gives: the mean Gram of the routed experts'
    W_gate (float32 torch, ``(d, d)``), its singular values ``(d,)`` and trace, the per-unit
    alignment inputs, and the effective-rank rows ``(layer_idx, weight_type, shape, eff_rank,
    expert)`` (``expert``: ``"0"`` .. ``"E-1"``, ``"shared"``)."""

    gram: torch.Tensor
    singular_values: np.ndarray
    norm2: np.ndarray
    units: UnitArrays
    rows: list[tuple] = field(default_factory=list)


@dataclass
class SparseFfn:
    """A sparse layer's FFN in the layer's result: :class:`ExpertPass` less its mean Gram,
    with that Gram's ``(h, d_head)`` energies and ``(n_kv, d_head)`` row-space eigenvalues."""

    rows: list[tuple]
    singular_values: np.ndarray
    norm2: np.ndarray
    units: UnitArrays
    energy: np.ndarray
    rowspace_eigenvalues: np.ndarray


def checkpoint_units(ckpt: Checkpoint) -> list[tuple[str, str | None]]:
    """The units of a sparse layer of ``ckpt`` (:func:`expert_alignment.expert_units`; the
    shared expert's gate, where there is one, the last router row); none for a dense model."""
    moe = ckpt.moe
    if moe is None:
        return []
    return expert_units(moe.n_experts, bool(moe.d_shared), ckpt.has_shared_gate)


def expert_pass(ckpt: Checkpoint, layer: int, device: torch.device,
                subspaces: FactoredSubspaces, fold_norms: bool = False,
                compute_ranks: bool = True) -> ExpertPass:
    """Read sparse ``layer``'s experts one at a time (:meth:`Checkpoint.iter_experts`), then its
    router: the effective rank of each expert's W_gate, W_up, W_down (``compute_ranks``;
    otherwise only W_gate is read), the routed experts' mean W_gate Gram, and every unit's
    alignment inputs against the layer's ``subspaces`` (module docstring: cost and memory)."""
    ffn_input, dims = ckpt.adapter.ffn_input, ckpt.dims
    units = UnitArrays.empty(ckpt, layer)
    total = torch.zeros(dims.d_model, dims.d_model, device=device)  # float32, summed in place
    rows = []
    only = None if compute_ranks else (ffn_input,)
    for unit, (expert, weights) in enumerate(ckpt.iter_experts(layer, fold_norms, only)):
        for wt, array in weights.items():
            w = torch.from_numpy(array).to(device)
            shape = tuple(w.shape)
            sigma, g = weight_spectrum(w, smaller_side(shape))
            if compute_ranks:
                rows.append((layer, wt, shape_text(shape),
                             effective_rank_from_singular_values(sigma, shape), str(expert)))
            if wt == ffn_input:
                _store(units, unit, subspaces.weight_energies(w), frobenius_norm2(g), sigma)
                if expert != SHARED:
                    gram(w, "in", out=total)
            del w, g
    router = ckpt.read_router(layer, fold_norms)
    shared_gate = ckpt.read_shared_gate(layer, fold_norms)
    if shared_gate is not None:  # a router row of its own, after the router's
        router = np.concatenate([router, shared_gate])
    router = torch.from_numpy(router).to(device)
    first = ckpt.moe.n_experts + bool(ckpt.moe.d_shared)
    energy, rowspace = subspaces.row_energies(router)
    norms = torch.linalg.vector_norm(router.to(torch.float64), dim=1).cpu().numpy()
    for e in range(router.shape[0]):
        _store(units, first + e, (energy[e], rowspace[e]), norms[e] ** 2, norms[e:e + 1])
    mean = total.div_(ckpt.moe.n_experts)
    return ExpertPass(gram=mean, singular_values=singular_values_from_gram(mean),
                      norm2=np.array(frobenius_norm2(mean)), units=units, rows=rows)


def _store(units: UnitArrays, unit: int, energies: tuple[torch.Tensor, torch.Tensor],
           norm2: float, sigma: np.ndarray) -> None:
    """Unit ``unit``'s energies and row-space eigenvalues (torch), ``||W_u||_F^2`` and
    singular values (descending; the rest of the row zero)."""
    units.energy[unit], units.rowspace_eigenvalues[unit] = (x.cpu().numpy() for x in energies)
    units.norm2[unit] = norm2
    width = min(len(sigma), units.singular_values.shape[1])
    units.singular_values[unit] = 0.0
    units.singular_values[unit, :width] = sigma[:width]
