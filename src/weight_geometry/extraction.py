"""One pass over a range of layers: every tensor read once, everything k- and head-independent.

Per layer ``l`` the layer's weights are read one at a time (each stored tensor once), used and
dropped, and produce:
- ``vectors[l]`` ``(h, d_head, d)`` float32: right singular vectors of each head's kernel
  (:func:`kernels.factored_subspaces`), all ``d_head`` of them;
- ``singular_values[l]`` ``(h, d_head)``;
- ``ffn_input_energy[l]`` ``(h, d_head)``: ``||W_in v||^2`` for each of those vectors, where
  ``W_in`` is the FFN input projection (``W_gate``, or ``W_up`` for a non-gated FFN). As
  ``V_k`` is the first ``k`` rows, ``||W_in V_k^T||_F^2`` is a prefix sum, so the alignment
  of every head at every k follows without re-reading weights. Computed from
  ``G = W_in^T W_in`` (the Gram matrix that the effective rank needs anyway) once per KV head,
  ``G_j = Q_k_j^T G Q_k_j``, cost O(n_kv d^2 d_head) (:meth:`FactoredSubspaces.energies`);
- ``ffn_input_rowspace_eigenvalues[l]`` ``(n_kv, d_head)``: eigenvalues of ``G_j``, descending
  (the spectrum of ``G`` inside KV head ``j``'s row space: the conditional null of the
  alignment, :mod:`rowspace_nulls`);
- ``ffn_input_norm2[l]``: ``||W_in||_F^2 = trace(G)``;
- ``ffn_input_singular_values[l]`` ``(d,)``: singular values of ``W_in``, descending,
  ``sqrt(eigvalsh(G))`` (the ones its effective rank uses);
- ``query_vectors[l]`` ``(h, d_head, d)`` float32: the kernel's left singular vectors (its query
  side), paired with ``singular_values[l]`` (:meth:`kernels.FactoredSubspaces.left_vectors`);
- ``ov_write_vectors[l]``, ``ov_read_vectors[l]`` ``(h, d_head, d)`` float32 and
  ``ov_singular_values[l]`` ``(h, d_head)`` float64: the thin SVD of each head's OV circuit
  ``W_OV_i = W_O_i W_V_j`` (left = what the head writes to the residual stream, right = what
  it reads), from its factors as the kernel's (:func:`kernels.ov_circuits`): a Cholesky
  factor of each ``W_O_i``, a thin QR of each ``W_V_j^T``, a ``d_head x d_head`` core,
  ``O((h + n_kv) d d_head^2)``. With the
  kernel's two sides they are what the composition scores need (:mod:`composition`);
- in a mixture-of-experts layer, the FFN input is the routed experts' mean W_gate Gram and
  each expert's weights get effective-rank rows of their own, with a fifth field, the expert
  (:mod:`experts`);
- ``expert_energy[l]`` ``(U, h, d_head)``, ``expert_norm2[l]`` ``(U,)``,
  ``expert_rowspace_eigenvalues[l]`` ``(U, n_kv, d_head)``, ``expert_singular_values[l]``
  ``(U, m)``: the same alignment inputs for each of a sparse layer's ``U`` units (every
  expert's W_gate, the router's rows: :mod:`expert_alignment`), from the expert's weights in
  memory (:mod:`experts`); NaN in a layer without experts, ``U = 0`` in a dense model;
- effective-rank rows (layer_idx, weight_type, shape, eff_rank) for every weight; with
  ``compute_ranks=False`` (the user supplies them) none, and only W_Q, W_K, W_V, W_O and
  ``W_in`` are read: the pass then costs the subspaces, the circuits and one Gram per layer.

Precision: ``G`` is float32 (see :mod:`ranks`), so energies and ``trace(G)`` carry its rounding,
about ``eps32 ||G||`` per entry: relative errors ~1e-6 for directions of typical energy, and
``ffn_input_singular_values`` are exact to ``~sqrt(eps32) sigma_max`` absolute (``eps32
sigma_max^2 / (2 sigma_i)`` for the larger ones). The subspaces are computed in float64, and
their vectors mapped back to ``R^d`` in float32, the dtype they are stored and used in
(:meth:`kernels.FactoredSubspaces.vectors`).

Both cores busy (:func:`iter_layers` with ``workers > 1``, on the CPU): ``workers`` layers are
extracted at once, each in its own thread with one BLAS thread. The Grams are GEMMs, which
scale with threads either way, but ``eigvalsh`` (LAPACK's tridiagonal reduction, memory-bound)
gains little from a second thread: 2048 x 2048 float32 takes 0.27 s with two threads and 0.31 s
with one, so two one-threaded layers at once finish their eigenvalues in about half the time.
Measured on 2 cores: 23 % (Qwen2.5-3B shapes) to 36 % (Qwen2.5-0.5B) less time per layer.

Peak memory per worker: one weight in float32 on the host (and the device), its Gram and
``eigvalsh``'s copy of it (float32; in float64, plus one :data:`ranks.GRAM_BLOCK`-row float64
block, for a weight whose bound asks for it): at Qwen2.5-3B shapes about 120 MiB, during an FFN
weight's spectrum. Each ``(h, d_head, d)`` result is handed over as soon as it is computed
(:func:`extract_layer`'s ``emit``) and :func:`write_layers` appends it to its ``.npy`` file and
releases it, so neither a layer's four results nor a layer range is held in memory; each
weight is dropped after its last use (W_O once the OV write vectors are formed, before the read
side). Qwen3-30B-A3B's layer shapes: the job peaks 117 MiB above start-up (the experts' pass
97 MiB), within issue 29's 180 MiB (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from .architectures import ModelDims
from .checkpoint import Checkpoint
from .device import pin_float32_matmul, resolve_device
from .errors import UserError
from .experts import SparseFfn, UnitArrays, expert_pass
from .head_layout import pad_to
from .kernels import FactoredSubspaces, emit_ov_circuits, factored_subspaces
from .latent_attention import latent_attention_pass
from .ranks import (
    effective_rank_from_singular_values,
    frobenius_norm2,
    gram_side,
    shape_text,
    smaller_side,
    weight_spectrum,
)
from .rule_script import peak_rss_mib, progress

#: Bytes from which :func:`write_layers` has glibc map each allocation (:func:`unmap_large_frees`).
MMAP_THRESHOLD = 4 << 20


@dataclass
class LayerResult:
    """One layer's products (shapes in the module docstring, without the layer axis)."""

    vectors: np.ndarray
    singular_values: np.ndarray
    ffn_input_energy: np.ndarray
    ffn_input_rowspace_eigenvalues: np.ndarray
    ffn_input_norm2: np.ndarray
    ffn_input_singular_values: np.ndarray
    query_vectors: np.ndarray
    ov_write_vectors: np.ndarray
    ov_read_vectors: np.ndarray
    ov_singular_values: np.ndarray
    expert_energy: np.ndarray
    expert_norm2: np.ndarray
    expert_rowspace_eigenvalues: np.ndarray
    expert_singular_values: np.ndarray
    weight_ranks: list[tuple]

    @classmethod
    def array_names(cls) -> list[str]:
        """The per-layer arrays, i.e. every field but ``weight_ranks``."""
        return [f.name for f in dataclasses.fields(cls) if f.name != "weight_ranks"]

    @classmethod
    def ranks_only(cls, rows: list[tuple]) -> LayerResult:
        """A linear-attention layer's result: its FFN's effective-rank rows and no arrays (it
        has no attention kernel, hence no row in the stored arrays)."""
        return cls(**dict.fromkeys(cls.array_names()), weight_ranks=rows)


