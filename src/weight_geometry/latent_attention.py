"""Multi-head latent attention (MLA: DeepSeek-V2/V3): every head's attention kernel and OV
circuit from the latent factors, without forming either, nor the effective ``W_Q``/``W_K``.

One layer, width ``d``, ``h`` heads, ``r_q`` = ``q_lora_rank``, ``r`` = ``kv_lora_rank``,
``n`` / ``p`` = the no-RoPE / RoPE query-key widths, ``m = n + p`` (``d_head``), ``v`` =
``v_head_dim`` (shapes ``out x in``, :class:`architectures.LatentDims`)::

    W_DQ (r_q, d), W_UQ_i (m, r_q)       query of head i:  W_Q_i x = W_UQ_i W_DQ x
                                          (no query LoRA: W_Q_i (m, d) stored, ``q_proj``)
    M = [W_DKV; W_KR] (r + p, d)          the key/value latent W_DKV x, the RoPE key W_KR x
    W_UK_i (n, r), W_UV_i (v, r)          head i's key and value up-projections
    W_K_i = [W_UK_i W_DKV; W_KR] = E_i M,  E_i = [[W_UK_i, 0], [0, I_p]]       (m, d)
    W_V_i = W_UV_i W_DKV (v, d),  W_O_i (d, v)

The zero-offset kernel of head ``i`` is ``A_i = W_Q_i^T W_K_i`` (``d x d``, rank <= ``m``): the
query's no-RoPE rows meet the head's own key rows, its RoPE rows the RoPE key ``W_KR`` that
every head shares. Each head has a key of its own (``n_kv = h``). Its OV circuit is ``W_O_i
W_V_i`` (rank <= ``min(v, r)``). Both are factored once per layer::

    M^T = Q_m R_m   (thin QR, Q_m: d x (r + p)),      W_DQ^T = Q_a R_a   (R_a only)
    W_K_i = Y_i Q_m^T,   Y_i = E_i R_m^T                         (m, r + p)
    W_V_i = Z_i Q_m^T,   Z_i = W_UV_i (R_m^T)[:r]                 (v, r + p)
    W_Q_i = X_i Q_a^T,   X_i = W_UQ_i R_a^T                       (m, r_q)
    A_i = Q_a (X_i^T Y_i) Q_m^T,   W_OV_i = W_O_i Z_i Q_m^T

so :func:`kernels.factored_subspaces` of ``(X, Y)`` (query and key each in its own latent
coordinates; only their ``R`` factors meet in the core) gives ``S`` and the right singular
vectors in ``Q_m``'s coordinates, mapped to ``R^d`` by ``Q_m^T`` (:class:`LatentSubspaces`).
The left (query) vectors are :meth:`FactoredSubspaces.left_vectors`' coefficients times
``W_UQ_i``, then times ``W_DQ`` (``W_UQ_i W_DQ = W_Q_i``): ``Q_a`` is never needed. The OV
circuit is :func:`kernels.factored_subspaces` of ``(W_O^T, Z)`` the same way (as
:func:`kernels.circuit_svd`); its ``v`` rows per head are handed over as they are, and the
receiver pads them with zero rows (singular value 0) to ``m`` when ``v < m``, so that every
stored array has ``d_head = m`` rows per head. It is computed after the layer's experts
(:meth:`LatentPass.circuits`), W_O's effective rank before it.

The thin QRs need ``X_i^T`` ``(r_q, m)``, ``Y_i^T`` ``(r + p, m)``, ``W_DQ^T`` ``(d, r_q)`` and
``M^T`` ``(d, r + p)`` to have at least as many rows as columns: ``m <= r_q <= d`` (or no query
LoRA), ``n <= r`` and ``r + p <= d`` (:func:`require_latent_shapes`). A smaller ``r_q`` or
``r`` would leave every head's kernel of rank below ``m`` (zero singular values, refused for
any architecture); a latent wider than ``d`` compresses nothing.

Folded norms (``fold_norms``): the pre-attention gain into ``W_DQ``, ``W_Q`` and ``M``'s
columns, the query latent's RMSNorm gain (``q_a_layernorm``) into ``W_UQ``'s columns, the
key/value latent's (``kv_a_layernorm``) into ``W_UK_i``'s and ``W_UV_i``'s
(:meth:`Checkpoint.read_latent`). The latent normalizations themselves are not linear and are
left out: the kernel here is the bilinear form of the projections as if each latent's RMS were
1 (model.json and the report say so).

Effective ranks (the table's W_Q, W_K, W_V rows) are those of the effective projections
stacked over heads, ``W_Q (h m, d)``, ``W_K (h m, d)`` (the shared RoPE rows once per head),
``W_V (h v, d)``: as ``Q_a`` and ``Q_m`` have orthonormal columns, their singular values are
``X``'s, ``Y``'s and ``Z``'s. W_O is ``o_proj`` itself.

Cost per layer (float64 unless said): the thin QR of ``M^T``, ``O(d (r + p)^2)``; ``R_a`` from
the Gram of ``W_DQ``, ``d r_q^2``; ``X``, ``2 h m r_q^2``; :func:`kernels.factored_subspaces`,
``O(h m (r_q + r + p) m)``; in float32 the vectors in ``R^d``, ``2 h m d (r + p)`` (right),
``2 h m d r_q`` (left), ``2 h v d (r + p)`` (OV read side) and ``2 h v^2 d`` (OV write side);
with ``compute_ranks`` W_O's spectrum, its ``d x d`` Gram ``h v d^2`` and ``eigvalsh``. At
DeepSeek-V3's shapes (``d`` 7168, ``h`` 128, ``m`` 192, ``v`` 128, ``r_q`` 1536, ``r + p`` 576)
the vectors take 0.91 TFLOP (0.54 of them the query vectors), W_O's Gram 0.84 TFLOP, the rest
(``X``, the QRs and cores, the other spectra) about 0.25 TFLOP. Memory: the layer's latent
weights (read one at a time), ``X``, ``Y``, ``Z`` and ``Q_m`` in float64 (about 0.52 GB at V3's
shapes), and one ``(h, m, d)`` float32 result at a time (0.7 GB at V3's shapes; the OV sides
``(h, v, d)``): each is handed to the caller's ``emit`` (the extraction appends it to its
``.npy`` file) as soon as it is formed, ``X`` and ``Y`` are dropped before the query vectors
are formed, W_O before the OV read side is formed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import UserError
from .kernels import (
    FactoredSubspaces,
    factored_subspaces,
    query_r_factors,
    thin_qr,
)
from .ranks import effective_rank_from_singular_values, shape_text, smaller_side, weight_spectrum

if TYPE_CHECKING:  # checkpoint may import this module (require_latent_shapes)
    from .architectures import LatentDims, ModelDims
    from .checkpoint import Checkpoint


@dataclass
class LatentSubspaces(FactoredSubspaces):
    """:class:`kernels.FactoredSubspaces` whose key row spaces ``q_k`` ``(h, r + p, m)`` are in
    the coordinates of ``basis`` ``(d, r + p)``, orthonormal columns (``Q_m``): head ``i``'s
    row space in ``R^d`` is spanned by ``basis @ q_k[i]``. Every product with ``R^d`` goes
    through ``basis``, so the ``(h, d, m)`` bases are never formed."""

    basis: torch.Tensor | None = None

    def vectors(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(h, m, d)`` right singular vectors in ``R^d``: the latent ones times
        ``basis^T``, in ``dtype`` (default ``q_k``'s); cost ``2 h m (r + p) (m + d)``."""
        latent = super().vectors(dtype)
        return latent @ self.basis.to(latent.dtype).T

    def energies(self, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`FactoredSubspaces.energies` of the ``(d, d)`` Gram ``G`` through ``G_m =
        Q_m^T G Q_m`` (``(r + p)^2``; ``G Q_m`` in ``G``'s dtype, at least float32, then
        float64): cost ``2 d^2 (r + p)``. ``G`` is read whole, so it must be symmetric (the
        extraction's Grams are: :func:`ranks.gram` mirrors them); ``G_m``'s upper triangle is
        what the base reads."""
        dtype = torch.promote_types(gram.dtype, torch.float32)
        g_q = (gram.to(dtype) @ self.basis.to(dtype)).to(self.q_k.dtype)
        return super().energies(self.basis.T @ g_q)

    def _project(self, w: torch.Tensor) -> torch.Tensor:
        """Coordinates of the rows of ``w`` ``(n, d)`` in each head's row space: ``(w Q_m)
        q_k[i]``; cost ``2 n d (r + p)`` more than in the latent coordinates."""
        dtype = torch.promote_types(w.dtype, torch.float32)
        return super()._project(w.to(dtype) @ self.basis.to(dtype))


@dataclass
class LatentPass:
    """One layer's latent attention: its kernels' subspaces (their query-side vectors were
    handed over to ``emit`` by :func:`latent_attention_pass`), and the effective-rank rows
    (``(layer_idx, weight_type, shape, eff_rank)``) of W_Q and W_K, then of W_V and W_O once
    :meth:`circuits` has run. ``values`` ``(h v, r + p)`` (``Z``) and ``basis`` (``Q_m``,
    float64) are what the OV circuits need besides W_O (about 0.1 GB at DeepSeek-V3's
    shapes)."""

    subspaces: LatentSubspaces
    rows: list[tuple]
    values: torch.Tensor
    basis: torch.Tensor
    read: Callable[[str], torch.Tensor]
    rank: Callable[[str, torch.Tensor, tuple[int, int]], None]

    def circuits(self, emit: Callable[..., None]) -> None:
        """Every head's OV circuit ``W_O_i Z_i Q_m^T`` (module docstring), handed to ``emit``
        one part at a time as :func:`kernels.emit_ov_circuits` does: the ``(h, v)`` singular
        values, then the ``(h, v, d)`` float32 write and read sides, each as ``emit(name,
        array, m)``: the receiver (the extraction, as it writes them) pads each head's ``v``
        rows with zero rows (and zero singular values) to ``m``, so that no padded copy is
        held, nor multiplied by ``Q_m^T``. W_O is read here, its effective rank taken before
        the circuits exist (its Gram and theirs are never held together), and dropped once the
        write side is formed. Called after the experts' pass, so that neither meets the
        other's working set."""
        h, m = self.subspaces.singular_values.shape
        v = self.values.shape[0] // h
        w_o = self.read("o")                                             # (d, h v)
        self.rank("W_V", self.values, (h * v, w_o.shape[0]))
        self.rank("W_O", w_o, tuple(w_o.shape))
        core = factored_subspaces(w_o.T, self.values, h, h, v, torch.float64)
        emit("ov_singular_values", core.singular_values, m)
        left = core.left_vectors(w_o.T, torch.float32)                   # (h, v, d)
        del w_o
        emit("ov_write_vectors", left, m)
        del left
        right = core.vectors(torch.float32)                              # (h, v, r + p)
        emit("ov_read_vectors", right @ self.basis.to(torch.float32).T, m)


def require_latent_shapes(dims: ModelDims, lat: LatentDims, where: str) -> None:
    """A one-line UserError (prefixed by ``where``, the checkpoint) unless every thin QR of the
    module docstring exists: ``m <= r_q <= d`` or no query LoRA (``r_q = 0``), ``n <= r`` and
    ``r + p <= d``, in the config's own names. Cost O(1)."""
    m, d = dims.d_head, dims.d_model
    if lat.q_rank and not m <= lat.q_rank <= d:
        raise UserError(f"{where}: q_lora_rank = {lat.q_rank} is not allowed (null, or from"
                        f" qk_nope_head_dim + qk_rope_head_dim = {m} to hidden_size = {d}:"
                        " a smaller query latent leaves every kernel of rank below d_head)")
    if lat.kv_rank < lat.nope:
        raise UserError(f"{where}: kv_lora_rank = {lat.kv_rank} is below qk_nope_head_dim ="
                        f" {lat.nope} (allowed: kv_lora_rank >= qk_nope_head_dim; a smaller"
                        " latent leaves every key of rank below d_head)")
    if lat.kv_rank + lat.rope > d:
        raise UserError(f"{where}: kv_lora_rank + qk_rope_head_dim = {lat.kv_rank + lat.rope}"
                        f" exceeds hidden_size = {d} (allowed: a key/value latent no wider"
                        " than the residual stream)")


def latent_attention_pass(ckpt: Checkpoint, layer: int, device: torch.device,
                          emit: Callable[..., None], fold_norms: bool = False,
                          compute_ranks: bool = True) -> LatentPass:
    """Every head's kernel subspaces of latent-attention ``layer`` (module docstring), their
    ``(h, m, d)`` float32 query vectors handed to ``emit("query_vectors", ...)`` as soon as
    formed (the latent factors ``X``, ``Y`` dropped before), and what its OV circuits need
    (:meth:`LatentPass.circuits`); each latent weight read once
    (:meth:`Checkpoint.read_latent`) and dropped once used; with ``compute_ranks`` the
    effective ranks of the effective W_Q, W_K (and W_V, W_O). Shapes without those QRs are a
    UserError (:func:`require_latent_shapes`)."""
    lat, dims = ckpt.latent, ckpt.dims
    require_latent_shapes(dims, lat, str(ckpt.path))
    h, m, n, p, v, r, d = (dims.n_heads, dims.d_head, lat.nope, lat.rope, lat.d_value,
                           lat.kv_rank, dims.d_model)
    f64, rows = torch.float64, []

    def read(part: str) -> torch.Tensor:
        return torch.from_numpy(ckpt.read_latent(layer, part, fold_norms)).to(device)

    def rank(wt: str, factor: torch.Tensor, shape: tuple[int, int]) -> None:
        """The effective rank of the weight of ``shape`` whose singular values are those of
        ``factor``."""
        if compute_ranks:
            sigma, _ = weight_spectrum(factor, smaller_side(tuple(factor.shape)))
            rows.append((layer, wt, shape_text(shape),
                         effective_rank_from_singular_values(sigma, shape)))

    q_m, r_m = (x[0] for x in thin_qr(read("kv_a").T.to(f64)[None]))   # M^T = Q_m R_m
    lower = r_m.T                                                        # M = lower Q_m^T
    kv_b = read("kv_b").reshape(h, n + v, r).to(f64)
    y = torch.empty(h, m, r + p, dtype=f64, device=device)
    y[:, :n] = kv_b[:, :n] @ lower[:r]                                   # W_UK_i (R_m^T)[:r]
    y[:, n:] = lower[r:]                                                 # W_KR, every head's
    z = (kv_b[:, n:] @ lower[:r]).reshape(h * v, r + p)                  # W_UV_i (R_m^T)[:r]
    del kv_b, lower, r_m
    y = y.reshape(h * m, r + p)
    if lat.q_rank:
        w_dq = read("q_a")                                               # (r_q, d)
        r_a = query_r_factors(w_dq.T[None])[0]                           # W_DQ^T = Q_a R_a
        w_uq = read("q_b")                                               # (h m, r_q)
        x = w_uq.to(f64) @ r_a.T                                         # X_i = W_UQ_i R_a^T
        del r_a
    else:
        w_dq, w_uq = None, read("q")
        x = w_uq
    core = factored_subspaces(x, y, h, h, m, f64)
    subspaces = LatentSubspaces(**{f.name: getattr(core, f.name)
                                   for f in dataclasses.fields(core)}, basis=q_m)
    rank("W_Q", x, (h * m, d))
    rank("W_K", y, (h * m, d))
    del core, x, y
    query = subspaces.left_vectors(w_uq, torch.float32)
    del w_uq
    if w_dq is not None:
        query = query @ w_dq                                             # (h, m, d)
    del w_dq
    emit("query_vectors", query)
    del query
    return LatentPass(subspaces, rows, z, q_m, read, rank)

