"""The library and the workflow on a checkpoint, stage by stage, plus the machine's floors.

Each stage runs in its own process, so its peak RSS (``VmHWM``) is its own:

    python benchmarks/ours.py STAGE CHECKPOINT_DIR --scratch DIR [--device cpu|cuda] --json OUT

Stages:
- ``imports``: what the extraction job has imported while it extracts, nothing else: numpy,
  torch, the library modules of ``extract_layers.py`` and what a Snakemake rule script's
  preamble imports: the interpreter's share of the job's peak RSS (the job never imports
  pandas, and pyarrow only after the pass, to write its rank rows), and its anonymous and
  file-backed parts (``RssAnon``, ``RssFile``: the latter, pages of the shared libraries mapped
  in, varies with the page cache's state; benchmarks/RESULTS.md, Drift).
- ``read_floor``: every tensor the analysis needs (the seven projections of every layer) read
  once with ``preadv`` into one reused buffer, page cache warm (a first pass warms it): the
  time to merely move the bytes. Also W_Q and W_K alone (what the subspaces need).
- ``matmul``: this device's float32 and float64 GEMM rate at the Gram shape
  ``(d x d_ff) @ (d_ff x d)``, best of 3 after a warm-up; and its float32 ``eigvalsh`` rate at
  ``d x d`` (``4 d^3 / 3`` flops each), run as the extraction runs it: as many matrices at
  once as it has layer workers, each worker with one thread on the CPU.
- ``extract``: ``extraction.write_layers`` over all layers with as many layer workers as torch
  has threads on the CPU (the workflow's extraction job without Snakemake); it streams its
  arrays into ``--scratch`` for the next stages.
- ``subspaces``: ``Checkpoint.read_layer`` of every layer (timed as ``read``; W_Q and W_K are
  kept), then ``kernels.factored_subspaces`` of all h heads of every layer in float64 and
  their vectors in float32, as ``extract_layers`` does them: on the CPU through
  ``extraction.in_threads`` with as many layer workers as torch has threads, each with one
  thread. ``compute`` is the median of :data:`SUBSPACE_RUNS` passes (all in
  ``compute_runs``): a pass takes about a second, in which this VM's noise moves one run by
  10-15 %; the baseline's stage, a minute of SVDs, is one run.
- ``similarity``: ``similarity.similarity_matrix`` of each sampled head's top-k bases, loaded
  from the saved ``vectors.npy`` (memory-mapped), as the workflow's similarity jobs.
- ``alignment``: per layer the FFN input Gram ``G`` and its eigenvalues
  (``ranks.weight_spectrum``: W_in's singular values, which the null and the ceiling need),
  the energies ``diag(V G V^T)`` per KV head (``FactoredSubspaces.energies``, the subspaces
  themselves computed untimed) as ``extract_layers`` computes them, then
  ``alignment.alignment_table``. ``compute`` counts the Gram and ``eigvalsh`` although the
  effective rank of the same weight shares them in ``extract_layers``; ``marginal`` is the
  rest (energies and table).
- ``ranks``: per layer and weight ``ranks.weight_spectrum`` of the Gram side
  ``extract_layers`` uses (float32, float64 where needed) and
  ``effective_rank_from_singular_values``; on the CPU the seven weights of a layer go through
  ``extraction.in_threads`` with as many workers as torch has threads (the extraction job runs
  whole layers that way; here the read stays apart from the compute).

The workflow itself is run by :func:`run_workflow` (``python -m snakemake`` on the repository's
Snakefile); :func:`job_table` reads each job's time and ``max_rss`` from the benchmark TSVs
Snakemake writes under ``results/*/benchmarks`` and ``results/*/k*/benchmarks``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

from benchlib import (
    REPO,
    K,
    best_seconds,
    cuda_unavailable,
    gpu_peak_mb,
    peak_rss_mb,
    sampled_heads,
    status_mb,
    stopwatch,
    sync,
    write_json,
)

#: Passes over the layers whose median is the subspace stage's ``compute`` time.
SUBSPACE_RUNS = 5
#: Tensor-name suffixes of the seven analysed projections of a Qwen2/Llama layer.
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _open(checkpoint: Path):
    from weight_geometry.checkpoint import open_checkpoint

    return open_checkpoint(str(checkpoint))


def stage_imports(args) -> dict:
    import numpy  # noqa: F401
    import snakemake.iocontainers  # noqa: F401  (what a rule script's preamble imports)
    import torch  # noqa: F401

    import weight_geometry.checkpoint  # noqa: F401
    import weight_geometry.extraction  # noqa: F401
    import weight_geometry.kernels  # noqa: F401
    import weight_geometry.results_io  # noqa: F401

    return {"rss_anon_mb": status_mb("RssAnon"), "rss_file_mb": status_mb("RssFile")}


def _tensor_ranges(checkpoint: Path) -> dict[str, tuple[int, int]]:
    """Absolute ``(offset, size)`` of every tensor of a single-file safetensors checkpoint."""
    path = checkpoint / "model.safetensors"
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    return {name: (8 + n + meta["data_offsets"][0],
                   meta["data_offsets"][1] - meta["data_offsets"][0])
            for name, meta in header.items() if name != "__metadata__"}


def stage_read_floor(args) -> dict:
    ranges = _tensor_ranges(args.checkpoint)
    n_layers = json.loads((args.checkpoint / "config.json").read_text())["num_hidden_layers"]
    buffer = memoryview(bytearray(max(size for _, size in ranges.values())))
    fd = os.open(args.checkpoint / "model.safetensors", os.O_RDONLY)

    def read(suffixes) -> tuple[float, int]:
        start, total = time.perf_counter(), 0
        for layer in range(n_layers):
            for suffix in suffixes:
                offset, size = ranges[f"model.layers.{layer}.{suffix}.weight"]
                total += os.preadv(fd, [buffer[:size]], offset)
        return time.perf_counter() - start, total

    try:
        read(PROJECTIONS)  # warm the page cache
        all_s, all_bytes = read(PROJECTIONS)
        qk_s, qk_bytes = read(PROJECTIONS[:2])
    finally:
        os.close(fd)
    return {"all_s": all_s, "all_bytes": all_bytes, "qk_s": qk_s, "qk_bytes": qk_bytes}


def stage_matmul(args) -> dict:
    import torch

    cfg = json.loads((args.checkpoint / "config.json").read_text())
    d, d_ff = cfg["hidden_size"], cfg["intermediate_size"]
    rates = {}
    for dtype in (torch.float32, torch.float64):
        a = torch.randn(d_ff, d, dtype=dtype, device=args.device)
        best = best_seconds(lambda a=a: a.T @ a, args.device)
        rates[str(dtype).removeprefix("torch.")] = 2 * d_ff * d * d / best / 1e9
    return {"gflops": rates, "shape": [d, d_ff], "eigvalsh_gflops": _eigvalsh_rate(d, args)}


def _eigvalsh_rate(d: int, args) -> float:
    """GFLOP/s of float32 ``eigvalsh`` of ``d x d`` Grams, ``workers`` of them at once through
    ``extraction.in_threads`` (best of 3 after a warm-up)."""
    import torch

    from weight_geometry.extraction import in_threads

    a = torch.randn(4 * d, d, device=args.device)
    gram, workers = a.T @ a, _workers(args.device)

    def one(_) -> None:
        torch.linalg.eigvalsh(gram)
        sync(args.device)

    best = best_seconds(lambda: list(in_threads(one, range(workers), workers)), args.device)
    return workers * 4 * d**3 / 3 / best / 1e9


def stage_extract(args) -> dict:
    import torch

    from weight_geometry.extraction import LayerResult, write_layers

    times: dict[str, float] = {}
    with stopwatch(times, "open"):
        ckpt = _open(args.checkpoint)
    paths = {name: args.scratch / f"{name}.npy" for name in LayerResult.array_names()}
    with stopwatch(times, "s", args.device):
        write_layers(ckpt, range(ckpt.dims.n_layers), torch.device(args.device), False, paths,
                     workers=_workers(args.device))
    return times


def _workers(device: str) -> int:
    """The extraction job's layer workers, with torch's thread count as the job's threads."""
    import torch

    from weight_geometry.extraction import layer_workers

    return layer_workers(torch.device(device), torch.get_num_threads())


