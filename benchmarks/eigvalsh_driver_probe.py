"""Probe: is a LAPACK driver faster than torch's ``eigvalsh`` for the effective ranks' spectra?

    python benchmarks/eigvalsh_driver_probe.py

``ranks.weight_spectrum`` takes every eigenvalue of a weight's smaller Gram (``s x s``,
symmetric positive semi-definite) with ``torch.linalg.eigvalsh``, i.e. the one-stage
``?syevd`` of the MKL inside torch: a tridiagonal reduction (``4 s^3 / 3`` flops, half of them
matrix-vector products) and ``?sterf``. LAPACK's two-stage drivers (``?syevd_2stage``, for
eigenvalues only) first reduce to a band with matrix-matrix products, which is faster on some
machines. This times, one thread, on the Grams of random ``4s x s`` float32 matrices at the
Qwen2.5-0.5B and -3B widths (896, 2048), best of 3 after a warm-up:
- torch: ``torch.linalg.eigvalsh``;
- OpenBLAS (the ``scipy_openblas64_`` library numpy ships): ``LAPACKE_?syevd`` and
  ``LAPACKE_?syevd_2stage`` through ctypes;
- MKL, only where the PyPI package ``mkl`` is installed (``pip install mkl``; not a dependency
  of the project): the same two from ``libmkl_rt``.
Every route's eigenvalues are compared with torch's (largest difference / largest eigenvalue).
Results go to benchmarks/RESULTS.md by hand (What changed in stop 24).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from benchlib import best_seconds

SIZES = (896, 2048)
ROW_MAJOR = 101


def _library(distribution: str, stem: str) -> ctypes.CDLL | None:
    """The first shared library named ``stem*`` among the files of an installed
    distribution, or None where the distribution is not installed."""
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    paths = [Path(f.locate()) for f in files if Path(f).name.startswith(stem)]
    return ctypes.CDLL(str(paths[0])) if paths else None


def _lapacke(lib: ctypes.CDLL, name: str, int_type) -> Callable[[np.ndarray], np.ndarray]:
    """``LAPACKE_?syevd``-shaped call (``jobz = 'N'``, upper triangle) on a copy of ``a``."""
    fn = getattr(lib, name)
    fn.restype = int_type

    def eigenvalues(a: np.ndarray) -> np.ndarray:
        a = np.array(a, order="C", copy=True)
        w = np.empty(a.shape[0], a.dtype)
        info = fn(ctypes.c_int(ROW_MAJOR), ctypes.c_char(b"N"), ctypes.c_char(b"U"),
                  int_type(a.shape[0]), a.ctypes.data_as(ctypes.c_void_p),
                  int_type(a.shape[0]), w.ctypes.data_as(ctypes.c_void_p))
        if info:
            raise RuntimeError(f"{name} returned info = {info}")
        return w

    return eigenvalues


def routes() -> dict[str, dict[type, Callable[[np.ndarray], np.ndarray]]]:
    """Name -> dtype -> ``f(array of that dtype) -> eigenvalues``, each on one thread."""
    torch.set_num_threads(1)

    def torch_route(a: np.ndarray) -> np.ndarray:
        return torch.linalg.eigvalsh(torch.from_numpy(a)).numpy()

    out = {"torch eigvalsh (MKL syevd)": {np.float32: torch_route, np.float64: torch_route}}
    openblas = _library("numpy", "libscipy_openblas64_")
    if openblas is not None:
        openblas.scipy_openblas_set_num_threads64_(1)
        for driver in ("syevd", "syevd_2stage"):
            out[f"OpenBLAS {driver}"] = {
                dt: _lapacke(openblas, f"scipy_LAPACKE_{p}{driver}64_", ctypes.c_int64)
                for dt, p in ((np.float32, "s"), (np.float64, "d"))}
    mkl = _library("mkl", "libmkl_rt")
    if mkl is not None:
        mkl.MKL_Set_Num_Threads(ctypes.c_int(1))
        for driver in ("syevd", "syevd_2stage"):
            out[f"MKL {importlib.metadata.version('mkl')} {driver}"] = {
                dt: _lapacke(mkl, f"LAPACKE_{p}{driver}", ctypes.c_int)
                for dt, p in ((np.float32, "s"), (np.float64, "d"))}
    return out


def main() -> None:
    rng = np.random.default_rng(0)
    table = routes()
    print("| route | " + " | ".join(f"{s} x {s} {dt} ms" for s in SIZES
                                   for dt in ("float32", "float64")) + " | max rel. diff |")
    print("|---|" + "---:|" * (2 * len(SIZES) + 1))
    grams = {}
    for s in SIZES:
        x = rng.standard_normal((4 * s, s), dtype=np.float32)
        x[:, : s // 4] *= 30  # a spread spectrum, as trained weights have
        grams[s] = x.T @ x
    reference = {(s, dt): torch.linalg.eigvalsh(torch.from_numpy(g.astype(dt))).numpy()
                 for s, g in grams.items() for dt in (np.float32, np.float64)}
    for name, fns in table.items():
        cells, diff = [], 0.0
        for s, g in grams.items():
            for dt in (np.float32, np.float64):
                fn, a = fns[dt], g.astype(dt)
                cells.append(f"{best_seconds(lambda fn=fn, a=a: fn(a)) * 1e3:.0f}")
                ref = reference[s, dt]
                got = np.sort(fn(a))
                diff = max(diff, float(np.abs(got - ref).max() / ref.max()))
        print(f"| {name} | " + " | ".join(cells) + f" | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
