"""Helpers shared by the benchmark scripts: devices, timers, peak RSS, JSON hand-off, FLOPs.

Every measurement runs in its own Python process (``baseline.py``, ``ours.py STAGE``), which
writes one JSON file; ``run_all.py`` starts them with :func:`run_json` and reads the files.
Peak RSS is ``VmHWM`` from ``/proc/self/status``: the high-water mark of that process's resident
set since it started. (``ru_maxrss`` would not do: Linux carries it over from the parent across
fork and exec, so every child would report at least the parent's peak.)
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
#: The notebook's multi-head sample size and subspace dimension.
N_HEAD_SAMPLE = 4
K = 20


def status_mb(field: str) -> float:
    """A ``kB`` field of this process's ``/proc/self/status`` (``VmHWM``, ``RssAnon``...), in
    MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} (the benchmark needs Linux)")


def peak_rss_mb() -> float:
    """High-water mark of this process's resident set (``VmHWM``), in MiB."""
    return status_mb("VmHWM")


def cuda_unavailable(device: str) -> str | None:
    """A one-line reason to skip when ``device`` is ``cuda`` and no GPU is usable, else None."""
    if device != "cuda":
        return None
    import torch

    if torch.cuda.is_available():
        return None
    return "skipping --device cuda: torch.cuda.is_available() is False on this machine"


def sync(device) -> None:
    """Wait for queued GPU work so that a timer measures it (no-op on CPU)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def stopwatch(times: dict, key: str, device="cpu") -> Iterator[None]:
    """Add the wall time of the block (GPU work included) to ``times[key]``."""
    sync(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        sync(device)
        times[key] = times.get(key, 0.0) + time.perf_counter() - start


def best_seconds(fn: Callable[[], object], device="cpu", runs: int = 3) -> float:
    """Shortest wall time of ``runs`` calls of ``fn()`` (GPU work included) after one untimed
    warm-up call."""
    fn()
    best = float("inf")
    for _ in range(runs):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def gpu_peak_mb(device) -> float | None:
    """Peak memory allocated by torch on the GPU (MiB), None on CPU."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def sampled_heads(n_heads: int, n: int = N_HEAD_SAMPLE) -> list[int]:
    """The notebook's head sample: ``linspace(0, h - 1, min(n, h))`` cast to int."""
    return sorted({int(i) for i in np.linspace(0, n_heads - 1, min(n, n_heads), dtype=int)})


def write_json(path: Path, record: dict) -> None:
    Path(path).write_text(json.dumps(record, indent=1, default=float) + "\n")


def run_json(args: list[str], out: Path, log: Path) -> dict:
    """Run ``python ARGS --json OUT`` with stdout/stderr to ``log``; return the JSON record
    plus ``wall_s``, the wall time of the whole process (interpreter start-up included)."""
    cmd = [sys.executable, *args, "--json", str(out)]
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); log {log}:\n{tail}")
    return {**json.loads(out.read_text()), "wall_s": wall}


def cpu_snapshot() -> tuple[float, float, float]:
    """(wall clock, CPU seconds busy on the whole machine, CPU seconds of this process's
    finished children): two snapshots give the CPU that *other* processes used meanwhile."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait; guest is in user
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"),
            children.ru_utime + children.ru_stime)


def foreign_cores(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Average number of cores kept busy by processes other than the measured child (and its
    descendants) between two :func:`cpu_snapshot` calls."""
    wall, busy, children = (b - a for a, b in zip(before, after, strict=True))
    return max(busy - children, 0.0) / wall


def rank_flops(shape: tuple[int, int]) -> dict[str, float]:
    """FLOPs of all singular values of one ``m x n`` weight (``s = min``, ``l = max``).

    - ``products``: the upper triangle of the Gram ``W^T W`` in panels of ``p`` =
      ``ranks.GRAM_PANEL`` columns, ``l s (s + p)`` (torch has no symmetric rank-k update);
    - ``eigvalsh``: the tridiagonal reduction of that Gram, ``4 s^3 / 3`` (the implicit QR
      sweeps on the tridiagonal are ``O(s^2)``);
    - ``gram``: the library's route, ``products + eigvalsh``;
    - ``svd``: Golub-Kahan bidiagonalization for singular values only, ``4 l s^2 - 4 s^3 / 3``
      (Golub & Van Loan, 4th ed., Fig. 8.6.1): what ``torch.linalg.svdvals`` does.
    """
    from weight_geometry.ranks import GRAM_PANEL

    s, l_ = min(shape), max(shape)
    products, eigvalsh = l_ * s * (s + min(GRAM_PANEL, s)), 4 * s**3 / 3
    return {"gram": products + eigvalsh, "products": products, "eigvalsh": eigvalsh,
            "svd": 4 * l_ * s**2 - 4 * s**3 / 3}
