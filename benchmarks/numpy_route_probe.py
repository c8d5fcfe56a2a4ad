"""Would a torch-free CPU extraction job meet the peak-RSS target? A measured answer.

The extraction job imports torch (about 218 MiB of RSS by itself), which alone exceeds the
peak-RSS target at Qwen2.5-0.5B shapes (2x one layer in fp32 = 114 MiB). This probe times the
same pass done with numpy only (OpenBLAS/LAPACK through numpy) and compares it with the
library's pass (``extraction.write_layers``, torch), each in a fresh process that has also
imported Snakemake's script support, as a rule script has:

    python benchmarks/numpy_route_probe.py CHECKPOINT_DIR

It prints one markdown row per (route, layer workers): wall time of the pass and the process's
peak RSS (``VmHWM``). The numpy route is a probe, not a second implementation: per layer and
weight the float32 Gram of the smaller side (``x.T @ x``, numpy's ``syrk``) and ``eigvalsh``;
the subspaces by the library's factorisation (float64 Cholesky of the query heads' Grams,
CholeskyQR2 of the key heads with ``solve`` for the triangular solves, ``eigh`` of the cores'
Grams, float32 map-back); the energies from the FFN input's Gram. It has none of the library's
fallbacks (Householder for ill-conditioned heads, the float64 redo of a Gram whose float32
spectrum is not precise enough), which these random weights never need, and writes nothing.
Its FLOPs match the library's pass, its results are not used.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROUTES = ("torch", "numpy")
WORKERS = (1, 2)


def _hwm_mib() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024


def _chol_r(x: np.ndarray) -> np.ndarray:
    """Upper ``R`` with ``R^T R = x_b^T x_b`` for each ``(n, m)`` matrix of ``x``, float64."""
    x = x.astype(np.float64, copy=False)
    g = np.swapaxes(x, 1, 2) @ x
    return np.swapaxes(np.linalg.cholesky(g), 1, 2)


def _solve_right(r: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``x_b R_b^{-1}`` for each matrix (``solve`` of the transposed system)."""
    return np.swapaxes(np.linalg.solve(np.swapaxes(r, 1, 2), np.swapaxes(x, 1, 2)), 1, 2)


def _numpy_layer(ckpt, layer: int) -> None:
    """One layer of the numpy route (see module docstring)."""
    from weight_geometry.ranks import gram_side  # numpy only: torch is imported lazily there

    dims = ckpt.dims
    kernel_inputs, ffn_gram = {}, None
    for wt, w in ckpt.iter_layer(layer):
        side = gram_side(wt, ckpt.adapter.ffn_input, w.shape)
        x = w if side == "in" else w.T
        gram = x.T @ x
        np.linalg.eigvalsh(gram)
        if wt == ckpt.adapter.ffn_input:
            ffn_gram = gram
        if wt in ("W_Q", "W_K"):
            kernel_inputs[wt] = w
        del w, x, gram
    w_q, w_k = kernel_inputs["W_Q"], kernel_inputs["W_K"]
    q_t = w_q.reshape(dims.n_heads, dims.d_head, dims.d_model).transpose(0, 2, 1)
    k_t = w_k.reshape(dims.n_kv_heads, dims.d_head, dims.d_model).transpose(0, 2, 1)
    k64 = k_t.astype(np.float64)
    r1 = _chol_r(k64)
    q1 = _solve_right(r1, k64)
    r2 = _chol_r(q1)
    q_k, r_k = _solve_right(r2, q1), r2 @ r1
    r_q = _chol_r(q_t).reshape(dims.n_kv_heads, -1, dims.d_head)
    core = (r_q @ np.swapaxes(r_k, 1, 2)).reshape(dims.n_heads, dims.d_head, dims.d_head)
    _, vectors = np.linalg.eigh(np.swapaxes(core, 1, 2) @ core)
    vc_t = np.swapaxes(vectors[:, :, ::-1], 1, 2).astype(np.float32)
    flat = vc_t.reshape(dims.n_kv_heads, -1, dims.d_head)
    flat @ np.swapaxes(q_k.astype(np.float32), 1, 2)                 # the stored vectors
    q_all = np.swapaxes(q_k, 0, 1).reshape(dims.d_model, -1)
    g_kv = q_all.T @ (ffn_gram.astype(np.float64) @ q_all)           # the energies' Grams
    del g_kv


def _numpy_pass(ckpt, workers: int) -> None:
    import ctypes

    from threadpoolctl import threadpool_limits

    # extraction.unmap_large_frees's setting, without importing the module (it imports torch)
    ctypes.CDLL(None).mallopt(-3, 4 << 20)
    layers = range(ckpt.dims.n_layers)
    if workers == 1:
        for layer in layers:
            _numpy_layer(ckpt, layer)
        return
    with threadpool_limits(1), ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda layer: _numpy_layer(ckpt, layer), layers))


def _torch_pass(ckpt, workers: int) -> None:
    import torch

    from weight_geometry.extraction import LayerResult, write_layers

    with tempfile.TemporaryDirectory() as scratch:
        write_layers(ckpt, range(ckpt.dims.n_layers), torch.device("cpu"), False,
                     {n: f"{scratch}/{n}.npy" for n in LayerResult.array_names()},
                     workers=workers)


def run_one(route: str, checkpoint: str, workers: int) -> str:
    """This process: import what the route's job would, run the pass, return a table row."""
    import snakemake.script  # noqa: F401  (a rule script's preamble imports it)

    if route == "torch":
        import torch  # noqa: F401  (imported before the pass, as the job does)
    from weight_geometry.checkpoint import open_checkpoint

    ckpt = open_checkpoint(checkpoint)
    imports = _hwm_mib()
    start = time.perf_counter()
    (_torch_pass if route == "torch" else _numpy_pass)(ckpt, workers)
    seconds = time.perf_counter() - start
    return (f"| {route} | {workers} | {seconds:.1f} | {_hwm_mib():.0f} | {imports:.0f} |"
            f" {'yes' if 'torch' in sys.modules else 'no'} |")


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--one":
        print(run_one(sys.argv[2], sys.argv[3], int(sys.argv[4])))
        return
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/numpy_route_probe.py CHECKPOINT_DIR")
    print("| route | layer workers | pass s | peak RSS MiB | RSS after imports MiB |"
          " torch imported |")
    print("|---|---:|---:|---:|---:|---|")
    for workers in WORKERS:
        for route in ROUTES:
            out = subprocess.run([sys.executable, __file__, "--one", route, sys.argv[1],
                                  str(workers)], capture_output=True, text=True, check=True)
            print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