#: ``emit(name, array, rows)``: one of a layer's arrays (a name of
#: :meth:`LayerResult.array_names`), numpy on the host, handed over as soon as it is computed
#: (:func:`extract_layer`); ``rows``: None, or the rows per head ``(h, v, ...)`` ``array`` is to
#: be padded to with zero rows (:func:`pad_heads`), where ``v`` is less.
Emit = Callable[[str, np.ndarray, "int | None"], None]
#: The attention weights that the kernels and the OV circuits are formed from.
KERNEL_WEIGHTS = ("W_Q", "W_K", "W_V", "W_O")


def extract_layer(ckpt: Checkpoint, layer: int, device: torch.device,
                  fold_norms: bool = False, compute_ranks: bool = True,
                  emit: Emit | None = None) -> LayerResult:
    """All products of one layer. Each weight is dropped once its last use is done (W_K once
    the subspaces are formed, W_Q once the query vectors are, W_V once its QR is, W_O once the
    OV write vectors are), and with ``emit`` each array is handed to ``emit(name, array)`` as
    soon as it is computed and not kept (:func:`write_layers` appends it to its ``.npy``
    file): the result then holds the rank rows alone, its arrays None. Without ``emit`` the
    arrays are collected into the result. Cost per weight: its float32 Gram and ``eigvalsh``;
    without ``compute_ranks`` only ``W_in``'s."""
    arrays: dict[str, np.ndarray] = {}

    def put(name: str, x: torch.Tensor | np.ndarray, rows: int | None = None) -> None:
        array, rows = padded(name, x.cpu().numpy() if isinstance(x, torch.Tensor) else x,
                             ckpt.dims, rows)
        if emit is not None:
            emit(name, array, rows)
        else:
            arrays[name] = pad_heads(array, rows)

    dims, ffn_input = ckpt.dims.layer(layer), ckpt.adapter.ffn_input
    heads = (dims.n_heads, dims.n_kv_heads, dims.d_head)
    rows, kernel_inputs = [], {}
    subspaces = ffn_gram = ffn_sigma = norm2 = energy = rowspace = sparse = None
    attention = ckpt.is_attention(layer)  # else linear attention: FFN effective ranks only
    needed = (None if compute_ranks else
              (*KERNEL_WEIGHTS, ffn_input) if attention else ())
    if attention and ckpt.latent is not None:  # latent attention, from its factors
        mla = latent_attention_pass(ckpt, layer, device, put, fold_norms, compute_ranks)
        rows, subspaces = mla.rows, mla.subspaces
        put_kernel_sides(ckpt, layer, subspaces, put)
        sparse = sparse_ffn(ckpt, layer, device, subspaces, fold_norms, compute_ranks)
        mla.circuits(put)  # reads W_O: after the experts where they run first
        del mla
    for wt, array in ckpt.iter_layer(layer, fold_norms, only=needed):
        w = torch.from_numpy(array).to(device)
        del array  # the weight is held by w alone (and iter_layer holds no stored tensor)
        shape = tuple(w.shape)
        g = None
        ranked = compute_ranks and ckpt.owns(layer, wt)  # not another layer's W_K, W_V
        if ranked or wt == ffn_input:
            sigma, g = weight_spectrum(w, gram_side(wt, ffn_input, shape))
        if ranked:
            rows.append((layer, wt, shape_text(shape),
                         effective_rank_from_singular_values(sigma, shape)))
        if wt == ffn_input:
            ffn_gram, ffn_sigma = g, sigma
            norm2 = np.array(frobenius_norm2(g))
        if wt in KERNEL_WEIGHTS:
            kernel_inputs[wt] = w
        del w, g
        if "W_Q" in kernel_inputs and "W_K" in kernel_inputs:
            subspaces = kernel_subspaces(ckpt, layer, kernel_inputs, heads, put)
            # the experts now, before W_V, W_O and their circuits are held
            sparse = sparse_ffn(ckpt, layer, device, subspaces, fold_norms, compute_ranks)
        if "W_V" in kernel_inputs and "W_O" in kernel_inputs:
            emit_ov_circuits(kernel_inputs, put, *heads)  # pops W_O and W_V
        if subspaces is not None and ffn_gram is not None:  # drop G as soon as it is used
            energy, rowspace = (x.cpu().numpy() for x in subspaces.energies(ffn_gram))
            ffn_gram = None
    if not attention:
        if ckpt.is_sparse(layer) and compute_ranks:
            rows += expert_ranks(ckpt, layer, device, fold_norms)
        return LayerResult.ranks_only(rows)
    units = UnitArrays.empty(ckpt)
    if sparse is not None:  # a mixture of experts
        rows += sparse.rows
        ffn_sigma, norm2, units = sparse.singular_values, sparse.norm2, sparse.units
        energy, rowspace = sparse.energy, sparse.rowspace_eigenvalues
    require_ffn_input(ckpt, layer, norm2)
    for name, x in (("ffn_input_energy", energy), ("ffn_input_rowspace_eigenvalues", rowspace),
                    ("ffn_input_norm2", norm2), ("ffn_input_singular_values", ffn_sigma),
                    ("expert_energy", units.energy), ("expert_norm2", units.norm2),
                    ("expert_rowspace_eigenvalues", units.rowspace_eigenvalues),
                    ("expert_singular_values", units.singular_values)):
        put(name, x)
    return LayerResult(**{name: arrays.get(name) for name in LayerResult.array_names()},
                       weight_ranks=rows)