def stage_subspaces(args) -> dict:
    import torch

    from weight_geometry.extraction import in_threads
    from weight_geometry.kernels import factored_subspaces

    ckpt = _open(args.checkpoint)
    dims, times, kernel_inputs = ckpt.dims, {}, []
    with stopwatch(times, "read"):
        for layer in range(dims.n_layers):
            weights = ckpt.read_layer(layer)
            kernel_inputs.append((weights["W_Q"], weights["W_K"]))
            del weights  # only W_Q and W_K of each layer are kept for the compute

    def subspaces(pair) -> None:  # as extraction.extract_layer: float64, stored in float32
        w_q, w_k = (torch.from_numpy(w).to(args.device) for w in pair)
        factored_subspaces(w_q, w_k, dims.n_heads, dims.n_kv_heads, dims.d_head,
                           torch.float64).vectors(torch.float32)

    runs = []
    for _ in range(SUBSPACE_RUNS):
        run: dict[str, float] = {}
        with stopwatch(run, "compute", args.device):
            list(in_threads(subspaces, kernel_inputs, _workers(args.device)))
        runs.append(run["compute"])
    times["compute"], times["compute_runs"] = statistics.median(runs), runs
    return times


def stage_similarity(args) -> dict:
    import numpy as np

    from weight_geometry.similarity import similarity_matrix

    times: dict[str, float] = {}
    with stopwatch(times, "compute"):
        vectors = np.load(args.scratch / "vectors.npy", mmap_mode="r")
        for head in sampled_heads(vectors.shape[1]):
            similarity_matrix(np.asarray(vectors[:, head, :args.k, :]))
    return times