def kernel_subspaces(ckpt: Checkpoint, layer: int, inputs: dict[str, torch.Tensor],
                     heads: tuple[int, int, int], put: Callable) -> FactoredSubspaces:
    """The kernel subspaces of W_Q and W_K (popped from ``inputs``, so that they are dropped
    here: W_K once the subspaces are formed, W_Q once the query vectors are), with the
    ``(h, d_head, d)`` query vectors, the singular values and the right vectors handed to
    ``put`` one at a time (:func:`put_kernel_sides`)."""
    w_q = inputs.pop("W_Q")
    subspaces = factored_subspaces(w_q, inputs.pop("W_K"), *heads, torch.float64)
    put("query_vectors", subspaces.left_vectors(w_q, torch.float32))
    del w_q
    put_kernel_sides(ckpt, layer, subspaces, put)
    return subspaces


def put_kernel_sides(ckpt: Checkpoint, layer: int, subspaces: FactoredSubspaces,
                     put: Callable) -> None:
    """The kernels' ``(h, d_head)`` singular values (a UserError where one is zero:
    :func:`require_kernel`) and ``(h, d_head, d)`` float32 right vectors, handed to ``put``."""
    singular_values = subspaces.singular_values.cpu().numpy()
    require_kernel(ckpt, layer, singular_values)
    put("singular_values", singular_values)
    put("vectors", subspaces.vectors(torch.float32))


def sparse_ffn(ckpt: Checkpoint, layer: int, device: torch.device,
               subspaces: FactoredSubspaces, fold_norms: bool, compute_ranks: bool
               ) -> SparseFfn | None:
    """A sparse layer's experts (:func:`experts.expert_pass`, one expert at a time) against the
    layer's ``subspaces``, with the energies of their mean Gram, which is then dropped; None for
    a dense layer. Called as soon as the subspaces exist, before W_V and W_O are read, so that
    the pass's working set never meets theirs and their circuits'."""
    if not ckpt.is_sparse(layer):
        return None
    moe = expert_pass(ckpt, layer, device, subspaces, fold_norms, compute_ranks)
    energy, rowspace = (x.cpu().numpy() for x in subspaces.energies(moe.gram))
    return SparseFfn(moe.rows, moe.singular_values, moe.norm2, moe.units, energy, rowspace)


def expert_ranks(ckpt: Checkpoint, layer: int, device: torch.device,
                 fold_norms: bool = False) -> list[tuple]:
    """The effective-rank rows ``(layer_idx, weight_type, shape, eff_rank, expert)`` of every
    expert weight of sparse ``layer`` of a linear-attention layer (which has no head subspace
    for the experts' alignment), one expert at a time (:meth:`Checkpoint.iter_experts`).
    Cost per weight: its smaller Gram and ``eigvalsh``; memory: one expert's weights."""
    rows = []
    for expert, weights in ckpt.iter_experts(layer, fold_norms):
        for wt, array in weights.items():
            shape = array.shape
            sigma, _ = weight_spectrum(torch.from_numpy(array).to(device), smaller_side(shape))
            rows.append((layer, wt, shape_text(shape),
                         effective_rank_from_singular_values(sigma, shape), str(expert)))
    return rows