def stage_alignment(args) -> dict:
    import numpy as np
    import torch

    from weight_geometry.alignment import alignment_table
    from weight_geometry.kernels import factored_subspaces
    from weight_geometry.ranks import frobenius_norm2, weight_spectrum

    ckpt = _open(args.checkpoint)
    dims, ffn_input = ckpt.dims, ckpt.adapter.ffn_input
    energy = np.empty((dims.n_layers, dims.n_heads, dims.d_head))
    rowspace = np.empty((dims.n_layers, dims.n_kv_heads, dims.d_head))
    norm2 = np.empty(dims.n_layers)
    sigma = np.empty((dims.n_layers, dims.d_model))
    times = {"read": 0.0, "compute": 0.0, "marginal": 0.0}
    for layer in range(dims.n_layers):
        with stopwatch(times, "read"):
            weights = ckpt.read_layer(layer)
        w_q, w_k, w_in = (torch.from_numpy(weights[w]).to(args.device)
                          for w in ("W_Q", "W_K", ffn_input))
        subspaces = factored_subspaces(w_q, w_k, dims.n_heads, dims.n_kv_heads, dims.d_head,
                                       torch.float64)
        with stopwatch(times, "compute", args.device):
            sigma[layer], g = weight_spectrum(w_in, "in")
            with stopwatch(times, "marginal", args.device):
                energy[layer], rowspace[layer] = (x.cpu().numpy()
                                                  for x in subspaces.energies(g))
                norm2[layer] = frobenius_norm2(g)
    with stopwatch(times, "compute"), stopwatch(times, "marginal"):
        alignment_table(energy, norm2, sigma, rowspace, args.k, dims.as_dict(), ffn_input)
    return times


def stage_ranks(args) -> dict:
    import torch

    from weight_geometry.extraction import in_threads
    from weight_geometry.ranks import (
        effective_rank_from_singular_values,
        gram_side,
        weight_spectrum,
    )

    ckpt = _open(args.checkpoint)
    ffn_input = ckpt.adapter.ffn_input

    def rank(item) -> float:
        wt, array = item
        side = gram_side(wt, ffn_input, array.shape)
        sigma, _ = weight_spectrum(torch.from_numpy(array).to(args.device), side)
        return effective_rank_from_singular_values(sigma, array.shape)

    times = {"read": 0.0, "compute": 0.0}
    for layer in range(ckpt.dims.n_layers):
        with stopwatch(times, "read"):
            weights = ckpt.read_layer(layer)
        with stopwatch(times, "compute", args.device):
            list(in_threads(rank, weights.items(), _workers(args.device)))
    return times


STAGES = {name.removeprefix("stage_"): fn for name, fn in globals().items()
          if name.startswith("stage_")}


def run_workflow(workdir: Path, options: list[str], log: Path) -> float:
    """``python -m snakemake -s REPO/Snakefile -d WORKDIR OPTIONS``; returns its wall time (s),
    Snakemake's start-up included. Raises with the log's tail if it fails."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           *options]
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed; log {log}:\n{log.read_text()[-3000:]}")
    return wall


def job_table(workdir: Path) -> list[dict]:
    """One row per job benchmark TSV under ``results/*/benchmarks`` and ``results/*/k*/``:
    ``job`` (``extract_layers000-023``, ``k20/figures``, ...), ``s``, ``max_rss_mb``."""
    rows = []
    results = workdir / "results"
    for tsv in [*sorted(results.glob("*/benchmarks/*.tsv")),
                *sorted(results.glob("*/k*/benchmarks/*.tsv"))]:
        with open(tsv) as fh:
            record = next(csv.DictReader(fh, delimiter="\t"))
        parts = tsv.relative_to(results).with_suffix("").parts[1:]  # drop the model name
        rows.append({"job": "/".join(p for p in parts if p != "benchmarks"),
                     "s": float(record["s"]), "max_rss_mb": float(record["max_rss"])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--scratch", type=Path, required=True,
                        help="directory for the arrays the extract stage hands to later stages")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--k", type=int, default=K)
    parser.add_argument("--json", type=Path, required=True, help="where to write the record")
    args = parser.parse_args()
    skip = cuda_unavailable(args.device)
    if skip:
        print(skip)
        return
    start = time.perf_counter()
    record = STAGES[args.stage](args)
    write_json(args.json, {"stage": args.stage, "device": args.device, **record,
                           "in_process_s": time.perf_counter() - start,
                           "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": gpu_peak_mb(args.device)})


if __name__ == "__main__":
    main()