def require_kernel(ckpt: Checkpoint, layer: int, singular_values: np.ndarray) -> None:
    """A UserError naming the weight where the geometry is undefined, instead of NaN in every
    table: a head whose kernel ``W_Q_i^T W_K_j`` is zero (``sigma_1 = 0``, ``(h, d_head)``
    singular values: no subspace to speak of, e.g. a zero-initialized W_Q). Cost O(h)."""
    zero = np.flatnonzero(singular_values[:, 0] == 0)
    if zero.size:
        w_q, w_k = ckpt.kernel_tensors(layer)
        raise UserError(f"layer {layer}, head {zero[0]}: the kernel W_Q_i^T W_K_j is zero"
                        f" (rows of {w_q} or {w_k} are all zeros), so its subspaces are"
                        " undefined")


def require_ffn_input(ckpt: Checkpoint, layer: int, norm2: np.ndarray) -> None:
    """A UserError for an all-zero FFN input (``||W_in||_F^2 = 0``: the alignment is 0/0),
    naming it."""
    if norm2 == 0:
        wt = ckpt.adapter.ffn_input
        raise UserError(f"layer {layer}: {wt} ({ckpt.adapter.tensor_name(wt, layer)}) is all"
                        " zeros, so the FFN alignment (a share of its energy) is undefined")


def iter_layers(ckpt: Checkpoint, layers: range, device: torch.device,
                fold_norms: bool = False, compute_ranks: bool = True, workers: int = 1,
                emitter: Callable[[int], Emit] | None = None) -> Iterator[LayerResult]:
    """:func:`extract_layer` for each layer of ``layers`` in order, with a progress line;
    ``workers > 1`` (CPU) extracts that many layers at once (see module docstring). With
    ``emitter``, layer ``l``'s arrays go to ``emitter(l)`` as they are computed (the results
    then carry the rank rows alone). Float32 products run at full precision
    (:func:`device.pin_float32_matmul`)."""
    pin_float32_matmul(device)

    def one(layer: int) -> LayerResult:
        emit = None if emitter is None else emitter(layer)
        return extract_layer(ckpt, layer, device, fold_norms, compute_ranks, emit=emit)

    results = in_threads(one, layers, workers)
    for pos, layer in enumerate(layers):
        yield next(results)  # unnamed: this frame holds no layer's arrays while suspended
        progress(f"layer {layer} done ({pos + 1}/{len(layers)})")


def layer_workers(device: torch.device, threads: int) -> int:
    """Layers extracted at once: one per thread on the CPU, one on a GPU (its kernels already
    use the whole device)."""
    return threads if device.type == "cpu" else 1


def in_threads(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """``fn(item)`` for each item, in order, computed by ``workers`` threads that each run torch
    with one thread; at most ``workers + 1`` items submitted ahead of the consumer. torch's
    thread count is restored afterwards. ``workers <= 1``: ``map`` in the calling thread."""
    if workers <= 1:
        yield from map(fn, items)
        return
    threads = torch.get_num_threads()
    pending: deque = deque()
    try:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads,
                                initargs=(1,)) as pool:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) > workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        torch.set_num_threads(threads)


def unmap_large_frees(threshold: int = MMAP_THRESHOLD) -> bool:
    """Have glibc serve every allocation of at least ``threshold`` bytes by ``mmap``, so that a
    freed weight, Gram or result goes back to the system at once. Process-wide.

    By default glibc raises this threshold to the largest block freed so far (up to 32 MiB);
    later blocks of that size then come from the heap of the thread that asked, which keeps
    their pages after they are freed. With two layer workers at Qwen2.5-3B shapes that took
    the job's peak RSS from about 630 MiB to 710-800 MiB, for no gain in time. Returns whether
    the setting took (False without glibc's ``mallopt``: macOS, Windows).
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, threshold))


def write_layers(ckpt: Checkpoint, layers: range, device: torch.device, fold_norms: bool,
                 paths: Mapping[str, str | Path], compute_ranks: bool = True,
                 workers: int = 1) -> list[tuple]:
    """Run the single pass and append each layer's arrays to the ``.npy`` files ``paths``
    (``{array name: path}``, names of :meth:`LayerResult.array_names`), each of shape
    ``(n, ...)`` for the ``n`` layers of ``layers`` with softmax attention (a hybrid's
    linear-attention layers give effective-rank rows only: :mod:`hybrid`). Returns the
    effective-rank rows (:data:`ranks.RANK_COLUMNS`; none without ``compute_ranks``).
    Memory: ``workers`` layers' working sets; each array is written as soon as it is computed
    and released (:class:`LayerWriter`; with several workers, a later layer's array waits in
    memory until the earlier layers' same array is written); blocks of 4 MiB and more are
    returned to the system when freed (:func:`unmap_large_frees`)."""
    unmap_large_frees()
    rows: list[tuple] = []
    with LayerWriter(paths, [layer for layer in layers if ckpt.is_attention(layer)]) as writer:
        for result in iter_layers(ckpt, layers, device, fold_norms, compute_ranks, workers,
                                  writer.emitter):
            rows += result.weight_ranks
            del result  # not held while the next layer is extracted
    return rows


def run_extraction_job(ckpt: Checkpoint, layers: range, device: str, threads: int,
                       fold_norms: bool, paths: Mapping[str, str | Path],
                       compute_ranks: bool = True) -> list[tuple]:
    """The extraction job (rule ``extract_layers``): :func:`write_layers` over ``layers`` of
    ``ckpt`` with the job's policy. torch runs ``threads`` threads, at least 1 (Snakemake's
    ``--set-threads extract_layers=0`` gives 0), set process-wide; the config's ``device``
    (``auto``, ``cpu``, ``cuda``) is resolved on this machine (:func:`device.resolve_device`:
    a UserError for ``cuda`` without a usable GPU; on CUDA the GPU this job claims, among
    those it sees, for its lifetime, with a line naming it); :func:`layer_workers` layers are
    extracted at once; a progress line names the checkpoint, the layers, the device
    (``cuda:i``) and the workers. The log (``logs/{model}/extract_layers*.log``) is the
    record of the device each layer range ran on, and ends with the job's peak resident memory
    (:func:`rule_script.peak_rss_mib`, exact where Snakemake's benchmark samples).
    Returns the effective-rank rows (:data:`ranks.RANK_COLUMNS`; none without
    ``compute_ranks``), which the job writes after the pass."""
    threads = max(threads, 1)
    torch.set_num_threads(threads)
    resolved = resolve_device(device)
    workers = layer_workers(resolved, threads)
    progress(f"{ckpt.path}: layers {layers.start}-{layers.stop - 1} on {resolved}"
             f" ({workers} at a time)")
    rows = write_layers(ckpt, layers, resolved, fold_norms, paths, compute_ranks, workers)
    if (peak := peak_rss_mib()) is not None:
        progress(f"peak memory of this job: {peak:.1f} MiB (resident, high-water mark)")
    return rows


class LayerWriter:
    """The ``.npy`` files ``paths`` (``{array name: path}``) of the layers ``stored`` (those
    with softmax attention, in order): each layer's arrays appended as they are handed over
    (:meth:`emitter`, from any thread), each file in layer order. An array handed over before
    the earlier layers' array of the same name (by another layer worker) waits in memory until
    those are written. A file is opened, its header for ``len(stored)`` rows written, at its
    first array; names not in ``paths`` are dropped. A context manager: the files are closed on
    exit, and a normal exit checks that every file got all its rows."""

    def __init__(self, paths: Mapping[str, str | Path], stored: list[int]):
        self.paths = dict(paths)
        self.position = {layer: i for i, layer in enumerate(stored)}
        self.n_layers = len(stored)
        self.written = dict.fromkeys(self.paths, 0)        # rows written, per name
        self.waiting: dict[tuple[str, int], tuple[np.ndarray, int | None]] = {}
        self.files: dict[str, BinaryIO] = {}
        self.lock = threading.Lock()
        self.stack = ExitStack()

    def __enter__(self) -> LayerWriter:
        return self

    def __exit__(self, kind, *_) -> None:
        self.stack.close()
        if kind is None and (self.waiting or any(n != self.n_layers
                                                 for n in self.written.values())):
            raise RuntimeError(f"incomplete layer files: {self.written}, waiting"
                               f" {sorted(self.waiting)}")

    def emitter(self, layer: int) -> Emit:
        """What ``layer``'s arrays are handed to: ``emit(name, array)``."""
        position = self.position.get(layer)

        def emit(name: str, array: np.ndarray, rows: int | None = None) -> None:
            if name in self.paths:
                self._put(name, position, (array, rows))

        return emit

    def _put(self, name: str, position: int, item: tuple[np.ndarray, int | None]) -> None:
        with self.lock:
            if position != self.written[name]:
                self.waiting[name, position] = item
                return
            self._append(name, *item)
            del item
            while (name, self.written[name]) in self.waiting:
                self._append(name, *self.waiting.pop((name, self.written[name])))

    def _append(self, name: str, array: np.ndarray, rows: int | None) -> None:
        array = np.asarray(array)
        shape = array.shape if rows is None else (array.shape[0], rows, *array.shape[2:])
        if name not in self.files:
            path = Path(self.paths[name])
            path.parent.mkdir(parents=True, exist_ok=True)
            self.files[name] = self.stack.enter_context(open(path, "wb"))  # noqa: SIM115
            _write_npy_header(self.files[name], (self.n_layers, *shape), array.dtype)
        fh = self.files[name]
        if shape == array.shape:
            fh.write(np.ascontiguousarray(array).data)  # C order, no copy
        else:  # each head's rows, then its zero rows (pad_heads' bytes, without the copy)
            zeros = np.zeros((rows - array.shape[1], *array.shape[2:]), array.dtype)
            for head in array:
                fh.write(np.ascontiguousarray(head).data)
                fh.write(zeros.data)
        self.written[name] += 1


#: Arrays whose axis 1 (an expert unit's: axis 2) runs over a head's rows: zero-padded to the
#: largest head size where layers differ (:mod:`head_layout`).
PER_HEAD_ROWS = ("vectors", "query_vectors", "ov_write_vectors", "ov_read_vectors",
                 "singular_values", "ov_singular_values", "ffn_input_energy")


def padded(name: str, array: np.ndarray, dims: ModelDims, rows: int | None
           ) -> tuple[np.ndarray, int | None]:
    """``(array, rows)``: one of a layer's arrays and the rows per head it is to be padded to
    (:data:`Emit`), at the widths of the model's stored arrays where its layers differ in head
    size or KV-head count (Gemma 4: :mod:`head_layout`'s contract). A per-head array keeps its
    rows and is padded with zero rows to the largest head size as it is written (no copy of
    the ``(h, d_head, d)`` vectors); the small per-KV-head and per-unit arrays are padded here,
    with zeros (energies) or NaN (row-space eigenvalues; a KV head the layer lacks too). For a
    uniform model ``(array, rows)`` unchanged."""
    if dims.head_dims is None:
        return array, rows
    h, m, n_kv = dims.n_heads, dims.d_head, dims.n_kv_heads
    if name in PER_HEAD_ROWS:
        return array, m
    if name == "ffn_input_rowspace_eigenvalues":
        return pad_to(array, (n_kv, m), np.nan), rows
    if name == "expert_energy":
        return pad_to(array, (array.shape[0], h, m), 0.0), rows
    if name == "expert_rowspace_eigenvalues":
        return pad_to(array, (array.shape[0], n_kv, m), np.nan), rows
    return array, rows


def pad_heads(array: np.ndarray, rows: int | None) -> np.ndarray:
    """``array`` ``(h, v, ...)`` with zero rows appended to each head's ``v``, up to ``rows``;
    ``array`` itself when ``rows`` is None or ``v``."""
    return array if rows is None else pad_to(array, (array.shape[0], rows, *array.shape[2:]), 0)


def _write_npy_header(fh: BinaryIO, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """The ``.npy`` header of a C-order ``shape`` array of ``dtype``; the data follow."""
    np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(dtype),
                                              "fortran_order": False, "shape": shape})
